"""Lineage by sha256 (docs/architecture.md rule 5): which artifact came from which, and what is stale.

A child (a quantized ONNX model, an engine) records its parent's sha256 (``parent_sha256``) and the
threshold it inherited (``extra.threshold_from = {"sha256", "threshold"}``). Parents are found by
hash among the sidecars in the child's folder (and at the path the child recorded, if the file there
still has that hash): a moved or renamed file is still found, a file with the same name but other
bytes is not taken for the parent. The copy next to the child wins over the recorded path.

Thresholds -- the choice: children keep the threshold they were made with and a *stale* one is
reported (by ``evaluate --store-threshold`` for the children it leaves behind, by ``infer`` and
``serve`` for the model they run). Children do not silently follow their parent: an INT8 model's
probabilities differ from FP32's, and its own threshold may have been chosen on purpose with
``evaluate --store-threshold`` on the child (``extra.threshold_source``), which is then never stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgekidney.errors import ModelError
from edgekidney.sidecar import ModelCard, load_card, sha256_of


def threshold_record(parent: ModelCard) -> dict:
    """What a child stores about the threshold it inherits from ``parent``."""
    return {"sha256": parent.sha256, "threshold": float(parent.threshold)}


def _artifact_of(sidecar: Path) -> Path | None:
    """model.json -> model.onnx; x.engine.json -> x.engine."""
    onnx = sidecar.with_suffix(".onnx")
    if onnx.exists():
        return onnx
    bare = sidecar.with_name(sidecar.name[: -len(".json")])
    return bare if bare.exists() and bare.suffix else None


def cards_in(folder: Path) -> dict[str, tuple[Path, ModelCard]]:
    """sha256 -> (artifact, card) for every readable edgekidney sidecar in ``folder``."""
    found: dict[str, tuple[Path, ModelCard]] = {}
    for sidecar in sorted(folder.glob("*.json")):
        try:
            data = json.loads(sidecar.read_text())
            card = ModelCard.from_dict(data, where=str(sidecar))
        except (OSError, ValueError, ModelError):
            continue
        artifact = _artifact_of(sidecar)
        if artifact is not None and card.sha256:
            found[card.sha256] = (artifact, card)
    return found


def find_parent(path: Path, card: ModelCard) -> tuple[Path, ModelCard] | None:
    """The parent artifact, found by its sha256 (never by name alone); None when it is not around."""
    if not card.parent_sha256:
        return None
    beside = cards_in(path.parent).get(card.parent_sha256)  # first the copy that travels with the child
    if beside is not None:
        return beside
    recorded = card.extra.get("parent") or card.extra.get("engine", {}).get("onnx_path")
    if recorded and Path(recorded).exists():
        try:
            if sha256_of(recorded) == card.parent_sha256:
                return Path(recorded), load_card(recorded, verify_hash=False)
        except (OSError, ModelError):
            pass
    return None


@dataclass
class ThresholdStatus:
    threshold: float
    stale: bool
    message: str  # what was compared, in words


def threshold_status(path: str | Path, card: ModelCard | None = None) -> ThresholdStatus:
    """Is this model's threshold the one its parent holds now? Says what it compared."""
    path = Path(path)
    card = card or load_card(path, verify_hash=False)
    t = float(card.threshold)
    if card.extra.get("threshold_source"):
        return ThresholdStatus(t, False, f"threshold {t:.4g} set on this model ({card.extra['threshold_source']})")
    inherited = card.extra.get("threshold_from")
    if not card.parent_sha256 or card.kind == "onnx" and card.precision == "fp32":
        return ThresholdStatus(t, False, f"threshold {t:.4g} is this model's own (no ONNX parent)")
    parent = find_parent(path, card)
    if parent is None:
        return ThresholdStatus(t, False, f"threshold {t:.4g}: parent sha256 {card.parent_sha256[:12]} not found next "
                                         "to the model, so not compared")
    p_path, p_card = parent
    if abs(float(p_card.threshold) - t) <= 1e-12:
        return ThresholdStatus(t, False, f"threshold {t:.4g} equals that of parent {p_path.name} "
                                         f"(sha256 {card.parent_sha256[:12]})")
    was = f" (inherited {float(inherited['threshold']):.4g})" if inherited else ""
    return ThresholdStatus(t, True, f"stale threshold: {path.name} uses {t:.4g}{was} but its parent {p_path.name} "
                                    f"(sha256 {card.parent_sha256[:12]}) now holds {float(p_card.threshold):.4g}; "
                                    f"rebuild it from the parent or run 'edgekidney evaluate {path.name} DATA "
                                    "--store-threshold'")


def descendants(path: str | Path, card: ModelCard | None = None) -> list[tuple[Path, ModelCard]]:
    """Children, grandchildren... of ``path`` among the sidecars in its folder (by parent sha256)."""
    path = Path(path)
    card = card or load_card(path, verify_hash=False)
    by_hash = cards_in(path.parent)
    out, frontier = [], {card.sha256}
    while frontier:
        kids = [(p, c) for p, c in by_hash.values() if c.parent_sha256 in frontier and (p, c) not in out]
        out.extend(kids)
        frontier = {c.sha256 for _, c in kids}
    return out
