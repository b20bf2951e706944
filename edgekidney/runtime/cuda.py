"""The one place that talks to CUDA: pycuda, or cuda-python standing in for it.

TensorRT needs device memory, pinned host memory, a stream and (for timing) events. Both bindings
offer them; this module hides which one is installed behind a few functions, following NVIDIA's
``samples/python/common_runtime.py``: CUDA error codes become exceptions, host buffers are pinned,
and everything allocated is freed explicitly (``free()``/``close()``), never in ``__del__``.

Choose with ``EDGEKIDNEY_CUDA_BINDING=pycuda|cuda-python``; by default pycuda is used when it imports
(the ``trt`` extra and JetPack), else cuda-python (NVIDIA's own samples since TensorRT 10.14).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgekidney.errors import DependencyError

BINDINGS = ("pycuda", "cuda-python")


class CudaError(DependencyError):
    """A CUDA call failed (most often: no driver or no device usable from Python)."""


@dataclass
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "8.7"
    total_memory_mib: int


class HostDeviceBuffer:
    """A pinned host array and a device allocation of the same size (bytes), viewed as ``dtype``."""

    def __init__(self, binding: "CudaBinding", nbytes: int, dtype) -> None:
        self.binding = binding
        self.nbytes = int(nbytes)
        self.dtype = np.dtype(dtype)
        self._raw_host, self._host_handle = binding._host_alloc(self.nbytes)
        self.host = self._raw_host.view(self.dtype)
        self.device = binding._device_alloc(self.nbytes)  # int pointer

    def free(self) -> None:
        if self._host_handle is not None:
            self.binding._host_free(self._host_handle)
            self._host_handle = None
        if self.device is not None:
            self.binding._device_free(self.device)
            self.device = None


class CudaBinding:
    """Common interface; subclasses implement the underscored calls."""

    name = "base"

    # device discovery
    def device_count(self) -> int: ...
    def device_info(self, index: int = 0) -> DeviceInfo: ...
    def versions(self) -> dict: return {}

    # context: ``open`` picks the device, ``active()`` makes it current on the calling thread (the server
    # calls from worker threads), ``close`` lets it go
    def open(self, index: int = 0) -> None: ...
    def close(self) -> None: ...
    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield

    # memory and streams
    def buffer(self, nbytes: int, dtype) -> HostDeviceBuffer:
        return HostDeviceBuffer(self, nbytes, dtype)

    def stream(self): ...
    def stream_handle(self, stream) -> int: ...
    def stream_sync(self, stream) -> None: ...
    def stream_destroy(self, stream) -> None: ...
    def htod_async(self, device_ptr: int, host: np.ndarray, stream) -> None: ...
    def dtoh_async(self, host: np.ndarray, device_ptr: int, stream) -> None: ...
    def event(self): ...
    def event_record(self, event, stream) -> None: ...
    def event_elapsed_ms(self, start, end) -> float: ...
    def event_destroy(self, event) -> None: ...


# -- cuda-python (cuda.bindings.runtime) --------------------------------------------------------------
class CudaPythonBinding(CudaBinding):
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        self.index = 0

    def _check(self, result):
        """cuda-python returns (error, *values); raise on an error, return the values."""
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            code = getattr(err, "name", str(err))
            _, text = self.rt.cudaGetErrorString(err)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CudaError(f"CUDA error {code}: {text}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def device_count(self) -> int:
        return int(self._check(self.rt.cudaGetDeviceCount()))

    def device_info(self, index: int = 0) -> DeviceInfo:
        prop = self._check(self.rt.cudaGetDeviceProperties(index))
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return DeviceInfo(index, str(name).strip(), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem) >> 20)

    def versions(self) -> dict:
        out = {}
        for key, fn in (("cuda_driver", self.rt.cudaDriverGetVersion), ("cuda_runtime", self.rt.cudaRuntimeGetVersion)):
            err, v = fn()
            if err == self.rt.cudaError_t.cudaSuccess and v:
                out[key] = f"{v // 1000}.{(v % 1000) // 10}"
        return out

    def open(self, index: int = 0) -> None:
        self.index = index
        self._check(self.rt.cudaSetDevice(index))

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._check(self.rt.cudaSetDevice(self.index))  # the runtime API uses the primary context per thread
        yield

    def _host_alloc(self, nbytes: int):
        ptr = self._check(self.rt.cudaMallocHost(nbytes))
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        return arr, ptr

    def _host_free(self, handle) -> None:
        self._check(self.rt.cudaFreeHost(handle))

    def _device_alloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes)))

    def _device_free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def stream(self):
        return self._check(self.rt.cudaStreamCreate())

    def stream_handle(self, stream) -> int:
        return int(stream)

    def stream_sync(self, stream) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream) -> None:
        self._check(self.rt.cudaStreamDestroy(stream))

    def htod_async(self, device_ptr: int, host: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(device_ptr, host.ctypes.data, host.nbytes, kind, stream))

    def dtoh_async(self, host: np.ndarray, device_ptr: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, device_ptr, host.nbytes, kind, stream))

    def event(self):
        return self._check(self.rt.cudaEventCreate())

    def event_record(self, event, stream) -> None:
        self._check(self.rt.cudaEventRecord(event, stream))

    def event_elapsed_ms(self, start, end) -> float:
        return float(self._check(self.rt.cudaEventElapsedTime(start, end)))

    def event_destroy(self, event) -> None:
        self._check(self.rt.cudaEventDestroy(event))


# -- pycuda -------------------------------------------------------------------------------------------
class PyCudaBinding(CudaBinding):
    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as drv

        self.drv = drv
        self.ctx = None
        self._initialised = False
        self._allocs: dict[int, object] = {}

    def _init(self) -> None:
        if not self._initialised:
            try:
                self.drv.init()
            except Exception as exc:  # pycuda.driver.Error / RuntimeError: no driver
                raise CudaError(f"CUDA driver unavailable ({' '.join(str(exc).split())})") from None
            self._initialised = True

    def device_count(self) -> int:
        self._init()
        return int(self.drv.Device.count())

    def device_info(self, index: int = 0) -> DeviceInfo:
        self._init()
        dev = self.drv.Device(index)
        major, minor = dev.compute_capability()
        return DeviceInfo(index, dev.name().strip(), f"{major}.{minor}", int(dev.total_memory()) >> 20)

    def versions(self) -> dict:
        self._init()
        v = self.drv.get_driver_version()
        return {"cuda_driver": f"{v // 1000}.{(v % 1000) // 10}"}

    def open(self, index: int = 0) -> None:
        # The primary context is the one TensorRT (CUDA runtime API) uses, so share it; no pycuda.autoinit.
        self._init()
        self.ctx = self.drv.Device(index).retain_primary_context()

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.detach()
            self.ctx = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.ctx.push()  # pycuda contexts are current per thread
        try:
            yield
        finally:
            self.drv.Context.pop()

    def _host_alloc(self, nbytes: int):
        arr = self.drv.pagelocked_empty(nbytes, np.uint8)
        return arr, arr

    def _host_free(self, handle) -> None:
        handle.base.free()

    def _device_alloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def _device_free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def stream(self):
        return self.drv.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def stream_sync(self, stream) -> None:
        stream.synchronize()

    def stream_destroy(self, stream) -> None:
        pass  # pycuda destroys streams when they are released

    def htod_async(self, device_ptr: int, host: np.ndarray, stream) -> None:
        self.drv.memcpy_htod_async(device_ptr, host, stream)

    def dtoh_async(self, host: np.ndarray, device_ptr: int, stream) -> None:
        self.drv.memcpy_dtoh_async(host, device_ptr, stream)

    def event(self):
        return self.drv.Event()

    def event_record(self, event, stream) -> None:
        event.record(stream)

    def event_elapsed_ms(self, start, end) -> float:
        return float(end.time_since(start))

    def event_destroy(self, event) -> None:
        pass


# -- choosing ----------------------------------------------------------------------------------------
def _make(name: str) -> CudaBinding:
    return PyCudaBinding() if name == "pycuda" else CudaPythonBinding()


def load_binding(prefer: str | None = None) -> CudaBinding:
    """The CUDA binding to use; :class:`DependencyError` naming both when neither imports."""
    prefer = prefer or os.environ.get("EDGEKIDNEY_CUDA_BINDING") or None
    if prefer and prefer not in BINDINGS:
        raise DependencyError(f"unknown CUDA binding {prefer!r}; choose one of {', '.join(BINDINGS)}")
    order = [prefer] if prefer else list(BINDINGS)
    errors = []
    for name in order:
        try:
            return _make(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise DependencyError("no CUDA Python binding: install pycuda (pip install pycuda; on Jetson it builds against "
                          f"JetPack's CUDA) or cuda-python ({'; '.join(errors)})")


def gpu_environment(binding: CudaBinding | None = None, index: int = 0) -> dict:
    """``{cuda_binding, gpu_name, compute_capability, gpu_memory_mib, cuda_error, ...}`` of device ``index``."""
    env = {"cuda_binding": None, "gpu_name": None, "compute_capability": None, "cuda_error": None}
    try:
        binding = binding or load_binding()
    except DependencyError as exc:
        env["cuda_error"] = str(exc)
        return env
    env["cuda_binding"] = binding.name
    try:
        count = binding.device_count()
        if count <= index:
            env["cuda_error"] = f"{count} CUDA device(s) visible, device {index} requested"
            return env
        info = binding.device_info(index)
        env.update(gpu_name=info.name, compute_capability=info.compute_capability,
                   gpu_memory_mib=info.total_memory_mib, **binding.versions())
    except CudaError as exc:
        env["cuda_error"] = str(exc)
    return env
