"""The DICOM listener in-process: receive, complete, classify, SR back, retries, refusals, retention.

A tiny ONNX model (no torch, no training) stands in for the classifier; pynetdicom is the scanner and
the PACS. Everything runs on 127.0.0.1 with free ports and short timeouts.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("prometheus_client")

from listener_fixtures import (REPO, Pacs, free_port, jpeg2000_series, send, tiny_model,  # noqa: E402
                               wait_for, write_series)

from edgekidney.dicomnet import Destination, Listener, ListenerConfig, fallback_processor  # noqa: E402
from edgekidney.dicomnet.jobs import JobTable  # noqa: E402
from edgekidney.dicomnet.service import backoff_s  # noqa: E402
from edgekidney.dicomnet.sr import result_uids  # noqa: E402
from edgekidney.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def series_a(tmp_path_factory):
    return write_series(tmp_path_factory.mktemp("series_a"), 12, seed=1)


@pytest.fixture
def make_listener(model, tmp_path):
    made = []

    def make(**kw):
        kw.setdefault("store", tmp_path / "store")
        kw.setdefault("port", 0)
        kw.setdefault("series_timeout_s", 0.5)
        kw.setdefault("min_free_mb", 0.0)
        kw.setdefault("poll_s", 0.05)
        cfg = ListenerConfig(**kw)
        proc, close = fallback_processor(model)
        lst = Listener(cfg, proc).start()
        made.append((lst, close))
        return lst

    yield make
    for lst, close in made:
        if lst.scp.server is not None:
            lst.stop()
        close()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_series_to_sr_at_destination(make_listener, series_a, model, tmp_path):
    study, series, files = series_a
    pacs = Pacs().start()
    try:
        lst = make_listener(destination=Destination("127.0.0.1", pacs.port, "PACS"))
        assert send(lst.port, files) == [0] * 12
        assert send(lst.port, files[:3]) == [0] * 3  # resent: acknowledged, stored once
        wait_for(lambda: pacs.uids())
        wait_for(lambda: lst.jobs.series_state(series) == "sent")
        time.sleep(0.3)
        assert pacs.uids() == [result_uids(series)[0]]
    finally:
        pacs.stop()
    sr = pacs.received[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"
    assert sr.StudyInstanceUID == study and sr.PatientID == "SYNTH-S0001" and sr.PatientName == "Synthetic^Phantom"
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(
        __import__("pydicom").dcmread(f).SOPInstanceUID for f in files)
    assert len(list((lst.store.instances).glob("*/*.dcm"))) == 12
    try:  # an independent reader of SR documents accepts it
        import highdicom
    except ImportError:
        highdicom = None
    if highdicom is not None:
        parsed = highdicom.sr.ComprehensiveSR.from_dataset(sr)
        assert parsed.SOPInstanceUID == result_uids(series)[0] and len(parsed.ContentSequence) == 5

    lines = [json.loads(x) for x in (tmp_path / "store" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["study_uid"] == study
    entry = lines[0]["series"][0]
    assert entry["series_uid"] == series and entry["slices"] == 12 and entry["failed_slices"] == 0
    assert entry["result_uids"] == [result_uids(series)[0]]
    # the same decision as classifying the files directly
    from edgekidney.runtime.predict import Classifier
    with Classifier(model) as clf:
        preds, _ = clf.predict_files(files)
    numbers = [int(__import__("pydicom").dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    positives = sorted(n for n, p in zip(numbers, preds) if p.label == "Stone")
    assert entry["positive_slices"] == positives
    from edgekidney.study.rule import StudyRule, decide  # the study's rule, slices in Instance Number order
    ranked = [p for _, p in sorted(zip(numbers, preds), key=lambda np_: np_[0])]
    expected = decide([p.probability for p in ranked], [p.label != "out_of_scope" for p in ranked],
                      StudyRule.from_card(clf.card), clf.threshold, images=sorted(numbers))
    assert entry["decision"] != "stone" or "images " in entry["reason"]  # the numbers a viewer shows
    assert (entry["decision"], entry["reason"]) == (expected.decision, expected.reason)
    assert entry["decision"] in ("stone", "no_stone", "not_assessable")
    judged = [p.probability for p in preds if p.label != "out_of_scope"]
    assert abs(entry["max_probability"] - max(judged)) < 1e-5  # of the slices judged, as study's

    text = lst.metrics.text()
    assert metric(text, "edgekidney_listener_instances_received") == 12
    assert metric(text, "edgekidney_listener_instances_duplicate") == 3
    assert metric(text, "edgekidney_listener_series_completed") == 1
    assert metric(text, "edgekidney_listener_results_sent") == 1
    assert metric(text, "edgekidney_listener_queue_depth") == 0


def test_destination_down_does_not_block_receiving_and_delivers_when_up(make_listener, series_a, tmp_path):
    _, series, files = series_a
    _, series_b, files_b = write_series(tmp_path / "b", 5, seed=2)
    port = free_port()
    lst = make_listener(destination=Destination("127.0.0.1", port, "PACS"), retry_base_s=0.1, retry_max_s=0.4)
    assert send(lst.port, files) == [0] * 12
    wait_for(lambda: metric(lst.metrics.text(), 'edgekidney_listener_failures_total{stage="send"}') >= 2)
    assert send(lst.port, files_b) == [0] * 5  # receiving goes on while the destination is down
    wait_for(lambda: lst.jobs.series_state(series_b) in ("classified", "sending"))
    pacs = Pacs(port=port).start()
    try:
        wait_for(lambda: len(set(pacs.uids())) == 2)
        wait_for(lambda: lst.jobs.series_state(series) == lst.jobs.series_state(series_b) == "sent")
        assert sorted(set(pacs.uids())) == sorted([result_uids(series)[0], result_uids(series_b)[0]])
    finally:
        pacs.stop()


def test_restart_resumes_a_series_that_was_receiving(model, series_a, tmp_path):
    _, series, files = series_a
    store = tmp_path / "store"
    proc, close = fallback_processor(model)
    try:
        first = Listener(ListenerConfig(store=store, port=0, series_timeout_s=60, min_free_mb=0), proc).start()
        assert send(first.port, files[:7]) == [0] * 7
        first.stop()  # before the series is complete
        second = Listener(ListenerConfig(store=store, port=0, series_timeout_s=0.5, min_free_mb=0, poll_s=0.05),
                          proc).start()
        try:
            assert send(second.port, files) == [0] * 12  # the scanner resends everything
            wait_for(lambda: second.jobs.series_state(series) == "done")
            lines = (store / "results.jsonl").read_text().splitlines()
            assert len(lines) == 1 and json.loads(lines[0])["series"][0]["slices"] == 12
            assert metric(second.metrics.text(), "edgekidney_listener_instances_duplicate") == 7
        finally:
            second.stop()
    finally:
        close()


def test_full_disk_refuses_associations_and_stores(make_listener, series_a):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    _, _, files = series_a
    lst = make_listener()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    ds = __import__("pydicom").dcmread(files[0])
    lst.cfg.min_free_mb = 1e12  # the disk is "full" now
    assert assoc.send_c_store(ds).Status == 0xA700  # Out of Resources, nothing stored
    assoc.release()
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assert assoc.is_rejected and not assoc.is_established
    assert not list(lst.store.instances.glob("*/*.dcm"))
    assert metric(lst.metrics.text(), 'edgekidney_listener_refused_total{reason="disk"}') == 2


def test_jpeg2000_series_without_study_and_series_uids_is_kept_and_classified(make_listener, tmp_path):
    pytest.importorskip("openjpeg")
    files = jpeg2000_series(tmp_path / "j2k", fill_study_series=False)
    pacs = Pacs().start()
    try:
        lst = make_listener(destination=Destination("127.0.0.1", pacs.port, "PACS"))
        assert send(lst.port, files) == [0] * 20  # JPEG 2000 Lossless accepted as sent
        wait_for(lambda: lst.jobs.counts().get("done") == 1)
    finally:
        pacs.stop()
    assert pacs.uids() == []  # no SR for a series whose study has no UID
    stored = list(lst.store.instances.glob("*/*.dcm"))
    assert len(stored) == 20 and len({p.parent for p in stored}) == 1  # one substitute series
    assert __import__("pydicom").dcmread(stored[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    entry = json.loads((tmp_path / "store" / "results.jsonl").read_text())["series"][0]
    assert entry["slices"] == 20 and entry["failed_slices"] == 0 and entry["result_uids"] == []
    assert "no Study/Series Instance UID" in entry["no_sr"]


def test_associations_beyond_the_maximum_are_rejected(make_listener, series_a, caplog):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    caplog.set_level(logging.WARNING, logger="edgekidney.listener")
    lst = make_listener(max_associations=1)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    second = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    try:
        assert first.is_established and second.is_rejected
    finally:
        first.release()
    third = wait_for(lambda: (lambda a: a if a.is_established else None)(  # once the first one's thread ended
        ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")), timeout=5, step=0.2)
    third.release()
    assert metric(lst.metrics.text(), 'edgekidney_listener_refused_total{reason="policy"}') >= 1
    said = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert said and set(said) == {"association rejected: 1 associations already open (--max-associations); from "
                                  "'SCANNER'"}


def test_calling_ae_allow_list(make_listener, series_a, caplog):
    _, _, files = series_a
    caplog.set_level(logging.WARNING, logger="edgekidney.listener")
    lst = make_listener(allowed_calling=("CT01",))
    assert send(lst.port, files[:1], calling="INTRUDER") == [-2]
    assert send(lst.port, files[:1], calling="CT01") == [0]
    assert send(lst.port, files[1:2], calling="CT01", called="ANY-SCP") == [0]  # the called AE title: any
    said = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert said == ["association rejected: calling AE title 'INTRUDER' is not in --allow"]


def test_called_ae_title_is_checked_when_asked(make_listener, series_a, caplog):
    """A scanner set up with another AE title than ours is told so (rejected-permanent, called AE title
    not recognised) with --require-called-ae, and the log says who it thought it called."""
    _, _, files = series_a
    caplog.set_level(logging.WARNING, logger="edgekidney.listener")
    lst = make_listener(require_called_ae=True, allowed_calling=("CT01",))
    assert send(lst.port, files[:1], calling="CT01", called="ANY-SCP") == [-2]
    assert send(lst.port, files[:1], calling="CT02", called="EDGEKIDNEY") == [-2]
    assert send(lst.port, files[:1], calling="CT01", called="EDGEKIDNEY") == [0]
    said = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert said == ["association rejected: called AE title 'ANY-SCP' is not ours ('EDGEKIDNEY'; --require-called-ae)",
                    "association rejected: calling AE title 'CT02' is not in --allow"]
    assert metric(lst.metrics.text(), 'edgekidney_listener_refused_total{reason="policy"}') == 2
    from edgekidney.dicomnet.scp import _shown_aet

    # what a peer puts on the wire reaches the log printable and short
    assert _shown_aet(b" CT\x0701\n ") == "CT?01" and _shown_aet("A" * 40) == "A" * 16 and _shown_aet(None) == ""
    assert _shown_aet(b"CT\xff1") == "CT\ufffd1"  # not ASCII: replaced, never an exception in a handler


def test_retention_deletes_images_after_the_result(make_listener, series_a, tmp_path):
    _, series, files = series_a
    lst = make_listener(retention_s=0.0)
    assert send(lst.port, files) == [0] * 12
    wait_for(lambda: lst.jobs.series_state(series) == "done")
    wait_for(lambda: lst.jobs.instance_paths(series) == [])  # recorded after the files are gone
    assert not list(lst.store.instances.glob("*/*.dcm"))
    assert not list(lst.store.results.glob("*/*.dcm"))  # the SR made from them too
    assert (tmp_path / "store" / "results.jsonl").read_text().count("\n") == 1


def test_unclassifiable_series_is_recorded_failed_not_retried(model, series_a, tmp_path):
    _, series, files = series_a

    def refuse(paths, incomplete=None):
        raise InputError(f"{len(paths)} slices, none usable")

    lst = Listener(ListenerConfig(store=tmp_path / "s", port=0, series_timeout_s=0.3, min_free_mb=0, poll_s=0.05),
                   refuse).start()
    try:
        assert send(lst.port, files[:4]) == [0] * 4
        wait_for(lambda: lst.jobs.series_state(series) == "failed")
        line = json.loads((tmp_path / "s" / "results.jsonl").read_text())
        assert line["series"] == [{"series_uid": series, "error": "4 slices, none usable"}]
        assert metric(lst.metrics.text(), 'edgekidney_listener_failures_total{stage="classify"}') == 1
    finally:
        lst.stop()


def test_job_table_is_idempotent_and_resumes_sending(tmp_path):
    jobs = JobTable(tmp_path / "j.sqlite")
    assert jobs.add_instance("1.1", "9.1", "8.1", tmp_path / "a", 100.0) == "new"
    assert jobs.add_instance("1.1", "9.1", "8.1", tmp_path / "a", 101.0) == "duplicate"
    assert jobs.add_instance("1.2", "9.1", "8.1", tmp_path / "b", 102.0) == "new"
    assert jobs.complete_quiet(105.0, 5.0) == []  # 3 s quiet < 5 s
    assert jobs.seen_again("1.1", 103.0) and not jobs.seen_again("1.9", 103.0)  # a resend is activity
    assert jobs.complete_quiet(107.5, 5.0) == []
    assert jobs.complete_quiet(108.0, 5.0) == ["9.1"]
    assert not jobs.set_classified("9.1", {"decision": "Normal"}, [tmp_path / "sr.dcm"], 110.0, has_destination=True)
    assert jobs.mark_sending("9.1") and not jobs.mark_sending("9.1", revision=1)  # that answer is not there
    jobs.close()
    jobs = JobTable(tmp_path / "j.sqlite")  # a crash while sending: the same result goes again
    jobs.resume(200.0)
    rows = jobs.due_for_sending(200.0)
    assert [(r.series_uid, r.state, r.result_paths) for r in rows] == [("9.1", "sending", [str(tmp_path / "sr.dcm")])]
    assert jobs.queue_depth() == 1


def test_fallback_series_decision_is_the_study_rule():
    """The fallback speaks the study's words and needs its runs: one confident slice is no stone call."""
    from types import SimpleNamespace

    from edgekidney.dicomnet.processor import series_decision
    from edgekidney.runtime.predict import Prediction

    card = SimpleNamespace(extra={})

    def preds(*specs):
        return [None if s is None else Prediction("x", s[0], s[1], 0.5, in_scope=s[1] != "out_of_scope")
                for s in specs]

    lone = preds((0.1, "Normal"), (0.9, "Stone"), (0.1, "Normal"))
    assert series_decision(lone, [False] * 3, card, 0.5).decision == "no_stone"  # any slice used to be enough
    run = series_decision(preds((0.1, "Normal"), (0.9, "Stone"), (0.8, "Stone")), [False] * 3, card, 0.5)
    assert run.decision == "stone" and [(r.start, r.end) for r in run.supporting] == [(1, 2)]
    broken = series_decision(preds((0.9, "Stone"), (0.9, "out_of_scope"), (0.9, "Stone")), [False] * 3, card, 0.5)
    assert broken.decision == "no_stone" and broken.supporting == []  # an out-of-scope slice breaks the run
    hole = series_decision(preds((0.1, "Normal"), None, (0.1, "Normal")), [False, True, False], card, 0.5)
    assert hole.decision == "not_assessable" and "could not be judged" in hole.reason
    from edgekidney.data.preprocess import NO_BODY_REASON

    blank = preds((0.9, "Stone"), (0.9, "out_of_scope"), (0.9, "Stone"))
    blank[1].scope_reason = NO_BODY_REASON  # a blank slice inside the run, not anatomy out of scope
    cut = series_decision(blank, [False] * 3, card, 0.5)
    assert cut.decision == "not_assessable" and cut.reason.startswith("slice 1, inside the range the model judges")
    card.extra = {"study_rule": {"min_run": 1}}  # the model's own rule, as study reads it
    assert series_decision(lone, [False] * 3, card, 0.5).decision == "stone"
    card.extra = {}
    lungs = [Prediction("x", 0.1, "Normal", 0.5, in_scope=True), *preds((0.1, "out_of_scope"), (0.1, "out_of_scope"))]
    for p in lungs[1:]:
        p.lung_share, p.skull_share, p.split_share = 0.3, 0.0, 0.0
    assert series_decision(lungs[:1] * 2 + lungs[1:], [False] * 4, card, 0.5).decision == "no_stone"  # 2 vs 2
    chest = series_decision(lungs[:1] * 2 + lungs[1:] + lungs[1:2], [False] * 5, card, 0.5)
    assert chest.decision == "not_assessable" and chest.reason.startswith("a chest series: 3 slices")
    lungs[1].skull_share = lungs[2].skull_share = 0.9  # a head, not a chest: never "a chest series"
    assert series_decision(lungs[:1] * 2 + lungs[1:] + lungs[1:2], [False] * 5, card, 0.5).decision == "no_stone"
    lungs[1].skull_share = lungs[2].skull_share = 0.0
    lungs[1].split_share = lungs[2].split_share = 0.5  # legs, not a chest
    assert series_decision(lungs[:1] * 2 + lungs[1:] + lungs[1:2], [False] * 5, card, 0.5).decision == "no_stone"
    cut = series_decision(lone, [False] * 3, card, 0.5, incomplete="cut short")
    assert cut.decision == "not_assessable" and cut.reason.startswith("cut short; 'no stone' would not cover")


def test_backoff_and_destination_parsing():
    assert [backoff_s(n, 2.0, 10.0) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert Destination.parse("pacs.local:104:PACS") == Destination("pacs.local", 104, "PACS")
    for bad in ("pacs:104", "pacs:x:PACS", "pacs:0:PACS", "pacs:104:" + "A" * 17):
        with pytest.raises(InputError):
            Destination.parse(bad)
    with pytest.raises(InputError, match="--restart-grace must be 0 or more"):
        ListenerConfig(store=Path("/tmp/x"), restart_grace_s=-1.0)
    assert ListenerConfig(store=Path("/tmp/x")).restart_grace_s == 120.0
    assert ListenerConfig(store=Path("/tmp/x"), restart_grace_s=0.0).restart_grace_s == 0.0


def test_listener_path_does_not_import_torch():
    code = ("import sys, edgekidney.dicomnet, edgekidney.dicomnet.service, edgekidney.runtime.predict; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_prefetched_slices_are_not_classified_again_and_give_the_same_result(model, series_a):
    from edgekidney.dicomnet import FallbackProcessor
    from edgekidney.runtime.predict import Classifier

    _, _, files = series_a
    with Classifier(model) as clf:
        calls = []
        original = clf.predict_files

        def counting(paths, **kw):
            calls.append(len(paths))
            return original(paths, **kw)

        clf.predict_files = counting
        plain = FallbackProcessor(clf)(files).summary
        prefetching = FallbackProcessor(clf)
        prefetching.prepare(files[:5])
        prefetching.prepare(files[3:9])  # overlaps: only 4 new
        calls.clear()
        result = prefetching(files)
    assert calls == [3]  # only the slices not prepared
    assert result.summary == plain and result.datasets[0].SOPInstanceUID == plain["result_uids"][0]
    assert not prefetching._cache  # used entries are dropped


def test_enhanced_ct_is_stored_and_the_fallback_says_why_it_cannot_classify_it(make_listener, tmp_path):
    from listener_fixtures import CT_VOLUMES

    src = CT_VOLUMES / "enhanced-ct-multiframe.dcm"
    if not src.exists():
        pytest.skip("shared enhanced CT file not found")
    lst = make_listener()
    assert send(lst.port, [src]) == [0]
    wait_for(lambda: lst.jobs.counts().get("failed") == 1)
    assert len(list(lst.store.instances.glob("*/*.dcm"))) == 1  # kept, whatever the analysis says
    entry = json.loads((tmp_path / "store" / "results.jsonl").read_text())["series"][0]
    assert "multi-frame DICOM (2 frames)" in entry["error"]


def test_tls_only_clients_that_trust_our_certificate_get_in(make_listener, series_a, tmp_path):
    import shutil
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from edgekidney.dicomnet import TlsConfig

    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    lst = make_listener(tls=TlsConfig(cert, key))
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY", tls_args=(client, "127.0.0.1"))
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    plain = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")  # no TLS: no association
    assert not plain.is_established


def test_webhook_gets_the_study_line(make_listener, series_a):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    got = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    http = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        study, series, files = series_a
        lst = make_listener(webhook=f"http://127.0.0.1:{http.server_address[1]}/hook")
        assert send(lst.port, files[:4]) == [0] * 4
        wait_for(lambda: got)
    finally:
        http.shutdown()
    assert len(got) == 1 and got[0]["study_uid"] == study and got[0]["series"][0]["slices"] == 4


def test_study_processor_behind_the_seam_sends_sr_and_sc_with_series_derived_uids(model, series_a, tmp_path):
    from edgekidney.dicomnet import make_processor
    from edgekidney.dicomnet.study_processor import study_available

    if not study_available():
        pytest.skip("edgekidney.study or highdicom not installed")
    study, series, files = series_a
    proc, close, name = make_processor(model, "study")
    pacs = Pacs().start()
    lst = Listener(ListenerConfig(store=tmp_path / "store", port=0, series_timeout_s=0.5, min_free_mb=0, poll_s=0.05,
                                  destination=Destination("127.0.0.1", pacs.port, "PACS")), proc).start()
    try:
        assert name == "study-analysis"
        assert send(lst.port, files) == [0] * 12
        wait_for(lambda: lst.jobs.series_state(series) == "sent")
    finally:
        lst.stop()
        pacs.stop()
        close()
    by_uid = {str(d.SOPInstanceUID): d for d in pacs.received}
    sr_uid, sc_uid = result_uids(series, "sr")[0], result_uids(series, "sc0")[0]
    assert sr_uid in by_uid and set(by_uid) <= {sr_uid, sc_uid}
    assert by_uid[sr_uid].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (TID 1500)
    assert by_uid[sr_uid].StudyInstanceUID == study
    assert by_uid[sr_uid].SeriesInstanceUID == result_uids(series, "sr")[1]
    entry = json.loads((tmp_path / "store" / "results.jsonl").read_text())["series"][0]
    assert entry["decision"] in ("stone", "no_stone", "not_assessable") and entry["n_slices"] == 12
    assert entry["result_uids"][0] == sr_uid
    assert proc.classifier.hits + proc.classifier.misses == 12


def test_study_processor_uses_slices_classified_while_the_series_arrived(model, series_a):
    from edgekidney.dicomnet import make_processor
    from edgekidney.dicomnet.study_processor import study_available

    if not study_available():
        pytest.skip("edgekidney.study or highdicom not installed")
    _, _, files = series_a
    proc, close, _ = make_processor(model, "study")
    try:
        plain = proc(files).summary
        proc.classifier.hits = proc.classifier.misses = 0
        proc.prepare(files[:8])
        cached = proc(files).summary
    finally:
        close()
    assert (proc.classifier.hits, proc.classifier.misses) == (8, 4)  # same slice content, found in the cache
    for k in ("decision", "slices", "probability", "supporting", "result_uids"):
        assert cached[k] == plain[k]


def test_caching_classifier_answers_prepared_slices_by_content(model, series_a):
    from edgekidney.data.decode import load_slice
    from edgekidney.dicomnet.study_processor import CachingClassifier
    from edgekidney.runtime.predict import Classifier

    _, _, files = series_a
    with Classifier(model) as clf:
        cached = CachingClassifier(clf)
        cached.prepare(files[:6])
        slices = [load_slice(f, clf.card.preprocessing) for f in files]
        got = cached.predict_slices(slices, [f"s{i}" for i in range(12)])
        want = clf.predict_slices(slices, [f"s{i}" for i in range(12)])
    assert (cached.hits, cached.misses) == (6, 6)
    assert [(p.path, p.label) for p in got] == [(p.path, p.label) for p in want]
    assert max(abs(a.probability - b.probability) for a, b in zip(got, want)) < 1e-5


# -- limits before allocation (docs/architecture.md rule 8) ------------------------------------------
def test_an_instance_declaring_a_huge_image_is_refused_at_c_store_and_not_stored(make_listener, series_a, tmp_path):
    import io

    from pydicom import dcmread
    from pynetdicom import AE

    from hostile import Measured, dicom_instance_declaring

    _, series, files = series_a
    hostile = dcmread(io.BytesIO(dicom_instance_declaring(  # a 64 px slice of the series that says it is 60000 px
        files[0].read_bytes(), 60000, 60000, SOPInstanceUID="1.2.826.0.1.3680043.8.498.60000")))
    lst = make_listener()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(hostile.SOPClassUID), [str(hostile.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assert assoc.is_established
    try:
        with Measured() as m:
            status = assoc.send_c_store(hostile)
    finally:
        assoc.release()
    assert status.Status == 0xC000  # Cannot Understand: a permanent failure, resending cannot help
    assert status.ErrorComment == "image declares 60000x60000 px; the largest side allowed is 2048"  # 64 chars
    assert m.seconds < 2.0 and m.peak_mb < 100, (m.seconds, m.peak_mb)
    assert send(lst.port, files) == [0] * 12  # the rest of the series is received and classified as usual
    wait_for(lambda: lst.jobs.series_state(series) == "done")
    stored = list(lst.store.instances.glob("*/*.dcm"))
    assert len(stored) == 12 and "1.2.826.0.1.3680043.8.498.60000" not in {dcmread(p).SOPInstanceUID for p in stored}
    assert json.loads((tmp_path / "store" / "results.jsonl").read_text())["series"][0]["slices"] == 12
    assert metric(lst.metrics.text(), 'edgekidney_listener_refused_total{reason="limits"}') == 1
    assert metric(lst.metrics.text(), "edgekidney_listener_instances_received") == 12


def test_the_fallback_fails_a_series_over_the_series_limit_before_reading_it(model, series_a):
    from edgekidney.data.limits import DecodeLimits
    from edgekidney.dicomnet import FallbackProcessor
    from edgekidney.runtime.predict import Classifier

    _, _, files = series_a
    with Classifier(model) as clf:
        with pytest.raises(InputError, match=r"^series too large: 12 instances; a series may have at most 5 slices$"):
            FallbackProcessor(clf, limits=DecodeLimits(max_series_slices=5))(files)
        assert FallbackProcessor(clf, limits=DecodeLimits(max_series_slices=12))(files).summary["slices"] == 12


def test_a_peer_whose_storage_contexts_are_all_refused_is_told_in_the_log(make_listener, series_a, caplog):
    """An MR image proposed alone, and a CT image only in a transfer syntax this listener cannot decode:
    the association is set up (C-ECHO would work) but nothing could be stored, and the log says why in
    one line. A peer that proposes many classes, some of them CT, is not reported."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    caplog.set_level(logging.WARNING, logger="edgekidney.listener")
    lst = make_listener()
    ae = AE(ae_title="MRSCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.100"])  # MPEG-2: not an image we decode
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    ok = AE(ae_title="CT01")
    ok.add_requested_context(MRImageStorage)
    ok.add_requested_context(CTImageStorage)
    assoc = ok.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assert assoc.is_established
    assoc.release()
    many = AE(ae_title="PETCT")
    for cls in ("1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7",
                "1.2.3.4.5.6"):
        many.add_requested_context(cls)
    assoc = many.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assoc.release()
    echo = AE(ae_title="PROBE")  # an echo alone asks to store nothing
    echo.add_requested_context(Verification)
    assoc = echo.associate("127.0.0.1", lst.port, ae_title="EDGEKIDNEY")
    assoc.release()
    said = [r.getMessage() for r in caplog.records if r.name == "edgekidney.listener"]
    assert said == ["association from MRSCANNER: none of its 2 storage presentation context(s) can be accepted "
                    "(CT Image Storage, MR Image Storage); this listener stores CT Image Storage and Enhanced CT "
                    "Image Storage in the transfer syntaxes it logged at start",
                    "association from PETCT: none of its 4 storage presentation context(s) can be accepted "
                    "(1.2.3.4.5.6, MR Image Storage, Positron Emission Tomography Image Storage and 1 more); this "
                    "listener stores CT Image Storage and Enhanced CT Image Storage in the transfer syntaxes it "
                    "logged at start"]
