"""Trainable weights from an exported graph: fine-tune a released model (needs torch and onnx).

A release ships ONNX forms, not a PyTorch checkpoint, and its exporter folded every BatchNorm into the
convolution before it (``W' = W * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``).
:func:`state_from_graph` reads the FP16 or FP32 form back into a state dict of the network it came from:
each convolution gets the folded weight, its BatchNorm the folded bias with unit scale and zero
statistics, so the network computes exactly what the graph does in evaluation. That is all the frozen
phase of a fine-tune needs (its BatchNorms stay in evaluation mode); a phase that trains a BatchNorm
normalises by its batch's statistics, so :func:`reexpand_batchnorm` first measures, on training
slices, the mean and variance each BatchNorm receives and sets its statistics and affine to them: the
same function in evaluation, and about the same in training. docs/architecture.md, "Weights".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekidney.errors import InputError

FOLDED_FLAG = "batchnorm_folded"  # set on a network built from a graph until reexpand_batchnorm has run
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"}
CAST_SUFFIX = "_cast_to_fp32"  # onnxruntime's float16 converter keeps the head's constants FP16 behind a Cast
BN_EPS = 1e-5  # torchvision's BatchNorm2d


def graph_file(weights: str) -> Path | None:
    """The float graph ``weights`` names (an ``.onnx`` file, a release folder or a release's name), or None
    when it names none of these (then it is a PyTorch file)."""
    from edgekidney.released import find_release

    path = Path(weights)
    if path.suffix == ".onnx":
        return path
    folder = path if path.is_dir() else (find_release(weights) if len(path.parts) == 1 and not path.exists() else None)
    if folder is None:
        return None
    for name in ("model-fp16.onnx", "model.onnx"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{weights}: holds no FP16 or FP32 graph (model-fp16.onnx) to fine-tune from")


def state_from_graph(path: Path) -> dict:
    """The state dict (float32 tensors, torch names) of the network an edgekidney graph was exported from."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:
        raise InputError(f"{path}: not an ONNX model ({' '.join(str(exc).split())[:120]})") from None
    quantized = sorted({n.op_type for n in graph.node} & QUANTIZED_OPS)
    if quantized:
        raise InputError(f"{path}: an INT8 graph ({quantized[0]}); fine-tune from the FP16 or FP32 form "
                         "(model-fp16.onnx)")
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def value(name: str) -> np.ndarray:
        base = name.removesuffix(CAST_SUFFIX)
        if base not in values:
            raise InputError(f"{path}: {base} is not a constant of the graph; not an edgekidney export")
        return np.asarray(values[base], dtype=np.float32)

    def torch_name(name: str) -> str:  # the headed wrapper that was exported holds the network as ``net``
        return name.removesuffix(CAST_SUFFIX).removeprefix("net.")

    state: dict[str, np.ndarray] = {}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in graph.node:
        if node.op_type == "Conv":
            weight = torch_name(node.input[1])
            state[weight] = value(node.input[1])
            if len(node.input) > 2 and node.input[2]:
                bias = value(node.input[2])
                if node.input[2].removesuffix(CAST_SUFFIX).endswith(".bias"):
                    state[torch_name(node.input[2])] = bias
                else:  # a BatchNorm folded in: it becomes the identity plus this bias (see the module doc)
                    bn = _batchnorm_of(weight[: -len(".weight")])
                    # running_var 1 - eps: sqrt(var + eps) is exactly 1, so the network is the graph
                    state.update({f"{bn}.weight": np.ones_like(bias), f"{bn}.bias": bias,
                                  f"{bn}.running_mean": np.zeros_like(bias),
                                  f"{bn}.running_var": np.full_like(bias, 1.0 - BN_EPS)})
        elif node.op_type == "Gemm":
            state[torch_name(node.input[1])] = value(node.input[1])
            state[torch_name(node.input[2])] = value(node.input[2])
        elif node.op_type == "InstanceNormalization":  # GroupNorm: reshape, normalise, reshape, scale, shift
            scale = _follow(consumers, node, ("Reshape", "Mul"))
            shift = _follow(consumers, scale, ("Add",)) if scale is not None else None
            if scale is None or shift is None:
                raise InputError(f"{path}: a GroupNorm the reader does not know; not an edgekidney export")
            conv = _producer(graph, node.input[0], ("Reshape", "Conv"))
            gn = torch_name(conv.input[1])[: -len(".0.weight")] + ".1"
            state[f"{gn}.weight"] = value(_constant_input(scale, values)).reshape(-1)
            state[f"{gn}.bias"] = value(_constant_input(shift, values)).reshape(-1)
    for name, arr in values.items():  # the map's link and gate, and the class one-hot: plain parameters
        if name.startswith("net.") and name.count(".") == 1:
            state[name[len("net."):]] = np.asarray(arr, dtype=np.float32)
    if not any(k.endswith("conv1.weight") for k in state):
        raise InputError(f"{path}: no ResNet50 convolutions found; not an edgekidney export")
    import torch

    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    for k in [k for k in state if k.endswith(".running_mean")]:
        tensors[k[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return tensors


def _batchnorm_of(conv: str) -> str:
    """The BatchNorm after a ResNet50 convolution: ``conv1`` -> ``bn1``, ``layer1.0.conv2`` -> ``layer1.0.bn2``,
    ``layer1.0.downsample.0`` -> ``layer1.0.downsample.1``."""
    head, _, last = conv.rpartition(".")
    if last == "0" and head.endswith("downsample"):
        return f"{head}.1"
    if last.startswith("conv"):
        return f"{head}.bn{last[4:]}" if head else f"bn{last[4:]}"
    raise InputError(f"convolution {conv} has a folded BatchNorm the reader cannot place")


def _follow(consumers: dict, node, ops: tuple[str, ...]):
    """The node reached from ``node`` through consumers of the given op types in order, or None."""
    for op in ops:
        nxt = [c for c in consumers.get(node.output[0], []) if c.op_type == op]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return node


def _producer(graph, name: str, ops: tuple[str, ...]):
    producers = {o: n for n in graph.node for o in n.output}
    node = None
    for op in ops:
        node = producers.get(name)
        if node is None or node.op_type != op:
            raise InputError("a GroupNorm whose input is not a convolution; not an edgekidney export")
        name = node.input[0]
    return node


def _constant_input(node, values: dict) -> str:
    return next(i for i in node.input if i.removesuffix(CAST_SUFFIX) in values)


def reexpand_batchnorm(network, x: np.ndarray, device, batch_size: int = 16) -> int:
    """Give every BatchNorm of a network read from a graph the statistics of its input on the slices ``x``
    (see the module doc); returns how many BatchNorms were set. Evaluation outputs stay the same."""
    import torch

    bns = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    sums = {id(m): [0.0, 0.0, 0] for m in bns}

    def record(module, inputs):
        a = inputs[0].detach().double()
        s = sums[id(module)]
        s[0] = s[0] + a.sum(dim=(0, 2, 3))
        s[1] = s[1] + (a * a).sum(dim=(0, 2, 3))
        s[2] += a.shape[0] * a.shape[2] * a.shape[3]

    hooks = [m.register_forward_pre_hook(record) for m in bns]
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                network(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for m in bns:
            total, squares, n = sums[id(m)]
            mean = total / n
            var = (squares / n - mean * mean).clamp_min(0.0)
            std = torch.sqrt(var + m.eps)
            bias = m.bias.double() - m.weight.double() * (m.running_mean.double()) / torch.sqrt(
                m.running_var.double() + m.eps)  # what the BatchNorm adds today (its input's own term aside)
            scale = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
            # today: y = scale * x + bias; afterwards: (x - mean) / std * (scale * std) + (scale * mean + bias)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            m.weight.copy_((scale * std).to(m.weight.dtype))
            m.bias.copy_((scale * mean + bias).to(m.bias.dtype))
    network.train(was_training)
    if hasattr(network, FOLDED_FLAG):
        delattr(network, FOLDED_FLAG)
    return len(bns)
