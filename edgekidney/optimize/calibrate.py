"""Calibration sets for INT8: N slices from the *training* split, stratified by class.

Works from artifacts, without torch: the FP32 ``model.onnx`` (its sidecar holds the classes and the
preprocessing) plus the split manifest it was trained with (``RUN/split.csv``; by default the one
the sidecar names). When the sidecar records the manifest's sha256 (``extra.split_manifest_sha256``,
written by ``export``), a manifest with other bytes is refused; the check says what it compared.

A calibration set is a folder (by convention ``calibration/NAME``) holding:

- ``manifest.csv``: path, sha256, label, class_name of every chosen slice;
- ``tensors.npy``: the preprocessed inputs, (N, 3, S, S) float32, made by the same
  :func:`edgekidney.data.preprocess.preprocess` the runtime uses (byte-identical for the same files);
- ``calibration.json``: preprocessing, counts per class, seed, the model's and both manifests' sha256.

Validation and test images are never chosen: calibrating on them would leak the data the accuracy
gates are measured on.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekidney.data.arrays import load_arrays
from edgekidney.data.dataset import Sample, discover, read_manifest
from edgekidney.errors import InputError, ModelError
from edgekidney.data.preprocess import Preprocessing
from edgekidney.sidecar import ModelCard, load_card, sha256_of

CAL_FIELDS = ("path", "sha256", "label", "class_name")


@dataclass
class CalibrationSet:
    folder: Path
    tensors: np.ndarray
    samples: list[Sample]
    info: dict

    @property
    def manifest_sha256(self) -> str:
        return self.info["manifest_sha256"]


def split_hashes(manifest: Path) -> dict[str, str]:
    """sha256 -> split for every slice of a split manifest."""
    return {s.sha256: s.split for s in read_manifest(manifest)}


def resolve_split_manifest(model: Path, card: ModelCard, manifest: str | Path | None) -> tuple[Path, str, str]:
    """-> (manifest, its sha256, what was compared). Refuses a manifest the model was not trained with."""
    recorded_path = card.extra.get("split_manifest")
    recorded_hash = card.extra.get("split_manifest_sha256")
    if manifest is None:
        if not recorded_path:
            raise InputError(f"{model}: its sidecar names no split manifest; pass --manifest RUN/split.csv")
        manifest = Path(recorded_path)
        if not manifest.exists():
            raise InputError(f"{model}: the split manifest it was trained with ({manifest}) is not there; "
                             "pass --manifest PATH to a copy")
    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / "split.csv"
    if not manifest.exists():
        raise InputError(f"{manifest}: no such split manifest")
    digest = sha256_of(manifest)
    if recorded_hash and digest != recorded_hash:
        raise InputError(f"{manifest}: sha256 {digest[:12]} differs from the split manifest {model.name} was trained "
                         f"with ({recorded_hash[:12]}); calibrating from another split may use validation images")
    compared = (f"split manifest sha256 {digest[:12]} matches the one recorded in {model.name}'s sidecar"
                if recorded_hash else f"{model.name}'s sidecar records no split manifest sha256: not compared")
    return manifest, digest, compared


def choose(eligible: list[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` samples, stratified: each class gets its share of ``n`` (proportional, at least 1)."""
    by_class: dict[int, list[Sample]] = {}
    for s in eligible:
        by_class.setdefault(s.label, []).append(s)
    if len(by_class) < 2:
        names = sorted({s.class_name for s in eligible})
        raise InputError(f"calibration needs slices of at least two classes; the training split offers only {names}")
    if n > len(eligible):
        raise InputError(f"asked for {n} calibration slices but the training split offers only {len(eligible)}")
    rng = np.random.default_rng(seed)
    total = len(eligible)
    quota = {k: max(1, round(n * len(v) / total)) for k, v in by_class.items()}
    while sum(quota.values()) > n:  # rounding: take back from the largest
        quota[max(quota, key=quota.get)] -= 1
    while sum(quota.values()) < n:
        k = max(by_class, key=lambda c: len(by_class[c]) - quota[c])
        quota[k] += 1
    picked: list[Sample] = []
    for k in sorted(by_class):
        items = sorted(by_class[k], key=lambda s: s.sha256)
        idx = rng.choice(len(items), size=quota[k], replace=False)
        picked.extend(items[i] for i in sorted(idx))
    return picked


def make_calibration_set(data: str | Path, model: str | Path, out: str | Path, manifest: str | Path | None = None,
                         n: int = 256, seed: int = 0,
                         progress: Callable[[int], None] | None = None) -> CalibrationSet:
    """N training slices of ``data`` for the FP32 ONNX ``model``, chosen with its split ``manifest``."""
    data, model, out = Path(data), Path(model), Path(out)
    if not data.is_dir():  # DATA comes first on the command line: report it first
        raise InputError(f"{data}: no such folder" if not data.exists() else f"{data}: is a file, not a dataset folder")
    card = load_card(model)
    if card.kind != "onnx" or card.precision != "fp32":
        raise ModelError(f"{model}: calibrate takes the FP32 ONNX model (this is {card.precision} {card.kind})")
    manifest, manifest_sha, compared = resolve_split_manifest(model, card, manifest)
    splits = split_hashes(manifest)
    ds = discover(data, [c for c in card.classes if (data / c).is_dir()] or None)
    unknown_classes = [c for c in ds.classes if c not in card.classes]
    if unknown_classes:
        raise InputError(f"{data}: classes {', '.join(unknown_classes)} are unknown to the model ({', '.join(card.classes)})")
    eligible, held_out = [], 0
    for s in ds.samples:
        where = splits.get(s.sha256)
        if where == "train":
            s.label = card.classes.index(s.class_name)
            eligible.append(s)
        elif where in ("val", "test"):
            held_out += 1
    if not eligible:
        raise InputError(f"{data}: none of its slices are in the training split of {manifest}")
    picked = choose(eligible, n, seed)
    pre = card.preprocessing
    tensors = load_arrays(picked, pre, progress)  # the shared decode + preprocess, as training uses it
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CAL_FIELDS)
        w.writeheader()
        for s in picked:
            w.writerow({"path": str(s.path.resolve()), "sha256": s.sha256, "label": s.label, "class_name": s.class_name})
    np.save(out / "tensors.npy", tensors)
    counts = {c: sum(s.class_name == c for s in picked) for c in card.classes}
    info = {"format": "edgekidney.calibration/2", "n": len(picked), "per_class": counts, "seed": seed,
            "model_sha256": card.sha256, "split_manifest": str(manifest.resolve()),
            "split_manifest_sha256": manifest_sha, "split_manifest_check": compared,
            "data": str(data.resolve()), "preprocessing": pre.to_dict(),
            "manifest_sha256": sha256_of(out / "manifest.csv"), "held_out_images_skipped": held_out,
            "eligible_training_images": len(eligible)}
    (out / "calibration.json").write_text(json.dumps(info, indent=2) + "\n")
    return CalibrationSet(out, tensors, picked, info)


def load_calibration_set(folder: str | Path) -> CalibrationSet:
    folder = Path(folder)
    for name in ("manifest.csv", "tensors.npy", "calibration.json"):
        if not (folder / name).exists():
            raise InputError(f"{folder}: not a calibration set ({name} missing); make one with 'edgekidney calibrate'")
    info = json.loads((folder / "calibration.json").read_text())
    if sha256_of(folder / "manifest.csv") != info.get("manifest_sha256"):
        raise InputError(f"{folder}: manifest.csv does not match calibration.json (edited by hand?)")
    with open(folder / "manifest.csv", newline="") as fh:
        samples = [Sample(path=Path(r["path"]), label=int(r["label"]), class_name=r["class_name"], sha256=r["sha256"])
                   for r in csv.DictReader(fh)]
    tensors = np.load(folder / "tensors.npy", mmap_mode="r")
    if tensors.ndim != 4 or tensors.shape[0] != len(samples):
        raise InputError(f"{folder}: tensors.npy has shape {tensors.shape} for {len(samples)} manifest rows")
    return CalibrationSet(folder, tensors, samples, info)


def check_against_model(cal: CalibrationSet, card: ModelCard, where: str = "the model") -> list[str]:
    """Refuse a calibration set that does not fit the model or that contains held-out images.

    Lineage by sha256: the calibration set records the split manifest it was drawn from; the model's
    sidecar records the one it was trained with. -> the checks made, in words (for the child's sidecar).
    """
    pre = card.preprocessing
    s = pre.image_size
    if tuple(cal.tensors.shape[1:]) != (3, s, s):
        raise InputError(f"{cal.folder}: calibration tensors are {tuple(cal.tensors.shape[1:])}, the model takes (3, {s}, {s})")
    if Preprocessing.from_dict(cal.info.get("preprocessing", {})) != pre:
        raise InputError(f"{cal.folder}: calibration was preprocessed differently from the model (see calibration.json)")
    if len({x.class_name for x in cal.samples}) < 2:
        raise InputError(f"{cal.folder}: calibration set holds one class only; it needs both")
    checks = []
    model_split = card.extra.get("split_manifest_sha256")
    cal_split = cal.info.get("split_manifest_sha256")
    if model_split and cal_split and model_split != cal_split:
        raise InputError(f"{cal.folder}: drawn from split manifest sha256 {cal_split[:12]}, but {where} was trained "
                         f"with {model_split[:12]}; its slices may be this model's validation images")
    if model_split and cal_split:
        checks.append(f"split manifest: calibration and model both sha256 {model_split[:12]}")
    else:
        missing = "model's sidecar" if not model_split else "calibration set"
        checks.append(f"split manifest: not compared (the {missing} records no sha256)")
    manifest = Path(cal.info.get("split_manifest", ""))
    if cal_split and manifest.is_file() and sha256_of(manifest) == cal_split:
        splits = split_hashes(manifest)
        leaked = [x for x in cal.samples if splits.get(x.sha256) in ("val", "test")]
        if leaked:
            raise InputError(f"{cal.folder}: {len(leaked)} calibration slice(s) are validation/test images of the run "
                             f"(e.g. {leaked[0].path.name}); calibrate on the training split only")
        checks.append(f"slices: all {len(cal.samples)} are training slices of split manifest {cal_split[:12]}")
    else:
        checks.append("slices: not re-checked (the split manifest file is not at its recorded path with that sha256)")
    return checks
