"""What a new user meets first: threads, weights before data, no half-made runs, provenance, help."""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error

import pytest
from click.testing import CliRunner

from edgekidney.cli import build_cli
from edgekidney.data.dataset import SplitConfig
from edgekidney.errors import InputError, ModelError
from edgekidney.data.provenance import content_sha256, mismatch_warning
from edgekidney.sidecar import load_card
from edgekidney.threads import available_cores, resolve_threads


def cli(*args):
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


# -- threads -----------------------------------------------------------------------------------------
def test_threads_default_to_the_cores_this_process_may_use():
    assert resolve_threads(None) == available_cores() == len(os.sched_getaffinity(0))
    assert resolve_threads(3) == 3
    with pytest.raises(InputError, match="at least 1"):
        resolve_threads(0)


def test_a_busy_machine_gets_a_hint_unless_threads_were_chosen(monkeypatch):
    from edgekidney.threads import contention_note

    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    assert "--threads 1 is usually faster than 2" in contention_note(2, None)
    assert "--threads 2 is usually faster than 4" in contention_note(4, None)
    assert contention_note(2, 2) is None and contention_note(1, None) is None  # chosen, or nothing to cut
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert contention_note(2, None) is None


def test_threads_reach_torch_and_onnx_runtime(tiny_onnx):
    torch = pytest.importorskip("torch")
    from edgekidney.runtime.ort import OrtBackend
    from edgekidney.threads import apply_torch_threads

    before = torch.get_num_threads()
    try:
        assert apply_torch_threads(1) == 1 and torch.get_num_threads() == 1
        apply_torch_threads(1)  # a second call (inter-op pool already sized) is not an error
    finally:
        torch.set_num_threads(before)
    with OrtBackend(tiny_onnx, image_size=64) as b:
        assert b.describe()["threads"] == available_cores()
    with OrtBackend(tiny_onnx, image_size=64, threads=1) as b:
        assert b.describe()["threads"] == 1


def test_the_run_records_its_threads_and_data(tiny_run, tiny_onnx):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["threads"] == available_cores()
    data = metrics["data"]
    assert data["synthetic"] is False and data["classes"] == ["Normal", "Stone"]
    assert data["counts"] == {"train": {"Normal": 16, "Stone": 16}, "val": {"Normal": 8, "Stone": 8}}
    assert len(data["content_sha256"]) == 64
    assert load_card(tiny_onnx).extra["data"] == data  # export carries it into the sidecar


# -- weights before data; no half-made run folder ----------------------------------------------------
def _offline(*a, **k):
    sys.stderr.write('Downloading: "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"\n')
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_imagenet_offline_fails_before_any_data_work_and_leaves_no_run(monkeypatch, small_real, tmp_path, capsys):
    pytest.importorskip("torch")
    from torchvision.models import ResNet50_Weights

    import edgekidney.model.train as tr

    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", _offline)
    monkeypatch.setattr(tr, "discover", lambda *a, **k: pytest.fail("data were read before the weights"))
    run = tmp_path / "runs" / "ct"
    with pytest.raises(InputError, match="cannot download ImageNet weights"):
        tr.train(tr.TrainConfig(data=small_real, out=run, weights="imagenet"), log=lambda s: None)
    assert not run.exists()
    assert "Downloading" not in capsys.readouterr().err


def test_data_folder_is_checked_before_the_weights(tmp_path):
    r = cli("train", tmp_path / "nothere", "--out", tmp_path / "run", "--weights", tmp_path / "missing.pth")
    assert r.exit_code == 1 and "nothere: no such folder" in r.output and not (tmp_path / "run").exists()


def _failing_training(monkeypatch, small_real, out):
    import edgekidney.model.train as tr

    def boom(*a, **k):
        raise InputError("decoding failed on purpose")

    monkeypatch.setattr(tr, "load_arrays_with_geometry", boom)
    with pytest.raises(InputError, match="on purpose"):
        tr.train(tr.TrainConfig(data=small_real, out=out, weights="none", image_size=32, epochs=1,
                                split=SplitConfig(val_fraction=0.34, block_size=8)), log=lambda s: None)


def test_a_failed_training_removes_the_run_folder_it_made(monkeypatch, small_real, tmp_path):
    pytest.importorskip("torch")
    _failing_training(monkeypatch, small_real, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failed_training_marks_an_existing_run_folder_incomplete_and_later_steps_say_so(
        monkeypatch, small_real, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    run.mkdir()
    _failing_training(monkeypatch, small_real, run)
    assert "decoding failed on purpose" in (run / "INCOMPLETE").read_text()
    r = cli("export", run, "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "incomplete run (training did not finish: decoding failed on purpose)" in r.output
    from edgekidney.model.train import load_checkpoint_card

    with pytest.raises(ModelError, match="incomplete run"):
        load_checkpoint_card(run)


# -- provenance: data unlike the training data -------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    pytest.importorskip("torch")
    from edgekidney.data.synthetic import SynthConfig, generate
    from edgekidney.model.train import TrainConfig, train

    root = tmp_path_factory.mktemp("synthetic")
    generate(root / "data", SynthConfig(patients=4, slices_per_class=2, size=64, seed=1))
    train(TrainConfig(data=root / "data", out=root / "run", weights="none", image_size=32, epochs=1,
                      batch_size=8), log=lambda s: None)
    return root


def test_synthetic_model_on_real_slices_warns_and_records_its_data(synthetic_run, small_real):
    from edgekidney.model.evaluate import evaluate

    data = json.loads((synthetic_run / "run" / "metrics.json").read_text())["data"]
    assert data["synthetic"] is True and data["synthetic_files_checked"] == "16/16"
    assert sum(sum(c.values()) for c in data["counts"].values()) == 16
    on_real = evaluate(synthetic_run / "run", small_real)
    assert "trained on synthetic phantoms" in on_real["warnings"][0]
    assert "48 of 48 input(s) checked are not synthetic" in on_real["warnings"][0]
    # the phantom model puts real slices out of scope (48 of 48 when measured), stones among them, so the
    # target sensitivity cannot be met: said too
    assert on_real["scope"]["out_of_scope"] == on_real["at_model_threshold"]["out_of_scope"] >= 40
    assert on_real["reachable_sensitivity"] < 0.95 and len(on_real["warnings"]) == 2
    m = re.match(r"target sensitivity 0.95 is out of reach: (\d+) of 24 Stone slices are out of scope",
                 on_real["warnings"][1])
    assert m and int(m.group(1)) >= 16, on_real["warnings"][1]
    on_synthetic = evaluate(synthetic_run / "run", synthetic_run / "run" / "split.csv", split="val")
    assert not any("synthetic" in w for w in on_synthetic["warnings"])  # its own kind of data: no mismatch


def test_real_model_on_phantoms_warns_too(synthetic_run):
    files = sorted((synthetic_run / "data" / "Stone").glob("*.dcm"))[:3]
    text = mismatch_warning({"synthetic": False}, files)
    assert text.startswith("3 of 3 input(s) checked are edgekidney's synthetic phantoms")
    assert mismatch_warning(None, files) is None  # a model without provenance: nothing to compare


def test_content_hash_ignores_order_but_not_labels():
    a = [("Normal", "aa"), ("Stone", "bb")]
    assert content_sha256(a) == content_sha256(reversed(a))
    assert content_sha256(a) != content_sha256([("Stone", "aa"), ("Normal", "bb")])


# -- infer and help ----------------------------------------------------------------------------------
def test_infer_reports_the_model_before_the_inputs(tmp_path):
    r = cli("infer", tmp_path / "nomodel.onnx", tmp_path / "scans")
    assert r.exit_code == 1 and "nomodel.onnx: no such model file" in r.output and "scans" not in r.output


def test_infer_table_shows_the_threshold_in_use(tiny_onnx, small_real):
    f = small_real / "Normal" / "Normal- (2).jpg"
    r = cli("infer", tiny_onnx, f, "--threshold", "0.25")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("label = Stone when p(Stone) >= 0.2500 (threshold from --threshold), out_of_scope")
    assert lines[1].split() == ["path", "p(Stone)", "threshold", "in", "scope", "label"]
    path, p, thr, scope, label = lines[2].rsplit(maxsplit=4)
    assert thr == "0.2500" and scope == "yes"  # a slice the model was trained on is within its scope
    assert label == ("out_of_scope" if scope == "NO" else "Stone" if float(p) >= 0.25 else "Normal")
    default = cli("infer", tiny_onnx, f)
    card = load_card(tiny_onnx)
    assert f"p(Stone) >= {card.threshold:.4f} (threshold from the model's sidecar)" in default.output


def test_help_reads_cleanly():
    top = cli("--help")
    assert top.exit_code == 0 and "<bool>" not in top.output
    assert re.search(r"--help +Show this message and exit\.", top.output) and "--version" in top.output
    infer = cli("infer", "--help").output
    assert "--threads N " in infer and "--json PATH" in infer and "<int range>" not in infer and "<str>" not in infer
