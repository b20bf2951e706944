"""Classify CT slices with an exported model: files -> decode -> preprocess -> backend -> decision.

No torch: this is what runs at the scanner (CLI ``infer``, the server, the benchmarks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .data.dataset import list_files
from .data.decode import decode_slice, load_slice
from .errors import EdgeKidneyError, InputError
from .metrics import decide, softmax
from .preprocess import preprocess_batch
from .runtime import open_backend
from .sidecar import load_card


@dataclass
class Prediction:
    path: str
    probability: float  # of the positive (stone) class
    label: str
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Failure:
    path: str
    error: str


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded (recursively) to their image and DICOM files."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if p.is_dir():
            files = list_files(p)
            if not files:
                raise InputError(f"{p}: folder holds no .png, .jpg, .jpeg or DICOM files")
            out.extend(files)
        else:
            out.append(p)
    if not out:
        raise InputError("no input files given")
    return out


def default_backend_for(path: str | Path) -> str:
    return "trt" if Path(path).suffix in (".engine", ".plan", ".trt") else "ort"


class Classifier:
    """A model plus its sidecar: the thing that turns slices into decisions."""

    def __init__(self, model_path: str | Path, backend: str | None = None, threshold: float | None = None,
                 **backend_options) -> None:
        self.model_path = Path(model_path)
        self.card = load_card(self.model_path)
        self.backend_name = backend or default_backend_for(self.model_path)
        self.backend = open_backend(self.model_path, self.card, self.backend_name, **backend_options)
        self.threshold = self.card.threshold if threshold is None else float(threshold)
        self.positive = self.card.positive_index

    @property
    def preprocessing(self):
        return self.card.preprocessing

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) preprocessed batch -> (N, classes) probabilities."""
        logits = self.backend.infer(batch)
        if logits.ndim != 2 or logits.shape[1] != len(self.card.classes):
            raise EdgeKidneyError(f"model returned shape {logits.shape}; sidecar names {len(self.card.classes)} classes")
        return softmax(logits)

    def decide(self, probs: np.ndarray) -> list[tuple[float, str]]:
        labels = decide(probs, self.positive, self.threshold)
        return [(float(p[self.positive]), self.card.classes[k]) for p, k in zip(probs, labels)]

    def predict_slices(self, slices: list[np.ndarray], names: list[str]) -> list[Prediction]:
        probs = self.probabilities(preprocess_batch(slices, self.preprocessing))
        return [Prediction(n, p, lab, self.threshold) for n, (p, lab) in zip(names, self.decide(probs))]

    def predict_bytes(self, data: bytes, name: str) -> Prediction:
        return self.predict_slices([decode_slice(data, name, self.preprocessing)], [name])[0]

    def predict_files(self, paths: list[Path], batch_size: int = 8, keep_going: bool = False,
                      progress: Callable[[int], None] | None = None) -> tuple[list[Prediction], list[Failure]]:
        """Decode and classify files in batches. Without ``keep_going`` the first bad file raises."""
        preds: list[Prediction] = []
        failures: list[Failure] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            slices, names = [], []
            for p in chunk:
                try:
                    slices.append(load_slice(p, self.preprocessing))
                    names.append(str(p))
                except EdgeKidneyError as exc:
                    if not keep_going:
                        raise
                    failures.append(Failure(str(p), str(exc)))
            if slices:
                preds.extend(self.predict_slices(slices, names))
            if progress:
                progress(len(chunk))
        return preds, failures

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
