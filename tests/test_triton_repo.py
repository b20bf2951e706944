"""``edgekidney export-triton``: the config.pbtxt parsed with Triton's own ``model_config_pb2``
(shipped in tritonclient[grpc]) and its dims checked against the ONNX graph as ONNX Runtime reads it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

from edgekidney.errors import InputError  # noqa: E402
from edgekidney.sidecar import load_card  # noqa: E402
from edgekidney.server.triton_repo import TritonExportConfig, export_triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import fake_engine  # noqa: E402

DT = {model_config_pb2.TYPE_FP32: "tensor(float)", model_config_pb2.TYPE_FP16: "tensor(float16)"}


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_onnx_repository_matches_the_graph(tiny_onnx, tmp_path):
    import onnxruntime as ort

    path = export_triton(tiny_onnx, tmp_path / "repo", TritonExportConfig(queue_delay_us=2000))
    assert path == tmp_path / "repo" / "edgekidney" / "config.pbtxt"
    cfg = parse(path)
    assert cfg.name == "edgekidney" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    card = load_card(tiny_onnx)
    sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    graph = {t.name: t for t in [*sess.get_inputs(), *sess.get_outputs()]}
    assert [i.name for i in cfg.input] == [card.input_name]
    assert [o.name for o in cfg.output] == card.outputs == ["logits", "scope_distance", "cam"]
    for t in [*cfg.input, *cfg.output]:
        g = graph[t.name]
        assert DT[t.data_type] == g.type
        assert isinstance(g.shape[0], str)  # the dynamic batch Triton fills in
        expected = g.shape[1:]
        if t.HasField("reshape"):  # per-image scalar: dims [1], reshape []
            assert list(t.dims) == [1] and list(t.reshape.shape) == [] and expected == []
        else:
            assert list(t.dims) == expected
    assert list(cfg.input[0].dims) == [3, 64, 64]
    # the model file and its sidecar, byte for byte; the sidecar inside the config too
    copied = tmp_path / "repo" / "edgekidney" / "1" / "model.onnx"
    assert copied.read_bytes() == tiny_onnx.read_bytes() and load_card(copied).sha256 == card.sha256
    inner = json.loads(cfg.parameters["edgekidney_sidecar"].string_value)
    assert inner["sha256"] == card.sha256 and inner["preprocessing"] == card.preprocessing.to_dict()


def test_engine_repository_takes_the_profile_and_the_gpu(tiny_onnx, tmp_path):
    engine = fake_engine(tiny_onnx, tmp_path / "m.engine")
    path = export_triton(engine, tmp_path / "repo", TritonExportConfig(name="kidney", version=3))
    cfg = parse(path)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert {o.name: list(o.dims) for o in cfg.output} == {"logits": [2], "scope_distance": [1], "cam": [64, 64]}
    assert (tmp_path / "repo" / "kidney" / "3" / "model.plan").read_bytes() == engine.read_bytes()
    assert load_card(tmp_path / "repo" / "kidney" / "3" / "model.plan").kind == "engine"
    with pytest.raises(InputError, match="profile"):
        export_triton(engine, tmp_path / "r2", TritonExportConfig(max_batch_size=64))
    with pytest.raises(InputError, match="GPU only"):
        export_triton(engine, tmp_path / "r3", TritonExportConfig(instance_kind="cpu"))


def test_existing_entry_needs_force_and_the_cli_prints_the_container(tiny_onnx, tmp_path):
    from typer.testing import CliRunner

    from edgekidney.cli import app

    repo = tmp_path / "repo"
    r = CliRunner().invoke(app, ["export-triton", str(tiny_onnx), "--repo", str(repo), "--max-batch-size", "4",
                                 "--instance-kind", "gpu"])
    assert r.exit_code == 0, r.output
    assert "nvcr.io/nvidia/tritonserver:24.08-py3" in r.output and "--gpus all" in r.output
    cfg = parse(repo / "edgekidney" / "config.pbtxt")
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == [4]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    r = CliRunner().invoke(app, ["export-triton", str(tiny_onnx), "--repo", str(repo)])
    assert r.exit_code == 1 and "--force" in r.output
