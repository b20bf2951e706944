"""Export a trained checkpoint to ONNX (opset >= 17, dynamic batch) and prove parity with PyTorch.

Writes ``model.onnx`` and its sidecar ``model.json`` (docs/architecture.md rule 5). Parity: the same real CT
slices (from the run's split manifest) through PyTorch and ONNX Runtime; max |Δlogit| is recorded in
the sidecar and must be within ``tolerance`` or the export fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgekidney.data.dataset import read_manifest
from edgekidney.data.decode import load_slice
from edgekidney.errors import GateError, InputError
from edgekidney.data.preprocess import preprocess
from edgekidney.sidecar import ModelCard, sha256_of

DEFAULT_OPSET = 18


def parity_inputs(run_dir: Path, card: ModelCard, n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` real slices of the run's validation split (then train), preprocessed."""
    manifest = run_dir / "split.csv"
    if not manifest.exists():
        raise InputError(f"{run_dir}: no split.csv next to the checkpoint; parity needs the run's real slices")
    samples = read_manifest(manifest)
    samples = [s for s in samples if s.split == "val"] + [s for s in samples if s.split == "train"]
    picked = []
    for s in samples:  # spread over the classes
        if len(picked) >= n:
            break
        if sum(p.label == s.label for p in picked) < max(1, n // len(card.classes)) and s.path.exists():
            picked.append(s)
    if not picked:
        raise InputError(f"{manifest}: none of the listed slices exist any more; parity needs real inputs")
    pre = card.preprocessing
    return np.stack([preprocess(load_slice(s.path, pre), pre) for s in picked]), str(manifest)


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, parity_images: int = 8,
                tolerance: float = 1e-3) -> ModelCard:
    import onnx
    import torch

    from edgekidney.runtime.ort import OrtBackend
    from edgekidney.model.checkpoint import load_checkpoint

    if opset < 17:
        raise InputError(f"--opset {opset}: edgekidney exports opset 17 or newer")
    checkpoint = Path(checkpoint)
    ckpt_file = checkpoint / "model.pt" if checkpoint.is_dir() else checkpoint
    model, card = load_checkpoint(ckpt_file, heads=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x, source = parity_inputs(ckpt_file.parent, card, parity_images)
    s = card.preprocessing.image_size

    t0 = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.from_numpy(x[:2] if len(x) >= 2 else np.concatenate([x, x]))
    torch.onnx.export(model, (example,), str(out), input_names=["input"], output_names=card.outputs,
                      opset_version=opset, dynamo=True, external_data=False,
                      dynamic_shapes={"x": {0: batch}}, verbose=False)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    export_seconds = time.perf_counter() - t0

    with torch.inference_mode():
        ref = dict(zip(card.outputs, (o.numpy() for o in model(torch.from_numpy(x)))))
    with OrtBackend(out, image_size=s) as ort_backend:
        got = ort_backend.infer_outputs(x)
        got1 = ort_backend.infer_outputs(x[:1])  # the batch dimension really is dynamic
    delta = float(np.max(np.abs(ref["logits"] - got["logits"])))
    delta1 = float(np.max(np.abs(ref["logits"][:1] - got1["logits"])))
    if max(delta, delta1) > tolerance:
        raise GateError(f"{out}: ONNX Runtime differs from PyTorch by {max(delta, delta1):.2e} > {tolerance:g}")
    heads = {}
    for name in card.outputs[1:]:  # relative differences: distances and maps have their own scales
        scale = max(1.0, float(np.max(np.abs(ref[name]))))
        rel = float(np.max(np.abs(ref[name] - got[name]))) / scale
        heads[name] = rel
        if rel > tolerance:
            raise GateError(f"{out}: ONNX Runtime's {name} differs from PyTorch by {rel:.2e} (relative) > {tolerance:g}")

    onnx_card = ModelCard(
        classes=card.classes, positive_class=card.positive_class, preprocessing=card.preprocessing,
        threshold=card.threshold, precision="fp32", kind="onnx", parent_sha256=sha256_of(ckpt_file),
        outputs=card.outputs, scope=card.scope,
        metrics=card.metrics.get("val", {}),
        extra={"opset": opset, "source_checkpoint": str(ckpt_file.resolve()), "weights": card.extra.get("weights"),
               "data": card.extra.get("data"), "arch": card.extra.get("arch"),
               **{k: card.extra[k] for k in ("planes", "map") if k in card.extra},
               "split_manifest": str((ckpt_file.parent / "split.csv").resolve()),  # lineage: calibrate checks it
               "split_manifest_sha256": sha256_of(ckpt_file.parent / "split.csv"),
               "parity": {"max_abs_logit_diff": delta, "max_abs_logit_diff_batch1": delta1, "n_images": len(x),
                          "max_rel_diff_heads": heads,
                          "inputs": source, "tolerance": tolerance},
               "export_seconds": round(export_seconds, 1),
               "dynamic_axes": {name: {"0": "batch"} for name in ["input", *card.outputs]}})
    onnx_card.save(out)
    return onnx_card
