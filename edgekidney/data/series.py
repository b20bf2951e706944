"""Whole CT series from DICOM files: grouped, filtered, ordered by position, read one slice at a time.

``read_series(paths)`` takes files and folders (searched recursively) and returns
``(series, skipped)``:

- Files are grouped by SeriesInstanceUID. Headers only are read here (no pixel data).
- Skipped and listed with the reason: files that are not DICOM, non-image objects (structured
  reports, presentation states, key-object notes, DICOMDIR), modalities other than CT, localizers
  (ImageType LOCALIZER: scouts/topograms), colour images, SOP classes that are not CT images
  (secondary captures, including edgekidney's own), unreadable files, and an instance whose header
  declares more than the decode limits allow (a slice or frame over ``max_side``/``max_pixels``/
  ``max_aspect``, more frames or pixels than a series may have): docs/architecture.md rule 8, checked
  from Rows/Columns/NumberOfFrames/BitsAllocated/SamplesPerPixel before any pixel is read.
- Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
  the ImageOrientationPatient cosines, signed to point +z for axial), never by file name;
  SliceLocation, then InstanceNumber only when positions are missing (then a warning says so; from
  InstanceNumber, which end is the feet is not known).
- Enhanced CT (multi-frame) files are expanded frame by frame, with per-frame positions and
  per-frame or shared rescale (functional groups).
- Geometry checks. *Refused* (the series gets ``not_assessable`` with this one line, nothing is
  classified): mixed orientations, different positions shared by two slices (two stacks in one
  series), slices of different sizes, values declared not to be HU (RescaleType other than HU, as
  in derived perfusion maps), more slices or pixels than :class:`~edgekidney.data.limits.DecodeLimits`
  allows a series (``max_series_slices``, ``max_series_pixels``; counted from the headers, and the
  slices past the limit are not even kept). *Warned* (classified as acquired): the same instance twice
  (the copy is dropped), gantry tilt, uneven spacing or gaps, missing positions.

Pixels are decoded only when :meth:`Series.hu_slices` is iterated: one slice in flight at a time,
through :mod:`edgekidney.data.decode` (compressed syntaxes need the ``dicom`` extra), and only after
the file's header, read again with the pixels, still declares the size that was checked.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edgekidney.errors import DependencyError, EdgeKidneyError, InputError
from edgekidney.data.decode import (CT_IMAGE_SOP_CLASSES, dicom_pixels, dicom_rescale, file_meta_value,
                                    looks_like_dicom, photometric_reason, read_dicom, sop_class_of, sop_name,
                                    stored_to_hu)
from edgekidney.data.limits import DEFAULT_LIMITS, DecodeLimits, check_dicom_instance, dicom_size
from edgekidney.data.dataset import expand_paths as dataset_expand_paths
from edgekidney.data.geometry import (DisplayTransform, canonical_normal, display_transform, finite_floats,
                                      obliquity, orientation_plane, pixel_spacing, pixel_spacing_reason,
                                      plane_of)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NO_SERIES_UID = "no-series-uid:"
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-3
TILT_WARN_DEGREES = 0.5
OBLIQUE_WARN_DEGREES = 1.0  # the image plane's largest angle to the patient axes, as for a NIfTI affine
SPACING_WARN_RATIO = 1.1  # largest / smallest gap between neighbouring slices


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def identity_hash(text: str) -> str:
    """A stable, non-identifying id: the first 16 hex digits of sha256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    # the series a CT slice set aside belongs to, when its header says so (an instance over the limits,
    # a malformed geometry value): that series is then not all there (study.analyze). Not reported:
    # it is an identifier
    series_uid: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SliceRef:
    """One slice of a series: a file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # 0-based frame of a multi-frame file
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None
    position: np.ndarray | None  # ImagePositionPatient (mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    pixel_spacing: tuple[float, float] | None
    shape: tuple[int, int]
    slope: float
    intercept: float
    rescale_type: str = ""  # RescaleType when given; "HU" or absent means Hounsfield units
    image_type: str = ""  # ImageType, or FrameType of a multi-frame image's frame
    slice_location: float | None = None  # SliceLocation (mm): orders slices that have no position

    @property
    def frame_number(self) -> int | None:
        """1-based frame number as DICOM references it."""
        return None if self.frame is None else self.frame + 1


@dataclass
class Series:
    """A stack of CT slices in order, with what is known of its geometry. Subclasses read pixels."""

    kind: str  # dicom | nifti
    identity: str  # sha256-based id: safe to log and to store
    uid: str  # SeriesInstanceUID, or the NIfTI file path (an identifier: kept only on request)
    description: str
    modality: str
    acquired_plane: str  # axial | coronal | sagittal | oblique
    positions: list[float]  # mm along the canonical normal, ascending, one per slice
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in display orientation, mm
    shape: tuple[int, int]  # (rows, columns) in display orientation
    origin: np.ndarray | None = None  # patient position (LPS, mm) of display pixel (0, 0) of slice 0
    row_direction: np.ndarray | None = None  # LPS unit vector of increasing display row
    col_direction: np.ndarray | None = None  # LPS unit vector of increasing display column
    warnings: list[str] = field(default_factory=list)
    refusal: str | None = None  # set: not classified, the decision is not_assessable for this reason
    allows_reformat: bool = True  # false under gantry tilt or oblique slices
    orientation_known: bool = True  # false: no usable ImageOrientationPatient, the plane is assumed axial
    slice_thickness: float | None = None

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def slice_spacing(self) -> float | None:
        if len(self.positions) < 2:
            return None
        return float(np.median(np.diff(self.positions)))

    def hu_slices(self) -> Iterator[np.ndarray]:
        """Each slice in order, in Hounsfield units (float32), in display orientation."""
        raise NotImplementedError

    def hu_slices_or_errors(self) -> Iterator[np.ndarray | InputError]:
        """As :meth:`hu_slices`, but where a series is made of files, a slice that cannot be read is
        yielded as its :class:`InputError` and the next one is read (a volume read whole fails whole)."""
        yield from self.hu_slices()

    def slice_name(self, index: int) -> str:
        return f"{self.identity}#{index}"

    def slice_source(self, index: int) -> str | None:
        """The file (and frame) a slice was read from; None where the series is one file (``uid`` names it)."""
        return None

    def instance_number(self, index: int) -> int | None:
        """The slice's InstanceNumber, the image number a PACS viewer shows; None where there is none."""
        return None


@dataclass
class DicomSeries(Series):
    refs: list[SliceRef] = field(default_factory=list)
    header: object = None  # pydicom Dataset of the first slice, without pixel data (patient/study for SR)
    transform: DisplayTransform = field(default_factory=DisplayTransform)

    def hu_slices(self) -> Iterator[np.ndarray]:
        for hu in self.hu_slices_or_errors():
            if isinstance(hu, InputError):
                raise hu
            yield hu

    def hu_slices_or_errors(self) -> Iterator[np.ndarray | InputError]:
        cached_path, cached_ds = None, None
        for ref in self.refs:
            try:
                if ref.path != cached_path:
                    cached_path, cached_ds = None, None
                    cached_ds = read_dicom(ref.path, ref.path.name)
                    cached_path = ref.path if ref.frame is not None else None  # keep multi-frame files open
                yield self._to_hu(ref, cached_ds)
            except DependencyError:
                raise  # a missing decoder fails every slice alike: the installation's problem
            except InputError as exc:  # a truncated or changed file: this slice, not its series
                yield exc
            if ref.frame is None:
                cached_ds = None

    def hu_slice(self, index: int) -> np.ndarray:
        """One slice (by position index) in HU, display orientation."""
        ref = self.refs[index]
        return self._to_hu(ref, read_dicom(ref.path, ref.path.name))

    def _to_hu(self, ref: SliceRef, ds) -> np.ndarray:
        name = ref.path.name if ref.frame is None else f"{ref.path.name}[frame {ref.frame_number}]"
        size = dicom_size(ds, name)  # the size checked when the series was read, or nothing is decoded
        if (size.rows, size.cols) != ref.shape or (ref.frame is None and size.frames != 1):
            raise InputError(f"{name}: header now declares {size.cols}x{size.rows} px x {size.frames} frame(s), "
                             f"not the {ref.shape[1]}x{ref.shape[0]} px it declared when the series was read")
        pixels = dicom_pixels(ds, name, index=ref.frame)
        if pixels.ndim != 2 or pixels.shape != ref.shape:
            raise InputError(f"{name}: pixel data has shape {pixels.shape}, header says {ref.shape}")
        try:
            hu = stored_to_hu(pixels, ref.slope, ref.intercept)  # NaN in Float Pixel Data, an absurd slope
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None
        return np.ascontiguousarray(self.transform.apply(hu))

    def slice_name(self, index: int) -> str:
        ref = self.refs[index]
        return ref.sop_instance_uid + ("" if ref.frame is None else f"#{ref.frame_number}")

    def slice_source(self, index: int) -> str | None:
        ref = self.refs[index]
        return str(ref.path) + ("" if ref.frame is None else f"[frame {ref.frame_number}]")

    def instance_number(self, index: int) -> int | None:
        return self.refs[index].instance_number  # a multi-frame file's: its frames share it


# -- finding files ----------------------------------------------------------------------------------
def _every_file(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder`` (DICOM files often have no suffix), in a stable order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # regular files only: a FIFO would block the read, a link to /dev/zero would never end
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith(".") and (Path(root) / f).is_file())
    return found


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given and every non-hidden file under folders (recursively), in a stable order."""
    return dataset_expand_paths(paths, _every_file, "folder is empty")


# -- reading headers --------------------------------------------------------------------------------
# what pydicom raises when a header value that was read leniently is converted at last
MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


def malformed(exc: BaseException) -> str:
    """The one-line reason for a file or series skipped for its header."""
    return f"malformed DICOM header ({' '.join(str(exc).split())[:120]})"


def _number(value, default: float | None = None) -> float | None:
    """A header's number, or ``default`` where it is absent, not a number or not finite (a tag that only
    refines the geometry; a value the pixels depend on is checked where it is read)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if np.isfinite(number) else default


def _joined(value) -> str:
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if not isinstance(value, str) else value


def _first(seq_item, seq_name: str, attr: str):
    seq = seq_item.get(seq_name) if seq_item is not None else None
    if seq and attr in seq[0]:
        return seq[0][attr].value
    return None


def _sop_instance(ds) -> str:
    return str(ds.get("SOPInstanceUID", "") or "") or file_meta_value(ds, "MediaStorageSOPInstanceUID")


def _skip_reason(ds) -> str | None:
    sop = sop_class_of(ds)
    if "Rows" not in ds or "Columns" not in ds:
        name = sop_name(sop) or "no SOP class"
        return f"not an image ({name})"
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality != "CT":
        return f"modality {modality}, not CT"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer (scout/topogram)"
    if sop and sop not in CT_IMAGE_SOP_CLASSES:
        return f"{sop_name(sop) or sop} is not a CT image"
    if not modality:
        return "no Modality"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "colour image, not a CT slice"
    return photometric_reason(ds)


def _slice_refs(path: Path, ds) -> list[SliceRef]:
    """One SliceRef per slice (per frame of an enhanced multi-frame file)."""
    sop_class, sop_uid = sop_class_of(ds), _sop_instance(ds) or f"file:{path.resolve()}"
    shape = (int(ds.Rows), int(ds.Columns))
    instance = _number(ds.get("InstanceNumber"))
    instance = None if instance is None else int(instance)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        slope, intercept = dicom_rescale(ds)
        ipp = finite_floats(ds.get("ImagePositionPatient"), 3)
        return [SliceRef(path, None, sop_class, sop_uid, instance, None if ipp is None else np.array(ipp),
                         finite_floats(ds.get("ImageOrientationPatient"), 6), pixel_spacing(ds.get("PixelSpacing")),
                         shape, slope, intercept, str(ds.get("RescaleType", "") or ""), _joined(ds.get("ImageType")),
                         _number(ds.get("SliceLocation")))]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        raise InputError(f"{path.name}: multi-frame image without per-frame positions")
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    refs = []
    for k, item in enumerate(per_frame):
        ipp = finite_floats(_first(item, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = finite_floats(_first(item, "PlaneOrientationSequence", "ImageOrientationPatient")
                            or _first(shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        spacing = pixel_spacing(_first(item, "PixelMeasuresSequence", "PixelSpacing")
                           or _first(shared, "PixelMeasuresSequence", "PixelSpacing"))
        slope, intercept = dicom_rescale(ds, frame=k)
        rescale_type = (_first(item, "PixelValueTransformationSequence", "RescaleType")
                        or _first(shared, "PixelValueTransformationSequence", "RescaleType") or "")
        frame_type = (_first(item, "CTImageFrameTypeSequence", "FrameType")
                      or _first(shared, "CTImageFrameTypeSequence", "FrameType") or ds.get("ImageType"))
        refs.append(SliceRef(path, k, sop_class, sop_uid, instance, None if ipp is None else np.array(ipp), iop,
                             spacing, shape, slope, intercept, str(rescale_type), _joined(frame_type)))
    return refs


def scan_dicom(files: Iterable[Path], limits: DecodeLimits = DEFAULT_LIMITS
               ) -> tuple[dict[str, list[tuple[SliceRef, object]]], list[Skipped], dict[str, str]]:
    """Read headers; group usable slices by SeriesInstanceUID; list the rest with a reason.

    Every instance's declared size is checked against ``limits`` before anything else is kept (an
    instance over them is skipped with the reason). A series keeps its slices up to the series
    limits; past them only its slices and pixels are counted, and the third item maps its UID to the
    reason it is refused. Every slice of a series is paired with the series' first header (the
    others are not kept: a header is a few kB, a series thousands of them)."""
    groups: dict[str, list[tuple[SliceRef, object]]] = defaultdict(list)
    skipped: list[Skipped] = []
    headers: dict[str, object] = {}
    slices: dict[str, int] = defaultdict(int)
    pixels: dict[str, int] = defaultdict(int)
    for path in files:
        if not looks_like_dicom(path):
            skipped.append(Skipped(str(path), "not a DICOM or NIfTI file"))
            continue
        slice_of = None  # the series of a CT slice whose header read: one set aside now leaves it a gap
        try:
            ds = read_dicom(path, path.name, stop_before_pixels=True)
            reason = _skip_reason(ds)
            if reason is None:
                slice_of = str(ds.get("SeriesInstanceUID", "") or f"{NO_SERIES_UID}{path.parent.resolve()}")
                size = check_dicom_instance(ds, path.name, limits)  # docs/architecture.md rule 8
                refs = _slice_refs(path, ds)
        except EdgeKidneyError as exc:
            skipped.append(Skipped(str(path), str(exc).removeprefix(f"{path.name}: "), slice_of))
            continue
        except MALFORMED as exc:  # pydicom converts a value when it is read: a bad one surfaces here
            skipped.append(Skipped(str(path), malformed(exc), slice_of))
            continue
        if reason is not None:
            skipped.append(Skipped(str(path), reason))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"{NO_SERIES_UID}{path.parent.resolve()}")
        slices[uid] += len(refs)
        pixels[uid] += size.rows * size.cols * len(refs)
        if limits.series_excess(slices[uid], pixels[uid]) is None:
            header = headers.setdefault(uid, ds)
            groups[uid].extend((ref, header) for ref in refs)
    too_large = {uid: why for uid in slices if (why := limits.series_excess(slices[uid], pixels[uid]))}
    return groups, skipped, too_large  # a series' first instance is within the limits: every series has slices


# -- one series: order and check --------------------------------------------------------------------
def build_series(uid: str, members: list[tuple[SliceRef, object]]) -> DicomSeries:
    """Order the slices of one series and check its geometry (warnings and refusals)."""
    warnings: list[str] = []
    refusal: str | None = None
    seen: dict[tuple[str, int | None], SliceRef] = {}
    for ref, _ in members:
        seen.setdefault((ref.sop_instance_uid, ref.frame), ref)
    refs = list(seen.values())
    if len(refs) < len(members):
        warnings.append(f"{len(members) - len(refs)} duplicate instance(s) (same SOP Instance UID) dropped")
    header = members[0][1]
    if uid.startswith(NO_SERIES_UID):
        warnings.append("no SeriesInstanceUID: the slices of one folder are taken as one series")

    shapes = {r.shape for r in refs}
    if len(shapes) > 1:
        counts = {shape: sum(r.shape == shape for r in refs) for shape in sorted(shapes)}
        sizes = ", ".join(f"{n} of {shape[1]}x{shape[0]} px" for shape, n in counts.items())
        refusal = (f"slices of different sizes in one series: {sizes} (a scout or a reformat sent in the series? "
                   "a localizer's ImageType says LOCALIZER, and such slices are skipped)")
    not_hu = sorted({r.rescale_type for r in refs if r.rescale_type and r.rescale_type.upper() != "HU"})
    if not_hu:
        kinds = sorted({r.image_type for r in refs if r.image_type})
        refusal = (f"pixel values are not Hounsfield units (RescaleType {', '.join(not_hu)}"
                   f"{'; image type ' + ', '.join(kinds) if kinds else ''}): a derived map, not a CT image")
    orientations = [r.orientation for r in refs if r.orientation is not None]
    iop = orientations[0] if orientations else None
    if iop is not None and any(np.max(np.abs(np.subtract(o, iop))) > ORIENTATION_TOLERANCE for o in orientations):
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        refusal = refusal or f"mixed orientations ({distinct} different ImageOrientationPatient values) in one series"

    have_positions = iop is not None and len(orientations) == len(refs) and all(r.position is not None for r in refs)
    if have_positions:
        row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
        normal = canonical_normal(np.cross(row_cos, col_cos))
        plane = plane_of(normal)
        proj = [float(r.position @ normal) for r in refs]
        order = sorted(range(len(refs)), key=lambda k: (proj[k], refs[k].instance_number or 0))
        refs = [refs[k] for k in order]
        positions = [proj[k] for k in order]
    else:
        row_cos = col_cos = None
        plane = "axial" if iop is None else orientation_plane(iop)
        locations = [r.slice_location for r in refs]
        heights = [None if r.position is None else float(r.position[2]) for r in refs]
        missing = [tag for tag, gone in (("ImageOrientationPatient", len(orientations) != len(refs)),
                                         ("ImagePositionPatient", any(r.position is None for r in refs))) if gone]
        if iop is None and None not in heights and len(set(heights)) == len(refs):
            # positions without an orientation: taken as axial (below), so the patient's z orders them
            order = sorted(range(len(refs)), key=lambda k: heights[k])
            refs, positions = [refs[k] for k in order], [heights[k] for k in order]
            warnings.append("no usable ImageOrientationPatient: slices ordered by ImagePositionPatient's z")
        elif None not in locations and len(set(locations)) == len(refs):
            # SliceLocation: the slice's position along the patient's axis, its origin and sign the scanner's
            # (most give the patient z: feet to head for axial slices)
            refs.sort(key=lambda r: r.slice_location)
            positions = sorted(locations)
            warnings.append(f"no usable {' or '.join(missing)}: slices ordered by SliceLocation, positions in mm "
                            "from it (its sign is the scanner's: most run feet to head)")
        elif any(r.instance_number is None for r in refs):
            refusal = refusal or "slices have neither ImagePositionPatient nor InstanceNumber: their order is unknown"
            positions = [float(k) for k in range(len(refs))]
        else:
            refs.sort(key=lambda r: (r.instance_number, r.frame or 0))
            spacing = (_number(header.get("SpacingBetweenSlices"), 0.0) or _number(header.get("SliceThickness"), 0.0)
                       or 1.0)
            positions = [k * spacing for k in range(len(refs))]
            warnings.append(f"no usable {' or '.join(missing)}: slices ordered by InstanceNumber, positions "
                            "estimated from the slice spacing; which end is the feet is not known")
        if iop is None:
            warnings.append("no usable ImageOrientationPatient: the plane is taken as axial (lungs and skull are "
                            "not measured)")

    allows_reformat = have_positions  # a coronal reformat needs the slices' true geometry
    if have_positions and len(refs) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < POSITION_TOLERANCE_MM):
            n_shared = int(np.sum(gaps < POSITION_TOLERANCE_MM))
            refusal = refusal or (f"{n_shared} slice(s) share a position with another: more than one stack in the "
                                  "series (phases or reconstructions); send them as separate series")
        else:
            if gaps.max() / gaps.min() > SPACING_WARN_RATIO and gaps.max() - gaps.min() > 0.05:
                warnings.append(f"uneven slice spacing {gaps.min():.2f}-{gaps.max():.2f} mm (median "
                                f"{np.median(gaps):.2f}): gaps or mixed reconstructions; positions are reported in mm")
            drift = refs[-1].position - refs[0].position
            cosang = abs(float(drift @ normal)) / (np.linalg.norm(drift) or 1.0)
            tilt = float(np.degrees(np.arccos(min(1.0, cosang))))
            tilt_tag = abs(_number(header.get("GantryDetectorTilt"), 0.0))
            tilt = max(tilt, tilt_tag)
            if tilt > TILT_WARN_DEGREES:
                allows_reformat = False
                warnings.append(f"gantry tilt {tilt:.1f} deg: slices are sheared; classified as acquired, "
                                "no coronal reformat")

    transform = DisplayTransform()
    spacing = refs[0].pixel_spacing or (1.0, 1.0)
    display_shape = refs[0].shape
    origin = row_dir = col_dir = None
    if row_cos is not None:
        found = display_transform(row_cos, col_cos, plane)
        if found is None:
            allows_reformat = False
            warnings.append(f"{plane} slices not aligned with the patient axes: classified as acquired")
        else:
            transform = found
            oblique = obliquity(row_cos, col_cos)
            if oblique > OBLIQUE_WARN_DEGREES and allows_reformat:  # turned as if aligned (a tilt says so already)
                allows_reformat = False
                warnings.append(f"slices oblique by {oblique:.1f} deg to the patient axes: classified as acquired"
                                + (", no coronal reformat" if plane == "axial" else ""))
            if transform.transpose:
                spacing, display_shape = (spacing[1], spacing[0]), display_shape[::-1]
            r0, c0 = transform.source_index(0, 0, refs[0].shape)
            src = refs[0].pixel_spacing or (1.0, 1.0)
            origin = refs[0].position + c0 * src[1] * row_cos + r0 * src[0] * col_cos
            r1, c1 = transform.source_index(1, 0, refs[0].shape)
            row_dir = (c1 - c0) * row_cos + (r1 - r0) * col_cos
            r2, c2 = transform.source_index(0, 1, refs[0].shape)
            col_dir = (c2 - c0) * row_cos + (r2 - r0) * col_cos
    if refs[0].pixel_spacing is None:
        warnings.append("no PixelSpacing (or not two positive numbers): 1 mm assumed")
    refusal = refusal or pixel_spacing_reason(refs[0].pixel_spacing)
    description = str(header.get("SeriesDescription", "") or "")
    thickness = header.get("SliceThickness") or _first(
        header.SharedFunctionalGroupsSequence[0] if header.get("SharedFunctionalGroupsSequence") else None,
        "PixelMeasuresSequence", "SliceThickness")
    return DicomSeries(
        kind="dicom", identity=identity_hash(uid), uid=uid, description=description, modality="CT",
        acquired_plane=plane, positions=positions, pixel_spacing=(float(spacing[0]), float(spacing[1])),
        shape=tuple(display_shape), origin=origin, row_direction=row_dir, col_direction=col_dir,
        warnings=warnings, refusal=refusal, allows_reformat=allows_reformat, orientation_known=iop is not None,
        slice_thickness=_number(thickness) or None,
        refs=refs, header=header, transform=transform)


def _series_order(series: Series) -> tuple[int, str]:
    number = series.header.get("SeriesNumber") if getattr(series, "header", None) is not None else None
    try:
        return int(number), series.identity
    except (TypeError, ValueError):
        return 1 << 30, series.identity


def read_series(paths: Iterable[str | Path],
                limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[list[Series], list[Skipped]]:
    """Files and folders -> the CT series they hold (DICOM by SeriesInstanceUID; each NIfTI file is
    one series) and the files skipped, with reasons. Raises InputError when nothing usable is found.

    ``limits`` (docs/architecture.md rule 8): an instance or a NIfTI file declaring more is skipped
    with the reason; a DICOM series with more slices or pixels than a series may have is refused."""
    from edgekidney.data.volume import read_nifti

    files = expand_paths(paths)
    nifti = [f for f in files if is_nifti(f)]
    groups, skipped, too_large = scan_dicom((f for f in files if not is_nifti(f)), limits)
    series: list[Series] = []
    for uid, members in groups.items():
        try:
            one = build_series(uid, members)
        except MALFORMED as exc:
            why = f"its series could not be assembled: {malformed(exc)}"
            skipped.extend(Skipped(str(ref.path), why) for ref, _ in members)
            continue
        if uid in too_large:
            one.refusal = f"too large: {too_large[uid]}"
        series.append(one)
    series.sort(key=_series_order)
    for f in nifti:
        try:
            series.append(read_nifti(f, limits))
        except DependencyError:
            raise
        except EdgeKidneyError as exc:
            skipped.append(Skipped(str(f), str(exc).removeprefix(f"{f.name}: ")))
    if not series:
        reasons = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise InputError(f"no CT series found in {len(files)} file(s): {reasons}{more}")
    return series, skipped
