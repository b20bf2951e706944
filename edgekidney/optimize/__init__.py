"""Stage 3, artifacts from artifacts: calibration, quantization (precision in the graph), TensorRT engines.

Each step reads an ONNX model and its sidecar and writes a child that knows its parent by sha256; none
imports torch. See docs/architecture.md.
"""
