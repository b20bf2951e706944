"""The INT8 ceiling benchmark: ResNet50's convolutions as it lists them, and INT8 graphs that compute them."""

import json

import numpy as np
import pytest

from edgekidney.bench import int8_ceiling as ceiling


def macs(shapes):
    return sum(s.c_in * s.c_out * s.kernel ** 2 * (-(-s.size // s.stride)) ** 2 * s.count for s in shapes)


def test_the_trunk_is_resnet50():
    shapes = ceiling.resnet50_convs(224)
    assert sum(s.count for s in shapes) == 53  # the stem, 16 bottlenecks of 3, 4 downsamples
    # ResNet50's convolutions at 224 px: 4.09 GMACs (He et al. 2016 give 3.8 GFLOPs for the stride-on-1x1
    # layout; torchvision's stride on the 3x3 costs more in layers 2-4), the fc layer's 2 M aside
    assert macs(shapes) == pytest.approx(4.087e9, rel=0.005)
    assert macs(ceiling.resnet50_convs(256)) == pytest.approx(macs(shapes) * (256 / 224) ** 2, rel=0.03)
    # layer1's downsample (64 -> 256, 1x1, stride 1) has the shape of its blocks' last 1x1 and is counted there
    assert [s.c_out for s in shapes if "downsample" in s.name] == [512, 1024, 2048]


@pytest.mark.parametrize("shape", [ceiling.ConvShape("3x3 s2", 16, 24, 12, 3, 2, 1),
                                   ceiling.ConvShape("1x1", 32, 8, 9, 1, 1, 1)])
def test_the_int8_graph_computes_the_same_convolution(shape):
    import onnxruntime as ort

    from onnx import numpy_helper

    fp32, int8 = ceiling.conv_graphs(shape)
    x32, x8 = ceiling.conv_inputs(shape)
    # the FP32 graph given the INT8 graph's weights and input as they are after quantization: what the
    # INT8 convolution must compute, up to rounding its output
    q = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    w = q["w_q"].astype(np.float32) * q["w_scale"][:, None, None, None]
    fp32.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    x32 = (x8.astype(np.float32) - 128) * q["x_scale"]
    run = lambda m, x: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y32, y8 = run(fp32, x32), run(int8, x8)
    side = -(-shape.size // shape.stride)
    assert y8.dtype == np.uint8 and y8.shape == y32.shape == (1, shape.c_out, side, side)
    dequantized = (y8.astype(np.float32) - 128) * 0.05
    inside = np.abs(y32) < 0.05 * 127  # outside the output's U8 range the INT8 graph saturates
    assert inside.mean() > 0.9
    assert np.abs(dequantized - y32)[inside].max() < 0.05 * 0.51  # within half an output step (the bias's rounding aside)


def test_main_writes_a_table_and_json_and_gates(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_time(model, x, threads, seconds, warmup=3):
        calls.append(x.dtype)
        return 2.0 if x.dtype == np.float32 else 1.0  # INT8 twice as fast on every shape

    monkeypatch.setattr(ceiling, "time_model", fake_time)
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--image-size", "64", "--json", str(out), "--min-ceiling", "1.5"]) == 0
    r = json.loads(out.read_text())
    assert r["ceiling"] == pytest.approx(2.0) and r["convolutions"] == 53
    assert r["fp32_ms"] == pytest.approx(2 * 53) and set(calls) == {np.dtype(np.float32), np.dtype(np.uint8)}
    assert "**2.00**" in capsys.readouterr().out
    assert ceiling.main(["--image-size", "64", "--min-ceiling", "3.5"]) == 1  # below a goal: exit 1
    with pytest.raises(SystemExit) as e:
        ceiling.main(["--image-size", "8"])
    assert e.value.code == 1
