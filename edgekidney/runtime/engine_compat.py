"""What an engine may run on: TensorRT versions, the batch profile, the cache key, the compatibility check.

Pure functions of plain data (a sidecar's ``extra["engine"]`` dict and an environment dict from
:func:`edgekidney.runtime.tensorrt.detect_environment`), so every rule here is tested without a GPU.

Environment dict keys: ``tensorrt_version`` (str or None), ``cuda_binding`` (str or None),
``gpu_name`` (str or None), ``compute_capability`` ("8.7" or None), ``cuda_error`` (str or None).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekidney.errors import DependencyError, InputError, ModelError

MIN_TENSORRT = (10, 3)
SUPPORTED_TENSORRT = ("TensorRT 10.3 or newer 10.x (JetPack 6.1/6.2 ships 10.3) and TensorRT 11.x; "
                      "JetPack 5 (TensorRT 8.5) is not supported")
HARDWARE_COMPATIBILITY = ("ampere_plus", "same_compute_capability")
INSTALL_TENSORRT = ("install TensorRT's Python bindings: on a Jetson they come with JetPack 6 "
                    "(sudo apt-get install python3-libnvinfer, or run jetson/setup.sh); on a workstation "
                    "pip install 'edgekidney[trt]' (needs NVIDIA's package index)")


# -- versions ----------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); leading numeric parts only."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def check_tensorrt_version(version: str) -> None:
    """Refuse TensorRT older than 10.3: strongly typed ONNX networks with Q/DQ need 10.x."""
    if parse_version(version)[:2] < MIN_TENSORRT:
        raise DependencyError(f"TensorRT {version} is too old: edgekidney builds strongly typed engines and "
                              f"supports {SUPPORTED_TENSORRT}")


def _release(version: str) -> tuple[int, ...]:
    v = parse_version(version)
    return (v + (0, 0, 0))[:3]


# -- batch profile -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile over the batch dimension; spatial size comes from the sidecar."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    def validate(self) -> "BatchProfile":
        if self.min_batch < 1:
            raise InputError(f"--min-batch {self.min_batch}: the smallest batch must be at least 1")
        if self.min_batch > self.opt_batch:
            raise InputError(f"batch range: --min-batch {self.min_batch} is larger than --opt-batch {self.opt_batch}; "
                             "need min <= opt <= max")
        if self.opt_batch > self.max_batch:
            raise InputError(f"batch range: --opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}; "
                             "need min <= opt <= max")
        return self

    def shapes(self, image_size: int) -> dict[str, list[int]]:
        s = int(image_size)
        return {"min": [self.min_batch, 3, s, s], "opt": [self.opt_batch, 3, s, s], "max": [self.max_batch, 3, s, s]}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BatchProfile":
        return cls(int(d["min_batch"]), int(d["opt_batch"]), int(d["max_batch"]))


def profile_shapes(input_name: str, image_size: int, profile: BatchProfile) -> dict[str, dict[str, list[int]]]:
    """``{input name: {min, opt, max}}`` as the engine sidecar records them."""
    return {input_name: profile.validate().shapes(image_size)}


def check_static_batch(onnx_batch_dim: int | str | None, profile: BatchProfile) -> None:
    """An ONNX input with a fixed batch size only admits that size in the profile."""
    if isinstance(onnx_batch_dim, int) and onnx_batch_dim > 0:
        if not profile.min_batch == profile.opt_batch == profile.max_batch == onnx_batch_dim:
            raise InputError(f"the ONNX model has a fixed batch size of {onnx_batch_dim}; export it with a dynamic "
                             f"batch or use --min-batch/--opt-batch/--max-batch {onnx_batch_dim}")


# -- cache keys ----------------------------------------------------------------------------------------
def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def engine_cache_key(onnx_sha256: str, precision: str, shapes: dict, env: dict, options: dict | None = None) -> str:
    """A key for one engine: the same ONNX, precision, profile, TensorRT and GPU give the same key.

    ``options`` holds the build options that change the plan (version/hardware compatibility, TF32).
    """
    return _digest({"onnx_sha256": onnx_sha256, "precision": precision, "profile": shapes,
                    "tensorrt": ".".join(map(str, parse_version(env["tensorrt_version"]))),
                    "gpu": env.get("gpu_name"), "compute_capability": env.get("compute_capability"),
                    "options": dict(sorted((options or {}).items()))})


def timing_cache_key(env: dict) -> str:
    """Timing caches are per TensorRT release and GPU, shared by all models."""
    return _digest({"tensorrt": ".".join(map(str, parse_version(env["tensorrt_version"]))),
                    "gpu": env.get("gpu_name"), "compute_capability": env.get("compute_capability")})


def engine_file_name(onnx_path: str | Path, precision: str, key: str) -> str:
    """``model.int8.onnx`` -> ``model.int8.<key>.engine`` (precision added when the stem lacks it)."""
    stem = Path(onnx_path).stem
    if not stem.endswith("." + precision):
        stem = f"{stem}.{precision}"
    return f"{stem}.{key}.engine"


def timing_cache_file(path: str | Path, env: dict) -> Path:
    """A ``--timing-cache`` folder gets one file per TensorRT release and GPU; a file path is used as is."""
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", "\\")):
        return p / f"timing-{timing_cache_key(env)}.cache"
    return p


# -- the environment ----------------------------------------------------------------------------------
def missing_for_tensorrt(env: dict) -> list[str]:
    """What this machine lacks to build or run engines (empty when nothing)."""
    missing = []
    if not env.get("tensorrt_version"):
        missing.append(f"TensorRT is not installed ({INSTALL_TENSORRT})")
    if not env.get("cuda_binding"):
        missing.append("no CUDA Python binding: install pycuda (pip install pycuda; on Jetson it builds against "
                       "JetPack's CUDA) or cuda-python")
    elif not env.get("gpu_name"):
        missing.append(f"no CUDA device ({env.get('cuda_error') or 'none found'})")
    return missing


def require_tensorrt_environment(env: dict, action: str) -> None:
    missing = missing_for_tensorrt(env)
    if missing:
        raise DependencyError(f"cannot {action}: " + "; ".join(missing))
    check_tensorrt_version(env["tensorrt_version"])


# -- engine compatibility -----------------------------------------------------------------------------
def _cc(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def compatibility_problems(info: dict, env: dict) -> list[str]:
    """Why an engine built as ``info`` (sidecar ``extra["engine"]``) cannot run in ``env``; [] when it can."""
    problems = []
    built, here = info.get("tensorrt_version"), env.get("tensorrt_version")
    if built and here:
        if info.get("version_compatible"):
            if _release(here) < _release(built):
                problems.append(f"built version-compatible with TensorRT {built}, which runs on that release or "
                                f"newer; this machine has TensorRT {here}")
        elif parse_version(here) != parse_version(built):  # plans match major.minor.patch.build exactly
            problems.append(f"built with TensorRT {built}, this machine has TensorRT {here}")
    hw = info.get("hardware_compatibility")
    cc_built, cc_here = _cc(info.get("compute_capability")), _cc(env.get("compute_capability"))
    gpu_built, gpu_here = info.get("gpu_name"), env.get("gpu_name")
    if cc_built and cc_here:
        if hw == "ampere_plus":
            if cc_here < (8, 0):
                problems.append(f"built hardware-compatible for Ampere and newer GPUs; this GPU ({gpu_here}) has "
                                f"compute capability {env['compute_capability']}")
        elif cc_here != cc_built:
            problems.append(f"built for GPU {gpu_built} (compute capability {info['compute_capability']}), "
                            f"this GPU is {gpu_here} (compute capability {env['compute_capability']})")
        elif hw != "same_compute_capability" and gpu_built and gpu_here and gpu_built != gpu_here:
            problems.append(f"built on GPU {gpu_built}, this GPU is {gpu_here} (same compute capability "
                            f"{env['compute_capability']}, but TensorRT plans are tuned per GPU model)")
    return problems


def rebuild_command(info: dict, engine_path: str | Path) -> str:
    """The ``edgekidney build-engine`` line that rebuilds this engine here, with the same options."""
    prof = info.get("profile", {})
    args = ["edgekidney", "build-engine", info.get("onnx_path") or "MODEL.onnx", "--out", str(engine_path)]
    for key in ("min_batch", "opt_batch", "max_batch"):
        if key in prof:
            args += [f"--{key.replace('_', '-')}", str(prof[key])]
    if info.get("workspace_mib"):
        args += ["--workspace", str(info["workspace_mib"])]
    if info.get("version_compatible"):
        args.append("--version-compatible")
    if info.get("hardware_compatibility"):
        args += ["--hardware-compatibility", info["hardware_compatibility"]]
    if info.get("tf32"):
        args.append("--tf32")
    return " ".join(shlex.quote(a) for a in args)


def engine_info_of(card_extra: dict, where: str) -> dict:
    info = card_extra.get("engine")
    if not isinstance(info, dict) or not info.get("tensorrt_version") or not isinstance(info.get("profile"), dict):
        raise ModelError(f"{where}: sidecar has no TensorRT build record (extra.engine); "
                         "build engines with 'edgekidney build-engine'")
    return info


def check_build_options(hardware_compatibility: str | None, env: dict) -> None:
    """Hardware compatibility needs an Ampere-or-newer discrete GPU: TensorRT does not offer it on JetPack."""
    if not hardware_compatibility:
        return
    if env.get("l4t_release"):
        raise InputError(f"--hardware-compatibility {hardware_compatibility}: TensorRT does not support hardware "
                         f"compatibility on JetPack ({env['l4t_release']}); build on each device instead")
    cc = _cc(env.get("compute_capability"))
    if cc and cc < (8, 0):
        raise InputError(f"--hardware-compatibility {hardware_compatibility}: needs an Ampere or newer GPU to build "
                         f"on; {env.get('gpu_name')} has compute capability {env['compute_capability']}")


def check_engine_compatible(info: dict, env: dict, engine_path: str | Path) -> None:
    """Raise a one-line :class:`ModelError` that says which mismatch and how to rebuild."""
    problems = compatibility_problems(info, env)
    if problems:
        raise ModelError(f"{engine_path}: engine does not match this machine: {'; '.join(problems)}. "
                         f"Rebuild it here: {rebuild_command(info, engine_path)}")
