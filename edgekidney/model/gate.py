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

import numpy as np

from edgekidney.model.network import GATE_OFF

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
