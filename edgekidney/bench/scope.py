"""Out of scope and calculus pairs on real CT of other hospitals (``benchmarks/scope.py``).

1. Out of scope: the share of slices the model refuses in sets it must refuse (an MR volume, a head CT,
   the liver dome and lung bases, a blank image, noise, a drawn picture) and in-scope sets it should
   keep (kidney-level slices of another hospital's CT, the validation split); and how well the
   Mahalanobis distance and the energy score each separate the validation slices from the rest (AUROC).
2. Calculus pairs: kidney-level slices of another hospital's CT, each with and without a calculus
   (3-9 mm, 600-1200 HU, blurred) placed in HU space where a kidney lies (:mod:`edgekidney.data.calculus`):
   the paired rise of p(stone) and the decision on each side.

The NIfTI volumes are read with nibabel (canonical RAS, shown as radiologists do: anterior up, the
patient's left on the image's right); the head CT is an enhanced multi-frame DICOM.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from edgekidney.data.calculus import CalculusSpec, draw_calculus, kidney_sites
from edgekidney.data.preprocess import window_hu

# where the public CT volumes are ($EDGEKIDNEY_VOLUMES, as the tests read it; README, "Real data")
VOLUMES = Path(os.environ.get("EDGEKIDNEY_VOLUMES",
                              Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct-volumes"))


def nifti_axial_slices(path: Path) -> tuple[list[np.ndarray], float]:
    """Axial slices (HU as stored) in display orientation, and the in-plane pixel size in mm."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    return [vol[::-1, ::-1, z].T.copy() for z in range(vol.shape[2])], float(img.header.get_zooms()[0])


def multiframe_hu(path: Path) -> list[np.ndarray]:
    """Frames of an enhanced multi-frame CT in HU (shared or per-frame rescale)."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    frames = ds.pixel_array.astype(np.float32)
    frames = frames if frames.ndim == 3 else frames[None]
    out = []
    for i, f in enumerate(frames):
        slope, intercept = 1.0, 0.0
        for groups in (getattr(ds, "PerFrameFunctionalGroupsSequence", [None] * len(frames))[i],
                       (getattr(ds, "SharedFunctionalGroupsSequence", None) or [None])[0]):
            seq = getattr(groups, "PixelValueTransformationSequence", None) if groups is not None else None
            if seq:
                slope, intercept = float(seq[0].RescaleSlope), float(seq[0].RescaleIntercept)
                break
        out.append(f * slope + intercept)
    return out


def drawn_picture(size: int = 256) -> np.ndarray:
    """A drawn non-CT picture: shapes and strokes on a white page."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    d.ellipse([30, 40, 150, 160], outline=0, width=6)
    d.rectangle([120, 120, 220, 220], fill=90)
    d.line([10, 240, 240, 10], fill=30, width=8)
    d.polygon([(60, 200), (100, 230), (40, 240)], fill=160)
    return np.asarray(im, dtype=np.float32) / 255.0


def out_of_scope_sets(card, volumes: Path = VOLUMES) -> dict[str, list[np.ndarray]]:
    """Named sets of 2-D slices in 0..1: those marked ``must_refuse`` the model must call out of scope."""
    pre = card.preprocessing

    def win(hu_slices):
        return [window_hu(s, pre.window_center, pre.window_width) for s in hu_slices]

    abdomen, _ = nifti_axial_slices(volumes / "abdomen-ct.nii.gz")
    kidneys, _ = nifti_axial_slices(volumes / "kidneys-ct-crop.nii.gz")
    mr, _ = nifti_axial_slices(volumes / "not-ct-mr.nii.gz")
    rng = np.random.default_rng(0)
    return {
        "mr_volume": win(mr),
        "head_ct_multiframe": win(multiframe_hu(volumes / "enhanced-ct-multiframe.dcm")),
        "liver_dome_lung_bases": win(abdomen[-10:]),
        "blank": [np.zeros((256, 256), np.float32), np.ones((256, 256), np.float32)],
        "noise": [rng.random((256, 256)).astype(np.float32) for _ in range(4)],
        "drawn_picture": [drawn_picture()],
        "kidney_level_other_hospital": win(kidneys[5:20]),
    }


MUST_REFUSE = ("mr_volume", "head_ct_multiframe", "liver_dome_lung_bases", "blank", "noise", "drawn_picture")


def run_scope(model: Path, val_manifest: Path | None = None, volumes: Path = VOLUMES, log=print) -> dict:
    from edgekidney.data.dataset import read_manifest
    from edgekidney.data.decode import load_slice
    from edgekidney.runtime.predict import Classifier, classify_batch
    from edgekidney.scope import energy, separation_auc

    out: dict = {"model": str(model), "sets": {}}
    with Classifier(model) as clf:
        if clf.card.scope_threshold is None:
            raise SystemExit(f"{model}: has no out-of-scope detector")
        sets = out_of_scope_sets(clf.card, volumes)
        if val_manifest is not None:
            val = [s for s in read_manifest(val_manifest) if s.split == "val"]
            sets["validation_split"] = [load_slice(s.path, clf.card.preprocessing) for s in val]
        scores = {}
        for name, slices in sets.items():
            r = classify_batch(clf, slices)
            scores[name] = (r.distances, energy(r.logits))
            called = [lab == clf.card.positive_class for lab in r.labels]
            out["sets"][name] = {"n": len(slices), "out_of_scope": int((~r.in_scope).sum()),
                                 "distance_quantiles": np.quantile(r.distances, [0.1, 0.5, 0.9]).round(3).tolist(),
                                 "p_stone_median": float(np.median(r.probs[:, clf.card.positive_index])),
                                 "fraction_out_of_scope": float((~r.in_scope).mean()),
                                 "called_stone": int(sum(called)), "must_refuse": name in MUST_REFUSE}
            log(f"  {name:<30} {out['sets'][name]['out_of_scope']:>3}/{len(slices):<3} out of scope, "
                f"{sum(called)} called stone")
    if "validation_split" in scores:
        ref_d, ref_e = scores["validation_split"]
        ood = [k for k in MUST_REFUSE if k in scores]
        d_out = np.concatenate([scores[k][0] for k in ood])
        e_out = np.concatenate([scores[k][1] for k in ood])
        out["separation_auroc"] = {"mahalanobis": separation_auc(ref_d, d_out), "energy": separation_auc(ref_e, e_out),
                                   "in": "validation split", "out": list(ood)}
    return out


def run_calculus_pairs(model: Path, volumes: Path = VOLUMES, per_slice: int = 3, seed: int = 0, log=print,
                       val_manifest: Path | None = None) -> dict:
    """Kidney-level slices of another hospital's CT with and without a placed calculus (4-8 mm, 600-1200 HU).

    With ``val_manifest``, the same on the validation split's slices without a stone (in the windowed
    image, calculus at saturation), to tell "does not see calculi" from "does not see them elsewhere".
    """
    from edgekidney.data.dataset import read_manifest
    from edgekidney.data.decode import load_slice
    from edgekidney.runtime.predict import Classifier

    rng = np.random.default_rng(seed)
    kidneys, mm = nifti_axial_slices(volumes / "kidneys-ct-crop.nii.gz")
    with Classifier(model) as clf:
        pre = clf.card.preprocessing
        base, placed = [], []
        for hu in kidneys[5:20]:
            gray = window_hu(hu, pre.window_center, pre.window_width)
            for site in kidney_sites(gray, rng, per_slice):
                spec = CalculusSpec(diameter_px=float(rng.uniform(4, 8) / mm * 1.0), value=float(rng.uniform(600, 1200)),
                                    blur_px=float(rng.uniform(0.3, 0.8)), row=site[0], col=site[1])
                base.append(gray)
                placed.append(window_hu(draw_calculus(hu, spec), pre.window_center, pre.window_width))
        if not base:
            raise SystemExit("no kidney sites found")
        res = _pair_report(clf, base, placed, "other hospital (kidneys-ct-crop.nii.gz)")
        if val_manifest is not None:
            vb, vp = [], []
            negatives = [s for s in read_manifest(val_manifest) if s.split == "val" and s.class_name != clf.card.positive_class]
            for s in negatives[:: max(1, len(negatives) // 60)]:
                gray = load_slice(s.path, pre)
                for placed_slice in place_in_windowed(gray, rng):
                    vb.append(gray)
                    vp.append(placed_slice)
            if vb:
                res["validation_pairs"] = _pair_report(clf, vb, vp, "validation split, no stone")
    log(f"  {res['pairs']} pairs: calculus found {res['found_with_calculus']:.2f}, twins not stone "
        f"{res['twin_not_called_stone']:.2f}, median p rise {res['p_rise_median']:+.3f}")
    if "validation_pairs" in res:
        v = res["validation_pairs"]
        log(f"  validation: {v['pairs']} pairs: calculus found {v['found_with_calculus']:.2f}, twins not stone "
            f"{v['twin_not_called_stone']:.2f}, median p rise {v['p_rise_median']:+.3f}")
    return res


def place_in_windowed(gray: np.ndarray, rng: np.random.Generator, n: int = 1,
                      value: tuple[float, float] = (0.9, 1.0)) -> list[np.ndarray]:
    """Copies of a windowed slice (0..1), each with a 4-8 mm calculus at saturation placed where a kidney
    lies (up to ``n`` sites; the slice is taken to span 350 mm): the validation pairs' positive side.
    ``value`` above 1 (window units) is drawn, blurred, then clipped at the window's top."""
    return [np.minimum(draw_calculus(gray, CalculusSpec(float(rng.uniform(4, 8) * gray.shape[1] / 350.0),
                                                        float(rng.uniform(*value)), float(rng.uniform(0.3, 0.8)),
                                                        row, col)), 1.0)
            for row, col in kidney_sites(gray, rng, n)]


def _pair_report(clf, base: list[np.ndarray], placed: list[np.ndarray], source: str) -> dict:
    pb = clf.predict_slices(base, [f"twin{i}" for i in range(len(base))])
    pp = clf.predict_slices(placed, [f"calculus{i}" for i in range(len(placed))])
    stone = clf.card.positive_class
    rise = np.array([b.probability for b in pp]) - np.array([a.probability for a in pb])
    return {"source": source, "pairs": len(base),
           "found_with_calculus": float(np.mean([p.label == stone for p in pp])),
           "twin_not_called_stone": float(np.mean([p.label != stone for p in pb])),
           "out_of_scope_with_calculus": float(np.mean([p.label == "out_of_scope" for p in pp])),
           "out_of_scope_twin": float(np.mean([p.label == "out_of_scope" for p in pb])),
           "p_rise_median": float(np.median(rise)), "p_rise_mean": float(rise.mean()),
           "p_twin_median": float(np.median([p.probability for p in pb])),
           "p_calculus_median": float(np.median([p.probability for p in pp]))}


def main(argv: list[str] | None = None) -> int:
    from edgekidney.jsonio import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--val", type=Path, default=None, help="RUN/split.csv: the validation split as in-scope reference")
    p.add_argument("--volumes", type=Path, default=VOLUMES)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    result = {"scope": run_scope(a.model, a.val, a.volumes),
              "calculus_pairs": run_calculus_pairs(a.model, a.volumes, val_manifest=a.val)}
    if a.json:
        write_json(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
