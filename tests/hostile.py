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
