"""Where a model's training data came from, and a warning when it meets data unlike them.

Training records a ``data`` block in the checkpoint (and ``metrics.json``); export, quantize and
build-engine copy it into every sidecar. It holds the folder, a content hash of the images used
(sha256 over the sorted ``class:sha256`` lines, so it survives moving the folder), whether the
images are edgekidney's synthetic phantoms, the classes and the image counts per split and class.

A model trained on phantoms says nothing about real CT (the demo's model scores AUC 0.32 on the real
slices); :func:`mismatch_warning` says so before its numbers are read. No torch here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from edgekidney.data.decode import looks_like_dicom

SYNTHETIC_MARK = "SYNTHETIC"
MAX_FILES_CHECKED = 200  # headers of evenly spaced files; enough to tell phantoms from scans


def is_synthetic_file(path: str | Path) -> bool:
    """True for the DICOM phantoms of ``edgekidney synth`` (ImageComments say SYNTHETIC)."""
    path = Path(path)
    if not looks_like_dicom(path):
        return False  # synth writes DICOM only
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["ImageComments"])
    except Exception:
        return False
    return SYNTHETIC_MARK in str(ds.get("ImageComments", "") or "")


def content_sha256(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over sorted ``class:sha256`` lines of the images used."""
    text = "".join(f"{c}:{h}\n" for c, h in sorted(pairs))
    return hashlib.sha256(text.encode()).hexdigest()


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def data_provenance(root: str | Path, classes: list[str], samples: list) -> dict:
    """The ``data`` block of a run: ``samples`` carry path, class_name, sha256 and split."""
    checked = _spread([s.path for s in samples], MAX_FILES_CHECKED)
    n_synthetic = sum(is_synthetic_file(p) for p in checked)
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        split = counts.setdefault(s.split or "all", {c: 0 for c in classes})
        split[s.class_name] = split.get(s.class_name, 0) + 1
    return {"folder": str(Path(root).resolve()),
            "content_sha256": content_sha256((s.class_name, s.sha256) for s in samples),
            "synthetic": bool(checked) and n_synthetic == len(checked),
            "synthetic_files_checked": f"{n_synthetic}/{len(checked)}",
            "classes": list(classes), "counts": counts}


def mismatch_warning(model_data: dict | None, paths: list[str | Path]) -> str | None:
    """A one-line warning when inputs are unlike the model's training data, else None."""
    if not model_data or not paths:
        return None
    checked = _spread(list(paths), MAX_FILES_CHECKED)
    n_synthetic = sum(is_synthetic_file(p) for p in checked)
    n = len(checked)
    if model_data.get("synthetic") and n_synthetic < n:
        return (f"this model was trained on synthetic phantoms (edgekidney synth/demo), but {n - n_synthetic} of "
                f"{n} input(s) checked are not synthetic: its outputs on real CT mean nothing; "
                "train on real labelled slices (README: 'Real data')")
    if model_data.get("synthetic") is False and n_synthetic:
        return (f"{n_synthetic} of {n} input(s) checked are edgekidney's synthetic phantoms, but this model was "
                "trained on real slices: its outputs on them say nothing about real CT")
    return None
