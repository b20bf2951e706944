"""The instance store: every received instance as a DICOM Part 10 file, on disk before it is acknowledged.

Layout under the store folder::

    instances/<series key>/<instance key>.dcm   what the scanner sent, byte for byte (file meta added)
    results/<series key>/<result key>.dcm       SR / Secondary Capture made for that series
    jobs.sqlite                                 the job table (see jobs.py)

Keys are hashes of the UIDs, so no UID (or anything a peer sends) becomes a path component, and
file names do not carry identifiers. Writes go to a temporary file that is fsync'd, renamed into
place, and the folder fsync'd: after ``write_durably`` returns, a crash or power cut cannot lose
the file or leave half of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

TMP_PREFIX = ".tmp-"


def uid_key(uid: str) -> str:
    """A short, stable, path-safe name for a UID (also what logs show instead of the UID)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:20]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync folder)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class InstanceStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.instances = self.root / "instances"
        self.results = self.root / "results"
        for d in (self.root, self.instances, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = set()
        self._lock = threading.Lock()

    def _folder(self, parent: Path, series_uid: str) -> Path:
        d = parent / uid_key(series_uid)
        if d not in self._made:
            with self._lock:
                if not d.is_dir():
                    d.mkdir(parents=True, exist_ok=True)
                    fsync_dir(parent)  # the new folder's entry is durable too
                self._made.add(d)
        return d

    def instance_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.instances / uid_key(series_uid) / f"{uid_key(sop_uid)}.dcm"

    def put_instance(self, series_uid: str, sop_uid: str, data: bytes) -> Path:
        path = self._folder(self.instances, series_uid) / f"{uid_key(sop_uid)}.dcm"
        write_durably(path, data)
        return path

    def put_result(self, series_uid: str, result_uid: str, data: bytes) -> Path:
        path = self._folder(self.results, series_uid) / f"{uid_key(result_uid)}.dcm"
        write_durably(path, data)
        return path

    def remove_series(self, series_uid: str) -> int:
        """Delete a series' received images and the result files made from them (retention, after the
        results went out); returns the number of received images removed."""
        n = 0
        for parent in (self.instances, self.results):
            d = parent / uid_key(series_uid)
            if not d.is_dir():
                continue
            if parent is self.instances:
                n = sum(1 for _ in d.glob("*.dcm"))
            shutil.rmtree(d, ignore_errors=True)
            with self._lock:
                self._made.discard(d)
        return n

    def clean_temporaries(self) -> int:
        """Remove half-written temp files left by a crash (they were never acknowledged)."""
        n = 0
        for p in self.root.rglob(f"{TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1e6
