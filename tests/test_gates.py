"""The accuracy benchmark's gates, driven to fail through ``edgekidney bench accuracy`` (typer).

A reference and its "children" are tiny ONNX graphs (global average pool, one linear layer: no torch,
milliseconds) whose stone logit is ``10 * (gray - t)``; the labelled slices are flat gray images, Stone
brighter than Normal. Moving ``t`` moves the decision exactly where wanted: a child that misses the two
faintest stones (sensitivity -50 points, accuracy -25), one that calls the brightest normal slice a stone
(sensitivity unchanged, accuracy -12.5, agreement 87.5 %), one that agrees with its parent. Each gate is
made to fail alone (the others opened) and to pass at its exact boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgekidney.cli import app

STONE_GRAYS = (0.6, 0.7, 0.8, 0.9)
NORMAL_GRAYS = (0.1, 0.2, 0.3, 0.4)


def linear_model(path: Path, t: float, parent: Path | None = None, precision: str = "fp32",
                 threshold: float = 0.5, scope_threshold: float | None = None) -> Path:
    """ONNX whose logits are [0, 10 * (gray - t)] for a flat slice of that gray (ImageNet-normalised);
    with ``scope_threshold`` it also outputs ``scope_distance`` = the gray itself, so the brightest
    slices are the ones out of scope."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekidney.data.preprocess import Preprocessing
    from edgekidney.sidecar import ModelCard, load_card

    pre = Preprocessing(image_size=32, body_crop=False, body_level=None)
    mean, std = pre.mean[0], pre.std[0]
    w = np.zeros((3, 2), np.float32)
    w[0, 1] = 10.0 * std  # channel 0 is (gray - mean) / std after pooling
    b = np.array([0.0, 10.0 * (mean - t)], np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], name="classifier")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])]
    if scope_threshold is not None:
        nodes += [helper.make_node("Gemm", ["flat", "WS", "BS"], ["gray"], name="scope_gemm"),
                  helper.make_node("Squeeze", ["gray", "axis1"], ["scope_distance"], name="scope_squeeze")]
        inits += [numpy_helper.from_array(np.array([[std], [0.0], [0.0]], np.float32), "WS"),
                  numpy_helper.from_array(np.array([mean], np.float32), "BS"),
                  numpy_helper.from_array(np.array([1], np.int64), "axis1")]
        outputs.append(helper.make_tensor_value_info("scope_distance", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", 3, 32, 32])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    card = ModelCard(["Normal", "Stone"], "Stone", pre, threshold=threshold, precision=precision)
    if scope_threshold is not None:
        card.outputs = ["logits", "scope_distance"]
        card.scope = {"method": "test: the gray", "output": "scope_distance", "threshold": scope_threshold}
    if parent is not None:
        card.parent_sha256 = load_card(parent).sha256
        card.extra = {"quantization": {"target": "cpu"}}
    card.save(path)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    for cls, grays in (("Normal", NORMAL_GRAYS), ("Stone", STONE_GRAYS)):
        (root / "data" / cls).mkdir(parents=True)
        for g in grays:
            Image.fromarray(np.full((48, 48), round(g * 255), np.uint8)).save(root / "data" / cls / f"{g}.png")
    ref = linear_model(root / "fp32.onnx", 0.5)
    return {"data": root / "data", "ref": ref,
            "same": linear_model(root / "same.int8.onnx", 0.501, ref, "int8"),
            "misses": linear_model(root / "misses.int8.onnx", 0.75, ref, "int8"),  # Stone 0.6, 0.7 -> Normal
            "overcalls": linear_model(root / "overcalls.int8.onnx", 0.35, ref, "int8")}  # Normal 0.4 -> Stone


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in a scratch folder: a broken build must not leave files where the next test looks."""
    monkeypatch.chdir(tmp_path)


def bench(family, child: str, *options: str, json_out: Path | None = None):
    args = ["bench", "accuracy", str(family[child]), str(family["ref"]), "--data", str(family["data"]), *options]
    if json_out is not None:
        args += ["--json", str(json_out)]
    return CliRunner().invoke(app, args)


def verdict(result) -> tuple[str, str]:
    """(the child's row verdict, the closing line) of the printed table."""
    lines = result.stdout.strip().splitlines()
    row = next(line for line in lines if line.split()[0].endswith(".int8.onnx"))
    return row.split("  ")[-1].strip(), lines[-1]


OPEN = {"accuracy": ["--max-accuracy-drop", "100"], "sensitivity": ["--max-sensitivity-drop", "100"],
        "agreement": ["--min-agreement", "0"]}


def test_a_child_that_answers_like_its_parent_passes_the_default_gates(family, tmp_path):
    r = bench(family, "same", json_out=tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    assert verdict(r) == ("PASS", "gates: accuracy drop <= 0.5 pt, sensitivity drop <= 1.0 pt, agreement >= 99.00%"
                                  "  ->  PASSED")
    res = json.loads((tmp_path / "a.json").read_text())
    ref, child = res["rows"][1], res["rows"][0]
    assert res["passed"] and res["failed"] == [] and res["n"] == 8 and res["reference"] == str(family["ref"])
    assert ref["reference"] and not child["reference"] and child["child_of_reference"]
    assert ref["accuracy"] == ref["sensitivity"] == ref["specificity"] == ref["auc"] == 1.0
    assert child["agreement"] == 1.0 and child["accuracy_drop_points"] == 0.0 and 0 < child["max_abs_dprob"] < 0.01
    assert child["precision"] == "int8" and child["target"] == "cpu" and child["backend"] == "ort"


def test_default_gates_fail_a_child_that_misses_stones_exit_1(family, tmp_path):
    r = bench(family, "misses", json_out=tmp_path / "m.json")
    assert r.exit_code == 1, r.output
    row, last = verdict(r)
    assert row == "FAIL accuracy,sensitivity,agreement" and last.endswith("->  FAILED")
    assert r.stderr.strip().splitlines()[-1] == f"error: accuracy gate failed: {family['misses']}"
    res = json.loads((tmp_path / "m.json").read_text())
    child = res["rows"][0]
    assert res["passed"] is False and res["failed"] == [str(family["misses"])]
    assert child["sensitivity"] == 0.5 and child["specificity"] == 1.0 and child["accuracy"] == 0.75
    assert child["sensitivity_drop_points"] == 50.0 and child["accuracy_drop_points"] == 25.0
    assert child["agreement"] == 0.75 and child["confusion_matrix"] == [[4, 0], [2, 2]]
    assert child["gates"] == {"accuracy": False, "sensitivity": False, "agreement": False}
    assert res["rows"][1]["passed"] and res["rows"][1]["gates"] == {"accuracy": True, "sensitivity": True,
                                                                     "agreement": True}


def test_the_sensitivity_gate_alone_fails_a_child_that_misses_stones(family):
    r = bench(family, "misses", *OPEN["accuracy"], *OPEN["agreement"], "--max-sensitivity-drop", "49.9")
    assert r.exit_code == 1 and verdict(r)[0] == "FAIL sensitivity", r.output
    at_boundary = bench(family, "misses", *OPEN["accuracy"], *OPEN["agreement"], "--max-sensitivity-drop", "50")
    assert at_boundary.exit_code == 0 and verdict(at_boundary)[0] == "PASS", at_boundary.output


def test_the_accuracy_gate_alone_fails_a_child_that_overcalls(family, tmp_path):
    """Sensitivity unchanged, so only the accuracy gate can catch it."""
    r = bench(family, "overcalls", *OPEN["agreement"], json_out=tmp_path / "o.json")
    assert r.exit_code == 1 and verdict(r)[0] == "FAIL accuracy", r.output
    child = json.loads((tmp_path / "o.json").read_text())["rows"][0]
    assert child["sensitivity_drop_points"] == 0.0 and child["accuracy_drop_points"] == 12.5
    assert child["specificity"] == 0.75 and child["agreement"] == 0.875
    at_boundary = bench(family, "overcalls", *OPEN["agreement"], "--max-accuracy-drop", "12.5")
    assert at_boundary.exit_code == 0 and verdict(at_boundary)[0] == "PASS", at_boundary.output
    below = bench(family, "overcalls", *OPEN["agreement"], "--max-accuracy-drop", "12.4")
    assert below.exit_code == 1 and verdict(below)[0] == "FAIL accuracy"


def test_the_agreement_gate_alone_fails_a_child_that_overcalls(family):
    r = bench(family, "overcalls", *OPEN["accuracy"], "--min-agreement", "0.876")
    assert r.exit_code == 1 and verdict(r)[0] == "FAIL agreement", r.output
    at_boundary = bench(family, "overcalls", *OPEN["accuracy"], "--min-agreement", "0.875")
    assert at_boundary.exit_code == 0, at_boundary.output


def test_the_reference_is_measured_against_itself_and_needs_fp32(family, tmp_path):
    from edgekidney.bench.accuracy import run_accuracy
    from edgekidney.errors import InputError

    res = run_accuracy([family["misses"], family["ref"]], family["data"], reference=family["misses"],
                       log=lambda s: None)  # the child named as the reference: the parent is judged
    assert res["reference"] == str(family["misses"]) and res["failed"] == [str(family["ref"])]
    assert res["rows"][1]["sensitivity_drop_points"] == -50.0 and res["rows"][1]["gates"]["agreement"] is False
    with pytest.raises(InputError,
                       match=r"^no FP32 model among the models: add the FP32 parent \(or name --reference\)$"):
        run_accuracy([family["misses"]], family["data"], log=lambda s: None)
    with pytest.raises(InputError, match="is not among the models"):
        run_accuracy([family["ref"]], family["data"], reference=family["same"], log=lambda s: None)
    with pytest.raises(InputError, match="^name at least one model$"):
        run_accuracy([], family["data"], log=lambda s: None)
    other = linear_model(tmp_path / "other.onnx", 0.5)
    card = json.loads(other.with_suffix(".json").read_text())
    card["classes"] = ["Cyst", "Stone"]  # another family: its answers cannot be compared
    other.with_suffix(".json").write_text(json.dumps(card))
    r = bench({**family, "x": other}, "x")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: {family['ref']}: preprocessing or classes differ from {other}; compare models of one family")


# -- the quantizer's own gate: FP16 may not move a logit by more than the tolerance ----------------------
def test_fp16_within_tolerance_is_written_and_beyond_it_refused_with_nothing_left(tmp_path):
    import onnxruntime as ort

    from edgekidney.errors import ModelError
    from edgekidney.metrics import softmax
    from edgekidney.optimize.quantize import Precision, QuantizeConfig, quantize
    from edgekidney.sidecar import load_card

    # centred on the random check inputs' gray, so both classes occur among them; with a scope head
    parent = linear_model(tmp_path / "p.onnx", 0.485, scope_threshold=0.5, threshold=0.4)
    pcard = load_card(parent)
    pcard.extra = {"split_manifest_sha256": "ab" * 32, "source_checkpoint": "/runs/x/model.pt", "data": {"n": 8}}
    pcard.save(parent)
    out = tmp_path / "new" / "folder" / "m.fp16.onnx"  # folders are made
    card = quantize(parent, out, QuantizeConfig(precision=Precision.fp16), log=lambda s: None)
    q = card.extra["quantization"]
    assert out.exists() and load_card(out) == card and card.parent_sha256 == pcard.sha256
    assert (card.kind, card.precision, card.classes, card.positive_class, card.threshold, card.metrics) == \
        ("onnx", "fp16", ["Normal", "Stone"], "Stone", 0.4, {})
    assert (card.input_name, card.output_name, card.outputs, card.scope, card.preprocessing) == \
        ("input", "logits", ["logits", "scope_distance"], pcard.scope, pcard.preprocessing)
    assert {k: v for k, v in card.extra.items() if k != "quantization"} == {
        "parent": str(parent.resolve()), "threshold_from": {"sha256": pcard.sha256, "threshold": 0.4},
        "split_manifest_sha256": "ab" * 32, "source_checkpoint": "/runs/x/model.pt", "data": {"n": 8}}
    assert {k: q[k] for k in ("precision", "quantizer", "io_dtype", "heads_kept_fp32")} == {
        "precision": "fp16", "quantizer": "onnxruntime.transformers.float16 (keep_io_types)", "io_dtype": "float32",
        "heads_kept_fp32": 2}  # the scope Gemm and Squeeze
    assert isinstance(q["seconds"], float) and 0 <= q["seconds"] < 60 and "calibration" not in q
    # the check, recomputed: eight seeded random normal inputs through both graphs
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    (la, da), (lb, db) = (ort.InferenceSession(str(m)).run(["logits", "scope_distance"], {"input": x})
                          for m in (parent, out))
    pa, pb = softmax(la), softmax(lb)
    assert 0 < len(set(pa.argmax(1))) == 2  # both classes: top-1 agreement means something
    assert q["check_inputs"] == "random normal inputs" and q["check_n"] == 8
    assert q["max_abs_logit_diff"] == float(np.max(np.abs(la - lb))) and 0 < q["max_abs_logit_diff"] < 0.05
    assert q["max_abs_prob_diff"] == float(np.max(np.abs(pa - pb)))
    assert q["top1_agreement"] == float(np.mean(pa.argmax(1) == pb.argmax(1))) == 1.0
    assert q["scope_agreement"] == 1.0 and q["max_scope_distance_diff_over_threshold"] == float(
        np.max(np.abs(da - db)) / 0.5) < 0.01  # the head reads the FP16 trunk's pooled features
    tolerance = q["max_abs_logit_diff"]  # exactly at the tolerance: written
    quantize(parent, tmp_path / "at.onnx", QuantizeConfig(precision=Precision.fp16, fp16_tolerance=tolerance),
             log=lambda s: None)
    assert (tmp_path / "at.onnx").exists()
    with pytest.raises(ModelError) as info:
        quantize(parent, tmp_path / "no.onnx", QuantizeConfig(precision=Precision.fp16, fp16_tolerance=1e-9),
                 log=lambda s: None)
    assert str(info.value) == (f"FP16 model differs from FP32 by {tolerance:.3g} logits (> 1e-09); keep layers in "
                               "FP32 or stay with FP32")
    assert not (tmp_path / "no.onnx").exists()
    with pytest.raises(ModelError) as info:
        quantize(out, tmp_path / "again.onnx", QuantizeConfig(precision=Precision.fp16), log=lambda s: None)
    assert str(info.value) == f"{out}: already quantized (fp16); quantize the FP32 parent instead"
    from edgekidney.errors import InputError

    with pytest.raises(InputError) as info:
        quantize(parent, tmp_path / "i8.onnx", QuantizeConfig(precision=Precision.int8), log=lambda s: None)
    assert str(info.value) == "--precision int8 needs --calibration DIR (make one with 'edgekidney calibrate')"
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"plan")
    ecard = load_card(parent)
    ecard.kind = "engine"
    ecard.save(engine)
    with pytest.raises(ModelError) as info:
        quantize(engine, tmp_path / "x.onnx", QuantizeConfig(precision=Precision.fp16), log=lambda s: None)
    assert str(info.value) == f"{engine}: quantize takes an ONNX model, not a engine"


def test_head_agreement_measures_scope_decisions_in_units_of_the_threshold_and_map_correlation():
    from edgekidney.optimize.quantize import head_agreement

    ref = {"scope_distance": np.array([1.0, 3.0, 9.0, 11.0]),
           "cam": np.stack([np.arange(16.0).reshape(4, 4), np.eye(4), np.ones((4, 4)), -np.eye(4)])}
    got = {"scope_distance": np.array([1.5, 2.0, 11.0, 11.0]),
           "cam": np.stack([2 * np.arange(16.0).reshape(4, 4) + 5, np.eye(4), np.ones((4, 4)), np.eye(4)])}
    out = head_agreement(ref, got, 10.0)
    assert out["max_scope_distance_diff_over_threshold"] == pytest.approx(0.2)
    assert out["scope_agreement"] == 0.75  # 9 -> 11 crosses the threshold of 10
    assert out["cam_min_correlation"] == pytest.approx(-1.0) and out["cam_median_correlation"] == pytest.approx(0.5)
    assert head_agreement(ref, got, None).keys() == {"cam_min_correlation", "cam_median_correlation"}
    assert head_agreement({"logits": 1}, {"logits": 1}, 10.0) == {}
    assert head_agreement({"scope_distance": ref["scope_distance"]}, {}, 10.0) == {}
    assert head_agreement({"cam": ref["cam"]}, {}, 10.0) == {}  # a map on one side only: nothing to compare
    at = head_agreement({"scope_distance": np.array([10.0])}, {"scope_distance": np.array([10.0])}, 10.0)
    assert at["scope_agreement"] == 1.0  # at the threshold is in scope, on either side
    at = head_agreement({"scope_distance": np.array([10.0])}, {"scope_distance": np.array([10.5])}, 10.0)
    assert at["scope_agreement"] == 0.0
    faint = head_agreement({"cam": 1e-4 * ref["cam"][:2]}, {"cam": 1e-4 * ref["cam"][:2]}, 10.0)
    assert faint["cam_min_correlation"] == pytest.approx(1.0)  # a faint map correlates like a strong one


# -- what the benchmark reports, exactly ----------------------------------------------------------------
ROW_KEYS = {"model", "precision", "backend", "target", "reference", "child_of_reference", "accuracy", "sensitivity",
            "specificity", "auc", "threshold", "confusion_matrix", "agreement", "out_of_scope", "max_abs_dprob",
            "accuracy_drop_points", "sensitivity_drop_points", "gates", "passed"}


def test_the_report_and_its_table_are_exactly_what_users_read(family):
    from edgekidney.bench.accuracy import format_table, run_accuracy

    logs: list[str] = []
    res = run_accuracy([family["overcalls"], family["ref"]], family["data"], log=logs.append,
                       gates=__import__("edgekidney.bench.accuracy", fromlist=["Gates"]).Gates(20.0, 1.0, 0.5))
    assert logs == ["  8/8 slices"]
    assert set(res) == {"benchmark", "data", "n", "gates", "reference", "rows", "passed", "failed", "seconds"}
    assert res["benchmark"] == "accuracy" and res["n"] == 8 and res["passed"] and res["failed"] == []
    assert res["gates"] == {"max_accuracy_drop": 20.0, "max_sensitivity_drop": 1.0, "min_agreement": 0.5}
    assert isinstance(res["seconds"], float) and 0 <= res["seconds"] < 60 and res["seconds"] == round(res["seconds"], 1)
    child, ref = res["rows"]
    assert set(child) == set(ref) == ROW_KEYS
    assert child["threshold"] == ref["threshold"] == 0.5 and child["out_of_scope"] is ref["out_of_scope"] is None
    assert ref["target"] is None and not ref["child_of_reference"] and ref["max_abs_dprob"] == 0.0
    data = str(family["data"])
    expected = f"""accuracy on {res['data']} (8 slices); reference fp32.onnx
model                              prec      acc    sens    spec     auc   agree  max|dp|  gates
overcalls.int8.onnx                int8   0.8750  1.0000  0.7500  1.0000  0.8750   0.3535  PASS
fp32.onnx                          fp32   1.0000  1.0000  1.0000  1.0000  1.0000   0.0000  reference
gates: accuracy drop <= 20.0 pt, sensitivity drop <= 1.0 pt, agreement >= 50.00%  ->  PASSED"""
    assert data in res["data"] and format_table(res) == expected
    failed = run_accuracy([family["misses"], family["ref"]], family["data"], log=logs.append, batch_size=3)
    assert logs[1:] == ["  3/8 slices", "  6/8 slices", "  8/8 slices"]
    assert format_table(failed).splitlines()[2].endswith("  FAIL accuracy,sensitivity,agreement")
    assert format_table(failed).splitlines()[-1].endswith("->  FAILED")


def test_more_slices_than_a_batch_of_32(tmp_path):
    from edgekidney.bench.accuracy import run_accuracy

    for cls, grays in (("Normal", np.linspace(0.05, 0.45, 20)), ("Stone", np.linspace(0.55, 0.95, 20))):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i, g in enumerate(grays):
            Image.fromarray(np.full((40, 40), round(g * 255), np.uint8)).save(tmp_path / "d" / cls / f"{i}.png")
    logs: list[str] = []
    res = run_accuracy([linear_model(tmp_path / "m.onnx", 0.5)], tmp_path / "d", log=logs.append)
    assert logs == ["  32/40 slices", "  40/40 slices"] and res["rows"][0]["accuracy"] == 1.0


def test_out_of_scope_is_an_answer_a_child_can_disagree_on(family, tmp_path):
    """Parent and child judge alike, but the child's scope threshold puts one more stone out of scope:
    a missed stone for its sensitivity and a disagreement, while its probabilities are the parent's."""
    from edgekidney.bench.accuracy import run_accuracy

    ref = linear_model(tmp_path / "sref.onnx", 0.5, scope_threshold=0.85)  # the 0.9 stone: out of scope
    child = linear_model(tmp_path / "schild.int8.onnx", 0.5, ref, "int8", scope_threshold=0.75)  # 0.8 too
    res = run_accuracy([child, ref], family["data"], log=lambda s: None)
    c, r = res["rows"]
    assert r["out_of_scope"] == 1 and r["sensitivity"] == 0.75 and r["accuracy"] == 0.875
    assert r["confusion_matrix"] == [[4, 0, 0], [0, 3, 1]]
    assert c["out_of_scope"] == 2 and c["sensitivity"] == 0.5 and c["accuracy"] == 0.75
    assert c["agreement"] == 0.875 and c["max_abs_dprob"] == 0.0
    assert c["sensitivity_drop_points"] == 25.0 and c["accuracy_drop_points"] == 12.5
    assert res["failed"] == [str(child)]
    judged = linear_model(tmp_path / "all.onnx", 0.5, scope_threshold=1.0)  # a parent that judges every slice
    c, r = run_accuracy([child, judged], family["data"], log=lambda s: None)["rows"]
    assert r["out_of_scope"] == 0 and r["sensitivity"] == 1.0 and c["agreement"] == 0.75  # two refused


def test_what_is_compared_split_classes_backend(family, tmp_path):
    import shutil

    from edgekidney.bench.accuracy import run_accuracy
    from edgekidney.data.dataset import Sample, write_manifest
    from edgekidney.errors import InputError, ModelError

    files = sorted(family["data"].rglob("*.png"))
    write_manifest([Sample(path=f, label=int(f.parent.name == "Stone"), class_name=f.parent.name, group=f"g{i}",
                           split="val" if f.stem in ("0.4", "0.6", "0.9") else "train") for i, f in enumerate(files)],
                   tmp_path / "split.csv")
    res = run_accuracy([family["ref"]], tmp_path / "split.csv", split="val", log=lambda s: None)
    assert res["n"] == 3
    assert run_accuracy([family["ref"]], tmp_path / "split.csv", log=lambda s: None)["n"] == 8
    more = tmp_path / "more"
    shutil.copytree(family["data"], more)
    shutil.copytree(family["data"] / "Normal", more / "Cyst")  # a class the model does not know
    assert run_accuracy([family["ref"]], more, classes=["Normal", "Stone"], log=lambda s: None)["n"] == 8
    with pytest.raises(InputError, match="unknown to the model"):
        run_accuracy([family["ref"]], more, log=lambda s: None)
    with pytest.raises(ModelError, match="unknown backend 'tflite'"):
        run_accuracy([family["ref"]], family["data"], backend="tflite", log=lambda s: None)
    rows = run_accuracy([family["ref"]], family["data"], backend="ort", log=lambda s: None)["rows"]
    assert rows[0]["backend"] == "ort"


def test_the_benchmark_script_has_the_same_gates(family, tmp_path, capsys):
    """``python benchmarks/accuracy.py`` (``edgekidney.bench.accuracy.main``): same options, same exit codes."""
    from edgekidney.bench.accuracy import main

    base = [str(family["overcalls"]), str(family["ref"]), "--data", str(family["data"])]
    out = tmp_path / "r.json"
    assert main(base + ["--json", str(out)]) == 1  # the default gates: accuracy and agreement fail
    res = json.loads(out.read_text())
    assert res["gates"] == {"max_accuracy_drop": 0.5, "max_sensitivity_drop": 1.0, "min_agreement": 0.99}
    assert res["failed"] == [str(family["overcalls"])]
    text = capsys.readouterr()
    assert text.out.splitlines()[2].endswith("FAIL accuracy,agreement") and "8/8 slices" in text.err
    assert main(base + ["--max-accuracy-drop", "12.5", "--min-agreement", "0.875", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["gates"] == {"max_accuracy_drop": 12.5, "max_sensitivity_drop": 1.0,
                                                    "min_agreement": 0.875}
    misses = [str(family["misses"]), str(family["ref"]), "--data", str(family["data"]), "--max-accuracy-drop", "100",
              "--min-agreement", "0"]
    assert main(misses + ["--max-sensitivity-drop", "49"]) == 1 and main(misses + ["--max-sensitivity-drop", "50"]) == 0
    capsys.readouterr()
    assert main([str(family["misses"]), str(family["ref"]), "--data", str(family["data"]), "--reference",
                 str(family["misses"]), "--split", "nope", "--classes", "Normal,Stone", "--backend", "ort"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")  # no slices in split 'nope'
    assert main([str(family["misses"]), str(family["ref"]), "--data", str(family["data"]), "--reference",
                 str(family["misses"]), "--classes", "Normal,Stone", "--backend", "ort", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["reference"] == str(family["misses"])
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out
    assert "--data DATA           dataset folder or split manifest (RUN/split.csv)" in usage
    assert "Accuracy benchmark: FP32 vs its FP16/INT8 children on one labelled folder, with gates." in " ".join(
        usage.split())
    assert main([str(family["ref"]), "--data", str(family["data"]), "--backend", "tflite"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: unknown backend 'tflite'; choose one of ort, trt"
    import shutil

    more = tmp_path / "more"
    shutil.copytree(family["data"], more)
    shutil.copytree(family["data"] / "Normal", more / "Cyst")  # a class the model does not know
    assert main([str(family["ref"]), "--data", str(more), "--classes", "Normal,Stone", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 8


def test_the_table_cuts_long_model_names_at_34_characters():
    from edgekidney.bench.accuracy import format_table

    row = {"model": "/m/" + "x" * 40 + ".onnx", "precision": "int8", "accuracy": 1, "sensitivity": 1, "specificity": 1,
           "auc": 1, "agreement": 1, "max_abs_dprob": 0, "reference": False, "passed": True, "gates": {}}
    table = format_table({"data": "d", "n": 1, "reference": "/m/r.onnx", "rows": [row], "passed": True,
                          "gates": {"max_accuracy_drop": 0.5, "max_sensitivity_drop": 1.0, "min_agreement": 0.99}})
    assert table.splitlines()[2].startswith("x" * 34 + " int8 ")


def test_the_quantizers_check_reads_at_most_64_calibration_slices(family):
    from types import SimpleNamespace

    from edgekidney.optimize.quantize import _compare
    from edgekidney.sidecar import load_card

    gray = np.linspace(0.0, 1.0, 70)
    x = np.broadcast_to(((gray - 0.485) / 0.229)[:, None, None, None], (70, 3, 32, 32)).astype(np.float64)
    out = _compare(family["ref"], family["overcalls"], load_card(family["ref"]), SimpleNamespace(tensors=x))
    assert out["check_inputs"] == "calibration slices" and out["check_n"] == 64
    assert 0 < out["top1_agreement"] < 1  # the first 64 grays include the ones the child calls otherwise


def test_a_child_is_judged_in_scope_at_its_own_threshold():
    from edgekidney.optimize.quantize import head_agreement

    ref = {"scope_distance": np.array([0.20, 0.26, 0.30])}
    got = {"scope_distance": np.array([0.35, 0.41, 0.45])}  # INT8 adds ~0.15 to every distance
    assert head_agreement(ref, got, 0.27)["scope_agreement"] == pytest.approx(1 / 3)
    assert head_agreement(ref, got, 0.27, 0.27 + 0.15)["scope_agreement"] == 1.0


def test_the_quantizers_check_judges_the_childs_scope_at_its_own_threshold(tmp_path):
    """_compare hands the child's moved threshold on: the same distances are judged alike at their own
    thresholds and unlike at the parent's."""
    from types import SimpleNamespace

    from edgekidney.optimize.quantize import _compare
    from edgekidney.sidecar import load_card

    ref = linear_model(tmp_path / "ref.onnx", 0.5, scope_threshold=0.55)
    child = linear_model(tmp_path / "child.int8.onnx", 0.5, ref, "int8", scope_threshold=0.55)
    gray = np.array([0.2, 0.5, 0.6, 0.9])  # distances = the grays: 0.6 lies between 0.55 and 0.65
    x = np.broadcast_to(((gray - 0.485) / 0.229)[:, None, None, None], (4, 3, 32, 32)).astype(np.float32)
    cal = SimpleNamespace(tensors=x)
    card = load_card(ref)
    assert _compare(ref, child, card, cal)["scope_agreement"] == 1.0
    moved = _compare(ref, child, card, cal, child_scope_threshold=0.65)
    assert moved["scope_agreement"] == 0.75 and moved["max_scope_distance_diff_over_threshold"] < 1e-6
    assert _compare(ref, child, card, cal, child_scope_threshold=0.45)["scope_agreement"] == 0.75
