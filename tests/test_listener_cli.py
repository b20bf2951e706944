"""`edgekidney listen` as a process, with pynetdicom's own apps as the scanner (storescu) and the PACS
(storescp): a synthetic series and the shared JPEG 2000 series end to end, and kill -9 mid-series and
after the last instance: nothing acknowledged is missing, exactly one SR per series arrives.

The PACS may see the same SR twice after a crash between its C-STORE and recording it as sent (the
same SOP Instance UID, stored once by any PACS): the tests count distinct SR SOP Instance UIDs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("prometheus_client")

from listener_fixtures import REPO, echo_ok, Pacs, free_port, jpeg2000_series, tiny_model, write_series  # noqa: E402
from listener_fixtures import wait_for as fixtures_wait_for  # noqa: E402

from edgekidney.dicomnet.sr import result_uids  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def wait_for(cond, timeout: float = 20.0, step: float = 0.05):
    return fixtures_wait_for(cond, timeout, step)  # subprocesses start slower: a longer default


STARTED: list["Proc"] = []


class Proc:
    """A listener process; its log goes to a file (read by the tests for identifiers)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.fh = open(log, "ab")
        self.p = subprocess.Popen(args, stdout=self.fh, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        STARTED.append(self)

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        self.fh.close()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.fh.close()


@pytest.fixture(autouse=True)
def no_listener_left_behind():
    """A failing test must not leave a listener running."""
    yield
    while STARTED:
        STARTED.pop().stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def pacs(tmp_path):
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "pynetdicom", "storescp", str(port), "-aet", "PACS", "-od", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    yield port, out
    p.terminate()
    p.wait(10)


def sr_uids(out: Path) -> set[str]:
    """SOP Instance UIDs of the SRs storescp wrote (Secondary Captures aside; a file it is still
    writing is skipped this time)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    uids = set()
    for f in out.iterdir():
        try:
            ds = dcmread(f)
        except (InvalidDicomError, EOFError, OSError, AttributeError):
            continue
        if ds.get("Modality") == "SR":
            uids.add(str(ds.SOPInstanceUID))
    return uids


def start_listener(model: Path, store: Path, port: int, pacs_port: int, log: Path, *extra: str) -> Proc:
    proc = Proc([sys.executable, "-m", "edgekidney.cli", "listen", str(model), "--store", str(store),
                 "--port", str(port), "--series-timeout", "1", "--destination", f"127.0.0.1:{pacs_port}:PACS",
                 "--min-free-mb", "0", "--retry-base", "0.2", "--retry-max", "1", "--restart-grace", "0", *extra], log)
    wait_for(lambda: proc.p.poll() is not None or echo_ok(port), timeout=30)
    assert proc.p.poll() is None, log.read_text()
    return proc


def storescu(port: int, *paths: Path, background: bool = False, out: Path | None = None):
    args = [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), *map(str, paths),
            "-aet", "SCANNER", "-aec", "EDGEKIDNEY", "-cx", "-v"]
    if background:
        return subprocess.Popen(args, stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=ENV)
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)


def acknowledged(storescu_log: str) -> list[str]:
    """Files storescu got Success for: 'Sending file: X' followed by a 0x0000 response."""
    out, current = [], None
    for line in storescu_log.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Status: 0x0000" in line and current:
            out.append(current)
            current = None
    return out


def stored_sop_uids(store: Path) -> set[str]:
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
            for p in (store / "instances").glob("*/*.dcm")}


def sop_uid(path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_storescu_synthetic_and_jpeg2000_series_to_storescp(model, pacs, tmp_path):
    pytest.importorskip("openjpeg")
    pacs_port, pacs_out = pacs
    study, series, _ = write_series(tmp_path / "synth", 10, seed=5)
    jfiles = jpeg2000_series(tmp_path / "j2k")
    jseries = str(__import__("pydicom").dcmread(jfiles[0]).SeriesInstanceUID)
    port, mport, store = free_port(), free_port(), tmp_path / "store"
    proc = start_listener(model, store, port, pacs_port, tmp_path / "listener.log", "--metrics-port", str(mport))
    try:
        for folder in (tmp_path / "synth", tmp_path / "j2k"):
            r = storescu(port, folder)
            assert r.returncode == 0 and len(acknowledged(r.stdout + r.stderr)) == len(list(folder.iterdir()))
        wait_for(lambda: len(sr_uids(pacs_out)) == 2)
        assert sr_uids(pacs_out) == {result_uids(series)[0], result_uids(jseries)[0]}
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert "edgekidney_listener_instances_received_total 30.0" in metrics
        objects = sum(len(e["result_uids"]) for line in (store / "results.jsonl").read_text().splitlines()
                      for e in json.loads(line)["series"])  # SR, and with the study analysis a Secondary Capture
        assert objects >= 2
        wait_for(lambda: f"edgekidney_listener_results_sent_total {objects:.1f}" in
                 urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode())
    finally:
        proc.stop()
    lines = [json.loads(x) for x in (store / "results.jsonl").read_text().splitlines()]
    assert sorted(e["slices"] for line in lines for e in line["series"]) == [10, 20]
    log = (tmp_path / "listener.log").read_text()
    assert "listening on 127.0.0.1" in log and "delivered" in log
    first_sop = sop_uid(sorted((tmp_path / "synth").glob("*.dcm"))[0])
    for identifier in ("SYNTH-S0005", "Synthetic^Phantom", study, series, jseries, first_sop):
        assert identifier not in log  # logs carry hashed keys only


# in the default run: three listener starts and 120 C-STOREs, ~6-20 s on 2 shared cores
def test_kill9_mid_series_and_after_last_instance_loses_nothing_and_sends_one_sr(model, pacs, tmp_path):
    pacs_port, pacs_out = pacs
    _, series, files = write_series(tmp_path / "series", 60, seed=6)
    port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"

    # 1. kill -9 while the scanner is sending
    proc = start_listener(model, store, port, pacs_port, log, "--series-timeout", "2")
    scu = storescu(port, tmp_path / "series", background=True, out=tmp_path / "scu1.log")
    wait_for(lambda: len(list((store / "instances").glob("*/*.dcm"))) >= 15, timeout=30, step=0.01)
    proc.kill9()
    scu.wait(60)
    acked = acknowledged((tmp_path / "scu1.log").read_text())
    assert 14 <= len(acked) < 60  # the 15th file may be on disk, not yet acknowledged
    assert {sop_uid(f) for f in acked} <= stored_sop_uids(store)  # every acknowledged instance is there

    # 2. restart; the scanner resends the series (within the series timeout, which restarts with the
    #    listener); kill -9 right after its last instance, before the series is complete
    proc = start_listener(model, store, port, pacs_port, log, "--series-timeout", "2")
    r = storescu(port, tmp_path / "series")
    assert len(acknowledged(r.stdout + r.stderr)) == 60
    proc.kill9()
    assert stored_sop_uids(store) == {sop_uid(f) for f in files}
    proc = start_listener(model, store, port, pacs_port, log)
    try:
        wait_for(lambda: sr_uids(pacs_out), timeout=20)
        time.sleep(1.5)  # room for a duplicate to show up
        assert sr_uids(pacs_out) == {result_uids(series)[0]}
    finally:
        proc.stop()
    lines = [json.loads(x) for x in (store / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["series"][0]["slices"] == 60
    assert not any("listener stopped" in w for w in lines[0]["series"][0]["warnings"])  # resent: answered whole


def test_kill9_mid_series_and_no_resend_answers_the_part_as_possibly_cut_short(model, pacs, tmp_path):
    """Nothing of the series comes in again after the restart: its answer, its JSON line, its SR and the
    log say the slices may be only part of it, and it is never "no stone". The series sent again after
    that answer is answered again, whole, by an SR that names the one it replaces."""
    from pydicom import dcmread

    from edgekidney.dicomnet.service import INTERRUPTED
    from edgekidney.dicomnet.sr import revised_uid

    pacs_port, pacs_out = pacs
    _, series, _ = write_series(tmp_path / "series", 40, seed=9)
    port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"
    proc = start_listener(model, store, port, pacs_port, log)
    scu = storescu(port, tmp_path / "series", background=True, out=tmp_path / "scu.log")
    wait_for(lambda: len(list((store / "instances").glob("*/*.dcm"))) >= 10, timeout=30, step=0.01)
    proc.kill9()
    scu.wait(60)
    proc = start_listener(model, store, port, pacs_port, log)
    first = result_uids(series)[0]
    try:
        wait_for(lambda: sr_uids(pacs_out), timeout=30)
        assert sr_uids(pacs_out) == {first}
        r = storescu(port, tmp_path / "series")  # the operator sends the series again
        assert len(acknowledged(r.stdout + r.stderr)) == 40
        wait_for(lambda: len(sr_uids(pacs_out)) == 2, timeout=30)
    finally:
        proc.stop()
    (entry,), (again,) = [json.loads(x)["series"] for x in (store / "results.jsonl").read_text().splitlines()]
    assert 10 <= entry["slices"] < 40 and entry["decision"] != "no_stone"
    assert INTERRUPTED in entry["warnings"] and INTERRUPTED in entry["reason"]
    srs = {str(d.SOPInstanceUID): d for d in (dcmread(p) for p in pacs_out.iterdir()) if d.get("Modality") == "SR"}
    assert any(INTERRUPTED in str(e.value) for e in srs[first].iterall() if isinstance(e.value, str))
    assert INTERRUPTED in log.read_text()
    assert again["slices"] == 40 and INTERRUPTED not in again["warnings"] and INTERRUPTED not in again["reason"]
    assert again["revision"] == 1 and again["replaces"] == entry["result_uids"] and entry["result_uids"][0] == first
    assert again["result_uids"] == [revised_uid(u, 1) for u in entry["result_uids"]]  # its SR and Secondary Capture
    sr = srs[revised_uid(first, 1)]
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first
    assert not any(INTERRUPTED in str(e.value) for e in sr.iterall() if isinstance(e.value, str))


# in the default run: two listener starts and a PACS that answers after 2 s
def test_kill9_while_sending_resends_the_same_sr(model, tmp_path):
    """The PACS holds the SR, the listener dies before hearing Success: after the restart the same SOP
    Instance goes again. Two C-STOREs, one SR: what 'exactly one SR per series' means at a PACS."""
    pacs = Pacs(answer_after_s=2.0).start()
    _, series, _ = write_series(tmp_path / "series", 6, seed=8)
    port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"
    try:
        proc = start_listener(model, store, port, pacs.port, log)
        assert storescu(port, tmp_path / "series").returncode == 0
        assert pacs.arrived.wait(20)
        proc.kill9()  # the C-STORE is in flight: recorded 'sending', never 'sent'
        proc = start_listener(model, store, port, pacs.port, log)

        def srs():  # the study processor sends a Secondary Capture too
            with pacs.lock:
                return [str(d.SOPInstanceUID) for d in pacs.received if d.get("Modality") == "SR"]

        wait_for(lambda: len(srs()) >= 2, timeout=20)
        time.sleep(2.5)
        proc.stop()
        assert srs() == [result_uids(series)[0]] * 2  # sent twice, one SOP Instance
        lines = (store / "results.jsonl").read_text().splitlines()
        assert len(lines) == 1
    finally:
        pacs.stop()


@pytest.mark.slow  # the in-process twin in test_listener.py runs by default
def test_destination_down_then_up_delivers(model, tmp_path):
    pacs_port, pacs_out = free_port(), tmp_path / "pacs"
    pacs_out.mkdir()
    _, series, _ = write_series(tmp_path / "series", 8, seed=7)
    port, store = free_port(), tmp_path / "store"
    proc = start_listener(model, store, port, pacs_port, tmp_path / "listener.log")
    try:
        assert storescu(port, tmp_path / "series").returncode == 0
        wait_for(lambda: "result not delivered (attempt 2" in (tmp_path / "listener.log").read_text())
        scp = subprocess.Popen([sys.executable, "-m", "pynetdicom", "storescp", str(pacs_port), "-aet", "PACS",
                                "-od", str(pacs_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        try:
            wait_for(lambda: sr_uids(pacs_out) == {result_uids(series)[0]}, timeout=20)
        finally:
            scp.terminate()
            scp.wait(10)
    finally:
        proc.stop()


def test_listen_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgekidney.cli", "listen", str(tmp_path / "nope.onnx"), "--store",
                        str(tmp_path / "s"), "--destination", "pacs:104"], capture_output=True, text=True, env=ENV,
                       cwd=REPO, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --destination 'pacs:104': expected HOST:PORT:AETITLE, "
                                             "e.g. 127.0.0.1:11112:PACS"]


def test_listen_on_a_port_in_use_is_one_line(model, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edgekidney.cli", "listen", str(model), "--store", str(tmp_path / "s"),
                            "--port", str(port), "--min-free-mb", "0"],
                           capture_output=True, text=True, env=ENV, cwd=REPO, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
