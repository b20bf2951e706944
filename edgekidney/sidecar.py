"""JSON sidecars: every ONNX model and engine describes itself (docs/architecture.md rule 5).

``model.onnx`` -> ``model.json``; ``model.int8.engine`` -> ``model.int8.engine.json``.
A sidecar holds the class names, the positive class, input size and tensor names, the preprocessing
parameters, the decision threshold, the precision, the sha256 of the artifact and of its parent, and
metrics. Engines add the TensorRT version, GPU and build profile (see :mod:`edgekidney.optimize.engine`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekidney import __version__
from edgekidney.errors import ModelError
from edgekidney.data.preprocess import Preprocessing

FORMAT = "edgekidney.model/1"
PRECISIONS = ("fp32", "fp16", "int8")


def sidecar_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_suffix(".json") if p.suffix == ".onnx" else p.with_name(p.name + ".json")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# What a model is, as opposed to how one file of it was made: every child (quantized, engine) keeps these
CARRIED = ("arch", "planes", "map", "study_rule", "weights")


def carried(extra: dict) -> dict:
    """The parts of a parent's ``extra`` that describe the model itself (see :data:`CARRIED`)."""
    return {k: extra[k] for k in CARRIED if k in extra}


@dataclass
class ModelCard:
    classes: list[str]
    positive_class: str
    preprocessing: Preprocessing
    threshold: float = 0.5
    precision: str = "fp32"
    kind: str = "onnx"  # onnx | engine
    input_name: str = "input"
    output_name: str = "logits"
    outputs: list[str] = field(default_factory=lambda: ["logits"])  # + scope_distance, cam (edgekidney.model.heads)
    # out-of-scope detector: method, output, threshold, how it was set (edgekidney.scope); {} = none
    scope: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    parent_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # export parity, quantization, engine build info
    edgekidney_version: str = __version__

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    @property
    def scope_threshold(self) -> float | None:
        """Distance above which a slice is out of scope; None when the model has no detector."""
        if "scope_distance" not in self.outputs or "threshold" not in self.scope:
            return None
        return float(self.scope["threshold"])

    @property
    def input_shape(self) -> list[int]:
        s = self.preprocessing.image_size
        return [-1, 3, s, s]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["input_shape"] = self.input_shape
        d["format"] = FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "sidecar") -> "ModelCard":
        if d.get("format") != FORMAT:
            raise ModelError(f"{where}: not an edgekidney sidecar (format {d.get('format')!r}, expected {FORMAT!r})")
        try:
            card = cls(
                classes=list(d["classes"]),
                positive_class=d["positive_class"],
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                threshold=float(d.get("threshold", 0.5)),
                precision=d.get("precision", "fp32"),
                kind=d.get("kind", "onnx"),
                input_name=d.get("input_name", "input"),
                output_name=d.get("output_name", "logits"),
                outputs=list(d.get("outputs", [d.get("output_name", "logits")])),
                scope=dict(d.get("scope") or {}),
                sha256=d.get("sha256", ""),
                parent_sha256=d.get("parent_sha256", ""),
                metrics=dict(d.get("metrics", {})),
                extra=dict(d.get("extra", {})),
                edgekidney_version=d.get("edgekidney_version", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: sidecar is missing or has a bad field ({exc})") from None
        if card.positive_class not in card.classes:
            raise ModelError(f"{where}: positive class {card.positive_class!r} is not among {card.classes}")
        return card

    def save(self, artifact: str | Path) -> Path:
        """Write the sidecar next to ``artifact``, recording the artifact's sha256."""
        self.sha256 = sha256_of(artifact)
        path = sidecar_path(artifact)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_card(artifact: str | Path, verify_hash: bool = True) -> ModelCard:
    """Read the sidecar of ``artifact``; fail clearly when it is missing or does not match."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise ModelError(f"{artifact}: no such model file")
    path = sidecar_path(artifact)
    if not path.exists():
        raise ModelError(f"{artifact}: sidecar {path.name} not found next to the model; "
                         "models made by 'edgekidney export/quantize/build-engine' carry one")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable sidecar ({exc})") from None
    card = ModelCard.from_dict(data, where=str(path))
    if verify_hash and card.sha256 and card.sha256 != sha256_of(artifact):
        raise ModelError(f"{artifact}: file does not match the sha256 in {path.name} (changed or truncated)")
    return card
