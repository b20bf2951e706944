"""DCMTK, the toolkit most DICOM peers are built on, on both sides of ``edgekidney listen``: ``echoscu`` and
``storescu`` as the scanner, ``storescp`` as the PACS, ``dsrdump`` reading the SR that comes back (and
``dciodvfy`` checking both result objects where dicom3tools is installed).

Needs the Debian package ``dcmtk`` (``bash .ci/pacs.sh``); skips without it, or fails where
``EDGEKIDNEY_REQUIRE_PACS=1`` (CI). pynetdicom installs commands of the same names (``storescu``,
``storescp``), so the DCMTK ones are found by their ``--version`` line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from listener_fixtures import REPO, echo_ok, free_port, jpeg2000_series, tiny_model, wait_for, write_series  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO))
SEARCH = os.pathsep.join(["/usr/bin", "/usr/local/bin", os.environ.get("PATH", "")])


def dcmtk(name: str) -> str | None:
    """The DCMTK command ``name``: the first on the search path whose version line says dcmtk."""
    for folder in SEARCH.split(os.pathsep):
        path = shutil.which(name, path=folder) if folder else None
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def need(*names: str) -> dict[str, str]:
    found = {n: dcmtk(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        reason = f"DCMTK's {', '.join(missing)} not installed (Debian: bash .ci/pacs.sh, i.e. apt-get install dcmtk)"
        if os.environ.get("EDGEKIDNEY_REQUIRE_PACS") == "1":
            pytest.fail(f"EDGEKIDNEY_REQUIRE_PACS=1 but {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture
def started():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def start_listener(started: list, model: Path, store: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    """``edgekidney listen`` as its own process, up and answering C-ECHO; its log goes to ``log``."""
    with open(log, "ab") as fh:
        listener = subprocess.Popen(
            [sys.executable, "-m", "edgekidney.cli", "listen", str(model), "--store", str(store), "--port", str(port),
             "--series-timeout", "1", "--min-free-mb", "0", *extra], stdout=fh, stderr=subprocess.STDOUT, env=ENV,
            cwd=REPO)
    started.append(listener)
    wait_for(lambda: listener.poll() is not None or echo_ok(port), timeout=60, step=0.1)
    assert listener.poll() is None, log.read_text()[-3000:]
    return listener


def results(out: Path) -> dict[str, list[Path]]:
    """Modality -> files storescp wrote (a file it is still writing is left for the next look)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    found: dict[str, list[Path]] = {}
    for f in sorted(out.iterdir()):
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, AttributeError):
            continue
        found.setdefault(str(ds.get("Modality", "")), []).append(f)
    return found


def test_dcmtk_scanner_and_pacs_exchange_a_series_and_its_sr_which_dsrdump_reads_without_complaint(tmp_path, started):
    tools = need("echoscu", "storescu", "storescp", "dsrdump")
    from pydicom import dcmread

    model = tiny_model(tmp_path / "model")
    _, series_uid, files = write_series(tmp_path / "series", 12, seed=21)
    pacs_port, port, out = free_port(), free_port(), tmp_path / "pacs"
    out.mkdir()
    started.append(subprocess.Popen([tools["storescp"], "-aet", "PACS", "-od", str(out), str(pacs_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    start_listener(started, model, tmp_path / "store", port, tmp_path / "listener.log",
                   "--destination", f"127.0.0.1:{pacs_port}:PACS")

    scanner = ["-aet", "SCANNER", "-aec", "EDGEKIDNEY"]
    echo = subprocess.run([tools["echoscu"], *scanner, "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=30)
    assert echo.returncode == 0, echo.stderr
    sent = subprocess.run([tools["storescu"], *scanner, "+sd", "+r", "127.0.0.1", str(port), str(tmp_path / "series")],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0 and "E:" not in sent.stderr, sent.stderr
    assert len(list((tmp_path / "store" / "instances").glob("*/*.dcm"))) == 12

    got = wait_for(lambda: (r := results(out)).get("SR") and r, timeout=60, step=0.2)
    (sr_file,) = got["SR"]
    sr = dcmread(sr_file)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 12
    dump = subprocess.run([tools["dsrdump"], "-v", str(sr_file)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    complaints = [x for x in (dump.stdout + dump.stderr).splitlines() if x.startswith(("E:", "W:", "F:"))]
    assert complaints == [] and "SR Document" in dump.stdout, dump.stdout + dump.stderr
    dciodvfy = shutil.which("dciodvfy", path=SEARCH)
    if dciodvfy:  # dicom3tools too: every result object it holds, as DCMTK's PACS wrote it
        for f in [p for files_ in got.values() for p in files_]:
            r = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, timeout=60)
            assert not [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Error")], (f.name, r.stderr)


def test_dcmtk_storescu_sends_a_jpeg2000_series_when_asked_to_propose_its_syntax(tmp_path, started):
    """DCMTK's storescu proposes uncompressed syntaxes unless told otherwise, and cannot decompress JPEG
    2000 itself: ``-xv`` proposes JPEG 2000 lossless, which the listener accepts (the ``dicom`` extra)."""
    tools = need("storescu")
    pytest.importorskip("openjpeg", reason="decoding JPEG 2000 needs pylibjpeg-openjpeg (the dicom extra)")
    files = jpeg2000_series(tmp_path / "series")  # skips where the test data lack it
    model = tiny_model(tmp_path / "model")
    port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"
    start_listener(started, model, store, port, log)
    sent = subprocess.run([tools["storescu"], "-xv", "-aet", "SCANNER", "-aec", "EDGEKIDNEY", "+sd", "+r",
                           "127.0.0.1", str(port), str(tmp_path / "series")], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0 and "E:" not in sent.stderr, sent.stderr
    from pydicom import dcmread

    stored = list((store / "instances").glob("*/*.dcm"))
    assert len(stored) == len(files)
    assert {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in stored} == {
        "1.2.840.10008.1.2.4.90"}  # stored as sent: JPEG 2000 lossless
    wait_for(lambda: (store / "results.jsonl").is_file() and (store / "results.jsonl").read_text(), timeout=60, step=0.2)
    import json

    (entry,) = json.loads((store / "results.jsonl").read_text().splitlines()[0])["series"]
    assert entry.get("n_slices", entry.get("slices")) == len(files) and "error" not in entry


def test_a_series_dcmtk_stops_sending_after_a_refused_instance_is_never_answered_as_whole(tmp_path, started):
    """storescu stops at the first instance the listener refuses (here one declaring a 60000 px side,
    0xC000 with the reason as Error Comment) and releases the association as if done: the series is
    answered from the slices that came, and its answer says one was refused and why; "no stone" is
    never said of it."""
    tools = need("storescu", "dcmodify")
    import json

    from edgekidney.dicomnet.service import refused_note

    model = tiny_model(tmp_path / "model")
    _, series_uid, files = write_series(tmp_path / "series", 8, seed=23)
    huge = sorted(files)[4]
    r = subprocess.run([tools["dcmodify"], "-nb", "-m", "(0028,0010)=60000", "-m", "(0028,0011)=60000", str(huge)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"
    start_listener(started, model, store, port, log)
    sent = subprocess.run([tools["storescu"], "-aet", "SCANNER", "-aec", "EDGEKIDNEY", "127.0.0.1", str(port),
                           *map(str, sorted(files))], capture_output=True, text=True, timeout=120)
    assert sent.returncode != 0  # storescu says the store failed
    assert "C-STORE refused (0xC000)" in log.read_text()
    stored = len(list((store / "instances").glob("*/*.dcm")))
    assert stored < 8  # the refused one is not stored, and storescu stopped there
    results = store / "results.jsonl"
    wait_for(lambda: results.is_file() and results.read_text(), timeout=60, step=0.2)
    (entry,) = json.loads(results.read_text().splitlines()[0])["series"]
    note = refused_note(1, "image declares 60000x60000 px; the largest side allowed is 2048 px")
    assert entry["series_uid"] == series_uid and entry.get("n_slices", entry.get("slices")) == stored
    assert note in entry["warnings"] and entry["reason"].endswith(note) and entry["decision"] != "no_stone"
