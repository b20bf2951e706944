"""The map gate: a slice is called stone only where its stone map finds one (needs torch to apply).

A classifier trained on public slices can call a slice stone for the look of the scanner it came from
(docs/scope.md, "Erased-stone twins"): measured on the validation slices, the slices of other classes
that such a model calls stone are the ones whose map stays quiet. The gate lowers the stone logit by
``GATE_SLOPE`` per map logit that the map's peak falls short of a level (``model/network.py``), and
that level is fitted after training on the validation split, where the decision threshold is chosen:
``GATE_MARGIN`` map logits below the weakest peak among the validation stones the model calls at its
threshold. So the gate takes no validation stone away, and the margin leaves room for stones of other
scans whose map is a little weaker. It is part of the network, so the exported graph, every quantized
child and every backend apply it (docs/architecture.md, "The stone map").
"""

from __future__ import annotations

import math

import numpy as np

from edgekidney.model.network import GATE_OFF, GATE_SLOPE

GATE_MARGIN = 0.5  # map logits below the weakest called validation stone (measured: docs/scope.md)


def fit_map_gate(p_stone: np.ndarray, peak_logit: np.ndarray, is_stone: np.ndarray, threshold: float,
                 margin: float = GATE_MARGIN) -> float:
    """The gate's level from ungated validation outputs: ``margin`` below the weakest map peak among the
    stones called at ``threshold``; ``GATE_OFF`` when no stone is called (nothing to fit it on)."""
    called = np.asarray(is_stone, bool) & (np.asarray(p_stone) >= threshold)
    if not called.any():
        return GATE_OFF
    return float(np.asarray(peak_logit, np.float64)[called].min() - margin)


def set_map_gate(model, level: float) -> None:
    """Write the gate's level into a stone-map network (a no-op for a plain ResNet50)."""
    gate = getattr(model, "map_gate", None)
    if gate is not None:
        gate.fill_(float(level))


def map_gate_of(model) -> float | None:
    """The gate's level, or None when the network has none or it is off."""
    gate = getattr(model, "map_gate", None)
    if gate is None or float(gate) <= GATE_OFF:
        return None
    return float(gate)


def fit_gate(model, x_val: np.ndarray, y_val: np.ndarray, positive: int, classes: list[str],
             target_sensitivity: float, device, log=print) -> dict:
    """Fit the map gate (:mod:`edgekidney.model.gate`) on the validation split and write it into ``model``;
    returns what it is and which validation slices it takes off stone at the ungated threshold."""
    from edgekidney.metrics import softmax, threshold_for_sensitivity
    from edgekidney.model.network import predict_outputs

    set_map_gate(model, GATE_OFF)
    out = predict_outputs(model, x_val, device)
    p = softmax(out["logits"])[:, positive]
    is_stone = y_val == positive
    threshold = threshold_for_sensitivity(is_stone, p, target_sensitivity)
    level = fit_map_gate(p, out["peak_logit"], is_stone, threshold)
    set_map_gate(model, level)
    if level <= GATE_OFF:
        log("map gate: off (no validation stone is called to fit it on)")
        return {"level": None}
    p_gated = softmax(predict_outputs(model, x_val, device)["logits"])[:, positive]
    uncalled = {c: int(((p >= threshold) & (p_gated < threshold) & (y_val == k)).sum())
                for k, c in enumerate(classes)}
    log(f"map gate: a slice is called stone only where its map reaches p={1 / (1 + math.exp(-level)):.3f} "
        f"(the weakest called validation stone's map, less {GATE_MARGIN:g} logits); at the threshold it takes "
        + (", ".join(f"{n} {c}" for c, n in uncalled.items() if n) or "no") + " validation slice(s) off stone")
    return {"level": level, "p": 1 / (1 + math.exp(-level)), "margin": GATE_MARGIN, "slope": GATE_SLOPE,
            "ungated_threshold": float(threshold), "uncalled_at_threshold": uncalled}
