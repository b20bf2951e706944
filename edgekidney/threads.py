"""How many CPU threads edgekidney's compute pools use (torch and ONNX Runtime).

Default: the cores this process may run on (``os.sched_getaffinity``), not the machine's core
count, so that a container or ``taskset`` limit is honoured. Beside another CPU-bound process,
fewer threads than cores is faster: a pool whose threads wait for each other at every layer stalls
whenever one of them is descheduled (``--threads 1`` with one busy neighbour on 2 cores).

No torch import here: the runtime (ONNX Runtime only) uses :func:`resolve_threads` too.
"""

from __future__ import annotations

import os

from edgekidney.errors import InputError


def available_cores() -> int:
    """The cores this process may use (affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """``None`` -> the available cores; otherwise a positive count."""
    if threads is None:
        return available_cores()
    if int(threads) < 1:
        raise InputError(f"--threads must be at least 1, not {threads}")
    return int(threads)


def apply_torch_threads(threads: int | None) -> int:
    """Size torch's intra-op and inter-op pools; returns the intra-op count in use.

    The inter-op pool can be sized only once per process, before any parallel work: later calls
    keep the size already set (torch raises a RuntimeError then, which is not the user's fault).
    """
    import torch

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # already started in this process (a second train/evaluate in one Python session)
    return n


def contention_note(threads: int, requested: int | None) -> str | None:
    """A hint when other processes already keep the cores busy and nobody chose the thread count.

    Measured on a shared 2-core machine (1-minute load 6.5-8.7 from other jobs), one ResNet50
    training step at 128 px, batch 16: 2 threads 12.7-16.6 s, 1 thread 3.6-5.9 s.
    """
    if requested is not None or threads < 2:
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    if load < threads / 2:
        return None
    return (f"threads: this machine is busy (1-minute load {load:.1f} on {threads} cores); beside other "
            f"CPU-bound jobs --threads {max(1, threads // 2)} is usually faster than {threads}")
