"""The one preprocessing implementation (numpy only).

Every path into the network goes through :func:`preprocess`: training, calibration, export parity,
evaluation, every runtime backend and the HTTP server. Its parameters travel with the model (checkpoint
and ONNX/engine sidecar), so deployment cannot silently disagree with training.

Input is a 2-D grayscale slice scaled to 0..1 (see :mod:`edgekidney.data.decode`, which turns DICOM
Hounsfield units or PNG/JPEG pixels into that). Steps: crop to the body (the patient's outline plus a
margin), pad to square with air (0), antialiased bilinear resize to ``image_size``, replicate to
3 channels, normalize with ``mean``/``std``. :class:`Geometry` records where the network's grid lies
on the original slice, so activation maps can be drawn back onto it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Parameters of the preprocessing, stored with every model."""

    image_size: int = 224
    window_center: float = 40.0  # abdomen window, HU (applied to DICOM and HU-coded PNGs)
    window_width: float = 400.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    min_input_size: int = 32
    # 16-bit PNGs: None scales the full 0..65535 range to 0..1; an integer N reads pixels as HU + N
    # (e.g. 32768 as in DeepLesion, 1024 for common exports) and applies the CT window like DICOM.
    png16_hu_offset: int | None = None
    # Body crop: the patient's outline (pixels above body_threshold in 0..1, largest connected component
    # after an opening) plus body_margin of its size on each side, before padding and resizing.
    body_crop: bool = True
    body_threshold: float = 0.05
    body_margin: float = 0.04
    body_min_fraction: float = 0.03  # a component smaller than this share of the slice is no body
    # Body level: scale intensities so that the median of the body's pixels sits here (air stays 0,
    # saturated bone and calculi stay saturated). Scanners, contrast phases and exports differ in how
    # bright soft tissue is; without this a model can tell hospitals (and so classes) apart by it.
    body_level: float | None = 0.5

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.window_width <= 0:
            raise ValueError(f"window_width must be positive, got {self.window_width}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("body_crop", False)  # models from before the body crop were trained without one
        kw.setdefault("body_level", None)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        return cls(**kw)


def window_hu(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map Hounsfield units to 0..1 with a CT window (values outside are clipped)."""
    lo = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """Centre the slice on a square canvas of air (0) so resizing keeps anatomy undistorted."""
    h, w = img.shape
    if h == w:
        return img
    n = max(h, w)
    out = np.zeros((n, n), dtype=img.dtype)
    top, left = (n - h) // 2, (n - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a square 2-D float image to ``size`` x ``size`` (Pillow, mode F).

    Pillow's resampler allocates only the output and one intermediate row pass, whatever the input's
    aspect ratio, and is what the models were trained with (the earlier numpy copy matched it to 2e-7).
    """
    from PIL import Image

    img = np.asarray(img, dtype=np.float32)
    h, w = img.shape
    if h == size and w == size:
        return img
    return np.asarray(Image.fromarray(img, "F").resize((size, size), Image.BILINEAR), dtype=np.float32)


# why a slice in which the body crop finds no body is out of scope whatever the network says
NO_BODY_REASON = "no patient outline (or no anatomy, one flat value) found in the image"


@dataclass(frozen=True)
class Geometry:
    """Where the network's input grid lies on the original slice (for maps back onto the image).

    The slice was cropped to ``crop`` = (top, bottom, left, right) (exclusive ends), padded to a square
    of side ``side`` with the crop at (``pad_top``, ``pad_left``), and resized to ``size``.
    """

    shape: tuple[int, int]
    crop: tuple[int, int, int, int]
    side: int
    pad_top: int
    pad_left: int
    size: int
    body_found: bool
    body_fraction: float
    # (lung, skull, split share) of an axial slice read in HU (data/anatomy.py); None where not measured.
    # Not in repr or ==: a slice's geometry is its crop, and caches key on it (dicomnet/study_processor.py)
    anatomy: tuple[float, float, float] | None = field(default=None, repr=False, compare=False)

    def to_input(self, row: float, col: float) -> tuple[float, float]:
        """A network-grid position (pixel centres) -> the position on the original slice."""
        scale = self.side / self.size
        return (self.crop[0] - self.pad_top + (row + 0.5) * scale - 0.5,
                self.crop[2] - self.pad_left + (col + 0.5) * scale - 0.5)

    def to_network(self, row: float, col: float) -> tuple[float, float]:
        """A position on the original slice -> the network grid."""
        scale = self.size / self.side
        return ((row - self.crop[0] + self.pad_top + 0.5) * scale - 0.5,
                (col - self.crop[2] + self.pad_left + 0.5) * scale - 0.5)

    def map_to_input(self, grid: np.ndarray) -> np.ndarray:
        """A (size, size) map on the network grid -> the same map on the original slice (0 outside)."""
        from PIL import Image

        full = np.asarray(Image.fromarray(np.asarray(grid, dtype=np.float32), "F")
                          .resize((self.side, self.side), Image.BILINEAR))
        top, bottom, left, right = self.crop
        out = np.zeros(self.shape, dtype=np.float32)
        out[top:bottom, left:right] = full[self.pad_top : self.pad_top + bottom - top,
                                           self.pad_left : self.pad_left + right - left]
        return out


def body_box(img: np.ndarray, config: Preprocessing) -> tuple[tuple[int, int, int, int], bool, float]:
    """The patient's outline: threshold, hole filling, opening, largest component, its box plus a margin.

    Returns ((top, bottom, left, right), found, fraction of the slice the body covers). Where no body is
    found (a blank or nearly empty image) the box is the whole slice and ``found`` is False. The table,
    cables and text labels are thin or small, so the opening and the largest-component rule drop them;
    cropping to the body stops field of view, table and borders from being cues for the classifier.
    """
    from scipy import ndimage

    h, w = img.shape
    step = max(1, int(np.ceil(max(h, w) / 256)))  # find the outline on <= 256 px: ~1 ms per slice
    small = ndimage.binary_fill_holes(img[::step, ::step] > config.body_threshold)  # lungs, bowel gas
    small = ndimage.binary_opening(small, structure=np.ones((3, 3), bool), iterations=3)
    labels, n = ndimage.label(small)
    whole = ((0, h, 0, w), False, 0.0)
    if n == 0:
        return whole
    sizes = np.bincount(labels.ravel())[1:]
    k = int(sizes.argmax())
    fraction = float(sizes[k] / small.size)
    if fraction < config.body_min_fraction:
        return (whole[0], False, fraction)
    if float(img[::step, ::step][labels == k + 1].std()) < 0.01:  # one flat value: a page, not anatomy
        return (whole[0], False, fraction)
    rows, cols = ndimage.find_objects(labels)[k]
    top, bottom = rows.start * step, min(h, rows.stop * step)
    left, right = cols.start * step, min(w, cols.stop * step)
    my = int(round((bottom - top) * config.body_margin))
    mx = int(round((right - left) * config.body_margin))
    return (max(0, top - my), min(h, bottom + my), max(0, left - mx), min(w, right + mx)), True, fraction


def level_body(img: np.ndarray, config: Preprocessing) -> np.ndarray:
    """Scale a slice so that its body's median intensity is ``config.body_level`` (gain within 0.5-2)."""
    step = max(1, int(np.ceil(max(img.shape) / 128)))
    sample = img[::step, ::step]
    body = sample[sample > config.body_threshold]
    if body.size == 0:
        return img
    gain = float(np.clip(config.body_level / max(float(np.median(body)), 1e-3), 0.5, 2.0))
    return np.clip(img * np.float32(gain), 0.0, 1.0)


def preprocess_with_geometry(gray01: np.ndarray, config: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """One 2-D slice in 0..1 -> (network input (3, S, S) float32, where that grid lies on the slice)."""
    anatomy = getattr(gray01, "anatomy", None)  # a single DICOM slice measured in HU (decode.py)
    img = np.asarray(gray01, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale slice, got shape {img.shape}")
    h, w = img.shape
    if config.body_crop:
        crop, found, fraction = body_box(img, config)
    else:
        crop, found, fraction = (0, h, 0, w), True, 1.0
    top, bottom, left, right = crop
    cropped = img[top:bottom, left:right]
    if config.body_level is not None and found:
        cropped = level_body(cropped, config)
    ch, cw = cropped.shape
    side = max(ch, cw)
    geometry = Geometry(shape=(h, w), crop=crop, side=side, pad_top=(side - ch) // 2, pad_left=(side - cw) // 2,
                        size=config.image_size, body_found=found, body_fraction=fraction, anatomy=anatomy)
    img = resize(pad_to_square(cropped), config.image_size)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((img[None, :, :] - mean) / std, dtype=np.float32), geometry


def preprocess(gray01: np.ndarray, config: Preprocessing) -> np.ndarray:
    """One 2-D slice in 0..1 -> network input of shape (3, S, S), float32."""
    return preprocess_with_geometry(gray01, config)[0]


def preprocess_batch(slices: list[np.ndarray], config: Preprocessing) -> np.ndarray:
    """Several 2-D slices -> (N, 3, S, S) float32."""
    return preprocess_batch_with_geometry(slices, config)[0]


def preprocess_batch_with_geometry(slices: list[np.ndarray], config: Preprocessing
                                   ) -> tuple[np.ndarray, list[Geometry]]:
    """Several 2-D slices -> ((N, 3, S, S) float32, one Geometry per slice)."""
    if not slices:
        return np.zeros((0, 3, config.image_size, config.image_size), dtype=np.float32), []
    pairs = [preprocess_with_geometry(s, config) for s in slices]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]
