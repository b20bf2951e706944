"""The peak slice of a series as a DICOM Secondary Capture, with the activation map overlaid.

The slice is shown in the model's CT window (8-bit RGB). When the model gives a stone map (P(stone)
per cell) it is blended in red in proportion to P(stone), fully from 0.5 and not at all below 0.05,
so a quiet map stays quiet; a class activation map (relative, ``Prediction.cam``) is blended where it
is above half its maximum; a model without either gets a marker instead: a red frame and a line
saying that no activation map exists. For a stone call a cyan circle marks where the map peaks
(``cam_peak``, where the SR's region is). The text (decision, probability, slice) is burned in,
wrapped to the image's width, so ``BurnedInAnnotation`` is YES. The image carries the input's patient and study identifiers and
references its source instance (Source Image Sequence), in a new series (SeriesNumber 9902).

Only slices as acquired (``--plane axial`` on an axial series): a coronal reformat has no single
source instance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekidney.errors import InputError
from edgekidney.data.preprocess import window_hu
from edgekidney.study.analyze import SeriesResult
from edgekidney.study.sr import REGION_RADIUS, _hd, study_header

SC_SERIES_NUMBER = 9902


def activation_map(classifier, window01: np.ndarray, name: str) -> np.ndarray | None:
    """The model's class activation map for one slice (2-D, 0..1, slice size), or None."""
    if classifier is None:
        return None
    try:
        pred = classifier.predict_slices([window01], [name], want_cam=True)[0]
    except TypeError:  # a classifier without activation maps
        return None
    cam = getattr(pred, "cam", None)
    if cam is None:
        return None
    cam = np.asarray(cam, dtype=np.float32)  # edgekidney.runtime.predict maps it onto the slice's own grid
    if cam.shape != window01.shape or not np.isfinite(cam).all():
        return None
    if is_stone_map(classifier):
        return np.clip(cam, 0.0, 1.0)  # P(stone) per cell: shown as it is, so a quiet map stays quiet
    span = float(cam.max() - cam.min())
    return (cam - cam.min()) / span if span > 0 else None


def is_stone_map(classifier) -> bool:
    card = getattr(classifier, "card", None)
    return (getattr(card, "extra", None) or {}).get("map", {}).get("kind") == "stone_map"


def overlay(window01: np.ndarray, cam: np.ndarray | None, text: str, peak: tuple[int, int] | None = None,
            stone_map: bool = False) -> np.ndarray:
    """8-bit RGB image: the windowed slice, the map in red (or a red frame), a circle at ``peak``
    (row, col), the text wrapped to the width."""
    from PIL import Image, ImageDraw

    gray = np.clip(window01 * 255.0, 0, 255).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1).astype(np.float32)
    if cam is not None:
        level = (cam - 0.05) / 0.45 if stone_map else (cam - 0.5) * 2.0  # P(stone) 0.05-0.5; or half the max
        alpha = np.clip(level, 0.0, 1.0)[..., None] * 0.6
        rgb = rgb * (1 - alpha) + np.array([255.0, 0.0, 0.0]) * alpha
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    w, h = img.size
    if cam is None:
        draw.rectangle([0, 0, w - 1, h - 1], outline=(255, 0, 0), width=max(2, w // 128))
        text += " | no activation map in this model"
    if peak is not None:
        r = max(3, round(max(w, h) * REGION_RADIUS))  # the SR's region
        y, x = peak
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(0, 255, 255), width=max(1, r // 6))
    lines = _wrap(draw, text, w - 8)
    for k, line in enumerate(lines):
        draw.text((4, 2 + 11 * k), line, fill=(255, 255, 0))
    return np.asarray(img)


def _wrap(draw, text: str, width: int) -> list[str]:
    """The text in lines no wider than ``width`` pixels, broken at spaces (a word wider than it stands alone)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


# CID 4031 terms for the parts of the trunk a kidney CT covers; none is a paired structure
UNPAIRED_BODY_PARTS = frozenset({"ABDOMEN", "PELVIS", "ABDOMENPELVIS", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS",
                                 "WHOLEBODY"})


def _body_part(sc, source) -> None:
    """General Series Laterality is Type 2C: required when the body part examined is a paired structure.
    The slice shows what its series examined: a series that names one of ``UNPAIRED_BODY_PARTS`` passes it
    on, without Laterality. Otherwise (no body part, a vendor term such as PARTIALBODY, a malformed value,
    which are not copied) whether laterality applies is unknown: Laterality is the series' R or L, else
    empty (Type 2: unknown), never missing, which dciodvfy reports as an error."""
    body_part = str(source.get("BodyPartExamined", "") or "").strip() if source is not None else ""
    laterality = str(source.get("Laterality", "") or "").strip() if source is not None else ""
    if body_part in UNPAIRED_BODY_PARTS:
        sc.BodyPartExamined = body_part
    else:
        sc.Laterality = laterality if laterality in ("R", "L") else ""


def write_sc(result: SeriesResult, series, out_dir: str | Path, classifier=None) -> list[Path]:
    """Write the peak slice of one DICOM series as a Secondary Capture; returns the paths written."""
    if series.kind != "dicom" or result.peak is None:
        return []
    if result.plane != series.acquired_plane:
        raise InputError(f"series {result.series_id}: Secondary Capture of a {result.plane} reformat is not "
                         "supported (no single source instance)")
    hd = _hd()
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    ref = series.refs[result.peak.index]
    card = classifier.card if classifier is not None else None
    center = card.preprocessing.window_center if card else 40.0
    width = card.preprocessing.window_width if card else 400.0
    window01 = window_hu(series.hu_slice(result.peak.index), center, width)
    cam = activation_map(classifier, window01, series.slice_name(result.peak.index))
    image = "" if ref.instance_number is None else f" (image {ref.instance_number})"  # what PACS shows
    text = (f"edgekidney {result.decision} p={result.peak.probability:.3f} slice {result.peak.index}{image} "
            f"@ {result.peak.position_mm:g} mm")
    peak = result.peak.cam_peak if result.decision == "stone" else None
    pixels = overlay(window01, cam, text, None if peak is None else tuple(peak), is_stone_map(classifier))

    ref_ds = study_header(series)
    ref_ds.Modality = "OT"
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref_ds, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=generate_uid(entropy_srcs=["edgekidney-sc", series.uid]),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="edgekidney", pixel_spacing=tuple(float(v) for v in series.pixel_spacing),
        patient_orientation=("L", "P") if series.acquired_plane == "axial" else ("L", "F"))
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ref.sop_class_uid, ref.sop_instance_uid
    if ref.frame_number is not None:
        item.ReferencedFrameNumber = ref.frame_number
    sc.SourceImageSequence = Sequence([item])
    _body_part(sc, series.header)
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "edgekidney peak slice"
    sc.ImageComments = "activation map" if cam is not None else "marker only: the model gives no activation map"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.series_id}.peak.sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    return [path]
