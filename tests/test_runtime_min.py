"""The on-device path without torch: decode, preprocess, ONNX Runtime, the CLI, calibrate and quantize.

CI runs this file (with tests/test_decode.py) in a clean virtual environment holding the *lowest*
versions pyproject.toml allows (.ci/constraints-min.txt), so the floors there are versions the code
works with. The model is a tiny convolutional network written with onnx.helper (opset 18, as export
writes), its logits checked against numpy.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekidney.data.preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = ["Normal", "Stone"]


def tiny_model(folder: Path, split_manifest: Path | None = None) -> tuple[Path, dict]:
    """Conv 3->4 (3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 4->2, with its sidecar."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekidney.sidecar import ModelCard, sha256_of

    rng = np.random.default_rng(0)
    w = {"conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5,
         "conv_b": rng.standard_normal(4).astype(np.float32) * 0.1,
         "fc_w": rng.standard_normal((2, 4)).astype(np.float32),
         "fc_b": np.array([0.1, -0.1], np.float32)}
    nodes = [helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by every onnxruntime the floors allow
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    extra = {}
    if split_manifest is not None:
        extra = {"split_manifest": str(split_manifest), "split_manifest_sha256": sha256_of(split_manifest)}
    ModelCard(classes=CLASSES, positive_class="Stone", preprocessing=Preprocessing(image_size=SIZE),
              threshold=0.5, extra=extra).save(path)
    return path, w


def numpy_logits(x: np.ndarray, w: dict) -> np.ndarray:
    n, _, h, wd = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, 4, h, wd), np.float64)
    for i in range(3):
        for j in range(3):
            patch = pad[:, :, i:i + h, j:j + wd]
            out += np.einsum("nchw,oc->nohw", patch, w["conv_w"][:, :, i, j])
    out += w["conv_b"][None, :, None, None]
    feat = np.maximum(out, 0).mean(axis=(2, 3))
    return feat @ w["fc_w"].T + w["fc_b"]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 small PNG slices per class (Stone: a bright spot), all in the training split of split.csv."""
    from edgekidney.data.dataset import discover, write_manifest

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(12):
            img = rng.integers(40, 90, (48, 48), dtype=np.uint8)
            if c == "Stone":
                img[20:26, 20:26] = 250
            (root / c / f"{c}-{i}.png").write_bytes(png(img))
    ds = discover(root, CLASSES)
    for i, s in enumerate(ds.samples):
        s.split, s.group = "train", f"g{i}"
    write_manifest(ds.samples, root / "split.csv")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory, dataset):
    return tiny_model(tmp_path_factory.mktemp("model"), dataset / "split.csv")


def test_classifier_matches_numpy_on_png_and_dicom(model, dataset, tmp_path):
    from edgekidney.data.decode import load_slice
    from edgekidney.data.synthetic import synth_slice, write_ct_dicom
    from edgekidney.metrics import softmax
    from edgekidney.runtime.predict import Classifier
    from edgekidney.data.preprocess import preprocess_batch

    path, w = model
    dcm = tmp_path / "slice.dcm"
    write_ct_dicom(dcm, synth_slice(np.random.default_rng(2), 64, stone=True), 1, 1, "1.2.3", "1.2.3.4")
    files = [dataset / "Stone" / "Stone-0.png", dataset / "Normal" / "Normal-0.png", dcm]
    pre = Preprocessing(image_size=SIZE)
    x = preprocess_batch([load_slice(f, pre) for f in files], pre)
    with Classifier(path, threads=1) as clf:
        preds, failures = clf.predict_files(files)
        got = clf.backend.infer(x)
    np.testing.assert_allclose(got, numpy_logits(x, w), atol=1e-4)
    expected = softmax(numpy_logits(x, w))[:, 1]
    assert failures == [] and [p.probability for p in preds] == pytest.approx(expected, abs=1e-5)


def test_cli_infer_and_one_line_errors(model, dataset, tmp_path):
    path, _ = model
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "edgekidney.cli", "infer", str(path), str(dataset / "Stone"),
                        "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(out.read_text())["predictions"]) == 12
    r = subprocess.run([sys.executable, "-m", "edgekidney.cli", "infer", str(path), str(tmp_path / "none.png")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.png'}: no such file "
                                                                   "or folder"]


def test_calibrate_and_quantize_with_the_lowest_onnxruntime(model, dataset, tmp_path):
    """calibrate (no torch), FP16 (ORT's topological sort) and INT8 entropy (quantize_static's cache)."""
    from edgekidney.optimize.calibrate import make_calibration_set
    from edgekidney.optimize.quantize import Method, Precision, QuantizeConfig, Target, quantize
    from edgekidney.sidecar import load_card

    path, _ = model
    cal = make_calibration_set(dataset, path, tmp_path / "cal", n=8)
    assert cal.tensors.shape == (8, 3, SIZE, SIZE) and cal.info["per_class"] == {"Normal": 4, "Stone": 4}
    for name, cfg in {"fp16": QuantizeConfig(precision=Precision.fp16),
                      "int8": QuantizeConfig(target=Target.trt, method=Method.entropy, calibration=cal.folder)}.items():
        card = quantize(path, tmp_path / f"m.{name}.onnx", cfg, log=lambda s: None)
        q = card.extra["quantization"]
        assert load_card(tmp_path / f"m.{name}.onnx").precision == name
        assert q["top1_agreement"] == 1.0 and q["max_abs_prob_diff"] < 0.05, q


def test_constraints_file_holds_exactly_the_floors_of_pyproject():
    """CI installs .ci/constraints-min.txt; it must say what pyproject.toml says (regenerate with --write)."""
    r = subprocess.run([sys.executable, str(REPO / ".ci" / "min_constraints.py"), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pins = dict(line.split("==") for line in (REPO / ".ci" / "constraints-min.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    # the floors the code was found to need (see the commit that raised them)
    assert pins["onnxruntime"] == "1.27" and pins["pydicom"] == "3.0.1" and pins["onnx"] == "1.19"
    assert set(pins) == {"numpy", "scipy", "pillow", "pydicom", "onnx", "onnxruntime", "typer"}
