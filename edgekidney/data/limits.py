"""What an input may declare before memory is spent on it (docs/architecture.md rule 8).

One object, :class:`DecodeLimits`, holds every limit, and every path that reads images applies it to
what the input *declares* (an image header, DICOM Rows/Columns/NumberOfFrames/BitsAllocated/
SamplesPerPixel, a NIfTI header's dims), never to what decoding it would give:

- one slice (``max_side``, ``max_pixels``, ``max_aspect``): :mod:`edgekidney.data.decode` for single
  files and the server; each slice (each frame) of a series or of a NIfTI volume;
- one series (``max_series_slices``, ``max_series_pixels``): the slices of a DICOM series
  (:mod:`edgekidney.data.series`), the frames of one multi-frame instance, a NIfTI volume
  (:mod:`edgekidney.data.volume`), the instances the listener (:mod:`edgekidney.dicomnet`) receives.

Over a limit: :class:`~edgekidney.errors.ImageTooLargeError` (the server's 413); a degenerate size
(no pixels, a needle of an image, a nonsense bit depth): ``InputError``. Both are one line that starts
with the input's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from edgekidney.errors import ImageTooLargeError, InputError


@dataclass(frozen=True)
class DecodeLimits:
    """What a CT slice, and a CT series, may declare before anything is decoded.

    A CT slice is 512 px, rarely 1024-2048. A series is a few hundred slices; thin (0.5-0.625 mm)
    reconstructions of chest, abdomen and pelvis reach 2000-3000.
    """

    # px, either side: padding to square makes a float32 copy of side^2 (2048: 17 MB; decoding plus
    # preprocessing a 2048 px slice peaks near 60 MB, a 4096 px one near 215 MB and 1.5 s on 2 cores)
    max_side: int = 2048
    max_pixels: int = 2048 * 2048  # 4.2 MP for one slice (for a single file: all its frames together)
    max_aspect: float = 4.0  # long side / short side; padding to square allocates long side squared
    # One series: slices (files, or frames of multi-frame files) and pixels of all of them together.
    # Axial classification streams one slice at a time; what holds the whole series is the coronal
    # reformat (float16: 2 bytes a pixel, 1.6 GB at this limit), a NIfTI volume (held as stored: int16
    # 1.6 GB) and the per-slice headers (a few kB each).
    max_series_slices: int = 3000
    max_series_pixels: int = 3000 * 512 * 512  # 786 M pixels: 3000 slices of 512 px, 750 of 1024 px

    def check(self, width: int, height: int, name: str, frames: int = 1, min_side: int = 1) -> None:
        """Raise before decoding when the declared size cannot be a slice this pipeline should allocate."""
        if width <= 0 or height <= 0:
            raise InputError(f"{name}: image declares {width}x{height} px; it has no pixels")
        if min(width, height) < min_side:
            raise InputError(f"{name}: image is {width}x{height} px, smaller than the {min_side} px minimum")
        if max(width, height) > self.max_side:
            raise ImageTooLargeError(f"{name}: image declares {width}x{height} px; the largest side allowed "
                                     f"is {self.max_side} px")
        if width * height * max(1, frames) > self.max_pixels:
            raise ImageTooLargeError(f"{name}: image declares {width}x{height} px x {frames} frame(s); "
                                     f"the limit is {self.max_pixels} pixels")
        if max(width, height) > self.max_aspect * min(width, height):
            raise InputError(f"{name}: image is {width}x{height} px, aspect ratio over {self.max_aspect:g}:1; "
                             "a CT slice is roughly square")

    def series_excess(self, slices: int, pixels: int, unit: str = "slices") -> str | None:
        """None when ``slices`` slices (``unit``: slices, frames) of ``pixels`` pixels in all are within
        the series limits; else the one-line reason."""
        if slices > self.max_series_slices:
            return f"{slices} {unit}; a series may have at most {self.max_series_slices} slices"
        if pixels > self.max_series_pixels:
            return (f"{slices} {unit} declare {pixels:,} pixels in all; a series may declare at most "
                    f"{self.max_series_pixels:,}")
        return None

    def check_series(self, slices: int, pixels: int, name: str, unit: str = "slices") -> None:
        reason = self.series_excess(slices, pixels, unit)
        if reason is not None:
            raise ImageTooLargeError(f"{name}: {reason}")


DEFAULT_LIMITS = DecodeLimits()


class DicomSize(NamedTuple):
    """The size of a DICOM image as its header declares it."""

    rows: int
    cols: int
    frames: int
    samples: int
    bits: int

    @property
    def pixels(self) -> int:
        """Pixels of all frames together."""
        return self.rows * self.cols * self.frames

    @property
    def pixel_bytes(self) -> int:
        """Bytes of native (uncompressed) pixel data, all frames."""
        return (self.pixels * self.samples * self.bits + 7) // 8


MAX_SEQUENCE_DEPTH = 32  # sequences within sequences in one DICOM header; a CT image needs a handful


def sequence_depth(ds, cap: int = MAX_SEQUENCE_DEPTH) -> int:
    """How deep a dataset's sequences nest, counted without recursion and no further than ``cap + 1``:
    a header nesting thousands deep would overflow every recursive walk of it (copying, writing)."""
    deepest, stack = 0, [(ds, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > cap:
            break
        for raw in item.elements() if hasattr(item, "elements") else ():
            # a sequence of defined length stays raw bytes until asked for, one level at a time; an
            # implicit VR header names no VR until then
            if raw.VR not in ("SQ", None) and not getattr(raw, "is_undefined_length", False):
                continue
            try:
                element = item[raw.tag]
            except RecursionError:  # a raw sequence nesting thousands deep inside: over any cap
                return cap + 1
            except Exception:  # a value that does not convert is the decoder's to report
                continue
            if element.VR == "SQ":
                stack.extend((child, depth + 1) for child in element.value)
    return deepest


DICOM_SIZE_TAGS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]  # what dicom_size reads


def dicom_int(ds, keyword: str, default: int | None, name: str) -> int | None:
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name}: DICOM {keyword} is not a number") from None


def dicom_size(ds, name: str) -> DicomSize:
    """Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated of a dataset (read with or
    without its pixel data), with one-line errors for values no image has. Sizes are not judged here."""
    rows = dicom_int(ds, "Rows", None, name)
    cols = dicom_int(ds, "Columns", None, name)
    if rows is None or cols is None:
        raise InputError(f"{name}: DICOM pixel data without Rows/Columns")
    frames = dicom_int(ds, "NumberOfFrames", 1, name) or 1
    samples = dicom_int(ds, "SamplesPerPixel", 1, name) or 1
    bits = dicom_int(ds, "BitsAllocated", 16, name)
    if frames < 0 or samples < 0:
        raise InputError(f"{name}: DICOM declares {frames} frames and {samples} samples per pixel")
    if bits not in (1, 8, 16, 32):
        raise InputError(f"{name}: DICOM BitsAllocated {bits} is not a CT slice's 8 or 16")
    return DicomSize(rows, cols, frames, samples, bits)


def check_dicom_instance(ds, name: str, limits: DecodeLimits = DEFAULT_LIMITS, min_side: int = 1) -> DicomSize:
    """The declared size of one instance of a series, checked before any pixel is read: each frame is
    a slice (the slice limits), all frames together count against the series limits."""
    size = dicom_size(ds, name)
    if size.samples > 4:
        raise InputError(f"{name}: DICOM declares {size.samples} samples per pixel")
    limits.check(size.cols, size.rows, name, 1, min_side)
    limits.check_series(size.frames, size.pixels, name, "frame(s)")
    return size
