"""ONNX Runtime backend: the embedded default, on the CPU unless asked otherwise (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekidney.errors import ModelError
from edgekidney.threads import resolve_threads
from edgekidney.runtime.base import Backend

PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def resolve_providers(device: str) -> list[str]:
    """``cpu``, ``cuda``, ``tensorrt`` or ``auto`` (the best execution provider installed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        for key in ("tensorrt", "cuda", "cpu"):
            if PROVIDER_ALIASES[key][0] in available:
                return [p for p in PROVIDER_ALIASES[key] if p in available]
    if device not in PROVIDER_ALIASES:
        raise ModelError(f"unknown ONNX Runtime device {device!r}; use cpu, cuda, tensorrt or auto")
    wanted = PROVIDER_ALIASES[device]
    if wanted[0] not in available:
        raise ModelError(f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(available)}); "
                         "install onnxruntime-gpu for cuda/tensorrt or use --device cpu")
    return wanted


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, model_path: str | Path, image_size: int, input_name: str = "input",
                 device: str = "cpu", threads: int | None = None, spinning: bool = True) -> None:
        super().__init__(image_size=image_size)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = resolve_threads(threads)  # default: the cores this process may use, not the machine's
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if not spinning:  # a spinning pool steals cores from a neighbour (another runtime, the server)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = resolve_providers(device)
        self.threads = threads
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            text = " ".join(str(exc).split())[:300]
            raise ModelError(f"{model_path}: ONNX Runtime cannot load this model ({text})") from None
        names = [i.name for i in self.session.get_inputs()]
        if input_name not in names:
            raise ModelError(f"{model_path}: model has no input named {input_name!r} (inputs: {names})")
        self.input_name = input_name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: batch})))

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.providers, "threads": self.threads}

    def _close_impl(self) -> None:
        del self.session
