"""The seam between the listener and the analysis: a SeriesProcessor turns one series' files into a result.

``SeriesProcessor``: ``(list of instance paths) -> ProcessResult`` (a JSON-able summary and the DICOM
datasets to send back). The listener knows nothing else about the analysis, so the study-level
analysis (``edgekidney.study``) replaces the fallback here without touching receiving, the job table
or sending. A processor raises :class:`~edgekidney.errors.EdgeKidneyError` for a series it cannot
answer (the series is then recorded as failed, with that message, and not retried).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from edgekidney import __version__
from edgekidney.data.limits import DEFAULT_LIMITS, DecodeLimits
from edgekidney.errors import InputError
from edgekidney.runtime.predict import Prediction
from edgekidney.dicomnet.sr import build_series_sr


@dataclass
class ProcessResult:
    summary: dict  # JSON-able; one entry of the study's results line
    datasets: list[Dataset] = field(default_factory=list)  # SR / Secondary Capture, UIDs derived from the series


class SeriesProcessor(Protocol):
    """One series' stored instances in, its result out. ``incomplete``: why they may be only part of
    the series (the listener stopped while receiving it): a ``no_stone`` answer becomes
    ``not_assessable`` (study.rule.decide) and the result says why."""

    def __call__(self, paths: list[Path], incomplete: str | None = None) -> ProcessResult: ...


class Prefetching(Protocol):
    """Optional: a processor with ``prepare`` gets instances while their series is still arriving, so
    the work left when the series completes is small (the listener calls it between series)."""

    def prepare(self, paths: list[Path]) -> None: ...


def read_headers(paths: list[Path]) -> list[tuple[Path, Dataset]]:
    out = []
    for p in paths:
        try:
            out.append((p, dcmread(p, stop_before_pixels=True)))
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise InputError(f"stored instance {p.name} cannot be read ({type(exc).__name__})") from None
    return out


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


OUT_OF_SCOPE = "out_of_scope"


def series_decision(preds: list, unreadable: list[bool], card, threshold: float, incomplete: str | None = None,
                    images: list[int | None] | None = None):
    """The study's rule (:func:`edgekidney.study.rule.decide`, the model's ``study_rule``) over slices in
    order: ``preds`` holds a Prediction or None (unreadable) per slice; ``incomplete``: why they may be
    only part of the series. Returns the Decision."""
    from edgekidney.data.anatomy import is_chest
    from edgekidney.data.preprocess import NO_BODY_REASON
    from edgekidney.study.rule import StudyRule, decide, holes

    probs = [0.0 if p is None else float(p.probability) for p in preds]
    in_scope = [p is not None and p.label != OUT_OF_SCOPE and p.in_scope is not False for p in preds]
    unreadable = holes(unreadable, in_scope, [p is not None and p.scope_reason == NO_BODY_REASON for p in preds])
    chest = [p is not None and p.lung_share is not None and is_chest((p.lung_share, p.skull_share, p.split_share))
             for p in preds]  # measured on axial DICOM slices
    return decide(probs, in_scope, StudyRule.from_card(card), float(threshold), unreadable=unreadable, chest=chest,
                  incomplete=incomplete, images=images)


class FallbackProcessor:
    """Without highdicom: classify every slice, decide for the series with the study's rule (the same
    ``stone`` / ``no_stone`` / ``not_assessable`` and the same runs of ``min_run`` consecutive in-scope
    slices as ``edgekidney study``), and answer with a minimal SR made with pydicom.

    Slices are ordered by Instance Number (the study analysis orders by position along the normal and
    also measures lungs and skull in HU). A series of more instances than ``limits.max_series_slices``
    fails before any header is read (each instance's size was checked when it was received:
    docs/architecture.md rule 8).
    """

    name = "slice-classifier-fallback"

    def __init__(self, classifier, batch_size: int = 8, cache_size: int = 20000,
                 limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.classifier = classifier
        self.limits = limits
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Prediction] = OrderedDict()  # path -> prediction, made by prepare()

    def prepare(self, paths: list[Path]) -> None:
        """Classify slices ahead of their series' completion (failures are left for the final call)."""
        todo = [p for p in paths if str(p) not in self._cache]
        if not todo:
            return
        preds, _ = self.classifier.predict_files(todo, batch_size=self.batch_size, keep_going=True)
        for p in preds:
            self._cache[p.path] = p
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _predict(self, ordered: list[Path]) -> tuple[list[Prediction], list]:
        cached = {str(p): self._cache.pop(str(p)) for p in ordered if str(p) in self._cache}
        rest = [p for p in ordered if str(p) not in cached]
        fresh, failures = (self.classifier.predict_files(rest, batch_size=self.batch_size, keep_going=True)
                           if rest else ([], []))
        by_path = dict(cached, **{p.path: p for p in fresh})
        return [by_path[str(p)] for p in ordered if str(p) in by_path], failures

    def __call__(self, paths: list[Path], incomplete: str | None = None) -> ProcessResult:
        if not paths:
            raise InputError("series has no stored instances")
        too_many = self.limits.series_excess(len(paths), 0, "instances")
        if too_many is not None:
            raise InputError(f"series too large: {too_many}")
        headers = sorted(read_headers(paths), key=lambda ph: (_instance_number(ph[1]), str(ph[0])))
        ordered = [p for p, _ in headers]
        numbers = {str(p): _instance_number(h) for p, h in headers}
        preds, failures = self._predict(ordered)
        if not preds:
            first = failures[0].error.split(": ", 1)[-1] if failures else "no slices"
            raise InputError(f"no slice of the series could be classified ({len(failures)} failed; first: {first})")
        card = self.classifier.card
        positive = card.positive_class
        by_path = {p.path: p for p in preds}
        in_order = [by_path.get(str(p)) for p in ordered]  # None: the slice could not be read
        decided = series_decision(in_order, [p is None for p in in_order], card, self.classifier.threshold,
                                  incomplete, [numbers[str(p)] if h.get("InstanceNumber") not in (None, "")
                                               else None for p, h in headers])
        pos = [numbers[p.path] for p in preds if p.label == positive]
        out_of_scope = [numbers[p.path] for p in preds if p.label == OUT_OF_SCOPE]
        series_uid = str(headers[0][1].get("SeriesInstanceUID", "") or "")
        summary = {
            "series_uid": series_uid,
            "decision": decided.decision,
            "reason": decided.reason,
            "slices": len(preds),
            "failed_slices": len(failures),
            "positive_slices": pos,
            # positions 0-based in Instance Number order, as in `reason`; and the Instance Numbers they are
            "supporting": [[r.start, r.end] for r in decided.supporting],
            "supporting_instances": [[numbers[str(ordered[r.start])], numbers[str(ordered[r.end])]]
                                     for r in decided.supporting],
            "out_of_scope_slices": out_of_scope,
            # of the slices judged (in scope), as study's series probability; None when none was
            "max_probability": None if decided.peak is None else round(in_order[decided.peak].probability, 6),
            "threshold": decided.threshold,
            "classes": list(card.classes),
            "model_sha256": card.sha256,
            "processor": self.name,
            "warnings": [incomplete] if incomplete else [],
            "note": (f"edgekidney {__version__} {self.name}: {decided.decision}: {decided.reason}; slices in "
                     f"Instance Number order; not a diagnosis. Model sha256 {card.sha256[:16]}."),
        }
        first = headers[0][1]
        if not (first.get("StudyInstanceUID") and first.get("SeriesInstanceUID")):
            summary["result_uids"] = []
            summary["no_sr"] = "the instances carry no Study/Series Instance UID, so no SR can be filed beside them"
            return ProcessResult(summary, [])
        sr = build_series_sr([h for _, h in headers], summary)
        summary["result_uids"] = [str(sr.SOPInstanceUID)]
        return ProcessResult(summary, [sr])


def make_processor(model: Path, kind: str = "auto", plane: str = "axial", **classifier_options):
    """(processor, close, name): ``study`` = the study analysis (edgekidney.study, with SR and Secondary
    Capture), ``fallback`` = per-slice classification with a minimal SR, ``auto`` = study when installed."""
    from edgekidney.runtime.predict import Classifier
    from edgekidney.dicomnet.study_processor import StudyProcessor, study_available

    if kind not in ("auto", "study", "fallback"):
        raise InputError(f"--processor {kind!r}: choose auto, study or fallback")
    if kind == "study" and not study_available():
        raise InputError("--processor study: this installation has no edgekidney.study or no highdicom "
                         "(pip install 'edgekidney[sr]')")
    if kind == "fallback" and plane != "axial":
        raise InputError("--plane: the fallback processor classifies the slices as acquired (axial only)")
    clf = Classifier(model, **classifier_options)
    if kind == "study" or (kind == "auto" and study_available()):
        proc = StudyProcessor(clf, plane=plane)
    else:
        proc = FallbackProcessor(clf)
    return proc, clf.close, proc.name


def fallback_processor(model: Path, **classifier_options) -> tuple[Callable[[list[Path]], ProcessResult], Callable[[], None]]:
    """(processor, close) for ``model`` (ONNX with sidecar or engine), without torch."""
    from edgekidney.runtime.predict import Classifier

    clf = Classifier(model, **classifier_options)
    return FallbackProcessor(clf), clf.close
