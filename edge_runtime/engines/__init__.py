"""Training and evaluation engines: a bundle's ONNX graphs run through ONNX Runtime."""
