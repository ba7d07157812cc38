"""graphopt: a compiler-style graph optimizer for ONNX models."""
