"""Small real models for the TensorRT tests, made without training (a few seconds each).

``build_onnx``: torchvision ResNet50 with seeded random weights, a checkpoint from
:func:`edgekidney.model.train.save_checkpoint`, a ``split.csv`` of synthetic DICOM slices (or real ones) for the
export's parity check, then :func:`edgekidney.model.export.export_onnx` -> FP32 ONNX with its sidecar.
``to_fp16`` and ``to_int8_qdq`` derive FP16 and symmetric Q/DQ INT8 graphs from it with the product's own
``edgekidney.optimize.quantize`` (precision in the graph, docs/architecture.md rule 2): the engines under test are built from
exactly what users feed ``build-engine``. ``fake_engine`` writes a *bad input*: bytes that are not a TensorRT plan, with
an engine sidecar, for the error-path tests; it is never run as an engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

CLASSES = ["Normal", "Stone"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-kidney-axial"


def slices(out: Path, n_per_class: int = 4, size: int = 96) -> list[tuple[Path, str]]:
    """Synthetic DICOM slices (licence-free), ``n_per_class`` per class."""
    from edgekidney.data.synthetic import SynthConfig, generate

    generate(out, SynthConfig(patients=n_per_class, slices_per_class=1, size=size, seed=0), classes=tuple(CLASSES))
    return [(p, c) for c in CLASSES for p in sorted((out / c).glob("*.dcm"))]


def build_onnx(out_dir: Path, image_size: int = 64, seed: int = 0) -> Path:
    """-> ``out_dir/model.onnx`` with sidecar ``model.json``.

    A random ResNet50 puts every slice in one class with logits near +-14; the head is rescaled and
    centred on the synthetic slices so logits are O(1) and both classes occur, like a trained
    classifier's, which makes precision and top-1 agreement checks meaningful.
    """
    import torch
    from torchvision.models import resnet50

    from edgekidney.data.dataset import Sample, write_manifest
    from edgekidney.model.export import export_onnx
    from edgekidney.data.preprocess import Preprocessing
    from edgekidney.sidecar import ModelCard
    from edgekidney.model.train import save_checkpoint

    out_dir = Path(out_dir)
    run = out_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = resnet50(num_classes=len(CLASSES)).eval()
    pre = Preprocessing(image_size=image_size)
    picked = slices(out_dir / "slices")
    x = inputs(ModelCard(CLASSES, "Stone", pre), 16, out_dir / "head")
    with torch.inference_mode():
        model.fc.weight.mul_(0.1)
        model.fc.bias.mul_(0.1)
        logits = model(torch.from_numpy(x))
        model.fc.bias.sub_(logits.mean(0) + torch.tensor([0.0, 0.1]) * logits.std())
    save_checkpoint(run / "model.pt", model, CLASSES, "Stone", pre, 0.5, "test: seeded random init", {})
    write_manifest([Sample(path=p, label=CLASSES.index(c), class_name=c, group=f"g{i}", split="val")
                    for i, (p, c) in enumerate(picked)], run / "split.csv")
    onnx_path = out_dir / "model.onnx"
    export_onnx(run, onnx_path, parity_images=len(picked))
    return onnx_path


def inputs(card, n: int, out: Path, seed: int = 0) -> np.ndarray:
    """``n`` preprocessed synthetic CT slices for ``card``'s preprocessing."""
    from edgekidney.data.decode import load_slice
    from edgekidney.data.synthetic import SynthConfig, generate
    from edgekidney.data.preprocess import preprocess

    generate(out, SynthConfig(patients=(n + 1) // 2, slices_per_class=1, size=96, seed=seed), classes=tuple(CLASSES))
    files = sorted(out.rglob("*.dcm"))[:n]
    pre = card.preprocessing
    return np.stack([preprocess(load_slice(f, pre), pre) for f in files]).astype(np.float32)


def to_fp16(src: Path, dst: Path) -> Path:
    """The product's FP16 graph (float32 I/O kept), as ``edgekidney quantize --precision fp16`` writes it."""
    from edgekidney.optimize.quantize import Precision, QuantizeConfig, quantize

    quantize(src, dst, QuantizeConfig(precision=Precision.fp16), log=lambda s: None)
    return dst


def to_int8_qdq(src: Path, dst: Path, calibration_slices: Path) -> Path:
    """The product's TensorRT-flavoured INT8 graph (symmetric S8 Q/DQ), calibrated on the slices under
    ``calibration_slices`` (class folders), which are added to the run's manifest as training slices so
    that ``edgekidney calibrate`` takes them, exactly as a user's run would."""
    from edgekidney.optimize.calibrate import make_calibration_set
    from edgekidney.data.dataset import discover, read_manifest, write_manifest
    from edgekidney.optimize.quantize import Precision, QuantizeConfig, Target, quantize
    from edgekidney.sidecar import load_card, sha256_of

    run = Path(load_card(src).extra["source_checkpoint"]).parent
    extra = discover(calibration_slices, CLASSES).samples
    for i, s in enumerate(extra):
        s.split, s.group = "train", f"calibration{i}"
    write_manifest(read_manifest(run / "split.csv") + extra, run / "split.csv")
    card = load_card(src)  # the run's manifest now holds the calibration slices: record its new sha256
    card.extra["split_manifest_sha256"] = sha256_of(run / "split.csv")
    card.save(src)
    cal = make_calibration_set(calibration_slices, src, dst.parent / "calibration-set", manifest=run / "split.csv",
                               n=len(extra))
    quantize(src, dst, QuantizeConfig(precision=Precision.int8, target=Target.trt, calibration=cal.folder),
             log=lambda s: None)
    return dst


def fake_engine(src_onnx: Path, dst: Path, **engine_info) -> Path:
    """NOT an engine: bytes plus an engine sidecar, for tests of what happens *before* TensorRT loads a file."""
    from edgekidney.sidecar import load_card

    card = load_card(src_onnx)
    dst.write_bytes(b"not a TensorRT plan: edgekidney test input\n" * 64)
    info = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7",
            "precision": card.precision, "profile": {"min_batch": 1, "opt_batch": 8, "max_batch": 32},
            "onnx_path": str(src_onnx), "onnx_sha256": card.sha256}
    info.update(engine_info)
    card.kind, card.parent_sha256, card.extra = "engine", card.sha256, {"engine": info}
    card.save(dst)
    return dst


def copy_model(src: Path, dst_dir: Path, name: str = "model.onnx") -> Path:
    from edgekidney.sidecar import sidecar_path

    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    shutil.copyfile(sidecar_path(src), sidecar_path(dst))
    return dst
