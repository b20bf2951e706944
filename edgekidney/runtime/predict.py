"""Classify CT slices with an exported model: files -> decode -> preprocess -> backend -> decision.

No torch: this is what runs at the scanner (CLI ``infer``, the server, the benchmarks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgekidney.data.anatomy import anatomy_reason, shown
from edgekidney.data.dataset import expand_paths
from edgekidney.data.decode import decode_slice, load_slice
from edgekidney.errors import EdgeKidneyError, InputError
from edgekidney.metrics import decide, softmax
from edgekidney.data.preprocess import NO_BODY_REASON, preprocess_batch_with_geometry
from edgekidney.runtime.cam import peak_of
from edgekidney.scope import OUT_OF_SCOPE
from edgekidney.runtime import backend_for, open_backend
from edgekidney.sidecar import load_card


@dataclass
class Prediction:
    path: str
    probability: float  # of the positive (stone) class
    label: str  # a class name, or "out_of_scope" (then no stone call is made)
    threshold: float
    in_scope: bool | None = None  # None: the model carries no out-of-scope detector
    scope_distance: float | None = None
    scope_threshold: float | None = None
    scope_reason: str | None = None  # why a slice is out of scope
    cam: np.ndarray | None = field(default=None, repr=False, compare=False)  # on the original slice's grid
    cam_peak: tuple[int, int] | None = None  # (row, col) of the map's maximum within the body, on the original slice
    # an axial DICOM slice measured in HU (data/anatomy.py); None elsewhere
    lung_share: float | None = None
    skull_share: float | None = None
    split_share: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cam")
        if d["cam_peak"] is not None:
            d["cam_peak"] = list(d["cam_peak"])
        return d


@dataclass
class BatchResult:
    """What one forward pass says about a batch of slices (see :func:`classify_batch`)."""

    logits: np.ndarray  # (N, classes)
    probs: np.ndarray
    labels: list[str]
    in_scope: np.ndarray | None  # (N,) bool, None without a detector
    distances: np.ndarray | None
    reasons: list[str | None]
    cams: list[np.ndarray | None]  # on each original slice, when asked for
    geometries: list
    peaks: list[tuple[int, int] | None] = field(default_factory=list)  # map maximum within the body, on the slice

    def predictions(self, names: list[str], card, threshold: float) -> list["Prediction"]:
        """One :class:`Prediction` per slice, named as given."""
        pos, thr = card.positive_index, card.scope_threshold
        return [Prediction(
            str(name), float(self.probs[i, pos]), self.labels[i], threshold,
            in_scope=None if self.in_scope is None else bool(self.in_scope[i]),
            scope_distance=None if self.distances is None else float(self.distances[i]),
            scope_threshold=thr, scope_reason=self.reasons[i], cam=self.cams[i],
            cam_peak=self.peaks[i] if self.peaks else None,
            **anatomy_shares(self.geometries[i] if self.geometries else None))
            for i, name in enumerate(names)]


def anatomy_shares(geometry) -> dict:
    """``lung_share``, ``skull_share``, ``split_share`` of an axial DICOM slice measured in HU (a slice's
    preprocessing geometry carries them); {} for any other slice."""
    anatomy = getattr(geometry, "anatomy", None)
    if anatomy is None:
        return {}
    lung, skull, split = (shown(v) for v in anatomy)
    return {"lung_share": lung, "skull_share": skull, "split_share": split}


@dataclass
class Failure:
    path: str
    error: str


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded (recursively) to their image and DICOM files."""
    return expand_paths(paths)


def scope_of(card, distances: np.ndarray | None, geometries: list) -> tuple[np.ndarray | None, list[str | None]]:
    """Which slices lie within what the model was trained on, and why not.

    A slice in which no patient outline is found (blank, nearly empty) is out of scope whatever the
    network says; otherwise the model's own feature distance decides (threshold in the sidecar), and a
    slice it keeps is still out of scope when its HU showed lungs or a skull (an axial DICOM slice:
    ``Geometry.anatomy``, data/anatomy.py).
    """
    reasons: list[str | None] = [None] * len(geometries)
    thr = card.scope_threshold
    if thr is None or distances is None:
        return None, reasons
    inside = np.asarray(distances, dtype=np.float64) <= thr
    inside &= np.isfinite(distances)
    for i, (ok, g) in enumerate(zip(inside, geometries)):
        if card.preprocessing.body_crop and not g.body_found:
            inside[i] = False
            reasons[i] = NO_BODY_REASON
        elif not ok:
            reasons[i] = f"unlike the training slices (feature distance {float(distances[i]):.3g} > {thr:.3g})"
        elif (why := anatomy_reason(getattr(g, "anatomy", None))) is not None:
            inside[i] = False
            reasons[i] = why
    return inside, reasons


def checked_logits(card, logits: np.ndarray) -> np.ndarray:
    if logits.ndim != 2 or logits.shape[1] != len(card.classes):
        raise EdgeKidneyError(f"model returned shape {logits.shape}; sidecar names {len(card.classes)} classes")
    return logits


def classify_batch(predictor, slices: list[np.ndarray], want_cam: bool = False) -> BatchResult:
    """Preprocess (the shared implementation), run the model, decide, and say what is out of scope.

    ``predictor`` is anything with ``card``, ``threshold`` and ``infer_outputs`` (a :class:`Classifier`,
    or the PyTorch predictor of a checkpoint).
    """
    x, geometries = preprocess_batch_with_geometry(slices, predictor.card.preprocessing)
    return decide_outputs(predictor.card, predictor.threshold, predictor.infer_outputs(x), geometries, want_cam, x)


def body_on_grid(x: np.ndarray, card) -> np.ndarray:
    """(N, S, S) bool: the network-grid pixels that are body (above the body threshold), from the input batch."""
    pre = card.preprocessing
    return (x[:, 0] * np.float32(pre.std[0]) + np.float32(pre.mean[0])) > pre.body_threshold


def peak_on_slice(grid_map: np.ndarray, geometry, body: np.ndarray | None = None) -> tuple[int, int]:
    """The map's maximum within the body, as (row, col) on the original slice.

    The maximum is taken on the network grid (where the map was computed), over body pixels when any
    are given, then carried through the crop, padding and resize back onto the slice.
    """
    m = np.asarray(grid_map, dtype=np.float32)
    if body is not None and body.shape == m.shape and body.any():
        m = np.where(body, m, -np.inf)
    r, c = peak_of(m)
    row, col = geometry.to_input(r, c)
    h, w = geometry.shape
    return int(np.clip(round(row), 0, h - 1)), int(np.clip(round(col), 0, w - 1))


def decide_outputs(card, threshold: float, outs: dict[str, np.ndarray], geometries: list,
                   want_cam: bool = False, x: np.ndarray | None = None) -> BatchResult:
    """The model's outputs for a batch -> labels (out of scope included), where each map peaks within the
    body (``cam_peak``, on the original slice; whenever the model has a map) and, when asked, the maps."""
    logits = checked_logits(card, outs["logits"])
    probs = softmax(logits)
    distances = outs.get("scope_distance")
    in_scope, reasons = scope_of(card, distances, geometries)
    labels = [card.classes[k] for k in decide(probs, card.positive_index, threshold)]
    if in_scope is not None:
        labels = [lab if ok else OUT_OF_SCOPE for lab, ok in zip(labels, in_scope)]
    cams: list[np.ndarray | None] = [None] * len(geometries)
    peaks: list[tuple[int, int] | None] = [None] * len(geometries)
    if "cam" in outs:
        bodies = body_on_grid(x, card) if x is not None else [None] * len(geometries)
        peaks = [peak_on_slice(c, g, b) for c, g, b in zip(outs["cam"], geometries, bodies)]
        if want_cam:
            cams = [g.map_to_input(c) for g, c in zip(geometries, outs["cam"])]
    return BatchResult(logits, probs, labels, in_scope, distances, reasons, cams, geometries, peaks)


def default_backend_for(path: str | Path) -> str:
    """The backend the artifact's sidecar asks for (an engine: trt; an ONNX model: ort)."""
    return backend_for(load_card(path, verify_hash=False))


class Classifier:
    """A model plus its sidecar: the thing that turns slices into decisions."""

    def __init__(self, model_path: str | Path, backend: str | None = None, threshold: float | None = None,
                 **backend_options) -> None:
        self.model_path = Path(model_path)
        self.card = load_card(self.model_path)
        self.backend_name = backend or backend_for(self.card)  # options are checked by open_backend
        self.backend = open_backend(self.model_path, self.card, self.backend_name, **backend_options)
        self.threshold = self.card.threshold if threshold is None else float(threshold)
        self.positive = self.card.positive_index

    @property
    def preprocessing(self):
        return self.card.preprocessing

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) preprocessed batch -> every model output by name."""
        return self.backend.infer_outputs(batch)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) preprocessed batch -> (N, classes) probabilities."""
        return softmax(checked_logits(self.card, self.backend.infer(batch)))

    def predict_slices(self, slices: list[np.ndarray], names: list[str], want_cam: bool = False) -> list[Prediction]:
        x, geometries = preprocess_batch_with_geometry(slices, self.card.preprocessing)
        return self.predict_preprocessed(x, geometries, names, want_cam)

    def predict_preprocessed(self, x: np.ndarray, geometries: list, names: list[str],
                             want_cam: bool = False) -> list[Prediction]:
        """The half of :meth:`predict_slices` after preprocessing, for callers that preprocess in
        another thread (the study pipeline): ``x, geometries = preprocess_batch_with_geometry(...)``."""
        r = decide_outputs(self.card, self.threshold, self.infer_outputs(x), geometries, want_cam, x)
        return r.predictions(names, self.card, self.threshold)

    def predict_bytes(self, data: bytes, name: str, want_cam: bool = False) -> Prediction:
        return self.predict_slices([decode_slice(data, name, self.preprocessing)], [name], want_cam)[0]

    def predict_files(self, paths: list[Path], batch_size: int = 8, keep_going: bool = False,
                      progress: Callable[[int], None] | None = None, want_cam: bool = False,
                      ) -> tuple[list[Prediction], list[Failure]]:
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
                preds.extend(self.predict_slices(slices, names, want_cam))
            if progress:
                progress(len(chunk))
        return preds, failures

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_cams(preds: list[Prediction], folder: Path, card, everything: bool = False) -> list[Path]:
    """PNG overlays of the activation map: for slices called stone, or every slice with ``everything``."""
    from edgekidney.runtime.cam import write_overlay

    folder = Path(folder)
    written = []
    for i, p in enumerate(preds):
        if p.cam is None or not (everything or p.label == card.positive_class):
            continue
        gray = load_slice(p.path, card.preprocessing)
        name = f"{i:05d}-{Path(p.path).stem}.png"
        written.append(write_overlay(folder / name, gray, p.cam, p.cam_peak))
    return written
