"""The FastAPI app: routes, API key, one log line per request, model warm-up and drain (lifespan).

Routes: ``POST /v1/predict`` (one image as the body, or several as multipart/form-data),
``GET /v1/model``, ``GET /healthz`` (alive), ``GET /readyz`` (model loaded and warmed up),
``GET /metrics`` (Prometheus text). With an API key set, /v1/* and /metrics need it; the probes do not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager

import anyio
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edgekidney import __version__
from edgekidney.runtime.predict import anatomy_shares, decide_outputs
from edgekidney.server.batching import BatcherError, MicroBatcher
from edgekidney.server.config import ServeConfig
from edgekidney.server.inputs import (MULTIPART_TYPE, ClientError, check_content_type, check_declared_length, decode_uploads,
                     read_then, single_upload, split_multipart)
from edgekidney.server.metrics import CONTENT_TYPE, Metrics
from edgekidney.server.oip import add_oip_routes

log = logging.getLogger("edgekidney.server")

ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics")
QUIET = ("/healthz", "/readyz", "/metrics")  # probes and scrapes log at debug level
IMAGES_KEY = "edgekidney.images"  # scope key: images in this request, for the log line


class Service:
    """What the routes share: the classifier, its batcher, the metrics and readiness."""

    def __init__(self, classifier, config: ServeConfig) -> None:
        self.clf = classifier
        self.config = config
        self.pre = classifier.preprocessing
        card = classifier.card
        self.model = {"sha256": card.sha256, "precision": card.precision, "backend": classifier.backend_name,
                      "classes": list(card.classes), "positive_class": card.positive_class,
                      "image_size": card.preprocessing.image_size, "threshold": float(classifier.threshold),
                      "scope_threshold": card.scope_threshold, "outputs": list(card.outputs)}
        self.metrics = Metrics({"sha256": card.sha256, "precision": card.precision,
                                "backend": classifier.backend_name, "positive_class": card.positive_class,
                                "image_size": card.preprocessing.image_size, "version": __version__})
        max_batch = config.max_batch
        engine_max = getattr(classifier.backend, "max_batch", None)  # a TensorRT profile's largest batch
        if engine_max and max_batch > engine_max:
            max_batch = engine_max
        from edgekidney.lineage import threshold_status

        if config.threshold is None:
            status = threshold_status(config.model, card)
            self.model["threshold_status"] = status.message
            if status.stale:
                log.warning(status.message)
        self.batcher = MicroBatcher(self._infer, max_batch, config.max_wait_ms, on_batch=self.metrics.batch_done,
                                    max_queue=config.max_queue)
        self.metrics.ready_when(lambda: self.is_ready)
        self._decode_limiter: anyio.CapacityLimiter | None = None  # made in the event loop (lifespan)
        self.ready = False
        self.not_ready_reason = "model is warming up"

    @property
    def is_ready(self) -> bool:
        """Warmed up and the inference worker alive: what /readyz and edgekidney_ready say."""
        return self.ready and self.batcher.alive

    @property
    def not_ready(self) -> str:
        if self.ready and self.batcher.death:
            return f"inference worker stopped ({self.batcher.death})"
        return self.not_ready_reason if not self.ready else "shutting down"

    # -- the inference thread --------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One row of every model output per image (logits, scope distance, activation map)."""
        if self.config.simulate_latency_ms > 0:
            time.sleep(self.config.simulate_latency_ms / 1000.0)
        outs = self.clf.infer_outputs(batch)
        return [{name: value[i] for name, value in outs.items()} for i in range(len(batch))]

    # -- lifespan ----------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        await self.batcher.start()
        self._decode_limiter = anyio.CapacityLimiter(self.config.decode_threads)
        warm = asyncio.create_task(self._warm_up())
        try:
            yield
        finally:  # uvicorn runs this after the in-flight requests have finished
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await self.batcher.close()  # drains anything still queued
            self.clf.close()
            log.info("stopped: queue drained, model closed")

    async def _warm_up(self) -> None:
        s = self.pre.image_size
        t0 = time.perf_counter()
        try:
            await run_in_threadpool(self._warm_decoders)
            for n in sorted({1, self.batcher.max_batch}):
                await self.batcher.run_alone(np.zeros((n, 3, s, s), dtype=np.float32))
        except Exception as exc:  # the model loaded but cannot run: stay alive, never ready
            self.not_ready_reason = f"warm-up failed: {' '.join(str(exc).split())[:200]}"
            log.error(self.not_ready_reason)
            return
        self.ready = True
        batching = (f"micro-batching up to {self.batcher.max_batch} images, {self.config.max_wait_ms:g} ms wait"
                    if self.batcher.batching else "micro-batching off")
        log.info("ready in %.0f ms: model sha256 %s, %s, backend %s, %s", (time.perf_counter() - t0) * 1000,
                 self.model["sha256"][:12], self.model["precision"], self.model["backend"], batching)

    def _warm_decoders(self) -> None:
        """The first DICOM decode imports pydicom's pixel handlers (~200 ms) and the first preprocessing
        scipy's image tools (the body crop): pay that before ready, not in the first request's deadline."""
        import tempfile
        from pathlib import Path

        from edgekidney.data.synthetic import synth_slice, write_ct_dicom
        from edgekidney.server.inputs import Upload, decode_uploads

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "warm-up.dcm"
                write_ct_dicom(path, synth_slice(np.random.default_rng(0), 64, stone=False), 0, 0, "1.2.3", "1.2.3.4")
                decode_uploads([Upload(path.read_bytes(), "warm-up", dicom=True)], self.pre)  # decode + preprocess
        except Exception as exc:  # only an optimisation: a real upload will say what is wrong
            log.debug("decoder warm-up skipped: %s", type(exc).__name__)

    # -- auth --------------------------------------------------------------------------------
    def require_key(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        supplied = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if supplied is None and auth[:7].lower() == "bearer ":
            supplied = auth[7:].strip()
        if supplied is None or not hmac.compare_digest(supplied.encode("utf-8", "replace"), key.encode("utf-8")):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    # -- predict -----------------------------------------------------------------------------
    async def predict(self, request: Request):
        t0 = time.perf_counter()
        cfg = self.config
        try:
            content_type = request.headers.get("content-type")
            kind = check_content_type(content_type)
            check_declared_length(request.headers.get("content-length"), cfg.max_body_bytes)
            if not self.is_ready:
                return JSONResponse({"detail": self.not_ready, "status": 503}, 503, headers={"Retry-After": "1"})
            want_cam = request.query_params.get("cam", "").lower() in ("1", "true", "yes")
            with self.batcher.announce() as slot:  # admission: 503 when --max-queue requests are in
                # the deadline covers reading the body too (408 when the body is late)
                uploads, (x, geometries), result = await read_then(
                    cfg.request_timeout_s, request.stream(), cfg.max_body_bytes,
                    lambda body: self._decode_run(slot, body, request, kind, content_type))
            rows = result.rows
            decided = decide_outputs(self.clf.card, self.clf.threshold,
                                     {k: np.stack([r[k] for r in rows]) for k in rows[0]}, geometries, want_cam, x)
        except ClientError as exc:
            return JSONResponse(exc.to_dict(), exc.status)
        except ClientDisconnect:
            return JSONResponse({"detail": "client disconnected", "status": 400}, 400)
        except BatcherError as exc:  # 503 overloaded or closing (retry), 500 a failed batch
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return JSONResponse({"detail": str(exc), "status": exc.status}, exc.status, headers=headers)
        except asyncio.TimeoutError:
            return JSONResponse({"detail": f"no answer within {cfg.request_timeout_s:g} s (--request-timeout); "
                                           "the server is overloaded", "status": 504}, 504)
        latency_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        items = []
        pos = self.clf.card.positive_index
        for i, up in enumerate(uploads):
            item = {"label": decided.labels[i], "probability": float(decided.probs[i, pos]),
                    "positive_class": self.model["positive_class"], "threshold": self.model["threshold"],
                    "in_scope": None if decided.in_scope is None else bool(decided.in_scope[i]),
                    "scope_distance": None if decided.distances is None else float(decided.distances[i]),
                    "scope_threshold": self.model["scope_threshold"], "scope_reason": decided.reasons[i],
                    "model_sha256": self.model["sha256"],
                    "precision": self.model["precision"], "backend": self.model["backend"],
                    "batch_size": result.batch_size, "latency_ms": latency_ms}
            item.update(anatomy_shares(decided.geometries[i] if decided.geometries else None))
            peak = decided.peaks[i] if decided.peaks else None
            if peak is not None:
                item["cam_peak"] = list(peak)  # (row, col) of the map's maximum within the body, on the upload
            cam = decided.cams[i]
            if cam is not None:
                item["cam_png"] = await anyio.to_thread.run_sync(self._cam_png, up, cam, peak,
                                                                 limiter=self._decode_limiter)
            if up.part is not None:
                item = {"part": up.part, **item}
            items.append(item)
        return JSONResponse(items if kind == MULTIPART_TYPE else items[0])

    def _cam_png(self, upload, cam: np.ndarray, peak) -> str:
        from edgekidney.runtime.cam import overlay_png_base64
        from edgekidney.data.decode import decode_slice

        return overlay_png_base64(decode_slice(upload.data, upload.name, self.pre, dicom_hint=upload.dicom), cam, peak)

    async def _decode_run(self, slot, body: bytes, request: Request, kind: str, content_type: str):
        uploads, decoded = await anyio.to_thread.run_sync(self._decode, kind, content_type, body, request.scope,
                                                          limiter=self._decode_limiter)
        return uploads, decoded, await slot.submit(decoded[0])

    def _decode(self, kind: str, content_type: str, body: bytes, scope: dict):
        if kind == MULTIPART_TYPE:
            uploads = split_multipart(content_type, body, self.config.max_images)
        else:
            uploads = single_upload(body, kind)
        scope[IMAGES_KEY] = len(uploads)  # for the log line, also when decoding fails
        return uploads, decode_uploads(uploads, self.pre)


class RequestLog:
    """Pure ASGI middleware: one log line and the request metrics per HTTP request.

    The line holds method, path (no query string), status, images and latency -- never a header,
    a body or a DICOM attribute.
    """

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        metrics = self.service.metrics
        metrics.request_started()
        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            path = scope.get("path", "")
            label = path if path in ROUTES else "other"
            metrics.request_finished(scope.get("method", ""), label, status[0], seconds, path == "/v1/predict")
            level = logging.DEBUG if path in QUIET else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s %s %d images=%s %.1f ms", scope.get("method", ""), label, status[0],
                        scope.get(IMAGES_KEY, 0), seconds * 1000.0)


def create_app(classifier, config: ServeConfig) -> FastAPI:
    service = Service(classifier, config)
    app = FastAPI(title="edgekidney", version=__version__, lifespan=service.lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    auth = [Depends(service.require_key)]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 401, 404, 405: same shape as ours
        return JSONResponse({"detail": exc.detail, "status": exc.status_code}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if service.is_ready:
            return {"status": "ready", "model": service.model}
        return JSONResponse({"status": "not ready", "detail": service.not_ready}, 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model", dependencies=auth)
    async def model():
        return {**service.model, "ready": service.is_ready, "max_batch": service.batcher.max_batch,
                "batching": service.batcher.batching, "max_wait_ms": config.max_wait_ms,
                "max_queue": config.max_queue, "request_timeout_s": config.request_timeout_s}

    @app.post("/v1/predict", dependencies=auth)
    async def predict(request: Request):
        try:
            return await service.predict(request)
        except Exception:  # a bug in edgekidney, not the client's: say nothing about the input
            log.exception("internal error while serving /v1/predict")
            return JSONResponse({"detail": "internal error", "status": 500}, 500)

    add_oip_routes(app, service)  # /v2: the Open Inference Protocol (oip.py)
    app.add_middleware(RequestLog, service=service)
    return app
