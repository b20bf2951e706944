"""The listener: SCP threads store instances; a pipeline thread completes, classifies and writes results;
a sender thread delivers them. Each step reads and writes the job table, so any step can be killed and
resumed.

Threads never share anything but the store, the job table and the metrics: a destination that is down
only delays the sender, never receiving or classifying.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from edgekidney.errors import EdgeKidneyError, InputError
from edgekidney.dicomnet.config import ListenerConfig
from edgekidney.dicomnet.filing import FILING_TAGS, filing_uids
from edgekidney.dicomnet.jobs import JobTable
from edgekidney.dicomnet.metrics import ListenerMetrics
from edgekidney.dicomnet.processor import SeriesProcessor
from edgekidney.dicomnet.scp import StorageSCP
from edgekidney.dicomnet.sender import send_files
from edgekidney.dicomnet.sr import encode, revise
from edgekidney.dicomnet.store import InstanceStore, uid_key

log = logging.getLogger("edgekidney.listener")

Processor = SeriesProcessor  # paths (and why they may be part of a series only) -> ProcessResult


# why a series that was arriving when the listener stopped, and got nothing after the restart, is
# answered as possibly incomplete (jobs.JobTable.interrupted; study.rule.decide)
INTERRUPTED = ("the listener stopped while this series was arriving and none of it came in after the restart: "
               "the slices stored may be only part of it (sent again, the series is answered again)")
# why a series whose association ended without a release (an abort, a dropped connection) is answered as
# possibly incomplete (jobs.JobTable.transfer_aborted)
ABORTED = ("the association carrying this series ended without a release (an abort or a dropped connection) "
           "and none of it came in after that: the slices stored may be only part of it (sent again, the "
           "series is answered again)")


def refused_note(n: int, reason: str | None) -> str:
    """Why a series some of whose instances were refused at C-STORE is not all there."""
    return (f"{n} instance(s) of this series were refused when received ({reason}): the slices stored are "
            "not all of it")


def incompleteness(gaps) -> str | None:
    """The warning a series' answer carries when what is stored may be only part of it (None: whole)."""
    notes = ([INTERRUPTED] if gaps.interrupted else []) + ([ABORTED] if gaps.aborted else []) \
        + ([refused_note(gaps.refused, gaps.refused_reason)] if gaps.refused else [])
    return "; ".join(notes) or None


def append_line(path: Path, obj: dict, lock: threading.Lock) -> None:
    """One JSON line, appended and fsync'd."""
    data = (json.dumps(obj, sort_keys=True) + "\n").encode()
    with lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def renamed_uids(summary: dict, renamed: dict[str, str]) -> dict:
    """The summary with its ``result_uids`` (its own, and each of its series') under their new names."""
    out = dict(summary)
    if "result_uids" in out:
        out["result_uids"] = [renamed.get(u, u) for u in out["result_uids"]]
    if isinstance(out.get("series"), list):
        out["series"] = [renamed_uids(e, renamed) if isinstance(e, dict) else e for e in out["series"]]
    return out


def backoff_s(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1, 2, ...): base, 2*base, 4*base, ... capped."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


class Listener:
    def __init__(self, cfg: ListenerConfig, processor: Processor, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.processor = processor
        self.clock = clock
        self.store = InstanceStore(cfg.store)
        self.jobs = JobTable(cfg.store / "jobs.sqlite")
        self.metrics = ListenerMetrics()
        self.metrics.bind(self.jobs.queue_depth, self.store.free_mb)
        self.scp = StorageSCP(cfg, self.store, self.jobs, self.metrics)
        self._stop = threading.Event()
        self._send_wake = threading.Event()
        self._line_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._webhook_q: queue.Queue = queue.Queue()
        self._metrics_server = None
        self._last_purge = 0.0
        self._prefetched = 0  # rowid of the last instance handed to processor.prepare

    # -- lifecycle --------------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Before the port opens: drop half-written temp files, file any instance that reached the disk
        but not the table (a crash between the two; it was not acknowledged), and resume the jobs."""
        removed = self.store.clean_temporaries()
        known = self.jobs.known_paths()
        orphans = 0
        for p in sorted(self.store.instances.glob("*/*.dcm")):
            if str(p) in known:
                continue
            try:
                ds = dcmread(p, stop_before_pixels=True, specific_tags=FILING_TAGS)
                study_uid, series_uid, _ = filing_uids(ds)
                self.jobs.add_instance(str(ds.file_meta.MediaStorageSOPInstanceUID), series_uid, study_uid, p,
                                       self.clock())
                orphans += 1
            except Exception as exc:  # a file we cannot read was never acknowledged: set it aside
                log.warning("unreadable file in store set aside: %s (%s)", p.name, type(exc).__name__)
                p.rename(p.with_suffix(".unreadable"))
        counts = self.jobs.resume(self.clock(), self.cfg.restart_grace_s)
        if removed or orphans or counts:
            log.info("resumed: %s; %d temp files removed, %d instances re-filed", counts, removed, orphans)
        return counts

    def start(self) -> "Listener":
        self.recover()
        try:
            if self.cfg.metrics_port is not None:
                where = f"{self.cfg.metrics_host}:{self.cfg.metrics_port} (metrics)"
                self._metrics_server, _ = self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
            where = f"{self.cfg.host}:{self.cfg.port}"
            self.scp.start()
        except OSError as exc:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            self.jobs.close()
            raise EdgeKidneyError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        for name, target in (("pipeline", self._pipeline_loop), ("sender", self._sender_loop),
                             ("webhook", self._webhook_loop)):
            t = threading.Thread(target=target, name=f"listener-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listening on %s:%d as %s (%d transfer syntaxes); series complete after %.1f s quiet; "
                 "results to %s", self.cfg.host, self.port, self.cfg.ae_title, len(self.scp.syntaxes),
                 self.cfg.series_timeout_s, self.cfg.destination or "the results file only")
        return self

    @property
    def port(self) -> int:
        return self.scp.port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.server_address[1] if self._metrics_server else None

    def stop(self) -> None:
        self.scp.stop()
        self._stop.set()
        self._send_wake.set()
        self._webhook_q.put(None)
        for t in self._threads:
            t.join(timeout=30)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.jobs.close()

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- pipeline: complete -> classify -> result line ---------------------------------------------------
    def _pipeline_loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.pipeline_step()
            except Exception:
                log.exception("pipeline step failed; retrying")
                busy = False
            if not busy:
                self._stop.wait(self.cfg.poll_s)

    def pipeline_step(self) -> bool:
        """One round; True when it processed a study (there may be more waiting)."""
        now = self.clock()
        done = self.jobs.complete_quiet(now, self.cfg.series_timeout_s)
        for s in done:
            self.metrics.series_completed.inc()
            log.info("series %s complete", uid_key(s))
        nxt = self.jobs.next_complete_study()
        if nxt is not None:
            self.process_study(*nxt)
        elif self.prefetch():
            return True
        if self.cfg.retention_s is not None and now - self._last_purge >= min(5.0, self.cfg.retention_s or 1.0):
            self._last_purge = now
            self.purge(now)
        return nxt is not None

    def prefetch(self, limit: int = 32) -> bool:
        """Hand newly stored instances of receiving series to the processor's ``prepare``, if it has one."""
        prepare = getattr(self.processor, "prepare", None)
        if prepare is None:
            return False
        batch = self.jobs.new_instances(self._prefetched, limit)
        if not batch:
            return False
        self._prefetched = batch[-1][0]
        try:
            prepare([p for _, p in batch])
        except Exception as exc:  # prefetching is an optimisation: the final call redoes what failed
            log.warning("prefetch failed: %s", type(exc).__name__)
        return True

    def process_study(self, study_uid: str, series_uids: list[str]) -> dict:
        entries, outcomes = [], []
        for s in series_uids:
            t0 = time.perf_counter()
            try:
                gaps = self.jobs.gaps(s)
                incomplete = incompleteness(gaps)
                if incomplete:
                    log.warning("series %s: %s", uid_key(s), incomplete)
                stored = self.jobs.instance_paths(s)
                if not stored and gaps.refused:
                    raise InputError(f"all {gaps.refused} instance(s) of this series were refused when received "
                                     f"({gaps.refused_reason})")
                res = self.processor(stored, incomplete=incomplete)
                revision, before = self.jobs.revision(s)
                renamed = revise(res.datasets, revision, before) if revision else {}
                paths = [self.store.put_result(s, str(ds.SOPInstanceUID), encode(ds)) for ds in res.datasets]
                summary = dict(res.summary, series_uid=s, seconds=round(time.perf_counter() - t0, 3))
                if revision:  # more of the series came after its answer: this one replaces it
                    summary = dict(renamed_uids(summary, renamed), revision=revision, replaces=before)
                entries.append(summary)
                outcomes.append((s, summary, paths, None))
            except EdgeKidneyError as exc:
                entries.append({"series_uid": s, "error": str(exc)})
                outcomes.append((s, None, [], str(exc)))
            except OSError:  # e.g. the disk is full while writing the SR: the study stays complete, retried
                raise
            except Exception as exc:  # a bug or an exhausted machine: record it, do not loop on it
                log.exception("series %s: processor crashed", uid_key(s))
                err = f"internal error: {type(exc).__name__}"
                entries.append({"series_uid": s, "error": err})
                outcomes.append((s, None, [], err))
        line = {"study_uid": study_uid, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "series": entries}
        # The line first, then the state: a crash in between repeats the line (same result_uids), never loses it.
        append_line(self.cfg.results_file, line, self._line_lock)
        now = self.clock()
        for s, summary, paths, err in outcomes:
            if err is None:
                again = self.jobs.set_classified(s, summary, paths, now, self.cfg.destination is not None)
                self.metrics.series_classified.inc()
                log.info("series %s classified: %s (%d slices)%s", uid_key(s), summary.get("decision"),
                         summary.get("slices", 0),
                         f"; answer {summary['revision'] + 1}, replaces the one before" if "revision" in summary else "")
            else:
                again = self.jobs.set_failed(s, err, now)
                self.metrics.failures.labels("classify").inc()
                log.warning("series %s not classified: %s", uid_key(s), err)
            if again:
                self.metrics.reopened.inc()
                log.info("series %s changed while it was being answered; receiving again, to be answered again "
                         "when complete (that answer is not delivered)", uid_key(s))
        if self.cfg.webhook:
            self._webhook_q.put(line)
        self._send_wake.set()
        return line

    def purge(self, now: float) -> int:
        n = 0
        for s in self.jobs.due_for_purge(now, self.cfg.retention_s):
            if not self.jobs.claim_purge(s, now):  # reopened since: its images are needed again
                continue
            n += self.store.remove_series(s)
            self.jobs.mark_purged(s, now)
            log.info("series %s: received images and result files deleted (retention)", uid_key(s))
        return n

    # -- sender: classified -> sending -> sent ------------------------------------------------------------
    def _sender_loop(self) -> None:
        if self.cfg.destination is None:
            return
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("sender round failed; retrying")
            self._send_wake.wait(self.cfg.poll_s)
            self._send_wake.clear()

    def send_due(self) -> int:
        dest = self.cfg.destination
        sent = 0
        for row in self.jobs.due_for_sending(self.clock()):
            if self._stop.is_set():
                break
            if not self.jobs.mark_sending(row.series_uid, row.revision):
                continue  # reopened, or answered again, since the batch was read: this answer is not sent
            try:
                n = send_files([Path(p) for p in row.result_paths], dest,
                               self.cfg.calling_ae_title or self.cfg.ae_title,
                               timeout_s=min(30.0, self.cfg.dimse_timeout_s))
            except Exception as exc:
                attempts = row.attempts + 1
                delay = backoff_s(attempts, self.cfg.retry_base_s, self.cfg.retry_max_s)
                self.jobs.send_failed(row.series_uid, str(exc), self.clock() + delay, row.revision)
                self.metrics.failures.labels("send").inc()
                log.warning("series %s: result not delivered (attempt %d: %s); retry in %.1f s",
                            uid_key(row.series_uid), attempts, exc, delay)
                continue
            self.jobs.mark_sent(row.series_uid, self.clock(), row.revision)
            self.metrics.results_sent.inc(n)
            sent += n
            log.info("series %s: %d result object(s) delivered to %s", uid_key(row.series_uid), n, dest.ae_title)
        return sent

    # -- webhook (best effort: retried a few times, not across restarts; the results file is the record) --
    def _webhook_loop(self) -> None:
        if not self.cfg.webhook:
            return
        while True:
            line = self._webhook_q.get()
            if line is None:
                return
            for attempt in range(1, 6):
                try:
                    req = urllib.request.Request(self.cfg.webhook, data=json.dumps(line).encode(),
                                                 headers={"Content-Type": "application/json"}, method="POST")
                    with urllib.request.urlopen(req, timeout=10) as rsp:
                        if 200 <= rsp.status < 300:
                            break
                except Exception as exc:
                    log.warning("webhook attempt %d failed: %s", attempt, type(exc).__name__)
                if self._stop.wait(backoff_s(attempt, self.cfg.retry_base_s, self.cfg.retry_max_s)):
                    return
            else:
                self.metrics.failures.labels("webhook").inc()
