"""Fine-tune torchvision ResNet50 on CT slices (needs the ``train`` extra: torch, torchvision).

Transfer-learning schedule: ``freeze_epochs`` with the backbone frozen (only the new classifier
learns), then all layers with a lower backbone learning rate. AdamW, one-cycle schedule per phase,
class-weighted cross-entropy with label smoothing, CT-sensible augmentation (small rotations and
shifts, intensity jitter), early stopping on validation AUC, best checkpoint kept.

A run directory holds: ``model.pt`` (best checkpoint), ``split.csv`` (the manifest), ``metrics.json``,
``history.csv`` (one row per epoch), ``curves.png`` (when matplotlib is installed), ``config.json``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgekidney.data.arrays import load_arrays
from edgekidney.data.dataset import (Dataset, SplitConfig, discover, find_classes, positive_class_index, split_dataset,
                           write_manifest)
from edgekidney.errors import DependencyError, EdgeKidneyError, InputError, ModelError
from edgekidney.metrics import classification_report, softmax, threshold_for_sensitivity
from edgekidney.data.preprocess import Preprocessing
from edgekidney.progress import echo, stage
from edgekidney.data.provenance import data_provenance
from edgekidney.sidecar import ModelCard, sha256_of
from edgekidney.model.distributed import current as current_dist
from edgekidney.threads import apply_torch_threads, contention_note

CHECKPOINT_FORMAT = "edgekidney.checkpoint/1"
INCOMPLETE = "INCOMPLETE"  # in a run folder whose training did not finish
IMAGENET_HINT = ("pass --weights PATH to a local torchvision ResNet50 state dict "
                 "(resnet50-11ad3fa6.pth, IMAGENET1K_V2) or --weights none")


def require_torch():
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        raise DependencyError("training needs PyTorch: pip install 'edgekidney[train]'") from None
    return torch


@dataclass
class TrainConfig:
    data: Path
    out: Path
    classes: list[str] | None = None
    positive_class: str | None = None
    weights: str = "imagenet"  # imagenet | none | PATH
    weights_sha256: str | None = None
    image_size: int = 224
    epochs: int = 12
    freeze_epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    patience: int = 4
    target_sensitivity: float = 0.95
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch intra-/inter-op threads; None: the cores this process may use
    # augmentations by name (AUGMENTATIONS), "all" or "none"; each can be switched off on its own
    augment: str = "all"
    balanced: bool = True  # class-balanced sampling (then the loss is not class-weighted as well)
    calculus_fraction: float = 0.3  # share of non-stone training slices that get a placed calculus twin
    scope_quantile: float = 0.99  # out-of-scope threshold: this quantile of validation distances ...
    scope_margin: float = 1.0  # ... times this margin (1.5 let MR and head CT through: see README)
    scope_shrinkage: float = 0.1
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocessing: Preprocessing | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"], d["out"] = str(self.data), str(self.out)
        d["preprocessing"] = self.resolved_preprocessing().to_dict()
        return d

    def resolved_preprocessing(self) -> Preprocessing:
        return self.preprocessing or Preprocessing(image_size=self.image_size)

    def augmentations(self) -> frozenset[str]:
        return parse_augmentations(self.augment)


AUGMENTATIONS = ("geometry", "scale", "intensity", "window", "noise", "resolution", "calculus")


def parse_augmentations(text: str | bool) -> frozenset[str]:
    """``all``, ``none`` or a comma list of AUGMENTATIONS -> the set of names."""
    if text is True or text == "all":
        return frozenset(AUGMENTATIONS)
    if text is False or text in ("none", ""):
        return frozenset()
    names = {t.strip() for t in str(text).split(",") if t.strip()}
    unknown = sorted(names - set(AUGMENTATIONS))
    if unknown:
        raise EdgeKidneyError(f"--augment: unknown augmentation {', '.join(unknown)} "
                              f"(choose from all, none, {', '.join(AUGMENTATIONS)})")
    return frozenset(names)


# -- model ---------------------------------------------------------------------------------------
def build_model(num_classes: int, weights: str = "none", weights_sha256: str | None = None):
    """torchvision ResNet50 with its final layer replaced. Returns (model, description of weights)."""
    torch = require_torch()
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=None)
    if weights == "imagenet":
        state = _imagenet_state_dict(ResNet50_Weights.IMAGENET1K_V2)
        model.load_state_dict(state)
        source = "torchvision ResNet50_Weights.IMAGENET1K_V2"
    elif weights == "none":
        source = "none (random initialisation)"
    else:
        state, digest = load_weights_file(Path(weights), weights_sha256)
        _load_backbone(model, state, weights)
        source = f"{weights} (sha256 {digest})"
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model, source


def _imagenet_state_dict(enum):
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub prints 'Downloading: "https://..."'
            return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, socket errors, SSL errors
        reason = " ".join(str(exc).split())[:120]
        raise InputError(f"cannot download ImageNet weights ({reason}); {IMAGENET_HINT}") from None


def load_weights_file(path: Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """A local state dict (or a checkpoint holding one), its sha256 verified when one is given."""
    torch = require_torch()
    if not path.exists():
        raise InputError(f"{path}: no such weights file; {IMAGENET_HINT}")
    digest = sha256_of(path)
    if expected_sha256 and digest.lower() != expected_sha256.lower().strip():
        raise InputError(f"{path}: sha256 is {digest}, expected {expected_sha256}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a PyTorch weights file ({' '.join(str(exc).split())[:120]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise InputError(f"{path}: does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}, digest


def _load_backbone(model, state: dict, where: str) -> None:
    """Load every backbone tensor; the classifier (fc) is replaced anyway."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in own if not k.startswith("fc.") and k not in backbone]
    bad = [k for k, v in backbone.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or bad or not backbone:
        detail = f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else (
            f"shape mismatch at {bad[0]}" if bad else "no tensors")
        raise InputError(f"{where}: not a ResNet50 state dict ({detail})")
    model.load_state_dict(backbone, strict=False)


def resolve_device(device: str):
    torch = require_torch()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to PyTorch; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


# -- data -------------------------------------------------------------------------------------------
def augment(batch, pre: Preprocessing, generator, which: frozenset[str] = frozenset(AUGMENTATIONS)):
    """Random variations a CT slice may show at another site, each switchable by name.

    geometry: rotation (±10°) and shift (±6 %); scale: zoom 0.85-1.15 (field of view, patient size);
    intensity: contrast ±10 %, brightness ±5 %; window: another window width (×0.7-1.4) and level
    (±8 % of the window), as other exports and scanners show the same HU; noise: Gaussian, σ up to 0.03
    (dose, reconstruction kernel); resolution: half the slices resampled through a 1-3x coarser grid
    (thick slices, 3 mm volumes, small matrices). Applied in 0..1 units, so padding stays air.
    """
    torch = require_torch()
    import torch.nn.functional as F

    n = batch.shape[0]
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    x01 = batch * std + mean  # back to 0..1 so that padding is air (0) and jitter is physical

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    if "geometry" in which or "scale" in which:
        angle = uniform(-1, 1, n) * math.radians(10) if "geometry" in which else torch.zeros(n)
        shift = uniform(-0.12, 0.12, n, 2) if "geometry" in which else torch.zeros(n, 2)  # grid units
        zoom = 1 / uniform(0.85, 1.15, n) if "scale" in which else torch.ones(n)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(batch.dtype), list(x01.shape), align_corners=False)
        x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if "window" in which:
        width = uniform(0.7, 1.4, n, 1, 1, 1)
        level = uniform(-0.08, 0.08, n, 1, 1, 1)
        x01 = ((x01 - 0.5 - level) / width + 0.5).clamp(0, 1)
    if "intensity" in which:
        contrast = 1 + uniform(-0.10, 0.10, n, 1, 1, 1)
        bright = uniform(-0.05, 0.05, n, 1, 1, 1)
        x01 = (x01 * contrast + bright).clamp(0, 1)
    if "resolution" in which:
        size = x01.shape[-1]
        for i in torch.nonzero(torch.rand(n, generator=generator) < 0.5).flatten().tolist():
            small = max(16, int(size / float(uniform(1.0, 3.0, 1))))
            low = F.interpolate(x01[i : i + 1], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
            x01[i : i + 1] = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    if "noise" in which:
        sigma = uniform(0.0, 0.03, n, 1, 1, 1)
        noise = torch.randn(n, 1, *x01.shape[2:], generator=generator) * sigma
        x01 = (x01 + noise).clamp(0, 1)  # one noise field for the three (identical) channels
    return (x01 - mean) / std


def calculus_twins(x: np.ndarray, y: np.ndarray, positive: int, fraction: float, pre: Preprocessing,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Extra positives: a calculus placed in the kidney region of ``fraction`` of the non-stone slices.

    The untouched slices stay in the batch as their negative twins (see :mod:`edgekidney.data.calculus`).
    Sizes are 3-9 mm at an assumed 350 mm field of view across the body crop.
    """
    from edgekidney.data.calculus import draw_calculus, kidney_sites, random_spec

    mean0, std0 = pre.mean[0], pre.std[0]
    extra = []
    for i in np.flatnonzero(y != positive):
        if rng.random() >= fraction:
            continue
        img = x[i, 0] * std0 + mean0
        sites = kidney_sites(img, rng, 1)
        if not sites:
            continue
        spec = random_spec(rng, sites[0], pixels_per_mm=img.shape[1] / 350.0)
        extra.append(draw_calculus(img, spec))
    if not extra:
        return x, y
    stack = np.stack(extra)
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    twins = ((stack[:, None] - mean) / std).astype(np.float32)
    return np.concatenate([x, twins]), np.concatenate([y, np.full(len(twins), positive, dtype=y.dtype)])


def epoch_order(y: np.ndarray, balanced: bool, generator) -> np.ndarray:
    """Indices of one epoch: a permutation, or with ``balanced`` each class drawn equally often."""
    torch = require_torch()
    if not balanced:
        return torch.randperm(len(y), generator=generator).numpy()
    counts = np.bincount(y)
    weights = torch.tensor(1.0 / counts[y], dtype=torch.float64)
    return torch.multinomial(weights, len(y), replacement=True, generator=generator).numpy()


def forward_parts(model, x):
    """ResNet50 forward returning (layer4 maps A, pooled features, logits): what the heads are built on."""
    m = model
    a = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
    pooled = a.mean(dim=(2, 3))
    return a, pooled, m.fc(pooled)


# -- training -----------------------------------------------------------------------------------------
def _predict_logits(model, x: np.ndarray, device, batch_size: int = 64) -> np.ndarray:
    return _predict_features(model, x, device, batch_size)[1]


def _predict_features(model, x: np.ndarray, device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features (N, 2048), logits (N, classes)) in eval mode."""
    torch = require_torch()
    model.eval()
    feats, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            _, f, z = forward_parts(model, torch.from_numpy(x[i : i + batch_size]).to(device))
            feats.append(f.float().cpu().numpy())
            logits.append(z.float().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def train(cfg: TrainConfig, log: Callable[[str], None] = echo) -> dict:
    """Run a whole training; returns the metrics dict also written to ``RUN/metrics.json``.

    Checks come in the order the user gave them (DATA, then the options); the weights are resolved
    before any data work and before RUN exists, so a missing file or no network fails in seconds and
    leaves nothing behind. A training that fails later removes the RUN it made (see :func:`run_folder`).
    """
    require_torch()
    _check(cfg)
    t_start = time.perf_counter()
    threads = apply_torch_threads(cfg.threads)
    note = contention_note(threads, cfg.threads)
    if note:
        log(note)
    pre = cfg.resolved_preprocessing()
    n_classes = len(find_classes(cfg.data, cfg.classes))  # lists the class folders, reads no image
    device = resolve_device(cfg.device)
    if cfg.weights == "imagenet":
        log("model: ImageNet weights from the torch cache (fetched once, 98 MB)")
    model, weights_source = build_model(n_classes, cfg.weights, cfg.weights_sha256)
    with run_folder(cfg.out):
        return _train_in_run_folder(cfg, model, weights_source, pre, device, threads, log, t_start)


@contextlib.contextmanager
def run_folder(out: Path):
    """RUN/ while a training writes into it, marked INCOMPLETE until the end.

    On failure (an error, Ctrl-C) a folder this training created is removed; a folder that existed
    before keeps the INCOMPLETE marker with the reason, and export/calibrate/evaluate refuse it by name.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    marker = out / INCOMPLETE
    marker.write_text("training started and has not finished\n")
    try:
        yield out
    except BaseException as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            marker.write_text(f"training did not finish: {reason}\n")
        raise
    marker.unlink(missing_ok=True)


def _train_in_run_folder(cfg: TrainConfig, model, weights_source: str, pre: Preprocessing, device, threads: int,
                         log: Callable[[str], None], t_start: float) -> dict:
    torch = require_torch()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dist = current_dist()  # rank 0 of 1 unless under edgekidney.model.distributed (DDP)
    ds: Dataset = split_dataset(discover(cfg.data, cfg.classes), cfg.split)
    positive = positive_class_index(ds.classes, cfg.positive_class)
    write_manifest(ds.samples, cfg.out / "split.csv")
    train_s, val_s = ds.of_split("train"), ds.of_split("val")
    for note in ds.notes:
        log(f"data: {note}")
    log(f"data: {len(train_s)} train / {len(val_s)} val / {len(ds.of_split('test'))} test slices, "
        f"classes {ds.classes}, positive {ds.classes[positive]!r}")

    data_info = data_provenance(cfg.data, ds.classes, ds.samples)
    if data_info["synthetic"]:
        log("data: synthetic phantoms (edgekidney synth): this model will say nothing about real CT")
    model.to(device)
    with stage("decoding + preprocessing", len(train_s) + len(val_s), "slice") as bar:
        x_train = load_arrays(train_s, pre, bar.advance)
        x_val = load_arrays(val_s, pre, bar.advance)
    y_train = np.array([s.label for s in train_s], dtype=np.int64)
    y_val = np.array([s.label for s in val_s], dtype=np.int64)
    t_data = time.perf_counter() - t_start

    log(f"model: ResNet50, weights {weights_source}, device {device}, {threads} thread(s)")
    freeze_epochs = cfg.freeze_epochs if cfg.weights != "none" else 0
    if cfg.weights == "none" and cfg.freeze_epochs:
        log("model: --weights none: nothing to transfer, training all layers from the first epoch")

    counts = np.bincount(y_train, minlength=len(ds.classes)).astype(np.float64)
    class_w = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    if cfg.balanced:  # the sampler already balances the classes; weighting the loss too would overshoot
        class_w = torch.ones_like(class_w)
    which = cfg.augmentations()
    log(f"training: augmentations {', '.join(sorted(which)) or 'none'}; "
        f"{'class-balanced sampling' if cfg.balanced else 'class-weighted loss'}")
    rng = np.random.default_rng(cfg.seed + dist.rank)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_w, label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)
    steps_per_epoch = dist.steps(len(x_train), cfg.batch_size)

    def make_phase(frozen: bool, epochs: int):
        for name, p in model.named_parameters():
            p.requires_grad = (not frozen) or name.startswith("fc.")
        head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
        body_lr = cfg.lr * (cfg.backbone_lr_scale if cfg.weights != "none" else 1.0)
        groups = [{"params": head, "lr": cfg.lr}] + ([] if frozen else [{"params": body, "lr": body_lr}])
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15)
        return opt, sched

    history: list[dict] = []
    best = {"auc": -1.0, "loss": math.inf, "epoch": 0, "state": None}
    phases = [(True, freeze_epochs), (False, cfg.epochs - freeze_epochs)]
    epoch, stale, stopped_early = 0, 0, False
    hist_path = cfg.out / "history.csv"
    with EpochBars() as bar:
        for frozen, n_epochs in phases:
            if n_epochs <= 0 or stopped_early:
                continue
            opt, sched = make_phase(frozen, n_epochs)
            net = dist.wrap(model)  # DDP after this phase's requires_grad is set
            for _ in range(n_epochs):
                epoch += 1
                t0 = time.perf_counter()
                task = bar.add_task(f"epoch {epoch}/{cfg.epochs}{' (backbone frozen)' if frozen else ''}",
                                    total=steps_per_epoch, status="")
                model.train()
                if frozen:  # keep ImageNet BatchNorm statistics while only the head learns
                    for m in model.modules():
                        if isinstance(m, torch.nn.BatchNorm2d):
                            m.eval()
                order = dist.shard(epoch_order(y_train, cfg.balanced, dist.epoch_generator(gen, cfg.seed, epoch)))
                run_loss, run_ok, run_n = 0.0, 0, 0
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i : i + cfg.batch_size]
                    if len(idx) < 2 and len(order) > 1:
                        idx = order[i - 1 : i + 1]  # BatchNorm cannot train on a batch of one
                    xn, yn = x_train[idx], y_train[idx]
                    if "calculus" in which and cfg.calculus_fraction > 0:
                        xn, yn = calculus_twins(xn, yn, positive, cfg.calculus_fraction, pre, rng)
                    xb = torch.from_numpy(xn)
                    if which - {"calculus"}:
                        xb = augment(xb, pre, gen, which)
                    xb, yb = xb.to(device), torch.from_numpy(yn).to(device)
                    opt.zero_grad(set_to_none=True)
                    out = net(xb)
                    loss = loss_fn(out, yb)
                    loss.backward()
                    opt.step()
                    sched.step()
                    run_loss += loss.item() * len(yn)
                    run_n += len(yn)
                    run_ok += int((out.argmax(1) == yb).sum())
                    bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
                dist.sync_buffers(model)  # one model on every rank before validating
                val_logits = dist.gather_logits(lambda x: _predict_logits(model, x, device), x_val, len(ds.classes))
                val_loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(val_logits),
                                                                   torch.from_numpy(y_val), weight=class_w.cpu()))
                rep = classification_report(y_val, softmax(val_logits), ds.classes, positive, 0.5)
                row = {"epoch": epoch, "frozen": int(frozen), "train_loss": run_loss / run_n,
                       "train_accuracy": run_ok / run_n, "val_loss": val_loss,
                       "val_accuracy": rep["accuracy"], "val_auc": rep["auc"], "val_sensitivity": rep["sensitivity"],
                       "val_specificity": rep["specificity"], "lr": opt.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - t0}
                history.append(row)
                _write_history(history, hist_path)
                auc = -1.0 if math.isnan(rep["auc"]) else rep["auc"]
                improved = auc > best["auc"] + 1e-6 or (abs(auc - best["auc"]) <= 1e-6 and val_loss < best["loss"])
                if improved:
                    best.update(auc=auc, loss=val_loss, epoch=epoch,
                                state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                    stale = 0
                else:
                    stale += 1
                bar.update(task, status=f"loss {row['train_loss']:.3f} val_loss {val_loss:.3f} "
                                        f"val_auc {rep['auc']:.3f} val_acc {rep['accuracy']:.3f}"
                                        f"{' *' if improved else ''}")
                log(f"epoch {epoch}: train_loss {row['train_loss']:.4f} val_loss {val_loss:.4f} "
                    f"val_auc {rep['auc']:.4f} val_acc {rep['accuracy']:.4f} ({row['seconds']:.0f} s)")
                # the one-cycle rate peaks early and validation AUC swings with it: stop only once the
                # rate is annealing (second half), else a lucky early epoch ends a run (seen: best 3 of 7)
                if not frozen and stale >= cfg.patience and epoch >= cfg.epochs // 2:
                    log(f"early stop: val AUC has not improved for {cfg.patience} epochs (best epoch {best['epoch']})")
                    stopped_early = True
                    break

    model.load_state_dict(best["state"])
    scope, val_logits = fit_scope_detector(model, x_train, y_train, x_val, device, cfg)
    log(f"scope: Mahalanobis distance on pooled features, threshold {scope['threshold']:.3f} "
        f"(validation q{cfg.scope_quantile:g} x {cfg.scope_margin:g}); {scope['val_out_of_scope']} of "
        f"{len(x_val)} validation slices fall outside")
    val_probs = softmax(val_logits)
    threshold = threshold_for_sensitivity(y_val == positive, val_probs[:, positive], cfg.target_sensitivity)
    report = classification_report(y_val, val_probs, ds.classes, positive, threshold)
    report_05 = classification_report(y_val, val_probs, ds.classes, positive, 0.5)
    metrics = {
        "best_epoch": best["epoch"], "epochs_run": epoch, "stopped_early": stopped_early,
        "weights": weights_source, "device": str(device), "threads": threads, "image_size": pre.image_size,
        "data": data_info,
        "n_train": len(train_s), "n_val": len(val_s), "duplicates_dropped": ds.duplicates_dropped,
        "target_sensitivity": cfg.target_sensitivity,
        "augmentations": sorted(which), "balanced_sampling": cfg.balanced,
        "scope": {k: v for k, v in scope.items() if not isinstance(v, np.ndarray)},
        "val": report, "val_at_0.5": report_05,
        "seconds": {"data": round(t_data, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    if dist.active:
        metrics["distributed"] = {"world_size": dist.world, "backend": dist.backend,
                                  "train_slices_last_epoch_per_rank": dist.gather_object(run_n)}
    save_checkpoint(cfg.out / "model.pt", model, ds.classes, ds.classes[positive], pre, threshold,
                    weights_source, metrics, scope)
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (cfg.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    _plot_history(history, cfg.out / "curves.png")
    return metrics


def fit_scope_detector(model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, device,
                       cfg: TrainConfig) -> tuple[dict, np.ndarray]:
    """Fit the out-of-scope detector (see :mod:`edgekidney.scope`): training features, validation threshold.

    Returns (the detector as stored in the checkpoint, validation logits).
    """
    from edgekidney.scope import choose_threshold, fit_scope

    f_train, _ = _predict_features(model, x_train, device)
    f_val, val_logits = _predict_features(model, x_val, device)
    detector = fit_scope(f_train, y_train, cfg.scope_shrinkage)
    d_train, d_val = detector.distance(f_train), detector.distance(f_val)
    thr = choose_threshold(d_val, cfg.scope_quantile, cfg.scope_margin)
    q = [0.5, 0.9, 0.99]
    return {"method": "mahalanobis", "output": "scope_distance", "threshold": thr,
            "quantile": cfg.scope_quantile, "margin": cfg.scope_margin, "shrinkage": cfg.scope_shrinkage,
            "train_distance_quantiles": dict(zip(map(str, q), np.quantile(d_train, q).round(4).tolist())),
            "val_distance_quantiles": dict(zip(map(str, q), np.quantile(d_val, q).round(4).tolist())),
            "val_out_of_scope": int((d_val > thr).sum()),
            "rank": int(detector.basis.shape[1]), **detector.arrays()}, val_logits


class EpochBars:
    """One bar per epoch (batches, rate, ETA, loss) on the shared display of :mod:`edgekidney.progress`.

    Same calls as the loop makes (``add_task``, ``update``); a new epoch's bar replaces the last one,
    and the epoch's log line is the only thing that stays on the screen.
    """

    def __init__(self) -> None:
        self._stage = None

    def add_task(self, description: str, total: int, status: str = ""):
        self._close()
        self._stage = stage(description, total, "batch").__enter__()
        self._stage.status = status
        return self._stage

    def update(self, task, advance: int = 0, status: str | None = None) -> None:
        task.advance(advance, status)

    def _close(self) -> None:
        if self._stage is not None:
            self._stage.__exit__(None, None, None)
            self._stage = None

    def __enter__(self) -> "EpochBars":
        return self

    def __exit__(self, *exc) -> None:
        self._close()


def _write_history(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def _plot_history(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(ep, [h["val_auc"] for h in history], label="val AUC")
    b.plot(ep, [h["val_accuracy"] for h in history], label="val accuracy")
    b.set_xlabel("epoch"), b.set_ylim(0, 1.02), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model, classes, positive_class, pre: Preprocessing, threshold: float,
                    weights_source: str, metrics: dict, scope: dict | None = None) -> None:
    torch = require_torch()
    if scope is not None:  # numpy arrays become tensors so that torch.load(weights_only=True) reads them
        scope = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in scope.items()}
    torch.save({"format": CHECKPOINT_FORMAT, "arch": "resnet50",
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "classes": list(classes), "positive_class": positive_class, "preprocessing": pre.to_dict(),
                "threshold": float(threshold), "weights": weights_source, "metrics": metrics, "scope": scope}, path)


def _read_checkpoint(path: str | Path) -> tuple[dict, ModelCard]:
    torch = require_torch()
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    incomplete = path.parent / INCOMPLETE
    if incomplete.exists():
        reason = incomplete.read_text().strip() or "training did not finish"
        raise ModelError(f"{path.parent}: incomplete run ({reason}); run 'edgekidney train' into it again")
    if not path.exists():
        raise ModelError(f"{path}: no such checkpoint (expected RUN/model.pt from 'edgekidney train')")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: not an edgekidney checkpoint ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not an edgekidney checkpoint")
    scope = ck.get("scope") or {}
    card = ModelCard(classes=ck["classes"], positive_class=ck["positive_class"],
                     preprocessing=Preprocessing.from_dict(ck["preprocessing"]), threshold=ck["threshold"],
                     kind="checkpoint", metrics=ck.get("metrics", {}),
                     extra={"weights": ck.get("weights", ""), "data": ck.get("metrics", {}).get("data")},
                     outputs=["logits", "scope_distance", "cam"] if scope else ["logits", "cam"],
                     scope={k: v for k, v in scope.items() if not hasattr(v, "shape")})
    return ck, card


def load_checkpoint_card(path: str | Path) -> ModelCard:
    """What a checkpoint describes (classes, preprocessing, threshold), without building the model."""
    return _read_checkpoint(path)[1]


def load_checkpoint(path: str | Path, heads: bool = False):
    """-> (model in eval mode on the CPU, ModelCard describing it).

    With ``heads`` the model returns (logits, scope_distance, cam) as the exported graph does.
    """
    ck, card = _read_checkpoint(path)
    model, _ = build_model(len(ck["classes"]), "none")
    model.load_state_dict(ck["state_dict"])
    model.eval()
    if heads:
        from edgekidney.model.heads import build_headed_model

        model = build_headed_model(model, card.positive_index, card.preprocessing.image_size, ck.get("scope"))
    return model, card


class TorchPredictor:
    """PyTorch eager inference on a checkpoint, with the same interface evaluate uses for ONNX models."""

    backend_name = "torch"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        apply_torch_threads(threads)
        self.model, self.card = load_checkpoint(path, heads=True)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.threshold = self.card.threshold

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = require_torch()
        with torch.inference_mode():
            outs = self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))
        return {name: o.float().cpu().numpy() for name, o in zip(self.card.outputs, outs)}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.infer_outputs(batch)["logits"])

    def close(self) -> None:
        pass


def _check(cfg: TrainConfig) -> None:
    frozen = cfg.freeze_epochs if cfg.weights != "none" else 0
    if cfg.epochs < 1 or frozen < 0 or frozen > cfg.epochs:
        raise EdgeKidneyError("need --epochs >= 1 and 0 <= --freeze-epochs <= --epochs")
    if cfg.batch_size < 2:
        raise EdgeKidneyError("--batch-size must be at least 2 (BatchNorm needs two images to train)")
    cfg.augmentations()  # an unknown augmentation name fails before any data work
