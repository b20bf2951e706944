"""Latency benchmark: model x backend x batch size, each timed in its own process.

Per configuration: untimed warm-ups, then a time recorded for every iteration (so p50/p95/p99 are real
percentiles), per batch and per image, throughput, peak memory (the worker process's max RSS), in two
modes: ``model`` (preprocessed tensor in, logits out) and ``end_to_end`` (read + decode + preprocess +
infer from files). PyTorch eager FP32 on the same inputs is the baseline row when torch is installed.
Each (model, backend) runs in a separate process: two runtimes in one process disturb each other's
thread pools (docs/architecture.md, CPU facts). Threads are set explicitly and reported.

``--baseline OLD.json --max-slowdown 0.10`` compares with an earlier report through ratios to the
FP32 ONNX Runtime row of the same run (absolute times drift on a busy machine) and exits 1 on a
regression.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgekidney.errors import EdgeKidneyError, InputError
from edgekidney.jsonio import write_json
from edgekidney.bench import ArgumentParser


@dataclass
class LatencyConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    threads: int = 2
    warmup: int = 3
    min_iterations: int = 10
    seconds: float = 3.0  # time budget per configuration, after the minimum iterations
    end_to_end: bool = True
    backend: str = "ort"
    torch_baseline: str = "auto"  # auto | none | PATH to a checkpoint/run


# -- worker (runs in its own process) -----------------------------------------------------------
def _percentiles(times_ms: list[float]) -> dict:
    a = np.asarray(times_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "iterations": int(len(a))}


def _time(fn, cfg: LatencyConfig) -> tuple[list[float], list[float]]:
    for _ in range(cfg.warmup):
        fn()
    times, gpu = [], []
    start = time.perf_counter()
    while len(times) < cfg.min_iterations or (time.perf_counter() - start) < cfg.seconds:
        t0 = time.perf_counter()
        g = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        if g is not None:
            gpu.append(g)
        if len(times) >= 10_000:
            break
    return times, gpu


def worker(spec: dict) -> dict:
    """Time one (model, backend) over every batch size and mode; returns rows."""
    cfg = LatencyConfig(**spec["config"])
    files = [Path(f) for f in spec["files"]]
    if spec["kind"] == "torch":
        return _torch_worker(spec, cfg, files)
    from edgekidney.data.decode import load_slice
    from edgekidney.runtime.predict import Classifier, classify_batch
    from edgekidney.data.preprocess import preprocess_batch

    clf = Classifier(spec["model"], backend=cfg.backend, defaults={"threads": cfg.threads})
    pre = clf.preprocessing
    rows = []
    try:
        for b in cfg.batch_sizes:
            batch_files = [files[i % len(files)] for i in range(b)]
            x = preprocess_batch([load_slice(f, pre) for f in batch_files], pre)
            backend = clf.backend

            def model_only():
                backend.infer(x)
                return getattr(backend, "last_gpu_ms", None)

            def end_to_end():
                classify_batch(clf, [load_slice(f, pre) for f in batch_files])  # what infer does, scope included
                return getattr(backend, "last_gpu_ms", None)

            for mode, fn in (("model", model_only), ("end_to_end", end_to_end)):
                if mode == "end_to_end" and not cfg.end_to_end:
                    continue
                times, gpu = _time(fn, cfg)
                row = {"model": spec["model"], "label": spec["label"], "precision": clf.card.precision,
                       "backend": cfg.backend, "batch": b, "mode": mode, **_percentiles(times)}
                if gpu:
                    row["gpu_p50_ms"] = float(np.percentile(gpu, 50))
                rows.append(row)
    finally:
        clf.close()
    return {"rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "describe": {"threads": cfg.threads}}


def _torch_worker(spec: dict, cfg: LatencyConfig, files: list[Path]) -> dict:
    import torch

    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import Preprocessing, preprocess_batch

    torch.set_num_threads(cfg.threads)
    if spec.get("checkpoint"):
        from edgekidney.model.train import load_checkpoint

        model, card = load_checkpoint(spec["checkpoint"])
        pre, weights = card.preprocessing, "checkpoint " + spec["checkpoint"]
    else:  # same architecture, random weights: identical speed, said so in the report
        from torchvision.models import resnet50

        model = resnet50(num_classes=spec["num_classes"]).eval()
        pre, weights = Preprocessing.from_dict(spec["preprocessing"]), "random (speed only)"
    rows = []
    with torch.inference_mode():
        for b in cfg.batch_sizes:
            batch_files = [files[i % len(files)] for i in range(b)]
            x = torch.from_numpy(preprocess_batch([load_slice(f, pre) for f in batch_files], pre))

            def model_only(x=x):
                model(x)

            def e2e(batch_files=batch_files):
                model(torch.from_numpy(preprocess_batch([load_slice(f, pre) for f in batch_files], pre)))

            for mode, fn in (("model", model_only), ("end_to_end", e2e)):
                if mode == "end_to_end" and not cfg.end_to_end:
                    continue
                times, _ = _time(fn, cfg)
                rows.append({"model": "pytorch eager", "label": "pytorch-fp32", "precision": "fp32",
                             "backend": "torch", "batch": b, "mode": mode, "weights": weights, **_percentiles(times)})
    return {"rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "describe": {"threads": torch.get_num_threads(), "torch": torch.__version__}}


# -- driver ---------------------------------------------------------------------------------------
def _run_worker(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["config"]["threads"]))
        proc = subprocess.run([sys.executable, "-m", "edgekidney.bench.latency", "--worker", str(spec_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeKidneyError(f"latency worker for {spec['label']} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_files(data: Path | None, pre_dict: dict, tmp: Path) -> list[Path]:
    """Real slices from ``data`` when given, else synthetic CT DICOM made here."""
    from edgekidney.runtime.predict import expand_inputs

    if data is not None:
        files = expand_inputs([data])[:64]
    else:
        from edgekidney.data.synthetic import SynthConfig, generate

        generate(tmp, SynthConfig(patients=4, slices_per_class=4, size=512, seed=1))
        files = expand_inputs([tmp])
    return files


def run_latency(models: list[Path], cfg: LatencyConfig | None = None, data: Path | None = None,
                log=print, timeout_per_model: float = 1800) -> dict:
    from edgekidney.sidecar import load_card

    cfg = cfg or LatencyConfig()

    if not models:
        raise InputError("name at least one model")
    if any(b < 1 for b in cfg.batch_sizes):
        raise InputError("batch sizes must be >= 1")
    cards = [load_card(m) for m in models]
    pre = cards[0].preprocessing
    t0 = time.perf_counter()
    report = {"benchmark": "latency", "config": asdict(cfg), "environment": environment(cfg), "rows": [],
              "processes": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = benchmark_files(data, pre.to_dict(), Path(tmp))
        report["inputs"] = str(data) if data else "synthetic CT DICOM, 512x512"
        specs = []
        torch_spec = _torch_spec(cfg, cards, files)
        if torch_spec:
            specs.append(torch_spec)
        for m, card in zip(models, cards):
            q = card.extra.get("quantization", {})
            label = f"{cfg.backend}-{card.precision}" + (f"-{q['target']}" if q.get("target") else "")
            specs.append({"kind": "model", "model": str(m), "label": label, "files": [str(f) for f in files],
                          "config": asdict(cfg)})
        for spec in specs:
            log(f"timing {spec['label']} (batches {cfg.batch_sizes}, {cfg.threads} threads)...")
            out = _run_worker(spec, timeout_per_model)
            for r in out["rows"]:
                r["peak_rss_mb"] = round(out["peak_rss_mb"], 1)
                r["per_image_p50_ms"] = r["p50_ms"] / r["batch"]
                r["throughput_ips"] = 1000.0 * r["batch"] / r["mean_ms"]
            report["rows"].extend(out["rows"])
            report["processes"].append({"label": spec["label"], **out["describe"], "peak_rss_mb": out["peak_rss_mb"]})
    report["speedups"] = speedups(report["rows"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _torch_spec(cfg: LatencyConfig, cards, files) -> dict | None:
    if cfg.torch_baseline == "none":
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    checkpoint = None
    if cfg.torch_baseline != "auto":
        checkpoint = cfg.torch_baseline
    else:
        for c in cards:
            src = c.extra.get("source_checkpoint")
            if c.precision == "fp32" and src and Path(src).exists():
                checkpoint = src
                break
    return {"kind": "torch", "label": "pytorch-fp32", "checkpoint": checkpoint, "files": [str(f) for f in files],
            "num_classes": len(cards[0].classes), "preprocessing": cards[0].preprocessing.to_dict(),
            "config": asdict(cfg)}


def _key(r: dict) -> tuple:
    return (r["label"], r["batch"], r["mode"])


def speedups(rows: list[dict]) -> list[dict]:
    """p50 ratios within one run: vs PyTorch eager FP32 and vs ONNX Runtime FP32, same batch and mode."""
    by = {_key(r): r for r in rows}
    fp32 = [r["label"] for r in rows if r["precision"] == "fp32" and r["backend"] != "torch"]
    fp32_label = fp32[0] if fp32 else None
    out = []
    for r in rows:
        entry = {"label": r["label"], "batch": r["batch"], "mode": r["mode"]}
        t = by.get(("pytorch-fp32", r["batch"], r["mode"]))
        if t and r["backend"] != "torch":
            entry["vs_pytorch_fp32"] = t["p50_ms"] / r["p50_ms"]
        f = by.get((fp32_label, r["batch"], r["mode"])) if fp32_label else None
        if f and r["label"] != fp32_label:
            entry["vs_ort_fp32"] = f["p50_ms"] / r["p50_ms"]
        if len(entry) > 3:
            out.append(entry)
    return out


def compare_to_baseline(report: dict, baseline: dict, max_slowdown: float) -> list[str]:
    """Regressions: a configuration whose time relative to the run's FP32 ORT row grew by > max_slowdown."""

    def relative(rep: dict) -> dict:
        rows = {_key(r): r for r in rep["rows"]}
        fp32 = next((r["label"] for r in rep["rows"] if r["precision"] == "fp32" and r["backend"] != "torch"), None)
        out = {}
        for k, r in rows.items():
            ref = rows.get((fp32, k[1], k[2]))
            if ref and k[0] != fp32:
                out[k] = r["p50_ms"] / ref["p50_ms"]
        return out

    new, old = relative(report), relative(baseline)
    problems = []
    for k, ratio in new.items():
        if k in old and ratio > old[k] * (1 + max_slowdown):
            problems.append(f"{k[0]} batch {k[1]} {k[2]}: {ratio:.3f}x of FP32 time, was {old[k]:.3f}x "
                            f"(+{100 * (ratio / old[k] - 1):.0f} % > {100 * max_slowdown:.0f} %)")
    return problems


def environment(cfg: LatencyConfig) -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "threads": cfg.threads, "processor": _cpu_name(), "int8_instructions": int8_instructions()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


# x86 instruction sets an INT8 convolution of ONNX Runtime can use, fastest first: INT8's gain over FP32
# differs from one CPU to the next (docs/benchmarks.md), so each latency report records them
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


def int8_instructions(cpuinfo: str | None = None) -> list[str]:
    """The INT8-relevant instruction sets the CPU reports (/proc/cpuinfo flags; [] where unknown)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in INT8_FLAGS if f in flags]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"latency ({report['config']['threads']} threads, {env.get('processor', '')}"
             f"{' (' + ', '.join(env['int8_instructions']) + ')' if env.get('int8_instructions') else ''}); "
             f"inputs: {report.get('inputs')}",
             f"{'config':<22} {'batch':>5} {'mode':<10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'ms/img':>7} {'img/s':>7} {'RSS MB':>7}"]
    for r in report["rows"]:
        lines.append(f"{r['label']:<22} {r['batch']:>5} {r['mode']:<10} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
                     f"{r['p99_ms']:>8.2f} {r['per_image_p50_ms']:>7.2f} {r['throughput_ips']:>7.1f} "
                     f"{r['peak_rss_mb']:>7.0f}" + (f"  gpu {r['gpu_p50_ms']:.2f} ms" if "gpu_p50_ms" in r else ""))
    for s in report["speedups"]:
        if s["mode"] == "model":
            parts = [f"{k.replace('_', ' ')} {v:.2f}x" for k, v in s.items() if k.startswith("vs_")]
            lines.append(f"speedup {s['label']} batch {s['batch']}: " + ", ".join(parts))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if r["mode"] == "model"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ys = [next((r["per_image_p50_ms"] for r in rows if r["label"] == lab and r["batch"] == b), 0) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=lab)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("p50 latency per image (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", type=Path)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="ort")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-iterations", type=int, default=10)
    p.add_argument("--no-end-to-end", action="store_true")
    p.add_argument("--torch", default="auto", help="auto | none | checkpoint for the PyTorch eager baseline row")
    p.add_argument("--data", type=Path, default=None, help="folder of real slices for the end-to-end rows")
    p.add_argument("--baseline", type=Path, default=None)
    p.add_argument("--max-slowdown", type=float, default=0.10)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker.read_text()))))
        return 0
    try:
        cfg = LatencyConfig(batch_sizes=[int(b) for b in a.batch_sizes.split(",")], threads=a.threads,
                            warmup=a.warmup, min_iterations=a.min_iterations, seconds=a.seconds,
                            end_to_end=not a.no_end_to_end, backend=a.backend, torch_baseline=a.torch)
        report = run_latency(a.models, cfg, a.data, log=lambda s: print(s, file=sys.stderr))
        problems = []
        if a.baseline:
            problems = compare_to_baseline(report, json.loads(a.baseline.read_text()), a.max_slowdown)
            report["regressions"] = problems
    except (EdgeKidneyError, ValueError) as exc:  # user errors: exit 1, as every command does
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(format_table(report))
    if a.json:
        write_json(report, a.json)
    if a.plot:
        plot(report, a.plot)
    for line in problems:
        print(f"REGRESSION {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
