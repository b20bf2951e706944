"""The series result as a DICOM Structured Report that PACS files beside the images (highdicom).

One Comprehensive 3D SR per series, TID 1500 (Measurement Report) holding one TID 1501 measurement
group:

- finding type and qualitative evaluation: SCT 386103008 "Renal stone" = SCT 52101004 "Present",
  SCT 272519000 "Absent" or SCT 82334004 "Indeterminate" (for ``not_assessable``);
- the series' probability (the peak slice: of the best supporting run for a stone, else the most
  probable in-scope slice) as a numeric measurement, UCUM "1" (no units),
  named with a private code (99EDGEKIDNEY, "STONE-P") since no standard code means "a classifier's
  probability of a renal stone";
- the algorithm's identification (TID 4019): name ``edgekidney``, its version, and parameters
  carrying the model file name, the model's sha256, the threshold, the study rule and the answer's
  reason (why ``not_assessable``, the runs behind ``stone``);
- the supporting slices (every slice of the runs that support a stone call; the peak slice when
  there is none) as source images, with frame numbers for multi-frame images;
- for a stone call on slices as acquired, where: a TID 1410 planar ROI group, a circle (radius 5 %
  of the slice's longer side) around the stone map's peak (``cam_peak``) on the peak slice.

Patient, study and accession identifiers are copied from the input, so the report files into the
same study; its own series is new (SeriesNumber 9901). Needs the ``sr`` extra (highdicom).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekidney.errors import DependencyError, InputError
from edgekidney.study.analyze import SeriesResult

SR_HINT = "pip install 'edgekidney[sr]' (highdicom)"
SR_SERIES_NUMBER = 9901
REGION_RADIUS = 0.05  # the stone region: a circle of this share of the slice's longer side around cam_peak
PATIENT_STUDY_ATTRIBUTES = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                            "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                            "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet")


def _hd():
    try:
        import highdicom as hd
    except ImportError:
        raise DependencyError(f"writing DICOM SR needs highdicom: {SR_HINT}") from None
    return hd


def study_header(series) -> "object":
    """A dataset with the patient and study attributes of the series (empty where absent)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    src, ds = series.header, Dataset()
    for attr in PATIENT_STUDY_ATTRIBUTES:
        value = src.get(attr) if src is not None else None
        if value not in (None, "") or attr in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                                                 "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                                                 "ReferringPhysicianName"):
            setattr(ds, attr, value if value is not None else "")
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["edgekidney-study", series.uid])
    return ds


def series_uid(series) -> str:
    """The input series' SeriesInstanceUID, or (for files that carry none) a valid UID derived from where
    they were read, so that the evidence the SR lists is still well-formed DICOM."""
    from pydicom.uid import generate_uid

    from edgekidney.data.series import NO_SERIES_UID

    uid = str(series.uid)
    return generate_uid(entropy_srcs=["edgekidney-series", uid]) if uid.startswith(NO_SERIES_UID) else uid


def _evidence(series, refs, study) -> list:
    from pydicom.dataset import Dataset

    out, seen = [], set()
    for ref in refs:
        if ref.sop_instance_uid in seen:
            continue
        seen.add(ref.sop_instance_uid)
        ds = Dataset()
        for attr in PATIENT_STUDY_ATTRIBUTES:
            if attr in study:
                setattr(ds, attr, study[attr].value)
        ds.SeriesInstanceUID = series_uid(series)
        ds.SOPClassUID, ds.SOPInstanceUID = ref.sop_class_uid, ref.sop_instance_uid
        out.append(ds)
    return out


def supporting_refs(result: SeriesResult, series) -> list:
    """SliceRefs of the slices that support the decision (axial results map slice index -> instance)."""
    if result.plane != series.acquired_plane:  # reformatted slices come from every acquired slice
        return list(series.refs)
    indices = [k for r in result.supporting for k in range(r.start, r.end + 1)]
    if not indices and result.peak is not None:
        indices = [result.peak.index]
    return [series.refs[k] for k in indices]


def stone_region(result: SeriesResult, series):
    """A circle around the stone map's peak on the peak slice (highdicom ImageRegion), or None.

    Only for a stone call on slices as acquired (a reformatted slice has no single source instance)
    from a model whose slices carry ``cam_peak``.
    """
    peak = result.peak
    if (result.decision != "stone" or peak is None or getattr(peak, "cam_peak", None) is None
            or result.plane != series.acquired_plane or not 0 <= peak.index < len(series.refs)):
        return None
    import numpy as np

    hd = _hd()
    ref = series.refs[peak.index]
    transform = getattr(series, "transform", None)
    row, col = (int(v) for v in peak.cam_peak)  # on the slice as displayed: back to the stored pixel grid
    if transform is not None:
        row, col = transform.source_index(row, col, ref.shape)
    radius = REGION_RADIUS * max(ref.shape)
    centre = [float(col) + 0.5, float(row) + 0.5]  # SCOORD: (column, row), pixel centres at .5
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([centre, [centre[0] + radius, centre[1]]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(ref.sop_class_uid, ref.sop_instance_uid,
                                                None if ref.frame_number is None else [ref.frame_number]))


def build_sr(result: SeriesResult, series):
    """The highdicom Comprehensive3DSR object for one analyzed DICOM series."""
    if series.kind != "dicom" or not getattr(series, "refs", None):
        raise InputError(f"series {result.series_id}: a DICOM SR needs DICOM input (this is {series.kind})")
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    study = study_header(series)
    if study.StudyInstanceUID != (series.header.get("StudyInstanceUID") if series.header is not None else None):
        result.warnings.append("the input has no StudyInstanceUID: the SR got a new one and will not file "
                               "with the images")
    renal_stone = hd.sr.CodedConcept("386103008", "SCT", "Renal stone")
    value = {"stone": codes.SCT.Present, "no_stone": codes.SCT.Absent}.get(result.decision, codes.SCT.Indeterminate)
    model = result.model
    algorithm = hd.sr.AlgorithmIdentification(
        name="edgekidney", version=str(model.get("edgekidney_version", "")),
        parameters=[f"model={model.get('name', '')}", f"model_sha256={model.get('sha256', '')}"]
        # a series refused before any slice was weighed has no threshold applied: none is named
        + ([f"threshold={result.threshold:g}"] if result.threshold is not None else [])
        + [f"plane={result.plane}", f"study_rule={json.dumps(result.rule, sort_keys=True)}",
           f"reason={result.decision}: {result.reason}"[:1024]])  # UT: the SR reader's "why"
    measurements = []
    if result.probability is not None:
        measurements.append(hd.sr.Measurement(
            name=hd.sr.CodedConcept("STONE-P", "99EDGEKIDNEY", "Probability of renal stone (classifier)"),
            value=round(float(result.probability), 6), unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    refs = supporting_refs(result, series)
    sources = [hd.sr.SourceImageForMeasurementGroup(r.sop_class_uid, r.sop_instance_uid,
                                                    None if r.frame_number is None else [r.frame_number])
               for r in refs]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"series {result.series_id}"),
        finding_type=renal_stone,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Kidney)],
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(renal_stone, value)],
        source_images=sources or None)
    groups = [group]
    where = stone_region(result, series)
    if where is not None:
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="stone map peak"),
            referenced_region=where, finding_type=renal_stone, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Kidney)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(renal_stone, value)]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["edgekidney-device", str(model.get("sha256", ""))]),
            name="edgekidney", model_name=str(model.get("name", ""))))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=None,
                                                     observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups)
    evidence = _evidence(series, series.refs, study)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="edgekidney",
        is_complete=True, is_final=False, is_verified=False, series_description="edgekidney renal stone")
    return sr


def write_sr(result: SeriesResult, series, out_dir: str | Path) -> Path:
    """Write the SR of one series into ``out_dir`` as ``<series id>.sr.dcm``; returns its path."""
    sr = build_sr(result, series)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.series_id}.sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path
