"""The readable table of a study: one line per series, then its warnings, then skipped files."""

from __future__ import annotations

from pathlib import Path

from edgekidney.progress import one_line
from edgekidney.study.analyze import SeriesResult, StudyResult
from edgekidney.study.rule import image_numbers


def _ranges(result: SeriesResult) -> str:
    if not result.supporting:
        return "-"
    return ", ".join(f"{r.start}-{r.end} ({r.start_mm:.1f}..{r.end_mm:.1f} mm{_images(r)})" for r in result.supporting)


def _images(r) -> str:
    """The range as a PACS viewer numbers it (InstanceNumber), where the slices have one."""
    shown = image_numbers(r.start_instance, r.end_instance)
    return f", {shown}" if shown else ""


def _peak(result: SeriesResult) -> str:
    if result.peak is None:
        return "-"
    focus = result.peak.focus_hu
    image = "" if result.peak.instance is None else f" (image {result.peak.instance})"
    return (f"#{result.peak.index}{image} @ {result.peak.position_mm:.1f} mm p={result.peak.probability:.3f}"
            + ("" if focus is None else f" {focus:.0f} HU"))


def format_study(study: StudyResult, max_skipped: int = 10) -> str:
    lines = []
    header = f"{'series':<16}  {'what':<28} {'plane':<8} {'slices':>6}  {'decision':<14} {'peak':<44} {'s':>6}  supporting slices"
    lines.append(header)
    for r in study.series:
        what = one_line(r.description or r.kind)[:28]
        seconds = r.timings.get("total_s")
        lines.append(f"{r.series_id:<16}  {what:<28} {r.plane:<8} {r.n_slices:>6}  {r.decision:<14} {_peak(r):<44} "
                     f"{'-' if seconds is None else f'{seconds:.2f}':>6}  {_ranges(r)}")
        if r.decision == "not_assessable" or r.decision == "no_stone":
            lines.append(f"{'':<16}  why: {r.reason}")
        for w in r.warnings:
            lines.append(f"{'':<16}  warning: {w}")
    if study.skipped:
        lines.append(f"skipped {len(study.skipped)} file(s):")
        for s in study.skipped[:max_skipped]:
            lines.append(f"  {one_line(Path(s.path).name)}: {s.reason}")
        if len(study.skipped) > max_skipped:
            lines.append(f"  ... and {len(study.skipped) - max_skipped} more (all listed in --json)")
    return "\n".join(lines)
