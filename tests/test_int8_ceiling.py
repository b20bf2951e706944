"""The INT8 ceiling benchmark: the trunk it builds is ResNet50's, and its INT8 form runs INT8 convolutions."""

import json

import numpy as np
import pytest

from edgekidney.bench import int8_ceiling as ceiling


def conv_macs(model) -> int:
    """Multiply-accumulates of the graph's convolutions (shapes from ONNX shape inference)."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            c_out, c_in, kh, kw = weights[node.input[1]]
            _, _, h, w = shapes[node.output[0]]
            total += c_out * c_in * kh * kw * h * w
    return total


def test_the_trunk_is_resnet50():
    import onnxruntime as ort

    model = ceiling.resnet50_trunk(224)
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 53  # the stem, 16 bottlenecks of 3, 4 downsamples
    assert sum(n.op_type == "Add" for n in model.graph.node) == 16
    # ResNet50's convolutions at 224 px: 4.09 GMACs (torchvision's layout, stride on the 3x3), the fc's 2 M aside
    assert conv_macs(model) == pytest.approx(4.087e9, rel=0.005)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)})[0]
    assert out.shape == (1, 2048, 1, 1) and np.isfinite(out).all() and out.std() > 0  # activations neither die nor blow up


def test_the_int8_trunk_runs_every_convolution_in_int8_and_stays_close(tmp_path):
    import onnx
    import onnxruntime as ort

    fp32, int8 = tmp_path / "t.onnx", tmp_path / "t8.onnx"
    onnx.save(ceiling.resnet50_trunk(64), str(fp32))
    ceiling.quantize_trunk(fp32, int8, 64)
    ms32, ops32 = ceiling.time_model(fp32, 64, threads=1, seconds=0.05)
    ms8, ops8 = ceiling.time_model(int8, 64, threads=1, seconds=0.05)
    assert ops32.count("Conv") == 53 and ops8.count("QLinearConv") == 53  # fused: the INT8 kernels are what is timed
    assert "Conv" not in ops8 and ms32 > 0 and ms8 > 0
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].ravel()
    a, b = run(fp32), run(int8)
    assert np.corrcoef(a, b)[0, 1] > 0.95  # the same network, quantized (random weights: not a tight bound)


def test_main_writes_json_and_gates(tmp_path, monkeypatch, capsys):
    def fake_time(path, image_size, threads, seconds, warmup=3):
        return (4.0, ["Conv"] * 53) if "int8" not in Path(path).name else (1.6, ["QLinearConv"] * 53)

    from pathlib import Path

    monkeypatch.setattr(ceiling, "time_model", fake_time)
    monkeypatch.setattr(ceiling, "quantize_trunk", lambda a, b, s: Path(b).write_bytes(b""))
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--image-size", "32", "--json", str(out), "--min-ceiling", "2"]) == 0
    r = json.loads(out.read_text())
    assert r["ceiling"] == pytest.approx(2.5) and r["convolutions"] == r["int8_convolutions"] == 53
    assert "at most 2.50x as fast" in capsys.readouterr().out
    assert ceiling.main(["--image-size", "32", "--min-ceiling", "3.5"]) == 1  # below a goal: exit 1
    with pytest.raises(SystemExit) as e:
        ceiling.main(["--image-size", "8"])
    assert e.value.code == 1
