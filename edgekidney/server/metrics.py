"""The service's Prometheus metrics, kept by ``prometheus_client`` (text format 0.0.4).

One registry per service (tests run several in one process), holding the service's own metrics and
the library's process and platform collectors (``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``python_info``...). ``prometheus_client`` is thread-safe: the event
loop and the inference thread update it without a lock of ours.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               PlatformCollector, ProcessCollector, disable_created_metrics, generate_latest)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# what generate_latest writes (newer prometheus_client releases call the same text "1.0.0" by default)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # no *_created series: timestamps of process start add nothing here


class Metrics:
    def __init__(self, model_info: dict[str, str]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("edgekidney_requests", "HTTP requests by method, path and status.",
                                ["method", "path", "status"], registry=r)
        self.latency = Histogram("edgekidney_request_latency_seconds",
                                 "Time to answer POST /v1/predict (all statuses).", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch_size = Histogram("edgekidney_batch_size",
                                    "Images per inference batch (micro-batching joins requests).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("edgekidney_images", "Images classified.", registry=r)
        self.inflight = Gauge("edgekidney_inflight_requests", "Requests being served now.", registry=r)
        self._ready = Gauge("edgekidney_ready", "1 when the model is loaded, warmed up and its worker alive.",
                            registry=r)
        self._ready.set_function(lambda: 0.0)
        info = Info("edgekidney_model", "The model being served.", registry=r)
        info.info({k: str(v) for k, v in model_info.items()})

    def ready_when(self, is_ready: Callable[[], bool]) -> None:
        """edgekidney_ready reads ``is_ready()`` at every scrape."""
        self._ready.set_function(lambda: float(bool(is_ready())))

    def request_started(self) -> None:
        self.inflight.inc()

    def request_finished(self, method: str, path: str, status: int, seconds: float, predict: bool) -> None:
        self.inflight.dec()
        self.requests.labels(method=method, path=path, status=str(status)).inc()
        if predict:
            self.latency.observe(seconds)

    def batch_done(self, size: int) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
