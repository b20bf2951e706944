"""``edgekidney export-triton MODEL --repo DIR``: a Triton Inference Server model repository.

Writes ``DIR/NAME/config.pbtxt``, ``DIR/NAME/1/model.onnx`` (platform ``onnxruntime_onnx``) or
``DIR/NAME/1/model.plan`` (``tensorrt_plan``) and the sidecar beside the model file, so
``load_card(DIR/NAME/1/model.onnx)`` still verifies the bytes. The configuration says what the sidecar
says: tensor names, dims without the batch dimension (taken from the ONNX graph, or for an engine from
its sidecar), ``max_batch_size`` (the engine profile's largest batch; an ONNX graph's fixed batch; else
``--max-batch-size``), dynamic batching with a queue delay, and one instance group on the CPU or GPU.
The whole sidecar also travels inside the configuration (``parameters.edgekidney_sidecar``), so a client
can read the preprocessing and the decision rule from the server (``edgekidney infer --server``).

Triton receives preprocessed FP32 tensors and returns the network's raw outputs (logits, scope distance,
activation map): decoding, preprocessing and the decision stay with the client, as the same functions.
The config is written as text here (no tritonclient needed); tests parse it with Triton's own
``model_config_pb2``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgekidney.errors import InputError, ModelError
from edgekidney.sidecar import load_card, sidecar_path

SIDECAR_PARAMETER = "edgekidney_sidecar"
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8",
              3: "TYPE_INT8", 9: "TYPE_BOOL", 16: "TYPE_BF16"}
# Triton container releases and the TensorRT they ship (NVIDIA's support matrix): an engine only loads
# in a release whose TensorRT built it. JetPack 6.1/6.2 ship TensorRT 10.3 (Triton's 24.08 iGPU build).
TRITON_FOR_TENSORRT = {"10.3": "24.08", "10.4": "24.09", "10.5": "24.10", "10.6": "24.11", "10.7": "24.12",
                       "10.8": "25.01"}
DEFAULT_RELEASE = "24.08"


@dataclass
class TritonExportConfig:
    name: str = "edgekidney"
    version: int = 1
    max_batch_size: int | None = None  # None: engine profile / fixed ONNX batch / 8
    default_max_batch_size: int = 8
    queue_delay_us: int = 5000  # dynamic batching: longest a request waits for others
    instance_kind: str = "auto"  # auto | cpu | gpu (auto: gpu for engines, cpu for ONNX)
    instance_count: int = 1
    force: bool = False  # replace an existing NAME folder

    def validate(self) -> "TritonExportConfig":
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise InputError(f"--name {self.name!r}: a folder name without '/'")
        if self.version < 1:
            raise InputError(f"--version {self.version}: must be 1 or more")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise InputError(f"--max-batch-size {self.max_batch_size}: must be at least 1")
        if self.queue_delay_us < 0:
            raise InputError(f"--queue-delay-us {self.queue_delay_us}: must not be negative")
        if self.instance_kind not in ("auto", "cpu", "gpu"):
            raise InputError(f"--instance-kind {self.instance_kind!r}: auto | cpu | gpu")
        if self.instance_count < 1:
            raise InputError(f"--instances {self.instance_count}: must be at least 1")
        return self


@dataclass
class TensorSpec:
    name: str
    data_type: str
    dims: list[int]  # without the batch dimension
    reshape: list[int] | None = None  # Triton's idiom for a per-image scalar: dims [1], reshape []


def onnx_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int | None]:
    """Inputs, outputs (dims without the batch) and the fixed batch size (None when dynamic) of a graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def spec(v) -> tuple[TensorSpec, int | None]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims:
            raise ModelError(f"{path}: tensor {v.name!r} has no batch dimension; Triton batching needs one")
        kind = ONNX_TYPES.get(t.elem_type)
        if kind is None:
            raise ModelError(f"{path}: tensor {v.name!r} has ONNX element type {t.elem_type}, unknown to Triton")
        rest = dims[1:]
        s = TensorSpec(v.name, kind, rest or [1], None if rest else [])
        return s, (dims[0] if dims[0] > 0 else None)

    ins = [spec(v) for v in model.graph.input if v.name not in init]
    outs = [spec(v) for v in model.graph.output]
    fixed = {b for _, b in ins + outs if b is not None}
    return [s for s, _ in ins], [s for s, _ in outs], (fixed.pop() if len(fixed) == 1 else None)


def card_specs(card) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An engine's tensors from its sidecar (the engine itself needs TensorRT to read)."""
    s = card.preprocessing.image_size
    shapes = {"logits": ([len(card.classes)], None), "scope_distance": ([1], []), "cam": ([s, s], None)}
    outs = []
    for name in card.outputs:
        if name not in shapes:
            raise ModelError(f"engine output {name!r}: its shape is not known from the sidecar")
        dims, reshape = shapes[name]
        outs.append(TensorSpec(name, "TYPE_FP32", dims, reshape))
    return [TensorSpec(card.input_name, "TYPE_FP32", [3, s, s])], outs


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor_block(t: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    line = f"  {{\n    name: {_pbtxt_string(t.name)}\n    data_type: {t.data_type}\n    dims: [ {dims} ]\n"
    if t.reshape is not None:
        line += f"    reshape: {{ shape: [ {', '.join(str(d) for d in t.reshape)} ] }}\n"
    return line + "  }"


def preferred_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (4, 8, 16, 32) if b <= max_batch]
    return sizes or [max_batch]


def config_text(name: str, platform: str, max_batch: int, inputs: list[TensorSpec], outputs: list[TensorSpec],
                queue_delay_us: int, kind: str, count: int, sidecar: dict) -> str:
    blocks = [
        f"name: {_pbtxt_string(name)}",
        f"platform: {_pbtxt_string(platform)}",
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(_tensor_block(t) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t) for t in outputs) + "\n]",
        "dynamic_batching {\n  preferred_batch_size: [ "
        + ", ".join(str(b) for b in preferred_sizes(max_batch))
        + f" ]\n  max_queue_delay_microseconds: {queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]",
        "version_policy: { latest: { num_versions: 1 } }",
        f"parameters {{\n  key: {_pbtxt_string(SIDECAR_PARAMETER)}\n  value: {{ string_value: "
        f"{_pbtxt_string(json.dumps(sidecar, separators=(',', ':'), sort_keys=True))} }}\n}}",
    ]
    return "# written by edgekidney export-triton; the model's sidecar is in parameters.edgekidney_sidecar\n" \
        + "\n".join(blocks) + "\n"


def triton_release(card) -> str | None:
    """The Triton release whose TensorRT runs this engine (None: not in the table)."""
    version = str(card.extra.get("engine", {}).get("tensorrt_version", ""))
    return TRITON_FOR_TENSORRT.get(".".join(version.split(".")[:2]))


def export_triton(model: str | Path, repo: str | Path, cfg: TritonExportConfig | None = None) -> Path:
    """Write the repository entry for ``model``; -> the path of its config.pbtxt."""
    cfg = (cfg or TritonExportConfig()).validate()
    model, repo = Path(model), Path(repo)
    card = load_card(model)  # checks the sidecar and the bytes
    engine = card.kind == "engine" or model.suffix in (".engine", ".plan", ".trt")
    if engine:
        inputs, outputs = card_specs(card)
        prof = card.extra.get("engine", {}).get("profile", {})
        max_batch = cfg.max_batch_size or int(prof.get("max_batch") or cfg.default_max_batch_size)
        if prof.get("max_batch") and max_batch > int(prof["max_batch"]):
            raise InputError(f"--max-batch-size {max_batch} exceeds the engine profile's largest batch "
                             f"{prof['max_batch']}; rebuild the engine or choose less")
        platform, filename, kind = "tensorrt_plan", "model.plan", "KIND_GPU"
        if cfg.instance_kind == "cpu":
            raise InputError("a TensorRT engine runs on the GPU only (--instance-kind gpu or auto)")
    else:
        inputs, outputs, fixed = onnx_specs(model)
        if fixed is not None and cfg.max_batch_size not in (None, fixed):
            raise InputError(f"{model}: the graph's batch is fixed at {fixed}; --max-batch-size must be {fixed}")
        max_batch = fixed or cfg.max_batch_size or cfg.default_max_batch_size
        platform, filename = "onnxruntime_onnx", "model.onnx"
        kind = "KIND_GPU" if cfg.instance_kind == "gpu" else "KIND_CPU"
    names = [t.name for t in inputs]
    if card.input_name not in names:
        raise ModelError(f"{model}: the sidecar's input {card.input_name!r} is not among the graph's inputs {names}")
    missing = [o for o in card.outputs if o not in [t.name for t in outputs]]
    if missing:
        raise ModelError(f"{model}: the sidecar's outputs {missing} are not in the graph")
    folder = repo / cfg.name
    if folder.exists():
        if not cfg.force:
            raise InputError(f"{folder} exists; pass --force to replace it")
        shutil.rmtree(folder)
    version_dir = folder / str(cfg.version)
    version_dir.mkdir(parents=True)
    target = version_dir / filename
    shutil.copyfile(model, target)
    shutil.copyfile(sidecar_path(model), sidecar_path(target))
    text = config_text(cfg.name, platform, max_batch, inputs, outputs, cfg.queue_delay_us, kind,
                       cfg.instance_count, card.to_dict())
    path = folder / "config.pbtxt"
    path.write_text(text)
    load_card(target)  # the copy still matches its sidecar
    return path
