"""A whole exam from another hospital: where a model's stone calls land in a CT volume (``benchmarks/exam.py``).

A study answers per series, but a radiologist reads the slices it names: each call should sit on
something stone-like in a kidney, and no slice above or below the kidneys should be called at all.
The reference for a volume without a stone label is made from its HU values and a reading of its
anatomy (a JSON file, ``benchmarks/reference/``):

- **the kidneys**: a box per kidney (slices, rows, columns of the volume as ``edgekidney study``
  orders and orients it), drawn by reading the slices;
- **hyperdense foci**: connected regions (26-connected) of at least ``min_hu`` HU, of at most
  ``max_voxels`` voxels over at most ``max_slices`` slices (not a rib, not a vertebra), surrounded by
  soft tissue (the median of a 2-voxel shell around them below ``shell_hu``: not bone), whose centre
  lies in a kidney box. On a non-contrast CT such a focus in a kidney is what a calculus looks like;
  the reference is not a radiologist's reading, and a vascular calcification in the renal sinus
  would pass it too.

Reported, from the series' slice answers (``cam_peak`` on the original slice):

- ``calls_outside_kidneys``: slices called stone that lie outside every kidney box's slices (the
  promise is none);
- ``located``: calls whose peak lies within 5 % of the slice's longer side of a focus on that slice
  or a neighbouring one (the reach of ``benchmarks/located.py``);
- ``foci_found``: foci with a located call on one of their slices or a neighbouring one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgekidney.bench.located import REACH  # 5 % of the slice's longer side: one reach for both benchmarks
NEIGHBOURS = 1  # slices either side of a focus on which a call still counts


def in_box(box: dict, z: float, row: float, col: float) -> bool:
    return all(lo <= v <= hi for v, (lo, hi) in ((z, box["slices"]), (row, box["rows"]), (col, box["cols"])))


def hyperdense_foci(hu: np.ndarray, kidneys: dict[str, dict], min_hu: float = 500.0, max_voxels: int = 40,
                    max_slices: int = 4, shell_hu: float = 60.0) -> list[dict]:
    """The foci of ``hu`` (slices, rows, cols) that pass the reference's rules (module docstring)."""
    from scipy import ndimage

    hot = np.asarray(hu) >= min_hu
    labels, n = ndimage.label(hot, structure=np.ones((3, 3, 3), bool))
    foci = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[box] == k
        size = int(region.sum())
        if size > max_voxels or box[0].stop - box[0].start > max_slices:
            continue
        # the shell: two voxels around the region, within a box grown by two voxels
        grown = tuple(slice(max(0, s.start - 2), min(dim, s.stop + 2)) for s, dim in zip(box, hu.shape))
        mine = labels[grown] == k
        shell = ndimage.binary_dilation(mine, iterations=2) & ~mine
        if float(np.median(hu[grown][shell])) >= shell_hu:
            continue
        z, r, c = (float(v) + s.start for v, s in zip(ndimage.center_of_mass(region), box))
        side = next((name for name, kbox in kidneys.items() if in_box(kbox, z, r, c)), None)
        if side is None:
            continue
        foci.append({"kidney": side, "slices": [box[0].start, box[0].stop - 1], "row": round(r, 1),
                     "col": round(c, 1), "max_hu": float(hu[box][region].max()), "voxels": size})
    return foci


def score_exam(slices: list[dict], foci: list[dict], kidneys: dict[str, dict], shape: tuple[int, int],
               positive: str = "Stone") -> dict:
    """Score a series' slice answers (``index``, ``label``, ``cam_peak``) against the reference."""
    reach = REACH * max(shape)
    lo = min(b["slices"][0] for b in kidneys.values())
    hi = max(b["slices"][1] for b in kidneys.values())

    def near(s: dict, f: dict) -> bool:
        z0, z1 = f["slices"]
        if not (z0 - NEIGHBOURS <= s["index"] <= z1 + NEIGHBOURS) or s.get("cam_peak") is None:
            return False
        return float(np.hypot(s["cam_peak"][0] - f["row"], s["cam_peak"][1] - f["col"])) <= reach

    called = [s for s in slices if s["label"] == positive]
    rows = [{"index": s["index"], "probability": round(float(s["probability"]), 4), "cam_peak": s["cam_peak"],
             "located": any(near(s, f) for f in foci), "in_kidney_slices": lo <= s["index"] <= hi}
            for s in called]
    found = [any(near(s, f) for s in called) for f in foci]
    return {"slices": len(slices), "kidney_slices": [lo, hi], "slices_outside_kidneys": sum(
                not lo <= s["index"] <= hi for s in slices),
            "called_stone": len(called), "calls_outside_kidneys": sum(not r["in_kidney_slices"] for r in rows),
            "located": sum(r["located"] for r in rows), "reach_px": round(reach, 2),
            "foci": len(foci), "foci_found": sum(found),
            "foci_table": [dict(f, found=ok) for f, ok in zip(foci, found)], "calls": rows}


def load_reference(path: Path) -> dict:
    ref = json.loads(Path(path).read_text())
    if not ref.get("kidneys"):
        raise SystemExit(f"{path}: no kidney boxes")
    return ref


def run_exam(model: str | Path, volume: Path, reference: Path, threads: int | None = None) -> dict:
    """The study of ``volume`` by ``model``, scored against ``reference``."""
    from edgekidney.data.volume import read_nifti
    from edgekidney.runtime.predict import Classifier
    from edgekidney.study.analyze import analyze_series

    ref = load_reference(reference)
    series = read_nifti(volume)
    hu = np.stack(list(series.hu_slices()))
    rules = ref.get("foci_rules", {})
    foci = hyperdense_foci(hu, ref["kidneys"], **rules)
    with Classifier(model, threads=threads) as clf:
        result = analyze_series(clf, series).to_dict()
        positive = clf.card.positive_class
    scored = score_exam(result["slices"], foci, ref["kidneys"], hu.shape[1:], positive)
    return {"model": str(model), "volume": str(volume), "decision": result["decision"],
            "supporting": result["supporting"], **scored}


def format_exam(r: dict) -> str:
    lines = [f"{Path(r['volume']).name}: {r['slices']} slices, decision {r['decision']}",
             f"  called stone {r['called_stone']}, outside the kidneys' slices {r['calls_outside_kidneys']} "
             f"(of {r['slices_outside_kidneys']} slices there), located on a focus {r['located']}/{r['called_stone']}",
             f"  foci found {r['foci_found']}/{r['foci']}:"]
    for f in r["foci_table"]:
        lines.append(f"    {f['kidney']:<5} slices {f['slices'][0]}-{f['slices'][1]} at ({f['row']:.0f}, {f['col']:.0f}) "
                     f"{f['max_hu']:.0f} HU {'found' if f['found'] else 'missed'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from edgekidney.jsonio import write_json
    from edgekidney.released import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model files, folders or released names")
    p.add_argument("--volume", type=Path, default=Path("examples/abdomen-ct.nii.gz"))
    p.add_argument("--reference", type=Path, default=Path("benchmarks/reference/abdomen-ct.json"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-outside", type=int, default=None,
                   help="exit 1 when a model calls stone on more than this many slices outside the kidneys")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    results = []
    for model in a.models:
        results.append(run_exam(resolve_model(model), a.volume, a.reference, a.threads))
        print(f"{Path(results[-1]['model']).name}: {format_exam(results[-1])}", flush=True)
    if a.json:
        write_json({"results": results}, a.json)
    worst = max(r["calls_outside_kidneys"] for r in results)
    return 1 if a.max_outside is not None and worst > a.max_outside else 0


if __name__ == "__main__":
    sys.exit(main())
