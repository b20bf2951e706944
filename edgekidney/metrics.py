"""The metrics clinicians read, in numpy (no torch, no sklearn).

The positive class (stone) probability decides: ``p >= threshold`` -> positive; otherwise the most
probable of the other classes. With two classes that is the usual binary rule. A slice out of scope
(see :mod:`edgekidney.scope`) gets no class: it is counted as a missed stone when it was one, and as
"not called stone" otherwise; the confusion matrix has an extra ``out_of_scope`` column.
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
    return float(roc_auc_rows(y, np.asarray(score, dtype=np.float64)[None, :])[0])


def roc_auc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of ``scores`` (B, n) against one label vector ``y`` (n,), ties counted half."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.full(len(scores), np.nan)
    ranks = rankdata(scores, axis=1)  # average ranks over ties
    return (ranks[:, y].sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def predictions(probs, positive: int, threshold: float, in_scope=None) -> np.ndarray:
    """Predicted class index per row; ``len(classes)`` for a slice out of scope."""
    pred = decide(probs, positive, threshold)
    if in_scope is not None:
        pred = np.where(np.asarray(in_scope, dtype=bool), pred, np.asarray(probs).shape[1])
    return pred


def classification_report(y_true, probs, classes: list[str], positive: int, threshold: float,
                          in_scope=None) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, AUC and confusion matrix, as a JSON-able dict.

    With ``in_scope`` (bool per slice) the slices out of scope get no class (see the module docstring).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = predictions(probs, positive, threshold, in_scope)
    columns = list(classes) + (["out_of_scope"] if in_scope is not None else [])
    cm = confusion_matrix(y_true, pred, len(columns))[: len(classes)]
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
        "confusion_columns": columns,
        "confusion_matrix": cm.tolist(),
        "out_of_scope": int(np.sum(pred == len(classes))) if in_scope is not None else None,
    }


def roc_curve(y_is_positive, score) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y_is_positive).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    thr = np.unique(s)[::-1]
    tpr = np.array([0.0] + [float(np.mean(s[y] >= t)) if y.any() else 0.0 for t in thr])
    fpr = np.array([0.0] + [float(np.mean(s[~y] >= t)) if (~y).any() else 0.0 for t in thr])
    return fpr, tpr


def threshold_for_sensitivity(y_is_positive, score, target: float, in_scope=None) -> float:
    """The decision threshold for a target sensitivity on these data.

    Among thresholds whose sensitivity is at least ``target``, take those with the best specificity,
    and of these the one with the best sensitivity (a perfectly separating model keeps all its
    positives). The threshold lies halfway between the lowest positive score kept and the next lower
    score, so that a difference in the last float bits between backends (PyTorch, ONNX Runtime,
    TensorRT) cannot flip a decision on the data it was chosen on.

    With ``in_scope``, slices out of scope are never called positive and count as missed positives
    (docs/architecture.md rule 7): the threshold is chosen on the slices in scope so that the
    sensitivity over *all* positives reaches ``target`` where it can (see :func:`reachable_sensitivity`),
    and keeps every positive in scope where it cannot.
    """
    y = np.asarray(y_is_positive).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if not 0 < target <= 1:
        raise ValueError("target sensitivity must be in (0, 1]")
    if in_scope is not None:
        keep = np.asarray(in_scope, dtype=bool)
        reach = reachable_sensitivity(y, keep)
        if reach == 0.0:
            return 0.5
        target = min(1.0, target / reach)
        y, s = y[keep], s[keep]
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


def reachable_sensitivity(y_is_positive, in_scope) -> float:
    """The highest sensitivity any threshold can give when out-of-scope positives count as missed."""
    y = np.asarray(y_is_positive).astype(bool)
    n = int(y.sum())
    return 1.0 if n == 0 else float((y & np.asarray(in_scope, dtype=bool)).sum() / n)


def format_report(report: dict, title: str = "") -> str:
    """A short table for people."""
    lines = [title] if title else []
    keys = ("n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "threshold")
    for k in keys:
        v = report[k]
        lines.append(f"  {k:<12} {v:.4f}" if isinstance(v, float) else f"  {k:<12} {v}")
    classes = report["classes"]
    columns = report.get("confusion_columns", classes)
    width = max(8, *(len(c) for c in columns)) + 2
    lines.append("  confusion (rows true, columns predicted):")
    lines.append("  " + " " * width + "".join(f"{c:>{width}}" for c in columns))
    for c, row in zip(classes, report["confusion_matrix"]):
        lines.append("  " + f"{c:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
