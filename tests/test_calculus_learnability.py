"""benchmarks/calculus_learnability.py: the twin-only experiment docs/scope.md reports."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("calculus_learnability", REPO / "benchmarks" / "calculus_learnability.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_held_out_pairs_differ_only_by_a_brighter_spot(real_data):
    from edgekidney.data.preprocess import Preprocessing

    pre = Preprocessing(image_size=128)
    files = sorted((real_data / "Normal").iterdir())[:6]
    base, placed = _bench().held_out_pairs(files, pre, np.random.default_rng(0))
    assert len(base) == len(placed) >= 4
    diff = placed[:, 0] - base[:, 0]
    assert (diff > -1e-3).all()  # a calculus only ever brightens
    changed = (diff > 0.05).reshape(len(diff), -1).sum(1)
    assert (changed >= 1).all() and (changed <= 40).all()  # a few pixels of 128 x 128, each pair


def test_a_short_run_writes_one_row_per_epoch(real_data, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "rows.json"
    assert _bench().main([str(real_data), "--model", "small-avg", "--epochs", "2", "--train", "8", "--val", "6",
                          "--image-size", "32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["pair_auc"] <= 1 and r["pairs"] >= 4 for r in rows)
