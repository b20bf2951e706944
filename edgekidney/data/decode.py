"""Decode one CT slice (DICOM, PNG, JPEG) into a 2-D float32 array in 0..1.

No torch here: the on-device runtime and the server decode with this module too.

- DICOM: stored values -> Hounsfield units (RescaleSlope/RescaleIntercept) -> CT window -> 0..1.
- PNG/JPEG, 8-bit: value / 255 (the image is taken as already windowed by whoever exported it).
- PNG, 16-bit: value / 65535, or, when the model's preprocessing names ``png16_hu_offset``,
  HU = value - offset followed by the CT window, exactly as DICOM.
- RGB/RGBA/palette images are converted to grayscale (ITU-R 601 luma, Pillow's "L").

Every problem is raised as :class:`~edgekidney.errors.InputError` (or ``DependencyError`` for a
missing DICOM decoder) with a message that starts with the file's name.

Limits before allocation (docs/architecture.md rule 8): the size an image *declares* (PNG/JPEG
header via Pillow's lazy ``open``, DICOM Rows/Columns/NumberOfFrames/BitsAllocated) is checked
against :class:`DecodeLimits` (:mod:`edgekidney.data.limits`, the one limits object of every input
path) before any pixel is decoded, because decoding, padding to square and resizing allocate from
the declared size (a 790-byte PNG can declare 20000x32 pixels). Too many pixels or too long a side
raises :class:`~edgekidney.errors.ImageTooLargeError` (the server's 413); a degenerate shape raises
``InputError`` (422).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np

from edgekidney.errors import DependencyError, EdgeKidneyError, ImageTooLargeError, InputError
from edgekidney.data.limits import DEFAULT_LIMITS, DecodeLimits, dicom_size  # noqa: F401 - DecodeLimits: re-exported
from edgekidney.data.preprocess import Preprocessing, window_hu

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG: what the bytes are, whatever the name says
DICOM_SUFFIXES = {".dcm", ".dicom"}
DICOM_DECODER_HINT = "pip install 'edgekidney[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) or python-gdcm"


def is_dicom_bytes(head: bytes) -> bool:
    """True when the bytes carry the DICOM Part 10 magic ("DICM" after the 128-byte preamble)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return is_dicom_bytes(fh.read(132))
    except OSError:
        return False


def is_candidate_file(path: Path) -> bool:
    """Files a dataset folder may hold: images by suffix, DICOM by suffix or else by magic (PACS exports name
    files by their UID, "CT.1.2.840....", whose last dotted part is no suffix at all)."""
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    return looks_like_dicom(path)


CT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


def load_slice(path: str | Path, config: Preprocessing, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read and decode one file into a 2-D float32 slice in 0..1."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_slice(data, str(path), config, dicom_hint=path.suffix.lower() in DICOM_SUFFIXES, limits=limits)


def decode_slice(data: bytes, name: str, config: Preprocessing, dicom_hint: bool = False,
                 limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode the bytes of one slice. ``name`` is only used in error messages."""
    if not data:
        raise InputError(f"{name}: empty file")
    try:
        if is_dicom_bytes(data[:132]) or (dicom_hint and not data.startswith(IMAGE_MAGIC)):
            gray = _decode_dicom(data, name, config, limits)
        else:
            gray = _decode_image(data, name, config, limits)
    except (EdgeKidneyError, MemoryError, RecursionError):
        raise
    except Exception as exc:  # decoders of untrusted bytes raise anything (ValueError, NotImplementedError,
        # struct.error, pydicom's BytesLengthException...): a file they cannot read is the file's problem
        kind = "DICOM" if dicom_hint or is_dicom_bytes(data[:132]) else "image"
        raise InputError(f"{name}: malformed {kind} ({_one_line(exc)})") from None
    h, w = gray.shape
    if min(h, w) < config.min_input_size:
        raise InputError(f"{name}: image is {w}x{h} px, smaller than the {config.min_input_size} px minimum")
    if not np.isfinite(gray).all():
        raise InputError(f"{name}: pixel data contains NaN or infinity")
    return gray


def _decode_dicom(data: bytes, name: str, config: Preprocessing, limits: DecodeLimits) -> np.ndarray:
    ds = read_dicom(io.BytesIO(data), name)
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError(f"{name}: DICOM float pixel data is not a CT image edgekidney can read")
        raise InputError(f"{name}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')})")
    file_meta = getattr(ds, "file_meta", None)
    syntax = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    _check_dicom_header(ds, name, syntax, config, limits)  # before any pixel is decoded
    _check_pixel_spacing(ds, name)
    pixels = dicom_pixels(ds, name)
    if pixels.ndim != 2:
        raise InputError(f"{name}: DICOM pixel data has shape {pixels.shape}; expected one grayscale slice")
    try:
        hu = stored_to_hu(pixels, *dicom_rescale(ds))
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    windowed = window_hu(hu, config.window_center, config.window_width)
    if _is_axial(ds):  # lungs, skull, legs in HU: chest, head, leg slices are out of scope (data/anatomy.py)
        from edgekidney.data.anatomy import with_anatomy

        return with_anatomy(windowed, hu)
    return windowed


def _check_pixel_spacing(ds, name: str) -> None:
    from edgekidney.data.geometry import pixel_spacing, pixel_spacing_reason

    try:  # pydicom converts the value when it is read: text in a DS fails here
        spacing = pixel_spacing(ds.get("PixelSpacing"))
    except (TypeError, ValueError):
        return  # unreadable: treated as absent, as a series does
    reason = pixel_spacing_reason(spacing)
    if reason:
        raise InputError(f"{name}: {reason}")


def _is_axial(ds) -> bool:
    """True when ImageOrientationPatient says the slice is axial (absent or unreadable: not known)."""
    from edgekidney.data.geometry import finite_floats, orientation_plane

    try:  # pydicom converts the value when it is read: text in a DS fails here
        iop = finite_floats(ds.get("ImageOrientationPatient"), 6)
    except (TypeError, ValueError):
        return False
    return iop is not None and orientation_plane(iop) == "axial"


# -- reusable DICOM pieces (also used by data/series.py for whole series and multi-frame files) ----
def read_dicom(src, name: str, stop_before_pixels: bool = False):
    """pydicom.dcmread with edgekidney's one-line errors; ``src`` is a path or a binary file object."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(src, force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise InputError(f"{name}: not a readable DICOM file ({_one_line(exc)})") from None
    except RecursionError:
        raise InputError(f"{name}: DICOM header nests sequences too deeply to read") from None
    from edgekidney.data.limits import MAX_SEQUENCE_DEPTH, sequence_depth

    if sequence_depth(ds) > MAX_SEQUENCE_DEPTH:
        raise InputError(f"{name}: DICOM header nests sequences more than {MAX_SEQUENCE_DEPTH} deep")
    # A file cut inside compressed (encapsulated) pixel data: pydicom warns and, forced, returns an empty
    # dataset, which would read as "no Rows/Columns"; say what happened instead.
    if any("End of file reached before delimiter" in str(w.message) for w in caught):
        raise InputError(f"{name}: DICOM pixel data is truncated (the file ends inside its compressed frames)")
    _syntax_from_encoding(ds)
    return ds


def _syntax_from_encoding(ds) -> None:
    """A file without a File Meta Information header (no preamble: an ACR-NEMA style export, or a bare
    dataset) names no transfer syntax, and pydicom then decodes no pixel. When its pixel data is native
    (not encapsulated), the encoding pydicom read the dataset in is its transfer syntax: record it."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:  # dcmread gives every dataset a file_meta, empty without a header
        return
    implicit, little = ds.original_encoding
    if "PixelData" not in ds or _encapsulated(ds) or implicit is None:
        return  # compressed frames: their syntax is not known
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def dicom_pixels(ds, name: str, index: int | None = None) -> np.ndarray:
    """Stored pixel values of a dataset (``index``: one 0-based frame of a multi-frame image, decoded alone)."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if index is None:
                return ds.pixel_array
            from pydicom.pixels import pixel_array

            return pixel_array(ds, index=index)
    except Exception as exc:  # pydicom raises ValueError/RuntimeError/AttributeError/NotImplementedError
        text = _one_line(exc)
        if "missing dependencies" in text or "no available" in text.lower() or "plugins are missing" in text:
            syntax_name = getattr(syntax, "name", str(syntax))
            raise DependencyError(
                f"{name}: compressed DICOM ({syntax_name}) needs a decoder that is not installed: {DICOM_DECODER_HINT}"
            ) from None
        if "less than expected" in text or "truncat" in text.lower():
            raise InputError(f"{name}: DICOM pixel data is truncated ({text})") from None
        raise InputError(f"{name}: cannot decode DICOM pixel data ({text})") from None


def dicom_rescale(ds, frame: int | None = None) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept): per-frame, then shared functional groups (enhanced
    multi-frame), then the top-level attributes; (1, 0) when none is present."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    source = ds
    for group in groups:
        seq = group.get("PixelValueTransformationSequence")
        if seq:
            source = seq[0]
            break
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = source.get(keyword, default)
        try:
            value = float(raw if raw not in (None, "") else default)
        except (TypeError, ValueError):
            raise InputError(f"DICOM {keyword} {str(raw)[:20]!r} is not a number: Hounsfield units cannot be "
                             "computed") from None
        if not math.isfinite(value) or (keyword == "RescaleSlope" and value == 0.0):
            raise InputError(f"DICOM {keyword} {value} cannot map stored values to Hounsfield units")
        values.append(value)
    return values[0], values[1]


def stored_to_hu(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> Hounsfield units, float32; InputError where they leave float32's range (an absurd
    RescaleSlope or RescaleIntercept) or the pixels hold NaN or infinity."""
    with np.errstate(over="ignore", invalid="ignore"):
        hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(hu).all():
        raise InputError(f"pixel values are NaN or infinite in Hounsfield units (RescaleSlope {slope:g}, "
                         f"RescaleIntercept {intercept:g})")
    return hu


def _check_dicom_header(ds, name: str, syntax, config: Preprocessing, limits: DecodeLimits) -> tuple[int, int]:
    """Rows, Columns, frames, samples, bits and the pixel data's length, before any pixel is decoded."""
    size = dicom_size(ds, name)
    rows, cols, frames, samples, bits = size
    limits.check(cols, rows, name, frames, config.min_input_size)  # one slice: all frames count
    compressed = getattr(syntax, "is_compressed", False)
    if syntax is None and _encapsulated(ds):
        raise InputError(f"{name}: compressed DICOM pixel data without a File Meta Information header: no transfer "
                         "syntax names its codec")
    if not compressed:  # native pixel data: its length is known before decoding
        expected = size.pixel_bytes
        try:
            have = len(ds["PixelData"].value or b"")
        except Exception:  # an unreadable element: pydicom's decoder will say what is wrong
            have = expected
        if have < expected:
            raise InputError(f"{name}: DICOM pixel data is truncated ({have} bytes for {cols}x{rows} px x "
                             f"{frames} frame(s) at {bits} bits, {expected} expected)")
    if samples != 1:
        raise InputError(f"{name}: DICOM has {samples} samples per pixel; expected a grayscale CT slice")
    colour = photometric_reason(ds)
    if colour:
        raise InputError(f"{name}: {colour}")
    if frames > 1:
        raise InputError(f"{name}: multi-frame DICOM ({frames} frames); export single slices")
    modality = str(ds.get("Modality", "") or "").upper()
    if not modality:  # Type 1 in every image IOD; a series without it is skipped too
        raise InputError(f"{name}: DICOM has no Modality; edgekidney classifies CT slices (Modality CT)")
    if modality != "CT":
        raise InputError(f"{name}: DICOM modality is {modality}; edgekidney classifies CT slices")
    # what study refuses in a series is refused for one slice too (docs/study.md, "skipped")
    if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        raise InputError(f"{name}: DICOM is a localizer (scout/topogram), not a CT slice")
    sop = sop_class_of(ds)
    if sop and sop not in CT_IMAGE_SOP_CLASSES:
        raise InputError(f"{name}: DICOM SOP class {sop_name(sop) or sop} is not a CT image")
    rescale_type = str(ds.get("RescaleType", "") or "")
    if rescale_type and rescale_type.upper() != "HU":
        raise InputError(f"{name}: DICOM pixel values are not Hounsfield units (RescaleType {rescale_type})")
    return frames, samples


def _encapsulated(ds) -> bool:
    try:
        return "PixelData" in ds and bool(ds["PixelData"].is_undefined_length)
    except Exception:  # an unreadable element: the decoder will say what is wrong
        return False


def photometric_reason(ds) -> str | None:
    """Why a one-sample image is not a grayscale slice (PALETTE COLOR indexes a colour table: its
    values are not densities), or None. An absent value is left to the decoder, which refuses it."""
    value = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if value and value not in ("MONOCHROME1", "MONOCHROME2"):
        return f"PhotometricInterpretation {value}: a colour image, not a grayscale CT slice"
    return None


def file_meta_value(ds, attr: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get(attr, "") or "") if meta is not None else ""


def sop_class_of(ds) -> str:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID (some anonymizers blank the former)."""
    return str(ds.get("SOPClassUID", "") or "") or file_meta_value(ds, "MediaStorageSOPClassUID")


def sop_name(uid: str) -> str:
    """The UID's registered name ("CT Image Storage"), or "" where it has none."""
    from pydicom.uid import UID

    try:
        name = UID(uid).name
    except Exception:  # noqa: BLE001 - an odd UID only loses its name
        return ""
    return "" if name == uid else name


def _decode_image(data: bytes, name: str, config: Preprocessing, limits: DecodeLimits) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limits decide
            im = Image.open(io.BytesIO(data))  # lazy: reads the header only
        with im:
            limits.check(im.width, im.height, name, 1, config.min_input_size)  # only the first frame is ever decoded
            im.load()
            return _image_to_gray(im, name, config)
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a PNG, JPEG or DICOM image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt streams
        raise InputError(f"{name}: corrupt or truncated image ({_one_line(exc)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image too large ({_one_line(exc)})") from None


def _image_to_gray(im, name: str, config: Preprocessing) -> np.ndarray:
    from PIL import Image

    if im.format not in ("PNG", "JPEG", "MPO"):
        raise InputError(f"{name}: {im.format} images are not supported; use PNG, JPEG or DICOM")
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float32)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(f"{name}: 32-bit integer images are not supported; use 8- or 16-bit grayscale")
        if config.png16_hu_offset is not None:
            return window_hu(arr - np.float32(config.png16_hu_offset), config.window_center, config.window_width)
        return arr / np.float32(65535.0)
    if mode == "F":
        raise InputError(f"{name}: floating-point images are not supported; use 8- or 16-bit grayscale")
    if mode != "L":
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("L")
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
