"""Planes: classify slices as acquired (axial) or resampled to coronal slices with the real spacing.

The coronal reformat needs the whole volume (the one volume held in memory, as float16 windowed
values in 0..1: 2 bytes a voxel, 315 MB for 600 x 512 x 512). From the axial stack in display
orientation (rows run posterior, columns to the patient's left, slices feet to head at their true
positions, uneven spacing included) a coronal slice is one row of every axial slice, linearly
interpolated along z onto a uniform grid, head at the top. Its pixels are square: both axes are
resampled to one spacing, the column spacing of the series or coarser so that the longer side has
at most ``MAX_SIDE`` pixels (the classifier sees ``image_size`` pixels anyway). Coronal slices are
taken every ``spacing_mm`` along the anterior-posterior axis (default: the axial slice spacing, at
least the pixel spacing), and their position is reported in mm along +y (posterior).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from edgekidney.errors import InputError

PLANES = ("axial", "coronal")
MAX_SIDE = 512


def check_plane(plane: str) -> str:
    plane = plane.lower()
    if plane not in PLANES:
        raise InputError(f"--plane {plane}: expected one of {', '.join(PLANES)}")
    return plane


def _linear(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weight to interpolate values at ascending ``src`` positions onto ``dst``."""
    dst = np.clip(dst, src[0], src[-1])
    hi = np.clip(np.searchsorted(src, dst, side="right"), 1, len(src) - 1)
    lo = hi - 1
    gap = src[hi] - src[lo]
    w = np.where(gap > 0, (dst - src[lo]) / np.where(gap > 0, gap, 1.0), 0.0)
    return lo, hi, w.astype(np.float32)


class CoronalReformat:
    """Coronal slices of an axial volume of shape (slices, rows, cols) in display orientation."""

    def __init__(self, volume: np.ndarray, positions: list[float], pixel_spacing: tuple[float, float],
                 origin_y: float = 0.0, spacing_mm: float | None = None) -> None:
        if volume.shape[0] < 2:
            raise InputError("a coronal reformat needs at least 2 axial slices")
        self.volume = volume
        z = np.asarray(positions, dtype=float)
        dy, dx = pixel_spacing
        extent_z, extent_x = z[-1] - z[0], dx * (volume.shape[2] - 1)
        self.step = max(dx, max(extent_z, extent_x) / (MAX_SIDE - 1))
        z_out = z[-1] - np.arange(0.0, extent_z + 1e-6, self.step)  # head at the top
        x_out = np.arange(0.0, extent_x + 1e-6, self.step)
        self._z = _linear(z, z_out)
        self._x = _linear(np.arange(volume.shape[2]) * dx, x_out)
        gaps = np.diff(z)
        every = spacing_mm or max(float(np.median(gaps)), dy)
        rows = np.unique(np.round(np.arange(0.0, dy * (volume.shape[1] - 1) + 1e-6, every) / dy).astype(int))
        self.rows = [int(r) for r in rows if r < volume.shape[1]]
        self.positions = [float(origin_y + r * dy) for r in self.rows]
        self.spacing_mm = float(every)

    def __len__(self) -> int:
        return len(self.rows)

    def slices(self) -> Iterator[np.ndarray]:
        (zl, zh, zw), (xl, xh, xw) = self._z, self._x
        for r in self.rows:
            plane = self.volume[:, r, :].astype(np.float32)  # (z, x)
            plane = plane[zl] * (1 - zw)[:, None] + plane[zh] * zw[:, None]
            yield np.ascontiguousarray(plane[:, xl] * (1 - xw)[None, :] + plane[:, xh] * xw[None, :])
