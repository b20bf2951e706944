"""Decode + preprocess many samples into one array (numpy only: training and calibration share it)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgekidney.data.preprocess import Geometry, Preprocessing, preprocess_with_geometry
from edgekidney.data.dataset import Sample
from edgekidney.data.decode import load_slice


def load_arrays(samples: list[Sample], pre: Preprocessing, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Decode + preprocess (the shared numpy implementation) every sample once -> (N, 3, S, S) float32."""
    return load_arrays_with_geometry(samples, pre, progress)[0]


def load_arrays_with_geometry(samples: list[Sample], pre: Preprocessing, progress: Callable[[int], None] | None = None
                              ) -> tuple[np.ndarray, list[Geometry]]:
    """As :func:`load_arrays`, with where each network grid lies on its slice (masks follow the same way)."""
    out = np.empty((len(samples), 3, pre.image_size, pre.image_size), dtype=np.float32)
    geometries = []
    for i, s in enumerate(samples):
        out[i], g = preprocess_with_geometry(load_slice(s.path, pre), pre)
        geometries.append(g)
        if progress:
            progress(1)
    return out, geometries
