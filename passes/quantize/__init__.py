"""INT8 quantization passes."""
