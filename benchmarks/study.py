"""Study benchmark: one whole series through `edgekidney study`'s pipeline, timed and its memory measured.

    python benchmarks/study.py MODEL.int8.cpu.onnx --slices 200 --size 512 --threads 2 \
        --json benchmarks/results/study-200x512-int8cpu.json [--rss-slices 600]

- A synthetic axial series (``--slices`` x ``--size``^2, uncompressed 16-bit DICOM; ``--syntax
  JPEG2000Lossless`` etc. to compress it) is written once into ``--work``.
- ``end_to_end_s``: wall time of ``analyze_study`` (header scan, ordering, decode, window,
  preprocess, inference, decision), the fastest of ``--repeat`` runs after an untimed warm-up.
  ``decode_s`` and ``preprocess_s`` are the busy times of the producer thread (it decodes and
  preprocesses while the model runs), wall time including waits for a core on a busy machine;
  ``decode_cpu_s``/``preprocess_cpu_s`` are that thread's CPU time. ``share_decode_preprocess`` =
  (decode_s + preprocess_s) / end_to_end_s, ``share_decode_preprocess_cpu`` the same with CPU
  times, ``share_of_process_cpu`` their part of the process's CPU time. ``serial_s`` is the same work without the overlap (decode everything, then
  preprocess and classify in batches), for comparison.
- ``--rss-slices N`` runs the study on an N-slice series in a fresh process, axial and coronal, and
  reports the peak RSS (``ru_maxrss``, which includes the model's own load peak), the RSS before the
  series was read (model loaded and run once) and the largest RSS sampled every 10 ms during the study.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_series(work: Path, slices: int, size: int, syntax: str | None) -> Path:
    from edgekidney.data.synthetic_series import SeriesSynthConfig, write_series

    folder = work / f"series-{slices}x{size}-{syntax or 'raw'}"
    if not (folder / ".done").exists():
        write_series(folder, SeriesSynthConfig(slices=slices, size=size, stones=2, seed=0))
        if syntax:
            import pydicom
            import pydicom.uid

            for f in folder.glob("*.dcm"):
                ds = pydicom.dcmread(f)
                ds.compress(getattr(pydicom.uid, syntax))
                ds.save_as(f)
        (folder / ".done").write_text("ok")
    return folder


def classifier(model: str, threads: int, spinning: bool):
    from edgekidney.runtime.predict import Classifier

    return Classifier(model, threads=threads, spinning=spinning)


def time_study(model: str, folder: Path, threads: int, batch: int, spinning: bool, repeat: int = 1) -> dict:
    import numpy as np

    from edgekidney.data.series import read_series
    from edgekidney.data.preprocess import preprocess_batch, window_hu
    from edgekidney.study import analyze_study

    clf = classifier(model, threads, spinning)
    pre = clf.card.preprocessing
    analyze_study(clf, [folder], batch_size=batch)  # warm-up: page cache, ORT's first runs
    runs = []
    for _ in range(repeat):  # on a busy machine the fastest run is the least disturbed one
        cpu0, t0 = time.process_time(), time.perf_counter()
        study = analyze_study(clf, [folder], batch_size=batch)
        runs.append((time.perf_counter() - t0, time.process_time() - cpu0, study))
    end_to_end, cpu, study = min(runs, key=lambda r: r[0])
    (res,) = study.series
    (series,), _ = read_series([folder])
    t = time.perf_counter()
    slices = [window_hu(h, pre.window_center, pre.window_width) for h in series.hu_slices()]
    decode_alone = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(0, len(slices), batch):
        preprocess_batch(slices[k:k + batch], pre)
    preprocess_s = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(0, len(slices), batch):
        clf.predict_slices(slices[k:k + batch], [str(i) for i in range(k, min(k + batch, len(slices)))])
    classify_alone = time.perf_counter() - t
    clf.close()
    tm = res.timings
    return {
        "slices": res.n_slices, "decision": res.decision, "end_to_end_s": round(end_to_end, 3),
        "end_to_end_all_runs_s": [round(r[0], 3) for r in runs],
        "process_cpu_s": round(cpu, 3), "decode_s": tm["decode_s"], "preprocess_s": tm["preprocess_s"],
        "classify_s": tm["classify_s"], "classifier_waited_s": tm["wait_s"],
        "decode_cpu_s": round(tm["decode_cpu_s"], 3), "preprocess_cpu_s": round(tm["preprocess_cpu_s"], 3),
        "share_decode_preprocess": round((tm["decode_s"] + tm["preprocess_s"]) / end_to_end, 3),
        "share_decode_preprocess_cpu": round((tm["decode_cpu_s"] + tm["preprocess_cpu_s"]) / end_to_end, 3),
        "share_of_process_cpu": round((tm["decode_cpu_s"] + tm["preprocess_cpu_s"]) / cpu, 3),
        "preprocess_alone_s": round(preprocess_s, 3),
        "serial_s": round(decode_alone + classify_alone, 3), "decode_alone_s": round(decode_alone, 3),
        "classify_alone_s": round(classify_alone, 3), "per_slice_ms": round(1000 * end_to_end / res.n_slices, 2),
        "batch_size": batch, "threads": threads, "spinning": spinning,
        "slice_shape": list(np.shape(slices[0])),
    }


RSS_CHILD = """
import json, resource, sys, threading, time
sys.path.insert(0, {repo!r})
from edgekidney.runtime.predict import Classifier
from edgekidney.study import analyze_study
clf = Classifier({model!r}, threads={threads}, spinning=False)
clf.predict_slices([__import__("numpy").zeros((512, 512), "float32")], ["warm-up"])
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
now = rss_kb()
during = [now]
done = threading.Event()
def sample():
    while not done.wait(0.01):
        during.append(rss_kb())
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
(res,) = analyze_study(clf, [{folder!r}], plane={plane!r}).series
done.set()
print(json.dumps({{"plane": {plane!r}, "slices_classified": res.n_slices, "seconds": round(time.perf_counter() - t, 2),
                  "rss_before_mb": round(now / 1024), "peak_rss_before_mb": round(before / 1024), "max_rss_during_study_mb": round(max(during) / 1024), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}}))
"""


def peak_rss(model: str, folder: Path, threads: int, plane: str) -> dict:
    code = RSS_CHILD.format(repo=str(REPO), model=model, threads=threads, folder=str(folder), plane=plane)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--syntax", default=None, help="compress the series: RLELossless, JPEGLSLossless, JPEG2000Lossless")
    ap.add_argument("--spinning", action="store_true", help="let ORT's intra-op threads spin (off in 'study')")
    ap.add_argument("--rss-slices", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the fastest is reported (all are listed)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekidney-study-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = make_series(args.work, args.slices, args.size, args.syntax)
    report = {"model": Path(args.model).name, "series": f"{args.slices} x {args.size}x{args.size}, "
              f"{args.syntax or 'uncompressed'}", "cpu": _cpu(), "load_average_before": os.getloadavg()[0]}
    report["timing"] = time_study(args.model, folder, args.threads, args.batch_size, args.spinning, args.repeat)
    report["load_average_after"] = os.getloadavg()[0]
    if args.rss_slices:
        big = make_series(args.work, args.rss_slices, args.size, None)
        report["memory"] = [peak_rss(args.model, big, args.threads, p) for p in ("axial", "coronal")]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores visible"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    raise SystemExit(main())
