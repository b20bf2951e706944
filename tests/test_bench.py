"""The accuracy and latency benchmarks: numbers, gates, exit codes, regression detection."""

import json

import pytest

from edgekidney.bench import latency
from edgekidney.bench.accuracy import main as accuracy_main, run_accuracy
from edgekidney.errors import InputError


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory, tiny_onnx):
    from edgekidney.optimize.quantize import Precision, QuantizeConfig, quantize

    out = tmp_path_factory.mktemp("b") / "model.fp16.onnx"
    quantize(tiny_onnx, out, QuantizeConfig(precision=Precision.fp16), log=lambda s: None)
    return out


def decisions(model, tiny_run):
    """(stone probability, answer) per validation slice of the tiny run, computed apart from the benchmark."""
    import numpy as np

    from edgekidney.data.dataset import read_manifest
    from edgekidney.runtime.predict import Classifier

    files = [s.path for s in read_manifest(tiny_run / "split.csv") if s.split == "val"]
    with Classifier(model) as clf:
        preds, failures = clf.predict_files(files)
    assert not failures
    return np.array([p.probability for p in preds]), np.array([p.label for p in preds])


def test_accuracy_report_against_fp32_reference(tiny_onnx, fp16_model, tiny_run):
    import numpy as np

    res = run_accuracy([fp16_model, tiny_onnx], tiny_run / "split.csv", split="val", log=lambda s: None)
    ref, child = res["rows"][1], res["rows"][0]
    assert ref["reference"] and ref["agreement"] == 1.0 and ref["max_abs_dprob"] == 0.0
    assert child["child_of_reference"] and child["precision"] == "fp16"
    # the 2-epoch model's probabilities crowd its threshold, so FP16's 1e-4 may flip a call or two:
    # the report must say exactly what the two models answer, and FP16 must move p(stone) by little
    p_ref, c_ref = decisions(tiny_onnx, tiny_run)
    p16, c16 = decisions(fp16_model, tiny_run)
    assert res["n"] == 16 and child["agreement"] == pytest.approx(float(np.mean(c16 == c_ref)))
    assert child["max_abs_dprob"] == pytest.approx(float(np.max(np.abs(p16 - p_ref))), abs=1e-6)
    assert child["max_abs_dprob"] < 1e-3
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        assert 0.0 <= child[key] <= 1.0


def test_accuracy_gate_failure_exits_1_and_writes_json(tiny_onnx, fp16_model, tiny_run, tmp_path):
    out = tmp_path / "acc.json"
    args = [str(fp16_model), str(tiny_onnx), "--data", str(tiny_run / "split.csv"), "--split", "val", "--json", str(out)]
    loose = ["--max-accuracy-drop", "100", "--max-sensitivity-drop", "100"]  # only the agreement gate judges here
    assert accuracy_main(args + loose + ["--min-agreement", "0.5"]) == 0
    assert json.loads(out.read_text())["passed"] is True
    # an impossible gate must fail loudly
    assert accuracy_main(args + loose + ["--min-agreement", "1.01"]) == 1
    assert json.loads(out.read_text())["failed"] == [str(fp16_model)]


def test_accuracy_refuses_unknown_classes_and_missing_reference(tiny_onnx, fp16_model, real_data):
    with pytest.raises(InputError, match="unknown to the model"):
        run_accuracy([tiny_onnx], real_data, log=lambda s: None)
    with pytest.raises(InputError, match="no FP32 model"):
        run_accuracy([fp16_model], real_data, classes=["Normal", "Stone"], log=lambda s: None)


def test_latency_runs_each_model_in_a_worker_and_reports_percentiles(tiny_onnx, small_real):
    cfg = latency.LatencyConfig(batch_sizes=[1, 2], seconds=0.0, min_iterations=5, warmup=1, torch_baseline="none")
    rep = latency.run_latency([tiny_onnx], cfg, data=small_real / "Stone", log=lambda s: None)
    rows = rep["rows"]
    assert {(r["batch"], r["mode"]) for r in rows} == {(1, "model"), (1, "end_to_end"), (2, "model"), (2, "end_to_end")}
    for r in rows:
        assert r["iterations"] >= 5 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["throughput_ips"] > 0 and r["peak_rss_mb"] > 10
    assert rep["inputs"] == str(small_real / "Stone")  # end-to-end rows decoded real files
    assert rep["config"]["threads"] == 2


def test_the_report_records_the_cpus_int8_instruction_sets_in_speed_order():
    zen1 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    xeon = "flags\t\t: avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_int8\nflags\t\t: other\n"
    assert latency.int8_instructions(zen1) == ["avx2"]
    assert latency.int8_instructions(xeon) == ["amx_int8", "avx512_vnni", "avx512bw", "avx2"]  # first flags line only
    assert latency.int8_instructions("model name\t: a CPU\n") == []
    env = latency.environment(latency.LatencyConfig())
    assert env["int8_instructions"] == latency.int8_instructions()


def _report(fp32_ms, int8_ms):
    rows = [{"label": "ort-fp32", "precision": "fp32", "backend": "ort", "batch": 1, "mode": "model", "p50_ms": fp32_ms},
            {"label": "ort-int8-cpu", "precision": "int8", "backend": "ort", "batch": 1, "mode": "model", "p50_ms": int8_ms},
            {"label": "pytorch-fp32", "precision": "fp32", "backend": "torch", "batch": 1, "mode": "model", "p50_ms": 120.0}]
    return {"rows": rows}


def test_regressions_are_judged_on_ratios_within_a_run():
    old = _report(60.0, 30.0)
    # the whole machine got 2x slower: no regression
    assert latency.compare_to_baseline(_report(120.0, 60.0), old, 0.10) == []
    # INT8 lost 20 % relative to FP32: regression
    problems = latency.compare_to_baseline(_report(60.0, 36.0), old, 0.10)
    assert len(problems) == 1 and "ort-int8-cpu batch 1 model" in problems[0]
    sp = {s["label"]: s for s in latency.speedups(_report(60.0, 30.0)["rows"])}
    assert sp["ort-int8-cpu"]["vs_ort_fp32"] == pytest.approx(2.0)
    assert sp["ort-int8-cpu"]["vs_pytorch_fp32"] == pytest.approx(4.0)


def test_peak_agreement_uses_each_slices_own_reach():
    """Two peaks 20 px apart agree on a 512-px slice (reach 25.6 px) and not on a 256-px one (12.8 px)."""
    from edgekidney.bench.located import peak_agreement

    big = {"cam_peak": [100, 100], "reach_px": 0.05 * 512}
    small = {"cam_peak": [100, 100], "reach_px": 0.05 * 256}
    a = {"slices": [big, small, {"cam_peak": None, "reach_px": 12.8}]}
    b = {"slices": [{"cam_peak": [100, 120]}, {"cam_peak": [100, 120]}, {"cam_peak": [5, 5]}]}
    assert peak_agreement(a, b) == 1 / 3


def test_located_erases_each_outlined_stone_and_nothing_else(tmp_path):
    """The erased slice of the located benchmark: the stone is tissue again, the rest of the slice is untouched."""
    import numpy as np
    from PIL import Image

    from edgekidney.bench.located import erased_slices
    from edgekidney.data.decode import load_slice
    from edgekidney.data.masks import read_mask
    from edgekidney.data.preprocess import Preprocessing

    yy, xx = np.mgrid[0:200, 0:200]
    img = np.where(((yy - 100) / 80) ** 2 + ((xx - 100) / 90) ** 2 <= 1, 120, 0).astype(np.uint8)
    img[90:96, 60:66] = 255
    mask = np.zeros_like(img)
    mask[90:96, 60:66] = 255
    Image.fromarray(img).save(tmp_path / "s.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    pre = Preprocessing(image_size=128)
    orig = load_slice(tmp_path / "s.png", pre)
    (erased,) = erased_slices([orig], [read_mask(tmp_path / "m.png", orig.shape)])
    assert orig[90:96, 60:66].min() > 0.95 and erased[90:96, 60:66].max() < 0.7
    far = np.ones(img.shape, bool)
    far[80:106, 50:76] = False
    assert np.array_equal(erased[far], orig[far])
