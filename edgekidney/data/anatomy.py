"""What an axial slice shows, read from its Hounsfield units: lung fields mark a chest slice, a
closed ring of bone a head, a body in two parts of like size the legs.

The model was trained on slices at the level of the kidneys. Its scope detector (the feature
distance) refuses most of what looks unlike them, but not every chest slice: on a real chest CT the
release judged 21 of 48 slices and called one of them, in the lower chest, stone, and it answered
"no stone" for another chest CT (docs/scope.md, "Chest slices"). Lungs are what no kidney-level
slice has, and they can be measured without the network: air below ``LUNG_HU`` inside the patient's
outline, in the two largest connected regions (the two lungs; scattered bowel gas stays small). A
slice where they cover at least ``CHEST_LUNG_SHARE`` of the body's cross-section is out of scope,
whatever the network says.

Measured with :func:`lung_share`: at kidney level at most 0.054 and up to the liver dome at most
0.127 (TotalSegmentator's abdomen volume); on two real chest CTs 0.20-0.37 through the chest, less
towards the neck and the lung bases, 0.02-0.03 on the upper abdomen below them (docs/scope.md).

A head is the other series a scanner's listener receives that the model must not judge. Its skull
is a closed ring of bone around the brain: :func:`skull_share` fills the largest bone region (above
``BONE_HU``) and measures what it encloses. No ring closes at kidney level or in the pelvis (at most
0.018 on the abdomen volume, 0.04 on the chest CTs: the vertebral body's cortex is the largest ring
there); above the skull base the cranium encloses most of the slice. At ``HEAD_SKULL_SHARE`` or more
the slice is out of scope.

Below the pelvis the body splits into the two thighs. :func:`split_share` is the smaller of the
body's two largest separate parts as a share of both: about one half for two legs, 0.0 for a body in
one part. Measured: 0.0 on every slice of the abdomen volume, pelvis included; at most 0.19 on the
chest CTs (the top slice, the neck beside a shoulder); an arm lying beside the trunk is far smaller
than it. At ``LEGS_SPLIT_SHARE`` or more the slice is out of scope. No real thigh CT was at hand to
measure; thighs that touch make one part and are left to the scope detector.

All three are read where a slice comes with its HU and is known to be axial: a series in ``study`` and the
listener, and a single DICOM slice whose ImageOrientationPatient is axial (``infer``, ``serve``). The
training data's coronal reformats show lungs and are in scope: no coronal or unknown plane is judged
here, nor a windowed image (PNG, JPEG), where air and dark fat both read 0.
"""

from __future__ import annotations

import math

import numpy as np

LUNG_HU = -400.0  # air and lung parenchyma; fat (-150 to -50 HU) and every soft tissue lie above it
BODY_HU = -500.0  # the patient's outline: everything denser than air
CHEST_LUNG_SHARE = 0.2  # of the body's cross-section: a chest slice at or above it
BONE_HU = 300.0  # cortical bone and the skull's diploe; enhancing vessels can reach it, but enclose little
HEAD_SKULL_SHARE = 0.5  # of the body's cross-section enclosed by one ring of bone: a head slice
LEGS_SPLIT_SHARE = 0.3  # the smaller of the body's two largest parts, of both: two legs at or above it


def _body(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(the slice on at most 256 px a side, the body's mask or None where no body is found, the split
    share).

    The body is the largest connected region above ``BODY_HU`` with its holes filled (so the lungs,
    enclosed by the chest wall, are inside it); the table and cables fall away with an opening. The
    split share is the second largest region's size over the two largest together (0.0 for one)."""
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
        return img, None, 0.0
    sizes = np.bincount(labels.ravel())[1:]
    two = np.sort(sizes)[-2:]
    split = float(two[0] / two.sum()) if n > 1 else 0.0
    return img, labels == int(sizes.argmax()) + 1, split


def _lungs(img: np.ndarray, body: np.ndarray) -> float:
    from scipy import ndimage

    air, n_air = ndimage.label(body & (img < LUNG_HU))
    if n_air == 0:
        return 0.0
    return float(np.sort(np.bincount(air.ravel())[1:])[-2:].sum() / body.sum())


def _skull(img: np.ndarray, body: np.ndarray) -> float:
    from scipy import ndimage

    bone, n_bone = ndimage.label(body & (img > BONE_HU))
    if n_bone == 0:
        return 0.0
    ring = bone == int(np.bincount(bone.ravel())[1:].argmax()) + 1
    return float(ndimage.binary_fill_holes(ring).sum() / body.sum())


def lung_share(hu: np.ndarray) -> float:
    """The share of the body's cross-section that its two largest air regions (the lungs) cover.

    ``hu``: one axial slice in Hounsfield units; 0.0 where no body is found. Computed on at most
    256 px a side (3-5 ms)."""
    img, body, _ = _body(hu)
    return 0.0 if body is None else _lungs(img, body)


def skull_share(hu: np.ndarray) -> float:
    """The share of the body's cross-section inside its largest region of bone, holes filled: most of
    the slice for a cranium, a vertebral body's worth elsewhere. 0.0 where no body is found."""
    img, body, _ = _body(hu)
    return 0.0 if body is None else _skull(img, body)


def split_share(hu: np.ndarray) -> float:
    """The smaller of the body's two largest separate parts as a share of both: about 0.5 for two
    thighs, near 0 for one trunk (the arms beside it are small), 0.0 where the body is one part."""
    return _body(hu)[2]


def measure(hu: np.ndarray) -> tuple[float, float, float]:
    """(lung share, skull share, split share) of one axial slice in HU, the body found once."""
    img, body, split = _body(hu)
    return (0.0, 0.0, 0.0) if body is None else (_lungs(img, body), _skull(img, body), split)


def chest_reason(share: float) -> str | None:
    """Why a slice with this lung share is out of scope, or None when it is not a chest slice."""
    if share < CHEST_LUNG_SHARE:
        return None
    return (f"lung fields cover {share:.0%} of the body (air below {LUNG_HU:.0f} HU): a chest slice; "
            f"the model was trained on kidney-level slices")


def head_reason(share: float) -> str | None:
    """Why a slice whose bone encloses this share of it is out of scope, or None when it is no head."""
    if share < HEAD_SKULL_SHARE:
        return None
    return (f"a ring of bone encloses {share:.0%} of the body (above {BONE_HU:.0f} HU): a skull, a head "
            f"slice; the model was trained on kidney-level slices")


def legs_reason(share: float) -> str | None:
    """Why a slice whose body lies in two parts, the smaller holding this share, is out of scope, or None."""
    if share < LEGS_SPLIT_SHARE:
        return None
    return (f"the body lies in two separate parts of like size (the smaller holds {share:.0%} of both), as "
            f"the legs do below the pelvis; the model was trained on kidney-level slices")


def ruling(shares: tuple[float, float, float] | None) -> tuple[str | None, str | None]:
    """(region, reason) for a slice with these (lung, skull, split) shares: the first of "head", "legs"
    and "chest", in that order of precedence, that rules it out and why; (None, None) for none."""
    if shares is None:
        return None, None
    lung, skull, split = shares
    for kind, why in (("head", head_reason(skull)), ("legs", legs_reason(split)), ("chest", chest_reason(lung))):
        if why is not None:
            return kind, why
    return None, None


def region(shares: tuple[float, float, float] | None) -> str | None:
    """"head", "legs", "chest" or None (:func:`ruling`)."""
    return ruling(shares)[0]


def anatomy_reason(shares: tuple[float, float, float] | None) -> str | None:
    """Why a slice with these (lung, skull, split) shares is out of scope, or None (:func:`ruling`)."""
    return ruling(shares)[1]


def is_chest(shares: tuple[float, float, float]) -> bool:
    """A chest slice: lungs at a chest slice's share, and no skull or legs (a head is a head first)."""
    return region(shares) == "chest"


def shown(share: float) -> float:
    """A share as reports show it: 3 decimals, rounded down, so a share shown at a threshold is at or
    above it."""
    return math.floor(float(share) * 1000) / 1000


class MeasuredSlice(np.ndarray):
    """A windowed 0..1 slice that carries what its HU showed: ``anatomy`` = (lung, skull, split share).
    :func:`edgekidney.data.preprocess.preprocess_with_geometry` hands it on in the slice's Geometry."""

    anatomy: tuple[float, float, float] | None = None

    def __array_finalize__(self, obj) -> None:
        self.anatomy = getattr(obj, "anatomy", None)


def with_anatomy(windowed: np.ndarray, hu: np.ndarray) -> MeasuredSlice:
    """``windowed`` (the slice in 0..1) carrying :func:`measure` of ``hu`` (the same axial slice in HU)."""
    out = np.asarray(windowed).view(MeasuredSlice)
    out.anatomy = measure(hu)
    return out
