"""Can a network learn placed calculi at all? The twin-only task, as docs/scope.md reports it.

Normal training slices and a twin of each with a calculus placed where a kidney lies (the training
augmentation, :func:`edgekidney.model.feed.calculus_twins`), nothing else; held out: the validation
Normal slices with a 4-8 mm calculus drawn at full resolution, as ``benchmarks/scope.py`` draws it.
Per epoch one JSON line: training loss (chance is ln 2 = 0.693), the held-out pair AUC and the share
of pairs in which the twin scores above its own original.

    python benchmarks/calculus_learnability.py ct-kidney --model resnet50 --epochs 8
    python benchmarks/calculus_learnability.py ct-kidney --model small-avg

It tells "the calculus is not in the input" (every model at chance, no pair ranking) from "this
network does not find it in this many steps" (a small network ranks the pairs, the big one does not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


# held-out calculi of 400-1200 HU at W400/L40: above the window's top, saturated through the blur
SATURATED = (1.4, 3.4)


def small_cnn(pool: str):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 2, 1),
                         nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1), nn.Flatten())


def held_out_pairs(files: list[Path], pre, rng, value: tuple[float, float] = (0.9, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs of each slice and of its copy with a placed calculus, as benchmarks/scope.py makes them
    (``value`` in window units: above 1, saturated through the blur)."""
    from edgekidney.bench.scope import place_in_windowed
    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import preprocess

    base, placed = [], []
    for f in files:
        gray = load_slice(f, pre)
        for placed_slice in place_in_windowed(gray, rng, value=value):
            base.append(preprocess(gray, pre))
            placed.append(preprocess(placed_slice, pre))
    return np.stack(base), np.stack(placed)


def run(data: Path, model_name: str = "resnet50", image_size: int = 128, epochs: int = 8, n_train: int = 320,
        n_val: int = 80, augment_names: str = "geometry", seed: int = 0, log=print,
        value: tuple[float, float] = (0.9, 1.0)) -> list[dict]:
    import torch

    from edgekidney.data.decode import load_slice
    from edgekidney.data.preprocess import Preprocessing, preprocess
    from edgekidney.model.feed import augment, calculus_twins, parse_augmentations
    from edgekidney.model.weights import build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pre = Preprocessing(image_size=image_size)
    files = sorted(p for p in (data / "Normal").iterdir() if p.is_file())
    if len(files) < n_train + n_val:
        raise SystemExit(f"{data}/Normal holds {len(files)} slices; need {n_train + n_val}")
    x = np.stack([preprocess(load_slice(f, pre), pre) for f in files[:n_train]])
    y = np.zeros(len(x), np.int64)
    vb, vp = held_out_pairs(files[n_train:n_train + n_val], pre, rng)
    sb, sp = held_out_pairs(files[n_train:n_train + n_val], pre, rng, value=SATURATED)
    net = build_model(2, "none")[0] if model_name == "resnet50" else small_cnn(model_name.removeprefix("small-"))
    which = parse_augmentations(augment_names)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = 16
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        total, n = 0.0, 0
        order = rng.permutation(len(x))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xn, yn = calculus_twins(x[idx], y[idx], 1, 1.0, pre, rng, value=value)
            xb = torch.from_numpy(xn)
            if which - {"calculus"}:
                xb = augment(xb, pre, gen, which)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xb), torch.from_numpy(yn))
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(yn), n + len(yn)
        net.eval()
        with torch.inference_mode():
            pb = torch.softmax(net(torch.from_numpy(vb)), 1)[:, 1].numpy()
            pp = torch.softmax(net(torch.from_numpy(vp)), 1)[:, 1].numpy()
            qb = torch.softmax(net(torch.from_numpy(sb)), 1)[:, 1].numpy()
            qp = torch.softmax(net(torch.from_numpy(sp)), 1)[:, 1].numpy()
        row = {"model": model_name, "epoch": epoch, "train_loss": round(total / n, 4),
               "pair_auc": round(float(np.mean(pp[:, None] > pb[None, :])), 4),
               "twin_above_original": round(float(np.mean(pp > pb)), 4), "pairs": len(pb),
               "pair_auc_saturated": round(float(np.mean(qp[:, None] > qb[None, :])), 4),
               "twin_above_original_saturated": round(float(np.mean(qp > qb)), 4), "twins_value": list(value),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a dataset folder with a Normal/ class folder")
    p.add_argument("--model", choices=("resnet50", "small-avg", "small-max"), default="resnet50")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=320, help="Normal slices to train on (each gets a twin)")
    p.add_argument("--val", type=int, default=80, help="Normal slices after those, for held-out pairs")
    p.add_argument("--augment", default="geometry")
    p.add_argument("--calculus-value", default="0.9,1.0",
                   help="the training twins' level in window units, LO,HI (above 1: saturated, e.g. 1.4,3.4)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    lo, hi = (float(v) for v in a.calculus_value.split(","))
    rows = run(a.data, a.model, a.image_size, a.epochs, a.train, a.val, a.augment, value=(lo, hi))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
