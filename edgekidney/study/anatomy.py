"""What an axial slice shows, read from its Hounsfield units: lung fields mark a chest slice.

The model was trained on slices at the level of the kidneys. Its scope detector (the feature
distance) refuses most of what looks unlike them, but not every chest slice: on a real chest CT the
release judged 21 of 48 slices and called one of them, in the lower chest, stone; another it
answered "no stone" (docs/scope.md, "Chest slices"). Lungs are what no kidney-level slice has, and they can be measured
without the network: air below ``LUNG_HU`` inside the patient's outline, in the two largest connected
regions (the two lungs; scattered bowel gas stays small). A slice where they cover at least
``CHEST_LUNG_SHARE`` of the body's cross-section is out of scope, whatever the network says.

Measured with :func:`lung_share`: at kidney level at most 0.054 and up to the liver dome at most
0.127 (TotalSegmentator's abdomen volume); on two real chest CTs 0.20-0.37 through the chest, less
towards the neck and the lung bases, 0.02-0.03 on the upper abdomen below them (docs/scope.md).
"""

from __future__ import annotations

import numpy as np

LUNG_HU = -400.0  # air and lung parenchyma; fat (-150 to -50 HU) and every soft tissue lie above it
BODY_HU = -500.0  # the patient's outline: everything denser than air
CHEST_LUNG_SHARE = 0.2  # of the body's cross-section: a chest slice at or above it


def lung_share(hu: np.ndarray) -> float:
    """The share of the body's cross-section that its two largest air regions (the lungs) cover.

    ``hu``: one axial slice in Hounsfield units. The body is the largest connected region above
    ``BODY_HU`` with its holes filled (so the lungs, enclosed by the chest wall, are inside it); the
    table and cables fall away with an opening. 0.0 where no body is found. Computed on at most
    256 px a side (about 3 ms).
    """
    from scipy import ndimage

    img = np.asarray(hu, dtype=np.float32)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"expected one 2-D slice, got shape {img.shape}")
    step = max(1, int(np.ceil(max(img.shape) / 256)))
    img = img[::step, ::step]
    body = ndimage.binary_fill_holes(img > BODY_HU)
    body = ndimage.binary_opening(body, structure=np.ones((3, 3), bool), iterations=2)
    labels, n = ndimage.label(body)
    if n == 0:
        return 0.0
    body = labels == int(np.bincount(labels.ravel())[1:].argmax()) + 1
    air, n_air = ndimage.label(body & (img < LUNG_HU))
    if n_air == 0:
        return 0.0
    lungs = np.sort(np.bincount(air.ravel())[1:])[-2:].sum()
    return float(lungs / body.sum())


def chest_reason(share: float) -> str | None:
    """Why a slice with this lung share is out of scope, or None when it is not a chest slice."""
    if share < CHEST_LUNG_SHARE:
        return None
    return (f"lung fields cover {share:.0%} of the body (air below {LUNG_HU:.0f} HU): a chest slice; "
            f"the model was trained on kidney-level slices")
