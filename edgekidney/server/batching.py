"""Dynamic micro-batching: requests that arrive together run as one inference batch.

Each request submits a *job* (its preprocessed images, ``(k, 3, S, S)``) to an asyncio queue. One
worker task takes the first job, adds the jobs already queued and those announced as on their way
(requests still decoding) for at most ``max_wait_ms``, up to ``max_batch`` images, then runs the batch
in a single inference thread, so the event loop keeps accepting and decoding meanwhile. While a batch
runs, new jobs queue up and form the next batch: under load batches fill up without any waiting; a
lone request never waits (nothing else is announced).

``max_batch`` <= 1 turns batching off: every job (one request's images) runs alone, one after another,
in the same inference thread -- the baseline the load benchmark compares against.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

RunBatch = Callable[[np.ndarray], Sequence[Any]]  # (N, 3, S, S) -> N per-image results (in a thread)


@dataclass
class BatchResult:
    rows: list  # one result per submitted image, in order
    batch_size: int  # images in the inference batch these rows ran in


@dataclass
class _Job:
    inputs: np.ndarray
    future: asyncio.Future = field(repr=False)

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


_STOP = object()


class MicroBatcher:
    def __init__(self, run: RunBatch, max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._run = run
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._carry: Any = None  # a job taken from the queue that did not fit into the last batch
        self._announced = 0  # requests decoding now that will submit soon
        self._closing = False

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekidney-infer")
        self._worker = asyncio.create_task(self._work(), name="edgekidney-batcher")

    async def close(self) -> None:
        """Refuse new jobs, finish every queued one, stop the worker and the inference thread."""
        if self._worker is None or self._closing:
            return
        self._closing = True
        self._queue.put_nowait(_STOP)  # behind every queued job: they all run first
        await self._worker
        self._executor.shutdown(wait=True)

    async def run_alone(self, inputs: np.ndarray) -> Sequence[Any]:
        """Run one batch in the inference thread, outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)

    # -- requests ----------------------------------------------------------------------------
    def announce(self) -> "Slot":
        """A request that is about to submit (decoding): the worker may wait for it."""
        return Slot(self)

    async def submit(self, inputs: np.ndarray) -> BatchResult:
        if self._closing or self._queue is None:
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(np.asarray(inputs, dtype=np.float32), future))
        return await future

    # -- the worker --------------------------------------------------------------------------
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(loop)
            if jobs is None:
                return
            size = sum(j.rows for j in jobs)
            batch = jobs[0].inputs if len(jobs) == 1 else np.concatenate([j.inputs for j in jobs])
            try:
                rows = await loop.run_in_executor(self._executor, self._run, batch)
            except BaseException as exc:  # hand the failure to every request in the batch
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            if self._on_batch:
                self._on_batch(size)
            start = 0
            for j in jobs:
                if not j.future.done():  # a cancelled request does not care any more
                    j.future.set_result(BatchResult(list(rows[start : start + j.rows]), size))
                start += j.rows

    async def _collect(self, loop) -> list[_Job] | None:
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        jobs, size = [first], first.rows
        if not self.batching:
            return jobs
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if self._announced <= 0 or remaining <= 0:
                    break  # nothing on its way, or waited long enough
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if job is _STOP or size + job.rows > self.max_batch:
                self._carry = job  # next batch (or stop after this one)
                break
            jobs.append(job)
            size += job.rows
        return jobs


class Slot:
    """``with batcher.announce() as slot: ...decode...; await slot.submit(x)``: counted while decoding."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self._open = False

    def __enter__(self) -> "Slot":
        self._batcher._announced += 1
        self._open = True
        return self

    def _release(self) -> None:
        if self._open:
            self._batcher._announced -= 1
            self._open = False

    async def submit(self, inputs: np.ndarray) -> BatchResult:
        self._release()
        return await self._batcher.submit(inputs)

    def __exit__(self, *exc) -> None:
        self._release()
