"""Refit what training fits on the validation split after its best epoch, on a finished run (needs torch).

``edgekidney refit RUN``: the map gate (:mod:`edgekidney.model.gate`), the out-of-scope threshold
(a quantile of the validation distances times a margin, :mod:`edgekidney.scope`) and the decision
threshold, written back into ``RUN/model.pt`` and ``RUN/metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgekidney.data.arrays import load_arrays_with_geometry
from edgekidney.errors import InputError
from edgekidney.metrics import classification_report, softmax, threshold_for_sensitivity
from edgekidney.model.checkpoint import read_run_checkpoint, save_checkpoint
from edgekidney.model.gate import fit_gate, set_map_gate
from edgekidney.model.network import ARCH_STONE_MAP, GATE_OFF, arch_of, predict_outputs
from edgekidney.model.weights import require_torch
from edgekidney.progress import stage
from edgekidney.threads import apply_torch_threads


def fit_scope_on_split(model, samples, pre, scope: dict) -> dict:
    """The out-of-scope detector fitted again on a split's training slices (its threshold on the validation
    ones), keeping the quantile, margin and shrinkage of ``scope`` (a checkpoint's): for weights that were
    not trained as they are (joined from FP16 pieces, interpolated)."""
    torch = require_torch()
    from edgekidney.model.train import TrainConfig, fit_scope_detector

    train_s, val_s = [s for s in samples if s.split == "train"], [s for s in samples if s.split == "val"]
    with stage("decoding + preprocessing", len(train_s) + len(val_s), "slice") as bar:
        x_train, _ = load_arrays_with_geometry(train_s, pre, bar.advance)
        x_val, _ = load_arrays_with_geometry(val_s, pre, bar.advance)
    cfg = TrainConfig(data=Path("."), out=Path("."), scope_quantile=float(scope.get("quantile", 0.99)),
                      scope_margin=float(scope.get("margin", 1.0)), scope_shrinkage=float(scope.get("shrinkage", 0.1)))
    fitted, _ = fit_scope_detector(model, x_train, np.array([s.label for s in train_s]), x_val,
                                   torch.device("cpu"), cfg)
    return fitted


def refit_run(run: Path, map_gate: bool = True, scope_quantile: float | None = None,
              scope_margin: float | None = None, threads: int | None = None, log=print) -> dict:
    """Refit what training fits on a finished run's validation split (``RUN/split.csv``) after its best epoch:
    the map gate (stone-map runs), the out-of-scope threshold (``scope_quantile`` x ``scope_margin``, by
    default the run's own) and the decision threshold; rewrites the checkpoint and ``metrics.json``."""
    torch = require_torch()
    from edgekidney.data.dataset import read_manifest
    from edgekidney.scope import ScopeModel, choose_threshold

    run = Path(run)
    apply_torch_threads(threads)
    ck, model, card = read_run_checkpoint(run)
    stone_map = arch_of(model) == ARCH_STONE_MAP
    val_s = [s for s in read_manifest(run / "split.csv") if s.split == "val"]
    if not val_s:
        raise InputError(f"{run / 'split.csv'}: no validation slices to refit on")
    with stage("decoding + preprocessing", len(val_s), "slice") as bar:
        x_val, _ = load_arrays_with_geometry(val_s, card.preprocessing, bar.advance)
    y_val = np.array([s.label for s in val_s], dtype=np.int64)
    device = torch.device("cpu")
    positive, target = card.positive_index, float(ck["metrics"].get("target_sensitivity", 0.95))
    metrics = dict(ck["metrics"])
    if stone_map:
        if map_gate:
            metrics["map_gate"] = fit_gate(model, x_val, y_val, positive, card.classes, target, device, log)
        else:
            set_map_gate(model, GATE_OFF)
            metrics["map_gate"] = {"level": None}
            log("map gate: off")
    out = predict_outputs(model, x_val, device)  # the gate moves the logits, never the pooled features
    scope = ck.get("scope")
    if scope:
        q = scope_quantile if scope_quantile is not None else float(scope["quantile"])
        margin = scope_margin if scope_margin is not None else float(scope["margin"])
        d_val = ScopeModel.from_arrays(scope, float(scope["shrinkage"])).distance(out["features"])
        thr = choose_threshold(d_val, q, margin)
        scope = {**scope, "threshold": thr, "quantile": q, "margin": margin, "val_out_of_scope": int((d_val > thr).sum())}
        metrics["scope"] = {k: v for k, v in scope.items() if not hasattr(v, "shape")}
        log(f"scope: threshold {thr:.3f} (validation q{q:g} x {margin:g}); {scope['val_out_of_scope']} of "
            f"{len(x_val)} validation slices fall outside")
    probs = softmax(out["logits"])
    threshold = threshold_for_sensitivity(y_val == positive, probs[:, positive], target)
    metrics["val"] = classification_report(y_val, probs, card.classes, positive, threshold)
    metrics["val_at_0.5"] = classification_report(y_val, probs, card.classes, positive, 0.5)
    save_checkpoint(run / "model.pt", model, card.classes, card.positive_class, card.preprocessing, threshold,
                    ck.get("weights", ""), metrics, scope, ck.get("extra"))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
