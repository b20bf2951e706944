"""The training loop: ResNet50 with its stone map on CT slices (needs the ``train`` extra: torch, torchvision).

Transfer-learning schedule: ``freeze_epochs`` with the backbone frozen (only the new layers learn),
then all layers with a lower backbone learning rate. AdamW, one-cycle schedule per phase,
cross-entropy with label smoothing on the slice's class, plus the stone map's losses
(:mod:`edgekidney.model.losses`): dense where the stone is known (masks, placed calculi, every
slice of another class), multiple-instance on Stone slices nobody outlined. Early stopping on
validation AUC, best checkpoint kept. The loop knows nothing of how a batch was made
(:mod:`edgekidney.model.feed`), what the network is (:mod:`edgekidney.model.network`) or how it is
stored (:mod:`edgekidney.model.checkpoint`).

A run directory holds: ``model.pt`` (best checkpoint), ``split.csv`` (the manifest), ``metrics.json``,
``history.csv`` (one row per epoch), ``curves.png`` (when matplotlib is installed), ``config.json``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgekidney.data.arrays import load_arrays_with_geometry
from edgekidney.data.dataset import (Dataset, SplitConfig, discover, find_classes, positive_class_index, split_dataset,
                                     write_manifest)
from edgekidney.data.masks import default_mask_folder, distance_to_mask, mask_path, mask_to_network, read_mask
from edgekidney.data.preprocess import Preprocessing
from edgekidney.data.provenance import data_provenance
from edgekidney.errors import EdgeKidneyError, InputError
from edgekidney.metrics import classification_report, roc_auc, softmax, threshold_for_sensitivity
from edgekidney.model.checkpoint import (CHECKPOINT_FORMAT, INCOMPLETE, TorchPredictor, load_checkpoint,  # noqa: F401
                                         load_checkpoint_card, save_checkpoint)
from edgekidney.model.distributed import current as current_dist
from edgekidney.data.calculus import paint_over_each
from edgekidney.model.feed import AUGMENTATIONS, add_twins, augment, epoch_order, parse_augmentations, to_input  # noqa: F401
from edgekidney.model.losses import dense_map_loss, map_targets, mil_map_loss, not_class_loss
from edgekidney.model.from_graph import FOLDED_FLAG, reexpand_batchnorm
from edgekidney.model.gate import fit_gate
from edgekidney.model.network import ARCH_PLAIN, ARCH_STONE_MAP, MAP_STRIDE, map_cells, predict_outputs
from edgekidney.model.weights import IMAGENET_HINT, build_model, load_weights_file, require_torch, resolve_device  # noqa: F401
from edgekidney.progress import echo, stage
from edgekidney.threads import apply_torch_threads, contention_note

STOP = "STOP"  # a file of this name in RUN ends training after the current epoch, keeping the best epoch
BN_SLICES = 128  # training slices whose statistics a graph's folded BatchNorms get back (model/from_graph.py)
LOCATED_FRACTION = 0.05  # a map peak within 5 % of the slice's longer side of a stone pixel is "located"


@dataclass
class TrainConfig:
    data: Path
    out: Path
    classes: list[str] | None = None
    positive_class: str | None = None
    weights: str = "imagenet"  # imagenet | none | PATH
    weights_sha256: str | None = None
    image_size: int = 256
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
    # the twins' calculus level in window units, drawn uniformly in [lo, hi]; above 1 it is clipped at the
    # window's top after its blur, as a calculus denser than the window is (docs/scope.md: at 0.9-1.0,
    # kidney-stone-ct-v3's recipe, the twins were too faint to be learned)
    calculus_level: tuple[float, float] = (0.9, 1.0)
    # share of outlined Stone slices that get a twin with the stone painted over, labelled erase_class
    # (feed.erased_twins: the stone, not the look of its source, must make the call); off by default:
    # in runs 5-7 (docs/scope.md, run 8 the control) it cut the calls on erased stones and on another hospital's abdomen but
    # cost Tumor specificity every time
    erase_fraction: float = 0.0
    # the erased twins' class; in a two-class task the other class; "not-stone" (NOT_STONE): trained
    # only away from the positive class, -log(1 - p(stone)), leaving which other class to the network
    erase_class: str = "Normal"
    scope_quantile: float = 0.99  # out-of-scope threshold: this quantile of validation distances ...
    scope_margin: float = 1.0  # ... times this margin (1.5 let MR and head CT through: see README)
    scope_shrinkage: float = 0.1
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocessing: Preprocessing | None = None
    # the stone map (edgekidney.model.network): a stride-8 head on layer2+3, read by the slice decision
    stone_map: bool = True
    stone_masks: Path | None = None  # DIR of masks (same relative paths, .png); None: <DATA>-stones if present
    map_gate: bool = True  # after training, fit the map gate (model/gate.py): no stone call where the map is quiet
    map_loss_weight: float = 1.0  # weight of the map's losses beside the slice's cross-entropy
    map_pos_weight: float = 20.0  # stone cells' weight in the dense loss
    mil_weight: float = 0.5  # weight of the multiple-instance loss within the map's losses
    autocast: str = "auto"  # auto (bfloat16 where the CPU has AMX/AVX-512 BF16, or on CUDA) | bf16 | off
    # ResNet50 stages that also learn while the backbone is frozen (e.g. ("layer2", "layer3"): the stages
    # the stone map reads, when a trained model is given a new map: --weights RUN/model.pt)
    tune_layers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"], d["out"] = str(self.data), str(self.out)
        d["preprocessing"] = self.resolved_preprocessing().to_dict()
        return d

    def resolved_preprocessing(self) -> Preprocessing:
        return self.preprocessing or Preprocessing(image_size=self.image_size)

    def augmentations(self) -> frozenset[str]:
        return parse_augmentations(self.augment)


# -- training -----------------------------------------------------------------------------------------
def autocast_dtype(choice: str, device):
    """The dtype to autocast to (None: full FP32). ``auto``: bfloat16 on CUDA, and on a CPU whose
    instructions run it natively (AMX or AVX-512 BF16: 2.5-3x faster ResNet50 training measured here)."""
    torch = require_torch()
    if choice == "off":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise EdgeKidneyError(f"--autocast must be auto, bf16 or off, not {choice!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return torch.bfloat16 if (" amx_bf16" in flags or " avx512_bf16" in flags) else None


def _predict_logits_and_peaks(model, x: np.ndarray, device) -> np.ndarray:
    """(N, classes + 2): logits, then the map's peak (row, col) on the input grid (-1 without a map)."""
    r = predict_outputs(model, x, device)
    peaks = r["peak_cell"] * MAP_STRIDE if "peak_cell" in r else np.full((len(x), 2), -1.0, np.float32)
    return np.concatenate([r["logits"], peaks], axis=1)


def located_share(peaks: np.ndarray, masks: np.ndarray, image_size: int) -> tuple[int, int]:
    """(located, assessed): map peaks within 5 % of the grid's side of a stone pixel, over the masks given."""
    reach = LOCATED_FRACTION * image_size
    hits = [distance_to_mask(tuple(p), m > 0.5) <= reach for p, m in zip(peaks, masks)]
    return int(sum(hits)), len(hits)


def planes_of(geometries) -> dict[str, int]:
    """How many slices look axial or coronal, judged by the body's outline (a coronal body is taller than wide)."""
    counts = {"axial": 0, "coronal": 0}
    for g in geometries:
        top, bottom, left, right = g.crop
        if g.body_found:
            counts["coronal" if (bottom - top) > 1.15 * (right - left) else "axial"] += 1
    return {k: v for k, v in counts.items() if v}


def _erased_validation(x_val: np.ndarray, m_val: np.ndarray, val_masked: np.ndarray, pre: Preprocessing,
                       seed: int) -> np.ndarray | None:
    """The outlined validation Stone slices with the stone painted over (no sham: nothing is learned from
    them); None when no stone could be painted over."""
    painted = paint_over_each([x_val[i, 0] * pre.std[0] + pre.mean[0] for i in val_masked],
                              [m_val[i] > 0.5 for i in val_masked], seed)
    kept = [p for p in painted if p is not None]
    return to_input(np.stack(kept), pre) if kept else None


NOT_STONE = -1  # the label of an erased twin that is only "not the positive class" (see class_loss in train)


def erase_class_index(classes: list[str], positive: int, name: str) -> int | None:
    """The class an erased-stone twin is labelled: ``name`` when the classes have it (case-insensitive), the
    other class of a two-class task, ``NOT_STONE`` for ``name == "not-stone"``, else None (no erased twins:
    which finding the slice would show is unknown)."""
    if name.lower() == "not-stone":
        return NOT_STONE
    for i, c in enumerate(classes):
        if c.lower() == name.lower() and i != positive:
            return i
    if len(classes) == 2:
        return 1 - positive
    return None


def _load_masks(cfg: TrainConfig, samples, geometries, positive: int, log) -> tuple[np.ndarray, np.ndarray]:
    """Masks on the network grid (N, S, S) float16 and whether each slice's map target is known (N,)."""
    s = geometries[0].size if geometries else cfg.image_size
    masks = np.zeros((len(samples), s, s), dtype=np.float16)
    known = np.array([smp.label != positive for smp in samples], dtype=bool)  # other classes: no stone anywhere
    folder = cfg.stone_masks
    if folder is None:
        return masks, known
    for i, (smp, g) in enumerate(zip(samples, geometries)):
        if smp.label != positive:
            continue
        path = mask_path(folder, cfg.data, smp.path)
        if path.exists():
            m = read_mask(path, g.shape)
            if m.any():
                masks[i] = mask_to_network(m, g)
                known[i] = True
    return masks, known


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
    classes = find_classes(cfg.data, cfg.classes)  # lists the class folders, reads no image
    positive = positive_class_index(classes, cfg.positive_class)
    device = resolve_device(cfg.device)
    _resolve_masks(cfg, log)
    if cfg.weights == "imagenet":
        log("model: ImageNet weights from the torch cache (fetched once, 98 MB)")
    arch = ARCH_STONE_MAP if cfg.stone_map else ARCH_PLAIN
    model, weights_source = build_model(len(classes), cfg.weights, cfg.weights_sha256, arch=arch, positive=positive)
    with run_folder(cfg.out):
        return _train_in_run_folder(cfg, model, weights_source, pre, device, threads, log, t_start)


def _resolve_masks(cfg: TrainConfig, log) -> None:
    """``--stone-masks DIR`` must exist; without it ``<DATA>-stones`` is used when present (said in one line)."""
    if not cfg.stone_map:
        if cfg.stone_masks is not None:
            raise InputError("--stone-masks needs the stone map (drop --no-stone-map)")
        return
    if cfg.stone_masks is not None:
        cfg.stone_masks = Path(cfg.stone_masks)
        if not cfg.stone_masks.is_dir():
            raise InputError(f"--stone-masks {cfg.stone_masks}: no such folder")
        return
    found = default_mask_folder(cfg.data)
    if found is not None:
        cfg.stone_masks = found
        log(f"data: stone masks from {found} (found beside the data; --stone-masks DIR to choose another)")


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
    model.to(memory_format=torch.contiguous_format)
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
        x_train, g_train = load_arrays_with_geometry(train_s, pre, bar.advance)
        x_val, g_val = load_arrays_with_geometry(val_s, pre, bar.advance)
    y_train = np.array([s.label for s in train_s], dtype=np.int64)
    y_val = np.array([s.label for s in val_s], dtype=np.int64)
    stone_map = cfg.stone_map
    if stone_map:
        m_train, k_train = _load_masks(cfg, train_s, g_train, positive, log)
        m_val, k_val = _load_masks(cfg, val_s, g_val, positive, log)
        n_masked = int((k_train & (y_train == positive)).sum())
        val_masked = np.flatnonzero(k_val & (y_val == positive))
        log(f"stone map: stride {MAP_STRIDE} ({map_cells(pre.image_size)}x{map_cells(pre.image_size)} cells); "
            f"{n_masked} of {int((y_train == positive).sum())} training stone slices have a mask "
            f"({len(val_masked)} in validation); the rest teach it through their label")
    erase_to, x_val_erased = None, None  # erased-stone twins: their class; the validation stones erased
    if stone_map and cfg.erase_fraction > 0:
        erase_to = erase_class_index(ds.classes, positive, cfg.erase_class)
    if erase_to is not None and n_masked:
        log(f"stone map: {cfg.erase_fraction:.0%} of the outlined stone slices get a twin with the stone painted "
            f"over, labelled {'not stone' if erase_to == NOT_STONE else repr(ds.classes[erase_to])} "
            "(--erase-fraction 0 to switch off)")
    if erase_to is not None and len(val_masked):
        x_val_erased = _erased_validation(x_val, m_val, val_masked, pre, cfg.seed)
    if getattr(model, FOLDED_FLAG, False):  # weights read from a graph: its BatchNorms were folded away
        sample = np.random.default_rng(cfg.seed).permutation(len(x_train))[:BN_SLICES]
        n_bn = reexpand_batchnorm(model, x_train[np.sort(sample)], device)
        log(f"model: the graph's {n_bn} BatchNorms were folded into its convolutions; their statistics "
            f"measured again on {len(sample)} training slices")
    t_data = time.perf_counter() - t_start

    log(f"model: ResNet50{' + stone map' if stone_map else ''}, weights {weights_source}, device {device}, "
        f"{threads} thread(s)")
    freeze_epochs = cfg.freeze_epochs if cfg.weights != "none" else 0
    if cfg.weights == "none" and cfg.freeze_epochs:
        log("model: --weights none: nothing to transfer, training all layers from the first epoch")
    amp = autocast_dtype(cfg.autocast, device)
    if amp is not None:
        model.to(memory_format=torch.channels_last)
        log("training: bfloat16 autocast (weights and the exported model stay FP32; --autocast off for FP32)")

    counts = np.bincount(y_train, minlength=len(ds.classes)).astype(np.float64)
    class_w = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    if cfg.balanced:  # the sampler already balances the classes; weighting the loss too would overshoot
        class_w = torch.ones_like(class_w)
    which = cfg.augmentations()
    log(f"training: augmentations {', '.join(sorted(which)) or 'none'}; "
        f"{'class-balanced sampling' if cfg.balanced else 'class-weighted loss'}")
    rng = np.random.default_rng(cfg.seed + dist.rank)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_w, label_smoothing=cfg.label_smoothing)

    def class_loss(out, yb):
        """Cross-entropy on the labelled slices; an erased twin labelled NOT_STONE adds -log(1 - p(stone))."""
        unsure = yb == NOT_STONE
        if not bool(unsure.any()):
            return loss_fn(out, yb)
        n_sure = int((~unsure).sum())
        ce = loss_fn(out[~unsure], yb[~unsure]) * n_sure if n_sure else out.sum() * 0.0
        return (ce + not_class_loss(out[unsure], positive).sum()) / len(yb)

    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)
    steps_per_epoch = dist.steps(len(x_train), cfg.batch_size)
    cells = map_cells(pre.image_size)

    tuned = tuple(f"{prefix}{layer}." for layer in cfg.tune_layers for prefix in ("", "net."))

    def is_new(name: str) -> bool:  # layers that transfer learning does not bring (or that are tuned with them)
        return name.startswith(("fc.", "net.fc.", "stone_map.", "map_weight") + tuned)

    def make_phase(frozen: bool, epochs: int):
        for name, p in model.named_parameters():
            p.requires_grad = (not frozen) or is_new(name)
        head = [p for n, p in model.named_parameters() if is_new(n)]
        body = [p for n, p in model.named_parameters() if not is_new(n)]
        body_lr = cfg.lr * (cfg.backbone_lr_scale if cfg.weights != "none" else 1.0)
        groups = [{"params": head, "lr": cfg.lr}] + ([] if frozen else [{"params": body, "lr": body_lr}])
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15)
        return opt, sched

    def step_loss(net, xb, yb, mb, kb):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if not stone_map:
                out = net(xb)
                return class_loss(out.float(), yb), out, {}
            out, map_logits = net(xb, with_map=True)
        ce = class_loss(out.float(), yb)
        targets = map_targets(mb, cells, MAP_STRIDE)
        dense = dense_map_loss(map_logits, targets, kb, cfg.map_pos_weight)
        mil = mil_map_loss(map_logits, yb == positive, only=yb != positive)  # hard negatives: the highest cell
        return ce + cfg.map_loss_weight * (dense + cfg.mil_weight * mil), out, {"dense": dense.item(), "mil": mil.item()}

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
                    for name, m in model.named_modules():
                        if isinstance(m, torch.nn.BatchNorm2d) and not is_new(name):
                            m.eval()
                order = dist.shard(epoch_order(y_train, cfg.balanced, dist.epoch_generator(gen, cfg.seed, epoch)))
                run_loss, run_ok, run_n, run_map = 0.0, 0, 0, {"dense": 0.0, "mil": 0.0}
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i : i + cfg.batch_size]
                    if len(idx) < 2 and len(order) > 1:
                        idx = order[i - 1 : i + 1]  # BatchNorm cannot train on a batch of one
                    xn, yn = x_train[idx], y_train[idx]
                    mn, kn = (m_train[idx].astype(np.float32), k_train[idx]) if stone_map else (None, None)
                    xn, yn, mn, kn = add_twins(xn, yn, mn, kn, positive, pre, rng,
                                               cfg.calculus_fraction if "calculus" in which else 0.0,
                                               erase_to, cfg.erase_fraction, tuple(cfg.calculus_level))
                    xb = torch.from_numpy(xn)
                    mb = torch.from_numpy(mn) if stone_map else None
                    if which - {"calculus"}:
                        if stone_map:
                            xb, mb = augment(xb, pre, gen, which, masks=mb)
                        else:
                            xb = augment(xb, pre, gen, which)
                    xb, yb = xb.to(device), torch.from_numpy(yn).to(device)
                    if amp is not None:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    if stone_map:
                        mb, kb = mb.to(device), torch.from_numpy(kn).to(device)
                    else:
                        kb = None
                    opt.zero_grad(set_to_none=True)
                    loss, out, parts = step_loss(net, xb, yb, mb, kb)
                    loss.backward()
                    opt.step()
                    sched.step()
                    run_loss += loss.item() * len(yn)
                    run_n += len(yn)
                    top = out.argmax(1)
                    run_ok += int(torch.where(yb == NOT_STONE, top != positive, top == yb).sum())
                    for k, v in parts.items():
                        run_map[k] += v * len(yn)
                    bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
                dist.sync_buffers(model)  # one model on every rank before validating
                width = len(ds.classes) + 2
                gathered = dist.gather_logits(lambda x: _predict_logits_and_peaks(model, x, device), x_val, width)
                val_logits, val_peaks = gathered[:, : len(ds.classes)], gathered[:, len(ds.classes):]
                val_loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(val_logits),
                                                                   torch.from_numpy(y_val), weight=class_w.cpu()))
                rep = classification_report(y_val, softmax(val_logits), ds.classes, positive, 0.5)
                row = {"epoch": epoch, "frozen": int(frozen), "train_loss": run_loss / run_n,
                       "train_accuracy": run_ok / run_n, "val_loss": val_loss,
                       "val_accuracy": rep["accuracy"], "val_auc": rep["auc"], "val_sensitivity": rep["sensitivity"],
                       "val_specificity": rep["specificity"], "lr": opt.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - t0}
                located = ""
                if stone_map:
                    row["train_map_dense"] = run_map["dense"] / run_n
                    row["train_map_mil"] = run_map["mil"] / run_n
                    if len(val_masked):
                        hit, n = located_share(val_peaks[val_masked], m_val[val_masked].astype(np.float32),
                                               pre.image_size)
                        row["val_located"] = hit / n
                        located = f" val_located {hit}/{n}"
                auc = -1.0 if math.isnan(rep["auc"]) else rep["auc"]
                if x_val_erased is not None:
                    # the erased twins of the validation stone slices join the negatives: an epoch that
                    # calls the scanner's look instead of the stone scores lower (see erased_twins)
                    erased = dist.gather_logits(lambda x: _predict_logits_and_peaks(model, x, device), x_val_erased,
                                                width)[:, : len(ds.classes)]
                    p_val, p_erased = softmax(val_logits)[:, positive], softmax(erased)[:, positive]
                    row["val_erased_called_stone"] = float(np.mean(p_erased >= 0.5))
                    row["val_auc_with_erased"] = auc = roc_auc(
                        np.concatenate([y_val == positive, np.zeros(len(p_erased), bool)]),
                        np.concatenate([p_val, p_erased]))
                    located += f" erased twins called stone {row['val_erased_called_stone']:.2f}"
                history.append(row)
                _write_history(history, hist_path)
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
                    f"val_auc {rep['auc']:.4f} val_acc {rep['accuracy']:.4f}{located} ({row['seconds']:.0f} s)")
                # the one-cycle rate peaks early and validation AUC swings with it: stop only once the
                # rate is annealing (second half), else a lucky early epoch ends a run (seen: best 3 of 7)
                if (cfg.out / STOP).exists():
                    log(f"stop: {cfg.out / STOP} found; finishing with the best epoch ({best['epoch']})")
                    (cfg.out / STOP).unlink(missing_ok=True)
                    stopped_early = True
                    break
                if not frozen and stale >= cfg.patience and epoch >= cfg.epochs // 2:
                    what = "val AUC (erased twins as negatives)" if x_val_erased is not None else "val AUC"
                    log(f"early stop: {what} has not improved for {cfg.patience} epochs (best epoch {best['epoch']})")
                    stopped_early = True
                    break

    model.load_state_dict(best["state"])
    gate = None
    if stone_map and cfg.map_gate:
        gate = fit_gate(model, x_val, y_val, positive, ds.classes, cfg.target_sensitivity, device, log)
    scope, val_logits = fit_scope_detector(model, x_train, y_train, x_val, device, cfg)
    log(f"scope: Mahalanobis distance on pooled features, threshold {scope['threshold']:.3f} "
        f"(validation q{cfg.scope_quantile:g} x {cfg.scope_margin:g}); {scope['val_out_of_scope']} of "
        f"{len(x_val)} validation slices fall outside")
    val_probs = softmax(val_logits)
    model.to(memory_format=torch.contiguous_format)
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
        "arch": ARCH_STONE_MAP if stone_map else ARCH_PLAIN, "autocast": str(amp) if amp is not None else "off",
        "stone_masks": str(cfg.stone_masks) if cfg.stone_masks else None,
        "scope": {k: v for k, v in scope.items() if not isinstance(v, np.ndarray)},
        "map_gate": gate,
        "val": report, "val_at_0.5": report_05,
        "seconds": {"data": round(t_data, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    if dist.active:
        metrics["distributed"] = {"world_size": dist.world, "backend": dist.backend,
                                  "train_slices_last_epoch_per_rank": dist.gather_object(run_n)}
    planes = planes_of(g_train)
    metrics["planes"] = planes
    extra = {"planes": sorted(planes)}
    if stone_map:
        extra["map"] = {"kind": "stone_map", "stride": MAP_STRIDE, "output": "cam", "values": "P(stone) per cell"}
    save_checkpoint(cfg.out / "model.pt", model, ds.classes, ds.classes[positive], pre, threshold,
                    weights_source, metrics, scope, extra)
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

    f_train = predict_outputs(model, x_train, device)["features"]
    r_val = predict_outputs(model, x_val, device)
    f_val, val_logits = r_val["features"], r_val["logits"]
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


def _check(cfg: TrainConfig) -> None:
    frozen = cfg.freeze_epochs if cfg.weights != "none" else 0
    if cfg.epochs < 1 or frozen < 0 or frozen > cfg.epochs:
        raise EdgeKidneyError("need --epochs >= 1 and 0 <= --freeze-epochs <= --epochs")
    if cfg.batch_size < 2:
        raise EdgeKidneyError("--batch-size must be at least 2 (BatchNorm needs two images to train)")
    cfg.augmentations()  # an unknown augmentation name fails before any data work
    stages = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    unknown = [t for t in cfg.tune_layers if t not in stages]
    if unknown:
        raise EdgeKidneyError(f"--tune-layers: unknown stage {', '.join(unknown)} (choose from {', '.join(stages)})")
