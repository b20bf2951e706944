"""Drawing class activation maps (numpy + Pillow, no torch): where the model looked.

The map itself is an output of the exported graph (:mod:`edgekidney.model.heads`); :class:`Prediction.cam`
already lies on the original slice. Here it becomes a PNG: the slice in gray, the positive part of the
map as a heat overlay (transparent where the map is at or below zero), the peak marked.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np


def peak_of(cam: np.ndarray) -> tuple[int, int]:
    """(row, col) of a map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))


def _heat(v: np.ndarray) -> np.ndarray:
    """0..1 -> RGB, black-red-yellow-white (a perceptually ordered 'hot' map)."""
    r = np.clip(v * 3.0, 0, 1)
    g = np.clip(v * 3.0 - 1.0, 0, 1)
    b = np.clip(v * 3.0 - 2.0, 0, 1)
    return np.stack([r, g, b], axis=-1)


def overlay(gray01: np.ndarray, cam: np.ndarray, peak: tuple[int, int] | None = None, alpha: float = 0.55):
    """A Pillow RGB image: the slice with the positive part of ``cam`` over it."""
    from PIL import Image, ImageDraw

    g = np.clip(np.asarray(gray01, dtype=np.float32), 0, 1)
    c = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    top = float(c.max())
    v = c / top if top > 0 else c
    a = (alpha * v)[..., None]
    rgb = (1 - a) * g[..., None] + a * _heat(v)
    im = Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), "RGB")
    if peak is not None and top > 0:
        r = max(3, round(min(g.shape) / 40))
        y, x = peak
        ImageDraw.Draw(im).ellipse([x - r, y - r, x + r, y + r], outline=(0, 255, 255), width=max(1, r // 3))
    return im


def write_overlay(path: str | Path, gray01: np.ndarray, cam: np.ndarray, peak: tuple[int, int] | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(gray01, cam, peak).save(path, format="PNG")
    return path


def overlay_png_base64(gray01: np.ndarray, cam: np.ndarray, peak: tuple[int, int] | None) -> str:
    buf = io.BytesIO()
    overlay(gray01, cam, peak).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
