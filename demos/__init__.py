"""Desktop demos of glm4-intel: ``python -m demos.gradio_chat`` (a chat in the browser)."""
