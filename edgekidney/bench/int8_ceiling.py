"""How much faster INT8 can be on this CPU: ResNet50's convolutions, FP32 against INT8 (``benchmarks/int8_ceiling.py``).

``bench latency`` times a whole model; this times what bounds its INT8 gain. Every convolution of a
ResNet50 trunk at the model's input size (the stem, the bottlenecks' 1×1 and 3×3, the downsamples;
torchvision's layout, stride on the 3×3) is built twice as a one-node ONNX graph: an FP32 ``Conv``,
and the INT8 convolution ONNX Runtime makes of what ``quantize --target cpu`` writes (``QLinearConv``:
U8 activations in and out, per-channel S8 weights). Each runs in ONNX
Runtime on the CPU with the given threads, batch 1. The trunk's ratio is the sum of the FP32 times
over the sum of the INT8 times: with every other node free, a whole INT8 model cannot be faster than
its FP32 parent by more than that on this CPU (its heads, quantize/dequantize steps and the stem's
3-channel input only take from it). Results: a table per shape and JSON (``--json``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekidney.bench import ArgumentParser


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    size: int  # input height = width
    kernel: int
    stride: int
    count: int  # how many convolutions of this shape the trunk has


def resnet50_convs(image_size: int) -> list[ConvShape]:
    """ResNet50's convolutions (torchvision's layout) at ``image_size``, identical ones counted together."""
    shapes: dict[tuple, ConvShape] = {}

    def add(name, c_in, c_out, size, kernel, stride=1):
        key = (c_in, c_out, size, kernel, stride)
        old = shapes.get(key)
        shapes[key] = ConvShape(old.name if old else name, c_in, c_out, size, kernel, stride, (old.count if old else 0) + 1)

    add("stem 7x7", 3, 64, image_size, 7, 2)
    size = -(-image_size // 4)  # after the stem's stride 2 and the max pool's stride 2
    c_in = 64
    for layer, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            add(f"layer{layer} 1x1 in", c_in, width, size, 1)
            add(f"layer{layer} 3x3", width, width, size, 3, s)
            out_size = -(-size // s)
            add(f"layer{layer} 1x1 out", width, 4 * width, out_size, 1)
            if b == 0:
                add(f"layer{layer} downsample", c_in, 4 * width, size, 1, s)
            c_in, size = 4 * width, out_size
    return list(shapes.values())


def conv_graphs(shape: ConvShape, seed: int = 0):
    """(FP32 model, INT8 model) of one convolution with its bias, as ONNX ModelProtos: ``Conv`` on an FP32
    tensor, and ``QLinearConv`` on a U8 tensor with per-channel S8 weights and a U8 output, the node ONNX
    Runtime makes of the Q/DQ pattern that ``quantize --target cpu`` writes. Between two such
    convolutions a quantized model keeps its activations in U8, so no quantize step is timed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((shape.c_out, shape.c_in, shape.kernel, shape.kernel)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(shape.c_out) * 0.1).astype(np.float32)
    attrs = dict(pads=[shape.kernel // 2] * 4, strides=[shape.stride] * 2)
    dims = [1, shape.c_in, shape.size, shape.size]
    opset = [helper.make_opsetid("", 17)]
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]), opset_imports=opset)
    x_scale = 4.0 / 255
    w_scale = (np.abs(w).reshape(shape.c_out, -1).max(axis=1) / 127.0).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    b_q = np.round(bias / (x_scale * w_scale)).astype(np.int32)
    init = [numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
            numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(shape.c_out, np.int8), "w_zero"),
            numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "y_zero"), numpy_helper.from_array(b_q, "b_q")]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w_q", "w_scale", "w_zero", "y_scale", "y_zero",
                                            "b_q"], ["y"], **attrs)
    int8 = helper.make_model(helper.make_graph(
        [node], "int8", [helper.make_tensor_value_info("x", TensorProto.UINT8, dims)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], init), opset_imports=opset)
    return fp32, int8


def conv_inputs(shape: ConvShape, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An FP32 input for the FP32 graph and its U8 quantization (scale 4/255, zero point 128) for the INT8 one."""
    x = np.random.default_rng(seed).standard_normal((1, shape.c_in, shape.size, shape.size)).astype(np.float32)
    return x, np.clip(np.round(x / (4.0 / 255)) + 128, 0, 255).astype(np.uint8)


def time_model(model, x: np.ndarray, threads: int, seconds: float, warmup: int = 3) -> float:
    """Median milliseconds of one run, over runs for about ``seconds``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, {"x": x})
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def measure(image_size: int, threads: int = 2, seconds: float = 0.5, log=print) -> dict:
    """Per convolution shape: FP32 and INT8 milliseconds; the trunk's totals and their ratio."""
    import onnxruntime as ort

    from edgekidney.bench.latency import _cpu_name, int8_instructions

    rows = []
    shapes = resnet50_convs(image_size)
    for i, shape in enumerate(shapes, start=1):
        fp32, int8 = conv_graphs(shape)
        x32, x8 = conv_inputs(shape)
        ms32, ms8 = time_model(fp32, x32, threads, seconds), time_model(int8, x8, threads, seconds)
        rows.append({**asdict(shape), "fp32_ms": round(ms32, 4), "int8_ms": round(ms8, 4), "ratio": round(ms32 / ms8, 3)})
        log(f"[{i}/{len(shapes)}] {shape.name} {shape.c_in}->{shape.c_out} at {shape.size}px: "
            f"FP32 {ms32:.3f} ms, INT8 {ms8:.3f} ms ({ms32 / ms8:.2f}x)")
    fp32_total = sum(r["fp32_ms"] * r["count"] for r in rows)
    int8_total = sum(r["int8_ms"] * r["count"] for r in rows)
    return {"image_size": image_size, "threads": threads, "batch": 1, "processor": _cpu_name(),
            "int8_instructions": int8_instructions(), "onnxruntime": ort.__version__,
            "convolutions": sum(r["count"] for r in rows), "fp32_ms": round(fp32_total, 3),
            "int8_ms": round(int8_total, 3), "ceiling": round(fp32_total / int8_total, 3), "shapes": rows}


def format_table(r: dict) -> str:
    lines = [f"| shape | count | FP32 ms | INT8 ms | FP32 / INT8 |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} {s['c_in']}->{s['c_out']} at {s['size']} px | {s['count']} | {s['fp32_ms']:.3f} | "
              f"{s['int8_ms']:.3f} | {s['ratio']:.2f} |" for s in r["shapes"]]
    lines.append(f"| **trunk ({r['convolutions']} convolutions)** | | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | "
                 f"**{r['ceiling']:.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from edgekidney.jsonio import write_json

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=256, help="the model's input size (default 256)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.5, help="timing per graph (default 0.5)")
    p.add_argument("--min-ceiling", type=float, default=None,
                   help="exit 1 when the trunk's FP32/INT8 ratio is below this (e.g. a latency goal)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.image_size < 32 or a.threads < 1 or a.seconds <= 0:
        p.error("--image-size must be at least 32, --threads at least 1, --seconds above 0")
    r = measure(a.image_size, a.threads, a.seconds, log=lambda m: print(m, file=sys.stderr))
    print(f"{r['processor']} ({', '.join(r['int8_instructions']) or 'INT8 instruction sets unknown'}), "
          f"onnxruntime {r['onnxruntime']}, {r['threads']} threads, batch 1, {r['image_size']} px")
    print(format_table(r))
    print(f"INT8 can make this trunk at most {r['ceiling']:.2f}x as fast as FP32 on this CPU")
    if a.json:
        write_json(r, a.json)
    if a.min_ceiling is not None and r["ceiling"] < a.min_ceiling:
        print(f"error: the INT8 ceiling {r['ceiling']:.2f}x is below {a.min_ceiling:g}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
