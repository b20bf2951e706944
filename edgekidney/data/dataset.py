"""Datasets: a folder of class folders, deduplicated, split by group into a manifest.

Splits never leak between train and validation:

1. Images are deduplicated by the sha256 of their bytes (the first path in sorted order is kept; an
   image found under two different classes is dropped, since its label is ambiguous).
2. Each image gets a *group*: the DICOM StudyInstanceUID/PatientID when present (shared across
   classes: a patient is never on both sides), else a block of the number in the file name
   (``Stone- (17).jpg`` -> block 0 of class Stone with blocks of 20), else its position in file order.
3. Within each stratum (a class for file-name blocks, all data for patient groups) the groups are
   ordered (by number; patients by a seeded hash) and the *last* ones go to validation (and test).
   For the Kaggle CT-kidney layout with 400 images per class and ``val_fraction=0.2`` that is
   exactly images 321-400 of each class.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgekidney.errors import InputError
from edgekidney.sidecar import sha256_of
from edgekidney.data.decode import is_candidate_file, looks_like_dicom

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "sha256", "label", "class_name", "group", "split")
_NUMBER = re.compile(r"(\d+)")


@dataclass
class Sample:
    path: Path
    label: int
    class_name: str
    sha256: str = ""
    group: str = ""
    order: tuple = ()
    split: str = ""


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    block_size: int = 20  # neighbouring file numbers are usually neighbouring slices of one patient
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise InputError("val_fraction must be in (0, 1) and test_fraction in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise InputError("val_fraction + test_fraction must leave images for training")
        if self.block_size < 1:
            raise InputError("block_size must be at least 1")


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    duplicates_dropped: int = 0
    conflicts_dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def of_split(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"--classes names a class twice: {text}")
    return names or None


def find_classes(root: Path, classes: list[str] | None = None) -> list[str]:
    """The class folders of ``root`` (sorted), or the ones named, in the order named."""
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root}: is a file; expected a folder of class folders (Normal/, Stone/, ...)")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = present
    else:
        missing = [c for c in classes if c not in present]
        if missing:
            raise InputError(f"{root}: no class folder named {', '.join(missing)} (found: {', '.join(present) or 'none'})")
    if len(classes) < 2:
        found = ", ".join(classes) if classes else "none"
        raise InputError(f"{root}: needs at least two class folders to train or evaluate (found: {found})")
    return list(classes)


def list_files(folder: Path) -> list[Path]:
    """Image and DICOM files below ``folder`` (recursively, DICOM series often nest), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_candidate_file(p))


def expand_paths(paths, list_folder=list_files,
                 empty: str = "folder holds no .png, .jpg, .jpeg or DICOM files") -> list[Path]:
    """Files as given, folders expanded with ``list_folder``; a missing path or an empty folder is an error."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if p.is_dir():
            files = list_folder(p)
            if not files:
                raise InputError(f"{p}: {empty}")
            out.extend(files)
        elif not p.is_file():  # a FIFO, a device: reading it would block or never end
            raise InputError(f"{p}: not a regular file")
        else:
            out.append(p)
    if not out:
        raise InputError("no input files given")
    return out


def positive_class_index(classes: list[str], positive: str | None = None) -> int:
    """Index of the positive class: the one named, else the one named like "stone", else the last."""
    if positive is not None:
        if positive not in classes:
            raise InputError(f"positive class {positive!r} is not one of {', '.join(classes)}")
        return classes.index(positive)
    for i, name in enumerate(classes):
        if "stone" in name.lower():
            return i
    return len(classes) - 1


def discover(root: str | Path, classes: list[str] | None = None) -> Dataset:
    """List, hash and deduplicate the images of a dataset folder (no split yet)."""
    root = Path(root)
    classes = find_classes(root, classes)
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = list_files(root / name)
        if not files:
            raise InputError(f"{root / name}: class folder holds no .png, .jpg, .jpeg or DICOM files")
        samples.extend(Sample(path=p, label=label, class_name=name) for p in files)
    for s in samples:
        s.sha256 = sha256_of(s.path)

    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_hash[s.sha256].append(s)
    kept: list[Sample] = []
    dup = conflicts = 0
    for group in by_hash.values():
        if len({s.label for s in group}) > 1:
            conflicts += len(group)
            continue
        kept.append(group[0])
        dup += len(group) - 1
    kept.sort(key=lambda s: (s.label, str(s.path)))
    ds = Dataset(root=root, classes=classes, samples=kept, duplicates_dropped=dup, conflicts_dropped=conflicts)
    if dup:
        ds.notes.append(f"dropped {dup} byte-identical duplicate image(s)")
    if conflicts:
        ds.notes.append(f"dropped {conflicts} image(s) that appear under two classes")
    return ds


def _dicom_group(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception:
        return None
    patient = str(ds.get("PatientID", "") or "").strip()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if patient:
        return f"patient:{hashlib.sha256(patient.encode()).hexdigest()[:16]}"  # no identifier in the manifest
    if study:
        return f"study:{hashlib.sha256(study.encode()).hexdigest()[:16]}"
    return None


def assign_groups(ds: Dataset, cfg: SplitConfig) -> None:
    """Give every sample a group id and an ordering key (see the module docstring)."""
    for index, s in enumerate(ds.samples):
        group = _dicom_group(s.path) if looks_like_dicom(s.path) else None
        if group is not None:
            digest = hashlib.sha256(f"{cfg.seed}:{group}".encode()).hexdigest()
            s.group, s.order = group, ("all", 0, digest)
            continue
        numbers = _NUMBER.findall(s.path.stem)
        if numbers:
            block = max(int(numbers[-1]) - 1, 0) // cfg.block_size  # file numbers start at 1
            s.group, s.order = f"{s.class_name}/block{block}", (s.class_name, 1, block)
        else:
            block = index // cfg.block_size
            s.group, s.order = f"{s.class_name}/order{block}", (s.class_name, 2, block)


def split_dataset(ds: Dataset, cfg: SplitConfig) -> Dataset:
    """Assign every sample to train/val/test by group, the last groups of each stratum held out."""
    assign_groups(ds, cfg)
    strata: dict[str, dict[str, tuple]] = defaultdict(dict)
    for s in ds.samples:
        strata[s.order[0]][s.group] = s.order
    split_of: dict[str, str] = {}
    for groups in strata.values():
        ordered = sorted(groups, key=lambda g: groups[g])
        n = len(ordered)
        n_test = math.ceil(n * cfg.test_fraction) if cfg.test_fraction > 0 else 0
        n_val = max(1, math.ceil(n * cfg.val_fraction)) if n > 1 else 0
        n_train = n - n_val - n_test
        for i, g in enumerate(ordered):
            split_of[g] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    for s in ds.samples:
        s.split = split_of[s.group]
    for split in ("train", "val"):
        present = {s.label for s in ds.samples if s.split == split}
        if len(present) < len(ds.classes):
            missing = [c for i, c in enumerate(ds.classes) if i not in present]
            raise InputError(
                f"{ds.root}: the {split} split has no images of {', '.join(missing)}; add images or lower --block-size"
            )
    return ds


def write_manifest(samples: list[Sample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for s in samples:
            w.writerow({"path": str(s.path.resolve()), "sha256": s.sha256, "label": s.label,
                        "class_name": s.class_name, "group": s.group, "split": s.split})


def read_manifest(path: Path) -> list[Sample]:
    if not path.exists():
        raise InputError(f"{path}: no such manifest")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or set(MANIFEST_FIELDS) - set(rows[0]):
        raise InputError(f"{path}: not a split manifest (expected columns {', '.join(MANIFEST_FIELDS)})")
    return [Sample(path=Path(r["path"]), label=int(r["label"]), class_name=r["class_name"], sha256=r["sha256"],
                   group=r["group"], split=r["split"]) for r in rows]
