"""edgekidney.scope on its own: the fit, the low-rank distance, the threshold, energy and AUROC (numpy only).

These pin down the numbers the out-of-scope decision rests on, each against an independent computation,
so that a change in any of them turns the default run red (see docs/mutation.md).
"""

import numpy as np
import pytest

from edgekidney.scope import ScopeModel, choose_threshold, energy, fit_scope, separation_auc


def _data(seed=0, n=300, dim=6, classes=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    y = rng.choice(np.asarray(classes), n)
    means = {c: rng.normal(0, 4, dim) for c in classes}
    f = np.stack([means[c] for c in y]) + rng.normal(0, 1, (n, dim)) * np.linspace(0.5, 2.5, dim)
    return f, y


def _cov(f, y, shrinkage):
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(0) for c in classes])
    resid = f - means[np.searchsorted(classes, y)]
    cov = resid.T @ resid / len(f)
    dim = f.shape[1]
    return means, (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)


def test_fit_keeps_class_means_in_label_order_and_the_shrunk_covariance():
    f, y = _data(classes=(7, 3, 5))  # labels that are neither 0.. nor sorted
    sm = fit_scope(f, y, shrinkage=0.3, rank=None)
    means, cov = _cov(f, y, 0.3)
    np.testing.assert_allclose(sm.means, means)
    assert sm.dim == 6 and sm.shrinkage == 0.3 and sm.res_inv_var == 0.0 and sm.basis.shape == (6, 6)
    # basis and inverse variances rebuild the inverse covariance; the largest variance comes first
    np.testing.assert_allclose(sm.basis @ np.diag(sm.inv_var) @ sm.basis.T, np.linalg.inv(cov), rtol=1e-8, atol=1e-12)
    assert np.all(np.diff(sm.inv_var) >= 0)
    probe = np.random.default_rng(1).normal(0, 5, (7, 6))
    inv = np.linalg.inv(cov)
    expected = np.min([[(p - m) @ inv @ (p - m) for m in means] for p in probe], axis=1) / 6
    np.testing.assert_allclose(sm.distance(probe), expected, rtol=1e-9)
    np.testing.assert_allclose(sm.distance(means), 0.0, atol=1e-12)  # a class mean is at distance 0


def test_low_rank_distance_is_probabilistic_pca():
    f, y = _data(seed=2)
    sm = fit_scope(f, y, shrinkage=0.1, rank=2)
    means, cov = _cov(f, y, 0.1)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    assert sm.basis.shape == (6, 2) and sm.res_inv_var == pytest.approx(1 / evals[2:].mean())
    np.testing.assert_allclose(sm.inv_var, 1 / evals[:2])
    probe = np.random.default_rng(3).normal(0, 5, (5, 6))
    d = []
    for p in probe:
        per_class = []
        for m in means:
            diff = p - m
            proj = diff @ evecs[:, :2]
            per_class.append((proj ** 2 / evals[:2]).sum() + (diff @ diff - proj @ proj) / evals[2:].mean())
        d.append(min(per_class) / 6)
    np.testing.assert_allclose(sm.distance(probe), d, rtol=1e-9)
    np.testing.assert_allclose(sm.distance(means), 0.0, atol=1e-12)  # no residual: nothing added for it
    assert fit_scope(f, y, rank=100).basis.shape == (6, 6) and fit_scope(f, y, rank=0).basis.shape == (6, 1)


def test_the_default_rank_is_256_axes():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(24, 258))
    sm = fit_scope(f, np.arange(24) % 2)
    assert sm.basis.shape == (258, 256) and sm.res_inv_var > 0


def test_float32_features_are_fitted_in_float64():
    f, y = _data(seed=5)
    f32 = f.astype(np.float32)
    sm = fit_scope(f32, y, shrinkage=0.2, rank=None)
    means, cov = _cov(f32.astype(np.float64), y, 0.2)
    np.testing.assert_allclose(sm.means, means, rtol=1e-13)
    np.testing.assert_allclose(sm.basis @ np.diag(sm.inv_var) @ sm.basis.T, np.linalg.inv(cov), rtol=1e-9, atol=1e-13)


def test_a_degenerate_covariance_still_gives_finite_distances():
    f = np.zeros((10, 4))
    f[:, 0] = np.arange(10)  # only one direction varies
    y = np.array([0, 1] * 5)
    sm = fit_scope(f, y, shrinkage=1e-9, rank=None)
    assert np.all(np.isfinite(sm.inv_var)) and sm.inv_var.max() <= sm.inv_var.min() * 1e9 * (1 + 1e-6)
    assert np.all(np.isfinite(sm.distance(np.ones((2, 4)))))
    flat = fit_scope(np.zeros((6, 3)), np.array([0, 1] * 3))  # no variance at all: still a proper distance
    assert np.all(flat.inv_var > 0) and np.all(flat.distance(np.ones((2, 3))) > 0)


def test_arrays_are_what_the_graph_reads():
    f, y = _data()
    sm = fit_scope(f, y, rank=3)
    a = sm.arrays()
    assert set(a) == {"means", "basis", "inv_var", "res_inv_var"} and all(v.dtype == np.float32 for v in a.values())
    assert a["means"].shape == (3, 6) and a["basis"].shape == (6, 3) and a["inv_var"].shape == (3,)
    assert a["res_inv_var"].shape == (1,) and a["res_inv_var"][0] == np.float32(sm.res_inv_var)
    back = ScopeModel(a["means"], a["basis"], a["inv_var"], float(a["res_inv_var"][0]), 0.1)
    np.testing.assert_allclose(back.distance(f[:5]), sm.distance(f[:5]), rtol=1e-4)


def test_the_detector_comes_back_from_a_checkpoints_arrays():
    """refit reads the scope a checkpoint stored (``arrays()`` plus its shrinkage) with from_arrays."""
    f, y = _data(seed=4)
    sm = fit_scope(f, y, rank=4, shrinkage=0.3)
    back = ScopeModel.from_arrays(dict(sm.arrays(), shrinkage=np.float32(0.3)), 0.3)
    for name in ("means", "basis", "inv_var"):
        np.testing.assert_array_equal(getattr(back, name), sm.arrays()[name])
    assert back.res_inv_var == pytest.approx(sm.res_inv_var, rel=1e-6) and type(back.res_inv_var) is float
    assert back.shrinkage == 0.3 and back.dim == 6
    np.testing.assert_allclose(back.distance(f[:20]), sm.distance(f[:20]), rtol=1e-5)
    lists = ScopeModel.from_arrays({k: v.tolist() for k, v in sm.arrays().items()}, 0.3)  # a JSON round trip
    np.testing.assert_allclose(lists.distance(f[:20]), sm.distance(f[:20]), rtol=1e-5)


@pytest.mark.parametrize("features,labels,kw,message", [
    (np.zeros(5), np.zeros(5), {}, "fit_scope needs (N, D) features and N labels, N >= 2"),
    (np.zeros((5, 2)), np.zeros(4), {}, "fit_scope needs (N, D) features and N labels, N >= 2"),
    (np.zeros((1, 2)), np.zeros(1), {}, "fit_scope needs (N, D) features and N labels, N >= 2"),
    (np.zeros((5, 2)), np.zeros(5), {"shrinkage": 0.0}, "shrinkage must be in (0, 1]"),
    (np.zeros((5, 2)), np.zeros(5), {"shrinkage": 1.01}, "shrinkage must be in (0, 1]"),
])
def test_fit_refuses_what_it_cannot_fit(features, labels, kw, message):
    with pytest.raises(ValueError) as info:
        fit_scope(features, labels, **kw)
    assert str(info.value) == message


def test_fit_takes_two_samples_and_full_shrinkage():
    sm = fit_scope(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([0, 1]), shrinkage=1.0)
    np.testing.assert_allclose(sm.means, [[0.0, 1.0], [2.0, 3.0]])


def test_threshold_is_a_quantile_of_finite_validation_distances_times_the_margin():
    d = np.array([1.0, 2.0, 3.0, 4.0, np.nan, np.inf, -np.inf])
    assert choose_threshold(d, 0.5, 1.0) == 2.5
    assert choose_threshold(d, 1.0, 1.5) == 6.0
    assert choose_threshold(np.arange(101.0), 0.99, 1.0) == pytest.approx(99.0)
    assert choose_threshold(np.arange(101.0)) == pytest.approx(99.0)  # defaults: the 99th percentile, no margin
    for bad in ({"quantile": 0.0}, {"quantile": 1.01}, {"margin": 0.99}):
        with pytest.raises(ValueError, match="^quantile must be in \\(0, 1\\] and margin >= 1$"):
            choose_threshold(d, **{"quantile": 0.5, "margin": 1.0, **bad})
    for empty in (np.array([np.nan, np.inf]), np.array([])):
        with pytest.raises(ValueError, match="^no finite validation distances to set the scope threshold on$"):
            choose_threshold(empty)
    low = np.array([0.1, 0.2], np.float32)  # computed in float64 whatever the input's precision
    expected = 1.3 * (low[0].item() + 0.99 * (low[1].item() - low[0].item()))
    assert choose_threshold(low, 0.99, 1.3) == pytest.approx(expected, rel=1e-12)  # float32 is off by ~1e-8


def test_energy_is_minus_logsumexp_and_stable():
    z = np.array([[0.0, 0.0], [1.0, 2.0], [1000.0, 1000.0], [-1000.0, 5.0]])
    expected = [-np.log(2.0), -(2.0 + np.log(1 + np.exp(-1.0))), -(1000.0 + np.log(2.0)), -5.0]
    np.testing.assert_allclose(energy(z), expected, rtol=1e-12)
    z32 = np.array([[0.1, 0.7, 3.3]], np.float32)  # float64 arithmetic on float32 logits
    ref = -np.log(np.exp(z32.astype(np.float64)).sum())
    assert abs(energy(z32)[0] - ref) < 1e-14


def test_separation_auc_orders_out_of_scope_above_in_scope():
    assert separation_auc([1, 2, 3], [4, 5]) == 1.0
    assert separation_auc([4, 5], [1, 2, 3]) == 0.0
    assert separation_auc([1, 2], [1, 2]) == 0.5
    assert separation_auc([1.0, 3.0], [2.0]) == 0.5
