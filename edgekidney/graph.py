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
