"""The bundled glm4-tiny model: its task suite, tokenizer, training and evaluation, and the shape model."""
