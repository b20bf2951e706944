"""The study analysis (``edgekidney.study``) behind the listener's SeriesProcessor seam.

``analyze_study`` decides per series (ordered by position, runs of positive slices, scope), and
``write_sr`` / ``write_sc`` make a TID 1500 SR and a Secondary Capture of the peak slice. The listener
needs their UIDs derived from the series (a retry must send the same objects), so each object is read
back and its SOP Instance and Series Instance UIDs are replaced by ``result_uids``.

Slices are classified ahead of completion through :class:`CachingClassifier`: ``prepare`` decodes and
classifies instances as they arrive and keeps the predictions under the sha1 of the 0..1 slice and of
the model input, and the analysis' own ``predict_slices`` / ``predict_preprocessed`` calls find them. A cache keyed by content can only hit
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

from edgekidney.errors import EdgeKidneyError, InputError
from edgekidney.dicomnet.processor import ProcessResult
from edgekidney.dicomnet.sr import result_uids


def study_available() -> bool:
    """True when this edgekidney has the study analysis and highdicom (which its SR needs).

    The spec must come from this package's own folder: an editable install of another checkout can
    answer for ``edgekidney.study`` by name without its dependencies."""
    if importlib.util.find_spec("highdicom") is None:
        return False
    try:
        spec = importlib.util.find_spec("edgekidney.study")
    except ImportError:
        return False
    here = Path(__file__).resolve().parents[1]
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(here)


def _key(array: np.ndarray, extra: str = "") -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha1(a.tobytes() + str((a.shape, a.dtype.str, extra)).encode()).hexdigest()


class CachingClassifier:
    """A Classifier whose ``predict_slices`` (0..1 slices) and, when the real one has it,
    ``predict_preprocessed`` (model inputs + geometry) first look in predictions made by ``prepare``,
    keyed by the content they are given."""

    def __init__(self, inner, cache_size: int = 8192) -> None:
        self.inner = inner
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = 0
        if callable(getattr(inner, "predict_preprocessed", None)):
            self.predict_preprocessed = self._predict_preprocessed

    def __getattr__(self, name):  # card, threshold, model_path, backend ... come from the real classifier
        return getattr(self.inner, name)

    def _remember(self, keys: list[str], pred) -> None:
        for k in keys:
            self._cache[k] = pred
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def prepare(self, paths: list[Path], batch_size: int = 8) -> None:
        from edgekidney.data.decode import load_slice
        from edgekidney.data.preprocess import preprocess_batch_with_geometry

        pre = self.inner.card.preprocessing
        slices, names = [], []
        for p in paths:
            try:
                slices.append(load_slice(p, pre))
                names.append(str(p))
            except EdgeKidneyError:
                continue  # not a single-frame slice (or unreadable): the analysis handles it
        split = callable(getattr(self.inner, "predict_preprocessed", None))
        for start in range(0, len(slices), batch_size):
            chunk, chunk_names = slices[start:start + batch_size], names[start:start + batch_size]
            x, geometries = preprocess_batch_with_geometry(chunk, pre)
            preds = (self.inner.predict_preprocessed(x, geometries, chunk_names) if split
                     else self.inner.predict_slices(chunk, chunk_names))
            for s, xi, g, pred in zip(chunk, x, geometries, preds):
                self._remember([_key(s), _key(xi, repr(g))], pred)

    def _lookup(self, keys: list[str], compute) -> list:
        found = {i: self._cache.pop(k) for i, k in enumerate(keys) if k in self._cache}
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            found.update(zip(missing, compute(missing)))
        return [found[i] for i in range(len(keys))]

    @staticmethod
    def _renamed(preds: list, names: list[str]) -> list:
        return [dataclasses.replace(p, path=n) if dataclasses.is_dataclass(p) else p for p, n in zip(preds, names)]

    def predict_slices(self, slices, names, want_cam: bool = False, **kw):
        if want_cam or kw:  # nothing cached carries a map
            return self.inner.predict_slices(slices, names, want_cam=want_cam, **kw)
        preds = self._lookup([_key(s) for s in slices], lambda idx: self.inner.predict_slices(
            [slices[i] for i in idx], [names[i] for i in idx]))
        return self._renamed(preds, names)

    def _predict_preprocessed(self, x, geometries, names, want_cam: bool = False, **kw):
        if want_cam or kw:
            return self.inner.predict_preprocessed(x, geometries, names, want_cam=want_cam, **kw)
        preds = self._lookup([_key(xi, repr(g)) for xi, g in zip(x, geometries)],
                             lambda idx: self.inner.predict_preprocessed(
                                 np.stack([x[i] for i in idx]), [geometries[i] for i in idx], [names[i] for i in idx]))
        return self._renamed(preds, names)


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

    def __call__(self, paths: list[Path], incomplete: str | None = None) -> ProcessResult:
        from edgekidney.study import analyze_study, write_sc, write_sr

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
                                  on_series=file_back, incomplete=incomplete)
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
