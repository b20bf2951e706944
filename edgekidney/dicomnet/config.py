"""What the listener is told: one dataclass with typed fields and defaults, parsed once by the CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from edgekidney.data.limits import DEFAULT_LIMITS, DecodeLimits
from edgekidney.errors import InputError

_AET = re.compile(r"^[\x20-\x7e]{1,16}$")


def check_ae_title(value: str, what: str = "AE title") -> str:
    """AE titles are 1-16 printable ASCII characters, not all spaces, no backslash."""
    v = value.strip()
    if not v or not _AET.match(value) or "\\" in value:
        raise InputError(f"{what} {value!r}: must be 1-16 printable ASCII characters without backslash")
    return v


@dataclass(frozen=True)
class Destination:
    """Where results go by C-STORE: host, port, called AE title."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> "Destination":
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise InputError(f"--destination {text!r}: expected HOST:PORT:AETITLE, e.g. 127.0.0.1:11112:PACS")
        host, port, aet = parts
        try:
            port_n = int(port)
        except ValueError:
            port_n = -1
        if not 1 <= port_n <= 65535:
            raise InputError(f"--destination {text!r}: port must be a number 1-65535")
        return cls(host.strip("[]"), port_n, check_ae_title(aet, "--destination AE title"))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"


@dataclass(frozen=True)
class TlsConfig:
    """Server-side TLS: our certificate and key; with ``ca`` the peer must present a certificate it signed."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass
class ListenerConfig:
    store: Path
    ae_title: str = "EDGEKIDNEY"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling: tuple[str, ...] = ()  # empty: any calling AE title
    require_called_ae: bool = False  # reject associations addressed to another AE title than ae_title
    max_associations: int = 8
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    series_timeout_s: float = 10.0  # a series is complete after this long without a new instance
    restart_grace_s: float = 120.0  # after a restart, a series that was arriving waits this much longer
    destination: Destination | None = None
    calling_ae_title: str | None = None  # our AE title when sending results (default: ae_title)
    retry_base_s: float = 2.0  # first retry delay; doubles per failure up to retry_max_s
    retry_max_s: float = 300.0
    results_file: Path | None = None  # default: STORE/results.jsonl
    webhook: str | None = None  # POST each study's JSON line here (best effort, retried)
    retention_s: float | None = 24 * 3600.0  # delete received images this long after their result; None keeps them
    min_free_mb: float = 1024.0  # below this, refuse new associations and C-STORE with Out of Resources
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    tls: TlsConfig | None = None
    poll_s: float = 0.2  # how often the pipeline looks for complete series
    limits: DecodeLimits = DEFAULT_LIMITS  # what an instance may declare (docs/architecture.md rule 8)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        self.ae_title = check_ae_title(self.ae_title)
        self.allowed_calling = tuple(check_ae_title(a, "allowed calling AE title") for a in self.allowed_calling)
        if self.calling_ae_title:
            self.calling_ae_title = check_ae_title(self.calling_ae_title)
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port {self.port}: must be 0-65535")
        if self.series_timeout_s <= 0:
            raise InputError("--series-timeout must be positive")
        if self.restart_grace_s < 0:
            raise InputError("--restart-grace must be 0 or more")
        if self.max_associations < 1:
            raise InputError("--max-associations must be at least 1")
        if self.results_file is None:
            self.results_file = self.store / "results.jsonl"
        if self.tls is not None:
            for p in (self.tls.cert, self.tls.key, self.tls.ca):
                if p is not None and not Path(p).is_file():
                    raise InputError(f"TLS file {p}: not found")
