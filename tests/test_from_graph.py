"""Fine-tuning from an exported graph: a released model (or any FP16/FP32 export) read back into PyTorch.

The exporter folds each BatchNorm into its convolution; read back, the network must compute what the
graph computes, and once its BatchNorms have their statistics back it must compute the same in training
mode, or the first steps of a fine-tune would start from a different network.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgekidney.errors import InputError  # noqa: E402
from edgekidney.model.from_graph import FOLDED_FLAG, graph_file, reexpand_batchnorm, state_from_graph  # noqa: E402
from edgekidney.model.gate import map_gate_of, set_map_gate  # noqa: E402
from edgekidney.model.network import ARCH_STONE_MAP, GATE_OFF  # noqa: E402
from edgekidney.model.weights import build_model  # noqa: E402


def _graph_model(path):
    card = json.loads(path.with_suffix(".json").read_text())
    classes = card["classes"]
    model, source = build_model(len(classes), str(path), arch=ARCH_STONE_MAP,
                                positive=classes.index(card["positive_class"]))
    return model.eval(), source, card


def _inputs(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def _logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_a_graph_reads_back_into_the_network_it_was_exported_from(tiny_run, tiny_onnx):
    from edgekidney.model.checkpoint import load_checkpoint

    model, source, card = _graph_model(tiny_onnx)
    assert "with its stone map and classifier" in source and getattr(model, FOLDED_FLAG)
    assert map_gate_of(model) is None  # the gate is fitted after a fine-tune, not carried
    trained, _ = load_checkpoint(tiny_run)
    gate = map_gate_of(trained)
    set_map_gate(model, GATE_OFF if gate is None else gate)
    x = _inputs(6, card["preprocessing"]["image_size"])
    graph = ort.InferenceSession(str(tiny_onnx)).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(_logits(model, x), graph, atol=2e-4)
    np.testing.assert_allclose(_logits(model, x), _logits(trained, x), atol=2e-4)


def test_reexpanded_batchnorms_keep_the_network_and_train_as_it_evaluates(tiny_onnx):
    model, _, card = _graph_model(tiny_onnx)
    x = _inputs(24, card["preprocessing"]["image_size"], seed=1)
    before = _logits(model, x)
    folded_in_training = _logits(copy.deepcopy(model).train(), x)  # a copy: training mode moves the statistics
    # what a fine-tune would start from without the statistics: batch statistics of folded convolutions
    assert np.abs(folded_in_training - before).max() > 0.1
    assert reexpand_batchnorm(model, x, torch.device("cpu")) == 53 and not hasattr(model, FOLDED_FLAG)
    np.testing.assert_allclose(_logits(model, x), before, atol=1e-4)
    model.train()
    np.testing.assert_allclose(_logits(model, x), before, atol=1e-3)  # the slices the statistics came from
    bn = model.net.bn1
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight)) and float(bn.running_var.min()) >= 0


def test_fine_tuning_from_a_graph_starts_from_that_graph(tiny_onnx, small_real, tmp_path):
    """One epoch at a learning rate too small to move a weight: the run's network is the graph's (its
    BatchNorms' running statistics included), and the log says where the statistics came from."""
    from edgekidney.data.dataset import SplitConfig
    from edgekidney.model.checkpoint import load_checkpoint
    from edgekidney.model.train import TrainConfig, train

    lines: list[str] = []
    out = tmp_path / "run"
    train(TrainConfig(data=small_real, out=out, weights=str(tiny_onnx), image_size=64, epochs=1, freeze_epochs=0,
                      batch_size=8, lr=1e-9, augment="none", calculus_fraction=0.0,
                      split=SplitConfig(val_fraction=0.34, block_size=8)), log=lines.append)
    text = "\n".join(lines)
    assert "53 BatchNorms were folded" in text and "with its stone map and classifier" in text
    tuned, _ = load_checkpoint(out)
    set_map_gate(tuned, GATE_OFF)
    graph, _, card = _graph_model(tiny_onnx)
    x = _inputs(8, 64, seed=2)
    a, b = _logits(tuned, x), _logits(graph, x)
    assert (a.argmax(1) == b.argmax(1)).all()
    np.testing.assert_allclose(a, b, atol=0.05)


def test_a_released_model_is_read_from_its_float_form(tmp_path):
    folder = tmp_path / "kidney-stone-ct-x"
    folder.mkdir()
    (folder / "model-int8cpu.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="no FP16 or FP32 graph"):
        graph_file(str(folder))
    (folder / "model-fp16.onnx").write_bytes(b"")
    assert graph_file(str(folder)) == folder / "model-fp16.onnx"
    assert graph_file(str(tmp_path / "run" / "model.pt")) is None  # a PyTorch file goes the usual way
    assert graph_file("imagenet-like-name-of-no-release") is None


def _graph_with(nodes, inits, path):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(g), str(path))
    return path


def test_an_int8_graph_and_a_foreign_graph_are_refused_with_one_line(tmp_path):
    from onnx import helper, numpy_helper

    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    int8 = _graph_with([helper.make_node("QuantizeLinear", ["input", "s", "z"], ["y"])], [scale, zero],
                       tmp_path / "int8.onnx")
    with pytest.raises(InputError, match=r"INT8 graph \(QuantizeLinear\); fine-tune from the FP16"):
        state_from_graph(int8)
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    foreign = _graph_with([helper.make_node("Conv", ["input", "w"], ["y"])], [w], tmp_path / "other.onnx")
    with pytest.raises(InputError, match="not an edgekidney export"):
        state_from_graph(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not an ONNX model"):
        state_from_graph(tmp_path / "junk.onnx")


def test_a_graph_is_checked_against_the_sha256_given_for_it(tiny_onnx):
    from edgekidney.sidecar import sha256_of

    with pytest.raises(InputError, match=f"sha256 is {sha256_of(tiny_onnx)}, expected 0{{64}}"):
        build_model(2, str(tiny_onnx), weights_sha256="0" * 64, arch=ARCH_STONE_MAP, positive=1)
    _, source = build_model(2, str(tiny_onnx), weights_sha256=sha256_of(tiny_onnx).upper(), arch=ARCH_STONE_MAP,
                            positive=1)
    assert sha256_of(tiny_onnx) in source
