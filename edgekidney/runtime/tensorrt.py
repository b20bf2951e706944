"""TensorRT backend: runs an engine built by ``edgekidney build-engine`` (numpy, tensorrt, a CUDA binding; no torch).

Before deserializing, the engine's sidecar is checked against this machine's GPU and TensorRT
(:mod:`edgekidney.runtime.engine_compat`); a mismatch names the difference and the command that rebuilds.
Pinned host and device buffers are allocated once for the profile's largest batch and reused; tensors
are bound by name (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) on one CUDA
stream. Larger batches are split by :meth:`Backend.infer` at ``max_batch`` (the profile's maximum).

GPU compute time: CUDA events around ``execute_async_v3``, summed over the chunks of the last
``infer()`` call, are in ``backend.last_gpu_ms`` (host end-to-end time is what the caller measures,
as trtexec separates "GPU Compute Time" from "Latency").
"""

from __future__ import annotations

import platform
import re
import sys
import threading
from pathlib import Path

import numpy as np

from edgekidney.runtime.engine_compat import (BatchProfile, check_engine_compatible, engine_info_of, require_tensorrt_environment)
from edgekidney.errors import DependencyError, InputError, ModelError
from edgekidney.sidecar import ModelCard
from edgekidney.runtime.base import Backend
from edgekidney.runtime.cuda import CudaBinding, gpu_environment, load_binding


def import_tensorrt():
    """``import tensorrt``, or a :class:`DependencyError` that says how to get it."""
    from edgekidney.runtime.engine_compat import INSTALL_TENSORRT

    try:
        import tensorrt as trt
    except ImportError as exc:
        raise DependencyError(f"TensorRT is not installed ({exc}); {INSTALL_TENSORRT}") from None
    if not hasattr(trt, "Builder"):  # the PyPI 'tensorrt' stub without NVIDIA's wheels behind it
        raise DependencyError(f"the installed 'tensorrt' package has no TensorRT in it; {INSTALL_TENSORRT}")
    return trt


def tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except DependencyError:
        return None


def detect_environment(binding: CudaBinding | None = None, device: int = 0) -> dict:
    """TensorRT version, CUDA binding, GPU name and compute capability of this machine (never raises)."""
    env = {"tensorrt_version": tensorrt_version(), "platform": platform.machine(), "l4t_release": l4t_release()}
    env.update(gpu_environment(binding, device))
    return env


def l4t_release(path: str = "/etc/nv_tegra_release") -> str | None:
    """'R36.4.0' on a Jetson (JetPack 6.1/6.2 is L4T R36.4), else None."""
    try:
        head = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", head)
    return f"R{m.group(1)}.{m.group(2)}" if m else head.strip("# ").strip()


def make_logger(trt, verbose: bool = False):
    """A TensorRT logger that prints warnings and keeps error messages, so they reach the user in one line."""
    show = trt.ILogger.Severity.INFO if verbose else trt.ILogger.Severity.WARNING
    errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in errors:
                self.errors.append(" ".join(str(msg).split()))
            if int(severity) <= int(show):
                print(f"[TensorRT {severity.name}] {msg}", file=sys.stderr)

    return Logger()


def device_index(device) -> int:
    """0, 1, "1", "cuda" or "cuda:1" (and "auto": the first GPU) -> the GPU index; anything else is an error."""
    if isinstance(device, int) and device >= 0:
        return device
    text = str(device).strip().lower()
    if text in ("auto", "cuda", "gpu"):
        return 0
    tail = text[5:] if text.startswith("cuda:") else text
    if tail.isdigit():
        return int(tail)
    raise InputError(f"--device {device}: TensorRT runs on a GPU; give its index (0, 1, cuda:1) or auto")


class TensorRTBackend(Backend):
    name = "trt"

    def __init__(self, engine_path: str | Path, card: ModelCard, device: int | str = 0,
                 cuda_binding: str | None = None) -> None:
        self.engine_path = Path(engine_path)
        self.cuda: CudaBinding | None = None
        if card.kind != "engine":
            raise ModelError(f"{engine_path}: is an ONNX model, not a TensorRT engine; build one first: "
                             f"edgekidney build-engine {engine_path} --out {Path(engine_path).with_suffix('.engine')}")
        self.info = engine_info_of(card.extra, str(engine_path))
        self.card = card
        self.profile = BatchProfile.from_dict(self.info["profile"])
        super().__init__(image_size=card.preprocessing.image_size, max_batch=self.profile.max_batch)
        self.last_gpu_ms: float | None = None
        self._lock = threading.Lock()
        self._buffers: dict = {}
        self._events = ()
        self._stream = None
        self.context = self.engine = self.runtime = None

        index = device_index(device)
        try:
            binding = load_binding(cuda_binding)
            self.env = detect_environment(binding, index)
        except DependencyError as exc:  # no (or not the requested) CUDA binding: say so with the rest
            binding = None
            self.env = {"tensorrt_version": tensorrt_version(), "cuda_binding": None, "gpu_name": None,
                        "cuda_error": str(exc)}
        require_tensorrt_environment(self.env, f"run TensorRT engine {engine_path}")
        check_engine_compatible(self.info, self.env, engine_path)

        trt = import_tensorrt()
        self.cuda = binding
        binding.open(index)
        try:
            with binding.active():
                self._load(trt)
        except BaseException:
            self._release()
            raise

    # -- loading -------------------------------------------------------------------------------------------
    def _load(self, trt) -> None:
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if self.info.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed their lean runtime
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            why = "; ".join(self.logger.errors[-2:]) or "TensorRT could not deserialize it"
            raise ModelError(f"{self.engine_path}: cannot load engine ({why}); rebuild it with edgekidney build-engine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [self.card.input_name] or sorted(outputs) != sorted(self.card.outputs):
            raise ModelError(f"{self.engine_path}: engine has inputs {inputs} and outputs {outputs}; "
                             f"its sidecar names input {self.card.input_name!r} and outputs {self.card.outputs}")
        self.input_name, self.output_names = inputs[0], outputs
        lo, _, hi = (tuple(d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0))
        if hi[0] != self.profile.max_batch or lo[0] != self.profile.min_batch:
            raise ModelError(f"{self.engine_path}: engine profile batch {lo[0]}..{hi[0]} differs from its sidecar "
                             f"({self.profile.min_batch}..{self.profile.max_batch}); the sidecar is another engine's")
        self.max_batch, self.min_batch = hi[0], lo[0]
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ModelError(f"{self.engine_path}: TensorRT could not create an execution context (GPU memory?)")

        # Buffers for the largest batch, allocated once; addresses bound once.
        if not self.context.set_input_shape(self.input_name, hi):
            raise ModelError(f"{self.engine_path}: engine rejects its own maximum input shape {hi}")
        for name in (self.input_name, *self.output_names):
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self.cuda.buffer(int(np.prod(shape)) * dtype.itemsize, dtype)
            self._buffers[name] = buf
            self.context.set_tensor_address(name, buf.device)
        self._stream = self.cuda.stream()
        self._events = (self.cuda.event(), self.cuda.event())

    # -- inference ----------------------------------------------------------------------------------------
    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """As :meth:`Backend.infer_outputs`; also sets ``last_gpu_ms`` (GPU compute of all chunks of this call)."""
        if self._closed:
            raise ModelError(f"{self.name} backend is closed")
        with self._lock, self.cuda.active():
            self._gpu_ms = 0.0
            out = super().infer_outputs(batch)
            self.last_gpu_ms = self._gpu_ms
            return out

    def _infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        run = max(n, self.min_batch)  # pad up to the profile's minimum (zeros; their rows are dropped)
        shape = (run,) + batch.shape[1:]
        if not self.context.set_input_shape(self.input_name, shape):
            raise InputError(f"engine does not accept input shape {shape} (profile {self.profile.to_dict()})")
        inp = self._buffers[self.input_name]
        host_in = inp.host[: int(np.prod(shape))].reshape(shape)
        host_in[:n] = batch  # casts to the engine's input type if it is not float32
        if run > n:
            host_in[n:] = 0
        shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.output_names}

        stream, (start, end) = self._stream, self._events
        self.cuda.htod_async(inp.device, host_in, stream)
        self.cuda.event_record(start, stream)
        if not self.context.execute_async_v3(self.cuda.stream_handle(stream)):
            raise ModelError(f"{self.engine_path}: TensorRT execution failed ({'; '.join(self.logger.errors[-2:])})")
        self.cuda.event_record(end, stream)
        host_outs = {}
        for name, shape in shapes.items():
            buf = self._buffers[name]
            host_outs[name] = buf.host[: int(np.prod(shape))]
            self.cuda.dtoh_async(host_outs[name], buf.device, stream)
        self.cuda.stream_sync(stream)
        self._gpu_ms += self.cuda.event_elapsed_ms(start, end)
        return {name: host_outs[name].reshape(shape)[:n].astype(np.float32, copy=True) for name, shape in shapes.items()}

    def describe(self) -> dict:
        return {"backend": self.name, "engine": str(self.engine_path), "precision": self.card.precision,
                "tensorrt": self.env.get("tensorrt_version"), "gpu": self.env.get("gpu_name"),
                "compute_capability": self.env.get("compute_capability"), "cuda_binding": self.env.get("cuda_binding"),
                "profile": self.profile.to_dict(), "gpu_time_attribute": "last_gpu_ms"}

    # -- cleanup --------------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self.cuda is None:
            return
        try:
            with self.cuda.active():
                self.context = self.engine = self.runtime = None  # TensorRT objects first, then their memory
                for ev in self._events:
                    self.cuda.event_destroy(ev)
                if self._stream is not None:
                    self.cuda.stream_destroy(self._stream)
                for buf in self._buffers.values():
                    buf.free()
                self._events, self._stream, self._buffers = (), None, {}  # (pycuda objects go while current)
        finally:
            self._events, self._stream, self._buffers = (), None, {}
            self.cuda.close()
            self.cuda = None

    def _close_impl(self) -> None:
        with self._lock:
            self._release()
