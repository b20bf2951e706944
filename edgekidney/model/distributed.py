"""Data-parallel training on torch.distributed (DDP): gloo on the CPU, NCCL on CUDA.

``edgekidney train --nproc-per-node N`` starts N processes on this machine (:func:`launch`); under
``torchrun`` (several machines) each process finds its rank in the environment (:func:`init_from_env`).
Inside :func:`edgekidney.model.train.train` one :class:`Dist` says what this process does:

- every rank loads the same data and draws the same epoch order from a generator seeded with
  ``seed + epoch`` (as ``DistributedSampler.set_epoch``), then takes every N-th index (:meth:`Dist.shard`),
  so the ranks see disjoint slices and run the same number of steps;
- gradients are averaged by ``DistributedDataParallel`` (:meth:`Dist.wrap`);
- after each epoch rank 0's BatchNorm statistics go to every rank (:meth:`Dist.sync_buffers`), then
  validation is split over the ranks and the logits gathered back in order (:meth:`Dist.gather_logits`),
  so every rank validates the same model and takes the same best-epoch and early-stopping decisions;
- only rank 0 writes the run folder (checkpoint, metrics, history); the others write into a temporary
  folder that is removed (:func:`rank_output`).

Single-process training never touches this module's collectives (``Dist()`` is rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np

from edgekidney.errors import InputError

TIMEOUT = timedelta(minutes=10)  # a rank that died must not leave the others waiting forever


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def epoch_generator(self, shared, seed: int, epoch: int):
        """The generator an epoch's order is drawn from: the run's own one alone, ``seed + epoch`` in DDP."""
        if not self.active:
            return shared
        import torch

        return torch.Generator().manual_seed(seed * 1000 + epoch)

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's part of an epoch: every ``world``-th index, all ranks the same length."""
        if not self.active:
            return order
        n = len(order) // self.world * self.world or len(order)
        return order[:n][self.rank :: self.world] if n >= self.world else order

    def steps(self, n_train: int, batch_size: int) -> int:
        per_rank = n_train // self.world if self.active and n_train >= self.world else n_train
        return max(1, -(-per_rank // batch_size))

    def wrap(self, model):
        """The module to train with: DDP around ``model`` (built after requires_grad is set for a phase)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def sync_buffers(self, model) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before each forward.

        After an epoch each rank's statistics include its own last batch; validating or saving without
        this would mix models (rank 1's shard of the validation seen by a different model than rank 0's).
        """
        if not self.active:
            return
        import torch.distributed as tdist

        for b in model.buffers():
            tdist.broadcast(b.data, src=0)

    def gather_logits(self, predict, x: np.ndarray, width: int) -> np.ndarray:
        """``predict(x_part)`` -> (k, width) on this rank's share of ``x``; all shares gathered back in the
        order of ``x`` (every rank gets the whole, so every rank decides alike)."""
        if not self.active:
            return predict(x)
        import torch
        import torch.distributed as tdist

        part = predict(x[self.rank :: self.world]) if len(x[self.rank :: self.world]) else np.zeros((0, width))
        size = -(-len(x) // self.world)
        buf = np.zeros((size, width), dtype=np.float32)
        buf[: len(part)] = part
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        mine = torch.from_numpy(buf).to(device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        tdist.all_gather(parts, mine)
        out = np.zeros((len(x), width), dtype=np.float32)
        for r, p in enumerate(parts):
            out[r :: self.world] = p.cpu().numpy()[: len(range(r, len(x), self.world))]
        return out

    def gather_object(self, value) -> list:
        if not self.active:
            return [value]
        import torch.distributed as tdist

        out = [None] * self.world
        tdist.all_gather_object(out, value)
        return out


def current() -> Dist:
    """This process's place in the group (rank 0 of 1 when torch.distributed is not initialised)."""
    try:
        import torch.distributed as tdist
    except ImportError:
        return Dist()
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    return Dist(tdist.get_rank(), tdist.get_world_size(), tdist.get_backend())


def backend_for(device: str) -> str:
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def init(rank: int, world: int, device: str) -> Dist:
    import torch
    import torch.distributed as tdist

    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    tdist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    return current()


def init_from_env(device: str) -> Dist | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the group; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return init(int(os.environ["RANK"]), world, device)


@contextlib.contextmanager
def rank_output(cfg, dist: Dist):
    """Rank 0 trains into ``cfg.out``; the other ranks into a temporary folder removed afterwards."""
    if dist.main:
        yield cfg
        return
    with tempfile.TemporaryDirectory(prefix=f"edgekidney-rank{dist.rank}-") as tmp:
        yield replace(cfg, out=Path(tmp) / "run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, cfg, world: int, port: int, quiet_others: bool) -> None:
    from edgekidney.model.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist = init(rank, world, cfg.device)
    try:
        with rank_output(cfg, dist) as mine:
            train(mine, log=print if dist.main or not quiet_others else (lambda s: None))
    finally:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def launch(cfg, nproc: int, quiet_others: bool = True) -> dict:
    """Train with ``nproc`` processes on this machine; -> rank 0's metrics (also in RUN/metrics.json)."""
    import json

    import torch.multiprocessing as mp

    if nproc < 1:
        raise InputError(f"--nproc-per-node {nproc}: must be at least 1")
    if backend_for(cfg.device) == "nccl":
        import torch

        if torch.cuda.device_count() < nproc:
            raise InputError(f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} CUDA device(s)")
    if cfg.threads is None:  # the ranks share the cores
        cfg = replace(cfg, threads=max(1, len(os.sched_getaffinity(0)) // nproc))
    mp.start_processes(_worker, args=(cfg, nproc, free_port(), quiet_others), nprocs=nproc, join=True,
                       start_method="spawn")
    return json.loads((Path(cfg.out) / "metrics.json").read_text())
