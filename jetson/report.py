#!/usr/bin/env python3
"""Jetson benchmark report: device facts, tegrastats samples as CSV, and one JSON + Markdown report.

Used by jetson/bench.sh; standard library only (it runs before and beside edgekidney).

  report.py device --power-mode NAME --power-mode-id N [--clocks FILE] --out device.json
  report.py temps                       # thermal zones as JSON on stdout
  report.py merge --device device.json --latency latency.json --accuracy accuracy.json \
                  --tegrastats tegrastats.log [--engines E.engine ...] --out OUT
                                        # -> OUT.json, OUT.md, OUT.tegrastats.csv

The latency and accuracy JSONs are whatever ``edgekidney bench latency|accuracy --json`` wrote; they
are embedded as they are, and their per-model records (a list of dicts) are tabulated in Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

# -- device facts ------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def thermal_zones(root: str = "/sys/class/thermal") -> dict[str, float]:
    """{zone type: degrees C} from the kernel's thermal zones."""
    temps = {}
    for zone in sorted(Path(root).glob("thermal_zone*")):
        kind, milli = _read(str(zone / "type")), _read(str(zone / "temp"))
        if kind and milli and milli.lstrip("-").isdigit():
            temps[kind] = int(milli) / 1000.0
    return temps


def jetpack_version() -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def device_facts(power_mode: str | None, power_mode_id: str | None, clocks_file: str | None) -> dict:
    release = _read("/etc/nv_tegra_release")
    return {"model": _read("/proc/device-tree/model"),
            "l4t_release": release.splitlines()[0].lstrip("# ") if release else None,
            "jetpack": jetpack_version(), "power_mode": power_mode, "power_mode_id": power_mode_id,
            "clocks": _read(clocks_file) if clocks_file else None, "temps_before_c": thermal_zones(),
            "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# -- tegrastats --------------------------------------------------------------------------------------
_TIME = re.compile(r"^(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b((?:VDD|POM|VIN)_\w+) (\d+)mW/(\d+)mW")


def parse_tegrastats_line(line: str) -> dict | None:
    """One tegrastats sample (JetPack 6 format) -> flat dict of numbers; None for other lines."""
    if "RAM" not in line:
        return None
    row: dict = {}
    if m := _TIME.search(line):
        row["time"] = m.group(1)
    if m := _RAM.search(line):
        row["ram_used_mb"], row["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        row["swap_used_mb"] = int(m.group(1))
    if m := _CPU.search(line):
        cores = [c for c in m.group(1).split(",") if "%" in c]
        loads = [int(c.split("%")[0]) for c in cores]
        freqs = [int(c.split("@")[1]) for c in cores if "@" in c]
        if loads:
            row["cpu_load_pct"] = sum(loads) / len(loads)
        if freqs:
            row["cpu_freq_mhz"] = max(freqs)
    if m := _EMC.search(line):
        row["emc_load_pct"] = int(m.group(1))
    if m := _GPU.search(line):
        row["gpu_load_pct"] = int(m.group(1))
        if m.group(2):
            row["gpu_freq_mhz"] = int(m.group(2))
    for name, value in _TEMP.findall(line):
        row[f"temp_{name.lower()}_c"] = float(value)
    for rail, now, avg in _POWER.findall(line):
        row[f"power_{rail}_mw"] = int(now)
        row[f"power_{rail}_avg_mw"] = int(avg)
    return row


def tegrastats_to_csv(log: Path, csv_path: Path) -> list[dict]:
    lines = Path(log).read_text(errors="replace").splitlines()
    rows = [r for r in map(parse_tegrastats_line, lines) if r]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns or ["time"])
        w.writeheader()
        w.writerows(rows)
    return rows


def summarize_tegrastats(rows: list[dict]) -> dict:
    out = {}
    for key in {k for r in rows for k in r if k != "time"}:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}
    return dict(sorted(out.items()))


# -- merging -----------------------------------------------------------------------------------------
def records(obj) -> list[dict]:
    """The per-model rows of a benchmark JSON: the first list of dicts found (top level first)."""
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return obj
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
                return value
        for value in obj.values():
            if isinstance(value, dict) and (found := records(value)):
                return found
    return []


def markdown_table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
    if not cols:
        return []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def engine_records(engines: list[str]) -> list[dict]:
    out = []
    for e in engines:
        side = Path(e + ".json")
        try:
            card = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            out.append({"engine": e, "error": f"no readable sidecar {side.name}"})
            continue
        info = card.get("extra", {}).get("engine", {})
        prof = info.get("profile", {})
        out.append({"engine": e, "precision": card.get("precision"), "tensorrt": info.get("tensorrt_version"),
                    "gpu": info.get("gpu_name"), "compute_capability": info.get("compute_capability"),
                    "batch_profile": f"{prof.get('min_batch')}/{prof.get('opt_batch')}/{prof.get('max_batch')}",
                    "build_seconds": info.get("build_seconds")})
    return out


def load_json(path: str | None):
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"{path}: {exc}"}


def merge(args) -> dict:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = load_json(args.device) or {}
    if args.temps_after:
        device["temps_after_c"] = load_json(args.temps_after)
    report = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
              "engines": engine_records(args.engines or []), "latency": load_json(args.latency),
              "accuracy": load_json(args.accuracy), "tegrastats": None}
    if args.tegrastats and Path(args.tegrastats).exists():
        csv_path = out.parent / (out.name + ".tegrastats.csv")
        rows = tegrastats_to_csv(Path(args.tegrastats), csv_path)
        report["tegrastats"] = {"samples": len(rows), "csv": str(csv_path), "summary": summarize_tegrastats(rows)}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(report))
    return report


def to_markdown(rep: dict) -> str:
    d = rep["device"]
    lines = ["# edgekidney on Jetson: benchmark report", "", f"Generated {rep['generated']}.", "", "## Device", "",
             "| | |", "|---|---|"]
    for key in ("model", "l4t_release", "jetpack", "power_mode", "power_mode_id"):
        lines.append(f"| {key} | {d.get(key)} |")
    for key in ("temps_before_c", "temps_after_c"):
        if isinstance(d.get(key), dict) and d[key]:
            lines.append(f"| {key} | " + ", ".join(f"{k} {v}" for k, v in d[key].items()) + " |")
    if d.get("clocks"):
        lines += ["", "Clocks (`jetson_clocks --show` after setting max clocks):", "", "```", d["clocks"], "```"]
    for title, key in (("Engines", "engines"),):
        if rep.get(key):
            lines += ["", f"## {title}", "", *markdown_table(rep[key])]
    for title, key in (("Latency", "latency"), ("Accuracy gates", "accuracy")):
        lines += ["", f"## {title}", ""]
        rows = records(rep.get(key))
        table = markdown_table(rows) if rows else []
        lines += table or ["```json", json.dumps(rep.get(key), indent=2), "```"]
    t = rep.get("tegrastats")
    lines += ["", "## tegrastats during the benchmarks", ""]
    if t:
        lines += [f"{t['samples']} samples, CSV: `{t['csv']}`", "",
                  "| metric | min | mean | max |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['min']} | {v['mean']} | {v['max']} |" for k, v in t["summary"].items()]
    else:
        lines.append("no samples")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    dev = sub.add_parser("device", help="record device facts as JSON")
    dev.add_argument("--power-mode"), dev.add_argument("--power-mode-id"), dev.add_argument("--clocks")
    dev.add_argument("--out", required=True)
    sub.add_parser("temps", help="thermal zones as JSON on stdout")
    mg = sub.add_parser("merge", help="merge benchmark JSONs and tegrastats into OUT.json and OUT.md")
    for name in ("--device", "--latency", "--accuracy", "--tegrastats", "--temps-after"):
        mg.add_argument(name)
    mg.add_argument("--engines", nargs="*")
    mg.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "device":
        Path(args.out).write_text(json.dumps(device_facts(args.power_mode, args.power_mode_id, args.clocks), indent=2))
    elif args.cmd == "temps":
        print(json.dumps(thermal_zones()))
    else:
        merge(args)
        print(f"wrote {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
