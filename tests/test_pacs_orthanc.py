"""A real PACS end to end: Orthanc holds a CT series and sends it by C-STORE to ``edgekidney listen`` (through
Orthanc's REST API); the listener is killed -9 right after the send and restarted on the same store; Orthanc
ends with exactly one SR and one Secondary Capture in the study, and dciodvfy (dicom3tools) reports no error
in either.

Needs the Debian packages ``orthanc`` and ``dicom3tools`` (``bash .ci/pacs.sh``) and the ``sr`` extra; skips
without them (fails instead with ``EDGEKIDNEY_REQUIRE_PACS=1``, for CI).
Orthanc runs from its own configuration (``orthanc_config``, the one docs/listener.md shows) in a tmp
folder; everything listens on 127.0.0.1 with free ports. Timings go to stdout (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from listener_fixtures import REPO, echo_ok, free_port, jpeg2000_series, tiny_model, wait_for, write_series  # noqa: E402

from edgekidney.dicomnet.sr import result_uids  # noqa: E402

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])  # Debian puts Orthanc in sbin
ORTHANC = shutil.which("Orthanc", path=SBIN)
DCIODVFY = shutil.which("dciodvfy", path=SBIN)
ENV = dict(os.environ, PYTHONPATH=str(REPO))
SLICES = 20


def skip(reason: str) -> None:
    """Skip, or fail where CI has installed the PACS and says so (EDGEKIDNEY_REQUIRE_PACS=1): there a skip
    would hide that the test did not run."""
    if os.environ.get("EDGEKIDNEY_REQUIRE_PACS") == "1":
        pytest.fail(f"EDGEKIDNEY_REQUIRE_PACS=1 but {reason}")
    pytest.skip(reason)


def need_tools(*names: str) -> None:
    missing = [n for n, path in (("Orthanc", ORTHANC), ("dciodvfy", DCIODVFY)) if n in names and path is None]
    if missing:
        skip(f"{' and '.join(missing)} not installed (Debian: bash .ci/pacs.sh, i.e. apt-get install "
             "orthanc dicom3tools)")


def need_study_analysis() -> None:
    from edgekidney.dicomnet.study_processor import study_available

    if not study_available():
        skip("the study analysis (SR + Secondary Capture) needs highdicom: pip install 'edgekidney[sr]'")


def orthanc_config(root: Path, dicom_port: int, http_port: int, listener_port: int) -> dict:
    """Orthanc on loopback ports with its own storage, one modality (the listener), no plugins."""
    return {
        "Name": "edgekidney-ci",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,  # REST API from localhost only
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {"edgekidney": {"AET": "EDGEKIDNEY", "Host": "127.0.0.1", "Port": listener_port}},
        "DicomAlwaysAllowStore": False,  # C-STORE into Orthanc only from the modalities above ...
        "DicomCheckModalityHost": True,  # ... and from their address
        "DicomAssociationCloseDelay": 0,  # release the association when a send is done (default: keep it 5 s)
        "DicomScuTimeout": 30,
        "SaveJobs": False,
    }


class Orthanc:
    def __init__(self, root: Path, cfg: dict) -> None:
        self.root, self.cfg = root, cfg
        self.url = f"http://127.0.0.1:{cfg['HttpPort']}"
        self.log = root / "orthanc.log"
        self.p: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.cfg, indent=2))
        with open(self.log, "wb") as fh:
            self.p = subprocess.Popen([ORTHANC, str(path)], stdout=fh, stderr=subprocess.STDOUT, cwd=self.root)
        wait_for(lambda: self.p.poll() is not None or self._up(), timeout=60, step=0.1)
        assert self.p.poll() is None, f"Orthanc exited: {self.log.read_text()[-3000:]}"
        return self

    def _up(self) -> bool:
        try:
            return "Version" in self.get("/system")
        except (OSError, ValueError):
            return False

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return rsp.read()

    def get(self, path: str):
        return json.loads(self.request("GET", path))

    def post(self, path: str, obj) -> dict:
        return json.loads(self.request("POST", path, json.dumps(obj).encode()))

    def upload(self, f: Path) -> dict:
        return json.loads(self.request("POST", "/instances", f.read_bytes(), "application/dicom"))

    def results(self, study_id: str) -> dict[str, list[str]]:
        """Modality -> Orthanc instance IDs, over the study's series."""
        out: dict[str, list[str]] = {}
        for s in self.get(f"/studies/{study_id}/series"):
            out.setdefault(s["MainDicomTags"].get("Modality", ""), []).extend(s["Instances"])
        return out

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()  # Orthanc shuts down cleanly on SIGTERM
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


class Listener:
    """``edgekidney listen`` as its own process; its log goes to a file (appended across restarts)."""

    def __init__(self, model: Path, store: Path, port: int, destination: str, log: Path) -> None:
        self.port, self.log = port, log
        args = [sys.executable, "-m", "edgekidney.cli", "listen", str(model), "--store", str(store),
                "--port", str(port), "--destination", destination, "--processor", "study",
                "--series-timeout", "2", "--min-free-mb", "0", "--retry-base", "0.2", "--retry-max", "1",
                "--restart-grace", "0"]  # no resend after the restart here: the series completes as it stands
        with open(log, "ab") as fh:
            self.p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        wait_for(lambda: self.p.poll() is not None or echo_ok(port), timeout=60, step=0.1)
        assert self.p.poll() is None, log.read_text()[-3000:]

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's lines (it writes them to stderr), blank ones dropped."""
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture
def started():
    """Processes a test started; stopped even when it fails."""
    procs: list = []
    yield procs
    for p in reversed(procs):
        p.stop()


def ct_series(kind: str, out: Path) -> tuple[str, str, list[Path]]:
    """(Study, Series Instance UID, files): a synthetic phantom series (64 px, Explicit VR Little Endian), or
    a real JPEG 2000 CT series (512 px; skipped where the test data lack it)."""
    if kind == "synthetic":
        return write_series(out, SLICES, seed=17)
    pytest.importorskip("openjpeg", reason="decoding JPEG 2000 needs pylibjpeg-openjpeg (the dicom extra)")
    from pydicom import dcmread

    files = jpeg2000_series(out)
    ds = dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), files


@pytest.mark.parametrize("kind", ["synthetic", "jpeg2000"])
def test_orthanc_sends_a_series_listener_killed_after_the_send_one_sr_and_one_sc_come_back(kind, tmp_path, started):
    need_tools("Orthanc", "dciodvfy")
    need_study_analysis()
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    model = tiny_model(tmp_path / "model")
    study_uid, series_uid, files = ct_series(kind, tmp_path / "series")
    assert len(files) == SLICES
    (tmp_path / "orthanc").mkdir()
    listener_port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"
    cfg = orthanc_config(tmp_path / "orthanc", free_port(), free_port(), listener_port)

    # 1. Orthanc holds the series
    t1 = time.perf_counter()
    orthanc = Orthanc(tmp_path / "orthanc", cfg).start()
    started.append(orthanc)
    t["orthanc_start_s"] = time.perf_counter() - t1
    uploaded = [orthanc.upload(f) for f in files]
    assert {u["Status"] for u in uploaded} == {"Success"}
    series_id, study_id = uploaded[0]["ParentSeries"], uploaded[0]["ParentStudy"]
    assert orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"] == study_uid

    # 2. the listener, and Orthanc's C-STORE to it (the REST call returns when every instance is answered)
    t1 = time.perf_counter()
    listener = Listener(model, store, listener_port, f"127.0.0.1:{cfg['DicomPort']}:ORTHANC", log)
    started.append(listener)
    t["listener_start_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    job = orthanc.post("/modalities/edgekidney/store", {"Resources": [series_id], "Synchronous": True})
    t["send_s"] = time.perf_counter() - t1
    assert job["InstancesCount"] == SLICES and job["FailedInstancesCount"] == 0, job

    # 3. kill -9 right after the send, before the series is complete (--series-timeout 2), and restart
    t1 = time.perf_counter()
    listener.kill9()
    assert "SR" not in orthanc.results(study_id)  # no result was made or sent before the kill
    assert len(list((store / "instances").glob("*/*.dcm"))) == SLICES  # every acknowledged instance is on disk
    listener = Listener(model, store, listener_port, f"127.0.0.1:{cfg['DicomPort']}:ORTHANC", log)
    started.append(listener)
    t["kill_restart_s"] = time.perf_counter() - t1

    # 4. exactly one SR and one Secondary Capture in the study, also after the listener is done
    t1 = time.perf_counter()
    wait_for(lambda: "result object(s) delivered" in log.read_text(), timeout=60, step=0.1)
    t["restart_to_delivered_s"] = time.perf_counter() - t1  # --series-timeout 2, analysis, C-STOREs
    time.sleep(2.0)  # room for a duplicate to arrive
    by_modality = orthanc.results(study_id)
    sc_modality = "OT" if "OT" in by_modality else "SC"
    assert sorted(by_modality) == sorted(["CT", "SR", sc_modality]), by_modality
    assert len(by_modality["CT"]) == SLICES
    assert len(by_modality["SR"]) == 1 and len(by_modality[sc_modality]) == 1, by_modality
    assert len(orthanc.get(f"/studies/{study_id}/instances")) == SLICES + 2
    sr_id, sc_id = by_modality["SR"][0], by_modality[sc_modality][0]
    assert orthanc.get(f"/instances/{sr_id}")["MainDicomTags"]["SOPInstanceUID"] == result_uids(series_uid, "sr")[0]
    assert orthanc.get(f"/instances/{sc_id}")["MainDicomTags"]["SOPInstanceUID"] == result_uids(series_uid, "sc0")[0]
    lines = (store / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["series"][0]["n_slices"] == SLICES
    t["analysis_s"] = json.loads(lines[0])["series"][0]["seconds"]  # the processor's call, SR and SC written

    # 5. dciodvfy on both objects as Orthanc holds them
    report = {}
    for name, oid in (("SR", sr_id), ("SC", sc_id)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{oid}/file"))
        report[name] = dciodvfy(path)
    t["total_s"] = time.perf_counter() - t0
    print("\ntimings:", json.dumps({k: round(v, 2) for k, v in t.items()}))
    for name, out in report.items():
        print(f"dciodvfy {name}:", *out, sep="\n  ")
    assert not errors(report["SR"]) and not errors(report["SC"]), report


def test_secondary_capture_names_the_body_part_of_its_series_and_passes_dciodvfy(tmp_path):
    """General Series Laterality (Type 2C): the SC passes on an unpaired Body Part Examined of its series
    (without Laterality); with none, or one it does not know (the shared JPEG 2000 series says PARTIALBODY),
    Laterality is sent empty (unknown) instead of missing. dciodvfy finds no error in any of them."""
    need_tools("dciodvfy")
    need_study_analysis()
    from pydicom import dcmread

    from edgekidney.dicomnet import make_processor

    model = tiny_model(tmp_path / "model")
    proc, close, _ = make_processor(model, "study")
    try:
        for body_part, copied in (("ABDOMEN", True), (None, False), ("PARTIALBODY", False)):
            _, _, files = write_series(tmp_path / f"series-{body_part}", 6, seed=18)
            for f in files:
                ds = dcmread(f)
                if body_part:
                    ds.BodyPartExamined = body_part
                ds.save_as(f)
            sc = [d for d in proc(files).datasets if d.Modality == "OT"]
            assert len(sc) == 1
            path = tmp_path / f"sc-{body_part}.dcm"
            sc[0].save_as(path, enforce_file_format=True)
            out = dciodvfy(path)
            assert not errors(out), out
            assert sc[0].get("BodyPartExamined") == (body_part if copied else None)
            assert sc[0].get("Laterality") == (None if copied else "")
    finally:
        close()


def test_orthanc_sends_the_rest_of_a_series_after_its_answer_and_gets_a_second_answer_naming_the_first(
        tmp_path, started):
    """A series sent in two parts with its answer in between (a scanner that sends later images, an
    operator who sends the rest): the second part reopens the series, and Orthanc ends with two SRs in
    the study, the second of all the slices, naming the first as its predecessor; dciodvfy finds no
    error in the second answer's SR and Secondary Capture."""
    need_tools("Orthanc", "dciodvfy")
    need_study_analysis()
    from edgekidney.dicomnet.sr import revised_uid

    model = tiny_model(tmp_path / "model")
    study_uid, series_uid, files = ct_series("synthetic", tmp_path / "series")
    (tmp_path / "orthanc").mkdir()
    listener_port, store, log = free_port(), tmp_path / "store", tmp_path / "listener.log"
    cfg = orthanc_config(tmp_path / "orthanc", free_port(), free_port(), listener_port)
    orthanc = Orthanc(tmp_path / "orthanc", cfg).start()
    started.append(orthanc)
    ids = [orthanc.upload(f)["ID"] for f in files]
    study_id = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
    listener = Listener(model, store, listener_port, f"127.0.0.1:{cfg['DicomPort']}:ORTHANC", log)
    started.append(listener)
    half = SLICES // 2
    for part, count in ((ids[:half], 1), (ids[half:], 2)):
        job = orthanc.post("/modalities/edgekidney/store", {"Resources": part, "Synchronous": True})
        assert job["InstancesCount"] == len(part) and job["FailedInstancesCount"] == 0, job
        wait_for(lambda: log.read_text().count("result object(s) delivered") == count, timeout=60, step=0.1)
    time.sleep(2.0)  # room for anything more to arrive
    lines = [json.loads(x)["series"][0] for x in (store / "results.jsonl").read_text().splitlines()]
    assert [e["n_slices"] for e in lines] == [half, SLICES] and "revision" not in lines[0]
    assert lines[1]["revision"] == 1 and lines[1]["replaces"] == lines[0]["result_uids"]
    first, second = result_uids(series_uid, "sr")[0], revised_uid(result_uids(series_uid, "sr")[0], 1)
    by_uid = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]: i
              for m, found in orthanc.results(study_id).items() if m != "CT" for i in found}
    assert set(by_uid) == {first, second, result_uids(series_uid, "sc0")[0],
                           revised_uid(result_uids(series_uid, "sc0")[0], 1)}
    report = {}
    for name, uid in (("SR", second), ("SC", revised_uid(result_uids(series_uid, "sc0")[0], 1))):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{by_uid[uid]}/file"))
        report[name] = dciodvfy(path)
    from pydicom import dcmread

    sr = dcmread(tmp_path / "SR.dcm")
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first and sr.StudyInstanceUID == study_uid
    assert not errors(report["SR"]) and not errors(report["SC"]), report
