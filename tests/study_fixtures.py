"""Helpers for the series/study tests: the real CT volumes, synthetic series and an oracle classifier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgekidney.runtime.predict import Prediction
from edgekidney.data.preprocess import NO_BODY_REASON, Preprocessing
from edgekidney.sidecar import ModelCard

REPO = Path(__file__).resolve().parents[1]
CT_VOLUMES = Path(os.environ.get("EDGEKIDNEY_VOLUMES", REPO.parent / "shared" / "data" / "ct-volumes"))


def volumes_or_skip() -> Path:
    if not (CT_VOLUMES / "abdomen-jpeg2000-series").is_dir():
        pytest.skip(f"real CT volumes not found at {CT_VOLUMES} (set EDGEKIDNEY_VOLUMES)")
    return CT_VOLUMES


class Oracle:
    """A stand-in classifier that sees the synthetic stones: a slice is positive when at least 3
    pixels inside a kidney box are saturated by the abdomen window (>= 240 HU; stones are >= 500,
    the kidney cortex 150). Slices listed in ``out_of_scope`` come back with that label."""

    def __init__(self, boxes, extra=None, out_of_scope=(), image_size=64, peak=None):
        """``peak``: None (no stone map), "stone" (cam_peak on the brightest pixel of the boxes) or
        "beside" (cam_peak 12 pixels above the first box, in soft tissue)."""
        self.peak = peak
        self.card = ModelCard(classes=["Normal", "Stone"], positive_class="Stone",
                              preprocessing=Preprocessing(image_size=image_size), threshold=0.5,
                              sha256="ab" * 32, extra=extra or {})
        self.threshold, self.model_path, self.boxes = 0.5, Path("oracle.onnx"), boxes
        self.out_of_scope = set(out_of_scope)
        self.seen = 0

    def predict_slices(self, slices, names):
        out = []
        for s, n in zip(slices, names):
            hit = any(int((s[r0:r1, c0:c1] >= 0.999).sum()) >= 3 for r0, r1, c0, c1 in self.boxes)
            pred = Prediction(n, 0.9 if hit else 0.1, "Stone" if hit else "Normal", self.threshold)
            if self.peak == "stone":
                r0, r1, c0, c1 = max(self.boxes, key=lambda b: float(s[b[0]:b[1], b[2]:b[3]].max()))
                r, c = np.unravel_index(int(np.argmax(s[r0:r1, c0:c1])), (r1 - r0, c1 - c0))
                pred.cam_peak = (int(r0 + r), int(c0 + c))
            elif self.peak == "beside":
                pred.cam_peak = (max(0, self.boxes[0][0] - 12), self.boxes[0][2])
            if self.seen in self.out_of_scope:
                pred.label = "out_of_scope"
            if float(np.ptp(s)) == 0.0:  # one flat value: no body, out of scope as the real models say
                pred.label, pred.in_scope, pred.scope_reason = "out_of_scope", False, NO_BODY_REASON
            self.seen += 1
            out.append(pred)
        return out
