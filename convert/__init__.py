"""glm4-intel converter: GLM-4 checkpoints to OpenVINO IR with NNCF weight compression."""
