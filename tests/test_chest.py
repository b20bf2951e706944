"""Chest, head and leg slices: lungs, a skull or a body in two parts measured in HU put a slice out of
scope whatever the network says, and a chest series is not answered "no stone" (edgekidney.data.anatomy,
docs/scope.md "Chest slices")."""

from pathlib import Path

import numpy as np
import pytest

from edgekidney.data.series import read_series
from edgekidney.data.synthetic_series import SeriesSynthConfig, write_series
from edgekidney.study import analyze_study
from edgekidney.data.anatomy import (CHEST_LUNG_SHARE, HEAD_SKULL_SHARE, LEGS_SPLIT_SHARE, chest_reason, head_reason,
                                     legs_reason, lung_share, measure, skull_share, split_share)

from phantoms import write_head_ct
from study_fixtures import Oracle

REPO = Path(__file__).resolve().parents[1]
EXAM = REPO / "examples" / "abdomen-ct.nii.gz"


class CallsEverythingStone(Oracle):
    """The failure this guards against: a model that answers "Stone" for a chest slice."""

    def predict_slices(self, slices, names):
        out = super().predict_slices(slices, names)
        for p in out:
            p.probability, p.label = 0.9, "Stone"
        return out


def hu_slices(folder):
    (series,), _ = read_series([folder])
    return list(series.hu_slices())


def test_lung_share_tells_the_phantom_chest_from_its_abdomen(tmp_path):
    t = write_series(tmp_path / "s", SeriesSynthConfig(slices=12, size=96, stones=0, chest_slices=4, seed=3))
    shares = [lung_share(hu) for hu in hu_slices(t.folder)]
    assert all(s < 0.02 for s in shares[:8]), shares  # abdomen: no air inside the body
    assert all(0.4 < s < 0.6 for s in shares[8:]), shares  # two lungs, about half the body
    assert chest_reason(shares[0]) is None and "lung fields cover" in chest_reason(shares[-1])


def test_lung_share_counts_the_two_largest_air_regions_inside_the_body():
    hu = np.full((200, 200), -1000.0, np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    body = (yy - 100) ** 2 + (xx - 100) ** 2 <= 80 ** 2
    hu[body] = 40.0
    assert lung_share(hu) == 0.0 and lung_share(np.full((64, 64), -1000.0)) == 0.0  # no air; no body
    for r in range(30, 170, 20):  # bowel gas: 36 pockets of 5x5 px, together 4.5 % of the body
        for c in range(30, 170, 25):
            if body[r, c]:
                hu[r : r + 5, c : c + 5] = -900.0
    assert lung_share(hu) < 0.01  # only the two largest pockets count
    hu[60:140, 45:95] = -850.0  # one lung of 80 x 50 px: 20 % of the body (20,106 px)
    assert lung_share(hu) == pytest.approx((4000 + 25) / body.sum(), abs=0.01)
    assert lung_share(hu) >= CHEST_LUNG_SHARE
    hu[60:140, 45:95] = -300.0  # lung-like but denser than air (consolidation, fat): not lungs
    assert lung_share(hu) < 0.01
    with pytest.raises(ValueError, match="one 2-D slice"):
        lung_share(np.zeros((4, 4, 4)))


def test_the_thresholds_of_air_bone_and_body_and_their_shares_are_kept_exactly():
    """At each boundary: air is below LUNG_HU, bone above BONE_HU, the body above BODY_HU; a share at the
    threshold is a chest (a head); one air region is a lung, a third one is not counted."""
    from edgekidney.data.anatomy import BODY_HU, BONE_HU, LUNG_HU

    assert chest_reason(CHEST_LUNG_SHARE) is not None and chest_reason(CHEST_LUNG_SHARE - 1e-9) is None
    assert head_reason(HEAD_SKULL_SHARE) is not None and head_reason(HEAD_SKULL_SHARE - 1e-9) is None
    hu = np.full((100, 100), -1000.0, np.float32)
    hu[10:90, 10:90] = 40.0  # a body of 6,400 px
    for value, counted in ((LUNG_HU, False), (LUNG_HU - 1, True)):
        hu[20:40, 20:40] = value  # one region only: 400 px
        assert lung_share(hu) == (400 / 6400 if counted else 0.0)
    hu[20:40, 60:80] = hu[60:80, 20:40] = LUNG_HU - 1  # three equal regions: the two largest count
    assert lung_share(hu) == 800 / 6400
    hu[:] = -1000.0
    hu[10:90, 10:90] = 40.0
    for value, counted in ((BONE_HU, False), (BONE_HU + 1, True)):
        hu[40:50, 40:50] = value
        assert skull_share(hu) == (100 / 6400 if counted else 0.0)
    edge = np.full((100, 100), -1000.0, np.float32)
    edge[10:90, 10:90] = BODY_HU  # exactly at the body's level: air
    assert measure(edge) == (0.0, 0.0, 0.0)
    edge[10:90, 10:90] = BODY_HU + 1  # a body, all of it air-like (below LUNG_HU): one region, all lung
    assert measure(edge) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one 2-D slice"):
        lung_share(np.zeros((0, 5)))


def test_a_measured_slice_keeps_what_it_showed_through_views():
    from edgekidney.data.anatomy import with_anatomy

    hu = np.full((64, 64), -1000.0, np.float32)
    hu[8:56, 8:56] = 40.0
    s = with_anatomy(np.clip((hu + 160) / 400, 0, 1), hu)
    assert s.anatomy == measure(hu) and s[:, ::-1].anatomy == s.anatomy and s.copy().anatomy == s.anatomy


def test_no_slice_of_the_example_exam_is_a_chest_a_head_or_a_leg_slice():
    """A real abdomen, pelvis to liver dome: lung bases at its top, none at kidney level; no ring of
    bone encloses more than a vertebral body, the pelvis included."""
    pytest.importorskip("nibabel")
    lungs, skull, split = np.array([measure(hu) for hu in hu_slices(EXAM)]).T
    assert len(lungs) == 112 and lungs.max() < CHEST_LUNG_SHARE
    assert lungs[66:102].max() < 0.08  # the kidneys' slices (docs/scope.md, "A whole exam")
    assert lungs[-1] == lungs.max() > 0.1  # the lung bases at the liver dome
    assert 0.005 < skull.max() < 0.05 and skull.max() < HEAD_SKULL_SHARE / 10
    assert split.max() == 0.0  # the body in one part from the pelvis up


def test_skull_share_is_what_one_ring_of_bone_encloses():
    from phantoms import head_ct_hu

    head = head_ct_hu(size=128, radius=50, skull=6)
    assert skull_share(head) > 0.95 and lung_share(head) == 0.0 and measure(head) == (0.0, skull_share(head), 0.0)
    assert "a ring of bone encloses" in head_reason(skull_share(head)) and head_reason(HEAD_SKULL_SHARE - 0.01) is None
    broken = head.copy()
    broken[60:68, :30] = 35.0  # the ring cut open on one side: it encloses nothing, only the bone counts
    assert 0.15 < skull_share(broken) < 0.25 and head_reason(skull_share(broken)) is None
    assert skull_share(np.full((32, 32), -1000.0)) == 0.0 and measure(np.full((32, 32), -1000.0)) == (0.0, 0.0, 0.0)
    body = np.full((100, 100), -1000.0, np.float32)
    body[10:90, 10:90] = 40.0
    assert skull_share(body) == 0.0  # no bone at all
    body[40:50, 40:50] = 700.0  # a solid bone (a vertebral body): what it covers, 1.6 % of the body
    assert skull_share(body) == pytest.approx(100 / 6400)


def test_split_share_is_the_smaller_of_the_two_largest_parts_of_the_body():
    hu = np.full((120, 160), -1000.0, np.float32)
    hu[20:100, 10:70] = 40.0  # one thigh: 4,800 px
    assert split_share(hu) == 0.0 and legs_reason(split_share(hu)) is None  # one part
    hu[20:100, 90:150] = 40.0  # the other, as large
    assert split_share(hu) == 0.5 and "two separate parts of like size" in legs_reason(0.5)
    hu[20:100, 90:150] = -1000.0
    hu[40:100, 90:130] = 40.0  # 2,400 px beside 4,800: a third of both
    assert split_share(hu) == pytest.approx(1 / 3) and legs_reason(split_share(hu)) is not None
    hu[110:118, 140:150] = 40.0  # a third, smaller part (a cable, a hand) does not count
    assert split_share(hu) == pytest.approx(1 / 3)
    trunk = np.full((200, 200), -1000.0, np.float32)
    trunk[40:160, 30:150] = 40.0  # a trunk of 14,400 px and an arm beside it of 1,200
    trunk[80:120, 165:195] = 40.0
    assert split_share(trunk) == pytest.approx(1200 / 15600) and legs_reason(split_share(trunk)) is None
    assert measure(trunk)[2] == split_share(trunk) and split_share(np.full((32, 32), -1000.0)) == 0.0
    assert legs_reason(LEGS_SPLIT_SHARE) is not None and legs_reason(LEGS_SPLIT_SHARE - 1e-9) is None
    trunk[80:120, 165:195] = -1000.0
    trunk[170:174, 20:180] = 40.0  # the table under the patient, 4 px thick: opened away, not a part
    assert split_share(trunk) == 0.0


def test_a_slice_is_a_head_before_legs_and_legs_before_a_chest():
    from edgekidney.data.anatomy import is_chest, region

    cases = {(0.1, 0.0, 0.0): None, (0.3, 0.0, 0.0): "chest", (0.1, 0.6, 0.0): "head", (0.1, 0.0, 0.4): "legs",
             (0.3, 0.6, 0.4): "head", (0.3, 0.0, 0.4): "legs", (0.19, 0.49, 0.29): None}
    assert {shares: region(shares) for shares in cases} == cases
    assert [is_chest(shares) for shares in cases] == [kind == "chest" for kind in cases.values()]
    assert region(None) is None


def test_leg_slices_below_an_abdomen_are_out_of_scope_and_leave_its_answer_alone(tmp_path):
    cfg = dict(slices=30, size=96, leg_slices=6, seed=8)
    stone = write_series(tmp_path / "stone", SeriesSynthConfig(stones=1, stone_spans=(2,), **cfg))
    r = analyze_study(CallsEverythingStone(stone.kidney_boxes), [stone.folder]).series[0]
    assert [s.in_scope for s in r.slices] == [False] * 6 + [True] * 24
    for s in r.slices[:6]:
        assert s.label == "out_of_scope" and s.split_share == 0.5 and s.scope_reason == legs_reason(0.5)
    assert all(s.split_share == 0.0 for s in r.slices[6:])
    assert r.decision == "stone" and [(s.start, s.end) for s in r.supporting] == [(6, 29)]  # never into the legs
    legs = write_series(tmp_path / "legs", SeriesSynthConfig(slices=8, size=96, stones=0, leg_slices=8, seed=8))
    r = analyze_study(CallsEverythingStone(legs.kidney_boxes), [legs.folder]).series[0]
    assert r.decision == "not_assessable" and r.reason == "none of the 8 slices is within the model's scope"
    assert "most slices (8 of 8) lie outside what the model was trained on (8 for two legs)" in r.warnings[-1]


def test_a_chest_series_is_out_of_scope_even_where_the_model_calls_every_slice_stone(tmp_path):
    t = write_series(tmp_path / "chest", SeriesSynthConfig(slices=10, size=96, stones=0, chest_slices=10, seed=5))
    r = analyze_study(CallsEverythingStone(t.kidney_boxes), [t.folder]).series[0]
    assert r.decision == "not_assessable" and r.reason == "none of the 10 slices is within the model's scope"
    assert r.supporting == [] and r.peak is None
    for s in r.slices:
        assert s.label == "out_of_scope" and not s.in_scope and s.lung_share > 0.4
        assert s.scope_reason.startswith("lung fields cover") and s.scope_reason.endswith("kidney-level slices")
    assert "most slices (10 of 10) lie outside what the model was trained on (10 for their lung fields)" in r.warnings[-1]


def test_a_chest_scan_over_the_upper_abdomen_is_not_answered_no_stone(tmp_path):
    t = write_series(tmp_path / "s", SeriesSynthConfig(slices=30, size=96, stones=0, chest_slices=18, seed=6))
    r = analyze_study(Oracle(t.kidney_boxes), [t.folder]).series[0]
    assert [s.in_scope for s in r.slices] == [True] * 12 + [False] * 18
    assert r.decision == "not_assessable"
    assert r.reason.startswith("a chest series: 18 slices show lung fields and only 12 lie within the model's scope")
    refused = analyze_study(Oracle(t.kidney_boxes, out_of_scope={29}), [t.folder]).series[0]
    assert refused.slices[29].scope_reason is None  # the model's own refusal keeps its (here: no) reason ...
    assert refused.slices[28].scope_reason.startswith("lung fields cover")
    assert refused.reason == r.reason  # ... and still counts as a chest slice


def test_a_chest_series_that_does_not_say_its_orientation_is_not_measured(tmp_path):
    """Without ImageOrientationPatient the plane is only assumed axial; a coronal slice shows lungs too."""
    import pydicom

    t = write_series(tmp_path / "chest", SeriesSynthConfig(slices=10, size=96, stones=0, chest_slices=10, seed=5))
    for f in Path(t.folder).glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.ImageOrientationPatient
        ds.save_as(f)
    r = analyze_study(CallsEverythingStone(t.kidney_boxes), [t.folder]).series[0]
    assert r.plane == "axial" and all(s.in_scope and s.lung_share is None for s in r.slices)
    assert r.decision == "stone"  # the model alone answers, as for any unmeasured series


def test_chest_slices_above_an_abdomen_leave_its_answer_alone(tmp_path):
    cfg = dict(slices=40, size=96, chest_slices=8, seed=7)
    stone = write_series(tmp_path / "stone", SeriesSynthConfig(stones=1, stone_spans=(2,), **cfg))
    quiet = write_series(tmp_path / "quiet", SeriesSynthConfig(stones=0, **cfg))
    r = analyze_study(CallsEverythingStone(stone.kidney_boxes), [stone.folder]).series[0]
    assert r.decision == "stone" and [(s.start, s.end) for s in r.supporting] == [(0, 31)]  # never into the chest
    r = analyze_study(Oracle(stone.kidney_boxes), [stone.folder]).series[0]
    assert r.decision == "stone" and [(s.start, s.end) for s in r.supporting] == [tuple(stone.stone_slices[0])]
    r = analyze_study(Oracle(quiet.kidney_boxes), [quiet.folder]).series[0]
    assert r.decision == "no_stone" and sum(not s.in_scope for s in r.slices) == 8
    assert not any(w.startswith("most slices") for w in r.warnings)


def test_a_head_series_is_out_of_scope_even_where_the_model_calls_every_slice_stone(tmp_path):
    import pydicom

    for k in range(6):
        f = write_head_ct(tmp_path / "head" / f"IM{k}.dcm", instance=k + 1, size=128, radius=50, skull=6, seed=k)
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 5.0 * k]
        ds.save_as(f)
    r = analyze_study(CallsEverythingStone([(0, 128, 0, 128)]), [tmp_path / "head"]).series[0]
    assert r.decision == "not_assessable" and r.reason == "none of the 6 slices is within the model's scope"
    for s in r.slices:
        assert not s.in_scope and s.skull_share > 0.95 and s.lung_share == 0.0
        assert s.scope_reason.startswith("a ring of bone encloses") and "a head slice" in s.scope_reason
    assert "(6 for a skull)" in r.warnings[-1]


# -- one DICOM slice (infer, serve): measured where its orientation says axial ----------------------------
def _slice_dicom(hu, orientation):
    """A CT DICOM slice (bytes) of ``hu``; ``orientation``: ImageOrientationPatient, None (absent) or
    "text" (a letter where a number belongs)."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = hu.shape
    ds.RescaleSlope, ds.RescaleIntercept, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, -1024, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.clip(np.rint(hu + 1024), 0, 65535).astype(np.uint16).tobytes()
    if orientation is None:
        del ds.ImageOrientationPatient
    else:
        ds.ImageOrientationPatient = AXIAL if orientation == "text" else orientation
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    return data.replace(b"0.0\\1.0\\0.0", b"0.0\\x.0\\0.0") if orientation == "text" else data


def _chest_hu(tmp_path):
    t = write_series(tmp_path / "c", SeriesSynthConfig(slices=2, size=96, stones=0, chest_slices=2, seed=9))
    return hu_slices(t.folder)[0]


AXIAL, CORONAL = [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1]


def test_one_axial_dicom_slice_carries_what_its_hu_showed_into_its_geometry(tmp_path):
    from edgekidney.data.decode import decode_slice
    from edgekidney.data.preprocess import Preprocessing, preprocess_with_geometry

    cfg = Preprocessing(image_size=64)
    chest = _chest_hu(tmp_path)
    gray = decode_slice(_slice_dicom(chest, AXIAL), "c.dcm", cfg)
    assert gray.anatomy == pytest.approx(measure(chest), abs=1e-6) and gray.anatomy[0] > 0.4
    _, geometry = preprocess_with_geometry(gray, cfg)
    assert geometry.anatomy == gray.anatomy
    assert geometry == preprocess_with_geometry(np.asarray(gray), cfg)[1]  # the crop is what a geometry is
    assert b"0.0\\x.0\\0.0" in _slice_dicom(chest, "text")
    for orientation in (CORONAL, None, "text"):  # the training data's coronal slices show lungs
        gray = decode_slice(_slice_dicom(chest, orientation), "c.dcm", cfg)
        assert getattr(gray, "anatomy", None) is None
        assert preprocess_with_geometry(gray, cfg)[1].anatomy is None


def test_one_slice_the_model_keeps_is_out_of_scope_for_its_lungs_or_skull():
    from types import SimpleNamespace

    from edgekidney.runtime.predict import decide_outputs, scope_of

    card = SimpleNamespace(scope_threshold=2.0, preprocessing=SimpleNamespace(body_crop=True),
                           classes=["Normal", "Stone"], positive_index=1)

    def geo(anatomy):
        return SimpleNamespace(body_found=True, anatomy=anatomy)

    shares = [None, (0.05, 0.02, 0.1), (0.45, 0.0, 0.0), (0.0, 0.9, 0.0), (0.45, 0.0, 0.0), (0.45, 0.9, 0.5),
              (0.0, 0.05, 0.5), (0.45, 0.0, 0.4)]
    d = np.array([0.5, 0.5, 0.5, 0.5, 3.0, 0.5, 0.5, 0.5])
    inside, reasons = scope_of(card, d, [geo(a) for a in shares])
    assert inside.tolist() == [True, True, False, False, False, False, False, False]
    assert reasons[:2] == [None, None]
    assert reasons[2] == chest_reason(0.45) and reasons[3] == head_reason(0.9)
    assert reasons[4].startswith("unlike the training slices")  # the model's own reason comes first
    assert reasons[5] == head_reason(0.9)  # a head before legs or a chest
    assert reasons[6] == legs_reason(0.5) and reasons[7] == legs_reason(0.4)  # legs before a chest
    r = decide_outputs(card, 0.5, {"logits": np.array([[0.0, 3.0]] * 8, np.float32), "scope_distance": d},
                       [geo(a) for a in shares])
    assert r.labels == ["Stone", "Stone"] + ["out_of_scope"] * 6
    preds = r.predictions([f"s{k}" for k in range(8)], card, 0.5)  # infer's JSON and the listener's fallback
    assert [(p.lung_share, p.skull_share, p.split_share) for p in preds] == [(None, None, None), *[
        tuple(round(v, 3) for v in a) for a in shares[1:]]]
    assert "lung_share" in preds[0].to_dict() and preds[2].to_dict()["scope_reason"] == chest_reason(0.45)


def test_a_series_of_slices_under_the_minimum_size_is_refused_as_one_slice_is(tmp_path):
    nib = pytest.importorskip("nibabel")
    v = np.full((31, 40, 6), -1000.0, np.float32)
    v[4:27, 4:36] = 40.0
    nib.save(nib.Nifti1Image(v, np.diag([3.0, 3.0, 3.0, 1.0])), str(tmp_path / "small.nii.gz"))
    oracle = CallsEverythingStone([(0, 40, 0, 40)])
    r = analyze_study(oracle, [tmp_path / "small.nii.gz"]).series[0]
    assert r.decision == "not_assessable" and oracle.seen == 0
    assert r.reason.startswith("slices are ") and r.reason.endswith("px, smaller than the 32 px minimum")


def test_a_share_shown_at_a_threshold_is_at_or_above_it():
    from edgekidney.study.analyze import SliceRecord, mark_anatomy_out_of_scope

    records = [SliceRecord(k, float(k), 0.1, "Normal") for k in range(5)]
    kinds = mark_anatomy_out_of_scope(records, [(0.19999, 0.0, 0.29999), (0.2, 0.49999, 0.0), (0.0, 0.5, 0.0),
                                                (0.0, 0.0, 0.3), None])
    assert [r.lung_share for r in records] == [0.199, 0.2, 0.0, 0.0, None] and records[1].skull_share == 0.499
    assert records[0].split_share == 0.299 and records[3].split_share == 0.3
    assert [r.in_scope for r in records] == [True, False, False, False, True]
    assert kinds == [None, "chest", "head", "legs", None] and records[2].scope_reason.startswith("a ring of bone")
    assert records[3].scope_reason == legs_reason(0.3) and records[4].scope_reason is None
