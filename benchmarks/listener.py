#!/usr/bin/env python
"""Loopback benchmark for ``edgekidney listen``: instances per second received, and the time from the
last instance of a series to its SR at the destination.

Writes an ``--n``-slice synthetic CT series (``--size`` px, uncompressed, like a scanner's), starts the
listener as its own process with a destination, sends the series in one association from this process
(pynetdicom SCU, datasets read before timing) to 127.0.0.1, and records when the in-process PACS
receives the SR. Repeats ``--repeat`` times with fresh series (new UIDs) on the same listener.

    python benchmarks/listener.py --model runs/m/model.onnx --n 200 --json benchmarks/results/listener.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--series-timeout", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--listener-args", default="", help="extra arguments for edgekidney listen")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from pydicom import dcmread
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    sys.path.insert(0, str(REPO))
    from edgekidney.data.synthetic_series import SeriesSynthConfig, write_series
    from edgekidney.dicomnet.sr import result_uids

    arrivals: dict[str, float] = {}
    lock = threading.Lock()

    def on_store(event):
        with lock:
            arrivals.setdefault(str(event.request.AffectedSOPInstanceUID), time.time())
        return 0x0000

    pacs_ae = AE(ae_title="PACS")
    pacs_ae.supported_contexts = AllStoragePresentationContexts
    pacs = pacs_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    tmp = Path(tempfile.mkdtemp(prefix="listener-bench-"))
    port = free_port()
    cmd = [sys.executable, "-m", "edgekidney.cli", "listen", str(args.model), "--store", str(tmp / "store"),
           "--port", str(port), "--series-timeout", str(args.series_timeout), "--min-free-mb", "0",
           "--destination", f"127.0.0.1:{pacs.server_address[1]}:PACS", "--log-level", "warning",
           *args.listener_args.split()]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    runs = []
    try:
        scu = AE(ae_title="SCANNER")
        scu.add_requested_context(Verification)
        scu.add_requested_context(CTImageStorage)
        for _ in range(600):
            a = scu.associate("127.0.0.1", port, ae_title="EDGEKIDNEY")
            if a.is_established:
                a.release()
                break
            time.sleep(0.1)
        for r in range(args.repeat):
            truth = write_series(tmp / f"series{r}", SeriesSynthConfig(slices=args.n, size=args.size, seed=100 + r,
                                                                      patient=100 + r, shuffle_names=False))
            series, files = truth.series_uid, sorted((tmp / f"series{r}").glob("*.dcm"))
            dss = [dcmread(f) for f in files]
            assoc = scu.associate("127.0.0.1", port, ae_title="EDGEKIDNEY", max_pdu=0)
            t0 = time.time()
            statuses = [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in dss]  # -1: no response
            t_last = time.time()
            assoc.release()
            if any(statuses):
                raise SystemExit(f"non-success statuses: {sorted(set(statuses))}")
            sr = result_uids(series)[0]
            deadline = time.time() + 120 + args.series_timeout
            while sr not in arrivals and time.time() < deadline:
                time.sleep(0.01)
            lines = [json.loads(x) for x in (tmp / "store" / "results.jsonl").read_text().splitlines()]
            processing = [e.get("seconds") for ln in lines for e in ln["series"] if e["series_uid"] == series]
            run = {"instances": args.n, "bytes_per_instance": os.path.getsize(files[0]),
                   "receive_s": round(t_last - t0, 3), "instances_per_s": round(args.n / (t_last - t0), 1),
                   "last_instance_to_sr_s": round(arrivals[sr] - t_last, 3) if sr in arrivals else None,
                   "series_timeout_s": args.series_timeout, "processing_s": processing[0] if processing else None}
            runs.append(run)
            print(json.dumps(run))
    finally:
        proc.terminate()
        proc.wait(30)
        pacs.shutdown()
    report = {"model": str(args.model), "n": args.n, "size": args.size, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(), "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(r["last_instance_to_sr_s"] is not None for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
