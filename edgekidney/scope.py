"""Out of scope: is a slice within what the model was trained on? (numpy only)

The detector uses the model's own pooled layer4 features (Lee et al. 2018, "A simple unified framework
for detecting out-of-distribution samples"): class means and one shared covariance fitted on the
*training* split, the score being the smallest Mahalanobis distance to a class mean. The covariance of
2048 features estimated from ~1,000 slices is singular, so it is shrunk towards a scaled identity.
The covariance is kept as its top 256 principal axes plus one variance for the rest (probabilistic
PCA), and the exported ONNX graph computes the distance itself (:mod:`edgekidney.model.heads`), so it
survives FP16, INT8 and TensorRT like the logits. The threshold comes from the *validation* split: a
quantile of its distances times a margin, stored in the sidecar.

The energy score on the logits (Liu et al. 2020, ``-logsumexp``) is computed here too, to compare the
two on the same inputs; the distance is what the product uses (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OUT_OF_SCOPE = "out_of_scope"


@dataclass
class ScopeModel:
    """A shared-covariance Gaussian per class, its covariance kept as the top ``k`` principal axes plus
    one variance for everything else (probabilistic PCA): the distance needs a (D, k) basis instead of
    a (D, D) whitening matrix, 16 MB fewer to read per slice at run time (k = 256, D = 2048)."""

    means: np.ndarray  # (C, D) class means
    basis: np.ndarray  # (D, k) principal axes of the within-class covariance
    inv_var: np.ndarray  # (k,) 1 / variance along each axis (after shrinkage)
    res_inv_var: float  # 1 / variance of the remaining D - k directions (0 when k = D)
    shrinkage: float

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N, D) pooled features -> (N,) smallest squared Mahalanobis distance to a class mean, / D."""
        f = np.asarray(features, dtype=np.float64)
        diff = f[:, None, :] - self.means[None].astype(np.float64)  # (N, C, D)
        proj = diff @ self.basis.astype(np.float64)  # (N, C, k)
        inside = (proj ** 2 * self.inv_var).sum(-1)
        rest = np.maximum((diff ** 2).sum(-1) - (proj ** 2).sum(-1), 0.0) * self.res_inv_var
        return (inside + rest).min(axis=1) / self.dim

    @classmethod
    def from_arrays(cls, arrays: dict, shrinkage: float) -> "ScopeModel":
        """The detector back from what :meth:`arrays` wrote (a checkpoint's ``scope``)."""
        return cls(np.asarray(arrays["means"]), np.asarray(arrays["basis"]), np.asarray(arrays["inv_var"]),
                   float(np.asarray(arrays["res_inv_var"]).ravel()[0]), shrinkage)

    def arrays(self) -> dict[str, np.ndarray]:
        """What the exported graph needs (float32)."""
        return {"means": self.means.astype(np.float32), "basis": self.basis.astype(np.float32),
                "inv_var": self.inv_var.astype(np.float32),
                "res_inv_var": np.asarray([self.res_inv_var], dtype=np.float32)}


def fit_scope(features: np.ndarray, labels: np.ndarray, shrinkage: float = 0.1, rank: int | None = 256) -> ScopeModel:
    """Class means and a shared, shrunk covariance of training features, kept to ``rank`` axes."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise ValueError("fit_scope needs (N, D) features and N labels, N >= 2")
    if not 0 < shrinkage <= 1:
        raise ValueError("shrinkage must be in (0, 1]")
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    resid = f - means[np.searchsorted(classes, y)]
    dim = f.shape[1]
    cov = resid.T @ resid / len(f)
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / dim + 1e-12) * np.eye(dim)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]  # largest first
    evals = np.maximum(evals, evals[0] * 1e-9)
    k = dim if rank is None else max(1, min(int(rank), dim))
    res_inv = 0.0 if k == dim else float(1.0 / evals[k:].mean())
    return ScopeModel(means=means, basis=evecs[:, :k].copy(), inv_var=1.0 / evals[:k], res_inv_var=res_inv,
                      shrinkage=shrinkage)


def choose_threshold(val_distances: np.ndarray, quantile: float = 0.99, margin: float = 1.0) -> float:
    """Validation distances (in-distribution slices) -> the threshold above which a slice is out of scope."""
    d = np.asarray(val_distances, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("no finite validation distances to set the scope threshold on")
    if not 0 < quantile <= 1 or margin < 1:
        raise ValueError("quantile must be in (0, 1] and margin >= 1")
    return float(np.quantile(d, quantile) * margin)


def energy(logits: np.ndarray) -> np.ndarray:
    """Energy score -logsumexp(logits): higher = less like the training data."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


def separation_auc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling out-of-scope from in-scope inputs by a score (higher = more out of scope)."""
    from edgekidney.metrics import roc_auc

    s = np.concatenate([np.asarray(in_scores, float), np.asarray(out_scores, float)])
    y = np.concatenate([np.zeros(len(in_scores), bool), np.ones(len(out_scores), bool)])
    return roc_auc(y, s)
