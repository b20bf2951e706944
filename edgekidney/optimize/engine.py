"""Build a TensorRT engine from an edgekidney ONNX model: ``edgekidney build-engine MODEL.onnx --out MODEL.engine``.

The network is strongly typed (docs/architecture.md rule 2): precision comes from the graph (FP32, FP16, or Q/DQ
INT8), so the same code builds on TensorRT 10.3+ (JetPack 6.1/6.2) and 11.x, which removed the
FP16/INT8 builder flags. One optimization profile covers the batch range; the spatial size comes from
the model's sidecar. The engine's sidecar (``MODEL.engine.json``) records the TensorRT version, GPU,
compute capability, precision, profile shapes, the ONNX sha256 and the build time, which the runtime
checks before it loads the engine (:mod:`edgekidney.runtime.engine_compat`). No torch here.

Build steps are named for what they produce from what, as Polygraphy's loaders are:
``inspect_onnx`` -> ``network_from_onnx`` -> ``builder_config`` -> ``serialized_engine``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgekidney.runtime.engine_compat import (HARDWARE_COMPATIBILITY, BatchProfile, check_build_options, check_static_batch,
                            engine_cache_key, engine_file_name, profile_shapes, require_tensorrt_environment,
                            timing_cache_file)
from edgekidney.errors import InputError, ModelError
from edgekidney.optimize.graph import graph_precision
from edgekidney.lineage import threshold_record
from edgekidney.sidecar import ModelCard, carried, load_card, sidecar_path


@dataclass
class EngineBuildConfig:
    profile: BatchProfile = field(default_factory=BatchProfile)
    workspace_mib: int | None = None  # builder workspace limit; None: TensorRT's default (device memory)
    timing_cache: str | Path | None = None  # a file, or a folder (existing, or ending in /): one cache per TRT+GPU
    version_compatible: bool = False
    hardware_compatibility: str | None = None  # ampere_plus | same_compute_capability
    tf32: bool = False  # FP32 layers stay FP32 unless asked: precision comes from the graph
    force: bool = False  # rebuild even when --out already holds this exact engine
    device: int = 0
    verbose: bool = False

    def validate(self) -> "EngineBuildConfig":
        self.profile.validate()
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise InputError(f"--workspace {self.workspace_mib}: give the builder workspace in MiB (>= 1)")
        if self.hardware_compatibility not in (None, *HARDWARE_COMPATIBILITY):
            raise InputError(f"--hardware-compatibility {self.hardware_compatibility!r}: choose "
                             f"{' or '.join(HARDWARE_COMPATIBILITY)}")
        return self

    def plan_options(self) -> dict:
        """Options that change the plan (part of the cache key and the sidecar)."""
        return {"version_compatible": self.version_compatible, "hardware_compatibility": self.hardware_compatibility,
                "tf32": self.tf32}


# -- ONNX, checked before TensorRT sees it --------------------------------------------------------------
def inspect_onnx(path: Path, card: ModelCard) -> dict:
    """Parse the ONNX file and check it against its sidecar: input name and shape, output, precision."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...: the file is not a usable ONNX model
        raise ModelError(f"{path}: does not parse as an ONNX model ({' '.join(str(exc).split())[:200]})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    if card.input_name not in inputs:
        raise ModelError(f"{path}: ONNX model has no input {card.input_name!r} (inputs: {sorted(inputs)}), "
                         "which its sidecar names")
    outputs = [o.name for o in model.graph.output]
    if card.output_name not in outputs:
        raise ModelError(f"{path}: ONNX model has no output {card.output_name!r} (outputs: {outputs})")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in inputs[card.input_name].type.tensor_type.shape.dim]
    s = card.preprocessing.image_size
    if len(dims) != 4 or any(isinstance(d, int) and d != want for d, want in zip(dims[1:], (3, s, s), strict=True)):
        raise ModelError(f"{path}: input {card.input_name!r} has shape {dims}; the sidecar says (N, 3, {s}, {s})")
    precision = graph_precision(model)
    if precision != card.precision:
        raise ModelError(f"{path}: sidecar says precision {card.precision} but the graph is {precision} "
                         "(precision lives in the graph: re-export or re-quantize)")
    return {"batch_dim": dims[0], "precision": precision, "opset": max(
        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)}


def format_parser_errors(errors: list[dict]) -> str:
    """One line from the ONNX parser's errors: which node (index, name, operator) and why."""
    parts = []
    for e in errors:
        where = []
        if e.get("node", -1) is not None and e.get("node", -1) >= 0:
            where.append(f"node {e['node']}")
        if e.get("name"):
            where.append(repr(e["name"]))
        if e.get("operator"):
            where.append(f"({e['operator']})")
        parts.append(f"{' '.join(where) or 'model'}: {' '.join(str(e.get('desc', '')).split())}")
    return "; ".join(parts) or "unknown parser error"


def _parser_errors(parser) -> list[dict]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        fields = {"node": "node", "name": "node_name", "operator": "node_operator", "desc": "desc"}
        out.append({key: getattr(e, attr)() if hasattr(e, attr) else None for key, attr in fields.items()})
    return out


# -- TensorRT build steps ----------------------------------------------------------------------------------
def network_from_onnx(trt, builder, logger, onnx_path: Path):
    """A strongly typed network parsed from ``onnx_path`` (the flag is required on 10.x, ignored on 11.x)."""
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        where = format_parser_errors(_parser_errors(parser))
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser failed at {where}")
    return network, parser


def builder_config(trt, builder, network, card: ModelCard, cfg: EngineBuildConfig, timing_cache_bytes: bytes | None):
    config = builder.create_builder_config()
    if cfg.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mib) << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not cfg.tf32:
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    shapes = cfg.profile.shapes(card.preprocessing.image_size)
    profile.set_shape(card.input_name, shapes["min"], shapes["opt"], shapes["max"])
    if config.add_optimization_profile(profile) < 0:
        raise InputError(f"TensorRT rejected the batch profile {cfg.profile.to_dict()}")
    if cfg.version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise InputError(f"--version-compatible: TensorRT {trt.__version__} has no VERSION_COMPATIBLE flag")
        config.set_flag(flag)
    if cfg.hardware_compatibility:
        levels = getattr(trt, "HardwareCompatibilityLevel", None)
        level = getattr(levels, cfg.hardware_compatibility.upper(), None) if levels else None
        if level is None:
            raise InputError(f"--hardware-compatibility {cfg.hardware_compatibility}: not available in "
                             f"TensorRT {trt.__version__}")
        config.hardware_compatibility_level = level
    cache = None
    if cfg.timing_cache is not None:
        cache = config.create_timing_cache(timing_cache_bytes or b"")
        if not config.set_timing_cache(cache, False):  # a cache from another GPU/TensorRT: start a fresh one
            print(f"note: timing cache {cfg.timing_cache} does not match this GPU/TensorRT; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    return config


def serialized_engine(trt, builder, network, config, logger, onnx_path: Path) -> bytes:
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        why = "; ".join(logger.errors[-3:]) or "see the TensorRT messages above"
        raise ModelError(f"{onnx_path}: TensorRT could not build an engine ({why})")
    return bytes(plan)


# -- the whole build ------------------------------------------------------------------------------------
def resolve_output(out: str | Path, onnx_path: Path, precision: str, key: str) -> Path:
    """``--out FILE`` as given; ``--out DIR`` (existing, or ending in /) names the engine by its cache key."""
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        return Path(out) / engine_file_name(onnx_path, precision, key)
    return Path(out)


def cached_engine(out: Path, key: str) -> ModelCard | None:
    """The card of ``out`` when it is exactly this engine (same cache key, file intact)."""
    if not out.exists() or not sidecar_path(out).exists():
        return None
    try:
        card = load_card(out)
    except ModelError:
        return None
    return card if card.kind == "engine" and card.extra.get("engine", {}).get("cache_key") == key else None


def build_engine(onnx_path: str | Path, out: str | Path, cfg: EngineBuildConfig | None = None,
                 log: Callable[[str], None] = print) -> tuple[Path, ModelCard]:
    """Build (or find up to date) the engine for ``onnx_path``; -> (engine path, engine card)."""
    from edgekidney.runtime.tensorrt import detect_environment, import_tensorrt, make_logger

    cfg = (cfg or EngineBuildConfig()).validate()
    onnx_path = Path(onnx_path)
    card = load_card(onnx_path)  # no sidecar, or a changed/truncated file: ModelError
    if card.kind != "onnx" or onnx_path.suffix != ".onnx":
        raise ModelError(f"{onnx_path}: build-engine takes an ONNX model (.onnx with its sidecar), not a {card.kind}")
    graph = inspect_onnx(onnx_path, card)
    check_static_batch(graph["batch_dim"], cfg.profile)
    shapes = profile_shapes(card.input_name, card.preprocessing.image_size, cfg.profile)

    env = detect_environment(device=cfg.device)
    require_tensorrt_environment(env, "build a TensorRT engine")
    check_build_options(cfg.hardware_compatibility, env)
    key = engine_cache_key(card.sha256, card.precision, shapes, env, cfg.plan_options())
    out = resolve_output(out, onnx_path, card.precision, key)
    if not cfg.force and (existing := cached_engine(out, key)) is not None:
        log(f"{out} is up to date (cache key {key}); --force rebuilds it")
        return out, existing

    trt = import_tensorrt()
    logger = make_logger(trt, cfg.verbose)
    cache_path = timing_cache_file(cfg.timing_cache, env) if cfg.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else None
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network, _parser = network_from_onnx(trt, builder, logger, onnx_path)
    config = builder_config(trt, builder, network, card, cfg, cache_bytes)
    log(f"building {card.precision} engine for {env['gpu_name']} (compute capability {env['compute_capability']}) "
        f"with TensorRT {env['tensorrt_version']}, batch {cfg.profile.min_batch}..{cfg.profile.max_batch}")
    plan = serialized_engine(trt, builder, network, config, logger, onnx_path)
    build_seconds = time.perf_counter() - t0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(plan)
    os.replace(tmp, out)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    info = {"tensorrt_version": env["tensorrt_version"], "gpu_name": env["gpu_name"],
            "compute_capability": env["compute_capability"], "gpu_memory_mib": env.get("gpu_memory_mib"),
            "cuda_driver": env.get("cuda_driver"), "cuda_binding": env.get("cuda_binding"),
            "platform": env.get("platform"), "l4t_release": env.get("l4t_release"),
            "precision": card.precision, "strongly_typed": True, "profile": cfg.profile.to_dict(),
            "profile_shapes": shapes, "onnx_sha256": card.sha256, "onnx_path": str(onnx_path.resolve()),
            "onnx_opset": graph["opset"], "build_seconds": round(build_seconds, 2), "workspace_mib": cfg.workspace_mib,
            "timing_cache": str(cache_path) if cache_path else None, "cache_key": key, **cfg.plan_options()}
    engine_card = ModelCard(classes=card.classes, positive_class=card.positive_class, preprocessing=card.preprocessing,
                            threshold=card.threshold, precision=card.precision, kind="engine",
                            input_name=card.input_name, output_name=card.output_name, outputs=card.outputs,
                            scope=card.scope, parent_sha256=card.sha256, metrics=card.metrics,
                            extra={"engine": info, "data": card.extra.get("data"),
                                   "threshold_from": threshold_record(card),
                                   "split_manifest_sha256": card.extra.get("split_manifest_sha256"),
                                   **carried(card.extra)})
    engine_card.save(out)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {build_seconds:.1f} s) and {sidecar_path(out).name}")
    return out, engine_card


def describe_engine(path: str | Path) -> str:
    """The build record of an engine, as JSON text (for ``--json`` outputs and the Jetson report)."""
    return json.dumps(load_card(path).extra.get("engine", {}), indent=2)
