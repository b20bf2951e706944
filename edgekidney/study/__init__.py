"""Whole CT studies: series in, one decision per series out, as JSON, DICOM SR and Secondary Capture.

The API (no torch; what ``edgekidney study`` and a DICOM listener call)::

    from edgekidney.runtime.predict import Classifier
    from edgekidney.study import analyze_study, write_sr, write_sc

    with Classifier("model.onnx") as clf:
        study = analyze_study(clf, ["/incoming/1.2.3/"], plane="axial")   # files and/or folders
        print(study.to_dict())                       # {"series": [...], "skipped": [...]}

        # writing results as each series finishes (the series object carries the DICOM headers):
        def file_back(result, series):
            if series.kind == "dicom":
                write_sr(result, series, "out/sr")        # -> Path of the SR file
                write_sc(result, series, "out/sc", clf)   # -> list of Secondary Capture paths
        analyze_study(clf, received_files, on_series=file_back)

        # or step by step:
        series_list, skipped = read_series(received_files)   # edgekidney.data.series
        result = analyze_series(clf, series_list[0])

- ``analyze(classifier, paths, plane="axial", **options) -> list[SeriesResult]``
- ``analyze_study(classifier, paths, plane="axial", rule=None, batch_size=8, keep_identifiers=False,
  coronal_spacing_mm=None, on_series=None) -> StudyResult`` (``.series``, ``.skipped``, ``.to_dict()``)
- ``analyze_series(classifier, series, plane="axial", rule=None, ...) -> SeriesResult`` for one
  :class:`~edgekidney.data.series.Series` from ``read_series(paths) -> (series, skipped)``
- ``write_sr(result, series, out_dir) -> Path``: a Comprehensive 3D SR (TID 1500) for a DICOM series
- ``write_sc(result, series, out_dir, classifier=None) -> list[Path]``: the peak slice as a
  Secondary Capture with the activation map (or a marker) overlaid
- ``StudyRule`` / ``choose_rule``: the series-level rule and its choice on validation series

``classifier`` is an :class:`edgekidney.runtime.predict.Classifier` or anything with ``card``,
``threshold``, ``model_path`` and ``predict_slices(slices, names)``. Errors the caller can act on
are :class:`edgekidney.errors.EdgeKidneyError` with a one-line message. See docs/study.md.
"""

from edgekidney.study.analyze import SeriesResult, SliceRange, SliceRecord, StudyResult, analyze, analyze_series, analyze_study
from edgekidney.study.rule import StudyRule, choose_rule, decide

__all__ = ["SeriesResult", "SliceRange", "SliceRecord", "StudyResult", "StudyRule", "analyze", "analyze_series",
           "analyze_study", "choose_rule", "decide", "write_sc", "write_sr"]


def write_sr(result, series, out_dir):
    from edgekidney.study.sr import write_sr as _write_sr

    return _write_sr(result, series, out_dir)


def write_sc(result, series, out_dir, classifier=None):
    from edgekidney.study.sc import write_sc as _write_sc

    return _write_sc(result, series, out_dir, classifier)
