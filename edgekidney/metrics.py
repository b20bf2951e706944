"""The metrics clinicians read, in numpy (no torch, no sklearn).

The positive class (stone) probability decides: ``p >= threshold`` -> positive; otherwise the most
probable of the other classes. With two classes that is the usual binary rule.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def decide(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Predicted class index per row."""
    probs = np.asarray(probs)
    others = probs.copy()
    others[:, positive] = -np.inf
    fallback = others.argmax(axis=1)
    return np.where(probs[:, positive] >= threshold, positive, fallback)


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half). NaN with one class only."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def classification_report(y_true, probs, classes: list[str], positive: int, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, AUC and confusion matrix, as a JSON-able dict."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = decide(probs, positive, threshold)
    cm = confusion_matrix(y_true, pred, len(classes))
    is_pos, said_pos = y_true == positive, pred == positive
    tp = int(np.sum(is_pos & said_pos))
    fn = int(np.sum(is_pos & ~said_pos))
    fp = int(np.sum(~is_pos & said_pos))
    tn = int(np.sum(~is_pos & ~said_pos))
    sens, prec = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = _ratio(2 * prec * sens, prec + sens) if tp else 0.0
    return {
        "n": int(len(y_true)),
        "positive_class": classes[positive],
        "threshold": float(threshold),
        "accuracy": _ratio(float(np.sum(pred == y_true)), len(y_true)),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "precision": prec,
        "f1": f1,
        "auc": roc_auc(is_pos, probs[:, positive]),
        "tp": tp, "fn": fn, "fp": fp, "tn": tn,
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }


def threshold_for_sensitivity(y_is_positive, score, target: float) -> float:
    """The decision threshold for a target sensitivity on these data.

    Among thresholds whose sensitivity is at least ``target``, take those with the best specificity,
    and of these the one with the best sensitivity (a perfectly separating model keeps all its
    positives). The threshold lies halfway between the lowest positive score kept and the next lower
    score, so that a difference in the last float bits between backends (PyTorch, ONNX Runtime,
    TensorRT) cannot flip a decision on the data it was chosen on.
    """
    y = np.asarray(y_is_positive).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if not 0 < target <= 1:
        raise ValueError("target sensitivity must be in (0, 1]")
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if len(pos) == 0:
        return 0.5
    candidates = np.unique(pos)  # predict positive when score >= candidate
    sens = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)
    spec = np.searchsorted(neg, candidates, side="left") / max(len(neg), 1)
    ok = sens >= target - 1e-12
    best_spec = spec[ok].max()
    chosen = candidates[ok & (spec >= best_spec - 1e-12)].min()  # lowest such threshold = most sensitive
    lower = s[s < chosen]
    return float((chosen + (lower.max() if lower.size else 0.0)) / 2.0)


def format_report(report: dict, title: str = "") -> str:
    """A short table for people."""
    lines = [title] if title else []
    keys = ("n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "threshold")
    for k in keys:
        v = report[k]
        lines.append(f"  {k:<12} {v:.4f}" if isinstance(v, float) else f"  {k:<12} {v}")
    classes = report["classes"]
    width = max(8, *(len(c) for c in classes)) + 2
    lines.append("  confusion (rows true, columns predicted):")
    lines.append("  " + " " * width + "".join(f"{c:>{width}}" for c in classes))
    for c, row in zip(classes, report["confusion_matrix"]):
        lines.append("  " + f"{c:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
