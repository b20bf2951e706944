"""Dynamic micro-batching: requests that arrive together run as one inference batch.

Each request submits a *job* (its preprocessed images, ``(k, 3, S, S)``) to an asyncio queue. One
worker task takes the first job, adds the jobs already queued and those announced as on their way
(requests still decoding) for at most ``max_wait_ms``, up to ``max_batch`` images, then runs the batch
in a single inference thread, so the event loop keeps accepting and decoding meanwhile. While a batch
runs, new jobs queue up and form the next batch: under load batches fill up without any waiting; a
lone request never waits (nothing else is announced).

``max_batch`` <= 1 turns batching off: every job (one request's images) runs alone, one after another,
in the same inference thread -- the baseline the load benchmark compares against.

Failure and overload (docs/architecture.md rule 9: overload is answered with a clear refusal):

- Any failure while forming or running a batch (concatenate, inference, a wrong number of result
  rows) fails the requests of *that* batch with :class:`BatchFailed`; the worker goes on. A failing
  ``on_batch`` callback (metrics) is logged and the results are delivered. If the worker dies anyway,
  :attr:`MicroBatcher.alive` turns False (the service reports not ready) and every waiting request
  gets :class:`Closed`.
- At most ``max_queue`` requests are admitted at once (decoding or queued): one more raises
  :class:`Overloaded` (HTTP 503 with Retry-After). After :meth:`close`, :class:`Closed` (503).
- Requests whose caller stopped waiting (a deadline) are skipped when a batch is formed.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("edgekidney.server")

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


class BatcherError(Exception):
    """Why a request got no result from the batcher; ``status`` is the HTTP answer."""

    status = 500


class BatchFailed(BatcherError):
    """The batch this request ran in failed (a server-side problem, not the client's)."""

    status = 500


class Overloaded(BatcherError):
    """``max_queue`` requests are already admitted: come back later."""

    status = 503


class Closed(BatcherError):
    """The batcher is shutting down or its worker has stopped."""

    status = 503


class MicroBatcher:
    def __init__(self, run: RunBatch, max_batch: int = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 64) -> None:
        self._run = run
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._carry: Any = None  # a job taken from the queue that did not fit into the last batch
        self._announced = 0  # requests decoding now that will submit soon
        self._queued = 0  # jobs submitted and not yet taken into a batch
        self._closing = False
        self.death: str | None = None  # why the worker stopped, when it stopped other than by close()

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def alive(self) -> bool:
        """True while the worker runs and new requests are taken."""
        return self._worker is not None and not self._worker.done() and not self._closing

    @property
    def pending(self) -> int:
        """Requests admitted and not yet in a batch: decoding (announced) or queued."""
        return self._announced + self._queued

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
        await asyncio.gather(self._worker, return_exceptions=True)  # a dead worker has said why already
        self._executor.shutdown(wait=True)

    async def run_alone(self, inputs: np.ndarray) -> Sequence[Any]:
        """Run one batch in the inference thread, outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)

    # -- requests ----------------------------------------------------------------------------
    def announce(self) -> "Slot":
        """Admit a request that is about to submit (decoding): the worker may wait for it.

        Raises :class:`Closed` after close or when the worker has died, :class:`Overloaded` when
        ``max_queue`` requests are already admitted.
        """
        self._check_open()
        if self.pending >= self.max_queue:
            raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting, --max-queue); "
                             "retry shortly")
        return Slot(self)

    def _check_open(self) -> None:
        if self._queue is None or self._closing:
            raise Closed("the server is shutting down")
        if not self.alive:
            raise Closed(f"the inference worker has stopped ({self.death or 'unknown reason'})")

    async def submit(self, inputs: np.ndarray) -> BatchResult:
        self._check_open()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(np.asarray(inputs, dtype=np.float32), future))
        self._queued += 1
        return await future

    # -- the worker --------------------------------------------------------------------------
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        try:
            while True:
                jobs = await self._collect(loop)
                if jobs is None:
                    return
                if jobs:
                    await self._run_batch(loop, jobs)
                jobs = []
        except BaseException as exc:  # the worker itself is dying: nobody may wait forever
            if not self._closing:
                self.death = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                log.error("inference worker stopped: %s", self.death)
            self._fail_all(jobs, Closed(f"the inference worker has stopped ({self.death or 'closed'})"))
            raise

    async def _run_batch(self, loop, jobs: list[_Job]) -> None:
        size = sum(j.rows for j in jobs)
        try:
            batch = jobs[0].inputs if len(jobs) == 1 else np.concatenate([j.inputs for j in jobs])
            rows = await loop.run_in_executor(self._executor, self._run, batch)
            rows = list(rows)
            if len(rows) != size:
                raise RuntimeError(f"inference returned {len(rows)} results for {size} images")
        except Exception as exc:  # fail this batch's requests, keep the worker
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            log.error("inference batch of %d image(s) failed: %s", size, reason)
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(BatchFailed("inference failed for the batch this request ran in "
                                                      "(the server log says why); retry"))
            return
        if self._on_batch:
            try:
                self._on_batch(size)
            except Exception as exc:  # metrics must not cost anyone their result
                log.error("on_batch callback failed: %s: %s", type(exc).__name__, exc)
        start = 0
        for j in jobs:
            if not j.future.done():  # a cancelled request does not care any more
                j.future.set_result(BatchResult(rows[start : start + j.rows], size))
            start += j.rows

    def _fail_all(self, jobs: list[_Job], exc: BatcherError) -> None:
        waiting = list(jobs)
        if isinstance(self._carry, _Job):
            waiting.append(self._carry)
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Job):
                waiting.append(item)
        self._queued = 0
        for j in waiting:
            if not j.future.done():
                j.future.set_exception(exc)

    def _take(self, item):
        if isinstance(item, _Job):
            self._queued -= 1
        return item

    async def _collect(self, loop) -> list[_Job] | None:
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            first = self._take(await self._queue.get())
        if first is _STOP:
            return None
        if first.future.done():  # its caller stopped waiting (deadline, disconnect): skip it
            return []
        jobs, size = [first], first.rows
        if not self.batching:
            return jobs
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                job = self._take(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if self._announced <= 0 or remaining <= 0:
                    break  # nothing on its way, or waited long enough
                try:
                    job = self._take(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            if job is not _STOP and job.future.done():
                continue  # abandoned by its caller
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
