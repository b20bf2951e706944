"""A training run carried between machines as FP16 pieces of a few MiB, and rebuilt (needs torch).

For training on a GPU machine that can only hand back small files: ``pack`` writes the run's weights
as FP16 in pieces of at most ``max_mib``, the checkpoint less its weights, and the run's records;
``join`` rebuilds ``RUN/model.pt`` from them on the machine the data are on, where the out-of-scope
detector (a 2048 x 2048 matrix, larger than the weights' pieces) is fitted again on the run's own
split. Stages frozen for the whole run are left out of the pieces; ``join`` takes them from the
weights the run started from. See docs/architecture.md ("Weights").

    python -m edgekidney.model.pieces pack RUN PIECES [--max-mib 16]
    python -m edgekidney.model.pieces join PIECES RUN --data DATA [--start WEIGHTS]

then ``edgekidney refit RUN`` fits the map gate and the thresholds on this machine's FP32 weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from edgekidney.errors import InputError, exit_code
from edgekidney.model.checkpoint import _read_checkpoint
from edgekidney.model.weights import require_torch

RECORDS = ("split.csv", "history.csv", "metrics.json", "config.json")
META = "checkpoint.pt"
STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def frozen_stages(config: dict) -> tuple[str, ...]:
    """ResNet50 stages that never learned in a run: all but ``tune_layers`` when every epoch was frozen."""
    if int(config.get("freeze_epochs", 0)) < int(config.get("epochs", 0)) or config.get("weights") == "none":
        return ()
    tuned = set(config.get("tune_layers") or ())
    return tuple(s for s in STAGES if s not in tuned)


def _stage(key: str) -> str:
    return (key[4:] if key.startswith("net.") else key).split(".")[0]


def pack_run(run: Path, out: Path, max_mib: float = 16.0, log=print) -> list[Path]:
    """``RUN`` -> ``OUT/weights-NN.pt`` (FP16, each at most ``max_mib``), ``OUT/checkpoint.pt``, the records."""
    torch = require_torch()
    run, out = Path(run), Path(out)
    ck = dict(_read_checkpoint(run)[0])
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    skip = frozen_stages(config)
    state = ck.pop("state_dict")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("weights-*.pt"):  # an earlier pack's pieces would be joined with these
        old.unlink()
    limit = int(max_mib * 2**20) - 2**16  # room for torch.save's own bytes
    pieces, current, size = [], {}, 0
    for key, value in state.items():
        if _stage(key) in skip and value.dim() > 1:  # a frozen stage's convolutions: the start has them
            continue
        if value.is_floating_point():
            value = value.half()
            if not bool(torch.isfinite(value).all()):
                raise InputError(f"{run}: {key} does not fit in FP16")
        n = value.numel() * value.element_size()
        if n > limit:
            raise InputError(f"{run}: {key} alone is larger than {max_mib:g} MiB")
        if current and size + n > limit:
            pieces.append(current)
            current, size = {}, 0
        current[key] = value
        size += n
    pieces.append(current)
    paths = []
    for i, piece in enumerate(pieces):
        paths.append(out / f"weights-{i:02d}.pt")
        torch.save(piece, paths[-1])
    ck["scope"] = {k: v for k, v in (ck.get("scope") or {}).items() if not hasattr(v, "shape")}
    ck["left_out"] = list(skip)
    torch.save(ck, out / META)
    for name in RECORDS:
        if (run / name).exists():
            shutil.copyfile(run / name, out / name)
    frozen = f", the convolutions of frozen {', '.join(skip)} left out" if skip else ""
    log(f"{run}: {sum(len(p) for p in pieces)} of {len(state)} tensors as FP16 in {len(pieces)} piece(s) "
        f"of at most {max_mib:g} MiB{frozen}")
    return paths


def _moved_split(src: Path, dst: Path, data: Path) -> list:
    """The split as the other machine wrote it, each path moved into ``data`` (by the data folder's name);
    written to ``dst`` and returned."""
    from dataclasses import replace

    from edgekidney.data.dataset import read_manifest, write_manifest

    mark = f"/{data.name}/"
    samples = []
    for s in read_manifest(src):
        path = str(s.path).replace("\\", "/")
        if mark not in path:
            raise InputError(f"{src}: {s.path} is not inside a folder named {data.name!r} (--data)")
        here = data / path.rsplit(mark, 1)[1]
        if not here.exists():
            raise InputError(f"{here}: not found (the run's slices must be in --data)")
        samples.append(replace(s, path=here))
    write_manifest(samples, dst)
    return samples


def join_run(pieces: Path, run: Path, data: Path, start: str | None = None, threads: int | None = None,
             log=print) -> Path:
    """Rebuild ``RUN/model.pt`` from ``pack_run``'s folder; the scope detector is fitted again on ``data``."""
    torch = require_torch()
    from edgekidney.data.preprocess import Preprocessing
    from edgekidney.model.checkpoint import save_checkpoint
    from edgekidney.model.refit import fit_scope_on_split
    from edgekidney.model.weights import build_model
    from edgekidney.threads import apply_torch_threads

    pieces, run, data = Path(pieces), Path(run), Path(data)
    if not (pieces / META).exists():
        raise InputError(f"{pieces}: no {META} (expected a folder written by 'pieces pack')")
    apply_torch_threads(threads)
    ck = torch.load(pieces / META, map_location="cpu", weights_only=True)
    state = {}
    for f in sorted(pieces.glob("weights-*.pt")):
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            state[k] = v.float() if v.is_floating_point() else v
    left_out = tuple(ck.pop("left_out", ()))
    if left_out and not start:
        raise InputError(f"{pieces}: stages {', '.join(left_out)} were frozen and left out; --start must name the "
                         "weights the run started from")
    classes, positive_class = ck["classes"], ck["positive_class"]
    model, _ = build_model(len(classes), start if left_out else "none", arch=ck["arch"],
                           positive=classes.index(positive_class))
    missing, unexpected = model.load_state_dict(state, strict=not left_out)
    stray = [k for k in missing if _stage(k) not in left_out] + list(unexpected)
    if stray:
        raise InputError(f"{pieces}: the pieces do not fit this network ({', '.join(stray[:3])} ...)")
    model.eval()
    run.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        if name != "split.csv" and (pieces / name).exists():
            shutil.copyfile(pieces / name, run / name)
    samples = _moved_split(pieces / "split.csv", run / "split.csv", data)
    pre = Preprocessing.from_dict(ck["preprocessing"])
    scope = fit_scope_on_split(model, samples, pre, ck.get("scope") or {})
    metrics = {**ck["metrics"], "joined_from_fp16_pieces": True}
    save_checkpoint(run / "model.pt", model, classes, positive_class, pre, ck["threshold"], ck.get("weights", ""),
                    metrics, scope, ck.get("extra"))
    log(f"{run / 'model.pt'}: {len(state)} tensors from {pieces}"
        f"{f', {len(missing)} from {start}' if left_out else ''}; scope detector fitted on the training split; "
        f"next: edgekidney refit {run}")
    return run / "model.pt"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgekidney.model.pieces", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="RUN -> FP16 pieces")
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--max-mib", type=float, default=16.0)
    j = sub.add_parser("join", help="FP16 pieces -> RUN/model.pt")
    j.add_argument("pieces", type=Path)
    j.add_argument("run", type=Path)
    j.add_argument("--data", type=Path, required=True)
    j.add_argument("--start", default=None, help="the weights the run started from (frozen stages)")
    j.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.verb == "pack":
        return exit_code(lambda: pack_run(a.run, a.out, a.max_mib))
    return exit_code(lambda: join_run(a.pieces, a.run, a.data, a.start, a.threads))


if __name__ == "__main__":
    sys.exit(main())
