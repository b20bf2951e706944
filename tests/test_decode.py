import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from edgekidney.data.decode import decode_slice, is_candidate_file, load_slice
from edgekidney.errors import DependencyError, InputError
from edgekidney.data.preprocess import Preprocessing, window_hu
from pydicom_files import shipped_file

CFG = Preprocessing()


bundled = shipped_file  # in pydicom's wheel: nothing is downloaded or looked up elsewhere


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_ct_dicom_is_converted_to_hu_then_windowed():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = load_slice(path, CFG)
    assert got.shape == (128, 128)
    np.testing.assert_allclose(got, window_hu(hu, 40, 400), atol=1e-6)
    assert 0 < got.mean() < 1


def test_other_window_changes_the_result():
    path = bundled("CT_small.dcm")
    bone = load_slice(path, Preprocessing(window_center=400, window_width=1800))
    assert not np.allclose(bone, load_slice(path, CFG))


def test_truncated_dicom_from_pydicom_is_rejected():
    with pytest.raises(InputError, match="truncated"):
        load_slice(bundled("MR_truncated.dcm"), CFG)


def test_truncated_ct_dicom_is_rejected(tmp_path):
    data = open(bundled("CT_small.dcm"), "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(InputError, match="cut.dcm"):
        load_slice(cut, CFG)


def test_dicom_without_pixel_data_is_rejected():
    with pytest.raises(InputError, match="no pixel data"):
        load_slice(bundled("rtplan.dcm"), CFG)


def test_non_ct_dicom_is_rejected_not_guessed():
    with pytest.raises(InputError, match="modality is MR"):
        load_slice(bundled("MR_small.dcm"), CFG)


def test_rgb_dicom_is_rejected():
    with pytest.raises(InputError, match="samples per pixel"):
        load_slice(bundled("SC_rgb_rle.dcm"), CFG)


def test_compressed_dicom_without_decoder_names_the_package():
    for mod in ("pylibjpeg", "gdcm"):
        try:
            __import__(mod)
            pytest.skip(f"{mod} is installed, so the decoder is not missing")
        except ImportError:
            pass
    ds = pydicom.dcmread(bundled("MR_small_jpeg_ls_lossless.dcm"))
    # the only bundled JPEG-LS file is MR, which is refused before decoding: made a CT slice's header
    ds.Modality = "CT"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DependencyError, match=r"needs a decoder that is not installed: pip install 'edgekidney\[dicom\]' \(pylibjpeg"):
        decode_slice(buf.getvalue(), "jpegls.dcm", CFG)


def test_dicom_without_extension_is_found_by_magic(tmp_path):
    f = tmp_path / "IM0001"
    f.write_bytes(open(bundled("CT_small.dcm"), "rb").read())
    (tmp_path / "notes").write_text("hello")
    assert is_candidate_file(f) and not is_candidate_file(tmp_path / "notes")
    assert load_slice(f, CFG).shape == (128, 128)


def test_dicom_named_by_its_uid_is_found_by_magic_in_a_folder(tmp_path):
    """PACS exports name instances by UID: "CT.1.3.12.2.1107.5.1", whose last dotted part looks like a suffix."""
    from edgekidney.runtime.predict import expand_inputs

    f = tmp_path / "CT.1.3.12.2.1107.5.1.4.60064.300000221208"
    f.write_bytes(open(bundled("CT_small.dcm"), "rb").read())
    (tmp_path / "report.1.2.txt").write_text("not DICOM")
    assert is_candidate_file(f) and not is_candidate_file(tmp_path / "report.1.2.txt")
    assert expand_inputs([tmp_path]) == [f]


def test_text_file_named_png_is_rejected(tmp_path):
    f = tmp_path / "slice.png"
    f.write_text("this is not an image")
    with pytest.raises(InputError, match=r"slice.png: not a PNG, JPEG or DICOM"):
        load_slice(f, CFG)


def test_8bit_png_scales_by_255():
    arr = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    np.testing.assert_allclose(decode_slice(png_bytes(arr), "x.png", CFG), arr / 255.0, atol=1e-7)


def test_16bit_png_full_range_and_hu_offset():
    hu = np.linspace(-1000, 1000, 64 * 64).reshape(64, 64)
    stored = (hu + 32768).astype(np.uint16)
    data = png_bytes(stored)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_allclose(decode_slice(data, "x.png", CFG), stored / 65535.0, atol=1e-6)
    as_hu = decode_slice(data, "x.png", Preprocessing(png16_hu_offset=32768))
    np.testing.assert_allclose(as_hu, window_hu(stored.astype(np.float32) - 32768, 40, 400), atol=1e-6)
    assert as_hu.min() == 0.0 and as_hu.max() == 1.0  # -1000 HU is below, +1000 above the abdomen window


def test_rgb_png_becomes_the_same_gray():
    gray = np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_allclose(decode_slice(png_bytes(rgb), "rgb.png", CFG), decode_slice(png_bytes(gray), "g.png", CFG))


def test_rgba_png_is_composited_over_black():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :20, 3] = 255  # left half opaque, right half transparent
    out = decode_slice(png_bytes(rgba), "a.png", CFG)
    assert np.allclose(out[:, :20], 200 / 255, atol=0.01) and np.allclose(out[:, 20:], 0)


def test_image_smaller_than_32px_is_rejected():
    with pytest.raises(InputError, match="smaller than the 32 px minimum"):
        decode_slice(png_bytes(np.zeros((20, 300), dtype=np.uint8)), "thin.png", CFG)


def test_truncated_jpeg_is_rejected(real_data):
    data = (real_data / "Stone" / "Stone- (1).jpg").read_bytes()
    with pytest.raises(InputError, match="truncated"):
        decode_slice(data[: len(data) // 2], "half.jpg", CFG)


def test_real_jpeg_slice_decodes(real_data):
    out = load_slice(real_data / "Stone" / "Stone- (1).jpg", CFG)
    assert out.shape == (256, 256) and 0 <= out.min() and out.max() <= 1 and out.std() > 0.05


def test_importing_pydicom_tries_no_download():
    """pydicom 3.0.0 tried to download five of its test files when imported (pydicom.examples), warning
    when it could not; hence the floor 3.0.1. The tests read only files in its wheel (pydicom_files.py)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import pydicom"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-600:]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_slice(tmp_path / "nope.png", CFG)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_slice(tmp_path / "empty.png", CFG)


# -- limits before allocation ---------------------------------------------------------------
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from edgekidney.data.decode import DecodeLimits  # noqa: E402
from edgekidney.errors import ImageTooLargeError  # noqa: E402

from hostile import dicom_declaring, png_declaring, thin_png  # noqa: E402

THIN = [(20000, 32), (40000, 32), (60000, 60)]


@pytest.mark.parametrize("width,height", THIN)
def test_thin_pngs_from_the_issue_are_refused_from_the_header(width, height):
    data = thin_png(width, height)
    assert len(data) < 8000  # the issue's files: 790 B, 1.4 KB, 3.7 KB
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:  # ImageTooLargeError (413) or an aspect-ratio InputError (422)
        decode_slice(data, "thin.png", CFG)
    assert time.perf_counter() - t0 < 1.0
    assert f"{width}x{height}" in str(info.value) and str(info.value).startswith("thin.png: ")


PEAK_RSS = """
import json, sys
import numpy as np
from edgekidney.data.decode import decode_slice
from edgekidney.data.preprocess import Preprocessing
from edgekidney.errors import InputError
sys.path.insert(0, sys.argv[1])
from hostile import thin_png

def mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0

def peak_of(step):
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident size, to now
    before = mb("VmRSS")
    step()
    return mb("VmHWM") - before

cfg, out = Preprocessing(image_size=64), {}
datas = {f"{w}x{h}": thin_png(w, h) for w, h in json.loads(sys.argv[2])}
decode_slice(thin_png(64, 64), "warm.png", cfg)  # imports and first-call allocations before measuring

def refuse(data):
    try:
        decode_slice(data, "thin.png", cfg)
    except InputError:
        return
    raise AssertionError("decoded")

for name, data in datas.items():
    out[name] = peak_of(lambda: refuse(data))
out["probe"] = peak_of(lambda: np.ones((200, 1024, 1024), np.uint8))  # 200 MB: the measurement must see it
print(json.dumps(out))
"""


def test_refusing_thin_pngs_allocates_nothing_measured_in_a_fresh_process():
    """The peak resident size of a fresh interpreter, reset before each decode (/proc/self/clear_refs): in
    the test process, after a training, ru_maxrss is a high-water mark far above anything a decode could
    add, so it would see nothing. A 200 MB probe shows that the measurement sees an allocation."""
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, str(Path(__file__).parent), json.dumps(THIN)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    deltas = json.loads(r.stdout)
    assert 190 < deltas.pop("probe") < 260
    assert set(deltas) == {f"{w}x{h}" for w, h in THIN}
    for name, mb in deltas.items():  # the padded square of 20000 px alone would be 1.6 GB
        assert mb < 20, (name, mb)


@pytest.mark.parametrize("width,height,error,fragment", [
    (100_000, 100_000, ImageTooLargeError, "too large"),   # decompression bomb: Pillow refuses it too
    (4096, 4096 + 1, ImageTooLargeError, "largest side"),
    (4050, 4050, ImageTooLargeError, "limit is 16000000 pixels"),
    (0, 512, InputError, "no pixels|not a PNG"),  # Pillow itself refuses a zero-size PNG
    (512, 0, InputError, "no pixels|not a PNG"),
    (4000, 900, InputError, "aspect ratio over 4:1"),
])
def test_declared_size_is_checked_before_decoding(width, height, error, fragment):
    limits = DecodeLimits(max_side=4096, max_pixels=4000 * 4000, max_aspect=4.0)
    data = png_declaring(width, height)
    with pytest.raises(error, match=fragment):
        decode_slice(data, "bomb.png", CFG, limits=limits)


def test_limits_are_tunable_and_a_normal_slice_passes():
    data = thin_png(512, 512)
    assert decode_slice(data, "ok.png", CFG).shape == (512, 512)
    with pytest.raises(ImageTooLargeError, match="largest side allowed is 256"):
        decode_slice(data, "ok.png", CFG, limits=DecodeLimits(max_side=256))


def test_dicom_declaring_huge_rows_and_columns_is_refused_before_decoding():
    template = open(bundled("CT_small.dcm"), "rb").read()
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        decode_slice(dicom_declaring(template, 60000, 60000), "big.dcm", CFG)
    with pytest.raises(ImageTooLargeError, match="frame"):
        decode_slice(dicom_declaring(template, 2048, 2048, frames=1000), "frames.dcm", CFG)
    assert time.perf_counter() - t0 < 1.0


def test_dicom_declaring_more_pixels_than_it_carries_is_truncated():
    template = open(bundled("CT_small.dcm"), "rb").read()  # 128x128, 16 bits
    with pytest.raises(InputError, match=r"truncated \(32768 bytes for 1024x1024 px"):
        decode_slice(dicom_declaring(template, 1024, 1024), "short.dcm", CFG)


def test_dicom_with_zero_rows_is_refused():
    template = open(bundled("CT_small.dcm"), "rb").read()
    with pytest.raises(InputError, match="no pixels"):
        decode_slice(dicom_declaring(template, 0, 128), "zero.dcm", CFG)


def test_default_limits_accept_a_2048_px_slice_and_refuse_one_more_pixel():
    assert decode_slice(thin_png(2048, 2048), "big.png", CFG).shape == (2048, 2048)
    with pytest.raises(ImageTooLargeError, match="largest side allowed is 2048 px"):
        decode_slice(thin_png(2049, 2048), "big.png", CFG)


@pytest.mark.parametrize("old,new", [
    (b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00Dw"),  # an unknown VR in Modality: NotImplementedError in pydicom
    (b"-1024", b"-10q4"),                            # RescaleIntercept that is no number: ValueError
    (b"\x28\x00\x11\x00US\x02\x00", b"\x28\x00\x11\x00US\x03\x00"),  # Columns of 3 bytes: BytesLengthException
])
def test_malformed_dicom_headers_found_by_fuzzing_are_input_errors(tmp_path, old, new):
    """Mutations that made pydicom raise outside the decoder's error handling (a 500 in the server)."""
    from edgekidney.data.synthetic import synth_slice, write_ct_dicom

    path = tmp_path / "x.dcm"
    write_ct_dicom(path, synth_slice(np.random.default_rng(1), 96, stone=True), 1, 1, "1.2.3", "1.2.3.4")
    data = path.read_bytes()
    assert data.count(old) == 1
    with pytest.raises(InputError, match=r"^bad.dcm: "):
        decode_slice(data.replace(old, new), "bad.dcm", CFG)


def test_a_file_cut_inside_compressed_pixel_data_says_truncated(tmp_path):
    """Forced, pydicom reads such a file as an empty dataset ("no Rows/Columns", "no pixel data");
    the error must say what happened: the example series' JPEG 2000 slice, cut short."""
    from edgekidney.data.decode import read_dicom

    pytest.importorskip("pylibjpeg")
    src = sorted((Path(__file__).resolve().parents[1] / "examples" / "abdomen-jpeg2000-series").iterdir())[0]
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[:40000])
    assert read_dicom(cut, cut.name, stop_before_pixels=True).Rows == 512  # the header is whole
    with pytest.raises(InputError, match=r"DICOM pixel data is truncated \(the file ends inside its compressed"):
        read_dicom(cut, cut.name)
    with pytest.raises(InputError, match=r"CT\.[0-9.]+: DICOM pixel data is truncated \(the file ends"):
        load_slice(cut, CFG)


@pytest.mark.parametrize("change,reason", [
    (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "is a localizer"),
    (dict(SOPClassUID="1.2.840.10008.5.1.4.1.1.7"), "Secondary Capture Image Storage is not a CT image"),
    (dict(RescaleType="US"), r"not Hounsfield units \(RescaleType US\)"),
    (dict(Modality=""), "has no Modality"),
])
def test_one_slice_is_refused_for_what_a_series_is_refused(change, reason):
    """infer and serve must not answer a scout, a secondary capture or a derived map as a CT slice."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    for k, v in change.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(InputError, match=reason):
        decode_slice(buf.getvalue(), "x.dcm", CFG)


def test_one_slice_without_modality_is_refused_as_a_series_skips_it():
    """Modality is Type 1; a CT slice that lost it is not guessed to be CT (study skips it: "no Modality")."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    del ds.Modality
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(InputError, match=r"x\.dcm: DICOM has no Modality"):
        decode_slice(buf.getvalue(), "x.dcm", CFG)


def test_a_header_nesting_sequences_thousands_deep_is_a_one_line_error_not_a_recursion(tmp_path):
    """2,000 sequences inside each other (48 KB) overflowed pydicom's reader: a traceback from `infer`,
    a 500 from the server, and a whole study stopped by one file. 40 deep reads, but is refused all the
    same: every later recursive walk of the header (copying it into an SR) would overflow nearer."""
    import struct

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    end_of_meta = 144 + struct.unpack("<I", data[140:144])[0]
    opened = b"\x40\x00\x30\xa7SQ\0\0\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff" * 2000
    closed = b"\xfe\xff\x0d\xe0\0\0\0\0\xfe\xff\xdd\xe0\0\0\0\0" * 2000
    with pytest.raises(InputError, match=r"^deep\.dcm: DICOM header nests sequences too deeply to read$"):
        decode_slice(data[:end_of_meta] + opened + closed + data[end_of_meta:], "deep.dcm", CFG)
    # the same inside a sequence of defined length: read as raw bytes, deep only when asked for
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(opened + closed)) + opened + closed
    outer = b"\x40\x00\x30\xa7SQ\0\0" + struct.pack("<I", len(item)) + item
    with pytest.raises(InputError, match=r"^raw\.dcm: DICOM header nests sequences more than 32 deep$"):
        decode_slice(data[:end_of_meta] + outer + data[end_of_meta:], "raw.dcm", CFG)
    inner = Dataset()
    for _ in range(40):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(InputError, match=r"^forty\.dcm: DICOM header nests sequences more than 32 deep$"):
        decode_slice(buf.getvalue(), "forty.dcm", CFG)
    del ds.ContentSequence
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert decode_slice(buf.getvalue(), "plain.dcm", CFG).shape == (128, 128)


def test_a_palette_colour_dicom_is_refused_not_read_as_densities(tmp_path):
    """One sample per pixel, but PALETTE COLOR: the values index a colour table. It was classified as a
    CT slice (and a series of them answered no_stone); the series reader skips it with the same reason."""
    from edgekidney.data.series import read_series

    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    for value, refused in (("PALETTE COLOR", True), ("MONOCHROME1", False), ("MONOCHROME2", False)):
        ds.PhotometricInterpretation = value
        buf = io.BytesIO()
        ds.save_as(buf)
        if refused:
            with pytest.raises(InputError, match=r"^p\.dcm: PhotometricInterpretation PALETTE COLOR: a colour image"):
                decode_slice(buf.getvalue(), "p.dcm", CFG)
        else:
            assert decode_slice(buf.getvalue(), "p.dcm", CFG).shape == (128, 128)
    from edgekidney.data.decode import photometric_reason

    del ds.PhotometricInterpretation
    assert photometric_reason(ds) is None  # absent: left to the decoder, which says it is missing
    ds.PhotometricInterpretation = " monochrome2 "
    assert photometric_reason(ds) is None
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "p.dcm")
    with pytest.raises(InputError) as err:
        read_series([tmp_path])
    assert "PhotometricInterpretation PALETTE COLOR: a colour image, not a grayscale CT slice" in str(err.value)


def test_compressed_frames_without_file_meta_name_the_missing_syntax(tmp_path):
    """Without a File Meta Information header, native pixels are read in the dataset's own encoding;
    compressed frames cannot be, as nothing names their codec: one line that says so."""
    from pathlib import Path

    src = sorted((Path(__file__).parents[1] / "examples" / "abdomen-jpeg2000-series").iterdir())[0]
    ds = pydicom.dcmread(src)
    assert ds["PixelData"].is_undefined_length
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    with pytest.raises(InputError, match=r"^bare\.dcm: compressed DICOM pixel data without a File Meta Information "
                                         r"header: no transfer syntax names its codec$"):
        decode_slice(buf.getvalue(), "bare.dcm", CFG, dicom_hint=True)


def test_slice_headers_that_are_absent_or_at_their_limits_still_decode():
    """No PixelSpacing or a zero one (unknown, as a series reads it), spacing at the ends of what a CT
    slice has and pixels 1.1 apart: all judged."""
    from edgekidney.data.geometry import non_square_reason, pixel_spacing_reason

    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    for edits in ({"PixelSpacing": None}, {"PixelSpacing": [0, 0]},
                  {"PixelSpacing": [0.05, 0.05]}, {"PixelSpacing": [10, 10]}, {"PixelSpacing": [1.1, 1.0]}):
        for key, value in edits.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        buf = io.BytesIO()
        ds.save_as(buf)
        assert decode_slice(buf.getvalue(), "s.dcm", CFG).shape == (128, 128), edits
    assert pixel_spacing_reason((20.0, 30.0)).startswith("pixel spacing 20 x 30 mm is outside")
    assert non_square_reason((2.0, 1.0)).startswith("pixels are not square (2 x 1 mm, row x column spacing)")
    assert pixel_spacing_reason(None) is None and non_square_reason(None) is None


def test_a_png_or_jpeg_named_or_sent_as_dicom_is_read_as_what_it_is():
    """A slice exported as PNG but named `.dcm` (or posted as application/dicom) was "DICOM file has no
    pixel data": its bytes say PNG, and it is read as one, to the same slice."""
    arr = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    png = png_bytes(arr)
    np.testing.assert_array_equal(decode_slice(png, "slice.dcm", CFG, dicom_hint=True), decode_slice(png, "s.png", CFG))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    assert decode_slice(buf.getvalue(), "slice.dcm", CFG, dicom_hint=True).shape == (64, 64)
    with pytest.raises(InputError, match=r"^text\.dcm: "):  # neither: still read as DICOM, and refused
        decode_slice(b"plain text, not an image" * 10, "text.dcm", CFG, dicom_hint=True)
