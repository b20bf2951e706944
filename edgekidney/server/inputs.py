"""Request bodies -> network inputs: content types, the size limit, multipart parts, decoding.

Decoding and preprocessing are the CLI's own (:func:`edgekidney.data.decode.decode_slice`,
:func:`edgekidney.data.preprocess.preprocess_batch`). Everything a client can get wrong becomes a
:class:`ClientError` with a 4xx status and a reason; nothing here lets a client cause a 500.

Privacy: uploads are named ``upload`` or ``part N`` in messages (a multipart *filename* may itself hold
a patient's name, so it is never used), and a DICOM's patient identifiers are scrubbed from any decoder
message before it reaches a response or a log.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from edgekidney.data.decode import decode_slice
from edgekidney.errors import DependencyError, ImageTooLargeError, InputError
from edgekidney.data.preprocess import Geometry, Preprocessing, preprocess_with_geometry

# python-multipart logs every malformed byte it meets at WARNING; the 422 already says what is wrong
logging.getLogger("python_multipart").setLevel(logging.ERROR)

DICOM_TYPES = {"application/dicom"}
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg"}
SINGLE_TYPES = DICOM_TYPES | IMAGE_TYPES
MULTIPART_TYPE = "multipart/form-data"
# inside a multipart body, curl labels .dcm files application/octet-stream: the bytes decide
PART_TYPES = SINGLE_TYPES | {"application/octet-stream"}
ACCEPTED = "application/dicom, image/png, image/jpeg or multipart/form-data"

# DICOM attributes that identify a patient; their values never leave the decoder.
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthName", "OtherPatientIDs",
                "OtherPatientNames", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
                "IssuerOfPatientID", "AccessionNumber", "ReferringPhysicianName", "InstitutionName")


class ClientError(Exception):
    """A request the client must fix: ``status`` (4xx) and a reason safe to show and log."""

    def __init__(self, status: int, reason: str, part: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.part = part

    def to_dict(self) -> dict:
        d = {"detail": self.reason, "status": self.status}
        if self.part is not None:
            d["part"] = self.part
        return d


@dataclass
class Upload:
    data: bytes
    name: str  # "upload" or "part N": never a client-supplied file name
    dicom: bool = False  # the client said application/dicom
    part: int | None = None  # 1-based position in a multipart body


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def check_content_type(header: str | None) -> str:
    """-> the media type of a /v1/predict body, or 415."""
    kind = media_type(header)
    if kind == MULTIPART_TYPE or kind in SINGLE_TYPES:
        return kind
    shown = kind or "none"
    raise ClientError(415, f"unsupported content type {shown[:80]!r}; send {ACCEPTED}")


def check_declared_length(header: str | None, limit: int) -> None:
    """413 before reading anything when Content-Length already says the body is too large."""
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError:
        raise ClientError(400, "Content-Length is not a number") from None
    if declared > limit:
        raise ClientError(413, too_large(limit, declared))


def too_large(limit: int, size: int | None = None) -> str:
    told = f"{size} bytes" if size is not None else "more than that"
    return f"request body is {told}; the limit is {limit} bytes ({limit / 1048576:g} MB, --max-body-mb)"


async def read_limited(chunks, limit: int) -> bytes:
    """Read an async iterator of body chunks, stopping with 413 as soon as it passes ``limit``."""
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ClientError(413, too_large(limit))
        parts.append(chunk)
    return b"".join(parts)


async def read_then(timeout_s: float, chunks, limit: int, then):
    """Read the body (:func:`read_limited`) and ``await then(body)``, all within ``timeout_s``: a slow
    sender cannot hold an admission slot past it. A body that has not arrived in time is the sender's
    fault, 408; past the body the deadline is the server's (``asyncio.TimeoutError``, the callers' 504)."""
    received = False

    async def run():
        nonlocal received
        body = await read_limited(chunks, limit)
        received = True
        return await then(body)

    try:
        return await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        if received:
            raise
        raise ClientError(408, f"request body not received within {timeout_s:g} s (--request-timeout)") from None


def single_upload(body: bytes, kind: str) -> list[Upload]:
    return [Upload(body, "upload", dicom=kind in DICOM_TYPES)]


def split_multipart(content_type: str, body: bytes, max_images: int) -> list[Upload]:
    """Every part of a multipart/form-data body is one image, in order."""
    from python_multipart.exceptions import FormParserError  # MultipartParseError's base: bad boundaries too
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError(422, "multipart body without a boundary in its Content-Type")
    parts: list[dict] = []
    state = {"header": b"", "value": b"", "ended": False}

    def on_part_begin():
        if len(parts) >= max_images:
            raise ClientError(413, f"more than {max_images} images in one request (--max-images)")
        parts.append({"data": bytearray(), "headers": {}})

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    def on_header_field(data, start, end):
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][state["header"].strip().lower()] = state["value"].strip()
        state["header"], state["value"] = b"", b""

    def on_end():
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end, "on_end": on_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise ClientError(422, f"malformed multipart body ({' '.join(str(exc).split())[:120]})") from None
    if not state["ended"]:
        raise ClientError(422, "multipart body is incomplete (no closing boundary)")
    if not parts:
        raise ClientError(422, "multipart body holds no parts; send one image per part")
    uploads = []
    for i, p in enumerate(parts, start=1):
        kind = media_type(p["headers"].get(b"content-type", b"").decode("latin-1"))
        if kind and kind not in PART_TYPES:
            raise ClientError(415, f"part {i}: unsupported content type {kind[:80]!r}; "
                                   "parts must be application/dicom, image/png or image/jpeg", part=i)
        uploads.append(Upload(bytes(p["data"]), f"part {i}", dicom=kind in DICOM_TYPES, part=i))
    return uploads


def decode_uploads(uploads: list[Upload], config: Preprocessing) -> tuple[np.ndarray, list[Geometry]]:
    """Decode and preprocess (the CLI's code) -> ((N, 3, S, S), geometries); the first bad image raises 413/422.

    Each image is preprocessed right after it is decoded, so a request holds one full-size slice at a
    time, not all of its parts at full size. An image declaring more pixels than the decode limits
    allow is 413 (too large); every other bad image is 422.
    """
    s = config.image_size
    out = np.empty((len(uploads), 3, s, s), dtype=np.float32)
    geometries: list[Geometry] = []
    for i, up in enumerate(uploads):
        try:
            gray = decode_slice(up.data, up.name, config, dicom_hint=up.dicom)
        except ImageTooLargeError as exc:
            raise ClientError(413, redact(str(exc), up.data), part=up.part) from None
        except (InputError, DependencyError) as exc:
            raise ClientError(422, redact(str(exc), up.data), part=up.part) from None
        out[i], geometry = preprocess_with_geometry(gray, config)
        geometries.append(geometry)
    return out, geometries


def patient_identifiers(data: bytes) -> list[str]:
    """The values of a DICOM's patient-identifying attributes (best effort; [] when unreadable)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return []
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True,
                                 specific_tags=list(PATIENT_TAGS))
        values = []
        for tag in PATIENT_TAGS:
            v = ds.get(tag)
            if v is None:
                continue
            items = v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]
            for item in items:
                text = str(item).strip()
                values.append(text)
                values.extend(t for t in text.replace("^", " ").split() if len(t) >= 3)  # name components
        return sorted({v for v in values if len(v) >= 2}, key=len, reverse=True)
    except Exception:  # a header too broken to read cannot put its values into a message either
        return []


def redact(message: str, data: bytes) -> str:
    """Remove a DICOM's patient identifiers from a message about it."""
    for value in patient_identifiers(data):
        message = message.replace(value, "[redacted]")
    return message
