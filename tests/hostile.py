"""Hostile inputs shared by the decode, CLI and server tests: tiny files that declare huge images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_declaring(width: int, height: int, bit_depth: int = 8, color_type: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG whose header declares ``width``x``height`` with (by default) a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def thin_png(width: int, height: int) -> bytes:
    """A real, fully decodable grayscale PNG of that size (zeros compress to a few KB)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def dicom_declaring(template: bytes, rows: int, cols: int, frames: int | None = None) -> bytes:
    """A copy of a real CT DICOM whose Rows/Columns (and NumberOfFrames) are rewritten, pixel data kept."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(template), force=True)
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True) if "enforce_file_format" in ds.save_as.__code__.co_varnames \
        else ds.save_as(out, write_like_original=False)
    return out.getvalue()


def dicom_instance_declaring(template: bytes, rows: int, cols: int, frames: int | None = None, **attrs) -> bytes:
    """As :func:`dicom_declaring`, with other attributes set too (SOPInstanceUID, SeriesInstanceUID,
    ImagePositionPatient...), so that the file joins or starts a series as a real instance would."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_declaring(template, rows, cols, frames)), force=True)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def nifti_declaring(path, shape: tuple[int, ...], version: int = 1, dtype=np.int16):
    """A NIfTI file that is its header alone (348 bytes for NIfTI-1, 540 for NIfTI-2, plus the 4-byte
    extension flag; gzipped when ``path`` ends in .gz) declaring a volume of ``shape``."""
    import gzip
    from pathlib import Path

    import nibabel as nib

    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([-1.0, -1.0, 3.0, 1.0]), code=1)
    header.set_sform(np.diag([-1.0, -1.0, 3.0, 1.0]), code=1)
    raw = header.binaryblock + b"\x00" * 4
    path = Path(path)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


class Measured:
    """``with Measured() as m:`` the block's wall time (``m.seconds``) and the peak of Python and numpy
    allocations made during it, in every thread (``m.peak_mb``, tracemalloc: numpy reports its arrays,
    so an array sized from a declared shape shows here even where the OS never commits its pages)."""

    def __enter__(self) -> "Measured":
        import time
        import tracemalloc

        self._started_tracing = not tracemalloc.is_tracing()
        if self._started_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import time
        import tracemalloc

        self.seconds = time.perf_counter() - self._t0
        self.peak_mb = (tracemalloc.get_traced_memory()[1] - self._base) / 2**20
        if self._started_tracing:
            tracemalloc.stop()
