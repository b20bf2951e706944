"""The end-to-end job on the embedded synthetic data, for a newcomer's first run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from edgekidney.data.synthetic import SynthConfig, generate
from edgekidney.model.evaluate import evaluate
from edgekidney.model.export import export_onnx
from edgekidney.metrics import format_report
from edgekidney.runtime.predict import Classifier, expand_inputs
from edgekidney.data.preprocess import Preprocessing
from edgekidney.progress import echo
from edgekidney.model.train import TrainConfig, train


def run_demo(out: Path, epochs: int = 10, image_size: int = 128, patients: int = 40, seed: int = 0,
             threads: int | None = None, log: Callable[[str], None] = echo) -> dict:
    out = Path(out)
    times: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        times[name] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] {times[name]} s")

    t = time.perf_counter()
    data = out / "data"
    counts = generate(data, SynthConfig(patients=patients, slices_per_class=5, seed=seed), masks=True)
    log(f"synthetic CT DICOM slices (NOT patient data): {counts} in {data}")
    stage("data", t)

    t = time.perf_counter()
    run = out / "run"
    # The phantoms' calculi are a few pixels: the scanner-robustness augmentations (noise, coarser
    # grids, placed calculi) blur them away in a 10-epoch run (val AUC 0.65 measured), so the demo
    # trains with rotations, shifts and intensity jitter only.
    train(TrainConfig(data=data, out=run, weights="none", epochs=epochs, freeze_epochs=0, image_size=image_size, batch_size=16,
                      seed=seed, threads=threads, augment="geometry,intensity",
                      preprocessing=Preprocessing(image_size=image_size)), log=log)
    stage("train", t)

    t = time.perf_counter()
    model = out / "model.onnx"
    card = export_onnx(run, model)
    log(f"exported {model}; parity max |dlogit| {card.extra['parity']['max_abs_logit_diff']:.2e}")
    stage("export", t)

    t = time.perf_counter()
    result = evaluate(model, run / "split.csv", split="val", threads=threads)
    log(format_report(result["at_model_threshold"], "validation split, ONNX Runtime (CPU):"))
    stage("evaluate", t)

    t = time.perf_counter()
    files = expand_inputs([data / "Stone"])[:3] + expand_inputs([data / "Normal"])[:3]
    with Classifier(model, threads=threads) as clf:
        preds, _ = clf.predict_files(files)
    for p in preds:
        log(f"  {Path(p.path).name}: p(stone) {p.probability:.3f} -> {p.label}")
    stage("infer", t)

    t = time.perf_counter()
    study_rows = demo_study(out / "series", model, log=log)
    stage("study", t)

    summary = {"model": str(model), "validation": result["at_model_threshold"], "study": study_rows, "seconds": times}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done: {out / 'demo.json'}")
    return summary


def demo_study(folder: Path, model: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Whole synthetic series (one with stones, one without) through ``edgekidney study``'s pipeline."""
    from edgekidney.data.series import identity_hash
    from edgekidney.data.synthetic_series import write_series_set
    from edgekidney.study import analyze_study
    from edgekidney.study.report import format_study

    truths = write_series_set(folder, n_series=2, slices=30, size=256)
    with Classifier(model) as clf:
        study = analyze_study(clf, [folder])
    log(format_study(study))
    by_id = {identity_hash(t.series_uid): t for t in truths}
    rows = []
    for res in study.series:
        truth = by_id.get(res.series_id)
        rows.append({"series_id": res.series_id, "decision": res.decision,
                     "stone_slices_truth": truth.stone_slices if truth else None,
                     "supporting": [[r.start, r.end] for r in res.supporting]})
    return rows
