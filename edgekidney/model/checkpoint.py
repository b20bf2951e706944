"""Checkpoints: what a training leaves behind, and reading it back (needs torch).

``RUN/model.pt`` holds the state dict, the architecture (``resnet50`` or ``resnet50-stonemap``),
classes, preprocessing, threshold, metrics and the out-of-scope detector; :class:`TorchPredictor`
runs it eagerly with the same interface the ONNX runtime has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekidney.data.preprocess import Preprocessing
from edgekidney.errors import ModelError
from edgekidney.metrics import softmax
from edgekidney.model.network import ARCH_PLAIN, arch_of
from edgekidney.model.weights import build_model, require_torch, resolve_device
from edgekidney.sidecar import ModelCard
from edgekidney.threads import apply_torch_threads

CHECKPOINT_FORMAT = "edgekidney.checkpoint/1"
INCOMPLETE = "INCOMPLETE"  # in a run folder whose training did not finish


def save_checkpoint(path: Path, model, classes, positive_class, pre: Preprocessing, threshold: float,
                    weights_source: str, metrics: dict, scope: dict | None = None,
                    extra: dict | None = None) -> None:
    torch = require_torch()
    if scope is not None:  # numpy arrays become tensors so that torch.load(weights_only=True) reads them
        scope = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in scope.items()}
    torch.save({"format": CHECKPOINT_FORMAT, "arch": arch_of(model),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "classes": list(classes), "positive_class": positive_class, "preprocessing": pre.to_dict(),
                "threshold": float(threshold), "weights": weights_source, "metrics": metrics, "scope": scope,
                "extra": extra or {}}, path)


def _read_checkpoint(path: str | Path) -> tuple[dict, ModelCard]:
    torch = require_torch()
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    incomplete = path.parent / INCOMPLETE
    if incomplete.exists():
        reason = incomplete.read_text().strip() or "training did not finish"
        raise ModelError(f"{path.parent}: incomplete run ({reason}); run 'edgekidney train' into it again")
    if not path.exists():
        raise ModelError(f"{path}: no such checkpoint (expected RUN/model.pt from 'edgekidney train')")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: not an edgekidney checkpoint ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not an edgekidney checkpoint")
    scope = ck.get("scope") or {}
    card = ModelCard(classes=ck["classes"], positive_class=ck["positive_class"],
                     preprocessing=Preprocessing.from_dict(ck["preprocessing"]), threshold=ck["threshold"],
                     kind="checkpoint", metrics=ck.get("metrics", {}),
                     extra={"weights": ck.get("weights", ""), "data": ck.get("metrics", {}).get("data"),
                            "arch": ck.get("arch", ARCH_PLAIN), **(ck.get("extra") or {})},
                     outputs=["logits", "scope_distance", "cam"] if scope else ["logits", "cam"],
                     scope={k: v for k, v in scope.items() if not hasattr(v, "shape")})
    return ck, card


def load_checkpoint_card(path: str | Path) -> ModelCard:
    """What a checkpoint describes (classes, preprocessing, threshold), without building the model."""
    return _read_checkpoint(path)[1]


def read_run_checkpoint(path: str | Path):
    """-> (the checkpoint as stored, its model in eval mode on the CPU, ModelCard): one read of the file,
    for code that writes the checkpoint back with some of it changed (refit, interpolate)."""
    ck, card = _read_checkpoint(path)
    model, _ = build_model(len(ck["classes"]), "none", arch=ck.get("arch", ARCH_PLAIN), positive=card.positive_index)
    state = dict(ck["state_dict"])
    if hasattr(model, "map_gate") and "map_gate" not in state:  # saved before the map gate: it is off
        state["map_gate"] = model.map_gate.clone()
    model.load_state_dict(state)
    model.eval()
    return ck, model, card


def load_checkpoint(path: str | Path, heads: bool = False):
    """-> (model in eval mode on the CPU, ModelCard describing it).

    With ``heads`` the model returns (logits, scope_distance, cam) as the exported graph does.
    """
    ck, model, card = read_run_checkpoint(path)
    if heads:
        from edgekidney.model.heads import build_headed_model

        model = build_headed_model(model, card.positive_index, card.preprocessing.image_size, ck.get("scope"))
    return model, card


class TorchPredictor:
    """PyTorch eager inference on a checkpoint, with the same interface evaluate uses for ONNX models."""

    backend_name = "torch"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        apply_torch_threads(threads)
        self.model, self.card = load_checkpoint(path, heads=True)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.threshold = self.card.threshold

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = require_torch()
        with torch.inference_mode():
            outs = self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))
        return {name: o.float().cpu().numpy() for name, o in zip(self.card.outputs, outs)}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.infer_outputs(batch)["logits"])

    def close(self) -> None:
        pass
