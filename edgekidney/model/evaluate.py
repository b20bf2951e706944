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

from edgekidney.data.dataset import (SPLITS, Sample, SplitConfig, discover, find_classes, read_manifest, split_dataset)
from edgekidney.data.decode import load_slice
from edgekidney.errors import InputError, ModelError
from edgekidney.model.confidence import bootstrap, calibration, confounder_table
from edgekidney.metrics import (classification_report, predictions, reachable_sensitivity, roc_curve,
                                threshold_for_sensitivity)
from edgekidney.progress import stage
from edgekidney.data.provenance import mismatch_warning
from edgekidney.sidecar import ModelCard, load_card, sidecar_path


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix in (".pt", ".pth") or (p.is_dir() and (p / "model.pt").exists())


def open_predictor(model: str | Path, backend: str | None = None, **options):
    """A TorchPredictor for checkpoints, a Classifier for ONNX models and engines."""
    if is_checkpoint(model):
        from edgekidney.model.train import TorchPredictor

        return TorchPredictor(model, device=options.get("device", "cpu"), threads=options.get("threads"))
    from edgekidney.runtime.predict import Classifier

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
                          progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode + preprocess + infer + scope (the code ``infer`` uses), in batches.

    Returns ((N, classes) probabilities, (N,) in scope or None for a model without a detector).
    """
    from edgekidney.runtime.predict import classify_batch

    pre = predictor.card.preprocessing
    probs, scope = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        r = classify_batch(predictor, [load_slice(s.path, pre) for s in chunk])
        probs.append(r.probs)
        scope.append(r.in_scope)
        if progress:
            progress(len(chunk))
    in_scope = None if any(s is None for s in scope) else np.concatenate(scope)
    return np.concatenate(probs), in_scope


def evaluate(model: str | Path, data: str | Path, split: str | None = None, classes: list[str] | None = None,
             batch_size: int = 16, target_sensitivity: float = 0.95, store_threshold: bool = False,
             backend: str | None = None, bootstrap_resamples: int = 2000, seed: int = 0,
             plot_dir: str | Path | None = None, **options) -> dict:
    predictor = open_predictor(model, backend=backend, **options)
    try:
        card = predictor.card
        ls = labelled_set(data, card, split, classes)
        warning = mismatch_warning(card.extra.get("data"), [s.path for s in ls.samples])
        with stage("evaluating", len(ls.samples), "slice") as bar:
            probs, in_scope = predict_probabilities(predictor, ls.samples, batch_size, bar.advance)
    finally:
        predictor.close()
    pos = card.positive_index
    at_model = classification_report(ls.labels, probs, card.classes, pos, predictor.threshold, in_scope)
    target_thr = threshold_for_sensitivity(ls.labels == pos, probs[:, pos], target_sensitivity, in_scope)
    reach = 1.0 if in_scope is None else reachable_sensitivity(ls.labels == pos, in_scope)
    warnings = [warning] if warning else []
    if reach < target_sensitivity:
        warnings.append(f"target sensitivity {target_sensitivity:g} is out of reach: "
                        f"{int(((ls.labels == pos) & ~in_scope).sum())} of {int((ls.labels == pos).sum())} "
                        f"{card.positive_class} slices are out of scope (counted as missed); every "
                        f"{card.positive_class} slice in scope is kept, sensitivity {reach:.3f}")
    at_target = classification_report(ls.labels, probs, card.classes, pos, target_thr, in_scope)
    pred = predictions(probs, pos, predictor.threshold, in_scope)
    result = {"model": str(model), "data": ls.description, "n": len(ls.samples),
              "backend": getattr(predictor, "backend_name", "torch"), "precision": card.precision,
              "at_model_threshold": at_model, "target_sensitivity": target_sensitivity,
              "threshold_for_target": target_thr, "at_target_threshold": at_target,
              "scope": {"detector": card.scope.get("method") if card.scope_threshold is not None else None,
                        "threshold": card.scope_threshold,
                        "out_of_scope": None if in_scope is None else int((~in_scope).sum())},
              "confounders": confounder_table(ls.labels, pred, card.classes, pos),
              "intervals": bootstrap(ls.labels, pred, probs[:, pos], card.classes, pos, bootstrap_resamples, seed),
              "calibration": calibration(ls.labels == pos, probs[:, pos]),
              "reachable_sensitivity": reach,
              "warnings": warnings}
    if plot_dir is not None:
        result["plots"] = write_plots(Path(plot_dir), ls.labels == pos, probs[:, pos], result["calibration"])
    if store_threshold:
        result["stored_threshold_in"] = str(store_model_threshold(model, target_thr))
        result["stale_children"] = stale_children(model)
    return result


def store_model_threshold(model: str | Path, threshold: float) -> Path:
    if is_checkpoint(model):
        raise ModelError("--store-threshold writes into an exported model's sidecar; export the checkpoint first")
    card = load_card(model)
    card.threshold = float(threshold)
    card.extra["threshold_source"] = "edgekidney evaluate --store-threshold"
    card.save(model)
    return sidecar_path(model)



def write_plots(folder: Path, is_positive: np.ndarray, score: np.ndarray, cal: dict) -> dict:
    """``roc.png`` and ``reliability.png`` (needs matplotlib, part of the ``train`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plots needs matplotlib: pip install matplotlib (or 'edgekidney[train]')") from None
    folder.mkdir(parents=True, exist_ok=True)
    fpr, tpr = roc_curve(is_positive, score)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], ls=":", c="gray")
    ax.set_xlabel("1 - specificity"), ax.set_ylabel("sensitivity"), ax.set_title("ROC, stone vs the rest")
    fig.tight_layout()
    fig.savefig(folder / "roc.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    bins = cal["reliability"]
    ax.bar([b["lo"] for b in bins], [b["fraction_positive"] for b in bins], width=1 / cal["bins"], align="edge",
           edgecolor="k", alpha=0.7, label="observed")
    ax.plot([0, 1], [0, 1], ls=":", c="gray", label="perfect")
    ax.set_xlabel("p(stone)"), ax.set_ylabel("fraction that are stones")
    ax.set_title(f"reliability, ECE {cal['ece']:.3f}"), ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "reliability.png", dpi=100)
    plt.close(fig)
    return {"roc": str(folder / "roc.png"), "reliability": str(folder / "reliability.png")}


def format_confounders(result: dict) -> str:
    """The confounder table with 95 % intervals, for people."""
    iv = result["intervals"]
    lines = [f"  called stone, by true class (95 % bootstrap intervals, {iv['n_resamples']} resamples):"]
    for r in result["confounders"]:
        if r["is_positive"]:
            lo, hi = iv.get("sensitivity", [float("nan")] * 2)
            what = "sensitivity"
        else:
            lo, hi = iv["called_stone_rate"].get(r["class"], [float("nan")] * 2)
            what = "called stone"
        lines.append(f"  {r['class']:<12} {r['called_stone']:>4}/{r['n']:<4} {what:<13} {r['rate']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}]  out of scope {r['out_of_scope']}")
    lo, hi = iv["auc"]
    lines.append(f"  AUC {result['at_model_threshold']['auc']:.3f} [{lo:.3f}, {hi:.3f}]; "
                 f"calibration error (ECE) {result['calibration']['ece']:.3f}")
    return "\n".join(lines)

def stale_children(model: str | Path) -> list[dict]:
    """Quantized models and engines next to ``model`` (found by parent sha256) whose threshold is now stale."""
    from edgekidney.lineage import descendants, threshold_status

    out = []
    for path, card in descendants(model):
        status = threshold_status(path, card)
        if status.stale:
            out.append({"model": str(path), "threshold": status.threshold, "message": status.message})
    return out
