"""What feeds the training loop: augmentation, placed-calculus and erased-stone twins, class-balanced order.

Each function takes a batch and returns a batch; none knows about the model or the loss. Where a batch
carries stone masks (on the network's input grid, see :mod:`edgekidney.data.masks`), the geometric
augmentation moves each mask with its slice and a placed calculus adds its own outline, so the map's
target stays on the stone.
"""

from __future__ import annotations

import math

import numpy as np

from edgekidney.data.preprocess import Preprocessing
from edgekidney.errors import EdgeKidneyError

AUGMENTATIONS = ("geometry", "scale", "intensity", "window", "noise", "resolution", "calculus")


def parse_augmentations(text: str | bool) -> frozenset[str]:
    """``all``, ``none`` or a comma list of AUGMENTATIONS -> the set of names."""
    if text is True or text == "all":
        return frozenset(AUGMENTATIONS)
    if text is False or text in ("none", ""):
        return frozenset()
    names = {t.strip() for t in str(text).split(",") if t.strip()}
    unknown = sorted(names - set(AUGMENTATIONS))
    if unknown:
        raise EdgeKidneyError(f"--augment: unknown augmentation {', '.join(unknown)} "
                              f"(choose from all, none, {', '.join(AUGMENTATIONS)})")
    return frozenset(names)


def augment(batch, pre: Preprocessing, generator, which: frozenset[str] = frozenset(AUGMENTATIONS), masks=None):
    """Random variations a CT slice may show at another site, each switchable by name.

    geometry: rotation (±10°) and shift (±6 %); scale: zoom 0.85-1.15 (field of view, patient size);
    intensity: contrast ±10 %, brightness ±5 %; window: another window width (×0.7-1.4) and level
    (±8 % of the window), as other exports and scanners show the same HU; noise: Gaussian, σ up to 0.03
    (dose, reconstruction kernel); resolution: half the slices resampled through a 1-3x coarser grid
    (thick slices, 3 mm volumes, small matrices). Applied in 0..1 units, so padding stays air.

    ``masks`` (N, S, S), when given, go through the same rotation, shift and zoom; then the result is
    ``(batch, masks)``.
    """
    import torch
    import torch.nn.functional as F

    n = batch.shape[0]
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    x01 = batch * std + mean  # back to 0..1 so that padding is air (0) and jitter is physical

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    if "geometry" in which or "scale" in which:
        angle = uniform(-1, 1, n) * math.radians(10) if "geometry" in which else torch.zeros(n)
        shift = uniform(-0.12, 0.12, n, 2) if "geometry" in which else torch.zeros(n, 2)  # grid units
        zoom = 1 / uniform(0.85, 1.15, n) if "scale" in which else torch.ones(n)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(batch.dtype), list(x01.shape), align_corners=False)
        x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[:, 0]
    if "window" in which:
        width = uniform(0.7, 1.4, n, 1, 1, 1)
        level = uniform(-0.08, 0.08, n, 1, 1, 1)
        x01 = ((x01 - 0.5 - level) / width + 0.5).clamp(0, 1)
    if "intensity" in which:
        contrast = 1 + uniform(-0.10, 0.10, n, 1, 1, 1)
        bright = uniform(-0.05, 0.05, n, 1, 1, 1)
        x01 = (x01 * contrast + bright).clamp(0, 1)
    if "resolution" in which:
        size = x01.shape[-1]
        for i in torch.nonzero(torch.rand(n, generator=generator) < 0.5).flatten().tolist():
            small = max(16, int(size / float(uniform(1.0, 3.0, 1))))
            low = F.interpolate(x01[i : i + 1], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
            x01[i : i + 1] = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    if "noise" in which:
        sigma = uniform(0.0, 0.03, n, 1, 1, 1)
        noise = torch.randn(n, 1, *x01.shape[2:], generator=generator) * sigma
        x01 = (x01 + noise).clamp(0, 1)  # one noise field for the three (identical) channels
    out = (x01 - mean) / std
    return out if masks is None else (out, masks)


def to_input(gray01: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(N, S, S) slices in 0..1 on the network grid -> (N, 3, S, S) network input, normalised as the batch is."""
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    return ((np.asarray(gray01)[:, None] - mean) / std).astype(np.float32)


def parse_level(text: str) -> tuple[float, float]:
    """``"LO,HI"`` -> the placed calculi's level range in window units (0 < LO <= HI <= 8)."""
    from edgekidney.errors import InputError

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"calculus level {text!r}: expected LO,HI in window units, e.g. 1.4,3.4") from None
    if not 0.0 < lo <= hi <= 8.0:
        raise InputError(f"calculus level {text!r}: need 0 < LO <= HI <= 8 (window units; 1 is the window's top)")
    return lo, hi


def calculus_disk(shape: tuple[int, int], spec) -> np.ndarray:
    """The outline of a placed calculus (its nominal diameter) as a float32 mask."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = max(spec.diameter_px / 2.0, 0.75)
    return (((yy - spec.row) ** 2 + (xx - spec.col) ** 2) <= r * r).astype(np.float32)


def calculus_twins(x: np.ndarray, y: np.ndarray, positive: int, fraction: float, pre: Preprocessing,
                   rng: np.random.Generator, masks: np.ndarray | None = None, known: np.ndarray | None = None,
                   value: tuple[float, float] = (0.9, 1.0)):
    """Extra positives: a calculus placed in the kidney region of ``fraction`` of the non-stone slices.

    The untouched slices stay in the batch as their negative twins (see :mod:`edgekidney.data.calculus`).
    Sizes are 3-9 mm at an assumed 350 mm field of view across the body crop. With ``masks`` and
    ``known`` (whether each slice's map target is known) the twins' outlines are added and the result
    is ``(x, y, masks, known)``; else ``(x, y)``. ``value``: the calculus's level in window units (1.0:
    the window's top); above 1 it is drawn, blurred, then clipped at the top, as a calculus denser than
    the window is (docs/scope.md, "Why the placed calculi are missed").
    """
    from edgekidney.data.calculus import draw_calculus, kidney_sites, random_spec

    mean0, std0 = pre.mean[0], pre.std[0]
    extra, outlines = [], []
    for i in np.flatnonzero(y != positive):
        if rng.random() >= fraction:
            continue
        img = x[i, 0] * std0 + mean0
        sites = kidney_sites(img, rng, 1)
        if not sites:
            continue
        spec = random_spec(rng, sites[0], pixels_per_mm=img.shape[1] / 350.0, value=value)
        extra.append(np.minimum(draw_calculus(img, spec), 1.0))  # window units: nothing is brighter than the top
        outlines.append(calculus_disk(img.shape, spec))
    with_masks = masks is not None
    if not extra:
        return (x, y, masks, known) if with_masks else (x, y)
    twins = to_input(np.stack(extra), pre)
    x2 = np.concatenate([x, twins])
    y2 = np.concatenate([y, np.full(len(twins), positive, dtype=y.dtype)])
    if not with_masks:
        return x2, y2
    return x2, y2, np.concatenate([masks, np.stack(outlines)]), np.concatenate([known, np.ones(len(twins), bool)])


def erased_twins(x: np.ndarray, y: np.ndarray, masks: np.ndarray, known: np.ndarray, positive: int,
                 negative: int, fraction: float, pre: Preprocessing, rng: np.random.Generator):
    """Counterfactual negatives: ``fraction`` of the outlined Stone slices get a twin with the stone painted
    over in the tissue around it, labelled ``negative`` (no stone; its map target is empty).

    The stone slices of a public dataset and its other classes often come from other scanners and
    protocols (non-contrast against contrast CT), so the look of the whole slice predicts the label.
    A twin that differs from its stone slice only where the stone was leaves the stone itself as the one
    thing that tells them apart. So that the painting tells nothing, the stone slice itself gets the same
    painting (a sham) over a patch of the stone's shape at a kidney site away from the stone.
    Returns ``(x, y, masks, known)`` with the twins appended (the stone slices' shams in place).
    """
    from scipy.ndimage import binary_dilation

    from edgekidney.data.calculus import kidney_sites, paint_over

    mean0, std0 = pre.mean[0], pre.std[0]
    x = x.copy()
    extra = []
    for i in np.flatnonzero((y == positive) & known):
        stone = masks[i] > 0.5
        if not stone.any() or rng.random() >= fraction:
            continue
        img = x[i, 0] * std0 + mean0
        erased = paint_over(img, stone, rng)
        if erased is None:
            continue
        extra.append(erased)
        rows, cols = np.nonzero(stone)
        keep_out = binary_dilation(stone, iterations=12)  # the sham and its blended edge stay off the stone
        for site in kidney_sites(img, rng, 4):
            dr, dc = site[0] - int(rows.mean()), site[1] - int(cols.mean())
            r2, c2 = rows + dr, cols + dc
            inside = (r2 >= 0) & (r2 < img.shape[0]) & (c2 >= 0) & (c2 < img.shape[1])
            sham = np.zeros_like(stone)
            sham[r2[inside], c2[inside]] = True
            if sham.any() and not (sham & keep_out).any():
                painted = paint_over(img, sham, rng)
                if painted is not None:
                    x[i] = to_input(painted[None], pre)[0]
                break
    if not extra:
        return x, y, masks, known
    twins = to_input(np.stack(extra), pre)
    return (np.concatenate([x, twins]), np.concatenate([y, np.full(len(twins), negative, dtype=y.dtype)]),
            np.concatenate([masks, np.zeros((len(twins),) + masks.shape[1:], masks.dtype)]),
            np.concatenate([known, np.ones(len(twins), bool)]))


def add_twins(x: np.ndarray, y: np.ndarray, masks: np.ndarray | None, known: np.ndarray | None, positive: int,
              pre: Preprocessing, rng: np.random.Generator, calculus_fraction: float = 0.0,
              erase_to: int | None = None, erase_fraction: float = 0.0,
              calculus_level: tuple[float, float] = (0.9, 1.0)):
    """A batch with its twins appended: erased-stone twins first, from real stones only (made after the
    placed calculi, a Cyst or Tumor slice's calculus twin would be erased back into that slice labelled
    ``erase_to``), then placed-calculus twins. ``masks``/``known`` are None for a model without a map."""
    if masks is not None and erase_to is not None and erase_fraction > 0:
        x, y, masks, known = erased_twins(x, y, masks, known, positive, erase_to, erase_fraction, pre, rng)
    if calculus_fraction > 0:
        if masks is not None:
            x, y, masks, known = calculus_twins(x, y, positive, calculus_fraction, pre, rng, masks, known,
                                                value=calculus_level)
        else:
            x, y = calculus_twins(x, y, positive, calculus_fraction, pre, rng, value=calculus_level)
    return x, y, masks, known


def epoch_order(y: np.ndarray, balanced: bool, generator) -> np.ndarray:
    """Indices of one epoch: a permutation, or with ``balanced`` each class drawn equally often."""
    import torch

    if not balanced:
        return torch.randperm(len(y), generator=generator).numpy()
    counts = np.bincount(y)
    weights = torch.tensor(1.0 / counts[y], dtype=torch.float64)
    return torch.multinomial(weights, len(y), replacement=True, generator=generator).numpy()
