"""The study analysis (``edgekidney.study``, issue 9) behind the listener's SeriesProcessor seam.

``analyze_study`` decides per series (ordered by position, runs of positive slices, scope), and
``write_sr`` / ``write_sc`` make a TID 1500 SR and a Secondary Capture of the peak slice. The listener
needs their UIDs derived from the series (a retry must send the same objects), so each object is read
back and its SOP Instance and Series Instance UIDs are replaced by ``result_uids``.

Slices are classified ahead of completion through :class:`CachingClassifier`: ``prepare`` decodes and
classifies instances as they arrive and keeps the predictions under the sha1 of the 0..1 slice, and
the analysis' own ``predict_slices`` calls find them there. A cache keyed by content can only hit
when the slice is the same, so it cannot change a result, only its latency.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from pydicom import dcmread

from ..errors import EdgeKidneyError, InputError
from .processor import ProcessResult
from .sr import result_uids


def study_available() -> bool:
    """True when this installation has the study analysis and highdicom (which its SR needs)."""
    return (importlib.util.find_spec("edgekidney.study") is not None
            and importlib.util.find_spec("highdicom") is not None)


def _key(slice01: np.ndarray) -> str:
    a = np.ascontiguousarray(slice01)
    return hashlib.sha1(a.tobytes() + str((a.shape, a.dtype.str)).encode()).hexdigest()


class CachingClassifier:
    """A Classifier whose ``predict_slices`` first looks in predictions made by ``prepare``."""

    def __init__(self, inner, cache_size: int = 4096) -> None:
        self.inner = inner
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = 0

    def __getattr__(self, name):  # card, threshold, model_path, backend ... come from the real classifier
        return getattr(self.inner, name)

    def prepare(self, paths: list[Path], batch_size: int = 8) -> None:
        from ..data.decode import load_slice

        pre = self.inner.card.preprocessing
        slices, names = [], []
        for p in paths:
            try:
                slices.append(load_slice(p, pre))
                names.append(str(p))
            except EdgeKidneyError:
                continue  # not a single-frame slice (or unreadable): the analysis handles it
        for start in range(0, len(slices), batch_size):
            chunk = slices[start:start + batch_size]
            preds = self.inner.predict_slices(chunk, names[start:start + batch_size])
            for s, pred in zip(chunk, preds):
                self._cache[_key(s)] = pred
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def predict_slices(self, slices, names, **kw):
        if kw:  # e.g. want_cam: nothing cached has it
            return self.inner.predict_slices(slices, names, **kw)
        keys = [_key(s) for s in slices]
        found = {i: self._cache.pop(k) for i, k in enumerate(keys) if k in self._cache}
        missing = [i for i in range(len(slices)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        fresh = self.inner.predict_slices([slices[i] for i in missing], [names[i] for i in missing]) if missing else []
        found.update(zip(missing, fresh))
        return [dataclasses.replace(found[i], path=names[i]) if dataclasses.is_dataclass(found[i]) else found[i]
                for i in range(len(slices))]


def _rekey(path: Path, kind: str, series_uid: str) -> object:
    ds = dcmread(path)
    sop, series = result_uids(series_uid, kind)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SeriesInstanceUID = series
    return ds


class StudyProcessor:
    name = "study-analysis"

    def __init__(self, classifier, plane: str = "axial", secondary_capture: bool = True, batch_size: int = 8) -> None:
        self.classifier = CachingClassifier(classifier)
        self.plane = plane
        self.secondary_capture = secondary_capture
        self.batch_size = batch_size

    def prepare(self, paths: list[Path]) -> None:
        self.classifier.prepare(paths, self.batch_size)

    def __call__(self, paths: list[Path]) -> ProcessResult:
        from ..study import analyze_study, write_sc, write_sr

        datasets, per_series = [], {}
        with tempfile.TemporaryDirectory(prefix="edgekidney-results-") as tmp:
            def file_back(result, series) -> None:
                header = getattr(series, "header", None)
                uids = []
                if series.kind == "dicom" and header is not None and header.get("StudyInstanceUID") \
                        and header.get("SeriesInstanceUID"):
                    uid = str(header.SeriesInstanceUID)
                    made = [_rekey(write_sr(result, series, tmp), "sr", uid)]
                    if self.secondary_capture:
                        try:
                            made += [_rekey(p, f"sc{i}", uid)
                                     for i, p in enumerate(write_sc(result, series, tmp, self.classifier.inner))]
                        except EdgeKidneyError as exc:
                            result.warnings.append(f"no Secondary Capture: {exc}")
                    datasets.extend(made)
                    uids = [str(d.SOPInstanceUID) for d in made]
                per_series[id(result)] = uids

            study = analyze_study(self.classifier, paths, plane=self.plane, batch_size=self.batch_size,
                                  on_series=file_back)
        if not study.series:
            why = "; ".join(f"{getattr(s, 'reason', s)}" for s in study.skipped[:3]) or "no CT series found"
            raise InputError(f"no CT series could be analysed ({why})")
        entries = []
        for res in study.series:
            d = res.to_dict()
            d.pop("slices", None)  # one record per slice: too much for a results line
            d["slices"] = res.n_slices  # the fields every processor's summary has: decision, slices, result_uids
            d["result_uids"] = per_series.get(id(res), [])
            if not d["result_uids"]:
                d["no_sr"] = "the instances carry no Study/Series Instance UID, so no SR can be filed beside them"
            entries.append(d)
        summary = dict(entries[0]) if len(entries) == 1 else {"decision": "several series", "series": entries,
                                                             "result_uids": [u for e in entries for u in e["result_uids"]]}
        summary["processor"] = self.name
        summary["skipped"] = len(study.skipped)
        return ProcessResult(summary, datasets)
