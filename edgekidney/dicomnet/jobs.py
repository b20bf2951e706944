"""The job table: one SQLite database (WAL) that follows every series.

States of a series::

    receiving --(no new instance for series_timeout s)--> complete --(processor)--> classified
    classified --> sending --(C-STORE accepted)--> sent          (with a destination)
    classified --> done                                          (without one)
    complete --(processor refused the series)--> failed
    classified, sending, sent, done, failed --(a new instance of it)--> receiving, revision + 1

Instances are keyed by SOP Instance UID: a resent instance changes nothing, except for a series that was
answered as possibly cut short (below), which a resend reopens. A series is keyed by Series Instance
UID; the results it produces have UIDs derived from it and from its revision (see sr.py), so a retry
after a crash sends the same objects again rather than new ones, and an answer made again because more
of the series arrived after it is a new object that names the one it replaces. A series whose images
were deleted (retention) is never reopened: the answer would rest on the new instances alone. Everything that changes state is one
transaction, committed (and on disk) before the caller acts on it. A series is in transfer from its
instance's arrival until the sender releases the association (the SCP says so); one still in transfer
when the listener stopped is marked interrupted, one whose association ended without a release is
marked aborted, each until an instance of it comes in again; an instance refused at C-STORE is
remembered until it is stored. Any of them has the series answered as possibly incomplete
(:meth:`JobTable.gaps`, docs/listener.md).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances(
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series(
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    late_instances INTEGER NOT NULL DEFAULT 0,
    completed_at REAL,
    classified_at REAL,
    sent_at REAL,
    purged_at REAL,
    result_json TEXT,
    result_paths TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    error TEXT,
    in_transfer INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0,
    aborted INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE TABLE IF NOT EXISTS refused(
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    reason TEXT NOT NULL,
    refused_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refused_series ON refused(series_uid);
"""

OPEN_STATES = ("receiving", "complete", "classified", "sending")  # not yet finished: the queue
FINISHED_STATES = ("sent", "done", "failed")
ANSWERED_STATES = ("classified", "sending") + FINISHED_STATES  # its result is made: more of it reopens it
# a series back to receiving for another answer: its quiet time starts now, its delivery is over
_REOPEN = ("UPDATE series SET state='receiving', revision=revision+1, last_at=?, n_instances=n_instances+?, "
           "interrupted=0, aborted=0, in_transfer=1, completed_at=NULL, attempts=0, next_attempt_at=0, error=NULL, "
           "changed=0 WHERE series_uid=?")
# the same, only for a series answered and still holding its images
_REOPEN_ANSWERED = _REOPEN + " AND state IN ('" + "','".join(ANSWERED_STATES) + "') AND purged_at IS NULL"
# more of a series that is receiving (changed=0) or waiting for its answer (changed=1: answered again
# after): its quiet time restarts, it is in transfer, and no longer known to be cut short
_MORE = ("UPDATE series SET last_at=?, n_instances=n_instances+?, interrupted=0, aborted=0, in_transfer=1, "
         "changed=? WHERE series_uid=?")
# the same for a series that changed while it was being answered ('complete'): its flags and quiet time
# are what the change left them
_REOPEN_CHANGED = ("UPDATE series SET state='receiving', revision=revision+1, completed_at=NULL, attempts=0, "
                   "next_attempt_at=0, error=NULL, changed=0 WHERE series_uid=? AND changed=1")


@dataclass
class Gaps:
    """Why the instances stored of a series may not be all of it (docs/listener.md, "Under failure")."""

    interrupted: bool = False  # the listener stopped while it was arriving; nothing of it came after
    aborted: bool = False  # the association carrying it ended without a release; nothing of it came after
    refused: int = 0  # instances of it refused at C-STORE (and not stored since)
    refused_reason: str | None = None  # the last refusal's reason

    def __bool__(self) -> bool:
        return self.interrupted or self.aborted or self.refused > 0


@dataclass
class SeriesRow:
    series_uid: str
    study_uid: str
    state: str
    n_instances: int
    last_at: float
    attempts: int
    result_paths: list[str]
    result_json: dict | None
    revision: int = 0  # which answer of the series these result files are


class JobTable:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives kill -9 (it is in the OS before the call returns), not
        # necessarily a power cut. That is enough here because the table can be rebuilt from what is
        # durable: every instance file is fsync'd before its row is written and recover() re-files any
        # file without a row, and every later transition is idempotent (results have UIDs derived from
        # the series), so a transition lost to a power cut is done again, not differently.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(series)")}
        for column in ("in_transfer", "interrupted", "revision", "aborted", "changed"):  # an earlier table lacks them
            if column not in columns:
                self._db.execute(f"ALTER TABLE series ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self):
        """One write transaction under the table's lock: committed when the block ends, rolled back
        when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- receiving -----------------------------------------------------------------------------------
    def seen_again(self, sop_uid: str, now: float) -> tuple[str, str] | None:
        """``(series_uid, outcome)`` when the instance is already stored, else None. A resend still counts
        as the scanner being busy with the series: a series that is receiving gets its quiet time
        restarted, and is in transfer again ('duplicate'). A series answered as possibly cut short
        (:meth:`gaps`) is reopened by it ('reopened'), one waiting for or being given its answer is
        answered again once that answer is recorded ('changed'): the sender is sending it again, so the
        next answer can be of all of it."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT i.series_uid, s.state, s.interrupted OR s.aborted, s.purged_at FROM instances i "
                "JOIN series s ON s.series_uid=i.series_uid WHERE i.sop_uid=?", (sop_uid,)).fetchone()
            if row is None:
                return None
            series_uid, state, interrupted, purged_at = row
            outcome = "duplicate"
            if state == "receiving":
                # now, not MAX(last_at, now): a resend ends a restart's grace (resume) as a new instance
                # does, and says the sender is sending the series again: it is no longer known to be cut short
                db.execute(_MORE, (now, 0, 0, series_uid))
            elif state in ANSWERED_STATES and interrupted and purged_at is None:
                db.execute(_REOPEN, (now, 0, series_uid))
                outcome = "reopened"
            elif state == "complete" and interrupted:  # being answered: answered again after
                db.execute(_MORE, (now, 0, 1, series_uid))
                outcome = "changed"
            return str(series_uid), outcome

    def add_instance(self, sop_uid: str, series_uid: str, study_uid: str, path: Path, now: float) -> str:
        """Record a stored instance. Returns 'new', 'duplicate' (known SOP Instance UID), 'reopened' (its
        series was answered: it is receiving again, for an answer of all it has now), 'changed' (its
        series is waiting for or being given its answer: answered again once that answer is recorded)
        or 'late' (its series' images were deleted after its answer: kept on disk, in no answer)."""
        with self._transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances(sop_uid, series_uid, path, received_at) VALUES (?,?,?,?)",
                (sop_uid, series_uid, str(path), now))
            if cur.rowcount == 0:
                return "duplicate"
            row = db.execute("SELECT state, purged_at FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO series(series_uid, study_uid, state, first_at, last_at, n_instances, "
                           "in_transfer) VALUES (?,?,'receiving',?,?,1,1)", (series_uid, study_uid, now, now))
                return "new"
            if row[0] == "receiving":
                db.execute(_MORE, (now, 1, 0, series_uid))
                return "new"
            if row[0] in ANSWERED_STATES and row[1] is None:
                db.execute(_REOPEN, (now, 1, series_uid))
                return "reopened"
            if row[0] == "complete":  # being answered from what came before it: answered again after
                db.execute(_MORE, (now, 1, 1, series_uid))
                return "changed"
            db.execute("UPDATE series SET late_instances=late_instances+1 WHERE series_uid=?", (series_uid,))
            return "late"

    def add_refused(self, sop_uid: str, series_uid: str, study_uid: str, reason: str, now: float) -> bool:
        """An instance refused at C-STORE (not stored): its series will be answered as possibly
        incomplete while the instance is missing (:meth:`gaps`); one being answered or answered already
        is answered again. A series none of whose instances was stored gets its row here, and fails
        with the reason when it completes. Returns whether an answered series was reopened."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO refused(sop_uid, series_uid, reason, refused_at) VALUES (?,?,?,?)",
                       (sop_uid, series_uid, reason, now))
            db.execute("INSERT OR IGNORE INTO series(series_uid, study_uid, state, first_at, last_at, n_instances, "
                       "in_transfer) VALUES (?,?,'receiving',?,?,0,1)", (series_uid, study_uid, now, now))
            db.execute("UPDATE series SET last_at=MAX(last_at, ?), in_transfer=1, changed=(state='complete') "
                       "WHERE series_uid=? AND state IN ('receiving','complete')", (now, series_uid))
            return db.execute(_REOPEN_ANSWERED, (now, 0, series_uid)).rowcount > 0

    def transfer_aborted(self, series_uids) -> list[str]:
        """The association that carried these series ended without a release (an A-ABORT from either
        side, a dropped connection, a timeout): what was meant to arrive of them may not have. A series
        still receiving is marked until an instance of it comes in again (:meth:`gaps`), and so is one
        complete that received more while it waited (``changed``: it is receiving again once its answer
        is recorded). One complete and unchanged (its study quiet for the series timeout) or answered is
        left as it is, so that its answer does not depend on how long it waited behind other studies:
        an association kept open, idle, after its series and timed out is no news about them. Returns
        the series marked."""
        with self._transaction() as db:
            db.executemany("UPDATE series SET in_transfer=0 WHERE series_uid=?", [(s,) for s in series_uids])
            marked = [s for s in series_uids if db.execute(
                "UPDATE series SET aborted=1 WHERE series_uid=? AND (state='receiving' OR (state='complete' AND "
                "changed=1))", (s,)).rowcount]
        return marked

    def transfer_ended(self, series_uids) -> None:
        """The sender released the association that carried these series (A-RELEASE, not an abort): what
        it meant to send of them has arrived."""
        with self._lock:
            self._db.executemany("UPDATE series SET in_transfer=0 WHERE series_uid=?", [(s,) for s in series_uids])

    def new_instances(self, after_rowid: int, limit: int = 32) -> list[tuple[int, Path]]:
        """Instances stored after ``after_rowid`` whose series is still receiving (for prefetching)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.rowid, i.path FROM instances i JOIN series s ON s.series_uid=i.series_uid "
                "WHERE i.rowid > ? AND s.state='receiving' AND i.purged=0 ORDER BY i.rowid LIMIT ?",
                (after_rowid, limit)).fetchall()
        return [(r[0], Path(r[1])) for r in rows]

    def known_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances")}

    # -- completion and processing ---------------------------------------------------------------------
    def resume(self, now: float, grace_s: float = 0.0) -> dict[str, int]:
        """After a restart: series still receiving get a fresh completion wait, ``grace_s`` longer than
        the usual one (the scanner may resend what failed when we went down, later than its pauses
        inside a series). One whose transfer was under way when the listener stopped (an association
        carrying it open, not released) is marked interrupted until an instance of it comes in again
        (new or resent): until then what is stored may be only part of it (:meth:`gaps`).
        'sending' is retried like 'classified'."""
        with self._lock:
            # a complete series that changed while waiting for its answer is receiving again once that
            # answer is recorded (_REOPEN_CHANGED keeps these flags and this wait)
            self._db.execute("UPDATE series SET last_at=MAX(last_at, ?), interrupted=MAX(interrupted, in_transfer), "
                             "in_transfer=0 WHERE state='receiving' OR (state='complete' AND changed=1)",
                             (now + max(0.0, grace_s),))
            self._db.execute("UPDATE series SET next_attempt_at=0 WHERE state IN ('classified','sending')")
        return self.counts()

    def complete_quiet(self, now: float, timeout_s: float) -> list[str]:
        """Mark complete every receiving series whose study has had no new instance for ``timeout_s``.

        The study is the unit of quiet: a scanner sends a study's series back to back, and one JSON line
        per study needs all of them."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT series_uid FROM series WHERE state='receiving' AND study_uid IN "
                "(SELECT study_uid FROM series WHERE state='receiving' GROUP BY study_uid HAVING MAX(last_at) <= ?)",
                (now - timeout_s,)).fetchall()
            db.executemany("UPDATE series SET state='complete', completed_at=? WHERE series_uid=?",
                           [(now, r[0]) for r in rows])
        return [r[0] for r in rows]

    def next_complete_study(self) -> tuple[str, list[str]] | None:
        """The complete series of the study that completed first."""
        with self._lock:
            row = self._db.execute(
                "SELECT study_uid FROM series WHERE state='complete' ORDER BY completed_at, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            series = [r[0] for r in self._db.execute(
                "SELECT series_uid FROM series WHERE state='complete' AND study_uid=? ORDER BY first_at, rowid",
                (row[0],))]
        return row[0], series

    def gaps(self, series_uid: str) -> Gaps:
        """Why what is stored of the series may be only part of it; false when nothing says so."""
        with self._lock:
            row = self._db.execute("SELECT interrupted, aborted FROM series WHERE series_uid=?",
                                   (series_uid,)).fetchone()
            refused = self._db.execute(
                "SELECT reason FROM refused r WHERE series_uid=? AND NOT EXISTS "
                "(SELECT 1 FROM instances i WHERE i.sop_uid=r.sop_uid) ORDER BY refused_at, rowid",
                (series_uid,)).fetchall()
        if row is None:
            return Gaps()
        return Gaps(bool(row[0]), bool(row[1]), len(refused), refused[-1][0] if refused else None)

    def revision(self, series_uid: str) -> tuple[int, list[str]]:
        """How many times the series was reopened after an answer, and the result UIDs of the answer
        before (empty for the first, or when the one before made none)."""
        with self._lock:
            row = self._db.execute("SELECT revision, result_json FROM series WHERE series_uid=?",
                                   (series_uid,)).fetchone()
        if row is None or not row[0]:
            return 0, []
        before = json.loads(row[1]) if row[1] else {}
        return int(row[0]), [str(u) for u in before.get("result_uids", [])]

    def instance_paths(self, series_uid: str) -> list[Path]:
        with self._lock:
            return [Path(r[0]) for r in self._db.execute(
                "SELECT path FROM instances WHERE series_uid=? AND purged=0 ORDER BY received_at, rowid",
                (series_uid,))]

    def set_classified(self, series_uid: str, result: dict, result_paths: list[Path], now: float,
                       has_destination: bool) -> bool:
        """Record the answer. True when the series changed while it was being answered (an instance, a
        resend after a gap, a refusal, an abort): the answer stays on record (the JSON line has it) and
        the series is receiving again, for an answer that takes the change in; this one is not delivered."""
        state = "classified" if has_destination and result_paths else "done"
        return self._answered(
            "UPDATE series SET state=?, classified_at=?, result_json=?, result_paths=?, next_attempt_at=0, "
            "error=NULL WHERE series_uid=?",
            (state, now, json.dumps(result), json.dumps([str(p) for p in result_paths]), series_uid), series_uid)

    def set_failed(self, series_uid: str, error: str, now: float) -> bool:
        """Record that the series could not be answered; True as for :meth:`set_classified`."""
        return self._answered("UPDATE series SET state='failed', classified_at=?, error=? WHERE series_uid=?",
                              (now, error, series_uid), series_uid)

    def _answered(self, sql: str, params: tuple, series_uid: str) -> bool:
        """The answer's UPDATE, and the series receiving again if it changed meanwhile, in one transaction."""
        with self._transaction() as db:
            db.execute(sql, params)
            return db.execute(_REOPEN_CHANGED, (series_uid,)).rowcount > 0

    # -- sending ---------------------------------------------------------------------------------------
    def due_for_sending(self, now: float, limit: int = 16) -> list[SeriesRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid, study_uid, state, n_instances, last_at, attempts, result_paths, result_json, "
                "revision FROM series WHERE state IN ('classified','sending') AND next_attempt_at <= ? "
                "ORDER BY classified_at, rowid LIMIT ?", (now, limit)).fetchall()
        return [SeriesRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "[]"),
                          json.loads(r[7]) if r[7] else None, r[8]) for r in rows]

    def mark_sending(self, series_uid: str, revision: int = 0) -> bool:
        """Recorded before the first C-STORE: after a crash the same (deterministic) objects go again.
        False when the row handed out is no longer the series' current answer to send (it reopened, or
        another answer took its place while the sender was busy): nothing is sent then."""
        with self._lock:
            return self._db.execute(
                "UPDATE series SET state='sending' WHERE series_uid=? AND revision=? AND state IN "
                "('classified','sending')", (series_uid, revision)).rowcount > 0

    def mark_sent(self, series_uid: str, now: float, revision: int = 0) -> None:
        """Only from 'sending' and for the answer sent: a series reopened while its answer was on the way
        stays receiving."""
        with self._lock:
            self._db.execute("UPDATE series SET state='sent', sent_at=?, error=NULL "
                             "WHERE series_uid=? AND state='sending' AND revision=?", (now, series_uid, revision))

    def send_failed(self, series_uid: str, error: str, next_attempt_at: float, revision: int = 0) -> int:
        with self._lock:
            self._db.execute("UPDATE series SET attempts=attempts+1, next_attempt_at=?, error=? "
                             "WHERE series_uid=? AND state IN ('classified','sending') AND revision=?",
                             (next_attempt_at, error, series_uid, revision))
            return self._db.execute("SELECT attempts FROM series WHERE series_uid=?", (series_uid,)).fetchone()[0]

    # -- retention -------------------------------------------------------------------------------------
    def due_for_purge(self, now: float, retention_s: float) -> list[str]:
        """Answered series whose answer went out ``retention_s`` ago and whose images are still on disk
        (one whose deletion a crash interrupted included; instances that came after the deletion are
        kept, as "late")."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT series_uid FROM series s WHERE state IN ('sent','done') AND (purged_at IS NULL OR EXISTS "
                "(SELECT 1 FROM instances i WHERE i.series_uid=s.series_uid AND i.purged=0 "
                "AND i.received_at <= s.purged_at)) "
                "AND COALESCE(sent_at, classified_at) <= ?", (now - retention_s,))]

    def claim_purge(self, series_uid: str, now: float) -> bool:
        """Before its files are deleted: the series is marked purged, so that an instance arriving from
        now on no longer reopens it (it would be answered from that instance alone). False when the
        series reopened since it was found due: keep everything."""
        with self._lock:
            return self._db.execute("UPDATE series SET purged_at=COALESCE(purged_at, ?) WHERE series_uid=? AND "
                                    "state IN ('sent','done')", (now, series_uid)).rowcount > 0

    def mark_purged(self, series_uid: str, now: float) -> None:
        """After its files are deleted (:meth:`claim_purge` first): the instances it had when claimed."""
        with self._transaction() as db:
            db.execute("UPDATE series SET purged_at=COALESCE(purged_at, ?) WHERE series_uid=?", (now, series_uid))
            db.execute("UPDATE instances SET purged=1 WHERE series_uid=? AND received_at <= "
                       "(SELECT purged_at FROM series WHERE series_uid=?)", (series_uid, series_uid))

    # -- observation -----------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())

    def queue_depth(self) -> int:
        c = self.counts()
        return sum(c.get(s, 0) for s in OPEN_STATES)

    def series_state(self, series_uid: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        return row[0] if row else None
