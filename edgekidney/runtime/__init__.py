"""The lean on-device runtime: numpy, onnxruntime, tensorrt and a CUDA binding, never torch.

:func:`open_backend` is the one door to the backends: it picks the backend from the artifact's
sidecar (an engine runs on TensorRT, an ONNX model on ONNX Runtime), validates the options against
what that backend takes (an option it does not take is a one-line error, never silently dropped) and
applies the caller's ``defaults`` (preferences such as "no spinning" or a thread count) where the
backend has a use for them.
"""

from __future__ import annotations

from pathlib import Path

from edgekidney.errors import InputError, ModelError
from edgekidney.sidecar import ModelCard
from edgekidney.runtime.base import Backend

BACKENDS = ("ort", "trt")
# What each backend takes. ort: device cpu|cuda|tensorrt|auto, intra-op threads, pool spinning;
# trt: the GPU (index or cuda:N) and the CUDA binding (cuda-python | pycuda).
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {"ort": ("device", "threads", "spinning"),
                                               "trt": ("device", "cuda_binding")}


def backend_for(card: ModelCard) -> str:
    """The backend an artifact runs on, from its sidecar (not its file name)."""
    return "trt" if card.kind == "engine" else "ort"


def backend_options(backend: str, options: dict, defaults: dict | None = None) -> dict:
    """``options`` (None = not given) checked against ``backend``; ``defaults`` fill in where they apply."""
    if backend not in BACKEND_OPTIONS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    takes = BACKEND_OPTIONS[backend]
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if k not in takes)
    if unknown:
        names = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise InputError(f"{names}: not an option of the {backend} backend (it takes "
                         f"{', '.join('--' + k.replace('_', '-') for k in takes)})")
    merged = {k: v for k, v in (defaults or {}).items() if k in takes and v is not None}
    merged.update(given)
    return merged


def open_backend(path: str | Path, card: ModelCard, backend: str | None = None, *, defaults: dict | None = None,
                 **options) -> Backend:
    """Open ``path`` (an ONNX model or a TensorRT engine) with the named backend (default: from the sidecar)."""
    backend = backend or backend_for(card)
    kwargs = backend_options(backend, options, defaults)
    if backend == "ort":
        if card.kind != "onnx":
            raise ModelError(f"{path}: is a TensorRT engine; use --backend trt (ONNX Runtime runs .onnx models)")
        from edgekidney.runtime.ort import OrtBackend

        return OrtBackend(path, image_size=card.preprocessing.image_size, input_name=card.input_name, **kwargs)
    from edgekidney.runtime.tensorrt import TensorRTBackend

    return TensorRTBackend(path, card, **kwargs)


__all__ = ["BACKENDS", "BACKEND_OPTIONS", "Backend", "backend_for", "backend_options", "open_backend"]
