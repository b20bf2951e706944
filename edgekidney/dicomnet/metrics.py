"""Listener counters in Prometheus format (prometheus_client, own registry; no identifiers in labels)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server


class ListenerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.instances = Counter("edgekidney_listener_instances_received", "Instances stored and acknowledged",
                                 registry=r)
        self.duplicates = Counter("edgekidney_listener_instances_duplicate",
                                  "Instances received again (same SOP Instance UID), acknowledged, not stored twice",
                                  registry=r)
        self.late = Counter("edgekidney_listener_instances_late",
                            "Instances that arrived after their series was complete and before its answer, or "
                            "after its images were deleted (stored, not in its result)", registry=r)
        self.reopened = Counter("edgekidney_listener_series_reopened",
                                "Answered series receiving again (a new instance, or a resend of one answered "
                                "as possibly cut short): answered again when complete", registry=r)
        self.aborted = Counter("edgekidney_listener_transfers_aborted",
                               "Associations that ended without a release while series they carried were still "
                               "receiving (answered as possibly incomplete unless more of them arrives)", registry=r)
        self.refused = Counter("edgekidney_listener_refused", "Associations or C-STOREs refused", ["reason"],
                               registry=r)
        self.series_completed = Counter("edgekidney_listener_series_completed", "Series complete (quiet)",
                                        registry=r)
        self.series_classified = Counter("edgekidney_listener_series_classified", "Series with a result",
                                         registry=r)
        self.results_sent = Counter("edgekidney_listener_results_sent", "Result objects stored at the destination",
                                    registry=r)
        self.failures = Counter("edgekidney_listener_failures", "Failures by stage", ["stage"], registry=r)
        self.queue_depth = Gauge("edgekidney_listener_queue_depth", "Series not yet finished", registry=r)
        self.store_free_mb = Gauge("edgekidney_listener_store_free_megabytes", "Free space where instances go",
                                   registry=r)
        for reason in ("disk", "policy", "limits"):
            self.refused.labels(reason)
        for stage in ("store", "classify", "send", "webhook"):
            self.failures.labels(stage)

    def bind(self, queue_depth: Callable[[], float], free_mb: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.store_free_mb.set_function(free_mb)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Start /metrics on ``host:port`` in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
