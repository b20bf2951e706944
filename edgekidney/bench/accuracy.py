"""Accuracy benchmark: FP32 vs its FP16/INT8 children on one labelled folder, with gates.

Every model sees the same decoded and preprocessed slices. Per model: accuracy, sensitivity,
specificity, AUC, agreement of the answers with the FP32 reference (``out_of_scope`` included: a
slice the parent judges and the child refuses is a disagreement) and max |Δ stone probability|. Gates,
relative to the reference (configurable): accuracy drop <= 0.5 points, sensitivity drop <= 1.0 point,
agreement >= 99 %. A failed gate makes the exit code 1.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekidney.errors import EdgeKidneyError, InputError
from edgekidney.jsonio import write_json
from edgekidney.bench import ArgumentParser
from edgekidney.model.evaluate import labelled_set
from edgekidney.metrics import classification_report, predictions
from edgekidney.runtime.predict import Classifier, decide_outputs
from edgekidney.data.preprocess import preprocess_batch_with_geometry
from edgekidney.data.decode import load_slice


@dataclass
class Gates:
    max_accuracy_drop: float = 0.5  # percentage points
    max_sensitivity_drop: float = 1.0  # percentage points
    min_agreement: float = 0.99


def run_accuracy(models: list[Path], data: Path, split: str | None = None, classes: list[str] | None = None,
                 gates: Gates | None = None, reference: Path | None = None, batch_size: int = 32,
                 backend: str | None = None, log=print) -> dict:
    if not models:
        raise InputError("name at least one model")
    gates = gates or Gates()
    t0 = time.perf_counter()
    clfs = [Classifier(m, backend=backend, defaults={"spinning": False}) for m in models]
    try:
        ref_i = _reference_index(clfs, reference)
        ref = clfs[ref_i]
        for c in clfs:
            if c.card.preprocessing != ref.card.preprocessing or c.card.classes != ref.card.classes:
                raise InputError(f"{c.model_path}: preprocessing or classes differ from {ref.model_path}; "
                                 "compare models of one family")
        ls = labelled_set(data, ref.card, split, classes)
        pre = ref.card.preprocessing
        probs = [[] for _ in clfs]
        scope = [[] for _ in clfs]
        n = len(ls.samples)
        for i in range(0, n, batch_size):
            x, geometries = preprocess_batch_with_geometry(
                [load_slice(s.path, pre) for s in ls.samples[i : i + batch_size]], pre)
            for k, c in enumerate(clfs):
                r = decide_outputs(c.card, c.threshold, c.infer_outputs(x), geometries)
                probs[k].append(r.probs)
                scope[k].append(r.in_scope)
            log(f"  {min(i + batch_size, n)}/{n} slices")
        probs = [np.concatenate(p) for p in probs]
        scope = [None if any(s is None for s in sc) else np.concatenate(sc) for sc in scope]
    finally:
        for c in clfs:
            c.close()

    pos = ref.positive
    ref_pred = predictions(probs[ref_i], pos, ref.threshold, scope[ref_i])
    ref_rep = classification_report(ls.labels, probs[ref_i], ref.card.classes, pos, ref.threshold, scope[ref_i])
    rows, failed = [], []
    for k, c in enumerate(clfs):
        rep = classification_report(ls.labels, probs[k], c.card.classes, pos, c.threshold, scope[k])
        pred = predictions(probs[k], pos, c.threshold, scope[k])  # out of scope is an answer too
        row = {"model": str(c.model_path), "precision": c.card.precision, "backend": c.backend_name,
               "target": c.card.extra.get("quantization", {}).get("target"),
               "reference": k == ref_i, "child_of_reference": c.card.parent_sha256 == ref.card.sha256,
               "accuracy": rep["accuracy"], "sensitivity": rep["sensitivity"], "specificity": rep["specificity"],
               "auc": rep["auc"], "threshold": c.threshold, "confusion_matrix": rep["confusion_matrix"],
               "agreement": float(np.mean(pred == ref_pred)), "out_of_scope": rep["out_of_scope"],
               "max_abs_dprob": float(np.max(np.abs(probs[k][:, pos] - probs[ref_i][:, pos]))),
               "accuracy_drop_points": 100 * (ref_rep["accuracy"] - rep["accuracy"]),
               "sensitivity_drop_points": 100 * (ref_rep["sensitivity"] - rep["sensitivity"])}
        row["gates"] = {
            "accuracy": row["accuracy_drop_points"] <= gates.max_accuracy_drop + 1e-9,
            "sensitivity": row["sensitivity_drop_points"] <= gates.max_sensitivity_drop + 1e-9,
            "agreement": row["agreement"] >= gates.min_agreement - 1e-12,
        }
        row["passed"] = k == ref_i or all(row["gates"].values())  # the reference is what the gates measure against
        if not row["passed"]:
            failed.append(row["model"])
        rows.append(row)
    return {"benchmark": "accuracy", "data": ls.description, "n": len(ls.samples), "gates": asdict(gates),
            "reference": str(ref.model_path), "rows": rows, "passed": not failed, "failed": failed,
            "seconds": round(time.perf_counter() - t0, 1)}


def _reference_index(clfs, reference: Path | None) -> int:
    if reference is not None:
        for i, c in enumerate(clfs):
            if c.model_path.resolve() == Path(reference).resolve():
                return i
        raise InputError(f"--reference {reference} is not among the models")
    for i, c in enumerate(clfs):
        if c.card.precision == "fp32":
            return i
    raise InputError("no FP32 model among the models: add the FP32 parent (or name --reference)")


def format_table(result: dict) -> str:
    head = f"{'model':<34} {'prec':<5} {'acc':>7} {'sens':>7} {'spec':>7} {'auc':>7} {'agree':>7} {'max|dp|':>8}  gates"
    lines = [f"accuracy on {result['data']} ({result['n']} slices); reference {Path(result['reference']).name}", head]
    for r in result["rows"]:
        verdict = "reference" if r["reference"] else ("PASS" if r["passed"] else
                                                       "FAIL " + ",".join(k for k, v in r["gates"].items() if not v))
        lines.append(f"{Path(r['model']).name[:34]:<34} {r['precision']:<5} {r['accuracy']:>7.4f} {r['sensitivity']:>7.4f} "
                     f"{r['specificity']:>7.4f} {r['auc']:>7.4f} {r['agreement']:>7.4f} {r['max_abs_dprob']:>8.4f}  {verdict}")
    g = result["gates"]
    lines.append(f"gates: accuracy drop <= {g['max_accuracy_drop']} pt, sensitivity drop <= {g['max_sensitivity_drop']} pt, "
                 f"agreement >= {g['min_agreement']:.2%}  ->  {'PASSED' if result['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True, help="dataset folder or split manifest (RUN/split.csv)")
    p.add_argument("--split", default=None)
    p.add_argument("--classes", default=None)
    p.add_argument("--reference", type=Path, default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--max-accuracy-drop", type=float, default=0.5)
    p.add_argument("--max-sensitivity-drop", type=float, default=1.0)
    p.add_argument("--min-agreement", type=float, default=0.99)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from edgekidney.data.dataset import parse_classes

    try:
        result = run_accuracy(a.models, a.data, a.split, parse_classes(a.classes),
                              Gates(a.max_accuracy_drop, a.max_sensitivity_drop, a.min_agreement), a.reference,
                              backend=a.backend, log=lambda s: print(s, file=sys.stderr))
    except EdgeKidneyError as exc:  # a user error: exit 1, one line, as every command
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(format_table(result))
    if a.json:
        write_json(result, a.json)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
