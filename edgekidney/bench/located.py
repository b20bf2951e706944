"""Where the model points: the located share on slices whose stones are outlined (``benchmarks/located.py``).

Of the validation Stone slices that have a mask and that the model calls stone, how many have their
``cam_peak`` (the stone map's maximum within the body, on the original slice) within 5 % of the slice's
longer side of a stone pixel. The chance level is the share of body pixels that lie that close to a
stone: where a peak put at random in the body would count as located. Per model, so a quantized child
can be compared with its parent (peak agreement: the share of slices whose two peaks lie within the
same reach of each other).

Each outlined slice is also scored with its stone painted over in the tissue around it
(:func:`edgekidney.data.calculus.paint_over`): a model that calls the stone and not the look of the
scanner it came from calls few of those erased slices stone (``erased_called_stone``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edgekidney.data.dataset import read_manifest
from edgekidney.data.decode import load_slice
from edgekidney.data.masks import distance_to_mask, mask_path, read_mask
from edgekidney.errors import InputError

REACH = 0.05  # of the slice's longer side


def masked_stones(manifest: Path, masks: Path, data: Path, split: str = "val", positive: str = "Stone"):
    """(image path, mask path) of the split's positive slices that have a mask."""
    out = []
    for s in read_manifest(Path(manifest)):
        if s.split != split or s.class_name != positive:
            continue
        m = mask_path(masks, data, s.path)
        if m.exists():
            out.append((s.path, m))
    if not out:
        raise InputError(f"{manifest}: no {split} {positive} slice has a mask under {masks}")
    return out


def erased_slices(slices: list[np.ndarray], masks: list[np.ndarray], seed: int = 0) -> list[np.ndarray | None]:
    """Each outlined slice with its stone painted over (None where no tissue surrounds the stone)."""
    from edgekidney.data.calculus import paint_over_each

    return paint_over_each(slices, masks, seed)


def located(model: Path, pairs, batch_size: int = 8, threads: int | None = None) -> dict:
    from scipy import ndimage

    from edgekidney.runtime.predict import Classifier

    with Classifier(model, threads=threads) as clf:
        pre = clf.preprocessing
        preds, _ = clf.predict_files([p for p, _ in pairs], batch_size=batch_size)
        positive = clf.card.positive_class
        slices = [load_slice(p, pre) for p, _ in pairs]
        masks = [read_mask(m, img.shape) for (_, m), img in zip(pairs, slices)]
        erased = erased_slices(slices, masks)
        kept = [e for e in erased if e is not None]
        erased_preds = iter(clf.predict_slices(kept, [f"erased{i}" for i in range(len(kept))]) if kept else [])
    rows, chance = [], []
    for (img_path, _), img, mask, pred, painted in zip(pairs, slices, masks, preds, erased):
        ep = next(erased_preds) if painted is not None else None
        reach = REACH * max(img.shape)
        d = distance_to_mask(pred.cam_peak, mask) if pred.cam_peak is not None else float("inf")
        rows.append({"path": str(img_path), "called_stone": pred.label == positive, "probability": pred.probability,
                     "cam_peak": None if pred.cam_peak is None else list(pred.cam_peak), "distance_px": d,
                     "reach_px": reach, "located": bool(d <= reach),
                     "erased_called_stone": None if ep is None else ep.label == positive,
                     "erased_probability": None if ep is None else ep.probability})
        body = img > pre.body_threshold
        near = ndimage.distance_transform_edt(~mask) <= reach
        chance.append(float((near & body).sum() / max(1, body.sum())))
    called = [r for r in rows if r["called_stone"]]
    hits = sum(r["located"] for r in called)
    erased_rows = [r for r in rows if r["erased_called_stone"] is not None]
    return {"model": str(model), "n_masked": len(rows), "n_called_stone": len(called), "n_located": hits,
            "located_share": hits / len(called) if called else None,
            "located_share_all_masked": sum(r["located"] for r in rows) / len(rows),
            "median_distance_px": float(np.median([r["distance_px"] for r in called])) if called else None,
            "chance": float(np.mean(chance)), "reach": f"{REACH:.0%} of the slice's longer side",
            "n_erased": len(erased_rows), "erased_called_stone": sum(r["erased_called_stone"] for r in erased_rows),
            "slices": rows}


def peak_agreement(a: dict, b: dict) -> float:
    """Share of slices whose peaks in two results lie within the reach of each other."""
    same = []
    for ra, rb in zip(a["slices"], b["slices"]):
        if ra["cam_peak"] is None or rb["cam_peak"] is None:
            same.append(False)
            continue
        reach = max(1.0, ra["reach_px"])  # the slice's own reach: 5 % of its longer side
        same.append(float(np.hypot(ra["cam_peak"][0] - rb["cam_peak"][0], ra["cam_peak"][1] - rb["cam_peak"][1]))
                    <= reach)
    return float(np.mean(same)) if same else float("nan")


def main(argv: list[str] | None = None) -> int:
    from edgekidney.jsonio import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", type=Path, nargs="+", help="the FP32 model first, then its quantized children")
    p.add_argument("--manifest", type=Path, required=True, help="RUN/split.csv")
    p.add_argument("--data", type=Path, required=True, help="the dataset folder the manifest's paths lie in")
    p.add_argument("--masks", type=Path, required=True, help="the mask folder (same relative paths, .png)")
    p.add_argument("--split", default="val")
    p.add_argument("--min-located", type=float, default=None, help="exit 1 when a model's located share is lower")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    pairs = masked_stones(a.manifest, a.masks, a.data, a.split)
    results = [located(m, pairs) for m in a.models]
    ok = True
    print(f"{'model':<40} {'masked':>6} {'called':>6} {'located':>8} {'share':>6} {'median px':>9} {'chance':>6} "
          f"{'peaks = parent':>14} {'erased: stone':>13}")
    for r in results:
        agree = peak_agreement(results[0], r)
        r["peak_agreement_with_first"] = agree
        share = r["located_share"]
        print(f"{Path(r['model']).name:<40} {r['n_masked']:>6} {r['n_called_stone']:>6} {r['n_located']:>8} "
              f"{(share if share is not None else float('nan')):>6.3f} {(r['median_distance_px'] or float('nan')):>9.1f} "
              f"{r['chance']:>6.3f} {agree:>14.3f} {r['erased_called_stone']:>6}/{r['n_erased']:<6}")
        if a.min_located is not None and (share is None or share < a.min_located):
            ok = False
    if a.json:
        write_json({"results": results}, a.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
