"""What an ONNX graph says about its own precision (DESIGN.md rule 2: precision lives in the graph)."""

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
    """Rewire head nodes that read ``DQ(Q(t))`` to read ``t`` itself; returns how many inputs changed.

    The quantizer puts one Q/DQ pair on a tensor shared by a quantized node (the classifier's Gemm on the
    pooled features) and an excluded one (the scope MatMul): the excluded node then sees 8-bit features
    with one scale for all 2,048 of them, which moved the scope distance by a factor of 60 in a test.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = set(heads)
    changed = 0
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                changed += 1
    return changed


def head_nodes(model, main_output: str = "logits") -> list[str]:
    """Names of the nodes that only the extra heads need (scope distance, activation map), not the logits.

    They stay in FP32 when the model is quantized: a distance sums 2,048 squares and a map is compared
    across pixels, where FP16 rounding or INT8 steps would move the answer more than they save time
    (they are a few MatMul/Mul/Reduce nodes beside ResNet50's 53 convolutions).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    needed: set[str] = set()
    stack = [main_output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name not in needed]
