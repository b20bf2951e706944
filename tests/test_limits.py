"""edgekidney.data.limits on its own: every limit at its boundary, and the DICOM header readers.

What an input may declare before memory is spent on it (docs/architecture.md rule 8). Each limit is
checked one below, at and one above it, with the exact one-line message users get.
"""

import pytest
from pydicom.dataset import Dataset

from edgekidney.data.limits import (DEFAULT_LIMITS, DecodeLimits, DicomSize, check_dicom_instance, dicom_int,
                                    dicom_size)
from edgekidney.errors import ImageTooLargeError, InputError

L = DecodeLimits(max_side=100, max_pixels=5000, max_aspect=2.0, max_series_slices=10, max_series_pixels=20000)


def test_defaults_are_the_documented_ones():
    d = DEFAULT_LIMITS
    assert (d.max_side, d.max_pixels, d.max_aspect) == (2048, 2048 * 2048, 4.0)
    assert (d.max_series_slices, d.max_series_pixels) == (3000, 3000 * 512 * 512)


def test_a_slice_within_every_limit_passes():
    L.check(70, 70, "ok")  # 4900 px, square
    L.check(100, 50, "ok")  # longest side and aspect exactly at the limit
    L.check(50, 100, "ok", frames=1, min_side=50)
    L.check(50, 50, "ok", frames=2)  # 5000 px in all: at the limit
    L.check(70, 70, "ok", frames=0)  # no frame count is one frame


@pytest.mark.parametrize("w,h,kw,error,message", [
    (0, 10, {}, InputError, "s: image declares 0x10 px; it has no pixels"),
    (10, -1, {}, InputError, "s: image declares 10x-1 px; it has no pixels"),
    (20, 40, {"min_side": 21}, InputError, "s: image is 20x40 px, smaller than the 21 px minimum"),
    (101, 60, {}, ImageTooLargeError, "s: image declares 101x60 px; the largest side allowed is 100 px"),
    (60, 101, {}, ImageTooLargeError, "s: image declares 60x101 px; the largest side allowed is 100 px"),
    (71, 71, {}, ImageTooLargeError, "s: image declares 71x71 px x 1 frame(s); the limit is 5000 pixels"),
    (50, 50, {"frames": 3}, ImageTooLargeError, "s: image declares 50x50 px x 3 frame(s); the limit is 5000 pixels"),
    (100, 49, {}, InputError, "s: image is 100x49 px, aspect ratio over 2:1; a CT slice is roughly square"),
    (24, 50, {}, InputError, "s: image is 24x50 px, aspect ratio over 2:1; a CT slice is roughly square"),
])
def test_each_slice_limit_refuses_one_past_it(w, h, kw, error, message):
    with pytest.raises(error) as info:
        L.check(w, h, "s", **kw)
    assert type(info.value) is error and str(info.value) == message


def test_series_limits():
    assert L.series_excess(10, 20000) is None
    assert L.series_excess(11, 100) == "11 slices; a series may have at most 10 slices"
    assert L.series_excess(11, 100, "frames") == "11 frames; a series may have at most 10 slices"
    assert L.series_excess(4, 20001) == "4 slices declare 20,001 pixels in all; a series may declare at most 20,000"
    L.check_series(10, 20000, "ser")
    with pytest.raises(ImageTooLargeError) as info:
        L.check_series(3, 30000, "ser", "frame(s)")
    assert str(info.value) == "ser: 3 frame(s) declare 30,000 pixels in all; a series may declare at most 20,000"


def _ds(**tags) -> Dataset:
    ds = Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def test_dicom_size_reads_the_header_with_defaults():
    assert dicom_size(_ds(Rows=30, Columns=40), "x") == DicomSize(30, 40, 1, 1, 16)
    size = dicom_size(_ds(Rows=30, Columns=40, NumberOfFrames="3", SamplesPerPixel=3, BitsAllocated=8), "x")
    assert size == DicomSize(30, 40, 3, 3, 8) and size.pixels == 3600 and size.pixel_bytes == 3600 * 3
    assert dicom_size(_ds(Rows=30, Columns=40, NumberOfFrames="0", SamplesPerPixel=0), "x")[2:4] == (1, 1)
    assert dicom_size(_ds(Rows=30, Columns=40, NumberOfFrames=""), "x").frames == 1
    assert DicomSize(3, 3, 1, 1, 1).pixel_bytes == 2  # 9 bits round up to 2 bytes
    assert DicomSize(2, 4, 1, 1, 1).pixel_bytes == 1 and DicomSize(2, 2, 2, 1, 32).pixel_bytes == 32


@pytest.mark.parametrize("tags,message", [
    ({"Columns": 40}, "x: DICOM pixel data without Rows/Columns"),
    ({"Rows": 30}, "x: DICOM pixel data without Rows/Columns"),
    ({"Rows": 30, "Columns": 40, "BitsAllocated": 12}, "x: DICOM BitsAllocated 12 is not a CT slice's 8 or 16"),
    ({"Rows": 30, "Columns": 40, "NumberOfFrames": "-2"}, "x: DICOM declares -2 frames and 1 samples per pixel"),
    ({"Rows": 30, "Columns": 40, "NumberOfFrames": "many"}, "x: DICOM NumberOfFrames is not a number"),
])
def test_dicom_size_refuses_values_no_image_has(tags, message):
    with pytest.raises(InputError) as info:
        dicom_size(dict(tags), "x")  # what the readers call is ds.get(keyword, default)
    assert str(info.value) == message


def test_dicom_int():
    ds = {"Rows": 12, "Columns": ""}
    assert dicom_int(ds, "Rows", None, "x") == 12
    assert dicom_int(ds, "Columns", 7, "x") == 7 and dicom_int(ds, "NumberOfFrames", 1, "x") == 1
    assert dicom_int(ds, "NumberOfFrames", None, "x") is None


def test_an_instance_counts_against_the_slice_and_the_series_limits():
    assert check_dicom_instance(_ds(Rows=50, Columns=50, NumberOfFrames="8"), "i", L) == DicomSize(50, 50, 8, 1, 16)
    assert check_dicom_instance(_ds(Rows=50, Columns=50, SamplesPerPixel=4), "i", L).samples == 4
    with pytest.raises(InputError, match="^i: DICOM declares 5 samples per pixel$"):
        check_dicom_instance(_ds(Rows=50, Columns=50, SamplesPerPixel=5), "i", L)
    with pytest.raises(ImageTooLargeError, match=r"^i: image declares 80x80 px x 1 frame\(s\); the limit is 5000"):
        check_dicom_instance(_ds(Rows=80, Columns=80), "i", L)  # each frame is a slice
    with pytest.raises(ImageTooLargeError, match=r"^i: 9 frame\(s\) declare 22,500 pixels in all"):
        check_dicom_instance(_ds(Rows=50, Columns=50, NumberOfFrames="9"), "i", L)  # all frames: the series
    with pytest.raises(ImageTooLargeError, match=r"^i: 11 frame\(s\); a series may have at most 10 slices"):
        check_dicom_instance(_ds(Rows=10, Columns=10, NumberOfFrames="11"), "i", L)
    with pytest.raises(InputError, match="smaller than the 32 px minimum"):
        check_dicom_instance(_ds(Rows=31, Columns=40), "i", L, min_side=32)
    check_dicom_instance(_ds(Rows=512, Columns=512), "i")  # the default limits take a CT slice


def test_the_smallest_image_and_every_bit_depth_a_slice_may_have():
    L.check(1, 1, "dot")  # no minimum unless the caller sets one
    assert check_dicom_instance(_ds(Rows=1, Columns=1), "dot", L) == DicomSize(1, 1, 1, 1, 16)
    with pytest.raises(InputError, match="^dot: image declares 1x0 px; it has no pixels$"):
        L.check(1, 0, "dot")
    for bits in (1, 8, 16, 32):
        assert dicom_size({"Rows": 2, "Columns": 2, "BitsAllocated": bits}, "x").bits == bits
    with pytest.raises(ImageTooLargeError, match=r"^ser: 11 slices; a series may have at most 10 slices$"):
        L.check_series(11, 0, "ser")


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated"])
def test_a_header_value_that_is_no_number_is_named_with_its_input(keyword):
    header = {"Rows": 30, "Columns": 40, keyword: "n/a"}
    with pytest.raises(InputError) as info:
        check_dicom_instance(header, "scan.dcm", L)
    assert str(info.value) == f"scan.dcm: DICOM {keyword} is not a number"
