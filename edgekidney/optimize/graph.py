"""What an ONNX graph says about its own precision (docs/architecture.md rule 2: precision lives in the graph)."""

from __future__ import annotations

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear"}


def graph_precision(model) -> str:
    """int8 when the graph has Q/DQ or integer ops, fp16 when it has FP16 tensors, else fp32."""
    from onnx import TensorProto

    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        return "int8"
    f16 = TensorProto.FLOAT16
    if any(t.data_type == f16 for t in model.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in model.graph.node):
        return "fp16"
    return "fp32"


def heads_read_float(model, heads: list[str]) -> int:
    """Let the head nodes read full-precision tensors; returns how many inputs were rewired.

    Two tools round-trip the heads' tensors through a lower precision even when asked to keep them:
    the INT8 quantizer puts one Q/DQ pair on a tensor that a quantized node (the classifier's Gemm)
    and a kept one (the scope MatMul) share, so the kept node sees 8-bit features with one scale for
    all 2,048 of them (the distance moved 60-fold in a test); the FP16 converter, given a node block
    list, still casts every output of a blocked node to FP16 and back. Here ``DQ(Q(t))`` and
    ``Cast<float>(Cast<float16>(t))`` feeding a head node become ``t``, the heads' outputs are typed
    float32 again, and the casts nobody reads any more are removed.
    """
    from onnx import TensorProto

    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = set(heads)

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    changed = 0
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            outer = producer.get(name)
            inner = producer.get(outer.input[0]) if outer is not None and outer.input else None
            if inner is None:
                continue
            if outer.op_type == "DequantizeLinear" and inner.op_type == "QuantizeLinear":
                node.input[i] = inner.input[0]
                changed += 1
            elif (outer.op_type == "Cast" and inner.op_type == "Cast" and cast_to(outer) == TensorProto.FLOAT
                  and cast_to(inner) == TensorProto.FLOAT16):
                node.input[i] = inner.input[0]
                changed += 1
    head_outputs = {o for n in model.graph.node if n.name in wanted for o in n.output}
    for vi in model.graph.value_info:
        if vi.name in head_outputs and vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    _drop_unread(model)
    return changed


def _drop_unread(model) -> None:
    """Remove nodes whose outputs nothing reads (repeatedly), then the initializers nothing reads."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | graph_outputs
        dead = [n for n in model.graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    read = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name not in read]:
        model.graph.initializer.remove(init)


def head_nodes(model, main_output: str = "logits") -> list[str]:
    """Names of the nodes of the extra heads (scope distance, activation or stone map), not of the trunk.

    They stay in FP32 when the model is quantized: a distance sums 2,048 squares and a map is compared
    across pixels, where FP16 rounding or INT8 steps would move the answer more than they save time
    (they are a few Conv/MatMul/Mul/Reduce nodes beside ResNet50's 53 convolutions).

    The trunk is what the classifier (the Gemm nearest the logits) needs, the classifier included.
    Everything else is a head: with a stone map (docs/architecture.md, "The stone map") the logits
    also read the map's peak, so the map's convolutions and the link that adds its peak to the stone
    logit are heads although the logits need them.
    """
    producer = {o: n for n in model.graph.node for o in n.output}

    def ancestors(tensor: str) -> set[str]:
        needed: set[str] = set()
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in needed:
                continue
            needed.add(node.name)
            stack.extend(node.input)
        return needed

    classifier = _nearest_gemm(producer, main_output)
    trunk = ancestors(classifier.output[0]) if classifier is not None else ancestors(main_output)
    return [n.name for n in model.graph.node if n.name not in trunk]


def _nearest_gemm(producer: dict, tensor: str):
    """The Gemm (or MatMul with a weight) closest to ``tensor`` walking back through the graph, breadth first."""
    seen: set[str] = set()
    frontier = [tensor]
    while frontier:
        nxt = []
        for t in frontier:
            node = producer.get(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type == "Gemm":
                return node
            nxt.extend(node.input)
        frontier = nxt
    return None


# nodes that pass a tensor on without computing features of their own: a head reading their output reads
# what the node before them made
_PASS_THROUGH = {"Relu", "ReduceMean", "GlobalAveragePool", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
                 "Identity"}


def head_taps(model, heads: list[str] | None = None) -> list[str]:
    """Trunk nodes, other than convolutions and matrix products, whose outputs the heads read.

    The stone map reads the outputs of layer2 and layer3, the scope distance the pooled output of
    layer4: each is a residual ``Add`` (then ``Relu``, and for layer4 ``ReduceMean``). An INT8 graph
    for ONNX Runtime's CPU kernels would quantize those ``Add`` outputs to 8 bits with one scale per
    tensor, and a head then sees features rounded to 1/255 of their range: the map's maximum over
    1,024 cells rose by 0.34 logits and the scope distance by a quarter of its value on the validation
    slices, and more than half of them changed decision. Kept in FP32 (a handful of element-wise
    nodes beside 53 quantized convolutions), the heads read the sum of the dequantized convolutions,
    as they do in a TensorRT graph where only convolutions are quantized.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    heads = set(head_nodes(model) if heads is None else heads)
    taps: list[str] = []
    stack = [i for n in model.graph.node if n.name in heads for i in n.input]
    seen: set[str] = set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in heads or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in _PASS_THROUGH or node.op_type in ("Add", "Sum"):
            taps.append(node.name)
            if node.op_type in _PASS_THROUGH:
                stack.extend(node.input[:1])
    return [n.name for n in model.graph.node if n.name in set(taps)]
