"""NIfTI CT volumes (.nii, .nii.gz) as a series of axial slices (nibabel, the ``nifti`` extra).

- Orientation comes from the affine (``nibabel.io_orientation``): the volume is turned to L-P-S
  voxel axes, so that each axial slice comes out in the same display orientation as a DICOM axial
  slice (patient's right on the image's left, anterior at the top) and slices run feet to head.
  Slice positions are the affine's z (mm) of each slice. An oblique affine is warned about.
- Values are taken as Hounsfield units as stored (after the header's scl_slope/scl_inter).
- A volume that is clearly not CT is refused (the series is ``not_assessable``, nothing is
  classified): :func:`not_ct_reason` says why. The test is on intensities, since NIfTI carries no
  modality: CT of a body always holds air (<= -900 HU, or the scanner's padding below it) in a
  few percent of its voxels, and almost nothing above 4000 HU. MR, PET or unscaled data have no air
  in HU terms (MR is >= 0 give or take noise).

A NIfTI file is one file: the volume is held in memory as stored (int16 for most CT). Before it is
read, the header's dims are checked against :class:`~edgekidney.data.limits.DecodeLimits`
(docs/architecture.md rule 8): each axial slice as a slice (side, pixels, aspect), the volume as a
series (slices, voxels); and an uncompressed file must hold the bytes its header declares. A few
hundred bytes of header declaring 60000 x 60000 x 1000 voxels is refused in milliseconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from edgekidney.errors import DependencyError, ImageTooLargeError, InputError
from edgekidney.data.geometry import obliquity, pixel_spacing_reason
from edgekidney.data.limits import DEFAULT_LIMITS, DecodeLimits
from edgekidney.data.series import Series, is_nifti

AIR_HU = -900.0
MIN_AIR_FRACTION = 0.02
MAX_HU = 4000.0
MAX_ABOVE_FRACTION = 0.005
NIFTI_HINT = "pip install 'edgekidney[nifti]' (nibabel)"
UNITS_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}  # the header's xyz units, in millimetres


def not_ct_reason(values: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> str | None:
    """None when the intensities look like CT in HU; else a one-line reason. ``values`` may be stored
    values that ``slope`` and ``inter`` map to HU: a sample is scaled, never the whole volume."""
    v = np.ravel(np.asarray(values), order="K")  # a view of a contiguous volume, in its memory order
    if v.size > 2_000_000:
        v = v[:: v.size // 1_000_000]
    if (slope, inter) != (1.0, 0.0):
        v = v.astype(np.float64) * slope + inter
    if v.size == 0:
        return "empty volume"
    air = float(np.mean(v <= AIR_HU))
    above = float(np.mean(v > MAX_HU))
    if air < MIN_AIR_FRACTION:
        return (f"not CT in Hounsfield units: {100 * air:.1f} % of voxels at air density (<= {AIR_HU:.0f}; a body CT "
                f"has >= {100 * MIN_AIR_FRACTION:.0f} %), values {float(v.min()):.0f}..{float(v.max()):.0f} "
                "(MR, PET or unscaled data?)")
    if above > MAX_ABOVE_FRACTION:
        return f"not CT in Hounsfield units: {100 * above:.1f} % of voxels above {MAX_HU:.0f}"
    return None


class VolumeSeries(Series):
    """An in-memory volume in L-P-S voxel order; axial slices are ``volume[:, :, k].T``."""

    volume: np.ndarray  # as stored in the file (its dtype, unscaled), turned to L-P-S without a copy
    scale: tuple[float, float] = (1.0, 0.0)  # the header's scl_slope, scl_inter: stored value -> HU

    def hu_slices(self) -> Iterator[np.ndarray]:
        for k in range(self.volume.shape[2]):
            yield self.hu_slice(k)

    def hu_slice(self, index: int) -> np.ndarray:
        """One axial slice (by position index) in HU, display orientation."""
        hu = np.ascontiguousarray(self.volume[:, :, index].T, dtype=np.float32)
        slope, inter = self.scale
        return hu if (slope, inter) == (1.0, 0.0) else hu * np.float32(slope) + np.float32(inter)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _unreadable(path: Path, exc: Exception) -> InputError:
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return InputError(f"{path.name}: not a readable NIfTI volume ({text})")


def check_declared_volume(img, path: Path, to_lps: np.ndarray, limits: DecodeLimits) -> tuple[int, int, int]:
    """The volume's (x, y, z) in L-P-S voxel order as its header declares it, checked against ``limits``
    before any voxel is read: an axial slice is x by y pixels, the volume a series of z of them."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{path.name}: NIfTI has shape {shape}; expected a 3-D volume")
    if min(shape) < 1:
        raise InputError(f"{path.name}: NIfTI has shape {shape}: no voxels")
    lps = [0, 0, 0]
    for axis, n in enumerate(shape):
        lps[int(to_lps[axis, 0])] = n
    nx, ny, nz = lps
    limits.check(nx, ny, path.name)
    limits.check_series(nz, nx * ny * nz, path.name)
    stored, cap = nx * ny * nz * img.get_data_dtype().itemsize, 2 * limits.max_series_pixels
    if stored > cap:  # the volume is held as stored: int16 at the series limit is what a device must hold
        raise ImageTooLargeError(f"{path.name}: NIfTI declares {stored / 1e9:.2f} GB of {img.get_data_dtype()} voxels; "
                                 f"at most {cap / 1e9:.2f} GB is read into memory (int16 at the series limit)")
    if not path.name.lower().endswith(".gz"):  # uncompressed: the file must hold what the header declares
        declared = int(img.dataobj.offset) + nx * ny * nz * img.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < declared:
            raise InputError(f"{path.name}: NIfTI is truncated ({size} bytes; its header declares "
                             f"{nx}x{ny}x{nz} voxels, {declared} bytes)")
    return nx, ny, nz


def read_nifti(path: str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> VolumeSeries:
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path.name}: not a NIfTI file (.nii or .nii.gz)")
    try:
        import nibabel as nib
    except ImportError:
        raise DependencyError(f"{path.name}: reading NIfTI needs nibabel: {NIFTI_HINT}") from None
    try:
        img = nib.load(str(path))  # the header; the voxels stay in the file until dataobj is read
        affine = img.affine
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors ...
        raise _unreadable(path, exc) from None
    # before the orientation is worked out from it (NaN: "SVD did not converge"; a zero column: an axis lost)
    if not np.isfinite(np.asarray(affine, dtype=float)).all() or np.any(np.linalg.norm(affine[:3, :3], axis=0) <= 0):
        raise InputError(f"{path.name}: NIfTI affine is not finite or has a zero voxel size: positions unknown")
    try:
        ornt = nib.orientations.io_orientation(affine)
        to_lps = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("L", "P", "S")))
    except Exception as exc:
        raise _unreadable(path, exc) from None
    dtype = img.get_data_dtype()
    if dtype.fields is not None or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"{path.name}: NIfTI voxels are {dtype} (colour or complex), not CT values")
    check_declared_volume(img, path, to_lps, limits)  # docs/architecture.md rule 8
    proxy = img.dataobj
    try:  # as stored: nibabel's scaling would make a float64 copy (8 bytes a voxel); it is applied per slice
        data = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    except Exception as exc:
        raise _unreadable(path, exc) from None
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0.0:
        slope, inter = 1.0, 0.0  # NIfTI: a zero or missing scl_slope means the values are as stored
    checked = data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    data = nib.orientations.apply_orientation(data, to_lps)
    affine = affine @ nib.orientations.inv_ornt_aff(to_lps, img.shape[:3])
    to_mm = UNITS_MM.get(img.header.get_xyzt_units()[0], 1.0)  # NIfTI may say metres or microns; unknown: mm
    affine = np.diag([to_mm, to_mm, to_mm, 1.0]) @ affine
    warnings: list[str] = []
    oblique = obliquity(*affine[:3, :3].T)
    if oblique > 1.0:
        warnings.append(f"affine is oblique by {oblique:.1f} deg: slices taken along the nearest axis")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    reason = ("voxels hold NaN or infinity: not CT in Hounsfield units" if data.dtype.kind == "f" and not all(
        np.isfinite(data[:, :, k:k + 32]).all() for k in range(0, data.shape[2], 32)) else not_ct_reason(checked, slope, inter))
    positions = [float((affine @ np.array([0.0, 0.0, k, 1.0]))[2]) for k in range(data.shape[2])]
    # RAS world -> LPS: negate x and y
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    origin = ras_to_lps @ (affine @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
    series = VolumeSeries(
        kind="nifti", identity=_file_hash(path), uid=str(path), description=path.name, modality="CT" if reason is None
        else "unknown", acquired_plane="axial", positions=positions,
        pixel_spacing=(float(zooms[1]), float(zooms[0])), shape=(int(data.shape[1]), int(data.shape[0])),
        origin=origin, row_direction=np.array([0.0, 1.0, 0.0]), col_direction=np.array([1.0, 0.0, 0.0]),
        warnings=warnings, refusal=reason or pixel_spacing_reason((zooms[1], zooms[0])), allows_reformat=oblique <= 1.0, slice_thickness=float(zooms[2]))
    series.volume, series.scale = data, (slope, inter)
    return series
