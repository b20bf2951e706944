"""The Open Inference Protocol's (KServe v2) REST bodies <-> numpy, with the binary tensor extension.

No web framework here: bytes in, tensors out, tensors in, bytes out, so the rules can be tested alone.

A request is JSON, or (binary tensor extension, what tritonclient sends by default) a JSON header of
``Inference-Header-Content-Length`` bytes followed by each binary input's raw bytes, in the order of
the inputs that declare ``"parameters": {"binary_data_size": K}``. Numbers are little-endian; a BYTES
tensor's elements are each a 4-byte little-endian length and that many bytes. In JSON, ``data`` is the
row-major tensor (flat or nested); BYTES elements in JSON are base64 strings (raw image bytes are not
valid JSON text).

A response is JSON, or the same header-plus-bytes layout for the outputs asked for with
``"binary_data": true`` (or every output with the request parameter ``"binary_data_output": true``).
Everything a client can get wrong raises :class:`OipError` (4xx, ``{"error": "..."}`` on the wire).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
# Protocol datatypes this service reads or writes, and their little-endian numpy types.
NUMPY_TYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1", "UINT8": "|u1"}


class OipError(Exception):
    """A request the client must fix: ``status`` (4xx) and the reason for ``{"error": ...}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # numbers as an array of ``shape``; BYTES as a flat list


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[str] | None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)  # names to send as raw bytes
    binary_all: bool = False  # binary_data_output: every output as raw bytes
    id: str | None = None


def _shape(raw, where: str) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise OipError(400, f"{where}: 'shape' must be a list of non-negative integers")
    return list(raw)


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_infer_request(body: bytes, header_length: str | None, max_elements_bytes: int | None = None
                        ) -> InferRequest:
    """Body (+ the Inference-Header-Content-Length header, if any) -> tensors and what to answer with."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise OipError(400, "Inference-Header-Content-Length is not a number") from None
        if not 0 < n <= len(body):
            raise OipError(400, f"Inference-Header-Content-Length {n} does not fit the {len(body)}-byte body")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        hint = "" if header_length is not None else " (binary tensors need the Inference-Header-Content-Length header)"
        where = f" at byte {exc.pos} of {len(head)}" if hasattr(exc, "pos") else ""
        raise OipError(400, f"request header is not JSON ({getattr(exc, 'msg', exc)}{where}){hint}") from None
    except RecursionError:  # "[[[[..." thousands deep: Python's parser runs out of stack, not the client's JSON
        raise OipError(400, "request header is JSON nested too deeply to be an inference request") from None
    if not isinstance(req, dict):
        raise OipError(400, "request must be a JSON object with 'inputs'")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipError(400, "'parameters' must be an object")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError(400, "'inputs' must be a non-empty list")
    inputs, offset = [], 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _parse_input(raw, i, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise OipError(400, f"{len(binary) - offset} bytes after the binary inputs that no input declares "
                            "(binary_data_size)")
    outputs, binary_outputs = None, set()
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise OipError(400, "'outputs' must be a list")
        outputs = []
        for o in req["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise OipError(400, "each requested output needs a 'name'")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise OipError(400, f"output {o['name']!r}: 'parameters' must be an object")
            if "shared_memory_region" in op:
                raise OipError(400, "shared memory is not supported by this server")
            if op.get("classification"):
                raise OipError(400, "the classification extension is not supported; read 'label'")
            outputs.append(o["name"])
            if op.get("binary_data"):
                binary_outputs.add(o["name"])
    rid = req.get("id")
    return InferRequest(inputs, outputs, binary_outputs, bool(params.get("binary_data_output")),
                        None if rid is None else str(rid))


def _parse_input(raw, i: int, binary: memoryview) -> tuple[Tensor, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise OipError(400, f"input {i}: needs a 'name'")
    name = raw["name"]
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        raise OipError(400, f"{where}: datatype {datatype!r} is not supported here (FP32 tensors or BYTES images)")
    shape = _shape(raw.get("shape"), where)
    count = _count(shape)
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipError(400, f"{where}: 'parameters' must be an object")
    if "shared_memory_region" in params:
        raise OipError(400, "shared memory is not supported by this server")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise OipError(400, f"{where}: both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > len(binary):
            raise OipError(400, f"{where}: binary_data_size {size!r} exceeds the {len(binary)} bytes after the header")
        chunk = bytes(binary[:size])
        if datatype == "BYTES":
            return Tensor(name, datatype, shape, _split_bytes(chunk, count, where)), size
        itemsize = np.dtype(NUMPY_TYPES[datatype]).itemsize
        if size != count * itemsize:
            raise OipError(400, f"{where}: shape {shape} {datatype} needs {count * itemsize} bytes, got {size}")
        return Tensor(name, datatype, shape, np.frombuffer(chunk, NUMPY_TYPES[datatype]).reshape(shape)), size
    if "data" not in raw:
        raise OipError(400, f"{where}: no 'data' and no binary_data_size")
    if datatype == "BYTES":
        items = _flatten(raw["data"])
        if len(items) != count:
            raise OipError(400, f"{where}: shape {shape} holds {count} elements, 'data' has {len(items)}")
        return Tensor(name, datatype, shape, [_b64(x, where, k) for k, x in enumerate(items)]), 0
    try:
        arr = np.asarray(raw["data"], dtype=NUMPY_TYPES[datatype])
    except (TypeError, ValueError):
        raise OipError(400, f"{where}: 'data' is not a list of {datatype} numbers") from None
    if arr.size != count:
        raise OipError(400, f"{where}: shape {shape} holds {count} elements, 'data' has {arr.size}")
    return Tensor(name, datatype, shape, arr.reshape(shape)), 0


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    out = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _b64(item, where: str, k: int) -> bytes:
    if not isinstance(item, str):
        raise OipError(400, f"{where}: element {k} must be a base64 string in JSON")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise OipError(400, f"{where}: element {k} is not base64 (in JSON, BYTES images are base64; "
                            "or send them binary)") from None


def _split_bytes(chunk: bytes, count: int, where: str) -> list[bytes]:
    """4-byte little-endian length, then the bytes, per element."""
    out, pos = [], 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise OipError(400, f"{where}: BYTES element {len(out)} is cut off in its length prefix")
        (n,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + n > len(chunk):
            raise OipError(400, f"{where}: BYTES element {len(out)} declares {n} bytes, {len(chunk) - pos} remain")
        out.append(chunk[pos : pos + n])
        pos += n
    if len(out) != count:
        raise OipError(400, f"{where}: shape holds {count} elements, the binary data has {len(out)}")
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def encode_response(model_name: str, model_version: str, outputs: list[Tensor], binary: set[str],
                    request_id: str | None = None) -> tuple[bytes, int | None]:
    """-> (body, JSON header length or None when the body is all JSON)."""
    entries, blobs = [], []
    for t in outputs:
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.name in binary:
            raw = serialize_bytes(t.data) if t.datatype == "BYTES" else \
                np.ascontiguousarray(t.data, NUMPY_TYPES[t.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t.datatype == "BYTES":
            entry["data"] = [x.decode("utf-8") for x in t.data]  # labels: text
        else:
            entry["data"] = np.asarray(t.data).reshape(-1).tolist()
        entries.append(entry)
    head = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        head["id"] = request_id
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)
