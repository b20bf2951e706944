"""TensorRT engines without a GPU: profile shapes, cache keys, compatibility checks and every bad input.

Nothing here fakes a TensorRT result. The checks are pure functions of (sidecar dict, environment dict);
the environment of *this* machine is detected for real (no TensorRT, no CUDA device: cuda-python's
``cudaGetDeviceCount`` answers cudaErrorInsufficientDriver), and the CLI is driven through CliRunner.
Engine *files* made here are bad inputs (``fake_engine``): bytes that are never handed to TensorRT.
GPU builds and runs are in tests/test_tensorrt_gpu.py (``pytest -m gpu``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgekidney.cli import app
from edgekidney.optimize.engine import (EngineBuildConfig, format_parser_errors, graph_precision, inspect_onnx,
                               resolve_output)
from edgekidney.runtime.engine_compat import (BatchProfile, check_engine_compatible, check_static_batch, check_tensorrt_version,
                                      compatibility_problems, engine_cache_key, engine_file_name, missing_for_tensorrt,
                                      parse_version, profile_shapes, rebuild_command, require_tensorrt_environment,
                                      timing_cache_file, timing_cache_key)
from edgekidney.errors import DependencyError, InputError, ModelError
from edgekidney.data.preprocess import Preprocessing
from edgekidney.runtime import open_backend
from edgekidney.runtime.base import Backend
from edgekidney.sidecar import ModelCard, load_card, sidecar_path

import engine_fixtures as fx

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

ORIN = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "cuda_binding": "pycuda",
        "cuda_error": None, "l4t_release": "R36.4.0"}
H100 = {"tensorrt_version": "11.4.1.2", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "cuda_binding": "cuda-python", "cuda_error": None, "l4t_release": None}
INFO = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "int8",
        "profile": {"min_batch": 1, "opt_batch": 8, "max_batch": 32}, "onnx_path": "/models/model.int8.onnx"}


def this_machine() -> dict:
    from edgekidney.runtime.tensorrt import detect_environment

    return detect_environment()


def no_tensorrt_here():
    env = this_machine()
    if env["tensorrt_version"] and env["gpu_name"]:
        pytest.skip("this machine has TensorRT and a CUDA device: the GPU tests cover it")
    return env


@pytest.fixture(scope="module")
def real_onnx(tmp_path_factory) -> Path:
    """A real exported ResNet50 (64 px, seeded random weights) with its sidecar (~20 s, once per module)."""
    return fx.build_onnx(tmp_path_factory.mktemp("engine_model"))


def tiny_onnx(path: Path, precision: str = "fp32", size: int = 32, batch="N", input_name="input") -> Path:
    """Conv -> GlobalAveragePool -> Flatten -> Gemm, float32 I/O; FP16 or Q/DQ variants by precision."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "fc_b")]
    nodes = []
    x = input_name
    if precision == "fp16":
        inits[0] = numpy_helper.from_array(w.astype(np.float16), "w")
        nodes.append(helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Conv", ["x16", "w"], ["c16"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Cast", ["c16"], ["c"], to=TensorProto.FLOAT))
    elif precision == "int8":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes.append(helper.make_node("QuantizeLinear", [x, "s", "z"], ["xq"]))
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]))
        nodes.append(helper.make_node("Conv", ["xd", "w"], ["c"], pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node("Conv", [x, "w"], ["c"], pads=[1, 1, 1, 1]))
    nodes += [helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)]
    x_info = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, size, size])
    y_info = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])
    graph = helper.make_graph(nodes, "tiny", [x_info], [y_info], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    ModelCard(["Normal", "Stone"], "Stone", Preprocessing(image_size=size), precision=precision).save(path)
    return path


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# -- batch profile -----------------------------------------------------------------------------------
def test_profile_shapes_come_from_the_sidecar(real_onnx):
    card = load_card(real_onnx)
    shapes = profile_shapes(card.input_name, card.preprocessing.image_size, BatchProfile(1, 8, 32))
    assert shapes == {"input": {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [32, 3, 64, 64]}}


@pytest.mark.parametrize("lo,opt,hi,match", [(4, 2, 8, "--min-batch 4 is larger than --opt-batch 2"),
                                             (1, 16, 8, "--opt-batch 16 is larger than --max-batch 8"),
                                             (0, 1, 1, "at least 1")])
def test_bad_batch_ranges_are_refused(lo, opt, hi, match):
    with pytest.raises(InputError, match=match):
        BatchProfile(lo, opt, hi).validate()


def test_equal_batch_bounds_are_fine_and_static_onnx_batches_must_match():
    assert BatchProfile(4, 4, 4).validate().shapes(32)["opt"] == [4, 3, 32, 32]
    check_static_batch("N", BatchProfile(1, 8, 32))
    check_static_batch(8, BatchProfile(8, 8, 8))
    with pytest.raises(InputError, match="fixed batch size of 1"):
        check_static_batch(1, BatchProfile(1, 8, 32))


def test_backend_splits_batches_larger_than_the_profile():
    class Recorder(Backend):
        name = "recorder"

        def __init__(self):
            super().__init__(image_size=32, max_batch=BatchProfile(1, 8, 32).max_batch)
            self.calls = []

        def _infer_impl(self, batch):
            self.calls.append(len(batch))
            return {"logits": np.repeat(batch[:, :1, 0, 0], 2, axis=1)}

    b = Recorder()
    x = np.arange(70, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 32, 32), np.float32)
    y = b.infer(x)
    assert b.calls == [32, 32, 6] and y.shape == (70, 2) and np.array_equal(y[:, 0], np.arange(70))


# -- versions, keys ----------------------------------------------------------------------------------
def test_tensorrt_versions_older_than_10_3_are_refused_by_name():
    for ok in ("10.3.0.30", "10.7.0", "11.4.1.2"):
        check_tensorrt_version(ok)
    for old in ("8.5.2.2", "8.6.1", "10.2.0"):
        with pytest.raises(DependencyError) as err:
            check_tensorrt_version(old)
        assert old in str(err.value) and "10.3" in str(err.value) and "11.x" in str(err.value)
    assert parse_version("10.3.0.30") == (10, 3, 0, 30) and parse_version("11.4.1.post1") == (11, 4, 1)


def test_engine_cache_key_changes_with_everything_that_changes_the_plan():
    shapes = profile_shapes("input", 64, BatchProfile())
    base = dict(onnx_sha256="a" * 64, precision="int8", shapes=shapes, env=ORIN, options={"tf32": False})
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**base) and len(key) == 16
    variants = [dict(onnx_sha256="b" * 64), dict(precision="fp16"),
                dict(shapes=profile_shapes("input", 64, BatchProfile(1, 8, 16))),
                dict(shapes=profile_shapes("input", 128, BatchProfile())),
                dict(env={**ORIN, "tensorrt_version": "10.3.0.26"}), dict(env={**ORIN, "gpu_name": "Xavier"}),
                dict(env={**ORIN, "compute_capability": "7.2"}), dict(options={"tf32": True})]
    keys = {engine_cache_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    # timing caches are per TensorRT and GPU, not per model
    assert timing_cache_key(ORIN) == timing_cache_key({**ORIN, "cuda_binding": "cuda-python"}) != timing_cache_key(H100)


def test_cache_key_names_engines_and_timing_caches(tmp_path):
    assert engine_file_name("m/model.int8.onnx", "int8", "abc") == "model.int8.abc.engine"
    assert engine_file_name("m/model.onnx", "fp32", "abc") == "model.fp32.abc.engine"
    assert resolve_output(tmp_path, Path("model.fp16.onnx"), "fp16", "k1") == tmp_path / "model.fp16.k1.engine"
    assert resolve_output(tmp_path / "x.engine", Path("model.onnx"), "fp32", "k1") == tmp_path / "x.engine"
    assert resolve_output(f"{tmp_path}/new/", Path("m.onnx"), "fp32", "k1") == tmp_path / "new" / "m.fp32.k1.engine"
    assert timing_cache_file(f"{tmp_path}/new/", ORIN) == tmp_path / "new" / f"timing-{timing_cache_key(ORIN)}.cache"
    assert timing_cache_file(tmp_path, ORIN) == tmp_path / f"timing-{timing_cache_key(ORIN)}.cache"
    assert timing_cache_file(tmp_path / "t.cache", ORIN) == tmp_path / "t.cache"


# -- compatibility -----------------------------------------------------------------------------------
def test_an_engine_runs_where_it_was_built():
    assert compatibility_problems(INFO, ORIN) == []


def test_another_tensorrt_version_is_named_with_both_versions():
    (msg,) = compatibility_problems(INFO, {**ORIN, "tensorrt_version": "10.7.0.23"})
    assert "built with TensorRT 10.3.0.30, this machine has TensorRT 10.7.0.23" == msg
    # plans match exactly, build number included
    assert compatibility_problems(INFO, {**ORIN, "tensorrt_version": "10.3.0.26"})


def test_version_compatible_engines_run_on_newer_tensorrt_only():
    vc = {**INFO, "version_compatible": True}
    assert compatibility_problems(vc, {**ORIN, "tensorrt_version": "10.7.0"}) == []
    assert compatibility_problems(vc, {**ORIN, "tensorrt_version": "11.4.1"}) == []
    (msg,) = compatibility_problems(vc, {**ORIN, "tensorrt_version": "10.2.0"})
    assert "version-compatible with TensorRT 10.3.0.30" in msg and "10.2.0" in msg


def test_another_gpu_is_named_with_both_gpus_and_compute_capabilities():
    problems = compatibility_problems(INFO, H100)
    assert any("built for GPU Orin (compute capability 8.7), this GPU is NVIDIA H100 80GB HBM3 (compute capability 9.0)"
               in p for p in problems)
    assert any("TensorRT 10.3.0.30" in p and "11.4.1.2" in p for p in problems)
    (msg,) = compatibility_problems({**INFO, "gpu_name": "NVIDIA H100 PCIe", "compute_capability": "9.0",
                                     "tensorrt_version": "11.4.1.2"}, H100)
    assert "built on GPU NVIDIA H100 PCIe, this GPU is NVIDIA H100 80GB HBM3" in msg


def test_hardware_compatible_engines_follow_their_level():
    amp = {**INFO, "tensorrt_version": H100["tensorrt_version"], "gpu_name": "NVIDIA A100", "compute_capability": "8.0",
           "hardware_compatibility": "ampere_plus"}
    assert compatibility_problems(amp, H100) == []
    (msg,) = compatibility_problems(amp, {**H100, "gpu_name": "Tesla T4", "compute_capability": "7.5"})
    assert "Ampere and newer" in msg and "7.5" in msg
    same = {**amp, "hardware_compatibility": "same_compute_capability", "gpu_name": "NVIDIA H100 PCIe",
            "compute_capability": "9.0"}
    assert compatibility_problems(same, H100) == []


def test_mismatch_error_says_which_and_prints_the_rebuild_command():
    info = {**INFO, "version_compatible": True, "workspace_mib": 1024}
    with pytest.raises(ModelError) as err:
        check_engine_compatible(info, H100, "/models/model.int8.engine")
    text = str(err.value)
    assert "\n" not in text and "engine does not match this machine" in text and "Orin" in text and "H100" in text
    assert text.endswith("Rebuild it here: edgekidney build-engine /models/model.int8.onnx --out "
                         "/models/model.int8.engine --min-batch 1 --opt-batch 8 --max-batch 32 --workspace 1024 "
                         "--version-compatible")
    amp = {**INFO, "hardware_compatibility": "ampere_plus"}
    assert "--hardware-compatibility ampere_plus" in rebuild_command(amp, "e")


def test_hardware_compatibility_is_refused_on_jetpack_and_pre_ampere():
    from edgekidney.runtime.engine_compat import check_build_options

    check_build_options(None, ORIN)
    check_build_options("ampere_plus", H100)
    with pytest.raises(InputError, match="not support hardware compatibility on JetPack"):
        check_build_options("ampere_plus", ORIN)
    with pytest.raises(InputError, match="Ampere or newer"):
        check_build_options("ampere_plus", {**H100, "compute_capability": "7.5"})
    with pytest.raises(InputError, match="ampere_plus or same_compute_capability"):
        EngineBuildConfig(hardware_compatibility="turing").validate()


# -- the environment (detected for real) ------------------------------------------------------------
def test_missing_pieces_are_all_named():
    env = {"tensorrt_version": None, "cuda_binding": "cuda-python", "gpu_name": None,
           "cuda_error": "CUDA error cudaErrorNoDevice: no CUDA-capable device is detected"}
    with pytest.raises(DependencyError) as err:
        require_tensorrt_environment(env, "build a TensorRT engine")
    text = str(err.value)
    assert text.startswith("cannot build a TensorRT engine: TensorRT is not installed")
    assert "no CUDA device (CUDA error cudaErrorNoDevice" in text
    assert missing_for_tensorrt(ORIN) == []
    assert "no CUDA Python binding" in missing_for_tensorrt({**ORIN, "cuda_binding": None})[0]
    with pytest.raises(DependencyError, match="8.6.1 is too old"):
        require_tensorrt_environment({**ORIN, "tensorrt_version": "8.6.1"}, "run")


def test_no_cuda_device_is_detected_through_the_real_binding():
    from edgekidney.runtime.cuda import CudaError, gpu_environment, load_binding

    binding = load_binding()
    env = gpu_environment(binding)
    assert env["cuda_binding"] == binding.name
    if env["gpu_name"]:
        pytest.skip(f"this machine has a CUDA device ({env['gpu_name']})")
    assert env["cuda_error"] and env["compute_capability"] is None
    with pytest.raises(CudaError):  # e.g. cudaErrorInsufficientDriver / cudaErrorNoDevice
        binding.device_count()
    with pytest.raises(DependencyError, match="unknown CUDA binding"):
        load_binding("cupy")


def test_pycuda_missing_is_a_dependency_error():
    try:
        import pycuda  # noqa: F401

        pytest.skip("pycuda is installed here")
    except ImportError:
        pass
    from edgekidney.runtime.cuda import load_binding

    with pytest.raises(DependencyError, match="install pycuda"):
        load_binding("pycuda")


def test_jetson_release_and_device_index(tmp_path):
    from edgekidney.runtime.tensorrt import device_index, l4t_release

    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13\n")
    assert l4t_release(str(f)) == "R36.4.0" and l4t_release(str(tmp_path / "none")) is None
    assert [device_index(d) for d in (0, 1, "1", "cuda:1", "cuda", "auto")] == [0, 1, 1, 1, 0, 0]
    with pytest.raises(InputError, match="TensorRT runs on a GPU"):
        device_index("cpu")


# -- ONNX checks before TensorRT ---------------------------------------------------------------------
def test_graph_precision_is_read_from_the_graph(tmp_path):
    for p in ("fp32", "fp16", "int8"):
        assert graph_precision(onnx.load(str(tiny_onnx(tmp_path / f"m.{p}.onnx", p)))) == p


def test_real_model_passes_the_onnx_checks(real_onnx):
    info = inspect_onnx(real_onnx, load_card(real_onnx))
    assert isinstance(info["batch_dim"], str) and info["precision"] == "fp32" and info["opset"] >= 17


def test_sidecar_that_lies_about_precision_or_size_is_refused(tmp_path):
    m = tiny_onnx(tmp_path / "m.onnx", "fp32")
    card = load_card(m)
    card.precision = "int8"
    with pytest.raises(ModelError, match="sidecar says precision int8 but the graph is fp32"):
        inspect_onnx(m, card)
    card = load_card(m)
    card.preprocessing = Preprocessing(image_size=64)
    with pytest.raises(ModelError, match=r"the sidecar says \(N, 3, 64, 64\)"):
        inspect_onnx(m, card)
    card = load_card(tiny_onnx(tmp_path / "n.onnx", input_name="images"))
    card.input_name = "input"
    with pytest.raises(ModelError, match="no input 'input'"):
        inspect_onnx(tmp_path / "n.onnx", card)


def test_parser_errors_name_the_failing_node():
    text = format_parser_errors([{"node": 12, "name": "/layer1/Conv_3", "operator": "Conv",
                                  "desc": "Assertion failed: zero point\n must be 0"}, {"node": -1, "desc": "x"}])
    assert text == "node 12 '/layer1/Conv_3' (Conv): Assertion failed: zero point must be 0; model: x"


# -- bad input through the CLI -----------------------------------------------------------------------
def _one_error_line(code, out, *needles):
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for n in needles:
        assert n in lines[0], out
    return lines[0]


def test_cli_onnx_that_does_not_parse(tmp_path, real_onnx):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage, not protobuf" * 10)
    ModelCard(["Normal", "Stone"], "Stone", Preprocessing(image_size=64)).save(bad)
    _one_error_line(*cli("build-engine", bad, "--out", tmp_path / "b.engine"), "does not parse as an ONNX model")


def test_cli_model_without_sidecar(tmp_path, real_onnx):
    lone = tmp_path / "lone.onnx"
    shutil.copyfile(real_onnx, lone)
    _one_error_line(*cli("build-engine", lone, "--out", tmp_path / "l.engine"), "sidecar lone.json not found")


def test_cli_truncated_onnx(tmp_path, real_onnx):
    m = fx.copy_model(real_onnx, tmp_path)
    m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    _one_error_line(*cli("build-engine", m, "--out", tmp_path / "t.engine"), "does not match the sha256")


@pytest.mark.parametrize("args,needle", [(["--min-batch", "9"], "--min-batch 9 is larger than --opt-batch 8"),
                                         (["--max-batch", "4"], "--opt-batch 8 is larger than --max-batch 4"),
                                         (["--hardware-compatibility", "x"], "choose ampere_plus")])
def test_cli_bad_build_options(tmp_path, real_onnx, args, needle):
    _one_error_line(*cli("build-engine", real_onnx, "--out", tmp_path / "e.engine", *args), needle)


def test_cli_build_engine_here_says_what_is_missing(tmp_path, real_onnx):
    env = no_tensorrt_here()
    line = _one_error_line(*cli("build-engine", real_onnx, "--out", tmp_path / "e.engine"),
                           "cannot build a TensorRT engine")
    if not env["tensorrt_version"]:
        assert "TensorRT is not installed" in line
    if not env["gpu_name"]:
        assert "no CUDA device" in line and env["cuda_error"] in line
    assert not (tmp_path / "e.engine").exists()


def test_backend_trt_on_an_onnx_model_says_build_an_engine(tmp_path, real_onnx):
    with pytest.raises(ModelError, match="not a TensorRT engine; build one first: edgekidney build-engine"):
        open_backend(real_onnx, load_card(real_onnx), "trt")
    code, out = cli("infer", real_onnx, real_onnx.parent / "slices", "--backend", "trt")
    _one_error_line(code, out, "build-engine")


def test_backend_trt_without_tensorrt_or_gpu(tmp_path, real_onnx):
    env = no_tensorrt_here()
    engine = fx.fake_engine(real_onnx, tmp_path / "model.engine")
    with pytest.raises(DependencyError) as err:
        open_backend(engine, load_card(engine), "trt")
    assert str(err.value).startswith(f"cannot run TensorRT engine {engine}")
    if not env["tensorrt_version"]:
        assert "TensorRT is not installed" in str(err.value)
    line = _one_error_line(*cli("infer", engine, real_onnx.parent / "slices"), "cannot run TensorRT engine")
    assert "--backend" not in line  # .engine picks the trt backend by itself


def test_truncated_engine_is_refused_by_its_sidecar_hash(tmp_path, real_onnx):
    engine = fx.fake_engine(real_onnx, tmp_path / "model.engine")
    engine.write_bytes(engine.read_bytes()[:100])
    _one_error_line(*cli("infer", engine, real_onnx.parent / "slices", "--backend", "trt"),
                    "does not match the sha256 in model.engine.json (changed or truncated)")


def test_engine_sidecar_without_build_record_is_refused(tmp_path, real_onnx):
    engine = fx.fake_engine(real_onnx, tmp_path / "model.engine")
    card = load_card(engine)
    card.extra = {}
    card.save(engine)
    with pytest.raises(ModelError, match="no TensorRT build record"):
        open_backend(engine, load_card(engine), "trt")


# -- Jetson kit ------------------------------------------------------------------------------------------
TEGRASTATS = ("11-21-2024 10:25:01 RAM 2710/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
              "CPU [12%@1510,3%@1510,off,0%@1510,0%@729,0%@729] EMC_FREQ 4%@3199 GR3D_FREQ 61%@[612,0] "
              "NVENC off VIC_FREQ 729 APE 200 cpu@46.281C soc2@45.593C gpu@47.5C tj@48.1C "
              "VDD_IN 7758mW/5758mW VDD_CPU_GPU_CV 2476mW/1476mW VDD_SOC 1427mW/1427mW")


def test_tegrastats_lines_become_csv_rows_and_a_summary(tmp_path):
    sys.path.insert(0, str(REPO / "jetson"))
    try:
        import report
    finally:
        sys.path.pop(0)
    row = report.parse_tegrastats_line(TEGRASTATS)
    assert row["time"] == "11-21-2024 10:25:01" and row["ram_used_mb"] == 2710 and row["gpu_load_pct"] == 61
    assert row["gpu_freq_mhz"] == 612 and row["temp_gpu_c"] == 47.5 and row["power_VDD_IN_mw"] == 7758
    assert row["cpu_load_pct"] == pytest.approx(3.0)  # mean over online cores
    log = tmp_path / "tegrastats.log"
    log.write_text(TEGRASTATS + "\n" + TEGRASTATS.replace("61%", "81%").replace("7758mW", "8758mW") + "\nnoise\n")
    rows = report.tegrastats_to_csv(log, tmp_path / "tegrastats.csv")
    assert len(rows) == 2 and (tmp_path / "tegrastats.csv").read_text().startswith("time,")
    summary = report.summarize_tegrastats(rows)
    assert summary["gpu_load_pct"]["max"] == 81 and summary["power_VDD_IN_mw"]["mean"] == pytest.approx(8258)


def test_jetson_report_merges_benchmarks_into_json_and_markdown(tmp_path):
    device = {"model": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "l4t_release": "R36.4.0",
              "jetpack": "6.1", "power_mode": "MAXN", "clocks": "jetson_clocks on", "temps_before_c": {"gpu": 40.0}}
    latency = {"results": [{"model": "m.int8.engine", "precision": "int8", "backend": "trt", "batch": 1,
                            "p50_ms": 1.1, "p90_ms": 1.3, "p99_ms": 1.9, "gpu_p50_ms": 0.7}]}
    accuracy = {"results": [{"model": "m.int8.engine", "precision": "int8", "accuracy": 0.97, "gate": "pass"}]}
    paths = {}
    for name, obj in (("device", device), ("latency", latency), ("accuracy", accuracy)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    (tmp_path / "tegrastats.log").write_text(TEGRASTATS + "\n")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "jetson" / "report.py"), "merge", "--device", paths["device"],
                           "--latency", paths["latency"], "--accuracy", paths["accuracy"],
                           "--tegrastats", tmp_path / "tegrastats.log", "--out", out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["device"]["power_mode"] == "MAXN" and rep["latency"] == latency and rep["accuracy"] == accuracy
    assert rep["tegrastats"]["samples"] == 1
    md = (tmp_path / "report.md").read_text()
    assert "MAXN" in md and "p99_ms" in md and "1.9" in md and "int8" in md and "pass" in md


@pytest.mark.parametrize("script", ["jetson/setup.sh", "jetson/bench.sh"])
def test_jetson_scripts_parse_and_pass_shellcheck(script):
    path = REPO / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = text.replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_builds_no_engine_and_runs_as_non_root():
    ins = dockerfile_instructions((REPO / "Dockerfile.l4t").read_text())
    assert ins[0] == ("FROM", "nvcr.io/nvidia/l4t-jetpack:r36.4.0")
    runs = [arg for kind, arg in ins if kind == "RUN"]
    assert not any("build-engine" in r for r in runs)
    installs = [seg for r in runs for seg in r.split("&&") if "pip install" in seg]
    assert installs and not any("torch" in seg for seg in installs) and any("pycuda" in seg for seg in installs)
    users = [arg for kind, arg in ins if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    (cmd,) = [arg for kind, arg in ins if kind == "CMD"]
    assert "edgekidney serve" in cmd


JETSON_STUBS = {
    "nvpmodel": """#!/bin/bash
echo "nvpmodel $*" >>"$STUB_LOG"
id=$(cat "$STUB_STATE"); n=MODE_$id; [[ $id == 0 ]] && n=MAXN
if [[ "$1" == -q ]]; then printf 'NV Power Mode: %s\\n%s\\n' "$n" "$id"; fi
if [[ "$1" == -m ]]; then echo "$2" >"$STUB_STATE"; fi
""",
    "jetson_clocks": """#!/bin/bash
echo "jetson_clocks $*" >>"$STUB_LOG"
if [[ "$1" == --store ]]; then echo saved >"$2"; fi
if [[ "$1" == --show ]]; then echo "GPU MinFreq=306000000 MaxFreq=918000000 CurrentFreq=918000000"; fi
""",
    "tegrastats": """#!/bin/bash
echo "tegrastats $*" >>"$STUB_LOG"
while true; do echo "$STUB_LINE" >>"$4"; sleep 0.1; done
""",
    "edgekidney": """#!/bin/bash
echo "edgekidney $*" >>"$STUB_LOG"
out=""; prev=""; for a in "$@"; do [[ $prev == --json ]] && out=$a; prev=$a; done
if [[ "$2" == latency && -n "$STUB_FAIL_LATENCY" ]]; then echo "error: simulated failure" >&2; exit 1; fi
echo '{"results": [{"model": "m.engine", "precision": "int8", "p50_ms": 1.0, "p99_ms": 2.0}]}' >"$out"
""",
}


@pytest.mark.parametrize("fail", [False, True])
def test_bench_sh_restores_power_mode_and_clocks_even_on_failure(tmp_path, real_onnx, fail):
    """bench.sh's control flow against stand-in Jetson tools (a shell-script test, no benchmark numbers)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {**JETSON_STUBS, **({} if os.geteuid() == 0 else {"sudo": '#!/bin/bash\nexec "$@"\n'})}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "state").write_text("2\n")
    engine = fx.fake_engine(real_onnx, tmp_path / "m.engine")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"),
           "STUB_STATE": str(tmp_path / "state"), "STUB_LINE": TEGRASTATS, "PYTHONPATH": str(REPO),
           "STUB_FAIL_LATENCY": "1" if fail else ""}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "jetson" / "bench.sh"), "--data", str(tmp_path), "--out", str(out),
                           "--interval", "100", str(engine)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (1 if fail else 0), proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert "nvpmodel -m 0" in calls and calls.index("nvpmodel -m 0") < calls.index("nvpmodel -m 2")
    assert f"jetson_clocks --store {out}/jetson_clocks.before" in calls
    assert calls[-1] == f"jetson_clocks --restore {out}/jetson_clocks.before"
    assert (tmp_path / "state").read_text().strip() == "2"  # the original mode is back
    rep = json.loads((out / "report.json").read_text())
    assert rep["device"]["power_mode"] == "MAXN" and rep["tegrastats"]["samples"] >= 1
    assert rep["engines"][0]["precision"] == "fp32" and (out / "report.md").exists()
    assert ("restored power mode MODE_2 (2)" in proc.stderr) and (("latency failed" in proc.stderr) == fail)


def test_no_torch_in_the_tensorrt_path():
    code = ("import sys; import edgekidney.optimize.engine, edgekidney.runtime.engine_compat, edgekidney.runtime.tensorrt, "
            "edgekidney.runtime.cuda; assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    for f in ("edgekidney/optimize/engine.py", "edgekidney/runtime/engine_compat.py", "edgekidney/runtime/tensorrt.py",
              "edgekidney/runtime/cuda.py"):
        assert "import torch" not in (REPO / f).read_text()
    assert sidecar_path("x.engine").name == "x.engine.json"
