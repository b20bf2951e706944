"""A provisional DICOM SR for one series: Comprehensive SR with the decision, made with pydicom alone.

Its UIDs come from the series (``result_uids``): the same series always gives the same SR SOP
Instance UID, so a retry after a crash re-sends the same object, which a PACS stores once. A series
answered again because more of it arrived after its answer gets new SOP Instance UIDs, derived from
the first and the answer's number (``revise``), and its SR names the one it replaces. Patient and
study attributes are copied from the series so the PACS files the SR beside the images.
"""

from __future__ import annotations

import datetime as _dt
import io
import uuid

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from edgekidney import __version__

CODING_SCHEME = "99EDGEKIDNEY"  # private coding scheme ("99" prefix, PS3.16 8.2)
PATIENT_STUDY_TAGS = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                      "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
                      "StudyID", "AccessionNumber", "StudyDescription")
TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber")


_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://edgekidney/dicom-results")


def derived_uid(*parts: str) -> str:
    """A UID in the UUID-derived form (2.25.<int>, PS3.5 B.2) from a name-based UUID: same parts, same UID."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '|'.join(parts)).int}"


def result_uids(series_uid: str, kind: str = "sr") -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of the result ``kind`` for a series: same input, same UIDs."""
    return derived_uid(kind, "instance", series_uid), derived_uid(kind, "series", series_uid)


SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report Storage SOP Classes (PS3.4 B.5)


def revised_uid(uid: str, revision: int) -> str:
    """A result's SOP Instance UID in the series' answer number ``revision`` (0: the first, unchanged)."""
    return uid if revision == 0 else derived_uid("revision", str(revision), uid)


def revise(datasets: list[Dataset], revision: int, before: list[str]) -> dict[str, str]:
    """Give the results of a series answered again (``revision`` > 0) their own SOP Instance UIDs, and
    each SR the SR it replaces as its Predecessor Documents Sequence (PS3.3 C.17.2) when ``before``
    (the result UIDs of the latest answer that made results) holds it. Result series stay the series': a viewer shows
    both answers side by side. Returns {first answer's UID: this answer's}."""
    mapping = {}
    for ds in datasets:
        first = str(ds.SOPInstanceUID)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = revised_uid(first, revision)
        mapping[first] = str(ds.SOPInstanceUID)
        if not (revision and str(ds.SOPClassUID).startswith(SR_CLASS_PREFIX)):
            continue
        ds.InstanceNumber = revision + 1
        # the SR of the latest answer before that made one (an answer that failed made none)
        previous = next((u for r in range(revision - 1, -1, -1) if (u := revised_uid(first, r)) in before), None)
        if previous is not None:
            ds.PredecessorDocumentsSequence = Sequence([
                referenced_study(ds.StudyInstanceUID, [(str(ds.SeriesInstanceUID), str(ds.SOPClassUID), previous)])])
    return mapping


def referenced_study(study_uid: str, refs: list[tuple[str, str, str]]) -> Dataset:
    """A study's item of a hierarchical SOP instance reference (PS3.3 C.17.2.1): its series, each with
    its instances, from (series UID, SOP class UID, SOP instance UID) in the order given."""
    by_series: dict[str, Dataset] = {}
    for series_uid, cls, inst in refs:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = cls, inst
        if series_uid not in by_series:
            by_series[series_uid] = Dataset()
            by_series[series_uid].SeriesInstanceUID = series_uid
            by_series[series_uid].ReferencedSOPSequence = Sequence()
        by_series[series_uid].ReferencedSOPSequence.append(ref)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = Sequence(list(by_series.values()))
    return study


def sop_uids(ds: Dataset) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) from the dataset, else from its file meta (some exports blank them)."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    cls = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
    inst = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "") or "")
    return cls, inst


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning[:64]
    return c


def _item(value_type: str, name: Dataset) -> Dataset:
    it = Dataset()
    it.RelationshipType = "CONTAINS"
    it.ValueType = value_type
    it.ConceptNameCodeSequence = Sequence([name])
    return it


def _num(name: Dataset, value: float, unit: Dataset) -> Dataset:
    it = _item("NUM", name)
    mv = Dataset()
    mv.NumericValue = f"{value:.6g}"[:16]
    mv.MeasurementUnitsCodeSequence = Sequence([unit])
    it.MeasuredValueSequence = Sequence([mv])
    return it


def build_series_sr(headers: list[Dataset], summary: dict, now: _dt.datetime | None = None) -> Dataset:
    """Comprehensive SR for one series. ``headers``: the series' datasets (pixel data not needed);
    ``summary``: decision, slices, positive_slices, max_probability, model_sha256, note."""
    first = headers[0]
    series_uid = str(first.SeriesInstanceUID)
    sop_uid, sr_series_uid = result_uids(series_uid)
    now = now or _dt.datetime.now()

    ds = Dataset()
    for tag in PATIENT_STUDY_TAGS:
        if tag in first:
            setattr(ds, tag, first.data_element(tag).value)
    for tag in TYPE2_EMPTY:
        if tag not in ds:
            setattr(ds, tag, "")
    ds.SOPClassUID, ds.SOPInstanceUID = ComprehensiveSRStorage, sop_uid
    ds.Modality = "SR"
    ds.SeriesInstanceUID = sr_series_uid
    ds.SeriesNumber = 9901
    ds.SeriesDescription = "edgekidney result"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer = "edgekidney"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()

    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([referenced_study(
        first.StudyInstanceUID, [(str(h.SeriesInstanceUID), *sop_uids(h)) for h in headers])])

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("KSCLS", CODING_SCHEME, "Kidney stone classification")])
    ds.ContinuityOfContent = "SEPARATE"
    finding = _item("CODE", _code("121071", "DCM", "Finding"))
    label = str(summary["decision"])
    finding.ConceptCodeSequence = Sequence([_code(label.upper()[:16], CODING_SCHEME, label)])
    no_units = _code("1", "UCUM", "no units")
    slices = _code("{slices}", "UCUM", "slices")
    content = [
        finding,
        _num(_code("NSLICES", CODING_SCHEME, "Slices classified"), summary["slices"], slices),
        _num(_code("NPOSITIVE", CODING_SCHEME, "Slices above threshold"), len(summary["positive_slices"]), slices),
    ]
    if summary.get("max_probability") is not None:  # none when no slice was within the model's scope
        content.append(_num(_code("MAXPROB", CODING_SCHEME, "Highest slice probability"), summary["max_probability"],
                            no_units))
    note = _item("TEXT", _code("121106", "DCM", "Comment"))
    note.TextValue = str(summary.get("note", ""))[:1024]
    content.append(note)
    ds.ContentSequence = Sequence(content)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def encode(ds: Dataset) -> bytes:
    """DICOM Part 10 bytes (preamble, file meta) of ``ds``."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
