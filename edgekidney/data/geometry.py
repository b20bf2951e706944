"""Slice geometry in patient coordinates (DICOM LPS: +x patient left, +y posterior, +z superior).

One job: from an image orientation (row and column direction cosines) say which plane a slice is,
how to turn its pixel array into the *display orientation* the classifier was trained on, and where
its pixels lie afterwards. Display orientation (radiological convention):

- axial: columns run to the patient's left (+x), rows run posterior (+y): the patient's right is on
  the image's left, anterior at the top;
- coronal: columns run to the patient's left (+x), rows run inferior (-z): head at the top;
- sagittal: columns run posterior (+y), rows run inferior (-z).

Only axis-aligned orientations (each cosine within ~37 degrees of an axis) are turned; an oblique
slice is left as acquired and said so. Slices are ordered by position along the plane's canonical
normal (+z axial, +y coronal, +x sagittal), i.e. feet to head for an axial series.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the axis the plane's normal runs along
# (column axis, column sign), (row axis, row sign) of the display orientation
DISPLAY = {"axial": ((0, 1), (1, 1)), "coronal": ((0, 1), (2, -1)), "sagittal": ((1, 1), (2, -1))}
AXIS_ALIGNED = 0.8
MAX_PIXEL_ASPECT = 1.1  # row spacing over column spacing, or the inverse: above it a slice is refused
PIXEL_MM = (0.05, 10.0)  # a CT slice's pixel spacing; outside it the header's units are wrong


def obliquity(*directions) -> float:
    """Degrees between each direction (an image's row and column cosines, a volume's axes) and the
    patient axis nearest it: the largest of these angles."""
    largest = min(float(np.max(np.abs(np.asarray(v, float)))) / (float(np.linalg.norm(v)) or 1.0)
                  for v in directions)
    return float(np.degrees(np.arccos(np.clip(largest, -1.0, 1.0))))


def pixel_spacing_reason(spacing) -> str | None:
    """Why a slice of this pixel spacing (row, column; mm) is not judged, or None: spacing no CT slice
    has (millimetres read from a header in other units: the distances the answer gives, and the
    density searched around a peak, would be wrong), or pixels that are not square."""
    if spacing is None:
        return None
    low, high = PIXEL_MM
    if not all(low <= float(d) <= high for d in spacing):
        return (f"pixel spacing {float(spacing[0]):.3g} x {float(spacing[1]):.3g} mm is outside what a CT slice has "
                f"({low:g}-{high:g} mm): check the header's units")
    return non_square_reason(spacing)


def non_square_reason(spacing) -> str | None:
    """Why a slice of this pixel spacing (row, column; mm) is not judged, or None. The slice is cropped
    and resized as an array, so pixels that are not square reach the network as stretched anatomy: a
    kidney and a calculus of another shape than any it was trained on."""
    if spacing is None:
        return None
    rows, cols = float(spacing[0]), float(spacing[1])
    aspect = max(rows, cols) / min(rows, cols)
    if aspect <= MAX_PIXEL_ASPECT:
        return None
    return (f"pixels are not square ({rows:.3g} x {cols:.3g} mm, row x column spacing): the model would see the "
            f"anatomy stretched {aspect:.2f} times; resample the slices to square pixels")


def pixel_spacing(value) -> tuple[float, ...] | None:
    """PixelSpacing (row, column) in mm; None where absent or not two positive numbers."""
    pair = finite_floats(value, 2)
    return pair if pair is not None and min(pair) > 0 else None


def finite_floats(value, n: int) -> tuple[float, ...] | None:
    """A header's ``n`` numbers (ImagePositionPatient 3, ImageOrientationPatient 6, PixelSpacing 2), or
    None where they are absent, not numbers, fewer or more, or not finite."""
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def orientation_plane(iop) -> str:
    """axial | coronal | sagittal | oblique, from the six ImageOrientationPatient cosines."""
    return plane_of(np.cross(iop[:3], iop[3:]))


def plane_of(normal: np.ndarray) -> str:
    """axial | coronal | sagittal | oblique, from the slice normal."""
    n = np.abs(np.asarray(normal, dtype=float))
    n = n / (np.linalg.norm(n) or 1.0)
    axis = int(np.argmax(n))
    if n[axis] < AXIS_ALIGNED:
        return "oblique"
    return {0: "sagittal", 1: "coronal", 2: "axial"}[axis]


@dataclass(frozen=True)
class DisplayTransform:
    """How to turn an acquired pixel array (rows, cols) into display orientation."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    def apply(self, img: np.ndarray) -> np.ndarray:
        if self.transpose:
            img = img.T
        if self.flip_rows:
            img = img[::-1]
        if self.flip_cols:
            img = img[:, ::-1]
        return img

    def source_index(self, i: int, j: int, shape: tuple[int, int]) -> tuple[int, int]:
        """Acquired (row, col) of display pixel (i, j); ``shape`` is the acquired (rows, cols)."""
        rows, cols = (shape[1], shape[0]) if self.transpose else shape
        if self.flip_rows:
            i = rows - 1 - i
        if self.flip_cols:
            j = cols - 1 - j
        return (j, i) if self.transpose else (i, j)


def display_transform(row_cos, col_cos, plane: str) -> DisplayTransform | None:
    """The transform to display orientation, or None when the slice is oblique.

    ``row_cos`` is the direction of increasing column index (first three values of
    ImageOrientationPatient), ``col_cos`` that of increasing row index (last three).
    """
    if plane not in DISPLAY:
        return None
    r, c = np.asarray(row_cos, dtype=float), np.asarray(col_cos, dtype=float)
    ar, ac = int(np.argmax(np.abs(r))), int(np.argmax(np.abs(c)))
    if abs(r[ar]) < AXIS_ALIGNED or abs(c[ac]) < AXIS_ALIGNED:
        return None
    sr, sc = np.sign(r[ar]), np.sign(c[ac])
    (col_axis, col_sign), (row_axis, row_sign) = DISPLAY[plane]
    if ar == col_axis and ac == row_axis:
        return DisplayTransform(False, flip_rows=bool(sc != row_sign), flip_cols=bool(sr != col_sign))
    if ac == col_axis and ar == row_axis:  # display columns come from acquired rows
        return DisplayTransform(True, flip_rows=bool(sr != row_sign), flip_cols=bool(sc != col_sign))
    return None


def canonical_normal(normal: np.ndarray) -> np.ndarray:
    """The slice normal, signed to point along +x, +y or +z (whichever axis it is nearest)."""
    n = np.asarray(normal, dtype=float)
    n = n / (np.linalg.norm(n) or 1.0)
    axis = int(np.argmax(np.abs(n)))
    return n if n[axis] >= 0 else -n
