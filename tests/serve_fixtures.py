"""A small exported model for the service tests and the load benchmark, built without training.

ResNet50 with seeded random weights, a checkpoint made by :func:`edgekidney.model.train.save_checkpoint`, a
``split.csv`` of a few real slices (or synthetic DICOMs when the shared data is absent) for the export's
parity check, then :func:`edgekidney.model.export.export_onnx`. Takes a few seconds, unlike ``train``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SHARED_DATA = Path(os.environ.get("EDGEKIDNEY_DATA",
                                Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-kidney-axial"))
CLASSES = ["Normal", "Stone"]


def sample_slices(out: Path, per_class: int = 2, data: Path = SHARED_DATA) -> list[tuple[Path, str]]:
    """Copy ``per_class`` real slices per class into ``out`` (synthetic DICOMs when no real data)."""
    out.mkdir(parents=True, exist_ok=True)
    picked: list[tuple[Path, str]] = []
    if all((data / c).is_dir() for c in CLASSES):
        for c in CLASSES:
            for src in sorted((data / c).iterdir())[:per_class]:
                dst = out / c / src.name.replace(" ", "_")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                picked.append((dst, c))
        return picked
    from edgekidney.data.synthetic import SynthConfig, generate

    generate(out, SynthConfig(patients=per_class, slices_per_class=1, size=96, seed=0), classes=tuple(CLASSES))
    return [(p, c) for c in CLASSES for p in sorted((out / c).glob("*.dcm"))]


def condition(model, paths: list[Path], pre) -> None:
    """Make a random ResNet50 answer like a classifier: BatchNorm statistics from real slices, logits
    scaled to a spread of about 2 and centred, so probabilities vary and both labels occur."""
    import numpy as np
    import torch

    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import preprocess_batch

    x = torch.from_numpy(preprocess_batch([load_slice(p, pre) for p in paths], pre))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()
        model(x)
        model.eval()
        diff = (model(x) @ torch.tensor([-1.0, 1.0])).numpy()
        scale = 2.0 / max(float(np.std(diff)), 1e-6)
        model.fc.weight.mul_(scale)
        model.fc.bias.mul_(scale)
        model.fc.bias[1] -= float(np.median(diff)) * scale  # half the slices on each side of 0.5
    model.eval()


def build_model(out_dir: Path, image_size: int = 64, seed: int = 0, threshold: float = 0.5,
                per_class: int = 4) -> Path:
    """-> path of ``out_dir/model.onnx`` (with its sidecar ``model.json``)."""
    import torch
    from torchvision.models import resnet50

    from edgekidney.data.dataset import Sample, write_manifest
    from edgekidney.model.export import export_onnx
    from edgekidney.data.preprocess import Preprocessing
    from edgekidney.model.train import save_checkpoint

    out_dir = Path(out_dir)
    run = out_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pre = Preprocessing(image_size=image_size)
    slices = sample_slices(out_dir / "slices", per_class=per_class)
    model = resnet50(num_classes=len(CLASSES))
    condition(model, [p for p, _ in slices], pre)
    save_checkpoint(run / "model.pt", model, CLASSES, "Stone", pre, threshold, "test: random init", {})
    write_manifest([Sample(path=p, label=CLASSES.index(c), class_name=c, group=f"g{i}", split="val")
                    for i, (p, c) in enumerate(slices)], run / "split.csv")
    onnx_path = out_dir / "model.onnx"
    export_onnx(run, onnx_path, parity_images=len(slices))
    return onnx_path


if __name__ == "__main__":  # python tests/serve_fixtures.py OUT_DIR [IMAGE_SIZE]
    import sys

    print(build_model(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64))
