"""Slices a kidney model was never trained on, though each has a body outline (so the body crop finds a
patient and only the model's feature distance can put them out of scope).

``head_ct_hu``: an axial head CT in Hounsfield units: air, a skull (bone, 1000 HU), brain (35 HU with CT
noise) and two ventricles (CSF, 5 HU). Windowed for the abdomen (40/400) the skull saturates and the
brain is mid-gray: nothing like the abdominal slices of the training data, and exactly what a
listener at a scanner receives when a head series is sent to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def head_ct_hu(size: int = 256, radius: int = 100, skull: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2
    rr = np.hypot((yy - c) / 1.1, xx - c)  # a head is a little longer than wide
    hu = np.full((size, size), -1000.0, np.float32)
    hu[rr <= radius] = 1000.0
    brain = rr <= radius - skull
    hu[brain] = 35.0 + rng.normal(0, 5.0, int(brain.sum()))
    ventricles = ((np.hypot((yy - c) / 1.6, (xx - c + 14) / 0.5) <= 18)
                  | (np.hypot((yy - c) / 1.6, (xx - c - 14) / 0.5) <= 18))
    hu[ventricles & brain] = 5.0
    return hu


def write_head_ct(path: Path, instance: int = 1, **kw) -> Path:
    """A head CT phantom as a CT DICOM file (HU through RescaleSlope/Intercept, as a scanner writes it)."""
    from edgekidney.data.synthetic import write_ct_dicom

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ct_dicom(path, head_ct_hu(**kw), 0, instance, "1.2.826.0.1.3680043.10.511.1", "1.2.826.0.1.3680043.10.511.2")
    return path
