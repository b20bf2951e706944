"""Prometheus text exposition (format 0.0.4), written by hand: no client library needed.

Updated from the event loop and the inference thread, hence one lock.
"""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for le, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{_num(le)}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum!r}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self, model_info: dict[str, str]) -> None:
        self._lock = threading.Lock()
        self.model_info = dict(model_info)
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, path, status)
        self.latency = Histogram(LATENCY_BUCKETS)  # /v1/predict only
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.inflight = 0
        self.ready = False

    def request_started(self) -> None:
        with self._lock:
            self.inflight += 1

    def request_finished(self, method: str, path: str, status: int, seconds: float, predict: bool) -> None:
        with self._lock:
            self.inflight -= 1
            self.requests[(method, path, status)] += 1
            if predict:
                self.latency.observe(seconds)

    def batch_done(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.images += size

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP edgekidney_requests_total HTTP requests by method, path and status.",
                     "# TYPE edgekidney_requests_total counter"]
            for (method, path, status), n in sorted(self.requests.items()):
                lines.append(f"edgekidney_requests_total{_labels({'method': method, 'path': path, 'status': status})} {n}")
            lines += ["# HELP edgekidney_request_latency_seconds Time to answer POST /v1/predict (all statuses).",
                      "# TYPE edgekidney_request_latency_seconds histogram"]
            lines += self.latency.lines("edgekidney_request_latency_seconds")
            lines += ["# HELP edgekidney_batch_size Images per inference batch (micro-batching joins requests).",
                      "# TYPE edgekidney_batch_size histogram"]
            lines += self.batch_size.lines("edgekidney_batch_size")
            lines += ["# HELP edgekidney_images_total Images classified.",
                      "# TYPE edgekidney_images_total counter",
                      f"edgekidney_images_total {self.images}",
                      "# HELP edgekidney_inflight_requests Requests being served now.",
                      "# TYPE edgekidney_inflight_requests gauge",
                      f"edgekidney_inflight_requests {self.inflight}",
                      "# HELP edgekidney_ready 1 when the model is loaded and warmed up.",
                      "# TYPE edgekidney_ready gauge",
                      f"edgekidney_ready {int(self.ready)}",
                      "# HELP edgekidney_model_info The model being served.",
                      "# TYPE edgekidney_model_info gauge",
                      f"edgekidney_model_info{_labels(self.model_info)} 1"]
        return "\n".join(lines) + "\n"
