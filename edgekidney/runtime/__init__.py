"""The lean on-device runtime: numpy, onnxruntime, tensorrt and a CUDA binding, never torch."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..sidecar import ModelCard
from .base import Backend

BACKENDS = ("ort", "trt")


def open_backend(path: str | Path, card: ModelCard, backend: str = "ort", **options) -> Backend:
    """Open ``path`` (an ONNX model or a TensorRT engine) with the named backend."""
    if backend == "ort":
        if card.kind != "onnx":
            raise ModelError(f"{path}: is a TensorRT engine; use --backend trt (ONNX Runtime runs .onnx models)")
        from .ort import OrtBackend

        return OrtBackend(path, image_size=card.preprocessing.image_size, input_name=card.input_name, **options)
    if backend == "trt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(path, card, **options)
    raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "open_backend"]
