"""Synthetic CT *series*: a 3-D phantom written as one axial DICOM series with real geometry tags.

SYNTHETIC PHANTOMS, NOT PATIENT DATA. The phantom has the same tissues and Hounsfield units as
:mod:`edgekidney.data.synthetic` (body, fat ring, liver in the upper slices, spine, two kidneys),
but in 3-D: the kidneys are ellipsoids spanning a range of slices, and each stone is a small
ellipsoid (400-1200 HU) inside a kidney that spans 1 to 3 slices. Files carry
ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, FrameOfReferenceUID,
study/series UIDs and InstanceNumber; file names are shuffled so that readers must order by
position. :func:`write_series` returns the ground truth (slice indices of each stone, feet to head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgekidney.data.synthetic import SYNTHETIC_COMMENT, _ellipse


@dataclass(frozen=True)
class SeriesSynthConfig:
    slices: int = 40
    size: int = 128
    fov_mm: float = 360.0
    spacing_mm: float = 3.0  # between slice centres
    stones: int = 1  # 0: a series without a stone
    stone_spans: tuple[int, ...] = (2, 3, 1)  # slices each stone crosses, cycled
    seed: int = 0
    patient: int = 1
    shuffle_names: bool = True
    chest_slices: int = 0  # the top slices show the chest (two lungs, the heart) instead of the abdomen
    leg_slices: int = 0  # the bottom slices show the two thighs (each with its femur) instead of the abdomen


@dataclass
class SeriesTruth:
    folder: str
    series_uid: str
    study_uid: str
    n_slices: int
    kidney_slices: tuple[int, int]  # first and last slice index (feet to head) showing a kidney
    stone_slices: list[list[int]] = field(default_factory=list)  # per stone, the slices it crosses
    kidney_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (r0, r1, c0, c1) in pixels
    positions_mm: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _phantom(cfg: SeriesSynthConfig, rng: np.random.Generator):
    """Geometry of one phantom; returns (render(k) -> HU slice, truth pieces)."""
    n, nz = cfg.size, cfg.slices
    px = cfg.fov_mm / n
    cy, cx, ry, rx = n * 0.5, n * 0.5, n * 0.32, n * 0.42
    sy, sx = cy + ry * 0.55, cx
    k_lo, k_hi = int(nz * 0.25), int(nz * 0.75)  # kidney slices
    kz, krz = (k_lo + k_hi) / 2.0, (k_hi - k_lo) / 2.0 + 0.5
    kidneys = []
    for side in (-1, 1):
        ky, kx = sy - n * 0.04, sx + side * n * 0.17
        kidneys.append((ky, kx, n * 0.08, n * 0.05, side * 0.35))
    stones = []
    for s in range(cfg.stones):
        span = cfg.stone_spans[s % len(cfg.stone_spans)]
        # stones sit in separate parts of the kidney range, at least one slice apart
        lo = k_lo + 2 + s * (k_hi - k_lo - 4) // cfg.stones
        hi = k_lo + 2 + (s + 1) * (k_hi - k_lo - 4) // cfg.stones - span
        first = int(rng.integers(lo, max(lo + 1, hi)))
        ky, kx, kry, krx, _ = kidneys[s % 2]
        r_px = max(2.5, 5.0 / px)  # ~5 mm in-plane radius, at least a few pixels
        stones.append({"slices": list(range(first, first + span)), "y": ky + rng.uniform(-0.3, 0.3) * kry,
                       "x": kx + rng.uniform(-0.3, 0.3) * krx, "r": r_px, "hu": float(rng.uniform(500, 1200))})
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)

    def render(k: int) -> np.ndarray:
        hu = np.full((n, n), -1000.0, dtype=np.float32)
        hu[_ellipse(yy, xx, cy, cx, ry, rx)] = -100.0
        hu[_ellipse(yy, xx, cy, cx, ry * 0.9, rx * 0.92)] = 45.0
        if k >= nz - cfg.chest_slices:  # a chest slice: lungs (-850 HU) about half the body, the heart between
            for side in (-1, 1):
                hu[_ellipse(yy, xx, cy - n * 0.04, cx + side * n * 0.2, n * 0.22, n * 0.15)] = -850.0
            hu[_ellipse(yy, xx, cy - n * 0.02, cx + n * 0.03, n * 0.12, n * 0.1)] = 40.0
            hu[_ellipse(yy, xx, sy, sx, n * 0.065, n * 0.07)] = 700.0
            return hu + rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
        if k < cfg.leg_slices:  # the thighs: two limbs apart, fat around muscle around the femur
            hu[:] = -1000.0
            for side in (-1, 1):
                lx = cx + side * rx * 0.5
                hu[_ellipse(yy, xx, cy, lx, ry * 0.7, rx * 0.4)] = -100.0
                hu[_ellipse(yy, xx, cy, lx, ry * 0.6, rx * 0.33)] = 50.0
                hu[_ellipse(yy, xx, cy, lx, n * 0.04, n * 0.04)] = 900.0
                hu[_ellipse(yy, xx, cy, lx, n * 0.025, n * 0.025)] = 20.0
            return hu + rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
        if k > nz * 0.6:  # liver in the upper slices
            hu[_ellipse(yy, xx, cy - ry * 0.25, cx - rx * 0.45, ry * 0.45, rx * 0.35, 0.3)] = 60.0
        hu[_ellipse(yy, xx, sy, sx, n * 0.065, n * 0.07)] = 700.0
        hu[_ellipse(yy, xx, sy, sx, n * 0.05, n * 0.055)] = 250.0
        dz = (k - kz) / krz
        if abs(dz) < 1.0:
            scale = float(np.sqrt(1.0 - dz * dz))
            for ky, kx, kry, krx, ang in kidneys:
                hu[_ellipse(yy, xx, ky, kx, kry * scale, krx * scale, ang)] = 150.0
                hu[_ellipse(yy, xx, ky, kx, kry * 0.7 * scale, krx * 0.6 * scale, ang)] = 30.0
        for st in stones:
            if k in st["slices"]:
                hu[_ellipse(yy, xx, st["y"], st["x"], st["r"], st["r"])] = st["hu"]
        return hu + rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)

    boxes = []
    for ky, kx, kry, krx, _ in kidneys:
        ext = max(kry, krx) * 1.05
        boxes.append((int(ky - ext), int(np.ceil(ky + ext)), int(kx - ext), int(np.ceil(kx + ext))))
    with_kidney = [k for k in range(nz)
                   if abs((k - kz) / krz) < 1.0 and cfg.leg_slices <= k < nz - cfg.chest_slices]
    kidney_range = (with_kidney[0], with_kidney[-1]) if with_kidney else (-1, -1)  # (-1, -1): a chest only
    return render, kidney_range, [s["slices"] for s in stones], boxes


def write_series(out: str | Path, cfg: SeriesSynthConfig = SeriesSynthConfig()) -> SeriesTruth:
    """Write one synthetic axial CT series (one DICOM file per slice) into folder ``out``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    render, kidney_range, stone_slices, boxes = _phantom(cfg, rng)
    tag = ["edgekidney-synthetic-series", str(cfg.seed), str(cfg.patient), str(cfg.stones)]
    study_uid = generate_uid(entropy_srcs=tag + ["study"])
    series_uid = generate_uid(entropy_srcs=tag + ["series"])
    frame_uid = generate_uid(entropy_srcs=tag + ["frame"])
    px = cfg.fov_mm / cfg.size
    z0 = -200.0
    names = [f"IM{k:04d}.dcm" for k in range(cfg.slices)]
    if cfg.shuffle_names:
        names = [names[k] for k in rng.permutation(cfg.slices)]
    positions = []
    for k in range(cfg.slices):
        hu = render(k)
        # instances numbered head to feet (as many scanners do), positions feet to head
        instance = cfg.slices - k
        sop_uid = generate_uid(entropy_srcs=tag + [str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out / names[k]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", f"SYNTH-S{cfg.patient:04d}"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "SYNTH", f"SYN{cfg.patient:05d}", ""
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        ds.SeriesNumber, ds.InstanceNumber = 2, instance
        ds.SeriesDescription = f"SYNTHETIC abdomen {cfg.spacing_mm:g} mm"
        ds.Manufacturer = "edgekidney synthetic"
        ds.ImageComments = SYNTHETIC_COMMENT
        z = z0 + k * cfg.spacing_mm
        positions.append(z)
        ds.ImagePositionPatient = [-cfg.fov_mm / 2, -cfg.fov_mm / 2, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.PixelSpacing = [px, px]
        ds.SliceThickness = cfg.spacing_mm
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.clip(np.rint(hu + 1024), 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(out / names[k], enforce_file_format=True)
    return SeriesTruth(str(out), series_uid, study_uid, cfg.slices, kidney_range, stone_slices, boxes, positions)


def write_series_set(out: str | Path, n_series: int = 4, slices: int = 40, size: int = 128,
                     seed: int = 0) -> list[SeriesTruth]:
    """``n_series`` synthetic series under ``out/``, alternating with and without stones."""
    out = Path(out)
    truths = []
    for i in range(n_series):
        stones = 1 + i // 2 % 2 if i % 2 == 0 else 0
        cfg = SeriesSynthConfig(slices=slices, size=size, stones=stones, seed=seed + i, patient=i + 1)
        truths.append(write_series(out / f"series-{i + 1:02d}-{'stone' if stones else 'normal'}", cfg))
    (out / "README.txt").write_text(f"{SYNTHETIC_COMMENT}.\nMade by 'edgekidney synth --series' (seed {seed}).\n")
    return truths
