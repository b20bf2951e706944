"""The Open Inference Protocol (KServe v2 REST) on the service: tritonclient and KServe clients work as is.

``add_oip_routes(app, service)`` adds::

    GET  /v2                                    server metadata
    GET  /v2/health/live | /v2/health/ready     200, or 400 while not ready (the protocol's 4xx = false)
    GET  /v2/models/{name}[/versions/1]         model metadata: inputs, outputs, platform
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer   JSON or the binary tensor extension

Two inputs, send one of them: ``image`` (BYTES, shape [N]: encoded DICOM/PNG/JPEG files, decoded and
preprocessed exactly as /v1/predict and ``edgekidney infer`` do) or the sidecar's input name (FP32
[N, 3, S, S], already preprocessed by the client with :func:`edgekidney.data.preprocess.preprocess_batch`).
Outputs: ``probabilities`` [N, classes], ``label`` (BYTES [N]: a class name or ``out_of_scope``), and
what the model itself returns (``logits``, ``scope_distance``, ``cam``). For raw tensors there is no
slice to look at, so "no patient outline" is not assessed; the feature-distance scope test still is.

Inference runs through the service's micro-batcher (``service.batcher``), so /v1 and /v2 requests share
batches and the same limits (docs/architecture.md rule 9: 503 + Retry-After when --max-queue requests
are in, 504 past --request-timeout). Errors are the protocol's ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import anyio
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from edgekidney import __version__
from edgekidney.runtime.predict import decide_outputs
from edgekidney.data.preprocess import Geometry
from edgekidney.server.batching import BatcherError
from edgekidney.server.inputs import ClientError, Upload, check_declared_length, decode_uploads, read_then
from edgekidney.server.oip_codec import HEADER_LENGTH, InferRequest, OipError, Tensor, encode_response, parse_infer_request

log = logging.getLogger("edgekidney.server")

IMAGE_INPUT = "image"
VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
PLATFORMS = {"ort": "onnxruntime_onnx", "trt": "tensorrt_plan"}


def error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status, headers=headers)


def raw_geometry(size: int) -> Geometry:
    """A client-preprocessed tensor: the network grid is the image, and no body check was possible."""
    return Geometry(shape=(size, size), crop=(0, size, 0, size), side=size, pad_top=0, pad_left=0, size=size,
                    body_found=True, body_fraction=float("nan"))


class OipModel:
    """One served model as the protocol describes it."""

    def __init__(self, service, name: str) -> None:
        self.service = service
        self.name = name
        card = service.clf.card
        self.size = card.preprocessing.image_size
        self.tensor_input = card.input_name
        n = len(card.classes)
        self.output_shapes = {"probabilities": [-1, n], "label": [-1]}
        for out in card.outputs:
            self.output_shapes[out] = {"logits": [-1, n], "scope_distance": [-1]}.get(out, [-1, -1, -1])

    def ready(self) -> bool:
        return self.service.is_ready  # warmed up and the inference worker alive

    def not_ready_reason(self) -> str:
        return self.service.not_ready

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [VERSION],
                "platform": PLATFORMS.get(self.service.model["backend"], "onnxruntime_onnx"),
                "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                           {"name": self.tensor_input, "datatype": "FP32", "shape": [-1, 3, self.size, self.size]}],
                "outputs": [{"name": k, "datatype": "BYTES" if k == "label" else "FP32", "shape": v}
                            for k, v in self.output_shapes.items()],
                "parameters": {"classes": list(self.service.model["classes"]),
                               "positive_class": self.service.model["positive_class"],
                               "threshold": self.service.model["threshold"],
                               "scope_threshold": self.service.model["scope_threshold"],
                               "sha256": self.service.model["sha256"],
                               "precision": self.service.model["precision"]}}

    def config(self) -> dict:
        """Triton's model configuration (JSON form), with the sidecar as ``parameters.edgekidney_sidecar``
        as export-triton writes it: what a client needs to preprocess and decide by itself."""
        def tensor(name, shape, kind="TYPE_FP32"):
            return {"name": name, "data_type": kind, "dims": shape[1:] or [1]}

        card = self.service.clf.card
        return {"name": self.name, "platform": PLATFORMS.get(self.service.model["backend"], "onnxruntime_onnx"),
                "max_batch_size": self.service.batcher.max_batch,
                "input": [tensor(IMAGE_INPUT, [-1], "TYPE_STRING"),
                          tensor(self.tensor_input, [-1, 3, self.size, self.size])],
                "output": [tensor(k, v, "TYPE_STRING" if k == "label" else "TYPE_FP32")
                           for k, v in self.output_shapes.items()],
                "parameters": {"edgekidney_sidecar": {"string_value": json.dumps(card.to_dict(), sort_keys=True)}}}

    # -- infer ---------------------------------------------------------------------------------
    def to_batch(self, req: InferRequest, max_images: int, scope: dict) -> tuple[np.ndarray, list]:
        """The one input of the request -> ((N, 3, S, S), geometries); decoding happens here."""
        known = {IMAGE_INPUT, self.tensor_input}
        unknown = [t.name for t in req.inputs if t.name not in known]
        if unknown:
            raise OipError(400, f"unknown input {unknown[0]!r}; this model takes {IMAGE_INPUT!r} (BYTES) "
                                f"or {self.tensor_input!r} (FP32)")
        if len(req.inputs) != 1:
            raise OipError(400, f"send one input: {IMAGE_INPUT!r} or {self.tensor_input!r}")
        t = req.inputs[0]
        if t.name == IMAGE_INPUT:
            return self._images(t, max_images, scope)
        return self._tensor(t, max_images, scope)

    def _images(self, t: Tensor, max_images: int, scope: dict) -> tuple[np.ndarray, list]:
        if t.datatype != "BYTES":
            raise OipError(400, f"input {IMAGE_INPUT!r} must be BYTES (encoded DICOM/PNG/JPEG), not {t.datatype}")
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
            raise OipError(400, f"input {IMAGE_INPUT!r}: shape must be [N] or [N, 1], got {t.shape}")
        n = len(t.data)
        if n == 0:
            raise OipError(400, f"input {IMAGE_INPUT!r} holds no images")
        if n > max_images:
            raise OipError(413, f"{n} images in one request; the limit is {max_images} (--max-images)")
        scope["edgekidney.images"] = n
        uploads = [Upload(data, f"element {k}") for k, data in enumerate(t.data)]
        try:
            return decode_uploads(uploads, self.service.pre)  # messages name the element ("element 2: ...")
        except ClientError as exc:
            raise OipError(exc.status, exc.reason) from None

    def _tensor(self, t: Tensor, max_images: int, scope: dict) -> tuple[np.ndarray, list]:
        s = self.size
        if t.datatype != "FP32":
            raise OipError(400, f"input {self.tensor_input!r} must be FP32, not {t.datatype}")
        if len(t.shape) != 4 or t.shape[1:] != [3, s, s] or t.shape[0] < 1:
            raise OipError(400, f"input {self.tensor_input!r}: shape must be [N, 3, {s}, {s}] (preprocessed "
                                f"slices), got {t.shape}")
        if t.shape[0] > max_images:
            raise OipError(413, f"{t.shape[0]} images in one request; the limit is {max_images} (--max-images)")
        x = np.ascontiguousarray(t.data, dtype=np.float32)
        if not np.isfinite(x).all():
            raise OipError(400, f"input {self.tensor_input!r} contains NaN or infinity")
        scope["edgekidney.images"] = len(x)
        return x, [raw_geometry(s) for _ in range(len(x))]

    def outputs(self, req: InferRequest, rows: list[dict], geometries: list) -> list[Tensor]:
        clf = self.service.clf
        stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        decided = decide_outputs(clf.card, clf.threshold, stacked, geometries)
        n = len(rows)
        all_out = {"probabilities": decided.probs.astype(np.float32),
                   "label": [lab.encode() for lab in decided.labels]}
        for k, v in stacked.items():
            all_out[k] = np.asarray(v, dtype=np.float32)
        names = list(all_out) if req.outputs is None else req.outputs
        out = []
        for name in names:
            if name not in all_out:
                raise OipError(400, f"unknown output {name!r}; this model gives {', '.join(all_out)}")
            v = all_out[name]
            out.append(Tensor(name, "BYTES", [n], v) if name == "label" else Tensor(name, "FP32", list(v.shape), v))
        return out


def add_oip_routes(app: FastAPI, service, name: str | None = None) -> OipModel:
    """Register the /v2 routes on ``app`` for ``service`` (see the module doc)."""
    model = OipModel(service, name or getattr(service.config, "oip_model_name", None) or "edgekidney")

    def auth(request: Request) -> JSONResponse | None:
        try:
            service.require_key(request)
        except HTTPException as exc:
            return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
        return None

    def find(name: str, version: str | None) -> JSONResponse | None:
        if name != model.name:
            return error(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version is not None and version != VERSION:
            return error(404, f"model {name!r} has no version {version!r}; it has {VERSION!r}")
        return None

    @app.get("/v2")
    async def server_metadata(request: Request):
        return (auth(request) or {"name": "edgekidney", "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if model.ready():
            return {"ready": True}
        return JSONResponse({"ready": False, "error": model.not_ready_reason()}, 400)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None):
        bad = find(name, version)  # open like /readyz: orchestrators probe without a key
        if bad:
            return bad
        if model.ready():
            return {"name": name, "ready": True}
        return JSONResponse({"name": name, "ready": False, "error": model.not_ready_reason()}, 400)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None):
        return auth(request) or find(name, version) or model.metadata()

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(request: Request, name: str, version: str | None = None):
        return auth(request) or find(name, version) or model.config()

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None):
        bad = auth(request) or find(name, version)
        if bad:
            return bad
        try:
            return await _infer(model, request)
        except Exception:  # a bug in edgekidney, not the client's: say nothing about the input
            log.exception("internal error while serving %s", request.url.path)
            return error(500, "internal error")

    return model


async def _infer(model: OipModel, request: Request) -> Response:
    service, cfg = model.service, model.service.config
    t0 = time.perf_counter()
    try:
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise OipError(415, "compressed requests are not supported; send them uncompressed")
        try:
            check_declared_length(request.headers.get("content-length"), cfg.max_body_bytes)
        except ClientError as exc:
            raise OipError(exc.status, exc.reason) from None
        if not model.ready():
            return error(503, model.not_ready_reason(), {"Retry-After": "1"})
        with service.batcher.announce() as slot:  # admission: 503 when --max-queue requests are in
            # the deadline covers reading the body too (408 when the body is late), as on /v1
            req, (x, geometries), result = await read_then(cfg.request_timeout_s, request.stream(), cfg.max_body_bytes,
                                                           lambda body: _decode_run(model, slot, body, request))
        outputs = model.outputs(req, result.rows, geometries)
    except OipError as exc:
        return error(exc.status, exc.reason)
    except ClientError as exc:
        return error(exc.status, exc.reason)
    except ClientDisconnect:
        return error(400, "client disconnected")
    except BatcherError as exc:  # 503 overloaded or closing (retry), 500 a failed batch
        return error(exc.status, str(exc), {"Retry-After": "1"} if exc.status == 503 else None)
    except asyncio.TimeoutError:
        return error(504, f"no answer within {cfg.request_timeout_s:g} s (--request-timeout); the server is overloaded")
    binary = {t.name for t in outputs} if req.binary_all else req.binary_outputs
    body, head = encode_response(model.name, VERSION, outputs, binary, req.id)
    headers = {"X-Edgekidney-Batch-Size": str(result.batch_size),
               "X-Edgekidney-Latency-Ms": f"{(time.perf_counter() - t0) * 1000.0:.3f}"}
    if head is None:
        return Response(body, 200, headers=headers, media_type="application/json")
    headers["Inference-Header-Content-Length"] = str(head)
    return Response(body, 200, headers=headers, media_type="application/octet-stream")


async def _decode_run(model: OipModel, slot, body: bytes, request: Request):
    cfg = model.service.config
    limiter = model.service._decode_limiter  # bounded decoding, shared with /v1
    req = await anyio.to_thread.run_sync(parse_infer_request, body, request.headers.get(HEADER_LENGTH), limiter=limiter)
    x, geometries = await anyio.to_thread.run_sync(model.to_batch, req, cfg.max_images, request.scope, limiter=limiter)
    return req, (x, geometries), await slot.submit(x)
