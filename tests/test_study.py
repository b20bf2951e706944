"""The study: rule, pipeline, planes, SR and Secondary Capture round trips, the command."""

import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from edgekidney.cli import app
from edgekidney.data.series import read_series
from edgekidney.errors import InputError
from edgekidney.data.synthetic_series import SeriesSynthConfig, write_series
from edgekidney.study import StudyRule, analyze, analyze_series, analyze_study, choose_rule, decide, write_sc, write_sr
from edgekidney.study.analyze import classify_stream
from edgekidney.study.planes import CoronalReformat
from edgekidney.study.rule import runs_above, run_score

from study_fixtures import Oracle, volumes_or_skip
from edgekidney.data.preprocess import NO_BODY_REASON

runner = CliRunner()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Three synthetic series: stones spanning 2 and 3 slices; one spanning 1 slice; none."""
    root = tmp_path_factory.mktemp("synth_study")
    two = write_series(root / "two", SeriesSynthConfig(slices=30, size=96, stones=2, seed=11, patient=1))
    one = write_series(root / "one", SeriesSynthConfig(slices=30, size=96, stones=1, stone_spans=(1,), seed=12,
                                                       patient=2))
    none = write_series(root / "none", SeriesSynthConfig(slices=30, size=96, stones=0, seed=13, patient=3))
    (root / "notes.txt").write_text("not an image")
    return root, {"two": two, "one": one, "none": none}


def oracle_for(truth, **kw):
    return Oracle(truth.kidney_boxes, **kw)


def test_a_series_that_may_be_cut_short_says_so_and_is_not_answered_no_stone(synth):
    root, t = synth
    why = "the listener stopped while this series was arriving"
    quiet = analyze_study(oracle_for(t["none"]), [t["none"].folder], incomplete=why).series[0]
    assert quiet.decision == "not_assessable" and quiet.reason.startswith(why + "; 'no stone' would not cover")
    assert why in quiet.warnings
    stone = analyze_study(oracle_for(t["two"]), [t["two"].folder], incomplete=why).series[0]
    assert stone.decision == "stone" and stone.reason.endswith("; " + why) and why in stone.warnings
    whole = analyze_study(oracle_for(t["none"]), [t["none"].folder]).series[0]
    assert whole.decision == "no_stone" and why not in whole.warnings


# -- the rule -----------------------------------------------------------------------------------------
def test_runs_are_maximal_consecutive_in_scope_slices_above_threshold():
    p = [0.1, 0.7, 0.8, 0.2, 0.9, 0.95, 0.6, 0.1, 0.9]
    runs = runs_above(p, [True] * 9, 0.5)
    assert [(r.start, r.end, r.max_probability) for r in runs] == [(1, 2, 0.8), (4, 6, 0.95), (8, 8, 0.9)]
    scope = [True] * 9
    scope[5] = False
    assert [(r.start, r.end) for r in runs_above(p, scope, 0.5)] == [(1, 2), (4, 4), (6, 6), (8, 8)]


def test_decision_needs_min_run_consecutive_slices():
    p = [0.1, 0.9, 0.1, 0.9, 0.1]
    d = decide(p, [True] * 5, StudyRule(min_run=2), 0.5)
    assert d.decision == "no_stone" and d.supporting == [] and d.peak == 1
    d = decide(p, [True] * 5, StudyRule(min_run=1), 0.5)
    assert d.decision == "stone" and len(d.supporting) == 2
    d = decide([0.1, 0.6, 0.7, 0.1], [True] * 4, StudyRule(min_run=2, threshold=0.65), 0.5)
    assert d.decision == "no_stone" and d.threshold == 0.65


def test_out_of_scope_inside_the_judgeable_range_makes_it_not_assessable():
    p = [0.9] * 10
    # slices 0-5 out of scope (say the lung bases), 6-9 in: the range the model can judge is 6-9
    assert decide(p, [False] * 6 + [True] * 4, StudyRule(), 0.5).decision == "stone"
    patchy = [True, False, False, True, False, False, True, False, False, True]  # 6 of 10 inside the range
    d = decide(p, patchy, StudyRule(), 0.5)
    assert d.decision == "not_assessable" and "6 of the 10 slices between the first and last in-scope" in d.reason
    assert decide(p, patchy, StudyRule(max_out_of_scope_fraction=0.7), 0.5).decision == "no_stone"  # no 2 in a row
    d = decide(p, [False] * 10, StudyRule(), 0.5)
    assert d.decision == "not_assessable" and d.reason == "none of the 10 slices is within the model's scope"
    assert decide([], [], StudyRule(), 0.5).decision == "not_assessable"


def test_rule_comes_from_the_sidecar_when_present():
    class Card:
        extra = {"study_rule": {"min_run": 3, "threshold": 0.7, "unknown": 1}}

    rule = StudyRule.from_card(Card())
    assert (rule.min_run, rule.threshold, rule.source) == (3, 0.7, "sidecar")
    Card.extra = {}
    assert StudyRule.from_card(Card()) == StudyRule()


def test_choose_rule_on_validation_series():
    stone = [[0.1, 0.8, 0.85, 0.2], [0.2, 0.7, 0.9, 0.9, 0.1]]
    normal = [[0.1, 0.95, 0.1, 0.2], [0.3, 0.2, 0.1, 0.1]]  # an isolated false alarm at 0.95
    assert run_score([0.1, 0.8, 0.85, 0.2], 2) == 0.8
    rule, stats = choose_rule(stone + normal, [True, True, False, False], target_sensitivity=1.0)
    assert rule.min_run == 2 and rule.threshold == 0.8  # a run of 2 beats the single-slice alarm
    assert stats == {"sensitivity": 1.0, "specificity": 1.0, "n_series": 4}


# -- the pipeline ---------------------------------------------------------------------------------------
def test_synthetic_series_decisions_and_supporting_slices(synth):
    root, truth = synth
    for name, expected in (("two", "stone"), ("one", "no_stone"), ("none", "no_stone")):
        (res,) = analyze(oracle_for(truth[name]), [root / name])
        t = truth[name]
        assert res.decision == expected, (name, res.reason)
        assert res.n_slices == 30 and len(res.slices) == 30
        assert [s.position_mm for s in res.slices] == t.positions_mm  # feet to head, from the DICOM geometry
        positive = {s.index for s in res.slices if s.probability > 0.5}
        assert positive == {k for stone in t.stone_slices for k in stone}
        expected_ranges = sorted((min(s), max(s)) for s in t.stone_slices if len(s) >= 2)
        assert sorted((r.start, r.end) for r in res.supporting) == expected_ranges
        for r in res.supporting:
            assert r.start_mm == t.positions_mm[r.start] and r.n_slices == r.end - r.start + 1
            assert (r.start_instance, r.end_instance) == (30 - r.start, 30 - r.end)  # numbered head to feet
        assert [s.instance for s in res.slices] == list(range(30, 0, -1))  # the image numbers a viewer shows
        assert set(res.timings) >= {"decode_s", "classify_s", "total_s"}
    (res,) = analyze(oracle_for(truth["one"]), [root / "one"], rule=StudyRule(min_run=1))
    assert res.decision == "stone" and res.supporting[0].n_slices == 1
    assert res.peak.index == truth["one"].stone_slices[0][0]


def test_the_table_names_slices_by_position_and_by_the_image_number_a_viewer_shows(synth, tmp_path):
    from edgekidney.study.report import format_study

    root, truth = synth
    study = analyze_study(oracle_for(truth["two"]), [root / "two"])
    (res,) = study.series
    line = format_study(study).splitlines()[1]
    for r in res.supporting:
        assert f"{r.start}-{r.end} ({r.start_mm:.1f}..{r.end_mm:.1f} mm, images {30 - r.start}-{30 - r.end})" in line
    assert f"#{res.peak.index} (image {30 - res.peak.index}) @ " in line
    one = analyze_study(oracle_for(truth["one"]), [root / "one"], rule=StudyRule(min_run=1))
    (r,) = one.series[0].supporting
    assert f"{r.start}-{r.start} ({r.start_mm:.1f}..{r.start_mm:.1f} mm, image {30 - r.start})" in format_study(one)
    nib = pytest.importorskip("nibabel")
    v = np.full((64, 64, 4), -1000.0, np.float32)
    v[8:56, 8:56] = 40.0
    nib.save(nib.Nifti1Image(v, np.diag([3.0, 3.0, 3.0, 1.0])), str(tmp_path / "v.nii.gz"))
    (vol,) = analyze_study(Oracle([(0, 64, 0, 64)]), [tmp_path / "v.nii.gz"], rule=StudyRule(min_run=1)).series
    assert all(s.instance is None for s in vol.slices) and "image" not in format_study(analyze_study(
        Oracle([(0, 64, 0, 64)]), [tmp_path / "v.nii.gz"]))


def test_a_stone_call_can_be_made_to_need_a_dense_focus_at_its_peak(synth):
    """focus_hu: the densest HU within 10 mm of the peak, on the slices at or above the threshold; with
    min_focus_hu set, a call whose peak lies on soft tissue does not count towards a run."""
    root, truth = synth
    t = truth["two"]
    stones = {k for stone in t.stone_slices for k in stone}
    (on,) = analyze(oracle_for(t, peak="stone"), [root / "two"], rule=StudyRule(min_focus_hu=300))
    assert on.decision == "stone" and {s.index for s in on.slices if s.focus_hu is not None} == stones
    assert all(s.focus_hu >= 400 for s in on.slices if s.focus_hu is not None)  # the phantom's stones: 400-1200 HU
    (beside,) = analyze(oracle_for(t, peak="beside"), [root / "two"], rule=StudyRule(min_focus_hu=300))
    assert beside.decision == "no_stone" and beside.supporting == []
    assert beside.reason.endswith(f"{len(stones)} slice(s) without a focus of >= 300 HU at the peak not counted")
    assert all(s.focus_hu < 300 for s in beside.slices if s.focus_hu is not None)
    (off,) = analyze(oracle_for(t, peak="beside"), [root / "two"])  # the gate is off unless asked for
    assert off.decision == "stone" and "not counted" not in off.reason
    (none,) = analyze(oracle_for(t), [root / "two"], rule=StudyRule(min_focus_hu=300))  # no map: nothing to measure
    assert none.decision == "stone" and all(s.focus_hu is None for s in none.slices)


def test_a_slice_that_cannot_be_read_again_is_left_unmeasured_and_still_counts(synth):
    root, truth = synth
    ((series,), _) = read_series([root / "two"])

    def gone(index):
        raise InputError(f"slice {index}: no such file")

    series.hu_slice = gone
    res = analyze_series(oracle_for(truth["two"], peak="stone"), series, rule=StudyRule(min_focus_hu=300))
    assert res.decision == "stone" and all(s.focus_hu is None for s in res.slices)


def test_focus_is_the_densest_pixel_within_the_radius_in_millimetres():
    from edgekidney.study.analyze import focus_at

    hu = np.full((40, 40), 30.0, np.float32)
    hu[20, 27] = 900.0  # 7 px to the right of the peak
    hu[26, 20] = 500.0  # 6 px below it
    assert focus_at(hu, (20, 20), (1.0, 1.0), radius_mm=10) == 900.0
    assert focus_at(hu, (20, 20), (1.0, 2.0), radius_mm=10) == 500.0  # columns 2 mm apart: 14 mm away, out
    assert focus_at(hu, (20, 20), (1.0, 1.0), radius_mm=5) == 30.0
    assert focus_at(hu, (0, 0), (1.0, 1.0), radius_mm=3) == 30.0  # at the edge of the slice


def test_series_mostly_out_of_scope_is_not_assessable(synth):
    root, truth = synth
    patchy = [k for k in range(30) if k % 3]  # 20 of 30, spread over the whole series
    (res,) = analyze(oracle_for(truth["two"], out_of_scope=patchy), [root / "two"])
    assert res.decision == "not_assessable" and "18 of the 28 slices" in res.reason  # 0..27, 10 in scope
    assert sum(not s.in_scope for s in res.slices) == 20 and res.slices[1].label == "out_of_scope"
    # the same number out of scope, but all below the kidneys: the rest is judged
    (res,) = analyze(oracle_for(truth["two"], out_of_scope=range(5)), [root / "two"])
    assert res.decision == "stone"


def test_refused_series_get_an_answer_without_classification():
    root = volumes_or_skip()
    clf = Oracle([])
    study = analyze_study(clf, [root / "not-ct-mr.nii.gz", root / "kidneys-ct-crop.nii.gz"])
    mr, ct = study.series
    assert mr.decision == "not_assessable" and "not CT" in mr.reason and mr.slices == []
    assert ct.decision == "no_stone" and ct.n_slices == 30
    assert clf.seen == 30  # the MR volume never reached the classifier


def test_the_pipeline_holds_only_the_slices_in_flight():
    produced = consumed = peak = 0
    lock = threading.Lock()

    def source():
        nonlocal produced, peak
        for _ in range(100):
            with lock:
                produced += 1
                peak = max(peak, produced - consumed)
            yield np.zeros((8, 8), np.float32)

    class Slow:
        def predict_slices(self, slices, names):
            nonlocal consumed
            import time

            time.sleep(0.002)
            with lock:
                consumed += len(slices)
            return [type("P", (), {"probability": 0.0, "label": "Normal"})() for _ in slices]

    timings = {}
    preds = classify_stream(Slow(), source(), [str(k) for k in range(100)], batch_size=4, timings=timings)
    assert len(preds) == 100
    assert peak <= 2 * 4 + 4 + 2  # queue (2 batches) + the batch being classified + one in the producer's hand
    assert timings["classify_s"] > 0


def test_a_failing_slice_stops_the_series_with_its_error():
    def source():
        yield np.zeros((8, 8), np.float32)
        raise ValueError("broken slice 2")

    with pytest.raises(ValueError, match="broken slice 2"):
        classify_stream(Oracle([]), source(), ["a", "b"], batch_size=1)


# -- planes -------------------------------------------------------------------------------------------
def test_coronal_reformat_uses_the_real_spacing():
    # 11 axial slices 2 mm apart (0..20 mm), 10 x 12 pixels of 1 mm; a bright voxel at z=10 mm, row 4, col 6
    vol = np.zeros((11, 10, 12), np.float16)
    vol[5, 4, 6] = 1.0
    ref = CoronalReformat(vol, [2.0 * k for k in range(11)], (1.0, 1.0), origin_y=-5.0, spacing_mm=1.0)
    assert ref.rows == list(range(10)) and ref.positions == [-5.0 + r for r in range(10)]
    slices = list(ref.slices())
    img = slices[4]
    assert img.shape == (21, 12)  # 20 mm of z at 1 mm, head at the top; 12 columns
    assert np.unravel_index(np.argmax(img), img.shape) == (10, 6) and img[10, 6] == pytest.approx(1.0)
    assert img[9, 6] == pytest.approx(0.5) and img[11, 6] == pytest.approx(0.5)  # linear between 2 mm slices
    assert all(s.max() == 0 for k, s in enumerate(slices) if k != 4)


def test_coronal_plane_on_a_series_and_the_plane_mismatch(synth):
    root, truth = synth
    (res,) = analyze(oracle_for(truth["none"]), [root / "none"], plane="coronal")
    assert res.plane == "coronal" and res.acquired_plane == "axial"
    # every max(slice spacing 3 mm, pixel 3.75 mm) = 3.75 mm: each of the 96 rows
    assert res.n_slices == 96 and res.spacing_mm == 3.75
    assert res.slices[1].position_mm - res.slices[0].position_mm == pytest.approx(3.75, abs=0.01)
    assert res.slices[0].position_mm == -180.0  # ImagePositionPatient y of row 0
    assert any("plane mismatch" in w and "assumed" in w for w in res.warnings)
    (res,) = analyze(oracle_for(truth["none"], extra={"plane": "coronal"}), [root / "none"], plane="coronal")
    assert not any("plane mismatch" in w for w in res.warnings)
    (res,) = analyze(oracle_for(truth["none"], extra={"plane": "coronal"}), [root / "none"])
    assert any("trained on coronal slices, these are axial" in w for w in res.warnings)
    # a model trained on both planes (its sidecar's "planes") answers in either without a warning
    both = {"planes": ["axial", "coronal"]}
    for plane in ("axial", "coronal"):
        (res,) = analyze(oracle_for(truth["none"], extra=both), [root / "none"], plane=plane)
        assert res.plane == plane and not any("plane mismatch" in w for w in res.warnings), res.warnings
    (res,) = analyze(oracle_for(truth["none"], extra={"planes": ["axial"]}), [root / "none"], plane="coronal")
    assert any("trained on axial slices, these are coronal" in w for w in res.warnings)


# -- DICOM out ----------------------------------------------------------------------------------------
def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_sr_round_trip_references_the_supporting_instances(synth, tmp_path):
    import highdicom as hd

    root, truth = synth
    (series,), _ = read_series([root / "two"])
    clf = oracle_for(truth["two"])
    res = analyze_series(clf, series)
    assert res.decision == "stone"
    path = write_sr(res, series, tmp_path)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    src = pydicom.dcmread(series.refs[0].path, stop_before_pixels=True)
    for attr in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyID"):
        assert ds.get(attr) == src.get(attr), attr
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    items = list(_walk(ds.ContentSequence))
    codes = {(i.ConceptNameCodeSequence[0].CodeMeaning, i.ConceptCodeSequence[0].CodeMeaning)
             for i in items if i.ValueType == "CODE"}
    assert ("Renal stone", "Present") in codes
    nums = [i for i in items if i.ValueType == "NUM"]
    assert float(nums[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.9)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert f"model_sha256={'ab' * 32}" in texts and f"threshold={res.threshold:g}" in texts
    refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"]
    supporting = {k for r in res.supporting for k in range(r.start, r.end + 1)}
    by_uid = {r.sop_instance_uid: k for k, r in enumerate(series.refs)}
    assert {by_uid[u] for u in refs} == supporting  # every reference resolves to a supporting input slice
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == set(by_uid)
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()  # highdicom reads it
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.meaning == "Present" and group.finding_type.value == "386103008"
    assert {i.referenced_sop_instance_uid for i in group.source_images} == set(refs)


def test_sr_of_a_no_stone_series_says_absent(synth, tmp_path):
    root, truth = synth
    (series,), _ = read_series([root / "none"])
    res = analyze_series(oracle_for(truth["none"]), series)
    ds = pydicom.dcmread(write_sr(res, series, tmp_path))
    items = list(_walk(ds.ContentSequence))
    assert ("Renal stone", "Absent") in {(i.ConceptNameCodeSequence[0].CodeMeaning,
                                          i.ConceptCodeSequence[0].CodeMeaning) for i in items if i.ValueType == "CODE"}
    res.decision, res.reason, res.threshold = "not_assessable", "refused before any slice was weighed", None
    ds = pydicom.dcmread(write_sr(res, series, tmp_path / "refused"))
    texts = [i.TextValue for i in _walk(ds.ContentSequence) if i.ValueType == "TEXT"]
    assert not [t for t in texts if t.startswith("threshold=")]  # no "threshold=None" for a reader to puzzle over
    assert "reason=not_assessable: refused before any slice was weighed" in texts


def test_secondary_capture_of_the_peak_slice(synth, tmp_path):
    root, truth = synth
    (series,), _ = read_series([root / "two"])
    clf = oracle_for(truth["two"])
    res = analyze_series(clf, series)
    (path,) = write_sc(res, series, tmp_path, clf)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PhotometricInterpretation == "RGB"
    assert ds.PatientID == "SYNTH-S0001" and ds.StudyInstanceUID == truth["two"].study_uid
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == series.refs[res.peak.index].sop_instance_uid
    img = ds.pixel_array
    assert img.shape == (96, 96, 3)
    assert (img[48, 0] == [255, 0, 0]).all()  # the marker frame: this model has no activation map
    assert "marker only" in ds.ImageComments


def test_the_secondary_capture_of_a_stone_call_marks_where_the_map_peaks_and_wraps_its_text(synth, tmp_path):
    from edgekidney.study.sc import overlay

    root, truth = synth
    (series,), _ = read_series([root / "two"])
    clf = oracle_for(truth["two"], peak="stone")
    res = analyze_series(clf, series)
    assert res.decision == "stone" and res.peak.index in range(res.supporting[0].start, res.supporting[-1].end + 1)
    (path,) = write_sc(res, series, tmp_path, clf)
    img = pydicom.dcmread(path).pixel_array
    cyan = (img[..., 0] < 60) & (img[..., 1] > 200) & (img[..., 2] > 200)
    rows, cols = np.nonzero(cyan)
    r, c = res.peak.cam_peak
    radius = round(96 * 0.05)  # the SR's region
    assert cyan.sum() > 10 and abs(rows.mean() - r) < 1.5 and abs(cols.mean() - c) < 1.5
    assert np.hypot(rows - r, cols - c).max() <= radius + 1
    yellow = (img[..., 0] > 200) & (img[..., 1] > 200) & (img[..., 2] < 60)
    assert yellow[13:].any() and not yellow[:, 92:].any()  # the text wraps to a second line inside 96 px
    import edgekidney.study.sc as sc_module

    said = []
    original = sc_module.overlay
    sc_module.overlay = lambda *a, **k: said.append(a[2]) or original(*a, **k)
    try:
        write_sc(res, series, tmp_path / "again", clf)
    finally:
        sc_module.overlay = original
    number = series.refs[res.peak.index].instance_number  # the slice as PACS numbers it, beside our index
    assert said == [f"edgekidney stone p={res.peak.probability:.3f} slice {res.peak.index} (image {number}) "
                    f"@ {res.peak.position_mm:g} mm"]
    quiet = overlay(np.full((40, 40), 0.5, np.float32), np.full((40, 40), 0.04, np.float32), "", None, True)
    assert (quiet[20, 20] == [127, 127, 127]).all()  # a stone map under 0.05 leaves the slice as it is
    loud = overlay(np.full((40, 40), 0.5, np.float32), np.full((40, 40), 0.5, np.float32), "", None, True)
    assert loud[20, 20, 0] > 200 and loud[20, 20, 1] < 60  # from P(stone) 0.5 fully tinted


# -- the command ----------------------------------------------------------------------------------------
def test_study_command_end_to_end(tiny_onnx, synth, tmp_path):
    root, _ = synth
    out = tmp_path / "study.json"
    r = runner.invoke(app, ["study", str(tiny_onnx), str(root), str(volumes_or_skip() / "not-ct-mr.nii.gz"),
                            "--json", str(out), "--sr-out", str(tmp_path / "sr"), "--sc-out", str(tmp_path / "sc")])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["series"]) == 4
    by_n = {s["description"]: s for s in data["series"]}
    mr = by_n["not-ct-mr.nii.gz"]
    assert mr["decision"] == "not_assessable" and mr["slices"] == []
    dicom = [s for s in data["series"] if s["kind"] == "dicom"]
    for s in dicom:
        assert s["n_slices"] == 30 and s["decision"] in ("stone", "no_stone")
        assert s["series_uid"] is None and len(s["series_id"]) == 16
        assert [x["index"] for x in s["slices"]] == list(range(30))
        assert s["slices"][1]["position_mm"] - s["slices"][0]["position_mm"] == 3.0
        assert 0.0 <= s["probability"] <= 1.0 and s["model"]["sha256"]
    assert len(list((tmp_path / "sr").glob("*.sr.dcm"))) == 3
    from edgekidney.sidecar import load_card

    scs = [pydicom.dcmread(p) for p in (tmp_path / "sc").glob("*.sc.dcm")]
    assert len(scs) == 3
    has_cam = "cam" in load_card(tiny_onnx).outputs
    assert {sc.ImageComments for sc in scs} == {"activation map" if has_cam else
                                                "marker only: the model gives no activation map"}
    assert "decision" in r.stdout and "not_assessable" in r.stdout
    assert "skipped 1 file(s):" in r.stdout and "notes.txt: not a DICOM or NIfTI file" in r.stdout
    assert data["skipped"] == [{"path": str(root / "notes.txt"), "reason": "not a DICOM or NIfTI file"}]


def test_study_command_takes_the_focus_floor_into_its_rule(tiny_onnx, synth, tmp_path):
    root, _ = synth
    out = tmp_path / "study.json"
    r = runner.invoke(app, ["study", str(tiny_onnx), str(root / "two"), "--json", str(out), "--min-focus-hu", "4000"])
    assert r.exit_code == 0, r.output
    (s,) = json.loads(out.read_text())["series"]
    assert s["rule"]["min_focus_hu"] == 4000.0 and s["rule"]["source"] == "option"
    measured = [x for x in s["slices"] if x["focus_hu"] is not None]
    assert all(x["probability"] >= s["threshold"] and x["focus_hu"] < 4000 for x in measured)
    # nothing reaches 4,000 HU: no run holds a measured slice
    assert not any(run["start"] <= x["index"] <= run["end"] for run in s["supporting"] for x in measured)
    r = runner.invoke(app, ["study", str(tiny_onnx), str(root / "two"), "--min-focus-hu", "5000"])
    assert r.exit_code == 2 and "Invalid value for '--min-focus-hu'" in r.output


def test_study_command_on_the_jpeg2000_series(tiny_onnx):
    r = runner.invoke(app, ["study", str(tiny_onnx), str(volumes_or_skip() / "abdomen-jpeg2000-series"),
                            "--json", "-"])
    assert r.exit_code == 0, r.output
    (s,) = json.loads(r.stdout)["series"]
    assert s["n_slices"] == 20 and [x["position_mm"] for x in s["slices"]] == [-804.5 + 2 * k for k in range(20)]


def test_study_command_bad_input_is_one_line(tiny_onnx, tmp_path):
    (tmp_path / "x.txt").write_text("no")
    for args, fragment in (([str(tmp_path)], "no CT series found"), ([str(tmp_path / "nope")], "no such file"),
                           ([str(tmp_path), "--plane", "sagittal"], "--plane sagittal")):
        r = runner.invoke(app, ["study", str(tiny_onnx), *args])
        assert r.exit_code == 1 and "Traceback" not in r.output
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert lines[-1].startswith("error: ") and fragment in lines[-1], r.output


def _truncated_copy(root, name, tmp_path, k):
    """A copy of one synthetic series with its k-th slice (by position) cut short; the slice's file name."""
    import shutil

    from edgekidney.data.series import read_series

    shutil.copytree(root / name, tmp_path / name)
    (series,), _ = read_series(sorted((tmp_path / name).glob("*.dcm")))  # file names are not in position order
    victim = series.refs[k].path
    victim.write_bytes(victim.read_bytes()[:-4000])
    return victim


def test_a_truncated_slice_is_not_judged_and_no_stone_cannot_be_said_over_it(synth, tmp_path):
    root, truth = synth
    victim = _truncated_copy(root, "none", tmp_path, 3)
    _truncated_copy(root, "two", tmp_path, 0)  # a stone series with a hole at its first slice
    study = analyze_study(oracle_for(truth["two"]), [tmp_path])
    by_stone = {bool(r.supporting): r for r in study.series}
    broken, fine = by_stone[False], by_stone[True]
    assert broken.decision == "not_assessable" and victim.name in broken.reason and "truncated" in broken.reason
    assert "slice 3" in broken.reason and broken.n_slices == 30  # the others were read and judged
    assert [s.label for s in broken.slices].count("unreadable") == 1 and broken.slices[3].label == "unreadable"
    assert not broken.slices[3].in_scope and sum(s.probability > 0 for s in broken.slices) == 29
    # a stone found on the slices that were read is a stone: the hole is a warning, not the answer
    assert fine.decision == "stone" and fine.slices[0].label == "unreadable"
    assert any("1 slice(s) could not be read" in w for w in fine.warnings)
    stone_slices = sorted(k for span in truth["two"].stone_slices for k in span)
    assert [k for r in fine.supporting for k in range(r.start, r.end + 1)] == stone_slices


def _blanked_copy(root, name, tmp_path, ks):
    """A copy of one synthetic series with the slices at positions ``ks`` made all air (-1000 HU)."""
    import shutil

    shutil.copytree(root / name, tmp_path / name)
    (series,), _ = read_series(sorted((tmp_path / name).glob("*.dcm")))
    for k in ks:
        ds = pydicom.dcmread(series.refs[k].path)
        air = (-1000 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        ds.PixelData = np.full((ds.Rows, ds.Columns), air, ds.pixel_array.dtype).tobytes()
        ds.save_as(series.refs[k].path)
    return tmp_path / name


def test_a_blank_slice_between_judged_ones_keeps_no_stone_from_being_said(synth, tmp_path):
    """A slice with no body inside a body series is a corrupt or missing slice: blanking one slice of each
    stone broke both runs and the answer was no_stone. A blank slice beyond the judged range is not."""
    root, truth = synth
    stone_slices = [sorted(span) for span in truth["two"].stone_slices]
    cut = analyze_study(oracle_for(truth["two"]), [_blanked_copy(root, "two", tmp_path / "a",
                                                                 [span[1] for span in stone_slices])]).series[0]
    assert not cut.supporting and cut.decision == "not_assessable", cut.reason
    k = stone_slices[0][1]
    assert cut.reason.startswith(f"slice {k}, image ") and cut.reason.endswith(
        ", inside the range the model judges, could not be judged, so 'no stone' would not cover it (no 2 consecutive "
        f"slices with p >= 0.5 on the others): {NO_BODY_REASON}"[-80:])
    edge = analyze_study(oracle_for(truth["none"]), [_blanked_copy(root, "none", tmp_path / "b", [0, 29])]).series[0]
    assert [edge.slices[k].scope_reason for k in (0, 29)] == [NO_BODY_REASON] * 2
    assert edge.decision == "no_stone", edge.reason
    mid = analyze_study(oracle_for(truth["none"]), [_blanked_copy(root, "none", tmp_path / "c", [14])]).series[0]
    assert mid.decision == "not_assessable" and mid.reason.startswith("slice 14, image 16, inside the range")


def test_a_truncated_slice_outside_the_judged_range_changes_nothing(synth, tmp_path):
    root, truth = synth
    _truncated_copy(root, "none", tmp_path, 0)
    # slices 1-2 out of scope (the oracle counts the slices it is given: slice 0 never reaches it)
    beyond = analyze_study(oracle_for(truth["none"], out_of_scope=(0, 1)), [tmp_path]).series[0]
    assert [s.label for s in beyond.slices[:3]] == ["unreadable", "out_of_scope", "out_of_scope"]
    assert beyond.decision == "no_stone", beyond.reason
    # slice 1 in scope: the unreadable slice 0 is next to the judged range, where a stone may start
    beside = analyze_study(oracle_for(truth["none"]), [tmp_path]).series[0]
    assert beside.decision == "not_assessable" and "slice 0" in beside.reason


def test_preprocessing_in_the_decode_thread_gives_the_same_predictions(tiny_onnx, synth):
    from edgekidney.runtime.predict import Classifier
    from edgekidney.data.preprocess import window_hu

    root, _ = synth
    (series,), _ = read_series([root / "two"])
    with Classifier(tiny_onnx) as clf:
        pre = clf.card.preprocessing
        slices = [window_hu(h, pre.window_center, pre.window_width) for h in series.hu_slices()][:12]
        names = [str(k) for k in range(12)]
        timings = {}
        streamed = classify_stream(clf, iter(slices), names, batch_size=5, timings=timings)
        direct = clf.predict_slices(slices, names)
    assert [p.probability for p in streamed] == pytest.approx([p.probability for p in direct], abs=1e-5)
    assert [p.label for p in streamed] == [p.label for p in direct]
    assert timings["preprocess_s"] > 0  # done in the producer thread


# -- limits before allocation (docs/architecture.md rule 8) ------------------------------------------
def _hostile_jpeg2000_series(folder):
    """Two instances of one series: the shared JPEG 2000 slices (150 kB each) with Rows = Columns = 60000.
    Before the limits applied here, decoding the first asked for 6.7 GB and the coronal volume for 13.4 GB."""
    from hostile import dicom_instance_declaring

    src = sorted((volumes_or_skip() / "abdomen-jpeg2000-series").iterdir())[:2]
    folder.mkdir()
    for k, f in enumerate(src):
        (folder / f"hostile{k}.dcm").write_bytes(dicom_instance_declaring(
            f.read_bytes(), 60000, 60000, SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.{k + 1}",
            SeriesInstanceUID="1.2.826.0.1.3680043.8.498.100"))
    return folder


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_a_compressed_series_declaring_huge_slices_asks_for_no_memory(tmp_path, plane):
    from hostile import Measured

    folder = _hostile_jpeg2000_series(tmp_path / "in")
    with Measured() as m:
        with pytest.raises(InputError) as info:
            analyze_study(Oracle([]), [folder], plane=plane)
    assert str(info.value) == ("no CT series found in 2 file(s): hostile0.dcm: image declares 60000x60000 px; the "
                               "largest side allowed is 2048 px; hostile1.dcm: image declares 60000x60000 px; the "
                               "largest side allowed is 2048 px")
    assert m.seconds < 1.0 and m.peak_mb < 100, (m.seconds, m.peak_mb)


def test_a_series_with_a_slice_set_aside_is_never_answered_no_stone(synth, tmp_path):
    """A CT slice of the series that declares more than the limits is set aside; the rest is read and
    judged, but "no stone" would not cover the slice missing. A file of no series (not DICOM) or of
    another kind (a localizer, an SR) changes nothing. The JSON names no UID for a file set aside."""
    import shutil

    from hostile import dicom_instance_declaring

    root, truth = synth
    folder = tmp_path / "none"
    shutil.copytree(root / "none", folder)
    first = sorted(folder.glob("*.dcm"))[0]
    (folder / "notes.txt").write_text("not a slice")
    whole = analyze_study(oracle_for(truth["none"]), [folder])
    assert whole.series[0].decision == "no_stone" and len(whole.skipped) == 1  # the text file: not of the series
    (folder / "hostile.dcm").write_bytes(dicom_instance_declaring(first.read_bytes(), 60000, 60000,
                                                                  SOPInstanceUID="1.2.3.999"))
    study = analyze_study(oracle_for(truth["none"]), [folder])
    (res,) = study.series
    note = ("1 file(s) of this series were set aside (image declares 60000x60000 px; the largest side allowed is "
            "2048 px): the slices read are not all of it")
    assert res.decision == "not_assessable" and res.reason.startswith(note) and note in res.warnings
    assert res.n_slices == whole.series[0].n_slices
    assert [set(k) for k in study.to_dict()["skipped"]] == [{"path", "reason"}] * 2


def test_study_command_on_hostile_files_is_one_line_and_quick(tmp_path):
    import time

    from hostile import dicom_instance_declaring, nifti_declaring
    from listener_fixtures import tiny_model
    from pydicom_files import shipped_file

    model = tiny_model(tmp_path / "model")  # ONNX without torch: milliseconds to load
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "hostile.dcm").write_bytes(  # a CT slice of 128 px that says it is 60000 px
        dicom_instance_declaring(open(shipped_file("CT_small.dcm"), "rb").read(), 60000, 60000))
    nii = nifti_declaring(tmp_path / "huge.nii", (1024, 1024, 1000))  # 352 bytes asking for 2 GB
    for path, reason in ((tmp_path / "dcm", "hostile.dcm: image declares 60000x60000 px; the largest side allowed "
                                            "is 2048 px"),
                         (nii, "huge.nii: 1000 slices declare 1,048,576,000 pixels in all; a series may declare at "
                               "most 786,432,000")):
        t0 = time.perf_counter()
        r = runner.invoke(app, ["study", str(model), str(path)])
        assert time.perf_counter() - t0 < 5.0
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert lines == [f"error: no CT series found in 1 file(s): {reason}"], r.output


def test_sr_of_a_series_without_series_uid_is_valid_dicom(tmp_path):
    """The example JPEG 2000 series carries an empty SeriesInstanceUID: the SR's evidence gets a valid
    derived UID instead of the reader's internal 'no-series-uid:<folder>' key (not a UI value)."""
    import warnings

    pytest.importorskip("highdicom")
    pytest.importorskip("openjpeg")
    folder = Path(__file__).resolve().parents[1] / "examples" / "abdomen-jpeg2000-series"
    if not folder.is_dir():
        pytest.skip("no examples/ in this checkout")
    (series,), _ = read_series([folder])
    assert series.uid.startswith("no-series-uid:")
    res = analyze_series(Oracle([(0, 10, 0, 10)]), series)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns on an invalid UI value
        ds = pydicom.dcmread(write_sr(res, series, tmp_path))
    uids = {se.SeriesInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence for se in s.ReferencedSeriesSequence}
    assert len(uids) == 1 and all(c in "0123456789." for c in uids.pop())


def test_keep_identifiers_names_the_series_and_each_slice_file(synth):
    import pydicom

    root, truth = synth
    kept = analyze_study(oracle_for(truth["none"]), [root / "none"], keep_identifiers=True).series[0]
    assert kept.series_uid == truth["none"].series_uid
    files = [Path(s.source) for s in kept.slices]
    assert sorted(files) == sorted((root / "none").glob("*.dcm"))  # every file once (their names are shuffled)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z) and [round(v, 3) for v in z] == [s.position_mm for s in kept.slices]  # each file at its slice
    hidden = analyze_study(oracle_for(truth["none"]), [root / "none"]).series[0]
    assert hidden.series_uid is None and all(s.source is None for s in hidden.slices)
    assert str(root) not in json.dumps(hidden.to_dict())  # no path by default


def test_a_one_slice_series_with_a_stone_is_not_answered_no_stone(synth, tmp_path):
    """min_run = 2 cannot be met by one slice: the SR must not say 'Absent' for a series holding a stone."""
    import shutil

    root, truth = synth
    (series,), _ = read_series([root / "two"])
    stone_slice = truth["two"].stone_slices[0][0]
    (tmp_path / "one").mkdir()
    shutil.copyfile(series.refs[stone_slice].path, tmp_path / "one" / "only.dcm")
    r = analyze_study(oracle_for(truth["two"]), [tmp_path / "one"]).series[0]
    assert r.n_slices == 1 and r.slices[0].probability == 0.9  # the slice itself is a confident stone
    assert r.decision == "not_assessable" and "fewer than the 2 consecutive slices" in r.reason


def test_a_volume_with_nan_voxels_is_not_classified(tmp_path):
    nib = pytest.importorskip("nibabel")
    v = np.full((48, 48, 6), -1000.0, np.float32)
    v[8:40, 8:40] = 40.0
    v[::7, ::7] = np.nan
    nib.save(nib.Nifti1Image(v, np.diag([3.0, 3.0, 3.0, 1.0])), str(tmp_path / "nan.nii.gz"))
    oracle = Oracle([(8, 40, 8, 40)])
    r = analyze_study(oracle, [tmp_path / "nan.nii.gz"]).series[0]
    assert r.decision == "not_assessable" and "NaN" in r.reason and r.slices == [] and oracle.seen == 0
