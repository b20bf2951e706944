import numpy as np
import pytest

from edgekidney.metrics import (classification_report, confusion_matrix, decide, roc_auc, softmax,
                                threshold_for_sensitivity)


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_report_counts_and_rates():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    p_stone = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95, 0.05])
    probs = np.stack([1 - p_stone, p_stone], 1)
    r = classification_report(y, probs, ["Normal", "Stone"], 1, 0.5)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (4, 1, 1, 4)
    assert r["sensitivity"] == 0.8 and r["specificity"] == 0.8 and r["accuracy"] == 0.8
    assert r["precision"] == 0.8 and r["f1"] == pytest.approx(0.8)
    assert r["confusion_matrix"] == [[4, 1], [1, 4]]


def test_threshold_for_sensitivity_maximises_specificity_then_sensitivity():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500).astype(bool)
    s = rng.random(500) * 0.5 + 0.4 * y
    for target in (0.8, 0.9, 0.95, 1.0):
        t = threshold_for_sensitivity(y, s, target)
        sens, spec = np.mean(s[y] >= t), np.mean(s[~y] < t)
        assert sens >= target
        for c in np.unique(s):  # brute force over every possible threshold
            c_sens, c_spec = np.mean(s[y] >= c), np.mean(s[~y] < c)
            if c_sens >= target:
                assert c_spec < spec or (c_spec == spec and c_sens <= sens)
        assert not np.any(np.isclose(s, t, atol=1e-9))  # never exactly on a score


def test_separable_scores_keep_every_positive():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    t = threshold_for_sensitivity(y, s, 0.5)
    assert 0.3 < t < 0.6  # all positives kept, no negative admitted


def test_decide_uses_threshold_for_positive_and_argmax_otherwise():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    assert decide(probs, positive=2, threshold=0.25).tolist() == [0, 2, 2]
    assert decide(probs, positive=2, threshold=0.8).tolist() == [0, 1, 1]


def test_softmax_and_confusion_matrix():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.25, 0.75]], atol=1e-6)
    assert confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]


def test_threshold_counts_out_of_scope_positives_as_missed():
    from edgekidney.metrics import reachable_sensitivity

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.6, 0.99, 0.7, 0.3, 0.2, 0.1])
    scope = np.array([True, True, True, False, True, True, True, True])  # the surest positive is out of scope
    assert reachable_sensitivity(y, scope) == 0.75
    # target 0.75 over all positives = every positive in scope: the threshold must keep 0.6
    t = threshold_for_sensitivity(y, s, 0.75, scope)
    assert 0.3 < t <= 0.6
    # without the scope the out-of-scope 0.99 would have counted as found and 0.6 could be dropped
    assert threshold_for_sensitivity(y, s, 0.75) > 0.6
    # an unreachable target keeps every positive in scope rather than failing
    assert threshold_for_sensitivity(y, s, 1.0, scope) == t
    assert reachable_sensitivity(y, np.zeros(8, bool)) == 0.0 and threshold_for_sensitivity(y, s, 0.9, np.zeros(8, bool)) == 0.5
