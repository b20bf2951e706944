"""Stone masks: where the stones are in a training slice (numpy + Pillow, no torch).

A mask folder mirrors the dataset: ``MASKS/Stone/Stone- (17).png`` outlines the stones of
``DATA/Stone/Stone- (17).jpg`` pixel for pixel (non-zero = stone). By default a folder named
``<DATA>-stones`` beside the dataset is used when it exists. A mask is carried through the very crop,
pad and resize the slice goes through (:class:`edgekidney.data.preprocess.Geometry`), so it stays
aligned with the network's input grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekidney.data.preprocess import Geometry
from edgekidney.errors import InputError

MASK_SUFFIX = ".png"


def default_mask_folder(data: str | Path) -> Path | None:
    """``<DATA>-stones`` beside the dataset folder, when it exists."""
    data = Path(data).resolve()
    candidate = data.parent / f"{data.name}-stones"
    return candidate if candidate.is_dir() else None


def mask_path(masks: Path, data: Path, image: Path) -> Path:
    """The mask of ``image`` (a file under ``data``): same relative path, ``.png``."""
    rel = Path(image).resolve().relative_to(Path(data).resolve())
    return Path(masks) / rel.with_suffix(MASK_SUFFIX)


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask file -> bool (H, W); a mask of another size than its slice is a clear error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable mask image ({' '.join(str(exc).split())[:100]})") from None
    if arr.shape != tuple(shape):
        raise InputError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but its slice is {shape[1]}x{shape[0]}; "
                         "a mask must cover its slice pixel for pixel")
    return arr > 0


def mask_to_network(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A (H, W) mask on the original slice -> (S, S) float32 0..1 on the network's input grid.

    The same crop, square padding and resize as the slice (:func:`edgekidney.data.preprocess.preprocess`);
    a stone pixel keeps a non-zero share after the resize, so a one-pixel stone is not lost.
    """
    from PIL import Image

    top, bottom, left, right = geometry.crop
    cropped = np.asarray(mask, dtype=np.float32)[top:bottom, left:right]
    square = np.zeros((geometry.side, geometry.side), dtype=np.float32)
    square[geometry.pad_top : geometry.pad_top + cropped.shape[0],
           geometry.pad_left : geometry.pad_left + cropped.shape[1]] = cropped
    if geometry.side == geometry.size:
        return square
    out = np.asarray(Image.fromarray(square, "F").resize((geometry.size, geometry.size), Image.BILINEAR),
                     dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def distance_to_mask(point: tuple[float, float], mask: np.ndarray) -> float:
    """Euclidean distance in pixels from (row, col) to the nearest mask pixel (inf for an empty mask)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return float("inf")
    return float(np.sqrt(np.min((rows - point[0]) ** 2 + (cols - point[1]) ** 2)))
