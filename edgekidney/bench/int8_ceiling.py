"""How much faster INT8 can be on this CPU: a ResNet50 trunk, FP32 against INT8 (``benchmarks/int8_ceiling.py``).

``bench latency`` times a whole model; this times what bounds its INT8 gain. A ResNet50 trunk
(torchvision's layout: the stem, 16 bottlenecks with their residual additions, the pooling; BatchNorm
folded into the convolutions as an export folds it; random weights) is built as an ONNX graph at the
model's input size, quantized the way ``quantize --target cpu`` quantizes (ONNX Runtime's static Q/DQ:
U8 activations, per-channel S8 weights, MinMax on a few inputs), and both graphs run in ONNX Runtime
on the CPU, batch 1, with the given threads. Their ratio is the most INT8 can gain for the trunk on
this CPU: a model is the trunk plus heads, which cost the INT8 form as much as the FP32 one or more
(they stay FP32 there), so no quantization recipe makes the whole model faster by more than this.
Results: a table and JSON (``--json``); ``--min-ceiling`` exits 1 below a goal.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekidney.bench import ArgumentParser

BLOCKS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, bottlenecks, stride) of layer1-4


def resnet50_trunk(image_size: int, seed: int = 0):
    """The FP32 trunk as an ONNX ModelProto: input ``x`` [1, 3, S, S], output ``features`` [1, 2048, 1, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, c_in, c_out, k, stride=1, relu=True):
        n = len(nodes)
        w = (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)
        b = (rng.standard_normal(c_out) * 0.01).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{n}"), numpy_helper.from_array(b, f"b{n}")])
        nodes.append(helper.make_node("Conv", [x, f"w{n}", f"b{n}"], [f"c{n}"], pads=[k // 2] * 4, strides=[stride] * 2))
        if not relu:
            return f"c{n}"
        nodes.append(helper.make_node("Relu", [f"c{n}"], [f"r{n}"]))
        return f"r{n}"

    y = conv("x", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [y], ["pool"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]))
    y, c_in = "pool", 64
    for width, blocks, stride in BLOCKS:
        for b in range(blocks):
            s = stride if b == 0 else 1
            main = conv(conv(conv(y, c_in, width, 1), width, width, 3, s), width, 4 * width, 1, relu=False)
            skip = conv(y, c_in, 4 * width, 1, s, relu=False) if b == 0 else y
            n = len(nodes)
            nodes += [helper.make_node("Add", [main, skip], [f"a{n}"]), helper.make_node("Relu", [f"a{n}"], [f"o{n}"])]
            y, c_in = f"o{n}", 4 * width
    nodes.append(helper.make_node("GlobalAveragePool", [y], ["features"]))
    graph = helper.make_graph(nodes, "resnet50_trunk",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, image_size, image_size])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 2048, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantize_trunk(fp32_path: Path, int8_path: Path, image_size: int, n_inputs: int = 4) -> None:
    """Static Q/DQ INT8 of the trunk as ``quantize --target cpu`` writes it (U8S8, per-channel, MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Inputs(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.items = iter([{"x": rng.standard_normal((1, 3, image_size, image_size)).astype(np.float32)}
                               for _ in range(n_inputs)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32_path), str(int8_path), Inputs(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def time_model(path: Path, image_size: int, threads: int, seconds: float, warmup: int = 3) -> tuple[float, list[str]]:
    """Median milliseconds of one run over about ``seconds``, and the op types ONNX Runtime runs."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    x = np.random.default_rng(2).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    for _ in range(warmup):
        session.run(None, {"x": x})
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), ops


def measure(image_size: int, threads: int = 2, seconds: float = 5.0, log=print) -> dict:
    """The trunk in FP32 and INT8: median milliseconds, the ratio, and how many convolutions ran in INT8."""
    import onnx
    import onnxruntime as ort

    from edgekidney.bench.latency import _cpu_name, int8_instructions

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "trunk.onnx", Path(tmp) / "trunk.int8.onnx"
        log(f"building a ResNet50 trunk at {image_size} px and quantizing it (U8S8, per channel)")
        onnx.save(resnet50_trunk(image_size), str(fp32))
        quantize_trunk(fp32, int8, image_size)
        log(f"timing FP32 for {seconds:g} s")
        ms32, ops32 = time_model(fp32, image_size, threads, seconds)
        log(f"timing INT8 for {seconds:g} s")
        ms8, ops8 = time_model(int8, image_size, threads, seconds)
    return {"image_size": image_size, "threads": threads, "batch": 1, "processor": _cpu_name(),
            "int8_instructions": int8_instructions(), "onnxruntime": ort.__version__,
            "convolutions": sum(op == "Conv" for op in ops32), "int8_convolutions": ops8.count("QLinearConv"),
            "fp32_ms": round(ms32, 3), "int8_ms": round(ms8, 3), "ceiling": round(ms32 / ms8, 3)}


def main(argv: list[str] | None = None) -> int:
    from edgekidney.jsonio import write_json

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=256, help="the model's input size (default 256)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="timing per graph (default 5)")
    p.add_argument("--min-ceiling", type=float, default=None,
                   help="exit 1 when the trunk's FP32/INT8 ratio is below this (e.g. a latency goal)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.image_size < 32 or a.threads < 1 or a.seconds <= 0:
        p.error("--image-size must be at least 32, --threads at least 1, --seconds above 0")
    r = measure(a.image_size, a.threads, a.seconds, log=lambda m: print(m, file=sys.stderr))
    print(f"{r['processor']} ({', '.join(r['int8_instructions']) or 'INT8 instruction sets unknown'}), "
          f"onnxruntime {r['onnxruntime']}, {r['threads']} threads, batch 1, {r['image_size']} px")
    print("| ResNet50 trunk | p50 ms | convolutions |\n|---|---|---|")
    print(f"| FP32 | {r['fp32_ms']:.2f} | {r['convolutions']} |")
    print(f"| INT8 (U8S8 Q/DQ) | {r['int8_ms']:.2f} | {r['int8_convolutions']} in INT8 |")
    print(f"INT8 can make a ResNet50 at most {r['ceiling']:.2f}x as fast as FP32 on this CPU")
    if a.json:
        write_json(r, a.json)
    if a.min_ceiling is not None and r["ceiling"] < a.min_ceiling:
        print(f"error: the INT8 ceiling {r['ceiling']:.2f}x is below {a.min_ceiling:g}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
