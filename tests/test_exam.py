"""The whole-exam reference (edgekidney/bench/exam.py): which bright spots count as foci, and how calls are scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekidney.bench.exam import hyperdense_foci, load_reference, score_exam

REPO = Path(__file__).resolve().parents[1]
KIDNEYS = {"right": {"slices": [4, 12], "rows": [10, 30], "cols": [5, 25]},
           "left": {"slices": [4, 12], "rows": [10, 30], "cols": [35, 55]}}


def volume() -> np.ndarray:
    """20 slices of 40x60 soft tissue (40 HU) with a stone, a rib, a bone-bound spot and a spot outside the kidneys."""
    hu = np.full((20, 40, 60), 40.0, np.float32)
    hu[7:9, 20:22, 15:17] = 1100.0  # a calculus in the right kidney: 2 slices, 8 voxels
    hu[4:12, 28, 45] = 700.0  # a rib: 8 slices long
    hu[9:12, 12:17, 40:45] = 300.0  # bone below the threshold ...
    hu[10, 14, 42] = 900.0  # ... around a spot: its shell is bone, not soft tissue
    hu[16, 20, 15] = 1200.0  # a calcification below the kidneys
    return hu


def test_only_the_calculus_in_soft_tissue_in_a_kidney_is_a_focus():
    foci = hyperdense_foci(volume(), KIDNEYS)
    assert [(f["kidney"], f["slices"], f["voxels"], f["max_hu"]) for f in foci] == [("right", [7, 8], 8, 1100.0)]
    assert (foci[0]["row"], foci[0]["col"]) == (20.5, 15.5)


def test_the_rules_are_the_ones_asked_for():
    hu = volume()
    assert len(hyperdense_foci(hu, KIDNEYS, min_hu=1150)) == 0  # the calculus is 1100 HU
    assert len(hyperdense_foci(hu, KIDNEYS, max_voxels=7)) == 0 and len(hyperdense_foci(hu, KIDNEYS, max_voxels=8)) == 1
    assert {f["kidney"] for f in hyperdense_foci(hu, KIDNEYS, max_slices=8)} == {"right", "left"}  # the rib joins
    assert len(hyperdense_foci(hu, KIDNEYS, shell_hu=400)) == 2  # the spot in bone joins


def slice_answers(calls: dict[int, tuple[int, int]], n: int = 20) -> list[dict]:
    return [{"index": i, "probability": 0.9 if i in calls else 0.1, "label": "Stone" if i in calls else "Normal",
             "cam_peak": list(calls.get(i, (0, 0)))} for i in range(n)]


def test_calls_are_located_on_a_focus_of_their_slice_or_a_neighbour_within_the_reach():
    foci = hyperdense_foci(volume(), KIDNEYS)
    # reach: 5 % of 60 px = 3 px; the focus spans slices 7-8, so 6 and 9 are neighbours
    r = score_exam(slice_answers({6: (21, 18), 9: (20, 15), 10: (20, 15), 8: (20, 19)}), foci, KIDNEYS, (40, 60))
    assert r["reach_px"] == 3.0
    assert [c["located"] for c in r["calls"]] == [True, False, True, False]  # 8: 3.5 px away; 10: two slices off
    assert (r["called_stone"], r["located"], r["foci_found"], r["foci"]) == (4, 2, 1, 1)
    assert r["calls_outside_kidneys"] == 0


def test_calls_outside_the_kidneys_slices_are_counted_and_a_missed_focus_is_not_found():
    foci = hyperdense_foci(volume(), KIDNEYS)
    r = score_exam(slice_answers({2: (20, 15), 16: (20, 15), 11: (20, 45)}), foci, KIDNEYS, (40, 60))
    assert (r["calls_outside_kidneys"], r["slices_outside_kidneys"], r["kidney_slices"]) == (2, 11, [4, 12])
    assert r["foci_found"] == 0 and r["foci_table"][0]["found"] is False


def test_the_example_reference_names_its_volume_and_both_kidneys(tmp_path):
    ref = load_reference(REPO / "benchmarks" / "reference" / "abdomen-ct.json")
    assert set(ref["kidneys"]) == {"right", "left"} and (REPO / ref["volume"]).exists()
    (tmp_path / "empty.json").write_text(json.dumps({"volume": "x"}))
    with pytest.raises(SystemExit, match="no kidney boxes"):
        load_reference(tmp_path / "empty.json")
