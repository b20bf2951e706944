"""The one preprocessing implementation (numpy only).

Every path into the network goes through :func:`preprocess`: training, calibration, export parity,
evaluation, every runtime backend and the HTTP server. Its parameters travel with the model (checkpoint
and ONNX/engine sidecar), so deployment cannot silently disagree with training.

Input is a 2-D grayscale slice scaled to 0..1 (see :mod:`edgekidney.data.decode`, which turns DICOM
Hounsfield units or PNG/JPEG pixels into that). Steps: pad to square with air (0), antialiased bilinear
resize to ``image_size``, replicate to 3 channels, normalize with ``mean``/``std``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Parameters of the preprocessing, stored with every model."""

    image_size: int = 224
    window_center: float = 40.0  # abdomen window, HU (applied to DICOM and HU-coded PNGs)
    window_width: float = 400.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    min_input_size: int = 32
    # 16-bit PNGs: None scales the full 0..65535 range to 0..1; an integer N reads pixels as HU + N
    # (e.g. 32768 as in DeepLesion, 1024 for common exports) and applies the CT window like DICOM.
    png16_hu_offset: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.window_width <= 0:
            raise ValueError(f"window_width must be positive, got {self.window_width}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        return cls(**kw)


def window_hu(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map Hounsfield units to 0..1 with a CT window (values outside are clipped)."""
    lo = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


@lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased linear (triangle) filter, like PIL's BILINEAR."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the triangle when downsampling: antialiasing
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.arange(n_in, dtype=np.float64)
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centers[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


@lru_cache(maxsize=64)
def _resample_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The same filter as a band: for each output pixel, the indices and weights of its few inputs.

    Gathering ~5 taps per pixel is ~100x less work than the dense matrix product for 512 -> 224.
    """
    dense = _resample_matrix(n_in, n_out)
    nonzero = dense > 0
    taps = int(nonzero.sum(axis=1).max())
    first = nonzero.argmax(axis=1)
    idx = first[:, None] + np.arange(taps)[None, :]
    valid = idx < n_in
    idx = np.where(valid, idx, n_in - 1)
    weights = np.where(valid, np.take_along_axis(dense, idx, axis=1), 0.0).astype(np.float32)
    return idx, weights


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """Centre the slice on a square canvas of air (0) so resizing keeps anatomy undistorted."""
    h, w = img.shape
    if h == w:
        return img
    n = max(h, w)
    out = np.zeros((n, n), dtype=img.dtype)
    top, left = (n - h) // 2, (n - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a square 2-D float image to ``size`` x ``size``."""
    h, w = img.shape
    if h == size and w == size:
        return img.astype(np.float32, copy=False)
    img = img.astype(np.float32, copy=False)
    rows_idx, rows_w = _resample_taps(h, size)
    cols_idx, cols_w = _resample_taps(w, size)
    tmp = np.einsum("ok,okw->ow", rows_w, img[rows_idx])  # (size, w)
    return np.einsum("ok,hok->ho", cols_w, tmp[:, cols_idx])  # (size, size)


def preprocess(gray01: np.ndarray, config: Preprocessing) -> np.ndarray:
    """One 2-D slice in 0..1 -> network input of shape (3, S, S), float32."""
    img = np.asarray(gray01, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale slice, got shape {img.shape}")
    img = resize(pad_to_square(img), config.image_size)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((img[None, :, :] - mean) / std, dtype=np.float32)


def preprocess_batch(slices: list[np.ndarray], config: Preprocessing) -> np.ndarray:
    """Several 2-D slices -> (N, 3, S, S) float32."""
    if not slices:
        return np.zeros((0, 3, config.image_size, config.image_size), dtype=np.float32)
    return np.stack([preprocess(s, config) for s in slices])
