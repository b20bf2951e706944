"""Stage 2, the model: training (torch), ONNX export with the heads computed in the graph, evaluation.

Only ``train``, ``export``, ``heads`` and ``distributed`` import torch; ``evaluate`` and ``confidence``
run on an exported model with the lean runtime. See docs/architecture.md.
"""
