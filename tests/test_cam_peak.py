"""Where the activation map looks: its peak on the calculi of synthetic phantoms (issue 13, item 5)."""

from __future__ import annotations

import numpy as np
import pytest

from edgekidney.data.synthetic import synth_phantom, synth_slice


def test_phantom_says_where_its_calculi_are_and_synth_slice_is_its_image():
    for seed in range(12):
        stone = seed % 3 != 0
        ph = synth_phantom(np.random.default_rng(seed), 256, stone)
        assert np.array_equal(ph.hu, synth_slice(np.random.default_rng(seed), 256, stone))  # one implementation
        if not stone:
            assert ph.calculi == () and np.array_equal(ph.without_calculi, ph.hu)
            continue
        assert 1 <= len(ph.calculi) <= 3
        yy, xx = np.mgrid[0:256, 0:256]
        near = np.zeros((256, 256), bool)
        for c in ph.calculi:
            r, col = int(round(c.row)), int(round(c.col))
            assert ph.hu[r, col] > 300  # the centre is calcified (400-1200 HU plus noise) ...
            assert -60 < ph.without_calculi[r, col] < 220  # ... and lies in a kidney (cortex 150, sinus 30 HU)
            assert 2.0 <= c.radius <= 6.7  # 0.8-2 % of the slice, the other axis 0.7-1.3 times that
            near |= np.hypot(yy - c.row, xx - c.col) <= c.radius + 0.5
        changed = ph.hu != ph.without_calculi
        assert changed.any() and not (changed & ~near).any()  # same anatomy and noise everywhere else
