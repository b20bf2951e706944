"""The Storage SCP: C-ECHO and C-STORE (CT, Enhanced CT), store + fsync + record, then acknowledge.

A C-STORE is answered Success only after the instance is on disk (fsync'd) and in the job table
(committed). Statuses other than success: 0xA700 Out of Resources (store below its free-space floor,
or the write failed), 0xC000 Cannot Understand with an Error Comment when the header declares an
image over the decode limits (docs/architecture.md rule 8: Rows/Columns/NumberOfFrames/
SamplesPerPixel/BitsAllocated are checked before the instance is stored, so nothing that would be
refused later takes disk or, later, memory; resending cannot help, hence not 0xA700), 0xC000
(anything else). When the store is below its floor, new associations are rejected
(A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local-limit-exceeded).
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from typing import Callable

from pydicom import dcmread
from pydicom import uid as _uid
from pydicom.dataset import Dataset

from edgekidney.dicomnet.config import ListenerConfig
from edgekidney.dicomnet.filing import FILING_TAGS, filing_uids
from edgekidney.dicomnet.jobs import JobTable
from edgekidney.dicomnet.metrics import ListenerMetrics
from edgekidney.dicomnet.store import InstanceStore, uid_key
from edgekidney.data.limits import DICOM_SIZE_TAGS, check_dicom_instance
from edgekidney.errors import EdgeKidneyError

log = logging.getLogger("edgekidney.listener")

STORAGE_CLASSES = (_uid.CTImageStorage, _uid.EnhancedCTImageStorage)
CANDIDATE_SYNTAXES = (
    "ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian", "ExplicitVRBigEndian",
    "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless", "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000",
    "HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K", "RLELossless", "JPEGExtended12Bit", "JPEGBaseline8Bit",
)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def decodable_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data this installation can decode (the dicom extra adds the
    JPEG family); only those are accepted, so nothing is stored that cannot be classified."""
    from pydicom.pixels import get_decoder

    out = []
    for name in CANDIDATE_SYNTAXES:
        ts = getattr(_uid, name)
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except (NotImplementedError, ValueError):
            continue
    return out


def server_ssl_context(cfg: ListenerConfig) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    if cfg.tls.ca is not None:
        ctx.load_verify_locations(str(cfg.tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


VERIFICATION = "1.2.840.10008.1.1"


def _uid_name(uid) -> str:
    """A SOP class by its name where pydicom knows it, else its UID."""
    from pydicom.uid import UID

    name = UID(str(uid)).name
    return name if name and name != str(uid) else str(uid)


def _shown_aet(value) -> str:
    """An AE title from the wire as text for a log line: stripped, at most 16 characters, nothing
    unprintable."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value or "").strip()[:16]
    return "".join(c if c.isprintable() else "?" for c in text)


class StorageSCP:
    """Handlers bound to one store, job table and metrics; ``start`` opens the port."""

    def __init__(self, cfg: ListenerConfig, store: InstanceStore, jobs: JobTable, metrics: ListenerMetrics,
                 on_instance: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.store, self.jobs, self.metrics = cfg, store, jobs, metrics
        self.on_instance = on_instance
        self.server = None
        self.syntaxes = decodable_syntaxes()
        self._warned: set[str] = set()
        self._carrying: dict[int, set[str]] = {}  # open association (id) -> the series it stored into
        self._carrying_lock = threading.Lock()
        self.stopping = False  # set by stop(): associations the listener itself closes cut nothing short

    # -- handlers ---------------------------------------------------------------------------------------
    def disk_low(self) -> bool:
        return self.store.free_mb() < self.cfg.min_free_mb

    def handle_requested(self, event) -> None:
        if self.disk_low():
            log.warning("refusing association: store has %.0f MB free, floor is %.0f MB",
                        self.store.free_mb(), self.cfg.min_free_mb)
            self.metrics.refused.labels("disk").inc()
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, presentation, local-limit-exceeded
            event.assoc.kill()

    def handle_rejected(self, event) -> None:
        self.metrics.refused.labels("policy").inc()
        log.warning("association rejected: %s", self.why_rejected(event.assoc))

    def why_rejected(self, assoc) -> str:
        """Which of the listener's rules rejected the association (pynetdicom applies them in this
        order: the calling AE title, the called one, the number of associations). AE titles name
        devices, not patients; they are shown with anything unprintable escaped."""
        rq = assoc.requestor.primitive
        calling, called = (_shown_aet(getattr(rq, name, "")) for name in ("calling_ae_title", "called_ae_title"))
        if self.cfg.require_called_ae and called != self.cfg.ae_title:
            return f"called AE title {called!r} is not ours ({self.cfg.ae_title!r}; --require-called-ae)"
        if self.cfg.allowed_calling and calling not in self.cfg.allowed_calling:
            return f"calling AE title {calling!r} is not in --allow"
        return f"{self.cfg.max_associations} associations already open (--max-associations); from {calling!r}"

    def handle_established(self, event) -> None:
        """Say when a peer asked to store and nothing it proposed can be stored here (say, MR images, or
        a transfer syntax this installation cannot decode): its C-STOREs would all be refused by the
        DICOM layer before any handler sees them."""
        assoc = event.assoc
        proposed = [cx for cx in list(assoc.accepted_contexts) + list(assoc.rejected_contexts)
                    if cx.abstract_syntax != VERIFICATION]
        if not proposed or any(cx.abstract_syntax != VERIFICATION for cx in assoc.accepted_contexts):
            return
        classes = sorted({_uid_name(cx.abstract_syntax) for cx in proposed})
        log.warning("association from %s: none of its %d storage presentation context(s) can be accepted "
                    "(%s%s); this listener stores CT Image Storage and Enhanced CT Image Storage in the "
                    "transfer syntaxes it logged at start", _shown_aet(getattr(assoc.requestor, "ae_title", "")),
                    len(proposed), ", ".join(classes[:3]), f" and {len(classes) - 3} more" if len(classes) > 3 else "")

    def handle_echo(self, event) -> int:
        return SUCCESS

    def _carried(self, event, series_uid: str) -> None:
        with self._carrying_lock:
            self._carrying.setdefault(id(event.assoc), set()).add(series_uid)

    def handle_released(self, event) -> None:
        """The sender released the association: the series it carried have arrived as sent, unless
        another open association still carries them (jobs.JobTable.transfer_ended)."""
        self._ended(event.assoc, released=True)

    def handle_aborted(self, event) -> None:
        """The association ended without a release (an A-ABORT from either side, a dropped connection,
        our network timeout): the series it carried may be cut short (jobs.JobTable.transfer_aborted)."""
        self._ended(event.assoc, released=False)

    def handle_closed(self, event) -> None:
        """The connection closed. Usually after the release or the abort (nothing left to do). The
        connection's thread can report the close before the association's thread reports its
        release, and a connection can die without either: an association still known is settled a
        moment later from what the association itself recorded."""
        with self._carrying_lock:
            known = id(event.assoc) in self._carrying
        if known:
            timer = threading.Timer(self.close_settle_s, self._settle, (event.assoc,))
            timer.daemon = True
            timer.start()

    close_settle_s = 2.0  # how long a closed connection's association may take to report its end

    def _settle(self, assoc) -> None:
        self._ended(assoc, released=bool(getattr(assoc, "is_released", False)))

    def _ended(self, assoc, released: bool) -> None:
        with self._carrying_lock:
            carried = self._carrying.pop(id(assoc), None)
            still = set().union(*self._carrying.values())
        cut = sorted((carried or set()) - still)
        if not cut or self.stopping:  # a listener stopping is not the sender's doing: the restart says it
            return
        if released:
            self.jobs.transfer_ended(cut)
        else:
            marked = self.jobs.transfer_aborted(cut)
            aet = _shown_aet(getattr(assoc.requestor, "ae_title", ""))
            if not marked:  # its series were complete already: an idle association timed out, say
                log.info("association from %s ended without a release after its %d series were complete",
                         aet, len(cut))
                return
            self.metrics.aborted.inc()
            log.warning("association from %s ended without a release while carrying %d series (%s): "
                        "answered as possibly incomplete unless more of them arrives",
                        aet, len(marked), ", ".join(uid_key(s) for s in marked))

    def handle_store(self, event) -> int | Dataset:
        try:
            return self._store(event)
        except OSError as exc:
            self.metrics.failures.labels("store").inc()
            log.error("store failed: %s (answered Out of Resources)", exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        except Exception as exc:  # never let a bad instance take the association down silently
            self.metrics.failures.labels("store").inc()
            log.error("store failed: %s (answered 0xC000)", type(exc).__name__)
            return CANNOT_UNDERSTAND

    def _store(self, event) -> int | Dataset:
        if self.disk_low():
            self.metrics.refused.labels("disk").inc()
            log.warning("C-STORE refused: store below %.0f MB free", self.cfg.min_free_mb)
            return OUT_OF_RESOURCES
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        known = self.jobs.seen_again(sop_uid, time.time())
        if known is not None:
            self._carried(event, known[0])
            self.metrics.duplicates.inc()
            if known[1] in ("reopened", "changed"):
                self._reopened(known[0], "sent again after it was found possibly cut short", known[1])
            return SUCCESS
        data = event.encoded_dataset(include_meta=True)
        head = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=FILING_TAGS + DICOM_SIZE_TAGS)
        study_uid, series_uid, substituted = filing_uids(head)
        refused = self._over_limits(head, sop_uid, series_uid, study_uid)
        if refused is not None:
            self._carried(event, series_uid)
            return refused
        if substituted and series_uid not in self._warned:
            self._warned.add(series_uid)
            log.warning("series %s: instances without Study/Series Instance UID, filed under a substitute key "
                        "(classified, no SR)", uid_key(series_uid))
        path = self.store.put_instance(series_uid, sop_uid, data)
        outcome = self.jobs.add_instance(sop_uid, series_uid, study_uid, path, time.time())
        self._carried(event, series_uid)
        if outcome == "duplicate":
            self.metrics.duplicates.inc()
        else:
            self.metrics.instances.inc()
            if outcome in ("reopened", "changed"):
                self._reopened(series_uid, "a new instance arrived after the series was complete", outcome)
            elif outcome == "late":
                self.metrics.late.inc()
                log.warning("series %s: instance arrived after the series' images were deleted (retention); "
                            "stored, in no answer",
                            uid_key(series_uid))
            self.on_instance()
        return SUCCESS

    def _reopened(self, series_uid: str, why: str, outcome: str = "reopened") -> None:
        if outcome == "reopened":
            self.metrics.reopened.inc()  # a 'changed' series is counted when its answer is in (service)
            log.info("series %s: %s; receiving again, to be answered again when complete", uid_key(series_uid), why)
        else:
            log.info("series %s: %s, while it waits for its answer; to be answered again after it",
                     uid_key(series_uid), why)

    def _over_limits(self, head, sop_uid: str, series_uid: str, study_uid: str) -> Dataset | None:
        """None when the declared image is within the limits; else the failure status to answer (0xC000
        with the one-line reason as Error Comment), counted and logged. The instance is not stored, and
        its series is answered as missing it (jobs.JobTable.add_refused)."""
        try:
            check_dicom_instance(head, "instance", self.cfg.limits)
        except EdgeKidneyError as exc:
            reason = str(exc).removeprefix("instance: ")
            if self.jobs.add_refused(sop_uid, series_uid, study_uid, reason, time.time()):
                self._reopened(series_uid, "an instance of it was refused after the series was complete")
            self.metrics.refused.labels("limits").inc()
            log.warning("C-STORE refused (0xC000): instance %s: %s", uid_key(sop_uid), reason)
            status = Dataset()
            status.Status = CANNOT_UNDERSTAND
            status.ErrorComment = reason[:64].rstrip()  # LO: 64 characters at most (the log has it all)
            return status
        return None

    # -- server -----------------------------------------------------------------------------------------
    def start(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (cfg.acse_timeout_s, cfg.dimse_timeout_s,
                                                                 cfg.network_timeout_s)
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs from the scanner
        if cfg.allowed_calling:
            ae.require_calling_aet = list(cfg.allowed_calling)
        ae.require_called_aet = cfg.require_called_ae
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, self.syntaxes)
        handlers = [(evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_REQUESTED, self.handle_requested), (evt.EVT_REJECTED, self.handle_rejected),
                    (evt.EVT_RELEASED, self.handle_released), (evt.EVT_ABORTED, self.handle_aborted),
                    (evt.EVT_CONN_CLOSE, self.handle_closed),
                    (evt.EVT_ESTABLISHED, self.handle_established)]
        self.server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers,
                                      ssl_context=server_ssl_context(cfg))
        return self.server

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.shutdown()
            self.server = None
