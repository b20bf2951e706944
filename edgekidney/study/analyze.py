"""A whole study in, one answer per series out.

For each series (see :mod:`edgekidney.data.series` and :mod:`edgekidney.data.volume`): slices are
decoded, windowed and preprocessed in a producer thread while the model works on the previous batch
(a bounded queue of ``2 x batch_size`` slices: memory holds only the slices in flight), then the
:mod:`edgekidney.study.rule` turns the per-slice probabilities, in position order, into
``stone | no_stone | not_assessable`` with the supporting slice ranges and the peak slice.

No torch on this path: it runs at the scanner.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from edgekidney import __version__
from edgekidney.released import model_name
from edgekidney.data.series import Series, Skipped, read_series
from edgekidney.errors import DependencyError, InputError
from edgekidney.data.preprocess import NO_BODY_REASON, preprocess_batch_with_geometry, window_hu
from edgekidney.data.anatomy import measure, ruling, shown
from edgekidney.study.planes import CoronalReformat, check_plane
from edgekidney.study.rule import FOCUS_RADIUS_MM, StudyRule, decide, holes, rule_threshold

OUT_OF_SCOPE = "out_of_scope"  # the label edgekidney.scope gives a slice the model should not judge
UNREADABLE = "unreadable"  # the label of a series' slice whose file could not be read: not judged
# what the warning on a series judged on few slices says of each region (data.anatomy.region)
_ANATOMY_WHY = (("chest", "for their lung fields"), ("head", "for a skull"), ("legs", "for two legs"))


@dataclass
class SliceRecord:
    index: int
    position_mm: float
    probability: float
    label: str  # a class name, "out_of_scope", or "unreadable" (its file could not be read; scope_reason says why)
    in_scope: bool = True  # true also when the model has no out-of-scope detector
    scope_distance: float | None = None  # the model's feature distance (scope threshold in the sidecar)
    scope_reason: str | None = None  # why the slice is out of scope
    cam_peak: list[int] | None = None  # [row, col] of the stone map's maximum within the body, on the slice
    # the densest HU within FOCUS_RADIUS_MM of cam_peak, on in-scope slices at or above the threshold
    # (axial slices with HU; None elsewhere): a calculus is dense, soft tissue is not (study.rule)
    focus_hu: float | None = None
    source: str | None = None  # the file (and frame) it was read from: only with keep_identifiers, DICOM slices
    instance: int | None = None  # its InstanceNumber, the image number a PACS viewer shows (DICOM, as acquired)
    lung_share: float | None = None  # of the body's cross-section (data.anatomy); axial slices with HU only
    skull_share: float | None = None  # of the body's cross-section inside a ring of bone (data.anatomy); the same
    split_share: float | None = None  # the smaller of the body's two largest parts, of both (data.anatomy); the same


@dataclass
class SliceRange:
    start: int
    end: int
    start_mm: float
    end_mm: float
    n_slices: int
    max_probability: float
    start_instance: int | None = None  # the InstanceNumbers of its first and last slice (DICOM, as acquired)
    end_instance: int | None = None


@dataclass
class SeriesResult:
    series_id: str  # sha256-based, safe to store
    kind: str  # dicom | nifti
    description: str
    n_slices: int
    plane: str  # the plane that was classified
    acquired_plane: str
    decision: str  # stone | no_stone | not_assessable
    reason: str
    threshold: float | None
    supporting: list[SliceRange] = field(default_factory=list)
    peak: SliceRecord | None = None
    slices: list[SliceRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rule: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    series_uid: str | None = None  # only with keep_identifiers
    spacing_mm: float | None = None  # between the classified slices (median)

    @property
    def probability(self) -> float | None:
        """The series' score: the peak slice's probability (of the best supporting run for a stone)."""
        return None if self.peak is None else self.peak.probability

    def to_dict(self) -> dict:
        d = asdict(self)
        d["probability"] = self.probability
        return d


@dataclass
class StudyResult:
    series: list[SeriesResult]
    skipped: list[Skipped]

    def to_dict(self) -> dict:
        return {"series": [s.to_dict() for s in self.series],
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped]}


def model_info(classifier) -> dict:
    card = classifier.card
    extra = getattr(card, "extra", None) or {}
    planes = extra.get("planes") or []
    plane = extra.get("plane") or (extra.get("training") or {}).get("plane") or (planes[0] if planes else None)
    return {"name": model_name(Path(str(getattr(classifier, "model_path", "model")))),
            "sha256": getattr(card, "sha256", ""),
            "precision": getattr(card, "precision", ""), "edgekidney_version": __version__,
            "threshold": float(classifier.threshold), "plane": plane or "axial", "plane_recorded": bool(plane),
            "planes": list(planes) or [plane or "axial"]}


# -- the overlapped pipeline ------------------------------------------------------------------------
_DONE = object()


@dataclass(frozen=True)
class Unreadable:
    """What :func:`classify_stream` returns in the place of a slice its source could not read."""

    reason: str


def classify_stream(classifier, slices: Iterator[np.ndarray], names: list[str], batch_size: int = 8,
                    timings: dict | None = None) -> list:
    """Classify a stream of 0..1 slices while the next ones are decoded and preprocessed in a thread.

    With an :class:`edgekidney.runtime.predict.Classifier` (it has ``predict_preprocessed``) the producer
    thread decodes *and* preprocesses, and this thread only runs the model; with any other
    classifier the producer decodes and ``predict_slices`` does the rest. At most
    ``2 x batch_size`` produced slices wait in the queue. ``timings`` receives ``decode_s`` and
    ``preprocess_s`` (wall time the producer spent on each; on a busy machine that includes waiting
    for a core), ``decode_cpu_s`` and ``preprocess_cpu_s`` (the producer thread's CPU time),
    ``classify_s`` (here: inference and decision, plus preprocessing for other classifiers) and
    ``wait_s`` (this thread idle, waiting for slices).
    """
    timings = {} if timings is None else timings
    split = callable(getattr(classifier, "predict_preprocessed", None))
    config = classifier.card.preprocessing if split else None
    q: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    stop = threading.Event()
    busy = dict.fromkeys(("decode_s", "preprocess_s", "decode_cpu_s", "preprocess_cpu_s"), 0.0)

    def produce() -> None:
        try:
            it = iter(slices)
            while not stop.is_set():
                t, c = time.perf_counter(), time.thread_time()
                try:
                    s = next(it)
                except StopIteration:
                    break
                t1, c1 = time.perf_counter(), time.thread_time()
                busy["decode_s"] += t1 - t
                busy["decode_cpu_s"] += c1 - c
                if isinstance(s, InputError):  # the source could not read this slice and went on
                    q.put(Unreadable(str(s)))
                    continue
                if split:
                    x, geometry = preprocess_batch_with_geometry([s], config)
                    s = (x[0], geometry[0])
                    busy["preprocess_s"] += time.perf_counter() - t1
                    busy["preprocess_cpu_s"] += time.thread_time() - c1
                q.put(s)
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(exc)

    def run(batch: list, batch_names: list[str]) -> list:
        if split:
            return classifier.predict_preprocessed(np.stack([b[0] for b in batch]), [b[1] for b in batch],
                                                   batch_names)
        return classifier.predict_slices(batch, batch_names)

    worker = threading.Thread(target=produce, name="edgekidney-decode", daemon=True)
    worker.start()
    preds: list = []
    batch: list = []
    classify_s = wait_s = 0.0
    try:
        while True:
            t = time.perf_counter()
            item = q.get()
            wait_s += time.perf_counter() - t
            if isinstance(item, BaseException):
                raise item
            if item is not _DONE and not isinstance(item, Unreadable):
                batch.append(item)
            if batch and (len(batch) == batch_size or item is _DONE or isinstance(item, Unreadable)):
                t = time.perf_counter()
                preds.extend(run(batch, names[len(preds):len(preds) + len(batch)]))
                classify_s += time.perf_counter() - t
                batch = []
            if isinstance(item, Unreadable):
                preds.append(item)  # after the slices before it: the order is kept
            if item is _DONE:
                break
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.01)
    timings.update(busy, classify_s=classify_s, wait_s=wait_s)
    return preds


def slice_in_scope(pred) -> bool:
    """In scope unless the model says otherwise (``in_scope`` None: the model has no detector)."""
    flag = getattr(pred, "in_scope", None)
    return pred.label != OUT_OF_SCOPE and (flag is None or bool(flag))


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _windowed(series: Series, center: float, width: float, keep_going: bool = False,
              anatomy: list | None = None) -> Iterator[np.ndarray | InputError]:
    """The series' slices windowed to 0..1; with ``keep_going`` an unreadable slice comes as its error.
    ``anatomy``, when given, receives each slice's (lung, skull, split share)
    (:func:`edgekidney.data.anatomy.measure`; None for an unreadable slice), measured on the HU."""
    for hu in (series.hu_slices_or_errors() if keep_going else series.hu_slices()):
        if anatomy is not None:
            anatomy.append(None if isinstance(hu, InputError) else measure(hu))
        yield hu if isinstance(hu, InputError) else window_hu(hu, center, width)


def mark_anatomy_out_of_scope(slices: list[SliceRecord], anatomy: list) -> list[str | None]:
    """Put the slices whose lungs, skull or legs show a chest, a head or the legs out of scope
    (docs/scope.md, "Chest slices"); returns per slice "chest", "head", "legs" or None
    (:func:`edgekidney.data.anatomy.ruling`), whether or not the model had kept it. Unreadable slices
    stay unreadable."""
    kinds: list[str | None] = [None] * len(slices)
    for k, (record, shares) in enumerate(zip(slices, anatomy)):
        if shares is None:
            continue
        record.lung_share, record.skull_share, record.split_share = (shown(v) for v in shares)
        kind, why = ruling(shares)
        if why is not None and record.label != UNREADABLE:
            if record.in_scope:  # one the model refused keeps its own reason, as for a single slice
                record.label, record.in_scope, record.scope_reason = OUT_OF_SCOPE, False, why
            kinds[k] = kind
    return kinds


def focus_at(hu: np.ndarray, peak: Sequence[int], spacing_mm: Sequence[float],
             radius_mm: float = FOCUS_RADIUS_MM) -> float:
    """The highest HU within ``radius_mm`` of ``peak`` [row, col] on one slice (pixel spacing (row, col) in mm)."""
    ry, rx = (max(1, int(np.ceil(radius_mm / max(float(d), 1e-3)))) for d in spacing_mm)
    r, c = int(peak[0]), int(peak[1])
    r0, c0 = max(0, r - ry), max(0, c - rx)
    patch = hu[r0 : r + ry + 1, c0 : c + rx + 1]
    yy, xx = np.mgrid[r0 : r0 + patch.shape[0], c0 : c0 + patch.shape[1]]
    near = ((yy - r) * float(spacing_mm[0])) ** 2 + ((xx - c) * float(spacing_mm[1])) ** 2 <= radius_mm ** 2
    return float(patch[near].max()) if near.any() else float("nan")


def measure_focus(series: Series, slices: list[SliceRecord], threshold: float) -> None:
    """Set ``focus_hu`` on the in-scope slices at or above ``threshold`` that have a peak, re-reading each."""
    read = getattr(series, "hu_slice", None)
    if read is None:
        return
    for s in slices:
        if s.in_scope and s.cam_peak is not None and s.probability >= threshold:
            try:
                value = focus_at(read(s.index), s.cam_peak, series.pixel_spacing)
            except (InputError, OSError):  # read once already: a file changed or vanished since; not measured
                continue
            s.focus_hu = None if np.isnan(value) else round(value, 1)


# -- one series ---------------------------------------------------------------------------------------
def analyze_series(classifier, series: Series, plane: str = "axial", rule: StudyRule | None = None,
                   batch_size: int = 8, keep_identifiers: bool = False,
                   coronal_spacing_mm: float | None = None, incomplete: str | None = None) -> SeriesResult:
    """Classify one series' slices in order and decide for the series. ``incomplete``: why the slices
    may be only part of the series (study.rule.decide), also given as a warning."""
    plane = check_plane(plane)
    rule = rule or StudyRule.from_card(classifier.card)
    info = model_info(classifier)
    t0 = time.perf_counter()
    result = SeriesResult(series_id=series.identity, kind=series.kind, description=series.description,
                          n_slices=len(series), plane=plane, acquired_plane=series.acquired_plane,
                          decision="not_assessable", reason="", threshold=None, warnings=list(series.warnings),
                          rule=rule.to_dict(), model=info, series_uid=series.uid if keep_identifiers else None)
    if incomplete:
        result.warnings.append(incomplete)
    if series.refusal:
        result.reason = series.refusal
        return result
    min_side = classifier.card.preprocessing.min_input_size
    if min(series.shape) < min_side:  # as infer and serve refuse such a slice (data/limits.py)
        result.reason = (f"slices are {series.shape[1]}x{series.shape[0]} px, smaller than the {min_side} px "
                         f"minimum")
        return result
    classified_plane = series.acquired_plane if plane == "axial" or series.acquired_plane == plane else plane
    result.plane = classified_plane
    if classified_plane not in info["planes"]:
        result.warnings.append(f"plane mismatch: the model was trained on {' and '.join(info['planes'])} slices"
                               f"{'' if info['plane_recorded'] else ' (assumed: its sidecar records no plane)'}, "
                               f"these are {classified_plane}")
    pre = classifier.card.preprocessing
    timings: dict[str, float] = {}
    shares: list | None = None  # each slice's (lung, skull) share, where the slices are classified as acquired
    if plane == "coronal" and series.acquired_plane != "coronal":
        if series.acquired_plane != "axial" or not series.allows_reformat or len(series) < 2:
            why = ("needs at least 2 slices" if len(series) < 2 else
                   "needs an axial series aligned with the patient axes, without gantry tilt")
            result.reason = f"coronal reformat {why}"
            return result
        t = time.perf_counter()
        volume = np.empty((len(series), *series.shape), dtype=np.float16)
        try:
            for k, s in enumerate(_windowed(series, pre.window_center, pre.window_width)):
                volume[k] = s
        except DependencyError:
            raise
        except InputError as exc:
            result.reason = f"unreadable slice: {exc}"
            return result
        timings["read_volume_s"] = time.perf_counter() - t
        origin_y = float(series.origin[1]) if series.origin is not None else 0.0
        reformat = CoronalReformat(volume, series.positions, series.pixel_spacing, origin_y, coronal_spacing_mm)
        positions, source = reformat.positions, reformat.slices()
        result.spacing_mm = reformat.spacing_mm
    else:
        # lungs and skull: on slices known to be axial (the training data's coronal slices show lungs)
        shares = [] if series.acquired_plane == "axial" and series.orientation_known else None
        positions = list(series.positions)
        source = _windowed(series, pre.window_center, pre.window_width, True, shares)
        result.spacing_mm = series.slice_spacing
    names = [f"{series.identity}#{k}" for k in range(len(positions))]
    try:
        preds = classify_stream(classifier, source, names, batch_size=batch_size, timings=timings)
    except DependencyError:
        raise  # a missing decoder is the installation's problem, not this series'
    except InputError as exc:  # a truncated or corrupt slice: this series cannot be judged, others can
        result.reason = f"unreadable slice: {exc}"
        return result
    result.n_slices = len(preds)
    unreadable = [p.reason for p in preds if isinstance(p, Unreadable)]
    if unreadable and len(unreadable) == len(preds):
        result.reason = f"unreadable slice: {unreadable[0]}"
        return result
    if unreadable:  # those slices are not judged: like out-of-scope ones they break runs (study.rule)
        result.warnings.append(f"{len(unreadable)} slice(s) could not be read and were not judged "
                               f"(label {UNREADABLE!r}), e.g. {unreadable[0]}")
    for k, (pred, pos) in enumerate(zip(preds, positions)):
        if isinstance(pred, Unreadable):
            result.slices.append(SliceRecord(k, round(float(pos), 3), 0.0, UNREADABLE, False, None, pred.reason))
            continue
        result.slices.append(SliceRecord(k, round(float(pos), 3), float(pred.probability), pred.label,
                                         slice_in_scope(pred), _float_or_none(getattr(pred, "scope_distance", None)),
                                         getattr(pred, "scope_reason", None),
                                         None if getattr(pred, "cam_peak", None) is None else list(pred.cam_peak)))
    if classified_plane == series.acquired_plane:
        for record in result.slices:
            record.instance = series.instance_number(record.index)
            if keep_identifiers:
                record.source = series.slice_source(record.index)
    kinds = mark_anatomy_out_of_scope(result.slices, shares) if shares else [None] * len(result.slices)
    chest = [k == "chest" for k in kinds]
    outside = sum(1 for r in result.slices if not r.in_scope and r.label != UNREADABLE)
    if outside * 2 > len(result.slices):  # say so: the answer rests on the few slices judged
        why = [f"{kinds.count(kind)} {because}" for kind, because in _ANATOMY_WHY if kind in kinds]
        because = f" ({', '.join(why)})" if why else ""
        judged = sum(r.in_scope for r in result.slices)
        result.warnings.append(f"most slices ({outside} of {len(result.slices)}) lie outside what the model was "
                               f"trained on{because}; the answer rests on the {judged} it judged")
    probs = [s.probability for s in result.slices]
    if classified_plane == series.acquired_plane:
        measure_focus(series, result.slices, rule_threshold(rule, float(classifier.threshold)))
    decision = decide(probs, [s.in_scope for s in result.slices], rule, float(classifier.threshold),
                      [s.focus_hu for s in result.slices],
                      holes([s.label == UNREADABLE for s in result.slices], [s.in_scope for s in result.slices],
                            [s.scope_reason == NO_BODY_REASON for s in result.slices]), chest,
                      incomplete, [s.instance for s in result.slices])
    result.decision, result.reason, result.threshold = decision.decision, decision.reason, decision.threshold
    if decision.hole is not None:  # the decoder's reason for that slice
        result.reason += f": {result.slices[decision.hole].scope_reason}"
    result.peak = None if decision.peak is None else result.slices[decision.peak]
    result.supporting = [SliceRange(r.start, r.end, result.slices[r.start].position_mm,
                                    result.slices[r.end].position_mm, r.length, r.max_probability,
                                    result.slices[r.start].instance, result.slices[r.end].instance)
                         for r in decision.supporting]
    timings["total_s"] = time.perf_counter() - t0
    result.timings = {k: round(v, 4) for k, v in timings.items()}
    return result


def analyze_study(classifier, paths: Iterable[str | Path], plane: str = "axial", rule: StudyRule | None = None,
                  batch_size: int = 8, keep_identifiers: bool = False, coronal_spacing_mm: float | None = None,
                  on_series: Callable[[SeriesResult, Series], None] | None = None,
                  incomplete: str | None = None) -> StudyResult:
    """Read files/folders into series and analyze each; ``on_series(result, series)`` is called as
    each series finishes (e.g. to write its SR while the series' headers are at hand). ``incomplete``:
    why the files may be only part of their series (analyze_series)."""
    check_plane(plane)
    series_list, skipped = read_series(paths)
    results = []
    for series in series_list:
        gaps = [s for s in skipped if s.series_uid is not None and s.series_uid == series.uid]
        set_aside = (f"{len(gaps)} file(s) of this series were set aside ({gaps[-1].reason}): the slices read are "
                     "not all of it") if gaps else None
        res = analyze_series(classifier, series, plane=plane, rule=rule, batch_size=batch_size,
                             keep_identifiers=keep_identifiers, coronal_spacing_mm=coronal_spacing_mm,
                             incomplete="; ".join(w for w in (incomplete, set_aside) if w) or None)
        if on_series is not None:
            on_series(res, series)
        results.append(res)
    return StudyResult(results, skipped)


def analyze(classifier, paths: Iterable[str | Path], plane: str = "axial", **options) -> list[SeriesResult]:
    """One :class:`SeriesResult` per CT series found in ``paths`` (skipped files: use analyze_study)."""
    return analyze_study(classifier, paths, plane=plane, **options).series
