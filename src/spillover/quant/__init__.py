"""In-situ quantization: formats (pure) and the transform that applies them."""
