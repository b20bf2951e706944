"""A fine-tune mixed back with the weights it started from (weight-space interpolation; needs torch).

A fine-tune that learns the stone better can forget what its start knew of other scanners (the
fine-tunes of docs/scope.md, "The GPU round"). Weights on the straight line between a start and its
fine-tune keep much of both (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022:
WiSE-FT). The start is a released graph, whose BatchNorms the exporter folded into the convolutions,
so the fine-tune is folded the same way first (``W * gamma / sqrt(var + eps)``; its BatchNorm keeps
the folded bias, unit scale and zero statistics, as :func:`edgekidney.model.from_graph.state_from_graph`
writes them) and every weight is then ``(1 - alpha) * start + alpha * fine-tune``. The run written has
the fine-tune's split, records and configuration, a scope detector fitted again on its own training
slices, and ``edgekidney refit OUT`` then fits the map gate and the thresholds. docs/architecture.md,
"Weights".

Several fine-tunes of the same start (other seeds of one recipe) are averaged first, with equal shares
(a uniform "model soup": Wortsman et al., ICML 2022), and the average is mixed back: every weight is
``(1 - alpha) * start + alpha * mean(runs)``. They must share the split the start was measured on.

    python -m edgekidney.model.interpolate START RUN OUT --alpha 0.5
    python -m edgekidney.model.interpolate START RUN1 RUN2 RUN3 OUT --alpha 0.7
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from edgekidney.errors import InputError, exit_code
from edgekidney.model.weights import require_torch

RECORDS = ("split.csv", "history.csv", "config.json")


def folded_state(model) -> dict:
    """The state dict of ``model`` (evaluation mode) with every ResNet BatchNorm folded into the convolution
    before it, in the form :func:`edgekidney.model.from_graph.state_from_graph` reads from an export."""
    torch = require_torch()
    from edgekidney.model.from_graph import BN_EPS, _batchnorm_of

    state = {k: v.detach().clone().float() if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for name, conv in modules.items():
        if not isinstance(conv, torch.nn.Conv2d) or conv.bias is not None:
            continue
        b = _batchnorm_of(name) if _is_resnet_conv(name) else None
        bn = modules.get(b)
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
        bias = bn.bias.detach().double() - bn.running_mean.double() * scale
        state[f"{name}.weight"] = (conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).float()
        state.update({f"{b}.weight": torch.ones_like(bn.weight).float(), f"{b}.bias": bias.float(),
                      f"{b}.running_mean": torch.zeros_like(bn.running_mean).float(),
                      f"{b}.running_var": torch.full_like(bn.running_var, 1.0 - BN_EPS).float()})
    return state


def _is_resnet_conv(name: str) -> bool:
    last = name.rpartition(".")[2]
    return last.startswith("conv") or name.endswith("downsample.0")


def mix(start: dict, tuned: dict, alpha: float) -> dict:
    """``(1 - alpha) * start + alpha * tuned`` for every floating tensor; both must be the same network."""
    if set(start) != set(tuned):
        odd = sorted(set(start) ^ set(tuned))
        raise InputError(f"the start and the fine-tune are not the same network ({', '.join(odd[:3])} ...)")
    out = {}
    for k, a in start.items():
        b = tuned[k]
        if a.shape != b.shape:
            raise InputError(f"{k}: {tuple(a.shape)} in the start, {tuple(b.shape)} in the fine-tune")
        out[k] = (1.0 - alpha) * a.float() + alpha * b.float() if b.is_floating_point() else b.clone()
    return out


def soup(states: list[dict]) -> dict:
    """The uniform average of several folded states of one network (each a fine-tune of the same start)."""
    total = states[0]
    for i, state in enumerate(states[1:], start=2):
        total = mix(total, state, 1.0 / i)  # the running mean: (i-1)/i of the first i-1, 1/i of the i-th
    return total


def interpolate_run(start: str, run: Path | list[Path], out: Path, alpha: float, threads: int | None = None,
                    log=print) -> Path:
    """Write ``OUT/model.pt``: the run ``RUN`` (or the average of several) mixed with the graph ``start``
    it was fine-tuned from."""
    require_torch()
    from edgekidney.data.dataset import read_manifest
    from edgekidney.model.checkpoint import read_run_checkpoint, save_checkpoint
    from edgekidney.model.from_graph import graph_file, state_from_graph
    from edgekidney.model.refit import fit_scope_on_split
    from edgekidney.threads import apply_torch_threads

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha {alpha}: must lie in [0, 1] (0 is the start, 1 the fine-tune)")
    runs = [Path(r) for r in ([run] if isinstance(run, (str, Path)) else run)]
    out = Path(out)
    if not runs:
        raise InputError("name at least one fine-tuned run")
    if any(out.resolve() == r.resolve() for r in runs):
        raise InputError(f"{out}: write the mixed run to a new folder, not over a fine-tune")
    if len({r.resolve() for r in runs}) < len(runs):
        raise InputError("a fine-tune is named twice; each run takes an equal share of the average")
    graph = graph_file(start)
    if graph is None or not graph.is_file():
        raise InputError(f"{start}: not a release or an exported FP16/FP32 graph (the fine-tune's start)")
    run = runs[0]
    for other in runs[1:]:  # before any checkpoint is read
        _same_split(run, other)
    apply_torch_threads(threads)
    ck, model, card = read_run_checkpoint(run)
    tuned = [folded_state(model)] + [folded_state(read_run_checkpoint(other)[1]) for other in runs[1:]]
    mixed = mix(state_from_graph(graph), soup(tuned), alpha)
    model.load_state_dict(mixed, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        if (run / name).exists():
            shutil.copyfile(run / name, out / name)
    samples = read_manifest(out / "split.csv")
    scope = fit_scope_on_split(model, samples, card.preprocessing, ck.get("scope") or {})
    how = {"start": str(start), "fine_tune": str(run), "alpha": alpha}
    if len(runs) > 1:
        how["fine_tunes"] = [str(r) for r in runs]  # averaged with equal shares before the mix
    (out / "interpolation.json").write_text(json.dumps(how, indent=2) + "\n")
    save_checkpoint(out / "model.pt", model, card.classes, card.positive_class, card.preprocessing, ck["threshold"],
                    ck.get("weights", ""), {**ck["metrics"], "interpolated": how}, scope, ck.get("extra"))
    tuned_name = str(run) if len(runs) == 1 else f"mean({', '.join(str(r) for r in runs)})"
    log(f"{out / 'model.pt'}: {1 - alpha:g} x {start} + {alpha:g} x {tuned_name}; scope detector fitted on the "
        f"training split; next: edgekidney refit {out}")
    return out / "model.pt"


def _same_split(first: Path, other: Path) -> None:
    """Fine-tunes averaged together must have learned from, and been chosen on, the same slices."""
    if _split_of(first / "split.csv") != _split_of(other / "split.csv"):
        raise InputError(f"{other}: its split.csv differs from {first}'s; average fine-tunes of one split only")


def _split_of(manifest: Path) -> list[tuple[str, str, str]]:
    """Which slice (by content) went where, whatever folder the data lay in on the machine it was written."""
    from edgekidney.data.dataset import read_manifest

    return sorted((s.sha256 or s.path.name, s.class_name, s.split) for s in read_manifest(manifest))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgekidney.model.interpolate", description=__doc__.split("\n\n")[0])
    ap.add_argument("start", help="the release (name or folder) or FP16/FP32 graph the run was fine-tuned from")
    ap.add_argument("run", type=Path, nargs="+", help="the fine-tuned run (model.pt, split.csv); several are averaged")
    ap.add_argument("out", type=Path, help="the run to write")
    ap.add_argument("--alpha", type=float, required=True, help="the fine-tune's share: 0 is the start, 1 the run")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    return exit_code(lambda: interpolate_run(a.start, a.run, a.out, a.alpha, a.threads))


if __name__ == "__main__":
    sys.exit(main())
