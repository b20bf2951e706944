"""TensorRT on a real GPU: build tiny engines from exported models in each precision, compare with ONNX Runtime.

Run with ``pytest -m gpu tests/test_tensorrt_gpu.py``. Every test skips, with the reason, where TensorRT
or a CUDA device is missing. Gates (same inputs, same ONNX graph through ONNX Runtime on the CPU):
FP32 max |dlogit| <= 1e-3, FP16 <= 1e-2, INT8 top-1 agreement >= 99 %.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import engine_fixtures as fx
from edgekidney.cli import app
from edgekidney.optimize.engine import EngineBuildConfig, build_engine
from edgekidney.runtime.engine_compat import BatchProfile
from edgekidney.errors import InputError, ModelError
from edgekidney.runtime import open_backend
from edgekidney.runtime.ort import OrtBackend
from edgekidney.sidecar import ModelCard, load_card

pytestmark = pytest.mark.gpu

N_INPUTS = 128
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def gpu_env():
    from edgekidney.runtime.engine_compat import check_tensorrt_version, missing_for_tensorrt
    from edgekidney.errors import DependencyError
    from edgekidney.runtime.tensorrt import detect_environment

    env = detect_environment()
    missing = missing_for_tensorrt(env)
    if missing:
        pytest.skip("TensorRT GPU tests need TensorRT and a CUDA device: " + "; ".join(missing))
    try:
        check_tensorrt_version(env["tensorrt_version"])
    except DependencyError as exc:
        pytest.skip(str(exc))
    return env


@pytest.fixture(scope="module")
def models(gpu_env, tmp_path_factory):
    """FP32 export + FP16 and symmetric Q/DQ INT8 graphs derived from it, and 128 CT-like inputs."""
    root = tmp_path_factory.mktemp("trt_models")
    fp32 = fx.build_onnx(root / "m")
    card = load_card(fp32)
    fx.inputs(card, 32, root / "calibration", seed=7)  # writes 32 synthetic slices in class folders
    x = fx.inputs(card, N_INPUTS, root / "eval", seed=1)
    return {"fp32": fp32, "fp16": fx.to_fp16(fp32, root / "m" / "model.fp16.onnx"),
            "int8": fx.to_int8_qdq(fp32, root / "m" / "model.int8.onnx", root / "calibration"), "x": x, "root": root}


@pytest.fixture(scope="module")
def engines(models):
    cache = models["root"] / "timing"
    cache.mkdir()
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        cfg = EngineBuildConfig(profile=BatchProfile(1, 8, 32), timing_cache=cache, workspace_mib=1024)
        out[precision], _ = build_engine(models[precision], models["root"] / f"model.{precision}.engine", cfg)
    return out


def ort_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    with OrtBackend(onnx_path, image_size=x.shape[-1]) as b:
        return b.infer(x)


def trt_logits(engine: Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    with open_backend(engine, load_card(engine), "trt") as b:
        y = b.infer(x)
        return y, b.last_gpu_ms


def test_engine_sidecar_records_the_build(engines, models, gpu_env):
    for precision, engine in engines.items():
        card = load_card(engine)
        info = card.extra["engine"]
        assert card.kind == "engine" and card.precision == precision == info["precision"]
        assert card.parent_sha256 == info["onnx_sha256"] == load_card(models[precision]).sha256
        assert info["tensorrt_version"] == gpu_env["tensorrt_version"] and info["gpu_name"] == gpu_env["gpu_name"]
        assert info["compute_capability"] == gpu_env["compute_capability"] and info["strongly_typed"]
        assert info["profile_shapes"] == {"input": {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64],
                                                    "max": [32, 3, 64, 64]}}
        assert info["build_seconds"] > 0 and len(info["cache_key"]) == 16


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_engines_match_onnx_runtime(engines, models, precision):
    x = models["x"]
    ref = ort_logits(models[precision], x)
    got, gpu_ms = trt_logits(engines[precision], x)  # 128 > max batch 32: split into 4 runs
    delta = float(np.max(np.abs(got - ref)))
    print(f"{precision}: max |dlogit| vs ONNX Runtime {delta:.2e} (gate {TOLERANCE[precision]:g}), "
          f"GPU compute {gpu_ms:.3f} ms for {len(x)} images")
    assert got.shape == ref.shape == (N_INPUTS, 2)
    assert delta <= TOLERANCE[precision]
    assert gpu_ms > 0


def test_int8_engine_agrees_with_onnx_runtime_on_top1(engines, models):
    x = models["x"]
    ref = ort_logits(models["int8"], x)
    got, _ = trt_logits(engines["int8"], x)
    agreement = float(np.mean(got.argmax(1) == ref.argmax(1)))
    vs_fp32 = float(np.mean(got.argmax(1) == ort_logits(models["fp32"], x).argmax(1)))
    print(f"int8: top-1 agreement with ONNX Runtime (same Q/DQ graph) {agreement:.4f}, with FP32 {vs_fp32:.4f}")
    assert agreement >= MIN_AGREEMENT


def test_batches_of_any_size_and_gpu_time(engines, models):
    x = models["x"]
    ref = ort_logits(models["fp32"], x[:70])
    with open_backend(engines["fp32"], load_card(engines["fp32"]), "trt") as b:
        assert b.max_batch == 32 and b.describe()["gpu_time_attribute"] == "last_gpu_ms"
        one = b.infer(x[:1])
        t1 = b.last_gpu_ms
        many = b.infer(x[:70])  # 32 + 32 + 6
        assert b.last_gpu_ms > t1 > 0
    assert np.max(np.abs(one - ref[:1])) <= 1e-3 and np.max(np.abs(many - ref)) <= 1e-3
    with pytest.raises(ModelError, match="closed"):
        b.infer(x[:1])


def test_batches_below_the_profile_minimum_are_padded(models, tmp_path):
    engine, _ = build_engine(models["fp32"], tmp_path / "min4.engine",
                             EngineBuildConfig(profile=BatchProfile(4, 4, 8), timing_cache=models["root"] / "timing"))
    ref = ort_logits(models["fp32"], models["x"][:3])
    got, _ = trt_logits(engine, models["x"][:3])
    assert got.shape == (3, 2) and np.max(np.abs(got - ref)) <= 1e-3


def test_timing_cache_is_saved_and_engines_are_found_by_cache_key(engines, models, tmp_path, capsys):
    caches = list((models["root"] / "timing").glob("timing-*.cache"))
    assert len(caches) == 1 and caches[0].stat().st_size > 0
    cfg = EngineBuildConfig(timing_cache=models["root"] / "timing")
    path, card = build_engine(models["fp32"], engines["fp32"], cfg)
    assert path == engines["fp32"] and "is up to date" in capsys.readouterr().out
    # --out DIR: the engine is named by its cache key
    path, card = build_engine(models["fp32"], tmp_path, cfg)
    assert path.name == f"model.fp32.{card.extra['engine']['cache_key']}.engine" and path.exists()


def test_parser_errors_name_the_failing_node(gpu_env, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgekidney.data.preprocess import Preprocessing

    node = helper.make_node("KidneyMagic", ["input"], ["logits"], domain="com.example", name="magic_node")
    x_info = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])
    y_info = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph([node], "g", [x_info], [y_info])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    path = tmp_path / "magic.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    ModelCard(["Normal", "Stone"], "Stone", Preprocessing(image_size=32)).save(path)
    with pytest.raises(ModelError, match="ONNX parser failed at node 0 'magic_node' \\(KidneyMagic\\)"):
        build_engine(path, tmp_path / "magic.engine")


def test_engine_from_another_gpu_or_tensorrt_is_refused_with_the_rebuild_command(engines, tmp_path):
    import shutil

    for field, value in (("gpu_name", "Some Other GPU"), ("compute_capability", "7.2"),
                         ("tensorrt_version", "10.0.0.1")):
        engine = tmp_path / f"other-{field}.engine"
        shutil.copyfile(engines["fp32"], engine)
        card = load_card(engines["fp32"])
        card.extra["engine"][field] = value
        card.save(engine)
        with pytest.raises(ModelError) as err:
            open_backend(engine, load_card(engine), "trt")
        assert value in str(err.value) and "Rebuild it here: edgekidney build-engine" in str(err.value)


def test_cli_build_engine_and_infer(models, tmp_path):
    runner = CliRunner()
    engine = tmp_path / "cli.engine"
    res = runner.invoke(app, ["build-engine", str(models["int8"]), "--out", str(engine), "--max-batch", "16",
                              "--timing-cache", str(models["root"] / "timing")])
    assert res.exit_code == 0, res.output
    assert load_card(engine).extra["engine"]["profile"]["max_batch"] == 16
    res = runner.invoke(app, ["infer", str(engine), str(models["root"] / "eval"), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert '"predictions"' in res.output


def test_version_compatible_flag_is_passed_through(models, tmp_path):
    try:
        engine, card = build_engine(models["fp32"], tmp_path / "vc.engine",
                                    EngineBuildConfig(profile=BatchProfile(1, 2, 4), version_compatible=True))
    except InputError as exc:  # a TensorRT without the flag says so
        pytest.skip(str(exc))
    assert card.extra["engine"]["version_compatible"] is True
    got, _ = trt_logits(engine, models["x"][:4])
    assert np.max(np.abs(got - ort_logits(models["fp32"], models["x"][:4]))) <= 1e-3
