#!/usr/bin/env python3
"""Write a release folder's MODEL_CARD.md from the measurements ``models/release.sh`` left in OUT/results.

Every figure in the card is read from those JSON files; the prose around them (what the model is for,
how it was trained, its limits) is in this script. Usage: ``python models/card.py OUT --command "..."``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: Path, name: str) -> dict:
    path = folder / "results" / name
    return json.loads(path.read_text()) if path.exists() else {}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def ci(pair) -> str:
    return "" if not pair else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def evaluation_rows(ev: dict) -> list[str]:
    if not ev:
        return ["(not measured)"]
    r, iv = ev["at_model_threshold"], ev.get("intervals", {})
    auc_ci = "" if not iv.get("auc") else " [{:.3f}, {:.3f}]".format(*iv["auc"])
    rows = [f"| sensitivity (Stone called stone) | {r['tp']}/{r['tp'] + r['fn']} | {pct(r['sensitivity'])}{ci(iv.get('sensitivity'))} |",
            f"| specificity (the rest not called stone) | {r['tn']}/{r['tn'] + r['fp']} | {pct(r['specificity'])}{ci(iv.get('specificity'))} |",
            f"| AUC, stone against the rest | {ev['n']} slices | {r['auc']:.3f}{auc_ci} |"]
    for c in ev.get("confounders", []):
        if c["is_positive"]:
            continue
        rows.append(f"| {c['class']} called stone | {c['called_stone']}/{c['n']} | {pct(c['rate'])}"
                    f"{ci(iv.get('called_stone_rate', {}).get(c['class']))} |")
    rows.append(f"| out of scope (of {ev['n']}) | {r.get('out_of_scope', 0)} | |")
    if ev.get("calibration"):
        rows.append(f"| expected calibration error | | {ev['calibration']['ece']:.3f} |")
    return rows


def int8_note(sums: list[str], acc: dict | None) -> list[str]:
    """Why the release holds the forms it holds: INT8 only where it kept the FP32 parent's decisions."""
    shipped = {line.split()[1] for line in sums if line.strip()}
    failed = [Path(r["model"]).name for r in (acc or {}).get("rows", []) if not r["passed"]]
    lines = []
    if "model-int8cpu.onnx" in shipped:
        lines += ["**INT8 on the CPU.** The convolutions of the trunk are INT8; the stone map, its link to the stone",
                  "logit, the scope distance and the residual sums they read (the outputs of layer2, layer3 and",
                  "layer4) stay FP32, so the heads see the dequantized convolutions' sum and not an 8-bit rounding of",
                  "it (which moved half the decisions of the first release's INT8 form)."]
    if failed:
        lines += [f"**Not shipped:** {', '.join(f'`{f}`' for f in failed)}: below the agreement gate (≥ 99 % of the",
                  "validation decisions of the FP32 parent; table below)."]
    if "model-int8trt.onnx" not in shipped and "model-fp16.onnx" in shipped:
        lines += ["The GPU-ready form is FP16 (for `build-engine`), which keeps every decision of the FP32 parent."]
    return lines + [""] if lines else []


def recipe_extras(config: dict, train: dict) -> list[str]:
    """The recipe's lines for erased-stone twins and the map gate, where the run used them."""
    lines = []
    if config.get("erase_fraction"):
        target = ("taught only that it is not a stone, -log(1 - p(stone))" if config.get("erase_class") == "not-stone"
                  else f"labelled {config.get('erase_class')}")
        lines += [f"erased-stone twins: {config['erase_fraction']:.0%} of the outlined Stone slices of a batch get a twin "
                  f"with the stone painted over, {target}, and a sham painting away from the stone;"]
    level = config.get("calculus_level")
    if level and list(level) != [0.9, 1.0]:
        share = config.get("calculus_fraction")
        lines += [f"placed calculi{f' on {share:.0%} of the non-stone slices,' if share is not None else ''} drawn at "
                  f"{level[0]:g}-{level[1]:g} window units and clipped at the window's top (saturated through their blur);"]
    mixed = train.get("interpolated")
    if mixed:
        n = len(mixed.get("fine_tunes") or [mixed["fine_tune"]])
        tuned = "the fine-tune" if n == 1 else f"the average of {n} fine-tunes (seeds of that recipe)"
        lines += [f"then every weight mixed back with the release it was fine-tuned from: {1 - mixed['alpha']:g} × the "
                  f"release + {mixed['alpha']:g} × {tuned}, BatchNorms folded (WiSE-FT; "
                  "`python -m edgekidney.model.interpolate`), the scope detector fitted again;"]
    g = train.get("map_gate") or {}
    if g.get("level") is not None:
        lines += [f"map gate: the stone logit loses {g['slope']:g} × relu(gate − map peak), gate at map p = {g['p']:.3f}, "
                  f"{g['margin']:g} map logits below the weakest stone called on validation (`edgekidney refit`);"]
    return lines


def confusion_limits(ev: dict | None, shipped: dict | None = None, shipped_name: str = "") -> list[str]:
    """A known-limit line for each non-stone class the model mostly confuses with another non-stone class;
    with ``shipped`` (the shipped form's evaluation), what that form names them too."""
    if not ev:
        return []
    a = ev["at_model_threshold"]
    b = (shipped or {}).get("at_model_threshold")
    out = []
    for i, c in enumerate(a["classes"]):
        row = a["confusion_matrix"][i]
        n = sum(row)
        if c == a["positive_class"] or not n or row[i] / n >= 0.7:
            continue
        worst = max((k for k in range(len(a["classes"])) if k != i), key=lambda k: row[k])
        also = ""
        if b and b["classes"] == a["classes"] and b["confusion_matrix"][i] != row:
            named = [(b["confusion_matrix"][i][k], name) for k, name in enumerate(b["classes"]) if b["confusion_matrix"][i][k]]
            also = f"; the shipped `{shipped_name}`: " + ", ".join(f"{m} {name}" for m, name in sorted(named, reverse=True))
        out += [f"- {c} slices: {row[i]} of {n} named {c}, {row[worst]} named {a['classes'][worst]} (FP32 parent{also}). "
                "The stone answer is what is validated; the name of a non-stone finding is not to be relied on."]
    return out


def exam_rows(results: list[dict], shipped: str) -> list[str]:
    """The whole-exam table (benchmarks/exam.py, one result per form; the foci as the ``shipped`` form found them)."""
    r0 = results[0]
    lines = ["## A whole exam from another hospital", "",
             f"`{Path(r0['volume']).name}` (TotalSegmentator's sample in `examples/`, {r0['slices']} slices of 3 mm, "
             "pelvis to liver dome)",
             "has no stone label, but its kidneys hold hyperdense foci. The reference (`benchmarks/reference/`,",
             "read from the HU values, not by a radiologist): a box per kidney, and in it each region of 500 HU",
             "or more, of at most 40 voxels over at most 4 slices, surrounded by soft tissue. *Located*: the peak",
             "within 5 % of the slice's longer side of a focus on the slice or a neighbour (docs/scope.md, \"A",
             "whole exam\"). `python benchmarks/exam.py MODEL`.", "",
             "| model | study answer | slices called stone | located on a focus | called outside the kidneys' slices | foci found |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{Path(r['model']).name}` | {r['decision']} | {r['called_stone']} | {r['located']} | "
                     f"{r['calls_outside_kidneys']} of {r['slices_outside_kidneys']} | {r['foci_found']} of {r['foci']} |")
    lines += ["", "| kidney | slices | HU (max) | found by the shipped form |", "|---|---|---|---|"]
    mine = next((r for r in results if Path(r["model"]).name == shipped), results[-1])
    for f in mine["foci_table"]:
        lines.append(f"| {f['kidney']} | {f['slices'][0]}-{f['slices'][1]} | {f['max_hu']:.0f} | {'yes' if f['found'] else 'no'} |")
    return lines + [""]


def isa_words(env: dict) -> str:
    """The CPU's INT8 instruction sets as the latency run recorded them (runs before that field: the Xeon's)."""
    have = env.get("int8_instructions")
    if have is None:  # recorded before latency.json kept the flags: the card's first CPU, read by hand
        return "AVX-512 VNNI and AMX"
    names = {"amx_int8": "AMX", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512bw": "AVX-512", "avx2": "AVX2"}
    return ", ".join(names[f] for f in have) or "instruction sets unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--command", required=True, help="the training command, as run")
    p.add_argument("--where", required=True, help="where and how long it trained")
    a = p.parse_args()
    out = a.out
    from edgekidney.released import form_file

    shipped = form_file(out, "cpu")
    side_cpu = json.loads(shipped.with_suffix(".json").read_text())
    train = load(out, "training-metrics.json")
    config = load(out, "training-config.json") or {}
    sc = side_cpu.get("scope") or {}
    # release.sh names it by the form (evaluate-int8cpu.json, evaluate-fp16.json)
    ev32 = load(out, "evaluate-fp32.json")
    ev8 = load(out, f"evaluate-{shipped.stem.removeprefix('model-')}.json") or load(out, f"evaluate-{side_cpu['precision']}.json")
    acc, loc, scope, lat, exams = (load(out, n) for n in ("accuracy.json", "located.json", "scope.json", "latency.json",
                                                          "exam.json"))
    sums = (out / "SHA256SUMS").read_text().split("\n")
    sizes = {f.name: f.stat().st_size for f in out.glob("*.onnx")}

    lines = [f"# Model card: {out.name}", "",
             "A kidney-stone detector for CT slices: ResNet50 with a stride-8 **stone map**, trained from scratch by",
             "edgekidney on public data. For each slice it gives P(stone), whether the slice is within what it was",
             "trained on (`in_scope`), and where the stone is (`cam_peak`, the map's maximum within the body).",
             "`edgekidney study` turns the slices of a series into one answer per series.", "",
             "> **Not a medical device.** Research software, trained on 1,600 slices of one public dataset. It has not",
             "> been validated for clinical use and must not be used to diagnose or treat anyone.", "",
             "## Files", "",
             "| file | what | size | sha256 |", "|---|---|---|---|"]
    what = {"model-int8cpu.onnx": "on-device CPU form: INT8 Q/DQ (U8S8) for ONNX Runtime; the default",
            "model-int8trt.onnx": "GPU-ready form: symmetric INT8 Q/DQ for `edgekidney build-engine` (TensorRT 10.3+)",
            "model-fp16.onnx": "FP16 graph: the CPU form (ONNX Runtime) and the GPU-ready form for `build-engine`"}
    if any(line.endswith("model-int8cpu.onnx") for line in sums):
        what["model-fp16.onnx"] = "GPU-ready form: FP16 graph for `edgekidney build-engine` (ONNX Runtime runs it too)"
    for line in sums:
        if line.strip():
            digest, name = line.split()
            lines.append(f"| `{name}` | {what.get(name, '')} | {sizes.get(name, 0) / 1e6:.1f} MB | `{digest}` |")
    lines += ["", "Each has its JSON sidecar (classes, preprocessing, threshold, scope threshold, the stone map, the",
              f"planes it was trained on, sha256 of itself and of its FP32 parent `{side_cpu['parent_sha256']}`). The",
              "stone map, the scope distance and the link from the map to the stone logit stay FP32.",
              "`tests/test_released_model.py` checks these checksums and a few predictions.", "",
              *int8_note(sums, acc),
              f"Use it by name anywhere a command takes a model: `edgekidney study {out.name} SERIES/`,",
              f"`edgekidney infer {out.name} SLICE.png`, `edgekidney serve {out.name}`,",
              f"`edgekidney listen {out.name} ...`; `edgekidney build-engine {out.name}` takes the GPU form.", "",
              "## Data", "",
              "- **Slices**: 1,600 CT slices (256×256 JPEG, 400 each Normal, Stone, Cyst, Tumor; images 1-400 of each",
              "  class) of the public \"CT KIDNEY DATASET: Normal-Cyst-Tumor and Stone\" (Islam et al., *Scientific",
              "  Reports* 12, 11440, 2022; hospitals in Dhaka; CC BY 4.0). About a third are coronal reformats; the",
              f"  sidecar records the planes: {', '.join(side_cpu['extra'].get('planes', []))}"
              f" (counted by the body's outline in training: {train.get('planes')}).",
              "- **Where the stones are**: KSSD2025 masks (Bouzon et al., *IEEE Access* 2025,",
              "  doi:10.1109/ACCESS.2025.3610027) for 240 of the 400 Stone slices, down-sampled to 256×256. The set",
              "  ships no licence file; its slices come from the CC BY 4.0 dataset above.",
              f"- **Split**: by blocks of 20 file numbers; training {train.get('n_train')} slices (numbers 1-320 of",
              f"  each class, 6 byte-identical duplicates dropped), validation {train.get('n_val')} (321-400).",
              "  160 training and 80 validation Stone slices have masks.", "",
              "## Recipe", "",
              "ResNet50 from random initialisation (no ImageNet weights could be fetched where it was trained) at",
              "256 px after the body crop and body level; stone map on layer2+layer3 (docs/architecture.md, \"The",
              "stone map\"); cross-entropy (label smoothing as in the commands) on four classes plus the map's",
              "losses (dense BCE",
              "with stones weighted 20× where the map is known: masks, placed calculi, all non-stone slices; BCE",
              "of the map's maximum on the slices without a stone); the stone logit adds the map's peak (detached);",
              "class-balanced sampling; augmentation:",
              "rotation/shift, zoom, contrast, window, noise, coarser grids, placed calculi (30 % of non-stone",
              "slices get a twin with a 3-9 mm calculus and its disc as mask); AdamW, one-cycle, bfloat16 autocast;",
              *recipe_extras(config, train),
              "best epoch by validation AUC" + (" with the erased validation stones among the negatives"
                                                if config.get("erase_fraction") else "") +
              "; threshold for 95 % sensitivity on validation; out-of-scope threshold at",
              f"{sc.get('quantile', 0.99) * 100:g} % of validation distances × {sc.get('margin', 1.0):g}"
              + (" (the parent's; INT8 forms move it by their measured shift)" if side_cpu['precision'] == 'int8' else "")
              + ".", "",
              "```bash", a.command, "```", "",
              f"{a.where} Best epoch {train.get('best_epoch')} of {train.get('epochs_run')}.",
              "Then `bash models/release.sh RUN DATA MASKS VOLUMES models/" + out.name + "` (export, calibration on 256",
              "training slices, INT8 cpu and trt, every measurement below) and `python models/card.py`.", "",
              "## Validation (blocks 321-400 of each class; 95 % stratified bootstrap intervals, 2,000 resamples)", "",
              f"At the model's threshold ({side_cpu['threshold']:.4f}); a slice out of scope counts as a missed stone.", "",
              f"| {side_cpu['precision'].upper()} (shipped) | count | rate [95 % CI] |", "|---|---|---|", *evaluation_rows(ev8), "",
              "| FP32 parent | count | rate [95 % CI] |", "|---|---|---|", *evaluation_rows(ev32), ""]
    if loc:
        lines += ["## Where it points", "",
                  "Of the masked validation Stone slices called stone, the share whose `cam_peak` lies within 5 % of",
                  "the slice's longer side (12.8 px of 256) of a stone pixel; chance is the share of body pixels that",
                  "close to a stone. *Erased*: the same slices with the stone painted over in the tissue around it,",
                  "called stone; a model that reads the stone and not the look of its scanner calls few of them stone.", "",
                  "| model | masked | called stone | located | share | median distance | chance | peak agrees with FP32 "
                  "| erased, called stone |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in loc["results"]:
            erased = f"{r['erased_called_stone']}/{r['n_erased']}" if "n_erased" in r else "not measured"
            lines.append(f"| `{Path(r['model']).name}` | {r['n_masked']} | {r['n_called_stone']} | {r['n_located']} | "
                         f"{pct(r['located_share'])} | {r['median_distance_px'] or float('nan'):.1f} px | {pct(r['chance'])} | "
                         f"{pct(r.get('peak_agreement_with_first'))} | {erased} |")
        lines.append("")
    if acc:
        lines += ["## Quantized forms against their FP32 parent (validation blocks)", "",
                  "| model | agreement | accuracy | sensitivity | max \\|Δp\\| | gates |", "|---|---|---|---|---|---|"]
        for r in acc["rows"]:
            lines.append(f"| `{Path(r['model']).name}` | {pct(r['agreement'])} | {pct(r['accuracy'])} | "
                         f"{pct(r['sensitivity'])} | {r['max_abs_dprob']:.3f} | {'pass' if r['passed'] else 'FAIL'} |")
        lines.append("")
    if scope:
        s = scope["scope"]["sets"]
        lines += [f"## Out of scope on real CT it was not trained on ({side_cpu['precision'].upper()})", "",
                  "TotalSegmentator's test volumes and pydicom's multi-frame head CT (another hospital, other anatomy,",
                  "MR), and made-up inputs. Sets marked *refuse* must come out `out_of_scope`; the kidney-level slices",
                  "of the other hospital should stay in scope.", "",
                  "| set | slices | out of scope | called stone |", "|---|---|---|---|"]
        for name, r in s.items():
            lines.append(f"| {name.replace('_', ' ')}{' (refuse)' if r.get('must_refuse') else ''} | {r['n']} | "
                         f"{r['out_of_scope']} | {r['called_stone']} |")
        cp = scope["calculus_pairs"]
        vp = cp.get("validation_pairs", {})
        lines += ["", "**Calculus pairs**: a 3-9 mm calculus of 600-1200 HU placed where a kidney lies, beside the",
                  "same slice without it.", "",
                  "| slices | pairs | calculus found | twin not called stone | out of scope (calculus / twin) | median rise of p |",
                  "|---|---|---|---|---|---|",
                  f"| {cp['source']} | {cp['pairs']} | {pct(cp['found_with_calculus'])} | {pct(cp['twin_not_called_stone'])} | "
                  f"{pct(cp['out_of_scope_with_calculus'])} / {pct(cp['out_of_scope_twin'])} | {cp['p_rise_median']:+.3f} |"]
        if vp:
            lines.append(f"| {vp['source']} | {vp['pairs']} | {pct(vp['found_with_calculus'])} | "
                         f"{pct(vp['twin_not_called_stone'])} | {pct(vp['out_of_scope_with_calculus'])} / "
                         f"{pct(vp['out_of_scope_twin'])} | {vp['p_rise_median']:+.3f} |")
        lines.append("")
    if exams:
        lines += exam_rows(exams["results"], shipped.name)
    if lat:
        env = lat.get("environment", {})
        lines += ["## Latency (ONNX Runtime, CPU, batch 1)", "",
                  f"`edgekidney bench latency`, {env.get('threads')} threads, {env.get('processor')} ({env.get('cpus')} cores, "
                  f"{isa_words(env)}), onnxruntime {env.get('onnxruntime')}; all heads included. INT8's gain depends on",
                  "the CPU (docs/benchmarks.md has one where INT8 is no faster than FP32): `edgekidney bench latency`",
                  "measures it where the model will run.", "",
                  "| model | mode | p50 ms | p95 ms |", "|---|---|---|---|"]
        for r in lat["rows"]:
            lines.append(f"| {r['label']} | {r['mode']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
        for sp in lat.get("speedups", []):
            lines.append(f"\n{sp['label']} against the FP32 parent ({sp['mode']}): **{sp['vs_ort_fp32']:.2f}×** as fast.")
        lines.append("")
    lines += ["## Known limits", "",
              "- Trained on one public dataset of one region (Dhaka), 256×256 JPEG exports: other scanners, windows,",
              "  resolutions and patient populations are out of its experience. The scope gate refuses much that",
              "  looks unlike its training slices, but not everything: on two real chest CTs it kept 21 of 48 and",
              "  33 of 61 slices and called one lower-chest slice stone. On axial slices read in HU (`study`, the",
              "  listener, a DICOM slice in `infer` and `serve`) lungs, a skull and a body in two parts put chest,",
              "  head and leg slices out of scope whatever the model says (docs/scope.md, \"Chest slices\").",
              "- Trained from scratch on 1,274 slices on a CPU: far less than a clinical model would see; figures on",
              "  the 320 validation slices have the intervals above and say nothing about other hospitals.",
              "- Slices, not volumes: it never sees neighbouring slices; `study` combines slice calls with a rule.",
              "- Stones under about 2 mm, stones in the ureter or bladder, and phleboliths: not specifically taught.",
              "- The located share is measured on the dataset's own masks; a peak near a stone is not a segmentation.",
              "- Placed calculi are a test of sensitivity to a bright focus in a kidney, not of real stones.",
              *confusion_limits(ev32, ev8, shipped.name)]
    erased = next((r for r in (loc or {}).get("results", []) if r.get("n_erased")), None)
    if erased:
        lines += ["- With each outlined validation stone painted over in the tissue around it, "
                  f"{Path(erased['model']).name} still calls",
                  f"  {erased['erased_called_stone']} of {erased['n_erased']} stone: each such call answers the look "
                  "of its training data's scanners, not a stone (docs/scope.md, erased-stone twins)."]
    lines.append("")
    (out / "MODEL_CARD.md").write_text("\n".join(lines))
    print(f"wrote {out / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
