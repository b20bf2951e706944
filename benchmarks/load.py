#!/usr/bin/env python
"""Load benchmark for ``edgekidney serve``: real CT slices over loopback HTTP, with and without batching.

Starts one server per mode (micro-batching on, and off = every request alone) on 127.0.0.1, sends
``--n`` real slices at each concurrency (1, 4, 16 by default; the modes alternate per concurrency so a
busy machine disturbs both alike), interleaves malformed requests (garbage, truncated JPEG and DICOM,
16 px image, wrong content type, oversize body) and checks that

- every valid request gets 200 and the same label and probability as the same model computed in this
  process with :class:`edgekidney.runtime.predict.Classifier` (the reference), and
- every malformed one gets its 4xx (never a 5xx), the server serving on.

Reports p50/p95/p99 latency (client side, valid requests), throughput, errors and the mean batch size
(from the server's /metrics), writes JSON, prints a table. Exit 1 if any valid request errored or got
a wrong answer, or a malformed one got anything but its 4xx.

Overload row (``--overload-factor 2``): open-loop arrivals at twice the best batched throughput just
measured, for ``--overload-seconds``, against the batched server (``--max-queue``). Reports the share
of 503s (each must carry Retry-After), 504s, the p50/p99 latency and throughput of the accepted
requests, and fails on any other status, a transport error or a wrong answer.

    python benchmarks/load.py --model runs/m/model.onnx              # 1,000 slices at 1/4/16
    python benchmarks/load.py --model M --n 200 --concurrency 16     # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("EDGEKIDNEY_DATA", REPO.parent / "shared" / "data" / "ct-kidney-axial"))
MODES = {"batched": [], "unbatched": ["--no-batching"]}


# -- inputs ---------------------------------------------------------------------------------------------
def pick_slices(data: Path, n: int) -> list[Path]:
    """``n`` slices, round-robin over the class folders (sorted), so every class is represented."""
    from edgekidney.data.dataset import list_files

    if not data.is_dir():
        raise SystemExit(f"error: {data}: no such folder (use --data)")
    folders = [d for d in sorted(data.iterdir()) if d.is_dir()] or [data]
    per_folder = [list_files(d) for d in folders]
    picked: list[Path] = []
    i = 0
    while len(picked) < n and any(i < len(f) for f in per_folder):
        picked.extend(f[i] for f in per_folder if i < len(f))
        i += 1
    if len(picked) < n:
        raise SystemExit(f"error: {data} holds only {len(picked)} slices, fewer than --n {n}")
    return picked[:n]


def content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(suffix, "application/dicom")


def malformed_cases(jpeg: bytes, max_body_bytes: int) -> list[tuple[str, bytes, str, int]]:
    """(name, body, content type, expected status)."""
    from PIL import Image

    from edgekidney.data.synthetic import synth_slice, write_ct_dicom

    tiny = io.BytesIO()
    Image.new("L", (16, 16), 100).save(tiny, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.dcm"
        write_ct_dicom(path, synth_slice(np.random.default_rng(0), 128, stone=False), 1, 1, "1.2.3", "1.2.3.4")
        dicom = path.read_bytes()
    rng = np.random.default_rng(0)
    return [("garbage", rng.bytes(3000), "image/png", 422),
            ("truncated-jpeg", jpeg[: len(jpeg) // 3], "image/jpeg", 422),
            ("truncated-dicom", dicom[: len(dicom) * 2 // 3], "application/dicom", 422),
            ("16px-png", tiny.getvalue(), "image/png", 422),
            ("text-plain", b"not an image", "text/plain", 415),
            ("oversize", bytes(max_body_bytes + 1), "image/png", 413)]


def reference_predictions(model: Path, paths: list[Path], backend: str | None,
                          threads: int | None) -> tuple[dict, dict]:
    from edgekidney.runtime.predict import Classifier

    with Classifier(model, backend=backend, defaults={"threads": threads}) as clf:
        preds, _ = clf.predict_files(paths, batch_size=16)
        card = {"sha256": clf.card.sha256, "precision": clf.card.precision, "threshold": clf.threshold,
                "image_size": clf.card.preprocessing.image_size}
    return {Path(p.path): (p.probability, p.label) for p in preds}, card


# -- the server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = open(log, "wb")
        cmd = [sys.executable, "-m", "edgekidney.cli", "serve", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: server exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"error: server not ready after {timeout:.0f} s; see {self.log}")

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the server's edgekidney_batch_size histogram."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10.0).text
        get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        return get("edgekidney_batch_size_sum"), get("edgekidney_batch_size_count")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


# -- one run --------------------------------------------------------------------------------------------
@dataclass
class Task:
    body: bytes
    content_type: str
    path: Path | None = None  # valid slice
    expect: int = 200
    name: str = "valid"


@dataclass
class RunResult:
    mode: str
    concurrency: int
    valid: int = 0
    ok: int = 0
    errors: int = 0
    wrong: int = 0
    malformed: int = 0
    malformed_ok: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    throughput_rps: float = 0.0
    mean_batch: float = 0.0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def build_tasks(paths: list[Path], blobs: dict[Path, bytes], bad: list, every: int) -> list[Task]:
    tasks: list[Task] = []
    for i, p in enumerate(paths):
        tasks.append(Task(blobs[p], content_type(p), path=p))
        if every and (i + 1) % every == 0:
            name, body, ctype, status = bad[(i // every) % len(bad)]
            tasks.append(Task(body, ctype, expect=status, name=name))
    return tasks


async def drive(url: str, tasks: list[Task], concurrency: int, time_limit: float) -> list[tuple]:
    """Send ``tasks`` with ``concurrency`` clients; -> (task, status or None, json or error, seconds)."""
    import httpx

    results: list[tuple] = []
    queue = iter(tasks)
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def worker():
            for task in queue:
                if time.monotonic() > deadline:
                    results.append((task, None, "not sent: time limit", 0.0))
                    continue
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", content=task.body,
                                          headers={"Content-Type": task.content_type})
                    payload = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
                    results.append((task, r.status_code, payload, time.perf_counter() - t0))
                except httpx.HTTPError as exc:
                    results.append((task, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return results


def run_once(server: Server, mode: str, concurrency: int, tasks: list[Task], warmup: list[Task],
             refs: dict, tolerance: float, threshold: float, time_limit: float) -> RunResult:
    asyncio.run(drive(server.url, warmup, concurrency, time_limit))  # untimed: connections, caches
    s0, c0 = server.batch_stats()
    t0 = time.perf_counter()
    results = asyncio.run(drive(server.url, tasks, concurrency, time_limit))
    wall = time.perf_counter() - t0
    s1, c1 = server.batch_stats()
    res = RunResult(mode, concurrency, wall_s=round(wall, 2))
    latencies = []
    for task, status, payload, seconds in results:
        if task.path is None:  # malformed
            res.malformed += 1
            # an oversize body may be cut off by the server before the client has written it all
            closed_early = status is None and task.expect == 413 and not str(payload).startswith("not sent")
            if status == task.expect or closed_early:
                res.malformed_ok += 1
            else:
                res.problems.append(f"{task.name}: expected {task.expect}, got {status} {str(payload)[:120]}")
            continue
        res.valid += 1
        if status != 200:
            res.errors += 1
            res.problems.append(f"{task.path.name}: {status} {str(payload)[:160]}")
            continue
        latencies.append(seconds)
        prob, label = refs[task.path]
        near_threshold = abs(prob - threshold) <= tolerance
        if abs(payload["probability"] - prob) > tolerance or (payload["label"] != label and not near_threshold):
            res.wrong += 1
            res.problems.append(f"{task.path.name}: got {payload['label']} {payload['probability']:.6f}, "
                                f"in-process {label} {prob:.6f}")
            continue
        res.ok += 1
    if latencies:
        ms = np.asarray(latencies) * 1000.0
        res.p50_ms, res.p95_ms, res.p99_ms = (round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99))
        res.mean_ms = round(float(ms.mean()), 1)
    res.throughput_rps = round(res.ok / wall, 2) if wall > 0 else 0.0
    res.mean_batch = round((s1 - s0) / (c1 - c0), 2) if c1 > c0 else 0.0
    return res


# -- report ---------------------------------------------------------------------------------------------
def table(results: list[RunResult]) -> str:
    head = (f"{'mode':<10} {'conc':>4} {'valid':>5} {'ok':>5} {'err':>3} {'wrong':>5} {'bad 4xx':>8} "
            f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'req/s':>7} {'batch':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.mode:<10} {r.concurrency:>4} {r.valid:>5} {r.ok:>5} {r.errors:>3} {r.wrong:>5} "
                     f"{f'{r.malformed_ok}/{r.malformed}':>8} {r.p50_ms:>7.1f} {r.p95_ms:>7.1f} {r.p99_ms:>7.1f} "
                     f"{r.throughput_rps:>7.2f} {r.mean_batch:>5.2f}")
    return "\n".join(lines)


@dataclass
class OverloadResult:
    offered_rps: float
    capacity_rps: float
    max_queue: int
    seconds: float
    sent: int = 0
    accepted: int = 0  # 200
    refused_503: int = 0
    timed_out_504: int = 0
    other: int = 0
    wrong: int = 0
    share_503: float = 0.0
    accepted_rps: float = 0.0
    accepted_p50_ms: float = 0.0
    accepted_p99_ms: float = 0.0
    refused_p99_ms: float = 0.0
    problems: list[str] = field(default_factory=list)


async def open_loop(url: str, tasks: list[Task], rate: float, seconds: float) -> tuple[list[tuple], float]:
    """Send one request every 1/rate s for ``seconds`` (arrivals do not wait for answers)."""
    import httpx

    results: list[tuple] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def one(task: Task):
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/predict", content=task.body, headers={"Content-Type": task.content_type})
                payload = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
                results.append((task, r.status_code, payload, time.perf_counter() - t0, r.headers.get("retry-after")))
            except httpx.HTTPError as exc:
                results.append((task, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0, None))

        pending, start, i = [], time.perf_counter(), 0
        while (due := start + i / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            pending.append(asyncio.create_task(one(tasks[i % len(tasks)])))
            i += 1
        await asyncio.gather(*pending)
        wall = time.perf_counter() - start
    return results, wall


def run_overload(server: Server, tasks: list[Task], refs: dict, tolerance: float, threshold: float,
                 capacity: float, factor: float, seconds: float, max_queue: int) -> OverloadResult:
    rate = capacity * factor
    res = OverloadResult(offered_rps=round(rate, 1), capacity_rps=round(capacity, 1), max_queue=max_queue,
                         seconds=seconds)
    results, wall = asyncio.run(open_loop(server.url, tasks, rate, seconds))
    ok_ms, refused_ms = [], []
    for task, status, payload, secs, retry_after in results:
        res.sent += 1
        if status == 200:
            res.accepted += 1
            ok_ms.append(secs * 1000.0)
            prob, label = refs[task.path]
            near = abs(prob - threshold) <= tolerance
            if abs(payload["probability"] - prob) > tolerance or (payload["label"] != label and not near):
                res.wrong += 1
                res.problems.append(f"{task.path.name}: got {payload['label']} {payload['probability']:.6f}")
        elif status == 503:
            res.refused_503 += 1
            refused_ms.append(secs * 1000.0)
            if retry_after is None:
                res.problems.append("503 without Retry-After")
        elif status == 504:
            res.timed_out_504 += 1
        else:
            res.other += 1
            res.problems.append(f"{status}: {str(payload)[:160]}")
    res.share_503 = round(res.refused_503 / max(1, res.sent), 3)
    res.accepted_rps = round(res.accepted / wall, 1) if wall > 0 else 0.0
    if ok_ms:
        res.accepted_p50_ms, res.accepted_p99_ms = (round(float(np.percentile(ok_ms, q)), 1) for q in (50, 99))
    if refused_ms:
        res.refused_p99_ms = round(float(np.percentile(refused_ms, 99)), 1)
    return res


def speedups(results: list[RunResult]) -> dict[str, float]:
    by = {(r.mode, r.concurrency): r for r in results}
    out = {}
    for (mode, c), r in by.items():
        base = by.get(("unbatched", c))
        if mode == "batched" and base and base.throughput_rps > 0:
            out[str(c)] = round(r.throughput_rps / base.throughput_rps, 3)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="ONNX model (with sidecar) or engine to serve.")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Folder of real CT slices (class sub-folders).")
    ap.add_argument("--n", type=int, default=1000, help="Valid requests per run (max 5000).")
    ap.add_argument("--concurrency", default="1,4,16", help="Comma-separated client concurrencies.")
    ap.add_argument("--modes", default="batched,unbatched", help="batched, unbatched or both.")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (server and reference).")
    ap.add_argument("--backend", default=None, help="ort | trt (default: from the model file).")
    ap.add_argument("--malformed-every", type=int, default=25, help="One malformed request after every N valid.")
    ap.add_argument("--max-body-mb", type=float, default=1.0, help="Server body limit (the oversize case).")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="Allowed |probability - in-process| .")
    ap.add_argument("--warmup", type=int, default=16, help="Untimed requests before each run.")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="Seconds per run; unsent requests are errors.")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="Seconds for the whole benchmark.")
    ap.add_argument("--max-queue", type=int, default=64, help="Server --max-queue (admitted requests).")
    ap.add_argument("--overload-factor", type=float, default=2.0,
                    help="Overload row: open-loop arrivals at this multiple of the measured capacity (0: skip).")
    ap.add_argument("--overload-seconds", type=float, default=10.0, help="Duration of the overload row.")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load.json")
    args = ap.parse_args(argv)
    args.model = args.model.resolve()  # the server runs from the repository root
    if not 1 <= args.n <= 5000:
        ap.error("--n must be in 1..5000")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1 or max(args.concurrency) > 256:
        ap.error("--concurrency: integers in 1..256")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    paths = pick_slices(args.data, args.n)
    blobs = {p: p.read_bytes() for p in paths}
    print(f"reference: {len(paths)} slices from {args.data} through {args.model} in-process ...", flush=True)
    refs, card = reference_predictions(args.model, paths, args.backend, args.threads)
    first_jpeg = next((blobs[p] for p in paths if content_type(p) == "image/jpeg"), blobs[paths[0]])
    bad = malformed_cases(first_jpeg, int(args.max_body_mb * 1024 * 1024))
    tasks = build_tasks(paths, blobs, bad, args.malformed_every)
    warmup = [Task(blobs[p], content_type(p), path=p) for p in paths[: args.warmup]]

    common = ["--max-body-mb", str(args.max_body_mb), "--log-level", "info", "--max-queue", str(args.max_queue)]
    common += ["--threads", str(args.threads)] if args.threads else []
    common += ["--backend", args.backend] if args.backend else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    servers = {}
    results: list[RunResult] = []
    try:
        for mode in args.modes:
            extra = MODES[mode] or ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
            log = Path(tempfile.gettempdir()) / f"edgekidney-load-{mode}-{os.getpid()}.log"
            servers[mode] = Server(args.model, common + extra, log)
        for s in servers.values():
            s.wait_ready()
        for c in args.concurrency:
            for mode in args.modes:  # alternate, so a busy machine disturbs both modes alike
                left = args.time_limit - (time.monotonic() - started)
                if left <= 0:
                    print(f"time limit reached before {mode} at concurrency {c}", file=sys.stderr)
                    results.append(RunResult(mode, c, errors=args.n, problems=["not run: --time-limit"]))
                    continue
                r = run_once(servers[mode], mode, c, tasks, warmup, refs, args.tolerance, card["threshold"],
                             min(args.run_timeout, left))
                results.append(r)
                print(f"  {mode:<9} c={c:<3} ok {r.ok}/{r.valid}  p50 {r.p50_ms} ms  {r.throughput_rps} req/s  "
                      f"batch {r.mean_batch}", flush=True)
        overload = None
        mode = "batched" if "batched" in servers else args.modes[0]
        capacity = max((r.throughput_rps for r in results if r.mode == mode), default=0.0)
        if args.overload_factor > 0 and capacity > 0:
            valid = [t for t in tasks if t.path is not None]
            overload = run_overload(servers[mode], valid, refs, args.tolerance, card["threshold"], capacity,
                                    args.overload_factor, args.overload_seconds, args.max_queue)
            print(f"  overload  x{args.overload_factor:g} ({overload.offered_rps} req/s offered): "
                  f"503 {overload.share_503:.1%}, accepted p99 {overload.accepted_p99_ms} ms", flush=True)
    finally:
        for s in servers.values():
            s.stop()

    failed = any(r.errors or r.wrong or r.malformed_ok != r.malformed or r.valid < args.n for r in results)
    failed = failed or bool(overload and (overload.other or overload.wrong or overload.problems))
    report = {
        "model": str(args.model), "model_sha256": card["sha256"], "precision": card["precision"],
        "image_size": card["image_size"], "backend": args.backend or "default", "data": str(args.data),
        "n_valid_per_run": args.n, "malformed_every": args.malformed_every, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "threads": args.threads, "tolerance": args.tolerance,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "server_logs": {mode: str(s.log) for mode, s in servers.items()},
        "runs": [asdict(r) for r in results], "throughput_speedup_batched_over_unbatched": speedups(results),
        "overload": asdict(overload) if overload else None, "max_queue": args.max_queue,
        "passed": not failed, "seconds": round(time.monotonic() - started, 1),
    }
    for r in report["runs"]:
        r["problems"] = r["problems"][:20]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"{args.model} ({card['precision']}, {card['image_size']} px), {args.n} valid requests per run, "
          f"1 malformed per {args.malformed_every}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(table(results))
    for c, x in report["throughput_speedup_batched_over_unbatched"].items():
        print(f"concurrency {c}: micro-batching throughput x{x:.2f}")
    if overload:
        o = overload
        print(f"overload x{args.overload_factor:g}: {o.offered_rps} req/s offered for {o.seconds:g} s "
              f"(capacity {o.capacity_rps}, --max-queue {o.max_queue}): {o.sent} sent, {o.accepted} accepted "
              f"({o.accepted_rps} req/s, p50 {o.accepted_p50_ms} / p99 {o.accepted_p99_ms} ms), "
              f"503 {o.refused_503} ({o.share_503:.1%}, p99 {o.refused_p99_ms} ms), 504 {o.timed_out_504}, "
              f"other {o.other}, wrong {o.wrong}")
    for r in results:
        for p in r.problems[:5]:
            print(f"  problem ({r.mode}, c={r.concurrency}): {p}")
    print(f"wrote {args.out} ({report['seconds']} s): {'PASS' if not failed else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
