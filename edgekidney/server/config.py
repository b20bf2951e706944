"""The service's options as one typed object (what the CLI fills in and tests construct)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from edgekidney.errors import InputError

API_KEY_ENV = "EDGEKIDNEY_API_KEY"


@dataclass
class ServeConfig:
    model: Path
    backend: str | None = None  # ort | trt; None: from the model's sidecar (an engine runs on trt)
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 8080
    device: str | None = None  # the backend's device (ONNX Runtime: cpu by default; TensorRT: GPU 0)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: ORT's default)
    threshold: float | None = None  # override the sidecar's decision threshold
    max_batch: int = 8  # images per micro-batch; 0 or 1 turns micro-batching off (8: best on 2 CPU cores)
    max_wait_ms: float = 5.0  # how long a batch may wait for more requests that are on their way
    max_body_mb: float = 64.0
    max_images: int = 64  # parts per multipart request
    max_queue: int = 64  # requests admitted at once (decoding or queued); more get 503 + Retry-After
    request_timeout_s: float = 30.0  # a request not answered by then gets 504
    decode_threads: int = 2  # images decoded at once (bounds the memory hostile uploads can take)
    api_key: str | None = None
    graceful_timeout_s: float = 30.0  # after SIGTERM, how long in-flight requests may take
    log_level: str = "info"
    simulate_latency_ms: float = 0.0  # testing only: sleep before each batch (graceful-shutdown test)
    oip_model_name: str = "edgekidney"  # the model's name under /v2/models/ (Open Inference Protocol)

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def validate(self) -> "ServeConfig":
        if not 0 < self.port < 65536:
            raise InputError(f"--port {self.port}: must be in 1..65535")
        if self.max_batch < 0:
            raise InputError(f"--max-batch {self.max_batch}: must be 0 (no batching) or more")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms {self.max_wait_ms}: must not be negative")
        if self.max_body_mb <= 0:
            raise InputError(f"--max-body-mb {self.max_body_mb}: must be positive")
        if self.max_images < 1:
            raise InputError(f"--max-images {self.max_images}: must be at least 1")
        if self.max_queue < 1:
            raise InputError(f"--max-queue {self.max_queue}: must be at least 1")
        if self.request_timeout_s <= 0:
            raise InputError(f"--request-timeout {self.request_timeout_s}: must be positive")
        if self.decode_threads < 1:
            raise InputError(f"--decode-threads {self.decode_threads}: must be at least 1")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold {self.threshold}: must be in 0..1")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None  # an empty variable means no key, not the empty key
        return self
