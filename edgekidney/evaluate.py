"""Evaluate a checkpoint (PyTorch) or an exported model (ONNX Runtime / TensorRT) with the same code.

Data: a dataset folder (all its images, or one split of it as training would make it) or a split
manifest CSV (``RUN/split.csv``) with ``--split``. Reports accuracy, sensitivity, specificity,
precision, F1, ROC-AUC and the confusion matrix at the model's threshold, and the threshold that
reaches a target sensitivity on these data (which ``store_threshold`` writes into the sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .data.dataset import (SPLITS, Sample, SplitConfig, discover, find_classes, read_manifest, split_dataset)
from .data.decode import load_slice
from .errors import InputError, ModelError
from .metrics import classification_report, threshold_for_sensitivity
from .preprocess import preprocess_batch
from .sidecar import ModelCard, load_card, sidecar_path


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix in (".pt", ".pth") or (p.is_dir() and (p / "model.pt").exists())


def open_predictor(model: str | Path, backend: str | None = None, **options):
    """A TorchPredictor for checkpoints, a Classifier for ONNX models and engines."""
    if is_checkpoint(model):
        from .train import TorchPredictor

        return TorchPredictor(model, device=options.get("device", "cpu"))
    from .predict import Classifier

    return Classifier(model, backend=backend, **options)


@dataclass
class LabelledSet:
    samples: list[Sample]
    labels: np.ndarray  # indices into the model's classes
    description: str


def labelled_set(data: str | Path, card: ModelCard, split: str | None = None,
                 classes: list[str] | None = None, split_config: SplitConfig | None = None) -> LabelledSet:
    """The labelled slices to evaluate on, with labels mapped onto the model's classes."""
    data = Path(data)
    if split is not None and split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)}")
    if data.is_file() and data.suffix == ".csv":
        samples = read_manifest(data)
        if split:
            samples = [s for s in samples if s.split == split]
        where = f"{data} ({split or 'all'} split)"
    else:
        folder_classes = find_classes(data, classes)
        unknown = [c for c in folder_classes if c not in card.classes]
        if unknown:
            raise InputError(f"{data}: classes {', '.join(unknown)} are unknown to the model "
                             f"(it knows {', '.join(card.classes)}); pass --classes to pick a subset")
        ds = discover(data, folder_classes)
        if split:
            samples = split_dataset(ds, split_config or SplitConfig()).of_split(split)
        else:
            samples = ds.samples
        where = f"{data} ({split or 'all images'})"
    unknown = sorted({s.class_name for s in samples} - set(card.classes))
    if unknown:
        raise InputError(f"{data}: classes {', '.join(unknown)} are unknown to the model ({', '.join(card.classes)})")
    if not samples:
        raise InputError(f"{data}: no images to evaluate in {split or 'any'} split")
    labels = np.array([card.classes.index(s.class_name) for s in samples], dtype=np.int64)
    return LabelledSet(samples, labels, where)


def predict_probabilities(predictor, samples: list[Sample], batch_size: int = 16,
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Decode + preprocess (shared implementation) + infer, in batches -> (N, classes) probabilities."""
    pre = predictor.card.preprocessing
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        out.append(predictor.probabilities(preprocess_batch([load_slice(s.path, pre) for s in chunk], pre)))
        if progress:
            progress(len(chunk))
    return np.concatenate(out)


def evaluate(model: str | Path, data: str | Path, split: str | None = None, classes: list[str] | None = None,
             batch_size: int = 16, target_sensitivity: float = 0.95, store_threshold: bool = False,
             backend: str | None = None, **options) -> dict:
    from rich.progress import Progress

    predictor = open_predictor(model, backend=backend, **options)
    try:
        card = predictor.card
        ls = labelled_set(data, card, split, classes)
        with Progress(transient=True) as bar:
            task = bar.add_task("evaluating", total=len(ls.samples))
            probs = predict_probabilities(predictor, ls.samples, batch_size, lambda k: bar.advance(task, k))
    finally:
        predictor.close()
    pos = card.positive_index
    at_model = classification_report(ls.labels, probs, card.classes, pos, card.threshold)
    target_thr = threshold_for_sensitivity(ls.labels == pos, probs[:, pos], target_sensitivity)
    at_target = classification_report(ls.labels, probs, card.classes, pos, target_thr)
    result = {"model": str(model), "data": ls.description, "n": len(ls.samples),
              "backend": getattr(predictor, "backend_name", "torch"), "precision": card.precision,
              "at_model_threshold": at_model, "target_sensitivity": target_sensitivity,
              "threshold_for_target": target_thr, "at_target_threshold": at_target}
    if store_threshold:
        result["stored_threshold_in"] = str(store_model_threshold(model, target_thr))
    return result


def store_model_threshold(model: str | Path, threshold: float) -> Path:
    if is_checkpoint(model):
        raise ModelError("--store-threshold writes into an exported model's sidecar; export the checkpoint first")
    card = load_card(model)
    card.threshold = float(threshold)
    card.extra["threshold_source"] = "edgekidney evaluate --store-threshold"
    card.save(model)
    return sidecar_path(model)

