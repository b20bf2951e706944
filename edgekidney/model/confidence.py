"""How sure the numbers are: stratified bootstrap intervals, calibration error, confounder rates (numpy).

- Bootstrap: each resample draws, within every true class, as many slices as that class has (with
  replacement), so class sizes stay fixed and a rare class is never missing from a resample; seeded;
  the 95 % interval is the 2.5th-97.5th percentile of the resampled statistic.
- Calibration: expected calibration error of p(stone) against "is a stone" over equal-width bins
  (Guo et al. 2017), and the bins themselves for a reliability diagram.
- Confounders: for every class other than the positive one, how many of its slices were called stone.
"""

from __future__ import annotations

import numpy as np

from edgekidney.metrics import roc_auc_rows


def _interval(values: np.ndarray, level: float) -> list[float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def stratified_indices(y: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(B, n) resample indices; position j always holds a slice of y[j]'s class."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    idx = np.empty((n_resamples, len(y)), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        idx[:, members] = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
    return idx


def bootstrap(y_true: np.ndarray, pred: np.ndarray, score: np.ndarray, classes: list[str], positive: int,
              n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """95 % intervals for sensitivity, specificity, AUC and each confounder's stone rate.

    ``pred`` holds predicted class indices (``len(classes)`` = out of scope); ``score`` is p(stone).
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    y = np.asarray(y_true)
    idx = stratified_indices(y, n_resamples, seed)
    said = np.asarray(pred)[idx] == positive  # (B, n): called stone
    is_pos = y == positive
    out = {"n_resamples": n_resamples, "seed": seed, "level": level, "stratified_by": "true class"}
    if is_pos.any():
        out["sensitivity"] = _interval(said[:, is_pos].mean(axis=1), level)
    if (~is_pos).any():
        out["specificity"] = _interval(1 - said[:, ~is_pos].mean(axis=1), level)
    out["auc"] = _interval(roc_auc_rows(is_pos, np.asarray(score, dtype=np.float64)[idx]), level)
    out["called_stone_rate"] = {classes[c]: _interval(said[:, y == c].mean(axis=1), level)
                                for c in range(len(classes)) if c != positive and (y == c).any()}
    return out


def confounder_table(y_true: np.ndarray, pred: np.ndarray, classes: list[str], positive: int) -> list[dict]:
    """Per true class: slices, called stone (count, rate), out of scope; the positive row is sensitivity."""
    y, pred = np.asarray(y_true), np.asarray(pred)
    rows = []
    for c, name in enumerate(classes):
        members = y == c
        n = int(members.sum())
        if n == 0:
            continue
        stone = int(np.sum(pred[members] == positive))
        rows.append({"class": name, "n": n, "called_stone": stone, "rate": stone / n,
                     "out_of_scope": int(np.sum(pred[members] == len(classes))),
                     "is_positive": c == positive})
    return rows


def calibration(is_positive: np.ndarray, score: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error of p(stone) and the reliability bins (equal width on 0..1)."""
    y = np.asarray(is_positive, dtype=np.float64)
    p = np.clip(np.asarray(score, dtype=np.float64), 0, 1)
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - acc)
        table.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()), "mean_p": conf, "fraction_positive": acc})
    return {"ece": float(ece), "bins": bins, "reliability": table}
