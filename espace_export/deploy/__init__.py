"""Stages 5-7, build / profile / gate and serve: ONNX Runtime and TensorRT builders, latency, the CI gate, Triton."""
