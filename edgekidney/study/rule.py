"""The study rule: per-slice probabilities in order -> one decision for the series.

A series is called ``stone`` when at least ``min_run`` *consecutive* slices, all in scope, have a
probability >= the threshold (the model's own threshold unless the rule sets one). Each such run is
a *supporting range*. A stone is a 3-D object: on contiguous or overlapping reconstructions (the
norm for renal-colic CT, 1-3 mm) a calculus of 3 mm or more crosses two or more slices, while
isolated single-slice positives are the classifier's typical false alarms, so the default is
``min_run = 2``. It is ``not_assessable`` when the series has no slices, when no slice is within
the model's scope (``Prediction.in_scope`` false, or the label ``out_of_scope``), or when more than
``max_out_of_scope_fraction`` of the slices between the first and the last in-scope slice are out of
scope: a whole abdomen-pelvis or chest-abdomen scan has many slices the model should not judge
(lungs, pelvis), but inside the range it can judge, the kidney range, most must be judgeable. It is
also ``not_assessable`` when fewer than ``min_run`` slices are in scope: no run could call a stone
there, so "no stone" would not be an answer; instead of ``no_stone`` when a slice whose file could
not be read lies inside or next to the range it judges (a stone found on the others stays ``stone``);
and instead of ``no_stone`` when more slices show lung fields than lie in scope: a chest series, whose
few judged slices are the upper abdomen below the lungs.
``no_stone`` otherwise.

``min_focus_hu`` (off unless set): a slice counts towards a run only when the densest pixel within
``FOCUS_RADIUS_MM`` of its stone-map peak reaches that many HU (``SliceRecord.focus_hu``, measured on
axial slices with HU). Urinary calculi are dense on CT (a few hundred HU and more), so on a scan
without contrast a call whose peak lies on soft tissue is unlikely to be a stone; with contrast,
enhancing vessels and cortex pass any such floor, and the gate changes little there. The edge slice
of a small stone can fall below the floor (docs/study.md), so it is off unless asked for.

The parameters are read from the model's sidecar, ``extra["study_rule"]``
(e.g. ``{"min_run": 2, "threshold": 0.62, "max_out_of_scope_fraction": 0.5}``), with the defaults
above when absent. :func:`choose_rule` picks ``min_run`` and ``threshold`` on labelled validation
series: for each ``min_run`` a series' score is the highest threshold at which it still has such a
run (:func:`run_score`), which makes the choice an ROC over series scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np

DECISIONS = ("stone", "no_stone", "not_assessable")
FOCUS_RADIUS_MM = 10.0  # around the stone map's peak: its cell (8 input px) and a stone's own size


@dataclass(frozen=True)
class StudyRule:
    min_run: int = 2
    threshold: float | None = None  # None: the model's threshold
    max_out_of_scope_fraction: float = 0.5
    min_focus_hu: float | None = None  # None: off; else a slice's peak needs a focus this dense to count
    source: str = "default"  # default | sidecar | option

    def __post_init__(self) -> None:
        if self.min_run < 1:
            raise ValueError(f"min_run must be at least 1, got {self.min_run}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.max_out_of_scope_fraction <= 1.0:
            raise ValueError("max_out_of_scope_fraction must be in [0, 1]")
        if self.min_focus_hu is not None and not -1024.0 <= self.min_focus_hu <= 4000.0:
            raise ValueError(f"min_focus_hu must be in [-1024, 4000] HU, got {self.min_focus_hu}")

    @classmethod
    def from_card(cls, card) -> "StudyRule":
        """The rule stored in a model's sidecar (``extra["study_rule"]``), else the defaults."""
        stored = (getattr(card, "extra", None) or {}).get("study_rule")
        if not stored:
            return cls()
        known = {f.name for f in fields(cls)} - {"source"}
        return cls(**{k: v for k, v in stored.items() if k in known}, source="sidecar")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Run:
    start: int  # first slice index
    end: int  # last slice index (inclusive)
    max_probability: float

    @property
    def length(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class Decision:
    decision: str
    reason: str
    threshold: float
    supporting: list[Run]
    peak: int | None  # a stone: the most probable slice of the best supporting run; else of the in-scope ones
    hole: int | None = None  # the unreadable slice that keeps "no stone" from being said (decide's unreadable)


def runs_above(probabilities: Sequence[float], in_scope: Sequence[bool], threshold: float) -> list[Run]:
    """Maximal runs of consecutive in-scope slices with probability >= threshold."""
    runs: list[Run] = []
    start = None
    for k, (p, ok) in enumerate(list(zip(probabilities, in_scope)) + [(-1.0, False)]):
        hit = ok and p >= threshold
        if hit and start is None:
            start = k
        elif not hit and start is not None:
            runs.append(Run(start, k - 1, float(max(probabilities[start:k]))))
            start = None
    return runs


def rule_threshold(rule: StudyRule, model_threshold: float) -> float:
    return float(model_threshold if rule.threshold is None else rule.threshold)


def holes(unreadable: Sequence[bool], in_scope: Sequence[bool], no_body: Sequence[bool]) -> list[bool]:
    """The slices the rule must not take as looked at: unreadable ones, and slices without a body
    (``no_body``: blank, one flat value) between two in scope. Inside a body such a slice is corrupt or
    missing, not anatomy: a stone there would go unseen, and it breaks the run a stone crosses.
    Beyond the judged range (a volume padded with air) it is nothing."""
    scoped = [k for k, ok in enumerate(in_scope) if ok]
    return [bool(u) or (bool(scoped) and scoped[0] < k < scoped[-1] and bool(b))
            for k, (u, b) in enumerate(zip(unreadable, no_body))]


def first_hole(unreadable: Sequence[bool], in_scope: Sequence[bool]) -> int | None:
    """The first unreadable slice inside, or next to, the range from the first to the last in-scope slice:
    there it may have held what the others do not show. Outside it (lungs, pelvis) it changes nothing."""
    scoped = [k for k, s in enumerate(in_scope) if s]
    if not scoped:
        return None
    return next((k for k, u in enumerate(unreadable) if u and scoped[0] - 1 <= k <= scoped[-1] + 1), None)


def image_numbers(first: int | None, last: int | None) -> str:
    """A run's ends as a PACS viewer numbers them (InstanceNumber): 'images 210-214', 'image 7', or ''
    when an end has none."""
    if first is None or last is None:
        return ""
    return f"image {first}" if first == last else f"images {first}-{last}"


def where(start: int, end: int, images: Sequence[int | None] | None = None) -> str:
    """Slices ``start``-``end`` (0-based, in position order) as the reason names them, with the image
    numbers a PACS viewer shows (InstanceNumber) when both ends have one: 'slices 77-81, images 210-214'."""
    text = f"slice {start}" if start == end else f"slices {start}-{end}"
    shown = image_numbers(images[start], images[end]) if images is not None else ""
    return f"{text}, {shown}" if shown else text


def decide(probabilities: Sequence[float], in_scope: Sequence[bool], rule: StudyRule,
           model_threshold: float, focus_hu: Sequence[float | None] | None = None,
           unreadable: Sequence[bool] | None = None, chest: Sequence[bool] | None = None,
           incomplete: str | None = None, images: Sequence[int | None] | None = None) -> Decision:
    """Apply the rule to one series' slices, in position order. ``focus_hu`` (per slice, None where not
    measured) is read only when ``rule.min_focus_hu`` is set: a slice whose focus is less dense does not
    count towards a run; a slice without a measurement counts. ``unreadable`` (per slice) marks slices
    that could not be judged (a file that could not be read; a slice without a body between judged
    ones: :func:`holes`), given as not in scope: one inside or next to the judged range turns
    ``no_stone`` into ``not_assessable`` (a stone there would have gone unseen); a stone found on the
    other slices stays ``stone``. ``chest`` (per slice) marks slices put out of scope for their lung
    fields: when they outnumber the slices in scope, the series is a chest scan and ``no_stone`` becomes
    ``not_assessable`` (what was judged is the upper abdomen below it); a stone found stays ``stone``.
    ``incomplete``, when given, says why the slices may be only part of the series (a listener that
    stopped while receiving it): ``no_stone`` becomes ``not_assessable`` with that reason; a stone found
    on the slices at hand stays ``stone``, its reason saying it too. ``images`` (per slice, the
    InstanceNumber or None) adds the image numbers to the slices the reason names (:func:`where`)."""
    threshold = rule_threshold(rule, model_threshold)
    n = len(probabilities)
    if n == 0:
        return Decision("not_assessable", "no slices", threshold, [], None)
    scoped = [k for k in range(n) if in_scope[k]]
    peak = max(scoped, key=lambda k: probabilities[k]) if scoped else None
    if not scoped:
        return Decision("not_assessable", f"none of the {n} slices is within the model's scope", threshold, [], None)
    if len(scoped) < rule.min_run:  # no run can reach min_run: "no stone" would be said of slices never weighed
        return Decision("not_assessable", f"{len(scoped)} slice(s) in scope, fewer than the {rule.min_run} consecutive "
                                          "slices a stone call needs (for single slices: infer, or --min-run 1)",
                        threshold, [], peak)
    # The range the model can judge: from the first to the last in-scope slice. Out-of-scope slices
    # beyond it (chest, pelvis, head of a longer scan) are expected; inside it they are not.
    span = scoped[-1] - scoped[0] + 1
    out = span - len(scoped)
    if out / span > rule.max_out_of_scope_fraction:
        return Decision("not_assessable", f"{out} of the {span} slices between the first and last in-scope slice "
                                          "are out of the model's scope", threshold, [], peak)
    counts, gated = list(in_scope), ""
    if rule.min_focus_hu is not None and focus_hu is not None:
        soft = [k for k in scoped if focus_hu[k] is not None and focus_hu[k] < rule.min_focus_hu
                and probabilities[k] >= threshold]
        for k in soft:
            counts[k] = False
        gated = f"; {len(soft)} slice(s) without a focus of >= {rule.min_focus_hu:g} HU at the peak not counted"
    supporting = [r for r in runs_above(probabilities, counts, threshold) if r.length >= rule.min_run]
    if supporting:  # the evidence shown (SR region, Secondary Capture) is that of the call
        best = max(supporting, key=lambda r: r.max_probability)
        evidence = max(range(best.start, best.end + 1), key=lambda k: probabilities[k])
        return Decision("stone", f"{len(supporting)} run(s) of >= {rule.min_run} consecutive slices with p >= "
                                 f"{threshold:.3g} (best: {where(best.start, best.end, images)}){gated}"
                                 + (f"; {incomplete}" if incomplete else ""), threshold, supporting, evidence)
    quiet = f"no {rule.min_run} consecutive slices with p >= {threshold:.3g}{gated}"
    hole = first_hole(unreadable, in_scope) if unreadable is not None else None
    if hole is not None:
        return Decision("not_assessable", f"{where(hole, hole, images)}, inside the range the model judges, "
                                          "could not be judged, so "
                                          f"'no stone' would not cover it ({quiet} on the others)", threshold, [], peak,
                        hole)
    if incomplete:
        return Decision("not_assessable", f"{incomplete}; 'no stone' would not cover the rest ({quiet} on the {n} "
                                          f"slices at hand)", threshold, [], peak)
    lungs = sum(1 for c in chest or () if c)
    if lungs > len(scoped):
        return Decision("not_assessable", f"a chest series: {lungs} slices show lung fields and only {len(scoped)} lie "
                                          f"within the model's scope ({quiet} on those)", threshold, [], peak)
    return Decision("no_stone", quiet, threshold, [], peak)


def run_score(probabilities: Sequence[float], min_run: int) -> float:
    """The highest threshold at which the series still has ``min_run`` consecutive slices at or above
    it: the max over windows of ``min_run`` slices of the window's min (-1 when the series is shorter)."""
    p = np.asarray(probabilities, dtype=float)
    if len(p) < min_run:
        return -1.0
    windows = np.lib.stride_tricks.sliding_window_view(p, min_run)
    return float(windows.min(axis=1).max())


def choose_rule(series_probabilities: Sequence[Sequence[float]], has_stone: Sequence[bool],
                min_runs: Sequence[int] = (1, 2, 3, 4), target_sensitivity: float = 0.95) -> tuple[StudyRule, dict]:
    """Choose ``min_run`` and ``threshold`` on labelled validation series (all slices taken as in scope).

    Among rules whose series-level sensitivity reaches ``target_sensitivity``, take the best
    specificity; ties go to the higher threshold (the call rests on confident slices), then to the
    shorter run. Returns the rule and its
    series-level sensitivity and specificity on those series.
    """
    labels = np.asarray(has_stone, dtype=bool)
    if len(series_probabilities) != len(labels) or labels.all() or not labels.any():
        raise ValueError("choose_rule needs labelled series of both kinds")
    best, best_key = None, None
    for min_run in min_runs:
        scores = np.array([run_score(p, min_run) for p in series_probabilities])
        for t in np.unique(scores[scores >= 0]):
            called = scores >= t
            sens, spec = float(called[labels].mean()), float((~called[~labels]).mean())
            reached = sens >= target_sensitivity
            key = (reached, spec if reached else sens, float(t), -min_run)
            if best_key is None or key > best_key:
                best_key = key
                best = (StudyRule(min_run=min_run, threshold=float(t), source="chosen"),
                        {"sensitivity": sens, "specificity": spec, "n_series": int(len(labels))})
    return best
