"""Nothing acknowledged is lost: the listener's store, its recovery after a crash and its job table.

A kill -9 cannot show a missing fsync (the page cache survives the process), so the order of the calls
is recorded instead: for every instance the scanner is told Success for, the file was written to a
temporary name, fsync'd, renamed into place, its folder fsync'd and its row committed, all before the
C-STORE handler returned the status. ``Listener.recover()`` is driven directly on a store left as a crash
leaves one. The job table's transitions are checked one by one (they are what a restart resumes from).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("prometheus_client")

from listener_fixtures import send, write_series  # noqa: E402
from listener_fixtures import wait_for as fixtures_wait_for  # noqa: E402

from edgekidney.dicomnet import Listener, ListenerConfig, ProcessResult  # noqa: E402
from edgekidney.dicomnet import store as store_mod  # noqa: E402
from edgekidney.dicomnet.jobs import JobTable  # noqa: E402
from edgekidney.dicomnet.scp import StorageSCP  # noqa: E402
from edgekidney.dicomnet.store import TMP_PREFIX, InstanceStore, uid_key, write_durably  # noqa: E402


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """(study, series, files): six slices of one synthetic series."""
    return write_series(tmp_path_factory.mktemp("durable"), 6, seed=11)


def summary_processor(paths, incomplete=None):
    return ProcessResult({"slices": len(paths), "decision": "Normal"})


def make(tmp_path, clock=None, **kw) -> Listener:
    kw.setdefault("series_timeout_s", 60.0)
    cfg = ListenerConfig(store=tmp_path / "store", port=0, min_free_mb=0.0, poll_s=0.05, **kw)
    return Listener(cfg, summary_processor, **({"clock": clock} if clock else {}))


def sop_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def rows(store: Path) -> dict[str, tuple]:
    """What a second reader of the job table sees: committed rows only."""
    db = sqlite3.connect(store / "jobs.sqlite")
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT sop_uid, series_uid, path FROM instances")}
    finally:
        db.close()


# -- acknowledged only once durable ---------------------------------------------------------------
def test_each_instance_is_fsynced_renamed_and_committed_before_the_c_store_is_answered(tmp_path, series,
                                                                                      monkeypatch):
    _, series_uid, files = series
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    real_add = JobTable.add_instance

    def add_instance(self, sop_uid, *a, **k):
        out = real_add(self, sop_uid, *a, **k)
        events.append(("row", sop_uid))
        return out

    real_handle = StorageSCP.handle_store

    def handle_store(self, event):
        status = real_handle(self, event)
        events.append(("answer", str(event.request.AffectedSOPInstanceUID)))
        return status

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod.os, "replace", replace)
    monkeypatch.setattr(JobTable, "add_instance", add_instance)
    monkeypatch.setattr(StorageSCP, "handle_store", handle_store)
    lst = make(tmp_path).start()
    try:
        assert send(lst.port, files[:3]) == [0, 0, 0]
        committed = rows(tmp_path / "store")  # read by another connection right after the acks
    finally:
        lst.stop()
    for f in files[:3]:
        sop = sop_of(f)
        final = lst.store.instance_path(series_uid, sop)
        assert committed[sop] == (series_uid, str(final))
        tmp_fsync = [i for i, (k, v) in enumerate(events) if k == "fsync" and
                     Path(v).name.startswith(f"{TMP_PREFIX}{final.name}.")]
        rename = events.index(("rename", str(final)))
        dir_fsync = [i for i, e in enumerate(events) if e == ("fsync", str(final.parent)) and i > rename]
        row, answer = events.index(("row", sop)), events.index(("answer", sop))
        assert tmp_fsync and dir_fsync, events
        assert tmp_fsync[-1] < rename < dir_fsync[0] < row < answer, events
        assert final.read_bytes().endswith(open(f, "rb").read()[-4096:])  # what the scanner sent, on disk


def test_a_write_that_fails_is_answered_out_of_resources_and_leaves_no_row(tmp_path, series, monkeypatch):
    _, _, files = series

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", no_space)
    lst = make(tmp_path).start()
    try:
        assert send(lst.port, files[:1]) == [0xA700]  # Out of Resources: the scanner keeps it and retries
        text = lst.metrics.text()
    finally:
        lst.stop()
    assert rows(tmp_path / "store") == {} and not list((tmp_path / "store" / "instances").glob("*/*.dcm"))
    assert 'edgekidney_listener_failures_total{stage="store"} 1.0' in text
    assert 'edgekidney_listener_instances_received_total 0.0' in text


# -- recover(): what a crash leaves behind ----------------------------------------------------------
def test_recover_drops_temporaries_refiles_orphans_and_sets_unreadable_files_aside(tmp_path, series, caplog):
    study_uid, series_uid, files = series
    lst = make(tmp_path, clock=lambda: 5000.0)
    st = lst.store
    data = [f.read_bytes() for f in files]
    sops = [sop_of(f) for f in files]
    # acknowledged before the crash: on disk and in the table
    known = st.put_instance(series_uid, sops[0], data[0])
    lst.jobs.add_instance(sops[0], series_uid, study_uid, known, 1000.0)
    # on disk, not in the table (killed between the rename and the commit: never acknowledged)
    orphans = [st.put_instance(series_uid, sops[i], data[i]) for i in (1, 2, 3)]
    # half-written temporaries, in instances/ and results/
    temps = [st.instance_path(series_uid, sops[4]).with_name(f"{TMP_PREFIX}x.dcm.1.2"),
             st.results / uid_key(series_uid) / f"{TMP_PREFIX}sr.dcm.3.4"]
    for t in temps:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_bytes(data[4][:300])
    # an orphan of a series (and study) the table has never seen
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    other = dcmread(files[5])
    other.StudyInstanceUID, other.SeriesInstanceUID = "1.2.826.0.1.3680043.10.511.7", "1.2.826.0.1.3680043.10.511.8"
    buf = DicomBytesIO()
    other.save_as(buf, enforce_file_format=True)
    st.put_instance(other.SeriesInstanceUID, str(other.SOPInstanceUID), buf.getvalue())
    # a file that is no DICOM at all (a disk error, a stray copy)
    junk = st.instances / uid_key(series_uid) / "junk.dcm"
    junk.write_bytes(b"not a dicom file")
    with caplog.at_level(logging.INFO, logger="edgekidney.listener"):
        counts = lst.recover()
    lst.jobs.close()
    assert counts == {"receiving": 2}
    assert not any(t.exists() for t in temps)
    assert not junk.exists() and junk.with_suffix(".unreadable").exists()
    table = rows(tmp_path / "store")
    assert set(table) == set(sops[:4]) | {str(other.SOPInstanceUID)}  # orphans filed under their UIDs, junk not
    assert all(table[sops[i]] == (series_uid, str(orphans[i - 1])) for i in (1, 2, 3))
    jobs = JobTable(tmp_path / "store" / "jobs.sqlite")
    try:
        assert jobs.instance_paths(series_uid) == [known, *sorted(orphans, key=str)]  # in the order re-filed
        assert jobs.counts() == {"receiving": 2}
        n, last_at = jobs._db.execute("SELECT n_instances, last_at FROM series WHERE series_uid=?",
                                      (series_uid,)).fetchone()
        assert n == 4 and last_at == 5000.0 + 120.0  # a fresh completion wait from the restart's clock, and its grace
        assert jobs._db.execute("SELECT study_uid FROM series WHERE series_uid=?",
                                (other.SeriesInstanceUID,)).fetchone() == (other.StudyInstanceUID,)
    finally:
        jobs.close()
    assert messages(caplog) == ["unreadable file in store set aside: junk.dcm (InvalidDicomError)",
                                "resumed: {'receiving': 2}; 2 temp files removed, 4 instances re-filed"]


def test_recover_on_a_clean_store_changes_nothing(tmp_path, series, caplog):
    study_uid, series_uid, files = series
    lst = make(tmp_path, clock=lambda: 10.0)
    with caplog.at_level(logging.INFO, logger="edgekidney.listener"):
        assert lst.recover() == {}
        assert not [r for r in caplog.records if r.name == "edgekidney.listener"]  # nothing to say
        (lst.store.instances / f"{TMP_PREFIX}x").write_bytes(b"half")
        assert lst.recover() == {}
        assert messages(caplog) == ["resumed: {}; 1 temp files removed, 0 instances re-filed"]
        caplog.clear()
        sop = sop_of(files[0])
        p = lst.store.put_instance(series_uid, sop, files[0].read_bytes())
        lst.jobs.add_instance(sop, series_uid, study_uid, p, 1.0)
        lst.jobs.complete_quiet(100.0, 5.0)
        assert lst.recover() == {"complete": 1}
    assert lst.jobs.known_paths() == {str(p)} and p.exists()
    assert [r.getMessage() for r in caplog.records if r.name == "edgekidney.listener"] == [
        "resumed: {'complete': 1}; 0 temp files removed, 0 instances re-filed"]
    lst.jobs.close()


def test_an_orphan_from_before_the_crash_is_classified_with_its_series(tmp_path, series):
    """The instance on disk but not in the table is part of the series' result after the restart."""
    study_uid, series_uid, files = series
    now = [1000.0]
    results = tmp_path / "out" / "deep" / "results.jsonl"  # its folders are made
    lst = make(tmp_path, clock=lambda: now[0], series_timeout_s=5.0, results_file=results)
    sops = [sop_of(f) for f in files]
    for i, f in enumerate(files[:4]):
        p = lst.store.put_instance(series_uid, sops[i], f.read_bytes())
        if i != 2:  # the third never reached the table
            lst.jobs.add_instance(sops[i], series_uid, study_uid, p, 999.0)
    lst.recover()
    assert not lst.pipeline_step()  # quiet for 0 s: not complete yet
    now[0] = 1006.0
    assert not lst.pipeline_step()  # the restart's grace (120 s): the scanner may still resend
    now[0] = 1124.9
    assert not lst.pipeline_step()
    now[0] = 1125.0  # 5 s of quiet after the 120 s of grace
    assert lst.pipeline_step()
    text = results.read_text()
    line = json.loads(text)
    assert line["study_uid"] == study_uid and line["series"][0]["slices"] == 4
    assert text == json.dumps(line, sort_keys=True) + "\n"  # one line, keys sorted: diffable records
    assert results.stat().st_mode & 0o777 == 0o640
    assert lst.jobs.series_state(series_uid) == "done"
    lst.jobs.close()


def test_a_series_a_crash_cut_short_is_answered_as_possibly_incomplete(tmp_path, series, caplog):
    """Stored in part when the listener stopped and nothing of it sent again: the processor is told, the
    result line says it; one the sender goes on with after the restart is answered as whole."""
    from edgekidney.dicomnet.service import INTERRUPTED

    study_uid, series_uid, files = series
    sops = [sop_of(f) for f in files]
    for name, after_restart in (("cut", None), ("resent", 1), ("continued", 4), ("released", None)):
        now, told = [1000.0], []

        def recording(paths, incomplete=None):
            told.append((len(paths), incomplete))
            return ProcessResult({"slices": len(paths), "decision": "not_assessable", "warnings": [incomplete]})

        cfg = ListenerConfig(store=tmp_path / name, port=0, min_free_mb=0.0, series_timeout_s=5.0, restart_grace_s=0.0)
        lst = Listener(cfg, recording, clock=lambda: now[0])
        for i in range(3):
            lst.jobs.add_instance(sops[i], series_uid, study_uid, lst.store.put_instance(series_uid, sops[i],
                                                                                         files[i].read_bytes()), 990.0)
        if name == "released":
            lst.jobs.transfer_ended([series_uid])
        lst.jobs.close()
        lst = Listener(cfg, recording, clock=lambda: now[0])  # the restart
        lst.recover()
        if after_restart is not None:
            i = after_restart
            if not lst.jobs.seen_again(sops[i], now[0]):
                lst.jobs.add_instance(sops[i], series_uid, study_uid,
                                      lst.store.put_instance(series_uid, sops[i], files[i].read_bytes()), now[0])
        now[0] = 1005.0
        assert lst.pipeline_step()
        line = json.loads((tmp_path / name / "results.jsonl").read_text())
        if name == "cut":
            assert told == [(3, INTERRUPTED)] and line["series"][0]["warnings"] == [INTERRUPTED]
            assert f"series {uid_key(series_uid)}: {INTERRUPTED}" in messages(caplog)
        else:
            assert told == [(4 if name == "continued" else 3, None)]
        lst.jobs.close()


def test_a_series_its_sender_cut_short_or_with_refused_instances_is_answered_as_possibly_incomplete(tmp_path):
    """What the processor is told, series by series: an association that ended without a release, an
    instance refused at C-STORE, both with a restart; a series whose every instance was refused fails
    with why; one whose refused instance was stored after all is whole."""
    from edgekidney.dicomnet.service import ABORTED, INTERRUPTED, refused_note

    told = {}

    def processor(paths, incomplete=None):
        told[paths[0].name[0]] = incomplete
        return ProcessResult({"slices": len(paths), "decision": "no_stone"})

    cfg = ListenerConfig(store=tmp_path / "store", port=0, min_free_mb=0.0, series_timeout_s=5.0, restart_grace_s=0)
    lst = Listener(cfg, processor, clock=lambda: 1000.0)
    try:
        for name in "ABCDE":
            for k in range(2):
                lst.jobs.add_instance(f"{name}.{k}", name, f"T{name}", tmp_path / f"{name}{k}", 900.0)
        lst.jobs.add_refused("B.9", "B", "TB", "image declares 9000x9000 px", 901.0)
        lst.jobs.add_refused("D.9", "D", "TD", "too many frames", 901.0)
        lst.jobs.add_refused("E.1", "E", "TE", "too big", 901.0)  # refused once, then stored as sent again
        lst.jobs.add_refused("F.0", "F", "TF", "image declares 9000x9000 px", 901.0)
        lst.jobs.add_refused("F.1", "F", "TF", "image declares 9100x9100 px", 902.0)
        lst.jobs.add_instance("G.0", "G", "TG", tmp_path / "G0", 900.0)
        lst.jobs.transfer_ended(["B", "C", "E", "F"])  # their associations were released
        lst.jobs.transfer_aborted(["A", "D"])  # after D's refused instance: its association was aborted
        lst.jobs.resume(950.0)  # a restart: D and G were in transfer (D's abort already said so)
        assert lst.jobs.gaps("G").interrupted and not lst.jobs.gaps("D").interrupted
        lst.jobs.add_instance("D.5", "D", "TD", tmp_path / "D5", 951.0)  # more of D: not cut short after all
        lst.jobs.transfer_aborted(["D"])  # cut short again
        lst.jobs.resume(960.0)
        assert lst.jobs.complete_quiet(1000.0, 5.0) and lst.pipeline_step()
        while lst.pipeline_step():
            pass
        assert refused_note(2, "r") == ("2 instance(s) of this series were refused when received (r): the slices "
                                        "stored are not all of it")
        assert told == {"A": ABORTED, "B": refused_note(1, "image declares 9000x9000 px"), "C": None,
                        "D": f"{ABORTED}; {refused_note(1, 'too many frames')}", "E": None, "G": INTERRUPTED}
        assert lst.jobs.series_state("F") == "failed"
        lines = [json.loads(x) for x in (tmp_path / "store" / "results.jsonl").read_text().splitlines()]
        (f_entry,) = [e for line in lines for e in line["series"] if e["series_uid"] == "F"]
        assert f_entry == {"series_uid": "F", "error": "all 2 instance(s) of this series were refused when received "
                                                       "(image declares 9100x9100 px)"}
    finally:
        lst.jobs.close()


def test_process_study_records_each_series_outcome_in_its_line_table_log_and_metrics(tmp_path, caplog):
    """One study, three series: a result (its SR filed under the series), a refusal and a crash. The
    line says which is which, the table moves each to its state at the clock's time, the log and the
    metrics say it once, and the webhook gets the same line."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

    from edgekidney.dicomnet.config import Destination
    from edgekidney.errors import InputError

    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = ComprehensiveSRStorage, "1.2.3.4.5"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    def processor(paths, incomplete=None):
        kind = paths[0].name.split("-")[0]
        if kind == "bad":
            raise InputError("no slice usable")
        if kind == "bug":
            raise RuntimeError("a bug")
        if kind == "many":  # the study processor's summary of a study of several series has no slice count
            return ProcessResult({"decision": "several series", "series": []})
        time.sleep(0.02)
        return ProcessResult({"decision": "stone", "slices": len(paths)}, [sr])

    cfg = ListenerConfig(store=tmp_path / "store", port=0, min_free_mb=0.0, webhook="http://127.0.0.1:9/hook",
                         destination=Destination("127.0.0.1", 9, "PACS"))
    lst = Listener(cfg, processor, clock=lambda: 5000.0)
    for kind in ("ok", "bad", "bug", "many"):
        for k in range(2):
            lst.jobs.add_instance(f"{kind}.{k}", f"S-{kind}", "T", tmp_path / f"{kind}-{k}", 4000.0)
    caplog.set_level(logging.INFO, logger="edgekidney.listener")
    try:
        line = lst.process_study("T", ["S-ok", "S-bad", "S-bug", "S-many"])
        ok, bad, bug, many = line["series"]
        assert set(line) == {"study_uid", "time", "series"} and line["study_uid"] == "T"
        assert line["time"].endswith("+00:00") and line["time"][:4] >= "2026"  # UTC, to the second
        assert bad == {"series_uid": "S-bad", "error": "no slice usable"}
        assert bug == {"series_uid": "S-bug", "error": "internal error: RuntimeError"}
        assert set(ok) == {"decision", "slices", "series_uid", "seconds"} and ok["series_uid"] == "S-ok"
        assert ok["decision"] == "stone" and ok["slices"] == 2 and 0.02 <= ok["seconds"] < 1
        assert isinstance(ok["seconds"], float) and ok["seconds"] == round(ok["seconds"], 3)
        assert many["decision"] == "several series" and many["series_uid"] == "S-many"
        assert json.loads((tmp_path / "store" / "results.jsonl").read_text()) == line
        assert lst._webhook_q.get_nowait() == line
        result = lst.store.results / uid_key("S-ok") / f"{uid_key('1.2.3.4.5')}.dcm"
        assert result.is_file()
        db = sqlite3.connect(tmp_path / "store" / "jobs.sqlite")
        row = dict(zip(("state", "classified_at", "result_json", "result_paths", "error"), db.execute(
            "SELECT state, classified_at, result_json, result_paths, error FROM series WHERE series_uid='S-ok'").fetchone()))
        assert row == {"state": "classified", "classified_at": 5000.0, "result_json": json.dumps(ok),
                       "result_paths": json.dumps([str(result)]), "error": None}
        assert db.execute("SELECT state, error, classified_at FROM series WHERE series_uid IN ('S-bad', 'S-bug') "
                          "ORDER BY series_uid").fetchall() == [("failed", "no slice usable", 5000.0),
                                                                ("failed", "internal error: RuntimeError", 5000.0)]
        db.close()
        assert metric_value(lst.metrics, "edgekidney_listener_series_classified_total") == 2
        assert 'edgekidney_listener_failures_total{stage="classify"} 2.0' in lst.metrics.text()
        said = messages(caplog)
        assert said[0] == f"series {uid_key('S-bug')}: processor crashed"
        assert said[1:] == [f"series {uid_key('S-ok')} classified: stone (2 slices)",
                            f"series {uid_key('S-bad')} not classified: no slice usable",
                            f"series {uid_key('S-bug')} not classified: internal error: RuntimeError",
                            f"series {uid_key('S-many')} classified: several series (0 slices)"]
    finally:
        lst.jobs.close()


def test_the_scp_forgets_an_association_that_stored_nothing(tmp_path):
    """An echo-only association ends like any other: nothing to mark, nothing raised."""
    from types import SimpleNamespace

    scp, jobs, _ = scp_for(tmp_path)
    try:
        quiet = SimpleNamespace(assoc=object())
        scp.handle_released(quiet)
        scp.handle_closed(quiet)
        scp.handle_closed(quiet)  # after a release, the connection closes too
        assert scp._carrying == {}
    finally:
        jobs.close()


def in_transfer(store: Path, series_uid: str, column: str = "in_transfer") -> int:
    db = sqlite3.connect(store / "jobs.sqlite")
    try:
        return db.execute(f"SELECT {column} FROM series WHERE series_uid=?", (series_uid,)).fetchone()[0]
    finally:
        db.close()


def test_a_series_is_in_transfer_until_the_association_carrying_it_is_released(tmp_path, series, caplog):
    """Released (A-RELEASE): all the sender meant to send is here. Still open: not known yet. Aborted:
    possibly cut short, until more of the series arrives."""
    from pynetdicom import AE

    study_uid, series_uid, files = series
    lst = make(tmp_path).start()
    try:
        assert send(lst.port, files[:2]) == [0, 0]  # one association, released
        fixtures_wait_for(lambda: in_transfer(tmp_path / "store", series_uid) == 0)
        ae = AE(ae_title="SCANNER")
        ds = [__import__("pydicom").dcmread(f) for f in files[2:4]]
        ae.add_requested_context(str(ds[0].SOPClassUID), [str(ds[0].file_meta.TransferSyntaxUID)])
        one, two = (ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY") for _ in range(2))
        assert one.send_c_store(ds[0]).Status == 0 and two.send_c_store(ds[1]).Status == 0
        assert in_transfer(tmp_path / "store", series_uid) == 1
        two.release()  # the other association still carries the series
        time.sleep(0.3)
        assert in_transfer(tmp_path / "store", series_uid) == 1
        assert not lst.jobs.gaps(series_uid)
        caplog.set_level(logging.WARNING, logger="edgekidney.listener")
        one.abort()  # cut: what it meant to send is not known to be here
        fixtures_wait_for(lambda: in_transfer(tmp_path / "store", series_uid, "aborted") == 1)
        assert in_transfer(tmp_path / "store", series_uid) == 0 and lst.jobs.gaps(series_uid).aborted
        assert messages(caplog) == [f"association from SCANNER ended without a release while carrying 1 series "
                                    f"({uid_key(series_uid)}): answered as possibly incomplete unless more of them "
                                    "arrives"]
        assert metric_value(lst.metrics, "edgekidney_listener_transfers_aborted_total") == 1
        assert send(lst.port, files[4:5]) == [0]  # the sender goes on: no longer known to be cut short
        fixtures_wait_for(lambda: in_transfer(tmp_path / "store", series_uid) == 0)
        assert not lst.jobs.gaps(series_uid)
        assert send(lst.port, files[:1]) == [0]  # a resend: in transfer again, until its release
        fixtures_wait_for(lambda: in_transfer(tmp_path / "store", series_uid) == 0)
        assert fixtures_wait_for(lambda: lst.scp._carrying == {})  # every association forgotten once closed
        # an association the listener itself closes when it stops is not the sender's abort
        three = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
        assert three.send_c_store(ds[1]).Status == 0
        lst.scp.stop()  # the listener stopping: its open associations end without a release
        three.abort()
        fixtures_wait_for(lambda: lst.scp._carrying == {})
        assert in_transfer(tmp_path / "store", series_uid, "aborted") == 0
        assert metric_value(lst.metrics, "edgekidney_listener_transfers_aborted_total") == 1
    finally:
        lst.stop()


def test_an_association_timed_out_idle_after_its_study_was_complete_marks_nothing(tmp_path, series, caplog):
    """A sender that keeps its association open after the study, until the network timeout aborts it:
    the study was quiet for the series timeout, so its series are complete and their answer must not
    depend on whether a backlog has let them be answered yet."""
    from types import SimpleNamespace

    study_uid, series_uid, files = series
    scp, jobs, metrics = scp_for(tmp_path)
    caplog.set_level(logging.INFO, logger="edgekidney.listener")
    try:
        assoc = SimpleNamespace(is_released=False, requestor=SimpleNamespace(ae_title="PACS"))
        assert scp.handle_store(FakeEvent(files[0], assoc=assoc)) == 0
        assert jobs.complete_quiet(time.time() + 60, 10.0) == [series_uid]
        caplog.clear()
        scp.handle_aborted(SimpleNamespace(assoc=assoc))
        assert not jobs.gaps(series_uid) and jobs.series_state(series_uid) == "complete"
        assert in_transfer(tmp_path / "store", series_uid) == 0  # no association carries it any more
        assert metric_value(metrics, "edgekidney_listener_transfers_aborted_total") == 0
        assert messages(caplog) == ["association from PACS ended without a release after its 1 series were complete"]
        assert id(assoc) not in scp._carrying
    finally:
        jobs.close()


def test_gaps_are_true_when_any_part_may_be_missing():
    from edgekidney.dicomnet.jobs import Gaps

    assert [bool(g) for g in (Gaps(), Gaps(interrupted=True), Gaps(aborted=True), Gaps(refused=1))] == [
        False, True, True, True]


def test_a_connection_closed_before_its_release_is_reported_is_settled_by_what_the_association_recorded(
        tmp_path, series, monkeypatch):
    """pynetdicom reports the close of the connection and the release of the association from two
    threads, in either order; a connection can also die with neither reported. The SCP waits a moment
    and reads the association's own record: released is whole, anything else possibly cut short."""
    from types import SimpleNamespace

    study_uid, series_uid, files = series
    scp, jobs, metrics = scp_for(tmp_path)
    monkeypatch.setattr(scp, "close_settle_s", 0.05)
    try:
        for name, released in (("released", True), ("dropped", False)):
            assoc = SimpleNamespace(is_released=False, requestor=SimpleNamespace(ae_title="CT01"))
            assert scp.handle_store(FakeEvent(files[0], assoc=assoc)) == 0
            assert in_transfer(tmp_path / "store", series_uid) == 1
            scp.handle_closed(SimpleNamespace(assoc=assoc))  # the close comes first
            assert id(assoc) in scp._carrying  # not settled yet: the release may be on its way
            assoc.is_released = released
            fixtures_wait_for(lambda: id(assoc) not in scp._carrying, timeout=5)
            # the settling forgets the association first, then writes the table
            fixtures_wait_for(lambda: in_transfer(tmp_path / "store", series_uid) == 0, timeout=5)
            assert jobs.gaps(series_uid).aborted is (not released), name
            scp.handle_released(SimpleNamespace(assoc=assoc))  # reported after the settling: nothing more
            scp.handle_closed(SimpleNamespace(assoc=assoc))
        assert metric_value(metrics, "edgekidney_listener_transfers_aborted_total") == 1
        # an association whose only instance of a series was refused carries that series all the same
        assoc = SimpleNamespace(is_released=False, requestor=SimpleNamespace(ae_title="CT01"))
        assert scp.handle_store(FakeEvent(files[1], assoc=assoc, Rows=9000, SeriesInstanceUID="1.2.3.55")) != 0
        scp.handle_aborted(SimpleNamespace(assoc=assoc))
        gaps = jobs.gaps("1.2.3.55")
        assert gaps.aborted and gaps.refused == 1
    finally:
        jobs.close()


def test_an_answer_superseded_while_queued_for_sending_is_never_sent(tmp_path, series, monkeypatch, caplog):
    """The sender works through a batch read earlier; a series in it reopened and answered again since.
    The old row sends nothing (the new answer would be marked sent with the old files); the new one
    goes. More of a series while it is being answered: that answer is recorded, not delivered, and the
    series is answered again."""
    from edgekidney.dicomnet import service
    from edgekidney.dicomnet.config import Destination

    study_uid, series_uid, files = series
    sops = [sop_of(f) for f in files]
    now, sent = [1000.0], []
    monkeypatch.setattr(service, "send_files", lambda paths, *a, **k: sent.append(sorted(map(str, paths))) or 1)

    def processor(paths, incomplete=None):
        if len(paths) == 4:  # the scanner sends one more while this answer is being made
            arrive(4)
        from pydicom import dcmread

        from edgekidney.dicomnet.sr import build_series_sr
        summary = {"decision": "no_stone", "slices": len(paths), "positive_slices": [], "note": "n"}
        sr = build_series_sr([dcmread(p, stop_before_pixels=True) for p in paths], summary)
        return ProcessResult(dict(summary, result_uids=[str(sr.SOPInstanceUID)]), [sr])

    cfg = ListenerConfig(store=tmp_path / "store", port=0, min_free_mb=0.0, series_timeout_s=5.0,
                         destination=Destination("127.0.0.1", 9, "PACS"))
    lst = Listener(cfg, processor, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="edgekidney.listener")

    def arrive(i):
        path = lst.store.put_instance(series_uid, sops[i], files[i].read_bytes())
        return lst.jobs.add_instance(sops[i], series_uid, study_uid, path, now[0])

    try:
        for i in range(3):
            arrive(i)
        now[0] += 5.0
        assert lst.pipeline_step() and lst.jobs.series_state(series_uid) == "classified"
        stale = lst.jobs.due_for_sending(now[0])
        assert [r.revision for r in stale] == [0]
        assert arrive(3) == "reopened"
        now[0] += 5.0
        assert lst.pipeline_step()  # answer 2 (4 slices), during which a fifth instance came
        assert lst.jobs.series_state(series_uid) == "receiving" and lst.jobs.revision(series_uid)[0] == 2
        assert f"series {uid_key(series_uid)} changed while it was being answered; receiving again, to be answered " \
            "again when complete (that answer is not delivered)" in messages(caplog)
        now[0] += 5.0
        assert lst.pipeline_step() and lst.jobs.series_state(series_uid) == "classified"  # answer 3, 5 slices
        monkeypatch.setattr(lst.jobs, "due_for_sending", lambda *a, **k: stale)
        assert lst.send_due() == 0 and sent == []  # the batch read before: answer 1's files are not sent
        assert lst.jobs.series_state(series_uid) == "classified"
        monkeypatch.undo()
        monkeypatch.setattr(service, "send_files", lambda paths, *a, **k: sent.append(sorted(map(str, paths))) or 1)
        assert lst.send_due() == 1 and lst.jobs.series_state(series_uid) == "sent"
        (delivered,) = sent
        lines = [json.loads(x)["series"][0] for x in (tmp_path / "store" / "results.jsonl").read_text().splitlines()]
        assert [(e["slices"], e.get("revision", 0)) for e in lines] == [(3, 0), (4, 1), (5, 2)]
        assert lines[2]["replaces"] == lines[1]["result_uids"]  # on record, never delivered
        assert delivered == sorted(str(lst.store.results / uid_key(series_uid) / f"{uid_key(u)}.dcm")
                                   for u in lines[2]["result_uids"])
        assert metric_value(lst.metrics, "edgekidney_listener_series_reopened_total") == 1  # the service's count
    finally:
        lst.jobs.close()


def test_a_series_answered_again_gets_new_uids_and_names_the_answer_it_replaces(tmp_path, series, caplog):
    """More of a series after its answer: answered again, with SOP Instance UIDs of its own (derived,
    so a retry makes the same), the result UIDs it replaces in its line, and its SR's Predecessor
    Documents Sequence naming the SR before. A resend of what was answered whole changes nothing."""
    from pydicom import dcmread

    from edgekidney.dicomnet.sr import build_series_sr, result_uids, revised_uid

    study_uid, series_uid, files = series
    sops = [sop_of(f) for f in files]
    now, told = [1000.0], []

    def processor(paths, incomplete=None):
        told.append(len(paths))
        summary = {"decision": "no_stone", "slices": len(paths), "positive_slices": [], "note": "n"}
        sr = build_series_sr([dcmread(p, stop_before_pixels=True) for p in paths], summary)
        return ProcessResult(dict(summary, result_uids=[str(sr.SOPInstanceUID)]), [sr])

    cfg = ListenerConfig(store=tmp_path / "store", port=0, min_free_mb=0.0, series_timeout_s=5.0)
    lst = Listener(cfg, processor, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="edgekidney.listener")

    def arrive(i):
        path = lst.store.put_instance(series_uid, sops[i], files[i].read_bytes())
        return lst.jobs.add_instance(sops[i], series_uid, study_uid, path, now[0])

    def answer():
        now[0] += 5.0
        assert lst.pipeline_step()
        return json.loads((tmp_path / "store" / "results.jsonl").read_text().splitlines()[-1])["series"][0]

    def result_file(uid):
        return dcmread(lst.store.results / uid_key(series_uid) / f"{uid_key(uid)}.dcm")

    try:
        first = result_uids(series_uid)[0]
        for i in range(3):
            arrive(i)
        one = answer()
        assert one["result_uids"] == [first] and "revision" not in one and "replaces" not in one
        assert "PredecessorDocumentsSequence" not in result_file(first) and lst.jobs.revision(series_uid) == (0, [])
        now[0] += 100.0
        assert arrive(3) == "reopened" and lst.jobs.revision(series_uid) == (1, [first])
        assert not lst.pipeline_step() and lst.jobs.series_state(series_uid) == "receiving"  # its own quiet time
        two = answer()
        second = revised_uid(first, 1)
        assert second not in (first, revised_uid(first, 2))
        assert (two["revision"], two["replaces"], two["result_uids"], two["slices"]) == (1, [first], [second], 4)
        sr = result_file(second)
        assert sr.SOPInstanceUID == sr.file_meta.MediaStorageSOPInstanceUID == second
        assert sr.SeriesInstanceUID == result_uids(series_uid)[1] and sr.InstanceNumber == 2
        (study,) = sr.PredecessorDocumentsSequence
        assert study.StudyInstanceUID == study_uid
        (ser,) = study.ReferencedSeriesSequence
        assert ser.SeriesInstanceUID == result_uids(series_uid)[1]
        assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in ser.ReferencedSOPSequence] == [
            (sr.SOPClassUID, first)]
        assert result_file(first).SOPInstanceUID == first  # the first answer's file is kept
        assert f"series {uid_key(series_uid)} classified: no_stone (4 slices); answer 2, replaces the one before" \
            in messages(caplog)
        # a resend of what was answered whole: nothing to answer again
        assert lst.jobs.seen_again(sops[0], now[0]) == (series_uid, "duplicate")
        now[0] += 1000.0
        assert not lst.pipeline_step() and lst.jobs.series_state(series_uid) == "done"
        assert arrive(4) == "reopened"
        three = answer()
        assert (three["revision"], three["replaces"], three["result_uids"]) == (2, [second], [revised_uid(first, 2)])
        (study,) = result_file(revised_uid(first, 2)).PredecessorDocumentsSequence
        assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == second
        assert told == [3, 4, 5]
    finally:
        lst.jobs.close()


def test_revised_results_keep_their_uids_across_versions_and_name_only_the_sr_before():
    """A retry after an upgrade must make the same objects: the derived UIDs are pinned. An SR is given
    its predecessor wherever it sits among the results; a Secondary Capture gets a new UID only."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    from edgekidney.dicomnet.service import renamed_uids
    from edgekidney.dicomnet.sr import result_uids, revise, revised_uid

    assert result_uids("1.2.3") == ("2.25.131529590525608038839413292110782320846",
                                    "2.25.300721276809911680070670379849418484870")
    assert revised_uid("1.2.3", 0) == "1.2.3"
    assert revised_uid("1.2.3", 1) == "2.25.338763886096684230781166081630288723367"
    assert revised_uid("1.2.3", 2) == "2.25.325448905634850770029365681532295153218"

    def made(cls, uid):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = cls, uid, "9.9", "8.8"
        ds.InstanceNumber = 1
        ds.file_meta = FileMetaDataset()
        return ds

    sc, sr = made(SecondaryCaptureImageStorage, "5.1"), made(ComprehensiveSRStorage, "5.2")
    mapping = revise([sc, sr], 2, [revised_uid("5.1", 1), revised_uid("5.2", 1)])
    assert mapping == {"5.1": revised_uid("5.1", 2), "5.2": revised_uid("5.2", 2)}
    assert sc.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID == revised_uid("5.1", 2)
    assert "PredecessorDocumentsSequence" not in sc and sc.InstanceNumber == 1
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == revised_uid("5.2", 1) and sr.InstanceNumber == 3
    after_failure = made(ComprehensiveSRStorage, "5.2")  # answer 2 failed: answer 3 names answer 1's SR
    revise([after_failure], 2, ["5.2"])
    ref = after_failure.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == "5.2"
    lone = made(ComprehensiveSRStorage, "5.3")
    revise([lone], 1, [])  # the answer before made no SR (it failed): nothing to name
    assert "PredecessorDocumentsSequence" not in lone and lone.InstanceNumber == 2
    # the line's UIDs follow, in a study of several series too; a UID not renamed stays
    summary = {"decision": "several series", "result_uids": ["5.1", "7.7"],
               "series": [{"result_uids": ["5.2"]}, "not a dict", {"decision": "stone"}]}
    assert renamed_uids(summary, mapping) == {
        "decision": "several series", "result_uids": [revised_uid("5.1", 2), "7.7"],
        "series": [{"result_uids": [revised_uid("5.2", 2)]}, "not a dict", {"decision": "stone"}]}
    assert summary["result_uids"] == ["5.1", "7.7"]  # the processor's summary is left as it was


def test_a_job_table_from_before_the_interrupted_column_is_carried_on(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE series(series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL, "
        "first_at REAL NOT NULL, last_at REAL NOT NULL, n_instances INTEGER NOT NULL DEFAULT 0, "
        "late_instances INTEGER NOT NULL DEFAULT 0, completed_at REAL, classified_at REAL, sent_at REAL, "
        "purged_at REAL, result_json TEXT, result_paths TEXT, attempts INTEGER NOT NULL DEFAULT 0, "
        "next_attempt_at REAL NOT NULL DEFAULT 0, error TEXT);"
        "INSERT INTO series(series_uid, study_uid, state, first_at, last_at) VALUES ('S', 'T', 'receiving', 1, 1);")
    old.commit()
    old.close()
    j = JobTable(path)
    try:
        assert not j.gaps("S").interrupted and j.series_state("S") == "receiving"
        assert j.revision("S") == (0, [])  # and before answers were made again
        assert not j.gaps("S")  # and before aborts and refusals were followed
        j.resume(10.0)
        assert not j.gaps("S").interrupted  # written before transfers were followed: not known to be cut short
        assert j.add_instance("1", "S", "T", tmp_path / "1", 11.0) == "new"
        j.resume(20.0)
        assert j.gaps("S").interrupted
    finally:
        j.close()


# -- the store -------------------------------------------------------------------------------------
def test_write_durably_leaves_the_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.dcm"
    write_durably(target, b"x" * 100_000)
    write_durably(target, b"second")  # replaces atomically
    assert target.read_bytes() == b"second" and os.listdir(tmp_path) == ["a.dcm"]


def test_store_layout_keys_and_retention(tmp_path):
    st = InstanceStore(tmp_path / "s")
    assert (st.instances, st.results) == (tmp_path / "s" / "instances", tmp_path / "s" / "results")
    assert uid_key("1.2.3") == uid_key("1.2.3") != uid_key("1.2.4") and len(uid_key("1.2.3")) == 20
    assert uid_key("1.2.\u00e9") == uid_key("1.2.?")  # a peer's non-ASCII bytes cannot break the filing
    assert all(c in "0123456789abcdef" for c in uid_key("1.2.3"))
    p = st.put_instance("9.9", "1.1", b"a")
    assert p.stat().st_mode & 0o777 == 0o640  # what a peer sent is not for every user of the device
    q = st.put_instance("9.9", "1.2", b"b")
    r = st.put_result("9.9", "5.5", b"sr")
    other = st.put_instance("9.8", "1.3", b"c")
    assert p == st.instance_path("9.9", "1.1") == st.instances / uid_key("9.9") / f"{uid_key('1.1')}.dcm"
    assert r == st.results / uid_key("9.9") / f"{uid_key('5.5')}.dcm" and r.read_bytes() == b"sr"
    assert "1.1" not in str(p) and "9.9" not in str(p)  # no UID becomes a path
    assert st.remove_series("9.9") == 2
    assert not p.exists() and not q.exists() and not r.exists() and other.exists()
    assert st.remove_series("9.9") == 0
    assert st.put_instance("9.9", "1.1", b"again").read_bytes() == b"again"  # its folder is made again
    (st.instances / uid_key("9.8") / f"{TMP_PREFIX}half").write_bytes(b"h")
    (st.results / f"{TMP_PREFIX}r").write_bytes(b"h")
    assert st.clean_temporaries() == 2 and st.clean_temporaries() == 0
    assert other.exists() and st.free_mb() > 0
    lone = st.put_result("7.7", "5.6", b"sr")  # results of a series whose images are gone already
    assert st.remove_series("7.7") == 0 and not lone.exists() and not lone.parent.exists()


# -- the job table ----------------------------------------------------------------------------------
def test_job_table_transitions(tmp_path):
    j = JobTable(tmp_path / "j.sqlite")
    try:
        assert j.add_instance("1", "S1", "T1", tmp_path / "1", 10.0) == "new"
        assert j.add_instance("2", "S1", "T1", tmp_path / "2", 11.0) == "new"
        assert j.add_instance("3", "S2", "T1", tmp_path / "3", 14.0) == "new"  # same study, second series
        assert j.add_instance("4", "S3", "T2", tmp_path / "4", 12.0) == "new"
        assert j.series_state("S1") == "receiving" and j.series_state("nope") is None
        assert j.new_instances(0) == [(k, tmp_path / str(k)) for k in (1, 2, 3, 4)]  # (rowid, path)
        assert [p for _, p in j.new_instances(2, limit=1)] == [tmp_path / "3"]
        assert j.known_paths() == {str(tmp_path / n) for n in "1234"}
        # the study is the unit of quiet: S1 waits for S2, its study's last instance
        assert j.complete_quiet(17.5, 5.0) == ["S3"]
        assert j.complete_quiet(18.9, 5.0) == []
        assert sorted(j.complete_quiet(19.0, 5.0)) == ["S1", "S2"]
        assert j.new_instances(0) == []  # nothing is receiving now
        assert j.add_instance("5", "S1", "T1", tmp_path / "5", 20.0) == "changed"  # answered again after
        assert j.add_instance("5", "S1", "T1", tmp_path / "5", 21.0) == "duplicate"
        assert j.instance_paths("S1") == [tmp_path / "1", tmp_path / "2", tmp_path / "5"]
        assert j.next_complete_study() == ("T2", ["S3"])  # completed first
        j.set_classified("S3", {"d": 1}, [tmp_path / "sr3"], 30.0, has_destination=True)
        assert j.next_complete_study() == ("T1", ["S1", "S2"])
        assert j.set_classified("S1", {"d": 2}, [], 31.0, has_destination=True)  # "5" came while it was answered
        assert not j.set_failed("S2", "bad", 31.0)
        assert j.series_state("S1") == "receiving" and j.complete_quiet(31.0, 5.0) == ["S1"]
        assert j.next_complete_study() == ("T1", ["S1"])
        assert not j.set_classified("S1", {"d": 2}, [], 31.0, has_destination=True)  # nothing to send: done
        assert j.next_complete_study() is None
        assert (j.series_state("S1"), j.series_state("S2"), j.series_state("S3")) == ("done", "failed", "classified")
        assert j.queue_depth() == 1 and j.counts() == {"done": 1, "failed": 1, "classified": 1}
        due = j.due_for_sending(32.0)
        assert [(r.series_uid, r.state, r.result_paths, r.result_json, r.attempts) for r in due] == \
            [("S3", "classified", [str(tmp_path / "sr3")], {"d": 1}, 0)]
        assert (due[0].study_uid, due[0].n_instances, due[0].last_at) == ("T2", 1, 12.0)
        assert j.send_failed("S3", "down", 40.0) == 1 and j.send_failed("S3", "down", 50.0) == 2
        assert j.due_for_sending(49.9) == [] and [r.attempts for r in j.due_for_sending(50.0)] == [2]
        j.mark_sending("S3")
        j.mark_sending("S1")  # only a classified series starts sending
        assert j.series_state("S3") == "sending" and j.series_state("S1") == "done"
        j.resume(60.0)  # after a restart a series that was sending is due at once
        assert [r.state for r in j.due_for_sending(0.0)] == ["sending"]
        j.mark_sent("S3", 70.0)
        assert j.series_state("S3") == "sent" and j.due_for_sending(1e9) == [] and j.queue_depth() == 0
        # retention: sent (or done) series whose results are older than the retention
        assert j.due_for_purge(79.9, 10.0) == ["S1"]  # classified (done) at 31
        assert sorted(j.due_for_purge(80.0, 10.0)) == ["S1", "S3"]  # sent at 70
        j.mark_purged("S1", 90.0)
        assert j.instance_paths("S1") == [] and j.due_for_purge(1e9, 0.0) == ["S3"]
    finally:
        j.close()


def test_an_answered_series_reopens_for_more_of_it_unless_its_images_are_gone(tmp_path):
    j = JobTable(tmp_path / "j.sqlite")

    def answered(series, *, destination=False, result=None):
        j.add_instance(f"{series}.1", series, f"T{series}", tmp_path / series, 10.0)
        assert j.complete_quiet(100.0, 5.0) == [series]
        j.set_classified(series, result or {"result_uids": [f"{series}-sr"]}, [tmp_path / "sr"], 100.0, destination)

    try:
        answered("D")  # done
        assert j.revision("D") == (0, [])
        assert j.seen_again("D.1", 200.0) == ("D", "duplicate") and j.series_state("D") == "done"
        assert j.add_instance("D.2", "D", "TD", tmp_path / "d2", 200.0) == "reopened"
        assert j.series_state("D") == "receiving" and j.revision("D") == (1, ["D-sr"])
        assert j.instance_paths("D") == [tmp_path / "D", tmp_path / "d2"]
        assert j.complete_quiet(204.0, 5.0) == [] and j.complete_quiet(205.0, 5.0) == ["D"]  # quiet from the new one
        n, late = j._db.execute("SELECT n_instances, late_instances FROM series WHERE series_uid='D'").fetchone()
        assert (n, late) == (2, 0)
        j.set_classified("D", {"result_uids": ["D-sr-1"]}, [], 210.0, False)
        assert j.add_instance("D.3", "D", "TD", tmp_path / "d3", 300.0) == "reopened"
        assert j.revision("D") == (2, ["D-sr-1"])
        # on its way to the destination: the old answer's delivery ends, its retry does not come back
        answered("Q", destination=True)
        j.mark_sending("Q")
        assert j.add_instance("Q.2", "Q", "TQ", tmp_path / "q2", 200.0) == "reopened"
        j.mark_sent("Q", 201.0)
        assert j.send_failed("Q", "down", 999.0) == 0
        assert j.series_state("Q") == "receiving" and j.due_for_sending(1e9) == []
        err, nxt = j._db.execute("SELECT error, next_attempt_at FROM series WHERE series_uid='Q'").fetchone()
        assert (err, nxt) == (None, 0)
        answered("C", destination=True)  # classified, not yet sending
        assert j.add_instance("C.2", "C", "TC", tmp_path / "c2", 200.0) == "reopened"
        answered("N", result={"decision": "no_stone"})  # a summary without result UIDs
        assert j.add_instance("N.2", "N", "TN", tmp_path / "n2", 200.0) == "reopened" and j.revision("N") == (1, [])
        j.add_instance("M.1", "M", "TM", tmp_path / "m", 10.0)
        assert j.complete_quiet(100.0, 5.0) == ["M"]
        j.set_failed("M", "no slice usable", 100.0)  # failed before any result was recorded
        assert j.add_instance("M.2", "M", "TM", tmp_path / "m2", 200.0) == "reopened" and j.revision("M") == (1, [])
        j.add_instance("H.1", "H", "TH", tmp_path / "h", 10.0)  # failing while more of it came: answered again
        assert j.complete_quiet(100.0, 5.0) == ["H"] and j.add_instance("H.2", "H", "TH", tmp_path / "h2", 101.0)
        assert j.set_failed("H", "no slice usable", 102.0) is True and j.series_state("H") == "receiving"
        answered("F")
        j.set_failed("F", "no slice usable", 100.0)
        assert j.add_instance("F.2", "F", "TF", tmp_path / "f2", 200.0) == "reopened" and j.revision("F") == (1, ["F-sr"])
        # retention: due, but reopened before its files go: they stay
        answered("R")
        assert "R" in j.due_for_purge(1e9, 0.0)
        assert j.add_instance("R.2", "R", "TR", tmp_path / "r2", 200.0) == "reopened"
        assert not j.claim_purge("R", 300.0) and j.instance_paths("R") == [tmp_path / "R", tmp_path / "r2"]
        # claimed first: an instance from then on is late (it would be answered alone); a deletion that a
        # crash cut short is due again
        answered("V")
        assert j.claim_purge("V", 150.0)
        assert "V" in j.due_for_purge(1e9, 0.0)  # a crash here: due again
        j.mark_purged("V", 152.0)
        assert "V" not in j.due_for_purge(1e9, 0.0) and j.instance_paths("V") == []
        assert j.add_instance("V.2", "V", "TV", tmp_path / "v2", 153.0) == "late" and j.series_state("V") == "done"
        assert "V" not in j.due_for_purge(1e9, 0.0)  # kept: an instance after the deletion is not deleted at once
        assert j.instance_paths("V") == [tmp_path / "v2"]
        assert j._db.execute("SELECT purged_at FROM series WHERE series_uid='V'").fetchone()[0] == 150.0
        # its images deleted after the answer: the new instance alone would be answered; it stays late
        answered("P")
        j.mark_purged("P", 150.0)
        assert j.add_instance("P.2", "P", "TP", tmp_path / "p2", 200.0) == "late" and j.series_state("P") == "done"
        # an answer that said it may be cut short: a resend reopens it (the sender is sending it again)
        j.add_instance("X.1", "X", "TX", tmp_path / "x", 10.0)
        j.resume(20.0)
        assert j.gaps("X").interrupted and j.complete_quiet(100.0, 5.0) == ["X"]
        j.set_classified("X", {"result_uids": ["X-sr"]}, [], 100.0, False)
        n = j._db.execute("SELECT n_instances FROM series WHERE series_uid='X'").fetchone()[0]
        assert j.seen_again("X.1", 200.0) == ("X", "reopened")
        assert j._db.execute("SELECT n_instances FROM series WHERE series_uid='X'").fetchone()[0] == n  # no new one
        assert j.series_state("X") == "receiving" and not j.gaps("X").interrupted and j.revision("X") == (1, ["X-sr"])
        j.transfer_ended(["X"])
        j.resume(210.0)
        assert not j.gaps("X").interrupted  # the resend's association was released: whole
        assert j.seen_again("X.1", 300.0) == ("X", "duplicate") and j.revision("X") == (1, ["X-sr"])  # once
        j.add_instance("Z.1", "Z", "TZ", tmp_path / "z", 10.0)  # its sender aborted: the same for a resend
        j.add_instance("W.1", "W", "TW", tmp_path / "w", 10.0)
        assert j.transfer_aborted(["Z", "W"]) == ["Z", "W"]
        assert j.complete_quiet(100.0, 5.0) == ["Z", "W"]
        j.set_classified("Z", {"result_uids": ["Z-sr"]}, [], 100.0, False)
        assert j.transfer_aborted(["Z"]) == []  # an association ending after the answer marks nothing
        # nor one ending while the series waits for its answer: its study was quiet, so it is complete
        # whatever the backlog, and an association held open idle until the timeout is no news of it
        j.add_instance("K.1", "K", "TK", tmp_path / "k1", 10.0)
        j.transfer_ended(["K"])
        assert j.complete_quiet(100.0, 5.0) == ["K"] and j.transfer_aborted(["K"]) == []
        assert not j.gaps("K") and j.series_state("K") == "complete"
        assert j.set_classified("K", {"result_uids": ["K-sr"]}, [], 110.0, False) is False
        assert j.series_state("K") == "done" and j.revision("K")[0] == 0
        # but more of a waiting series, then its association aborted: that burst may be cut short
        j.add_instance("L.1", "L", "TL", tmp_path / "l1", 10.0)
        assert j.complete_quiet(100.0, 5.0) == ["L"]
        assert j.add_instance("L.2", "L", "TL", tmp_path / "l2", 101.0) == "changed"
        assert j.transfer_aborted(["L"]) == ["L"]
        assert j.set_classified("L", {"result_uids": ["L-sr"]}, [], 110.0, False) is True  # answered again
        assert j.series_state("L") == "receiving" and j.gaps("L").aborted
        assert j.gaps("Z").aborted and j.seen_again("Z.1", 200.0) == ("Z", "reopened")
        assert not j.gaps("Z") and j.series_state("Z") == "receiving"
        j.add_instance("Y.1", "Y", "TY", tmp_path / "y", 10.0)
        j.resume(20.0)
        assert j.complete_quiet(100.0, 5.0) == ["Y"]
        j.set_classified("Y", {"result_uids": []}, [], 100.0, False)
        j.mark_purged("Y", 150.0)
        assert j.seen_again("Y.1", 200.0) == ("Y", "duplicate") and j.series_state("Y") == "done"
    finally:
        j.close()


def test_job_table_hands_out_bounded_batches(tmp_path):
    j = JobTable(tmp_path / "j.sqlite")
    try:
        for i in range(40):
            j.add_instance(f"1.{i}", "S", "T", tmp_path / str(i), float(i))
        batch = j.new_instances(0)
        assert len(batch) == 32 and batch[-1][0] == 32 and [r for r, _ in j.new_instances(32)] == list(range(33, 41))
        for k in range(20):
            j.add_instance(f"2.{k}", f"S{k}", "T2", tmp_path / f"x{k}", 0.0)
        j.complete_quiet(1e9, 1.0)
        for k in range(20):
            j.set_classified(f"S{k}", {}, [tmp_path / "r"], 100.0 - k, has_destination=True)
        due = j.due_for_sending(1e9)
        assert [r.series_uid for r in due] == [f"S{k}" for k in range(19, 3, -1)]  # 16, oldest result first
    finally:
        j.close()


def test_job_table_resends_and_restarts_keep_a_receiving_series_open(tmp_path):
    j = JobTable(tmp_path / "j.sqlite")
    try:
        j.add_instance("1", "S", "T", tmp_path / "1", 100.0)
        assert j.seen_again("1", 104.0) == ("S", "duplicate") and j.seen_again("2", 104.0) is None
        assert j.complete_quiet(108.0, 5.0) == []  # the resend at 104 counts as activity
        j.resume(200.0)
        assert j.complete_quiet(204.0, 5.0) == [] and j.complete_quiet(205.0, 5.0) == ["S"]
        # a resend of a series a restart cut short, while it is complete: answered again after, as whole
        assert j.seen_again("1", 300.0) == ("S", "changed")
        assert j.series_state("S") == "complete" and not j.gaps("S").interrupted
        assert j.resume(0.0) == {"complete": 1}
        j.add_instance("7", "U", "V", tmp_path / "7", 400.0)
        j.resume(400.0, 60.0)  # a restart's grace: 60 s more than the quiet time
        assert j.complete_quiet(464.0, 5.0) == [] and j.complete_quiet(465.0, 5.0) == ["U"]
        j.add_instance("8", "W", "X", tmp_path / "8", 500.0)
        j.resume(500.0, 60.0)
        assert j.seen_again("8", 501.0)  # the scanner resends: the grace ends, the quiet time counts from here
        assert j.complete_quiet(505.0, 5.0) == [] and j.complete_quiet(506.0, 5.0) == ["W"]
        j.add_instance("9", "Y", "Z", tmp_path / "9", 600.0)
        j.resume(600.0, 60.0)
        j.add_instance("10", "Y", "Z", tmp_path / "10", 602.0)  # so does a new instance
        assert j.complete_quiet(607.0, 5.0) == ["Y"]
        # which series a restart may have cut short: in transfer when it stopped, nothing of them since
        assert not j.gaps("Y").interrupted and not j.gaps("unknown").interrupted  # an instance came after the restart
        assert j.gaps("S").interrupted  # resent at 300 (answered again after), and that resend was cut by the restart
        assert j._db.execute("SELECT last_at FROM series WHERE series_uid='S'").fetchone()[0] == 660.0  # the last restart's grace
        j.add_instance("20", "A", "B", tmp_path / "20", 702.0)
        j.add_instance("21", "C", "B", tmp_path / "21", 702.0)
        j.add_instance("22", "E", "F", tmp_path / "22", 702.0)
        j.add_instance("23", "G", "H", tmp_path / "23", 700.0)
        j.add_instance("26", "K", "L", tmp_path / "26", 702.0)
        j.transfer_ended(["K"])  # its sender released the association: all it meant to send is here
        assert not j.gaps("A").interrupted and j.complete_quiet(705.0, 5.0) == ["G"]
        j.resume(710.0)
        assert [j.gaps(s).interrupted for s in "ACEGK"] == [True, True, True, False, False]  # G was complete: whole
        j.add_instance("24", "A", "B", tmp_path / "24", 711.0)  # the sender goes on
        assert j.seen_again("22", 711.0) == ("E", "duplicate")  # the sender sends it again
        assert [j.gaps(s).interrupted for s in "ACE"] == [False, True, False]
        assert j.add_instance("25", "G", "H", tmp_path / "25", 712.0) == "changed" and not j.gaps("G").interrupted
        assert j.series_state("G") == "complete"  # being answered: answered again once that answer is in
        j.resume(720.0)  # a second restart: A and E were in transfer again; C has had nothing since the first
        assert [j.gaps(s).interrupted for s in "ACEK"] == [True, True, True, False]
        # G, complete, was getting more when it stopped: once its answer is in, it is receiving again, with
        # the mark and the restart's wait
        assert j.gaps("G").interrupted and j.series_state("G") == "complete"
        assert j.set_classified("G", {}, [], 721.0, False) and j.series_state("G") == "receiving"
        assert j.complete_quiet(724.0, 5.0) == [] and "G" in j.complete_quiet(725.0, 5.0) and j.gaps("G").interrupted
        j.resume(730.0)  # a third, with nothing in between: the marks stay until an instance comes
        assert [j.gaps(s).interrupted for s in "ACEK"] == [True, True, True, False]
    finally:
        j.close()


# -- the C-STORE handler, called directly -------------------------------------------------------------
class FakeEvent:
    """What StorageSCP.handle_store reads from pynetdicom's event: the SOP Instance UID and the dataset."""

    def __init__(self, path: Path, assoc: object = None, **edits) -> None:
        from pydicom import dcmread
        from pydicom.filebase import DicomBytesIO

        self.assoc = assoc  # the association it came on (the SCP keys what each one carried by it)
        ds = dcmread(path)
        for k, v in edits.items():
            setattr(ds, k, v)
        self.request = type("Req", (), {"AffectedSOPInstanceUID": ds.SOPInstanceUID})()
        buf = DicomBytesIO()
        ds.save_as(buf, enforce_file_format=True)
        self._data = buf.getvalue()

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        assert include_meta
        return self._data


def scp_for(tmp_path, **kw):
    from edgekidney.dicomnet.metrics import ListenerMetrics

    kw.setdefault("min_free_mb", 0.0)
    cfg = ListenerConfig(store=tmp_path / "store", port=0, **kw)
    st, jobs, metrics = InstanceStore(cfg.store), JobTable(cfg.store / "jobs.sqlite"), ListenerMetrics()
    return StorageSCP(cfg, st, jobs, metrics), jobs, metrics


def metric_value(metrics, name: str) -> float:
    for line in metrics.text().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edgekidney.listener"]


def test_handle_store_outcomes_their_statuses_counters_and_log_lines(tmp_path, series, caplog, monkeypatch):
    from edgekidney.dicomnet.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS

    study_uid, series_uid, files = series
    scp, jobs, metrics = scp_for(tmp_path)
    caplog.set_level(logging.INFO, logger="edgekidney.listener")
    writes = []
    put = scp.store.put_instance
    monkeypatch.setattr(scp.store, "put_instance", lambda *a: writes.append(a[1]) or put(*a))
    try:
        assert scp.handle_store(FakeEvent(files[0])) == SUCCESS
        assert scp.handle_store(FakeEvent(files[0])) == SUCCESS  # resent: stored once
        assert len(writes) == 1  # the resend is answered from the table, not decoded and written again
        assert metric_value(metrics, "edgekidney_listener_instances_received_total") == 1
        assert metric_value(metrics, "edgekidney_listener_instances_duplicate_total") == 1
        # the same instance from two associations at once: the table's INSERT OR IGNORE decides
        monkeypatch.setattr(jobs, "seen_again", lambda sop, now: None)
        assert scp.handle_store(FakeEvent(files[0])) == SUCCESS
        assert metric_value(metrics, "edgekidney_listener_instances_duplicate_total") == 2
        assert metric_value(metrics, "edgekidney_listener_instances_received_total") == 1
        assert messages(caplog) == []  # nothing to say about any of that
        # an instance of a series already complete, while it is being answered: that answer is recorded,
        # and the series is answered again with the instance
        monkeypatch.undo()  # the table's own seen_again again
        jobs.complete_quiet(1e12, 1.0)
        assert scp.handle_store(FakeEvent(files[1])) == SUCCESS and jobs.series_state(series_uid) == "complete"
        assert jobs.set_classified(series_uid, {"result_uids": []}, [], 2e12, has_destination=False)
        assert jobs.series_state(series_uid) == "receiving" and jobs.revision(series_uid) == (1, [])
        # once answered, a new instance reopens the series; a resend does not, unless the answer said
        # the series may be cut short
        jobs.complete_quiet(1e13, 1.0)
        assert not jobs.set_classified(series_uid, {"result_uids": []}, [], 2e13, has_destination=False)
        assert scp.handle_store(FakeEvent(files[0])) == SUCCESS and jobs.series_state(series_uid) == "done"
        assert scp.handle_store(FakeEvent(files[5], SOPInstanceUID="1.2.3.999")) == SUCCESS
        assert jobs.series_state(series_uid) == "receiving"
        jobs.complete_quiet(1e14, 1.0)
        jobs.set_classified(series_uid, {"result_uids": []}, [], 2e14, has_destination=False)
        jobs._db.execute("UPDATE series SET interrupted=1")  # as a restart that cut it short leaves it
        assert scp.handle_store(FakeEvent(files[0])) == SUCCESS and jobs.series_state(series_uid) == "receiving"
        # a resend while it waits for its answer, found cut short: answered again after that answer
        jobs.complete_quiet(1e14 + 1, 1.0)
        jobs._db.execute("UPDATE series SET interrupted=1")
        assert scp.handle_store(FakeEvent(files[0])) == SUCCESS and jobs.series_state(series_uid) == "complete"
        assert jobs.set_classified(series_uid, {"result_uids": []}, [], 2e14 + 1, has_destination=False)
        # a refused instance after the answer: answered again, without it and saying so
        jobs.complete_quiet(1e15, 1.0)
        jobs.set_classified(series_uid, {"result_uids": []}, [], 2e15, has_destination=False)
        n = jobs._db.execute("SELECT n_instances FROM series WHERE series_uid=?", (series_uid,)).fetchone()[0]
        assert scp.handle_store(FakeEvent(files[5], SOPInstanceUID="1.2.3.998", Rows=9000)) != SUCCESS
        assert jobs.series_state(series_uid) == "receiving" and jobs.gaps(series_uid).refused == 1
        assert jobs._db.execute("SELECT n_instances FROM series WHERE series_uid=?",
                                (series_uid,)).fetchone()[0] == n  # the refused one is not counted
        # its images deleted after the answer: a new instance is kept, counted late, in no answer
        jobs.complete_quiet(1e16, 1.0)
        jobs.set_classified(series_uid, {"result_uids": []}, [], 2e16, has_destination=False)
        jobs.mark_purged(series_uid, 3e16)
        assert scp.handle_store(FakeEvent(files[5], SOPInstanceUID="1.2.3.997")) == SUCCESS
        assert jobs.series_state(series_uid) == "done"
        assert metric_value(metrics, "edgekidney_listener_series_reopened_total") == 3  # the first: when answered
        assert metric_value(metrics, "edgekidney_listener_instances_late_total") == 1
        assert metric_value(metrics, "edgekidney_listener_instances_duplicate_total") == 5
        key = uid_key(series_uid)
        assert [m for m in messages(caplog) if not m.startswith("C-STORE refused")] == [
            f"series {key}: a new instance arrived after the series was complete, while it waits for its answer; "
            "to be answered again after it",
            f"series {key}: a new instance arrived after the series was complete; receiving again, to be answered "
            "again when complete",
            f"series {key}: sent again after it was found possibly cut short; receiving again, to be answered again "
            "when complete",
            f"series {key}: sent again after it was found possibly cut short, while it waits for its answer; to be "
            "answered again after it",
            f"series {key}: an instance of it was refused after the series was complete; receiving again, to be "
            "answered again when complete",
            f"series {key}: instance arrived after the series' images were deleted (retention); stored, in no answer"]
        caplog.clear()
        # without Study/Series Instance UID: filed under a substitute key, said once per series
        for f in files[2:5]:
            assert scp.handle_store(FakeEvent(f, StudyInstanceUID="", SeriesInstanceUID="")) == SUCCESS
        (substitute,) = [r[0] for r in jobs._db.execute("SELECT series_uid FROM series") if r[0] != series_uid]
        assert messages(caplog) == [f"series {uid_key(substitute)}: instances without Study/Series Instance UID, "
                                    "filed under a substitute key (classified, no SR)"]
        caplog.clear()
        # the disk below its floor
        scp.cfg.min_free_mb = 1e12
        assert scp.handle_store(FakeEvent(files[5])) == OUT_OF_RESOURCES
        assert messages(caplog) == ["C-STORE refused: store below 1000000000000 MB free"]
        assert 'edgekidney_listener_refused_total{reason="disk"} 1.0' in metrics.text()
        scp.cfg.min_free_mb = 0.0
        caplog.clear()
        # a write that fails, and a bug: 0xA700 and 0xC000, each counted and said in one line
        monkeypatch.setattr(scp.store, "put_instance", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
        assert scp.handle_store(FakeEvent(files[5])) == OUT_OF_RESOURCES
        monkeypatch.setattr(scp.store, "put_instance", lambda *a: (_ for _ in ()).throw(PermissionError()))
        assert scp.handle_store(FakeEvent(files[5])) == OUT_OF_RESOURCES  # no strerror: the type is said
        monkeypatch.setattr(scp.store, "put_instance", lambda *a: (_ for _ in ()).throw(KeyError("bug")))
        assert scp.handle_store(FakeEvent(files[5])) == CANNOT_UNDERSTAND
        assert messages(caplog) == ["store failed: No space (answered Out of Resources)",
                                    "store failed: PermissionError (answered Out of Resources)",
                                    "store failed: KeyError (answered 0xC000)"]
        assert 'edgekidney_listener_failures_total{stage="store"} 3.0' in metrics.text()
        assert sop_of(files[5]) not in rows(tmp_path / "store")
    finally:
        jobs.close()


def test_handle_store_refuses_what_the_configured_limits_refuse(tmp_path, series, caplog):
    from edgekidney.data.limits import DecodeLimits
    from edgekidney.dicomnet.scp import CANNOT_UNDERSTAND

    _, _, files = series  # 64 x 64 slices
    caplog.set_level(logging.INFO, logger="edgekidney.listener")
    scp, jobs, metrics = scp_for(tmp_path, limits=DecodeLimits(max_side=48))
    try:
        status = scp.handle_store(FakeEvent(files[0]))
        assert status.Status == CANNOT_UNDERSTAND
        assert status.ErrorComment == "image declares 64x64 px; the largest side allowed is 48 px"
        sop = sop_of(files[0])
        assert messages(caplog) == [f"C-STORE refused (0xC000): instance {uid_key(sop)}: image declares 64x64 px; "
                                    "the largest side allowed is 48 px"]
        assert 'edgekidney_listener_refused_total{reason="limits"} 1.0' in metrics.text()
        assert rows(tmp_path / "store") == {} and not list((tmp_path / "store" / "instances").rglob("*.dcm"))
    finally:
        jobs.close()
    scp, jobs, _ = scp_for(tmp_path / "default")  # the default limits: a 10000 px side is refused
    study_uid, series_uid, _ = series
    try:
        assert scp.handle_store(FakeEvent(files[1])) == 0
        status = scp.handle_store(FakeEvent(files[0], Rows=10000, Columns=10000))
        # an Error Comment is LO, at most 64 characters: cut there, without the space the cut left
        assert status.ErrorComment == "image declares 10000x10000 px; the largest side allowed is 2048"
        # its series is answered as missing it, as long as it is missing
        gaps = jobs.gaps(series_uid)
        assert (gaps.refused, gaps.refused_reason, gaps.aborted, gaps.interrupted) == (
            1, "image declares 10000x10000 px; the largest side allowed is 2048 px", False, False)
        assert scp.handle_store(FakeEvent(files[0], Rows=20000, Columns=20000)) != 0  # the same instance again
        assert jobs.gaps(series_uid).refused == 1 and "20000x20000" in jobs.gaps(series_uid).refused_reason
        assert jobs.series_state(series_uid) == "receiving" and jobs.instance_paths(series_uid) != []
        assert scp.handle_store(FakeEvent(files[0])) == 0  # sent again as it should be: stored, no gap left
        assert not jobs.gaps(series_uid) and jobs.gaps("unknown").refused == 0
        # a series of which nothing was stored has a row, so that it is answered (as failed, with why)
        assert scp.handle_store(FakeEvent(files[2], Rows=10000, Columns=10000, SeriesInstanceUID="1.2.3.77")) != 0
        assert jobs.series_state("1.2.3.77") == "receiving" and jobs.instance_paths("1.2.3.77") == []
        assert jobs.gaps("1.2.3.77").refused == 1
    finally:
        jobs.close()


def test_free_space_and_its_floor(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**10, 0, 5 * 10**9))
    scp, jobs, _ = scp_for(tmp_path, min_free_mb=5000.0)
    try:
        assert scp.store.free_mb() == 5000.0 and not scp.disk_low()  # at the floor is still enough
        scp.cfg.min_free_mb = 5000.001
        assert scp.disk_low()
    finally:
        jobs.close()


def test_a_failed_insert_rolls_back_and_the_table_stays_usable(tmp_path):
    import sqlite3

    j = JobTable(tmp_path / "j.sqlite")
    try:
        with pytest.raises(sqlite3.IntegrityError):
            j.add_instance("9", "S9", None, tmp_path / "9", 1.0)  # a series needs its study
        assert j.known_paths() == set() and j.counts() == {}
        assert j.add_instance("10", "S10", "T", tmp_path / "10", 2.0) == "new"
    finally:
        j.close()
