"""The CLI: thin, one-line errors with a non-zero exit, never a traceback."""

import json

import pytest
from typer.testing import CliRunner

from edgekidney.cli import app
from pydicom_files import shipped_file

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[-1], lines[-1]


def test_infer_prints_json_for_files_and_folders(tiny_onnx, small_real, tmp_path):
    from phantoms import write_head_ct
    from edgekidney.sidecar import load_card

    head = write_head_ct(tmp_path / "head.dcm")
    out = tmp_path / "pred.json"
    r = run("infer", tiny_onnx, small_real / "Stone", small_real / "Normal" / "Normal- (1).jpg", head, "--json", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 26 and data["failures"] == []
    first = data["predictions"][0]
    assert set(first) == {"path", "probability", "label", "threshold", "in_scope", "scope_distance",
                          "scope_threshold", "scope_reason", "cam_peak", "lung_share", "skull_share",
                          "split_share"}
    assert first["lung_share"] is None  # measured on axial DICOM slices only
    thr = load_card(tiny_onnx).scope_threshold
    by_name = {p["path"].rsplit("/", 1)[-1]: p for p in data["predictions"]}
    for p in data["predictions"]:  # the sidecar's threshold on the graph's distance decides, slice by slice
        assert p["scope_threshold"] == thr and p["in_scope"] == (p["scope_distance"] <= thr), p
        assert (p["label"] == "out_of_scope") == (not p["in_scope"]), p
    # slices the model was trained on (numbers 1-16) are within its scope and get a class
    trained = [p for n, p in by_name.items() if n.endswith(tuple(f"({i}).jpg" for i in range(1, 17)))]
    assert len(trained) == 17 and all(p["in_scope"] and p["label"] in ("Normal", "Stone") for p in trained)
    # a head CT has a patient outline but is far from every kidney slice: out of scope by its distance
    h = by_name["head.dcm"]
    assert h["scope_distance"] > thr, f"precondition: the head slice must lie beyond {thr} ({h})"
    assert h["label"] == "out_of_scope" and h["in_scope"] is False
    assert h["scope_reason"].startswith("unlike the training slices (feature distance")
    assert "Stone" in r.stdout and "p(Stone)" in r.stdout
    assert any(line.split()[-2:] == ["NO", "out_of_scope"] for line in r.stdout.splitlines() if "head.dcm" in line)


def test_infer_csv_to_stdout(tiny_onnx, small_real):
    r = run("infer", tiny_onnx, small_real / "Normal" / "Normal- (2).jpg", "--csv", "-")
    assert r.exit_code == 0
    import csv

    lines = r.stdout.strip().splitlines()
    assert lines[0] == ("path,probability,label,threshold,in_scope,scope_distance,scope_threshold,scope_reason,"
                        "cam_peak_row,cam_peak_col") and len(lines) == 2
    (row,) = csv.DictReader(lines)
    listed = json.loads(run("infer", tiny_onnx, small_real / "Normal" / "Normal- (2).jpg", "--json", "-").stdout)
    (pred,) = listed["predictions"]
    assert [int(row["cam_peak_row"]), int(row["cam_peak_col"])] == pred["cam_peak"]  # the JSON's peak, [row, col]
    assert row["scope_reason"] == (pred["scope_reason"] or "") and float(row["probability"]) == pytest.approx(pred["probability"])


def test_infer_keep_going_reports_bad_files_and_exits_nonzero(tiny_onnx, small_real, tmp_path):
    bad = tmp_path / "fake.png"
    bad.write_text("hello")
    out = tmp_path / "p.json"
    r = run("infer", tiny_onnx, small_real / "Normal" / "Normal- (1).jpg", bad, "--keep-going", "--json", out)
    assert_one_line_error(r, "1 of 2 file(s) could not be classified")
    assert "fake.png" in r.stderr
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 1 and data["failures"][0]["path"].endswith("fake.png")


@pytest.fixture()
def cases(tmp_path, tiny_onnx):
    (tmp_path / "empty").mkdir()
    one = tmp_path / "oneclass" / "Stone"
    one.mkdir(parents=True)
    (one / "a.png").write_bytes(b"x")
    (tmp_path / "text.png").write_text("not a png")
    (tmp_path / "notonnx.onnx").write_text("not onnx")
    (tmp_path / "notonnx.json").write_text(tiny_onnx.with_suffix(".json").read_text().replace(
        json.loads(tiny_onnx.with_suffix(".json").read_text())["sha256"], ""))
    (tmp_path / "bare.onnx").write_bytes(tiny_onnx.read_bytes())
    from PIL import Image
    Image.new("L", (16, 16)).save(tmp_path / "tiny.png")
    import hostile

    (tmp_path / "thin.png").write_bytes(hostile.thin_png(20000, 32))
    (tmp_path / "bomb.png").write_bytes(hostile.png_declaring(60000, 60000))
    return tmp_path


@pytest.mark.parametrize("argv,fragments", [
    (["infer", "{model}", "{d}/missing.png"], ["missing.png: no such file or folder"]),
    (["infer", "{model}", "{d}/empty"], ["empty: folder holds no"]),
    (["infer", "{model}", "{d}/text.png"], ["text.png: not a PNG, JPEG or DICOM"]),
    (["infer", "{model}", "{d}/tiny.png"], ["tiny.png: image is 16x16 px"]),
    (["infer", "{model}", "{d}/thin.png"], ["thin.png: image declares 20000x32 px"]),
    (["infer", "{model}", "{d}/bomb.png"], ["bomb.png: image too large"]),
    (["infer", "{model}", "{d}/tiny.png", "--backend", "trt", "--threads", "2"],
     ["--threads: not an option of the trt backend (it takes --device, --cuda-binding)"]),
    (["infer", "{model}", "{d}/tiny.png", "--backend", "tflite"], ["unknown backend 'tflite'"]),
    (["bench", "latency", "{model}", "--batch-sizes", "one"], ["invalid literal"]),
    (["infer", "{model}", "{truncated}"], ["MR_truncated.dcm", "truncated"]),
    (["infer", "{model}", "{nopixels}"], ["rtplan.dcm: DICOM file has no pixel data"]),
    (["infer", "{d}/notonnx.onnx", "{d}/text.png"], ["notonnx.onnx: ONNX Runtime cannot load this model"]),
    (["infer", "{d}/bare.onnx", "{d}/text.png"], ["bare.onnx: sidecar bare.json not found"]),
    (["infer", "{d}/nomodel.onnx", "{d}/text.png"], ["nomodel.onnx: no such model file"]),
    (["train", "{d}/oneclass", "--out", "{d}/run"], ["needs at least two class folders"]),
    (["train", "{d}/nothere", "--out", "{d}/run"], ["nothere: no such folder"]),
    (["evaluate", "{model}", "{d}/oneclass"], ["needs at least two class folders"]),
    (["export", "{d}/norun", "--out", "{d}/m.onnx"], ["no such checkpoint"]),
    # where results go: checked before the model is loaded, never over an input, never a traceback
    (["infer", "{model}", "{d}/tiny.png", "--json", "{d}"], ["--json", "is a folder; give a file name"]),
    (["infer", "{model}", "{d}/tiny.png", "--csv", "{d}/tiny.png"], ["--csv", "would write over an input (the file"]),
    (["infer", "{model}", "{d}/oneclass", "--json", "{d}/oneclass/Stone/a.png"], ["--json", "would write over an input (in"]),
    (["infer", "{model}", "{d}/tiny.png", "--json", "{d}/text.png/out.json"], ["text.png is not a folder"]),
    (["infer", "{model}", "{d}/tiny.png", "--cam", "{d}/text.png"], ["--cam", "is a file; give a folder"]),
    (["study", "{model}", "{d}/empty", "--sr-out", "{d}/text.png"], ["--sr-out", "is a file; give a folder"]),
    (["study", "{model}", "{d}/empty", "--sc-out", "{d}/tiny.png/sc"], ["tiny.png is not a folder"]),
    (["study", "{model}", "{d}", "--json", "{d}/tiny.png"], ["--json", "would write over an input (in"]),
    (["infer", "{model}", "{d}/tiny.png", "--json", "{model_json}"], ["--json", "would write over the model"]),
    (["infer", "{model}", "{d}/tiny.png", "--json", "{d}/new.json", "--csv", "{d}"], ["--csv", "is a folder"]),
])
def test_bad_input_gives_one_line_error(cases, tiny_onnx, argv, fragments):
    subst = {"model": tiny_onnx, "model_json": tiny_onnx.with_suffix(".json"), "d": cases,
             "truncated": shipped_file("MR_truncated.dcm"),
             "nopixels": shipped_file("rtplan.dcm")}
    r = run(*[a.format(**subst) for a in argv])
    assert_one_line_error(r, *fragments)


def test_synth_writes_labelled_synthetic_dicom(tmp_path):
    r = run("synth", tmp_path / "s", "--patients", "2", "--slices", "1", "--size", "64")
    assert r.exit_code == 0, r.output
    assert "SYNTHETIC" in (tmp_path / "s" / "README.txt").read_text()
    assert len(list((tmp_path / "s" / "Stone").glob("*.dcm"))) == 2


def test_demo_runs_the_whole_job_on_synthetic_data(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--out", out, "--epochs", "1", "--image-size", "64", "--patients", "4")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["seconds"]) == {"data", "train", "export", "evaluate", "infer", "study"}
    assert sorted(len(row["stone_slices_truth"]) for row in summary["study"]) == [0, 1]  # one series with a stone
    assert all(row["decision"] in ("stone", "no_stone") for row in summary["study"])
    assert summary["validation"]["n"] > 0 and "p(stone)" in r.stdout
    assert (out / "model.onnx").exists() and (out / "model.json").exists()


def test_one_door_validates_options_per_backend(tiny_onnx):
    from edgekidney.errors import InputError
    from edgekidney.runtime import backend_options, open_backend
    from edgekidney.sidecar import load_card

    card = load_card(tiny_onnx)
    assert backend_options("ort", {"threads": 2, "device": None}, {"spinning": False, "cuda_binding": "x"}) == \
        {"threads": 2, "spinning": False}  # defaults apply only where the backend takes them
    assert backend_options("trt", {"device": "cuda:0"}, {"spinning": False, "threads": 2}) == {"device": "cuda:0"}
    with pytest.raises(InputError, match="--spin: not an option of the ort backend"):
        open_backend(tiny_onnx, card, spin=True)
    with open_backend(tiny_onnx, card, threads=1, defaults={"spinning": False}) as b:  # the sidecar says ort
        assert b.name == "ort" and b.threads == 1


def test_benchmark_scripts_exit_1_on_usage_errors(capsys):
    from edgekidney.bench import accuracy, latency

    for main, argv in ((latency.main, ["--bogus"]), (accuracy.main, ["m.onnx"]), (latency.main, ["--threads", "x"])):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 1
        assert capsys.readouterr().err.strip().startswith("error: ")


def test_benchmarks_and_triton_take_a_released_model_by_name(tiny_onnx, tiny_run, tmp_path, monkeypatch):
    """"Wherever a command takes a model it also takes a released model by name" (docs/commands.md)."""
    import shutil

    release = tmp_path / "models" / "mini-release"
    release.mkdir(parents=True)
    shutil.copyfile(tiny_onnx, release / "model-fp16.onnx")
    shutil.copyfile(tiny_onnx.with_suffix(".json"), release / "model-fp16.json")
    monkeypatch.setenv("EDGEKIDNEY_MODELS", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)  # the name must not be found as a path
    r = runner.invoke(app, ["export-triton", "mini-release", "--repo", "triton"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "triton" / "edgekidney" / "1" / "model.onnx").read_bytes() == tiny_onnx.read_bytes()
    r = runner.invoke(app, ["bench", "accuracy", "mini-release", "--data", str(tiny_run / "split.csv"),
                            "--split", "val", "--json", "acc.json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "acc.json").read_text())["rows"][0]["model"].endswith("model-fp16.onnx")
    r = runner.invoke(app, ["bench", "latency", "mini-release", "--batch-sizes", "1", "--seconds", "0.2",
                            "--torch", "none", "--threads", "1", "--json", "lat.json"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "lat.json").read_text())["rows"]
    assert rows and all(row["model"].endswith("model-fp16.onnx") for row in rows)
    r = runner.invoke(app, ["quantize", "mini-release", "--precision", "fp16", "--out", "q.fp16.onnx"])
    assert r.exit_code == 0, r.output  # this stand-in release's file is an FP32 graph: quantized from it
    assert json.loads((tmp_path / "q.fp16.json").read_text())["parent_sha256"] == \
        json.loads(tiny_onnx.with_suffix(".json").read_text())["sha256"]
    r = runner.invoke(app, ["export-triton", "no-such-release", "--repo", "triton2"])
    assert r.exit_code == 1 and "no released model of that name" in r.output


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_result_that_cannot_be_written_is_one_line_not_a_traceback(tiny_onnx, small_real):
    for flag in ("--json", "--csv"):
        r = run("infer", tiny_onnx, small_real / "Normal" / "Normal- (2).jpg", flag, "/dev/full")
        assert_one_line_error(r, "error: No space left on device")


def test_evaluate_takes_a_checkpoint_as_its_help_says_and_agrees_with_its_export(tiny_run, tiny_onnx, small_real):
    """`evaluate RUN` read RUN's sidecar as if it were an ONNX model's and stopped on "sidecar run.json
    not found"; a checkpoint is evaluated in PyTorch, and its numbers are its export's."""
    split = tiny_run / "split.csv"
    reports = [json.loads(run("evaluate", m, split, "--split", "val", "--json", "-", "--threads", "1",
                              "--bootstrap", "100").stdout) for m in (tiny_run, tiny_run / "model.pt", tiny_onnx)]
    assert [r["backend"] for r in reports] == ["torch", "torch", "ort"]
    assert len({r["n"] for r in reports}) == 1 and reports[0]["n"] > 0
    for r in reports[1:]:
        assert r["at_model_threshold"]["confusion_matrix"] == reports[0]["at_model_threshold"]["confusion_matrix"]


def test_a_missing_extra_is_named_in_one_line_whichever_command_meets_it(monkeypatch, tmp_path, tiny_run):
    """A plain `pip install .` has neither prometheus_client nor torch: `listen` and `export` met them
    in a module import and printed a traceback; every command now names the extra to install."""
    import sys

    from edgekidney.cli import missing_extra

    for name in [m for m in sys.modules if m.startswith("edgekidney.dicomnet")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "torch", None)
    r = run("listen", "kidney-stone-ct-v3", "--store", tmp_path / "store")
    assert_one_line_error(r, "this command needs prometheus_client: pip install 'edgekidney[net]'")
    r = run("export", tiny_run, "--out", tmp_path / "m.onnx")
    assert_one_line_error(r, "this command needs torch: pip install 'edgekidney[train]'")
    monkeypatch.delitem(sys.modules, "torch")  # installed, but a part of it missing: a broken install, not an extra
    assert missing_extra("torch._no_such_part", "export_cmd") is None
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # none of them installed
    assert (missing_extra("prometheus_client", "serve_cmd"), missing_extra("tritonclient.http", "infer_cmd"),
            missing_extra("numpy", "infer_cmd")) == ("serve", "triton", None)


def test_a_rerun_writes_over_its_own_report_in_the_input_folder_and_never_over_a_slice(tiny_onnx, small_real,
                                                                                       tmp_path):
    import shutil

    folder = tmp_path / "scans"
    shutil.copytree(small_real / "Normal", folder)
    for _ in range(2):  # the second run finds its own JSON among the inputs: not an input, written over
        r = run("infer", tiny_onnx, folder, "--json", folder / "out.json", "--csv", folder / "out.csv")
        assert r.exit_code == 0, r.output
    assert json.loads((folder / "out.json").read_text())["predictions"]
    jpeg = sorted(folder.glob("*.jpg"))[0]
    before = jpeg.read_bytes()
    assert_one_line_error(run("infer", tiny_onnx, folder, "--csv", jpeg), "--csv", "would write over an input (in")
    assert jpeg.read_bytes() == before
    (folder / "volume.nii.gz").write_bytes(b"not read: a volume by its name")  # study reads NIfTI volumes
    assert_one_line_error(run("study", tiny_onnx, folder, "--json", folder / "volume.nii.gz"),
                          "--json", "would write over an input (in")
