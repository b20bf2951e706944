"""Reading whole series and volumes: grouping, order by position, geometry checks, NIfTI, multi-frame."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edgekidney.data.geometry import DisplayTransform, display_transform, plane_of
from edgekidney.data.series import read_series
from edgekidney.data.synthetic_series import SeriesSynthConfig, write_series
from edgekidney.data.volume import not_ct_reason, read_nifti
from edgekidney.errors import InputError

from pydicom_files import shipped_file
from study_fixtures import volumes_or_skip


@pytest.fixture(scope="module")
def small_series(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_series")
    truth = write_series(out / "s", SeriesSynthConfig(slices=8, size=64, stones=0, seed=3))
    return out / "s", truth


def copy_series(src, dst):
    shutil.copytree(src, dst)
    return sorted(p for p in dst.iterdir() if p.suffix == ".dcm")


def edit(path, **attrs):
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


# -- real data ---------------------------------------------------------------------------------------
def test_jpeg2000_series_reads_20_slices_in_position_order_whatever_the_file_names(tmp_path):
    src = volumes_or_skip() / "abdomen-jpeg2000-series"
    files = sorted(src.iterdir())
    expected_z = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    rng = np.random.default_rng(0)
    for k, f in zip(rng.permutation(len(files)), files):  # names that say nothing about the order
        shutil.copy(f, tmp_path / f"x{k:03d}")
    series, skipped = read_series([tmp_path])
    assert skipped == [] and len(series) == 1
    s = series[0]
    assert len(s) == 20 and s.acquired_plane == "axial" and s.refusal is None
    assert s.positions == expected_z  # feet to head: -804.5 ... -766.5, 2 mm apart
    assert s.positions[0] == -804.5 and s.positions[-1] == -766.5
    assert np.allclose(np.diff(s.positions), 2.0)
    assert [r.instance_number for r in s.refs] == list(range(286, 266, -1))
    first = next(s.hu_slices())
    assert first.shape == (512, 512) and first.min() == -1024  # JPEG 2000 decoded, rescaled to HU
    assert s.slice_thickness == 3.0


def test_enhanced_multiframe_ct_frames_are_slices_with_their_own_positions():
    path = volumes_or_skip() / "enhanced-ct-multiframe.dcm"
    (s,), _ = read_series([path])
    assert len(s) == 2 and [r.frame_number for r in s.refs] == [1, 2]  # frame 1 at z -159, frame 2 at -149
    assert s.positions == [-159.0, -149.0]
    assert s.pixel_spacing == pytest.approx((0.388672, 0.388672))
    # ImageOrientationPatient [-1 0 0 0 1 0]: columns run to the patient's right, so they are flipped
    assert s.transform == DisplayTransform(False, False, True)
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array[0].astype(np.float32) - 1024  # shared rescale: intercept -1024
    got = next(s.hu_slices())
    np.testing.assert_array_equal(got, raw[:, ::-1])
    assert s.origin[0] == pytest.approx(99.5 - 511 * 0.388672)
    # read, but not classified: its frames are a derived perfusion map (RescaleType US), not HU
    assert s.refusal.startswith("pixel values are not Hounsfield units (RescaleType US; image type DERIVED")


def test_nifti_orientation_comes_from_the_affine():
    import nibabel as nib

    path = volumes_or_skip() / "abdomen-ct.nii.gz"
    s = read_nifti(path)
    ras = np.asanyarray(nib.load(str(path)).dataobj)  # RAS: i runs to the patient's right, j anterior
    assert s.refusal is None and len(s) == 112 and s.shape == (101, 122)
    assert s.positions[0] == pytest.approx(94.30, abs=0.01) and np.allclose(np.diff(s.positions), 3.0)
    k = 60
    got = list(s.hu_slices())[k]
    # display: rows run posterior, columns to the patient's left = RAS flipped in i and j, transposed
    np.testing.assert_array_equal(got, ras[::-1, ::-1, k].T.astype(np.float32))
    assert s.pixel_spacing == (3.0, 3.0)


def test_nifti_in_another_orientation_gives_the_same_slices(tmp_path):
    import nibabel as nib

    path = volumes_or_skip() / "kidneys-ct-crop.nii.gz"
    img = nib.load(str(path))
    flipped = img.as_reoriented(np.array([[0, -1], [1, -1], [2, -1]]))  # RAS -> LPI
    out = tmp_path / "lpi.nii.gz"
    nib.save(flipped, str(out))
    assert nib.aff2axcodes(nib.load(str(out)).affine) == ("L", "P", "I")
    a, b = read_nifti(path), read_nifti(out)
    assert a.positions == pytest.approx(b.positions)
    for x, y in zip(a.hu_slices(), b.hu_slices()):
        np.testing.assert_array_equal(x, y)


def test_mr_nifti_is_refused_as_not_ct():
    s = read_nifti(volumes_or_skip() / "not-ct-mr.nii.gz")
    assert s.refusal is not None and "not CT" in s.refusal and "air density" in s.refusal
    ct = read_nifti(volumes_or_skip() / "kidneys-ct-crop.nii.gz")
    assert ct.refusal is None


def test_not_ct_rule_on_intensities():
    rng = np.random.default_rng(0)
    body = rng.normal(40, 30, 10000)
    assert not_ct_reason(np.concatenate([body, np.full(1000, -1000.0)])) is None  # 9 % air
    assert "air density" in not_ct_reason(np.abs(body) * 10)  # MR-like: no air in HU terms
    assert "above 4000" in not_ct_reason(np.concatenate([body, np.full(1000, -1000.0), np.full(500, 30000.0)]))


# -- skipping ---------------------------------------------------------------------------------------
def test_non_ct_and_non_image_objects_are_skipped_with_reasons(tmp_path, small_series):
    folder, _ = small_series
    shutil.copytree(folder, tmp_path / "study")
    for name in ("MR_small.dcm", "rtplan.dcm"):
        shutil.copy(shipped_file(name), tmp_path / "study" / name)
    scout = tmp_path / "study" / "scout.dcm"
    shutil.copy(sorted(folder.iterdir())[0], scout)
    edit(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesInstanceUID="1.2.3.4.5",
         SOPInstanceUID="1.2.3.4.6")
    (tmp_path / "study" / "notes.txt").write_text("hello")
    series, skipped = read_series([tmp_path / "study"])
    assert len(series) == 1 and len(series[0]) == 8
    reasons = {p.split("/")[-1]: r for p, r in ((s.path, s.reason) for s in skipped)}
    assert reasons["scout.dcm"] == "localizer (scout/topogram)"
    assert reasons["notes.txt"] == "not a DICOM or NIfTI file"
    assert reasons["MR_small.dcm"] == "modality MR, not CT"
    assert reasons["rtplan.dcm"].startswith("not an image")


def test_nothing_usable_is_one_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no CT series found in 1 file"):
        read_series([tmp_path])
    with pytest.raises(InputError, match="no such file"):
        read_series([tmp_path / "missing"])


# -- geometry checks --------------------------------------------------------------------------------
def test_two_series_in_one_folder_are_grouped_apart(tmp_path):
    write_series(tmp_path / "a", SeriesSynthConfig(slices=6, size=64, stones=0, seed=1, patient=1))
    write_series(tmp_path / "b", SeriesSynthConfig(slices=9, size=64, stones=0, seed=2, patient=2))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in list((tmp_path / "a").iterdir()) + list((tmp_path / "b").iterdir()):
        f.rename(mixed / f"{f.parent.name}-{f.name}")
    series, _ = read_series([mixed])
    assert sorted(len(s) for s in series) == [6, 9]


def test_same_instance_twice_is_dropped_with_a_warning(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    shutil.copy(files[0], tmp_path / "s" / "copy.dcm")
    (s,), _ = read_series([tmp_path / "s"])
    assert len(s) == 8 and s.refusal is None
    assert any("duplicate instance" in w for w in s.warnings)


def test_two_stacks_sharing_positions_are_refused(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    shutil.copy(files[0], tmp_path / "s" / "phase2.dcm")
    edit(tmp_path / "s" / "phase2.dcm", SOPInstanceUID="1.2.3.999")
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal is not None and "share a position" in s.refusal


def test_mixed_orientations_are_refused(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    edit(files[2], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal is not None and "mixed orientations" in s.refusal


def test_uneven_spacing_and_gantry_tilt_are_warned_not_refused(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    gone = by_z[4]
    gone.unlink()  # a missing slice: a 6 mm gap among 3 mm ones
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal is None and len(s) == 7
    assert any("uneven slice spacing 3.00-6.00 mm" in w for w in s.warnings)
    for k, f in enumerate(by_z):  # shear: y grows 1 mm per 3 mm slice, about 18 degrees
        if f.exists():
            ds = pydicom.dcmread(f)
            edit(f, ImagePositionPatient=[ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + k,
                                          ds.ImagePositionPatient[2]])
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal is None and not s.allows_reformat
    assert any(w.startswith("gantry tilt 18.4 deg") for w in s.warnings)


def test_without_positions_instance_number_orders_and_says_so(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        edit(f, ImagePositionPatient=None, SliceLocation=None)
    (s,), _ = read_series([tmp_path / "s"])
    assert [r.instance_number for r in s.refs] == list(range(1, 9))
    assert "no usable ImagePositionPatient: slices ordered by InstanceNumber, positions estimated from the slice " \
           "spacing; which end is the feet is not known" in s.warnings
    assert s.orientation_known and s.acquired_plane == "axial"


def test_without_positions_slice_location_orders_feet_to_head_whatever_the_instance_numbers(tmp_path, small_series):
    """Many exports number a series from the head down; SliceLocation, where there is one, still says
    where each slice lies, so the order and the positions in mm are those ImagePositionPatient gives."""
    (whole,), _ = read_series([small_series[0]])
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        edit(f, ImagePositionPatient=None, InstanceNumber=9 - int(ds.InstanceNumber))
    (s,), _ = read_series([tmp_path / "s"])
    assert [r.sop_instance_uid for r in s.refs] == [r.sop_instance_uid for r in whole.refs]
    assert [r.instance_number for r in s.refs] == [9 - r.instance_number for r in whole.refs]  # reversed
    np.testing.assert_allclose(s.positions, whole.positions)
    assert ("no usable ImagePositionPatient: slices ordered by SliceLocation, positions in mm from it (its sign is the "
            "scanner's: most run feet to head)") in s.warnings and not s.allows_reformat
    for a, b in zip(whole.hu_slices(), s.hu_slices()):
        np.testing.assert_array_equal(a, b)
    edit(files[3], SliceLocation=str(pydicom.dcmread(files[4]).SliceLocation))  # two alike: not an order
    (s,), _ = read_series([tmp_path / "s"])
    assert [r.instance_number for r in s.refs] == list(range(1, 9)) and s.positions[0] == 0.0
    assert any("ordered by InstanceNumber" in w for w in s.warnings)


def test_without_orientation_the_plane_is_assumed_axial_and_says_so(tmp_path, small_series):
    """A series that does not say its orientation is classified as axial, but lungs and skull, which a
    coronal slice would show too, are not measured on it (docs/study.md)."""
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        edit(f, ImageOrientationPatient=None)
    (s,), _ = read_series([tmp_path / "s"])
    assert s.acquired_plane == "axial" and not s.orientation_known
    assert "no usable ImageOrientationPatient: slices ordered by ImagePositionPatient's z" in s.warnings
    assert "no usable ImageOrientationPatient: the plane is taken as axial (lungs and skull are not measured)" \
        in s.warnings


def test_display_transform_turns_any_axis_aligned_slice_to_radiological_view():
    assert plane_of([0, 0, -1]) == "axial" and plane_of([0, 1, 0]) == "coronal" and plane_of([1, 1, 1]) == "oblique"
    img = np.arange(6).reshape(2, 3)
    assert display_transform([1, 0, 0], [0, 1, 0], "axial") == DisplayTransform()
    t = display_transform([0, -1, 0], [1, 0, 0], "axial")  # columns run anterior, rows to the left
    assert t == DisplayTransform(True, True, False)
    np.testing.assert_array_equal(t.apply(img), img.T[::-1])
    assert display_transform([1, 0, 0], [0, 0, -1], "coronal") == DisplayTransform()
    assert display_transform([0.7, 0.7, 0], [-0.7, 0.7, 0], "axial") is None


@pytest.mark.parametrize("little_endian,implicit", [(True, True), (True, False), (False, False)])
def test_files_without_file_meta_decode_in_the_encoding_they_were_read_in(tmp_path, small_series, little_endian,
                                                                          implicit):
    """No preamble, no File Meta Information (an ACR-NEMA style export): the dataset's own encoding is
    its transfer syntax, and the slices are the same as the full files'."""
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        if not little_endian:  # pydicom writes the pixel bytes as they are: swap them for big endian
            ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(f, ds, implicit_vr=implicit, little_endian=little_endian, enforce_file_format=False)
    assert f.read_bytes()[128:132] != b"DICM"
    (plain,), _ = read_series([small_series[0]])
    (bare,), skipped = read_series([tmp_path / "s"])
    assert skipped == [] and bare.positions == plain.positions
    for a, b in zip(plain.hu_slices(), bare.hu_slices()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_series_decode_to_the_same_hu(tmp_path, small_series, syntax):
    import pydicom.uid

    uid = getattr(pydicom.uid, syntax)
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        try:
            ds.compress(uid)
        except (RuntimeError, ImportError) as exc:  # no encoder here: nothing to test with
            pytest.skip(f"cannot encode {syntax}: {exc}")
        ds.save_as(f)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == uid
    (plain,), _ = read_series([small_series[0]])
    (packed,), _ = read_series([tmp_path / "s"])
    assert packed.positions == plain.positions
    for a, b in zip(plain.hu_slices(), packed.hu_slices()):
        np.testing.assert_array_equal(a, b)


def test_declared_non_hu_values_are_refused(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        edit(f, RescaleType="US")
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal is not None and "not Hounsfield units (RescaleType US" in s.refusal


# -- limits before allocation (docs/architecture.md rule 8) ------------------------------------------
from edgekidney.data.limits import DEFAULT_LIMITS, DecodeLimits  # noqa: E402

from hostile import Measured, dicom_instance_declaring, nifti_declaring  # noqa: E402


@pytest.mark.parametrize("rows,cols,frames,reason", [
    (60000, 60000, None, "image declares 60000x60000 px; the largest side allowed is 2048 px"),
    (64, 2048, None, "image is 2048x64 px, aspect ratio over 4:1; a CT slice is roughly square"),
    (2048, 2048, 1000, "1000 frame(s) declare 4,194,304,000 pixels in all; a series may declare at most 786,432,000"),
    (64, 64, 5000, "5000 frame(s); a series may have at most 3000 slices"),
])
def test_an_instance_declaring_too_much_is_skipped_with_the_reason_before_its_pixels_are_read(
        tmp_path, small_series, rows, cols, frames, reason):
    files = copy_series(small_series[0], tmp_path / "s")
    hostile = tmp_path / "s" / "hostile.dcm"  # same series, its own instance; pixel data of a 64 px slice
    hostile.write_bytes(dicom_instance_declaring(files[0].read_bytes(), rows, cols, frames, SOPInstanceUID="1.2.3.999"))
    assert hostile.stat().st_size < 20_000
    with Measured() as m:
        (s,), skipped = read_series([tmp_path / "s"])
        first = next(s.hu_slices())
    assert [(Path(k.path).name, k.reason) for k in skipped] == [("hostile.dcm", reason)]
    assert len(s) == 8 and s.refusal is None and first.shape == (64, 64)  # the series is read without it
    assert skipped[0].series_uid == s.uid  # and knows it is not all there (study.analyze)
    assert m.seconds < 1.0 and m.peak_mb < 100, (m.seconds, m.peak_mb)


def test_a_series_over_the_series_limits_is_refused_and_not_kept_whole(small_series):
    folder, _ = small_series  # 8 slices of 64 x 64
    (s,), skipped = read_series([folder], limits=DecodeLimits(max_series_slices=5))
    assert s.refusal == "too large: 8 slices; a series may have at most 5 slices" and skipped == []
    assert len(s) == 5  # the slices past the limit were counted, not kept
    (s,), _ = read_series([folder], limits=DecodeLimits(max_series_pixels=64 * 64 * 6))
    assert s.refusal == "too large: 8 slices declare 32,768 pixels in all; a series may declare at most 24,576"
    (s,), _ = read_series([folder], limits=DecodeLimits(max_series_slices=8))
    assert s.refusal is None and len(s) == 8


def test_default_series_limits_take_3000_slices_of_512_px():
    assert DEFAULT_LIMITS.series_excess(3000, 3000 * 512 * 512) is None
    assert DEFAULT_LIMITS.series_excess(3001, 3001 * 512 * 512).startswith("3001 slices")
    assert DEFAULT_LIMITS.series_excess(751, 751 * 1024 * 1024) is not None  # 750 slices of 1024 px


def test_a_file_changed_after_its_header_was_read_is_not_decoded(tmp_path, small_series):
    copy_series(small_series[0], tmp_path / "s")
    (s,), _ = read_series([tmp_path / "s"])
    victim = s.refs[0].path
    victim.write_bytes(dicom_instance_declaring(victim.read_bytes(), 60000, 60000))
    with Measured() as m:
        with pytest.raises(InputError, match=r"header now declares 60000x60000 px x 1 frame\(s\), not the 64x64 px"):
            next(s.hu_slices())
    assert m.peak_mb < 100


@pytest.mark.parametrize("name,shape,version,reason", [
    ("huge.nii", (32767, 32767, 1000), 1, "image declares 32767x32767 px; the largest side allowed is 2048 px"),
    ("huge.nii.gz", (32767, 32767, 1000), 1, "image declares 32767x32767 px; the largest side allowed is 2048 px"),
    ("huge2.nii", (60000, 60000, 1000), 2, "image declares 60000x60000 px; the largest side allowed is 2048 px"),
    # slices within the slice limits, too many voxels for a series: 2 GB of int16 from 352 bytes
    ("deep.nii", (1024, 1024, 1000), 1, "1000 slices declare 1,048,576,000 pixels in all; a series may declare "
                                        "at most 786,432,000"),
    ("deep.nii.gz", (1024, 1024, 1000), 1, "1000 slices declare 1,048,576,000 pixels in all; a series may declare "
                                           "at most 786,432,000"),
    ("many.nii.gz", (64, 64, 4000), 1, "4000 slices; a series may have at most 3000 slices"),
    ("needle.nii", (2048, 64, 10), 1, "image is 2048x64 px, aspect ratio over 4:1; a CT slice is roughly square"),
    ("short.nii", (512, 512, 100), 1, "NIfTI is truncated (352 bytes; its header declares 512x512x100 voxels, "),
    ("4d.nii", (64, 64, 10, 5), 1, "NIfTI has shape (64, 64, 10, 5); expected a 3-D volume"),
])
def test_a_nifti_header_declaring_too_much_is_refused_before_any_voxel_is_read(tmp_path, name, shape, version, reason):
    pytest.importorskip("nibabel")
    path = nifti_declaring(tmp_path / name, shape, version)
    assert path.stat().st_size <= 544
    with Measured() as m:
        with pytest.raises(InputError) as info:
            read_nifti(path)
    assert str(info.value).startswith(f"{name}: {reason}") and "\n" not in str(info.value)
    assert m.seconds < 1.0 and m.peak_mb < 10, (m.seconds, m.peak_mb)
    with pytest.raises(InputError, match=f"^no CT series found in 1 file\\(s\\): {name}: "):
        read_series([path])  # skipped with that reason, and nothing else was found


def test_slices_of_different_sizes_are_refused_and_the_study_says_not_assessable(tmp_path, small_series):
    import json

    from typer.testing import CliRunner

    from edgekidney.cli import app
    from listener_fixtures import tiny_model

    files = copy_series(small_series[0], tmp_path / "s")
    ds = pydicom.dcmread(files[3])
    ds.PixelData = ds.pixel_array[:48, :40].copy().tobytes()  # one slice cropped: 48 rows, 40 columns
    ds.Rows, ds.Columns = 48, 40
    ds.save_as(files[3])
    (s,), skipped = read_series([tmp_path / "s"])
    assert skipped == [] and s.refusal == ("slices of different sizes in one series: 1 of 40x48 px, 7 of 64x64 px (a "
                                           "scout or a reformat sent in the series? a localizer's ImageType says "
                                           "LOCALIZER, and such slices are skipped)")
    r = CliRunner().invoke(app, ["study", str(tiny_model(tmp_path / "m")), str(tmp_path / "s"),
                                 "--json", str(tmp_path / "study.json")])
    assert r.exit_code == 0, r.output
    (entry,) = json.loads((tmp_path / "study.json").read_text())["series"]
    assert entry["decision"] == "not_assessable" and entry["reason"] == s.refusal
    assert entry["n_slices"] == 8 and entry["slices"] == [] and entry["probability"] is None  # nothing judged
    assert "not_assessable" in r.stdout


# -- hostile headers and volumes: a one-line reason, never a traceback, never a silent answer ---------
def _with_text(path, keyword, placeholder, text):
    """Save ``keyword`` as a number, then overwrite its bytes with ``text`` (pydicom refuses to write it)."""
    edit(path, **{keyword: placeholder})
    raw = path.read_bytes()
    assert raw.count(placeholder.encode()) == 1
    path.write_bytes(raw.replace(placeholder.encode(), text.encode().ljust(len(placeholder))))


def test_a_non_numeric_rescale_slope_skips_its_file_with_the_reason_not_the_study(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    _with_text(files[2], "RescaleSlope", "9.8765", "abc")
    (s,), skipped = read_series([tmp_path / "s"])
    assert len(s) == 7 and [Path(k.path).name for k in skipped] == [files[2].name]
    assert "RescaleSlope 'abc' is not a number" in skipped[0].reason


@pytest.mark.parametrize("keyword,placeholder", [("InstanceNumber", "12345678"), ("GantryDetectorTilt", "1.234567"),
                                                 ("SliceThickness", "3.456789"), ("SpacingBetweenSlices", "2.345678")])
def test_non_numeric_geometry_tags_are_read_as_absent(tmp_path, small_series, keyword, placeholder):
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        _with_text(f, keyword, placeholder, "abcdefgh"[: len(placeholder)])
        if keyword == "SpacingBetweenSlices":  # read only where positions are missing
            edit(f, ImagePositionPatient=None)
    (s,), skipped = read_series([tmp_path / "s"])
    assert not skipped and len(s) == 8 and s.refusal is None
    if keyword == "SliceThickness":
        assert s.slice_thickness is None
    if keyword == "SpacingBetweenSlices":  # the slice thickness (3 mm) spaces the estimated positions instead
        assert s.slice_spacing == pytest.approx(3.0)


def test_float_pixel_data_with_nan_is_an_unreadable_slice_not_a_quiet_one(tmp_path, small_series):
    from pydicom.uid import ExplicitVRLittleEndian

    files = copy_series(small_series[0], tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    values = ds.pixel_array.astype(np.float32) - 1024
    values[::5, ::5] = np.nan
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    for k in ("PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
        if k in ds:
            delattr(ds, k)
    ds.FloatPixelData = values.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(files[0])
    (s,), _ = read_series([tmp_path / "s"])
    out = list(s.hu_slices_or_errors())
    bad = [k for k, x in enumerate(out) if isinstance(x, InputError)]
    assert len(bad) == 1 and "NaN or infinite" in str(out[bad[0]])
    assert all(np.isfinite(x).all() for x in out if not isinstance(x, InputError))


def _nifti(path, data, affine=None):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine), str(path))
    return path


def test_a_nifti_with_nan_voxels_is_refused_not_classified(tmp_path):
    v = np.full((40, 40, 6), -1000.0, np.float32)
    v[10:30, 10:30] = 40.0
    v[::7, ::7] = np.nan
    s = read_nifti(_nifti(tmp_path / "nan.nii.gz", v))
    assert s.refusal == "voxels hold NaN or infinity: not CT in Hounsfield units"


@pytest.mark.parametrize("name,make,reason", [
    ("rgb.nii.gz", lambda: np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), "colour or complex"),
    ("empty.nii.gz", lambda: np.zeros((40, 40, 0), np.int16), "no voxels"),
])
def test_nifti_that_holds_no_ct_values_is_skipped_with_one_line(tmp_path, name, make, reason):
    with pytest.raises(InputError, match=reason):
        read_nifti(_nifti(tmp_path / name, make()))


@pytest.mark.parametrize("row,col,value", [(2, 3, np.inf), (0, 0, np.nan), (1, 1, 0.0)])
def test_a_nifti_affine_that_is_not_finite_is_refused(tmp_path, row, col, value):
    """In the translation or in the axes (where nibabel's orientation said "SVD did not converge" or lost
    an axis): the same one line. The header's sform is written as bytes: nibabel will not save such an
    affine itself."""
    import struct

    path = _nifti(tmp_path / "bad.nii", np.full((40, 40, 4), -1000, np.int16))
    raw = bytearray(path.read_bytes())
    raw[252:256] = struct.pack("<hh", 0, 1)  # qform_code 0, sform_code 1: the sform is the affine
    raw[280 + 16 * row + 4 * col:284 + 16 * row + 4 * col] = struct.pack("<f", value)  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"^bad\.nii: NIfTI affine is not finite or has a zero voxel size: "
                                         r"positions unknown$"):
        read_nifti(path)


def test_zero_pixel_spacing_is_taken_as_absent(tmp_path, small_series):
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        edit(f, PixelSpacing=[0, 0])
    (s,), _ = read_series([tmp_path / "s"])
    assert s.pixel_spacing == (1.0, 1.0) and any("1 mm assumed" in w for w in s.warnings)


def test_a_fifo_or_a_device_link_in_a_folder_is_not_read(tmp_path, small_series):
    import os

    files = copy_series(small_series[0], tmp_path / "s")
    os.mkfifo(tmp_path / "s" / "x.dcm")
    (tmp_path / "s" / "z.dcm").symlink_to("/dev/zero")
    (s,), skipped = read_series([tmp_path / "s"])  # would block on the FIFO or spin on /dev/zero
    assert len(s) == len(files) and not skipped
    with pytest.raises(InputError, match="not a regular file"):
        read_series([tmp_path / "s" / "x.dcm"])


def test_an_absurd_rescale_slope_is_refused_not_clipped_to_white(tmp_path, small_series):
    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import Preprocessing

    files = copy_series(small_series[0], tmp_path / "s")
    edit(files[0], RescaleSlope="1e300")
    with pytest.raises(InputError, match=r"NaN or infinite in Hounsfield units \(RescaleSlope 1e\+300"):
        load_slice(files[0], Preprocessing())
    (s,), _ = read_series([tmp_path / "s"])
    assert sum(isinstance(x, InputError) for x in s.hu_slices_or_errors()) == 1


def test_pixels_that_are_not_square_are_refused_not_judged_stretched(tmp_path, small_series):
    """The slice is cropped and resized as an array: 3 x 2 mm pixels would reach the network as anatomy
    stretched 1.5 times, and its answers on such a series changed with no warning. Refused with the
    reason, in a series, a NIfTI volume and a single slice; a few per cent off square is judged."""
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        edit(f, PixelSpacing=[1.5, 1.0])
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal == ("pixels are not square (1.5 x 1 mm, row x column spacing): the model would see the anatomy "
                         "stretched 1.50 times; resample the slices to square pixels")
    for f in files:
        edit(f, PixelSpacing=[1.05, 1.0])
    (s,), _ = read_series([tmp_path / "s"])
    assert s.refusal is None
    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import Preprocessing

    assert load_slice(files[0], Preprocessing()).shape == (64, 64)
    edit(files[0], PixelSpacing=[0.7, 0.9])
    with pytest.raises(InputError, match=r"IM0000\.dcm: pixels are not square \(0\.7 x 0\.9 mm, row x column spacing\)"
                       r": the model would see the anatomy stretched 1\.29 times"):
        load_slice(files[0], Preprocessing())
    v = np.full((40, 40, 6), -1000, np.int16)
    v[10:30, 10:30] = 40
    assert read_nifti(_nifti(tmp_path / "square.nii.gz", v)).refusal is None
    s = read_nifti(_nifti(tmp_path / "wide.nii.gz", v, np.diag([1.0, 2.0, 3.0, 1.0])))
    assert s.refusal.startswith("pixels are not square (2 x 1 mm")


def test_an_oblique_series_is_classified_as_acquired_and_never_reformatted(tmp_path, small_series):
    """Slices tilted 20 degrees about the patient's left-right axis, positions along their normal: turned
    as if aligned and classified, with a warning; a coronal reformat would shear them, so it is refused,
    as for an oblique NIfTI affine. A tilt under a degree changes nothing."""
    from edgekidney.data.geometry import obliquity

    assert obliquity([1, 0, 0], [0, 1, 0]) == 0.0 and obliquity([1, 0, 0], [0, 0.8, 0.6]) == pytest.approx(36.87, 1e-3)
    # cosines a header wrote unnormalised, or rounded a hair above 1: the angle is the direction's
    assert obliquity([2, 0, 0], [0, 0, -3]) == 0.0 and obliquity([0, 4, 3], [1, 0, 0]) == pytest.approx(36.87, 1e-3)
    assert obliquity([1.0000001, 0, 0], [0, 1, 0]) == 0.0
    for degrees, warned in ((20.0, True), (0.5, False)):
        t = np.radians(degrees)
        col, normal = np.array([0.0, np.cos(t), -np.sin(t)]), np.array([0.0, np.sin(t), np.cos(t)])
        files = copy_series(small_series[0], tmp_path / f"s{degrees}")
        for k, f in enumerate(sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))):
            edit(f, ImageOrientationPatient=[1.0, 0.0, 0.0, *col], ImagePositionPatient=list(3.0 * k * normal))
        (s,), _ = read_series([tmp_path / f"s{degrees}"])
        assert s.refusal is None and s.acquired_plane == "axial"
        assert (f"slices oblique by {degrees:.1f} deg to the patient axes: classified as acquired, no coronal "
                "reformat" in s.warnings) is warned
        assert s.allows_reformat is not warned


def test_pixel_spacing_no_ct_slice_has_is_refused_and_nifti_units_are_read(tmp_path, small_series):
    """30 mm or 0.0001 mm pixels are a header in other units: the positions, the distances the answer
    gives and the density searched within 10 mm of a peak would all be wrong. A NIfTI that says its
    units are metres is read in millimetres."""
    files = copy_series(small_series[0], tmp_path / "s")
    for spacing in ([30.0, 30.0], [1e-4, 1e-4]):
        for f in files:
            edit(f, PixelSpacing=spacing)
        (s,), _ = read_series([tmp_path / "s"])
        assert s.refusal == (f"pixel spacing {spacing[0]:.3g} x {spacing[1]:.3g} mm is outside what a CT slice has "
                             "(0.05-10 mm): check the header's units")
    nib = pytest.importorskip("nibabel")
    v = np.full((40, 40, 6), -1000, np.int16)
    v[10:30, 10:30] = 40
    img = nib.Nifti1Image(v, np.diag([0.003, 0.003, 0.003, 1.0]))
    img.header.set_xyzt_units("meter")
    nib.save(img, str(tmp_path / "metres.nii.gz"))
    s = read_nifti(tmp_path / "metres.nii.gz")
    assert s.refusal is None and s.pixel_spacing == pytest.approx((3.0, 3.0))
    assert np.diff(s.positions) == pytest.approx([3.0] * 5)
    assert read_nifti(_nifti(tmp_path / "big.nii.gz", v, np.diag([30.0, 30.0, 3.0, 1.0]))).refusal.startswith(
        "pixel spacing 30 x 30 mm is outside what a CT slice has")


def test_the_warnings_a_series_from_elsewhere_gets_say_exactly_what_was_assumed(tmp_path, small_series):
    """Each assumption made for a header that lacks something is named as such, with its numbers: a
    radiology IT engineer reads these lines to find which export setting to fix."""
    files = copy_series(small_series[0], tmp_path / "s")
    shutil.copy(files[0], tmp_path / "s" / "copy-a.dcm")
    shutil.copy(files[1], tmp_path / "s" / "copy-b.dcm")
    for f in files:
        edit(f, SeriesInstanceUID=None, PixelSpacing=None, GantryDetectorTilt=7.5)
    for name in ("copy-a.dcm", "copy-b.dcm"):
        edit(tmp_path / "s" / name, SeriesInstanceUID=None, PixelSpacing=None, GantryDetectorTilt=7.5)
    (s,), _ = read_series([tmp_path / "s"])
    assert s.warnings[:2] == ["2 duplicate instance(s) (same SOP Instance UID) dropped",
                              "no SeriesInstanceUID: the slices of one folder are taken as one series"]
    assert "no PixelSpacing (or not two positive numbers): 1 mm assumed" in s.warnings
    assert "gantry tilt 7.5 deg: slices are sheared; classified as acquired, no coronal reformat" in s.warnings
    assert s.pixel_spacing == (1.0, 1.0) and s.kind == "dicom" and s.modality == "CT" and len(s) == 8
    # no positions, no SliceLocation: InstanceNumber orders them, positions counted at the slice thickness
    for f in files:
        edit(f, ImagePositionPatient=None, SliceLocation=None, SliceThickness=2.5)
    for name in ("copy-a.dcm", "copy-b.dcm"):
        (tmp_path / "s" / name).unlink()
    (s,), _ = read_series([tmp_path / "s"])
    assert s.positions == [2.5 * k for k in range(8)]
    for f in files:
        edit(f, SpacingBetweenSlices=2.0)
    (s,), _ = read_series([tmp_path / "s"])
    assert s.positions == [2.0 * k for k in range(8)]
    assert ("no usable ImagePositionPatient: slices ordered by InstanceNumber, positions estimated from the slice "
            "spacing; which end is the feet is not known") in s.warnings


@pytest.mark.parametrize("stored", ["flipped", "transposed"])
def test_a_series_stored_in_another_orientation_has_the_same_anatomy_where_it_was(tmp_path, small_series, stored):
    """Rows and columns stored the other way round (IOP -1,0,0 / 0,-1,0), or transposed (0,1,0 / 1,0,0):
    turned to the display orientation, each slice is the same picture, and its first display pixel
    lies at the same patient position with the same directions (what the SR, the Secondary Capture
    and the coronal reformat place things by)."""
    (plain,), _ = read_series([small_series[0]])
    files = copy_series(small_series[0], tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        px, (x0, y0, z) = ds.pixel_array, (float(v) for v in ds.ImagePositionPatient)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        rows, cols = px.shape
        if stored == "flipped":  # first stored pixel: the patient's left and posterior corner
            ds.PixelData = np.ascontiguousarray(px[::-1, ::-1]).tobytes()
            ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
            ds.ImagePositionPatient = [x0 + (cols - 1) * dx, y0 + (rows - 1) * dy, z]
        else:  # stored column by column: rows run to the patient's left, columns posterior
            ds.PixelData = np.ascontiguousarray(px.T).tobytes()
            ds.Rows, ds.Columns = cols, rows
            ds.PixelSpacing = [dx, dy]
            ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
        ds.save_as(f)
    (turned,), _ = read_series([tmp_path / "s"])
    assert turned.refusal is None and turned.shape == plain.shape and turned.pixel_spacing == plain.pixel_spacing
    np.testing.assert_allclose(turned.origin, plain.origin)
    np.testing.assert_allclose(turned.row_direction, plain.row_direction)
    np.testing.assert_allclose(turned.col_direction, plain.col_direction)
    assert turned.positions == plain.positions and turned.description == plain.description == "SYNTHETIC abdomen 3 mm"
    assert turned.slice_thickness == plain.slice_thickness == 3.0
    for a, b in zip(plain.hu_slices(), turned.hu_slices()):
        np.testing.assert_array_equal(a, b)


def test_a_nifti_is_held_as_stored_and_scaled_one_slice_at_a_time(tmp_path):
    """nibabel's own scaling makes a float64 copy of the whole volume (8 bytes a voxel: a 3 MB .nii.gz
    declaring 512 x 512 x 2900 took 6 GB). The volume stays in its stored dtype, each slice is scaled to
    HU as it is read, and a header declaring more bytes than int16 at the series limit is refused."""
    nib = pytest.importorskip("nibabel")
    v = np.full((48, 40, 6), -1000, np.int16)
    v[8:40, 8:32] = 40
    v[20, 20, 3] = 1200
    img = nib.Nifti1Image(((v + 1024) // 2).astype(np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    plain, scaled = read_nifti(_nifti(tmp_path / "plain.nii.gz", v, np.diag([2.0, 2.0, 3.0, 1.0]))), read_nifti(
        tmp_path / "scaled.nii.gz")
    assert scaled.volume.dtype == np.int16 and scaled.scale == (2.0, -1024.0) and plain.scale == (1.0, 0.0)
    assert scaled.refusal is None and plain.refusal is None
    for a, b in zip(plain.hu_slices(), scaled.hu_slices()):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    path = nifti_declaring(tmp_path / "float.nii.gz", (512, 512, 2900), dtype=np.float32)
    with Measured() as m:
        with pytest.raises(InputError, match=r"^float\.nii\.gz: NIfTI declares 3\.04 GB of float32 voxels; at most "
                                             r"1\.57 GB is read into memory"):
            read_nifti(path)
    assert m.peak_mb < 10
