"""Synthetic calculi placed into real slices: teaching the model the stone, not the image source.

Training (see :mod:`edgekidney.model.train`, augmentation ``calculus``) takes slices labelled without a stone,
places a calculus where a kidney lies and adds the result as an extra *positive* beside its untouched
twin, a negative. The same functions build the paired test on real CT of other hospitals
(``benchmarks/scope.py``). :func:`paint_over` is the mirror: an outlined stone painted over in the
tissue around it (erased-stone twins in training, and ``benchmarks/located.py``).

Where a kidney lies, without a segmentation: the kidneys sit in the retroperitoneum on both sides of the
spine at the level of the vertebral body (L1-L2 on axial slices; beside the lumbar spine on coronal
ones). :func:`kidney_sites` finds the spine as the densest column of bright (bone) pixels in the middle
of the body and samples soft-tissue pixels 8-30 % of the body's width to its left or right, within 20 %
of the body's height of the vertebra's centre. That is a region, not a mask: a few calculi land in
the renal sinus fat, psoas or liver edge, all places where a bright focus of a few millimetres is what a
radiologist would check. Intensities are those of calculi in the windowed image (600-1200 HU saturate
an abdominal window; in HU space the value is used as is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CalculusSpec:
    diameter_px: float
    value: float  # 0..1 in a windowed slice, or HU when drawing into HU
    blur_px: float
    row: float
    col: float


def _spine(img01: np.ndarray, body: np.ndarray) -> tuple[float, float, float, float] | None:
    """(row, col, body width, body height) of the vertebra, or None when no bone column is found."""
    rows, cols = np.nonzero(body)
    if rows.size < 100:
        return None
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    width, height = right - left, bottom - top
    inside = img01[top:bottom, left:right]
    bright = inside >= max(0.85, float(np.quantile(inside[body[top:bottom, left:right]], 0.97)))
    mid = slice(int(width * 0.3), int(width * 0.7) + 1)
    profile = bright[:, mid].sum(axis=0).astype(float)
    if profile.max() < 3:
        return None
    profile = np.convolve(profile, np.ones(5) / 5, mode="same")
    col = left + mid.start + int(round(np.flatnonzero(profile >= profile.max() - 1e-9).mean()))  # plateau centre
    band = bright[:, max(0, col - left - 3) : col - left + 4]
    r = np.nonzero(band.any(axis=1))[0]
    if r.size == 0:
        return None
    return float(top + np.median(r)), float(col), float(width), float(height)


def kidney_sites(img01: np.ndarray, rng: np.random.Generator, n: int = 1, body_threshold: float = 0.05,
                 tissue: tuple[float, float] = (0.3, 0.85)) -> list[tuple[int, int]]:
    """Up to ``n`` (row, col) positions where a kidney lies (see the module docstring); [] if none found."""
    img = np.asarray(img01, dtype=np.float32)
    body = img > body_threshold
    spine = _spine(img, body)
    if spine is None:
        return []
    srow, scol, width, height = spine
    h, w = img.shape
    rr, cc = np.mgrid[0:h, 0:w]
    lateral = np.abs(cc - scol)
    region = ((lateral >= 0.08 * width) & (lateral <= 0.30 * width) & (np.abs(rr - srow) <= 0.20 * height)
              & (img >= tissue[0]) & (img <= tissue[1]))
    cand = np.flatnonzero(region)
    if cand.size == 0:
        return []
    picks = rng.choice(cand, size=min(n, cand.size), replace=False)
    return [(int(p // w), int(p % w)) for p in picks]


def random_spec(rng: np.random.Generator, site: tuple[int, int], pixels_per_mm: float,
                diameter_mm: tuple[float, float] = (3.0, 9.0), value: tuple[float, float] = (0.9, 1.0),
                blur_px: tuple[float, float] = (0.3, 1.0)) -> CalculusSpec:
    """A calculus of random size, density and blur at ``site``."""
    return CalculusSpec(diameter_px=float(rng.uniform(*diameter_mm) * pixels_per_mm),
                        value=float(rng.uniform(*value)), blur_px=float(rng.uniform(*blur_px)),
                        row=float(site[0]), col=float(site[1]))


def draw_calculus(img: np.ndarray, spec: CalculusSpec) -> np.ndarray:
    """A copy of ``img`` with a soft-edged ellipsoidal calculus blended in (never darker than before)."""
    out = np.array(img, dtype=np.float32, copy=True)
    r = max(spec.diameter_px / 2.0, 0.5)
    reach = int(np.ceil(r + 3 * spec.blur_px + 1))
    r0, r1 = max(0, int(spec.row) - reach), min(out.shape[0], int(spec.row) + reach + 1)
    c0, c1 = max(0, int(spec.col) - reach), min(out.shape[1], int(spec.col) + reach + 1)
    if r0 >= r1 or c0 >= c1:
        return out
    yy, xx = np.mgrid[r0:r1, c0:c1]
    dist = np.sqrt((yy - spec.row) ** 2 + (xx - spec.col) ** 2)
    soft = max(spec.blur_px, 0.3)
    alpha = 1.0 / (1.0 + np.exp((dist - r) / soft))  # 1 inside, 0 outside, a blurred edge
    patch = out[r0:r1, c0:c1]
    out[r0:r1, c0:c1] = np.maximum(patch, patch * (1 - alpha) + spec.value * alpha)
    return out


def _ring_stats(img: np.ndarray, ring: np.ndarray) -> tuple[float, float] | None:
    """The tissue level (median) and grain (high-frequency sd, capped) of ``ring``; None where it holds no body."""
    from scipy.ndimage import uniform_filter

    vals = img[ring & (img > 0.05)]
    if vals.size < 8:
        return None
    grain = (img - uniform_filter(img, 3))[ring]
    return float(np.median(vals)), float(min(np.std(grain) * 1.2, 0.08))


def paint_over(img: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A copy of ``img`` (0..1) with ``region`` (bool) painted in the tissue around it: the mirror of
    :func:`draw_calculus`, for erasing an outlined stone. The ring 2-6 px outside the region gives the
    level and the grain; the region grown by 2 px is filled, its outer pixel blended at least half-way.
    None where no body surrounds the region."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    grown = binary_dilation(region, iterations=1)
    inner = binary_dilation(region, iterations=2)
    ring = binary_dilation(region, iterations=6) & ~inner
    stats = _ring_stats(img, ring)
    if stats is None:
        return None
    level, grain = stats
    fill = level + grain * rng.standard_normal(img.shape).astype(np.float32)
    alpha = np.clip(gaussian_filter(inner.astype(np.float32), 1.0) * 1.5, 0, 1)
    edge = inner & ~grown
    alpha[edge] = np.maximum(alpha[edge], 0.5)
    alpha[region] = 1.0
    return np.clip(img * (1 - alpha) + fill * alpha, 0, 1).astype(np.float32)


def paint_over_each(slices, regions, seed: int = 0) -> list[np.ndarray | None]:
    """:func:`paint_over` on each slice (0..1) with its region, one seeded generator for all, in order
    (None where no tissue surrounds a region): the erased stones of validation and of the benchmark."""
    rng = np.random.default_rng(seed)
    return [paint_over(img, region, rng) for img, region in zip(slices, regions)]
