"""/v1/predict against the Open Inference Protocol's encodings on one server, one client, sequentially.

    python benchmarks/oip.py --model runs/m/model.onnx --data ct-kidney/Stone --n 50

Starts ``edgekidney serve`` on 127.0.0.1 (micro-batching off: one request at a time), then sends the same
N slices as: /v1 (JPEG body), /v2 BYTES binary, /v2 BYTES JSON (base64), /v2 FP32 binary and /v2 FP32 JSON
(preprocessed here). Reports request size and p50/p95 latency per mode and checks that every mode gives
the same probability (|dp| <= 1e-4). Untimed warm-up of 5 requests per mode; modes alternate per slice.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    import httpx

    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import preprocess_batch
    from edgekidney.sidecar import load_card
    from edgekidney.server.oip_codec import serialize_bytes

    card = load_card(args.model)
    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".jpg", ".png", ".dcm"))[: args.n]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgekidney.cli", "serve", str(args.model), "--port", str(port),
                             "--no-batching", "--log-level", "warning"], env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(600):
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)

            def v1(p, data, x):
                r = c.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"})
                return len(data), r.json()["probability"]

            def v2(p, data, x, kind, binary):
                if kind == "image":
                    raw = serialize_bytes([data])
                    inp = {"name": "image", "datatype": "BYTES", "shape": [1]}
                else:
                    raw = x.tobytes()
                    inp = {"name": card.input_name, "datatype": "FP32", "shape": list(x.shape)}
                if binary:
                    inp["parameters"] = {"binary_data_size": len(raw)}
                else:
                    inp["data"] = [base64.b64encode(data).decode()] if kind == "image" else x.reshape(-1).tolist()
                head = json.dumps({"inputs": [inp], "outputs": [{"name": "probabilities"}]}).encode()
                body = head + raw if binary else head
                headers = {"Inference-Header-Content-Length": str(len(head))} if binary else {}
                r = c.post(f"/v2/models/edgekidney/infer", content=body, headers=headers)
                out = r.json()["outputs"][0]["data"]
                return len(body), out[card.positive_index]

            modes = {"v1 jpeg": v1,
                     "v2 image binary": lambda p, d, x: v2(p, d, x, "image", True),
                     "v2 image json": lambda p, d, x: v2(p, d, x, "image", False),
                     "v2 fp32 binary": lambda p, d, x: v2(p, d, x, "fp32", True),
                     "v2 fp32 json": lambda p, d, x: v2(p, d, x, "fp32", False)}
            times = {m: [] for m in modes}
            sizes = {m: [] for m in modes}
            worst = 0.0
            for i, p in enumerate(files):
                data = p.read_bytes()
                x = preprocess_batch([load_slice(p, card.preprocessing)], card.preprocessing)
                probs = []
                for m, fn in modes.items():
                    t0 = time.perf_counter()
                    size, prob = fn(p, data, x)
                    dt = time.perf_counter() - t0
                    if i >= 5:
                        times[m].append(dt * 1000)
                        sizes[m].append(size)
                    probs.append(prob)
                worst = max(worst, float(np.ptp(probs)))
        print(f"{len(files) - 5} slices timed, image size {card.preprocessing.image_size} px, max |dp| across modes {worst:.2e}")
        print(f"{'mode':<18} {'request KB':>10} {'p50 ms':>8} {'p95 ms':>8}")
        for m in modes:
            t = np.array(times[m])
            print(f"{m:<18} {np.mean(sizes[m]) / 1024:>10.1f} {np.percentile(t, 50):>8.1f} {np.percentile(t, 95):>8.1f}")
        return 0 if worst <= 1e-4 else 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
