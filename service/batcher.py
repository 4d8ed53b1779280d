"""Dynamic batching of utterances for one model.

Requests put single utterances on a bounded queue and await a future. One collector task
forms batches whenever an inference worker is free (``service.batch_forming`` says how: the
oldest waiting utterance leads, or a live stream's urgent window for up to ``priority_age_s``;
utterances of similar length join within the batch's budgets; while live windows keep arriving,
the last free worker is kept for short batches, ``reserve_s``). Models that are not
padding-invariant get only equal-length utterances in one batch, so an utterance's embedding
never depends on what it was batched with. Utterances whose caller has gone (future cancelled)
or whose deadline has passed are dropped before they cost inference: a cancelled caller's
utterance leaves the queue at once. The batch runs on a thread pool; the event loop never runs
the model.

Admission by estimated wait (``service.admission``) refuses at once what could not be served in time.

The batcher knows nothing of protobuf or gRPC: it takes numpy arrays and callables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.admission import Admission
from service.batch_forming import RESERVE_HOLD_S, BatchForming
from service.errors import DeadlineExceeded, Overloaded, Unavailable

__all__ = ["DynamicBatcher", "BatchResult", "BatchStats"]

log = logging.getLogger("spkserve.batcher")


@dataclass
class BatchResult:
    """The embedding of one utterance and what it cost."""

    embedding: np.ndarray  # (D,)
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class BatchStats:
    """Observer callbacks (metrics); each may be None."""

    on_batch: Callable[[int, float], None] | None = None  # (batch size, inference seconds)
    on_queue_time: Callable[[float], None] | None = None  # seconds waited
    on_depth: Callable[[int], None] | None = None  # queue depth after a change
    on_dropped: Callable[[str], None] | None = None  # reason: "cancelled", "deadline" or "too_late"
    on_wasted: Callable[[int], None] | None = None  # utterances embedded after their caller gave up


@dataclass(eq=False)
class _Item:
    wave: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None = None  # time.monotonic() value
    urgent: bool = False  # a live stream's window: leads a batch ahead of older non-urgent utterances
    cost: int = field(init=False)

    def __post_init__(self) -> None:
        self.cost = len(self.wave)


class DynamicBatcher(BatchForming, Admission):
    """Groups concurrent single-utterance requests into batches for ``run``.

    Args:
        run: blocking function taking a list of (T_i,) float32 waves, returning (B, D).
        max_batch_size: most utterances in one batch (1 disables batching).
        max_batch_samples: most padded samples (B x T_max) in one batch; a single longer
            utterance still runs, alone.
        max_wait_s: how long the oldest utterance may wait for company.
        max_queue: most waiting utterances; beyond it ``submit`` raises Overloaded.
        max_queue_wait_s: most estimated queueing time to admit (None: no limit).
        deadline_margin: share of a request's remaining time kept free of estimated work when it is
            admitted (estimates are averages, the answer must travel back, and a result that arrives a
            moment late is work for nobody).
        min_fill: least share of a batch's padded samples that must be real audio (length
            bucketing; 0 batches in arrival order whatever the lengths).
        same_length_only: only equal-length utterances share a batch.
        workers: batches run concurrently (threads).
        priority_age_s: an urgent utterance (``submit(urgent=True)``: a live stream's window,
            waited for in real time) leads the next batch ahead of older ones, until the oldest
            utterance has waited this long; then the oldest leads again, so urgent traffic delays
            the rest by about this much at most, never starves it.
        reserve_s: while urgent utterances were submitted within the last ``reserve_hold_s``, a worker
            starts a batch estimated (at the measured throughput) to take longer than this only if
            another worker is free of such batches; so one worker stays free for live windows and
            short requests, and long work runs on the others, in its order (0: off; needs 2+ workers).
        stats: metric callbacks.
        name: for logs and thread names.
    """

    def __init__(
        self,
        run: Callable[[list[np.ndarray]], np.ndarray],
        *,
        max_batch_size: int = 32,
        max_batch_samples: int = 16000 * 320,
        max_wait_s: float = 0.005,
        max_queue: int = 512,
        deadline_margin: float = 0.3,
        max_queue_wait_s: float | None = 2.0,
        min_fill: float = 0.9,
        same_length_only: bool = False,
        workers: int = 1,
        priority_age_s: float = 0.25,
        reserve_s: float = 0.0,
        stats: BatchStats | None = None,
        name: str = "model",
    ):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_samples = max_batch_samples
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.deadline_margin = deadline_margin
        self.min_fill = min_fill
        self.workers = workers
        self.priority_age_s = priority_age_s
        self.reserve_s = reserve_s
        self.reserve_hold_s = RESERVE_HOLD_S
        self._urgent_seen = float("-inf")  # time.monotonic() of the last urgent submit
        self._long_running = 0  # batches in flight estimated to take longer than reserve_s
        self.samples_per_s: float | None = None  # measured throughput of one worker (moving average)
        self._avg_cost: float | None = None  # moving average of utterance length in samples
        self._next_turn = 0.0  # time.monotonic() of the next retry turn not yet promised to a refused caller
        self.same_length_only = same_length_only
        self.name = name
        self._stats = stats or BatchStats()
        self._queue: list[_Item] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{name}")
        self._slots = asyncio.Semaphore(workers)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Future] = set()
        self._closed = False

    @property
    def depth(self) -> int:
        """Utterances waiting for a batch."""
        return len(self._queue)

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def submit(self, wave: np.ndarray, deadline: float | None = None, admitted: bool = False,
                     urgent: bool = False) -> BatchResult:
        """Queue one (T,) float32 utterance and wait for its embedding.

        Args:
            wave: mono waveform at the model's rate.
            deadline: ``time.monotonic()`` after which the result is no longer wanted.
            admitted: a later part of a request already admitted (a window of a long recording):
                the work queued ahead may be the request's own, so ``max_queue_wait`` is not
                applied again (the deadline and ``max_queue`` still are).
            urgent: someone waits for this result in real time (a live stream's window): it may lead a
                batch ahead of older utterances (see ``priority_age_s``), and it keeps a worker free of long
                batches for ``reserve_hold_s`` (see ``reserve_s``).

        Raises:
            Overloaded: the queue is full.
            Unavailable: the batcher is shutting down.
            DeadlineExceeded: the deadline passed before the utterance was run.
        """
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        now = time.monotonic()
        self._prune(now)
        if len(self._queue) >= self.max_queue:
            retry = self._retry_after(self.estimated_wait(0) or 1.0, now)
            raise Overloaded(f"model {self.name}: {len(self._queue)} utterances queued (max_queue={self.max_queue}); "
                             f"retry in {retry:.1f} s", retry)
        self._check_wait(self.estimated_wait(len(wave)), deadline, now, None if admitted else self.estimated_wait(0))
        item = _Item(wave, asyncio.get_running_loop().create_future(), now, deadline, urgent)
        if urgent:
            self._urgent_seen = now
        item.future.add_done_callback(lambda f, it=item: self._on_done(it))
        self._queue.append(item)
        self._report_depth()
        self._wakeup.set()
        return await item.future

    def _on_done(self, item: _Item) -> None:
        """A caller that went away (or timed out) leaves the queue at once: it neither blocks admission nor runs."""
        if not item.future.cancelled():
            return
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already taken into a batch or pruned
        self._dropped(item, time.monotonic())
        self._report_depth()

    def _dropped(self, item: _Item, now: float) -> None:
        if self._stats.on_dropped:
            expired = item.deadline is not None and now >= item.deadline - 0.005
            self._stats.on_dropped("deadline" if expired else "cancelled")

    async def close(self) -> None:
        """Stop taking work, finish what is queued and in flight, stop the workers."""
        self._closed = True
        while self._queue or self._inflight:
            self._wakeup.set()
            await asyncio.sleep(0.005)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    # -- internals --------------------------------------------------------------------
    def _report_depth(self) -> None:
        if self._stats.on_depth:
            self._stats.on_depth(len(self._queue))

    def _prune(self, now: float) -> None:
        """Drop utterances whose caller has gone, whose deadline has passed, or that could not be run
        before their deadline any more (their own run alone, at the measured throughput, would end after it)."""
        kept = []
        for it in self._queue:
            if it.future.done():  # cancelled by the caller (client gone, or its deadline passed)
                self._dropped(it, now)
            elif it.deadline is not None and now >= it.deadline:
                it.future.set_exception(DeadlineExceeded(f"deadline passed after {now - it.enqueued:.3f} s in the queue"))
                if self._stats.on_dropped:
                    self._stats.on_dropped("deadline")
            elif it.deadline is not None and self.samples_per_s and now + it.cost / self.samples_per_s >= it.deadline:
                it.future.set_exception(DeadlineExceeded(
                    f"its run ({it.cost / self.samples_per_s:.3f} s) would end after its deadline "
                    f"({it.deadline - now:.3f} s left, after {now - it.enqueued:.3f} s in the queue)"))
                if self._stats.on_dropped:
                    self._stats.on_dropped("too_late")
            else:
                kept.append(it)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._report_depth()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                while True:  # until something may run on this worker
                    now = time.monotonic()
                    self._prune(now)
                    limit = self._limit(now)
                    if self._queue and self._leader(now, limit) is not None:
                        break
                    self._wakeup.clear()
                    # only long work waits while a worker is kept for live windows: look again when the hold
                    # lapses, a batch ends (``_finish``) or an utterance arrives
                    hold = max(self._urgent_seen + self.reserve_hold_s - now, 0.001) if self._queue else None
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=hold)
                    except asyncio.TimeoutError:
                        pass
                # wait for company until the leading utterance has waited max_wait
                while True:
                    self._prune(time.monotonic())
                    if not self._queue:
                        break
                    now = time.monotonic()
                    first = self._leader(now, self._limit(now))
                    if first is None:
                        break
                    left = first.enqueued + self.max_wait_s - now
                    if left <= 0 or self._closed or self._batch_ready(first):
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                    except asyncio.TimeoutError:
                        pass
                batch = self._take_batch(self._limit(time.monotonic()))
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            started = time.monotonic()
            long = self._is_long(batch)
            self._long_running += long
            for it in batch:
                if self._stats.on_queue_time:
                    self._stats.on_queue_time(started - it.enqueued)
            fut = loop.run_in_executor(self._executor, self._run, [it.wave for it in batch])
            self._inflight.add(fut)
            fut.add_done_callback(lambda f, b=batch, s=started, g=long: self._finish(f, b, s, g))

    def _finish(self, fut: asyncio.Future, batch: list[_Item], started: float, long: bool = False) -> None:
        """Hand each caller its row of the batch result (runs on the event loop)."""
        self._inflight.discard(fut)
        self._slots.release()
        self._long_running -= long
        self._wakeup.set()  # a worker kept for live windows may now take long work
        took = time.monotonic() - started
        exc = fut.exception()
        if exc is not None:
            log.error("batch of %d on %s failed: %r", len(batch), self.name, exc)
        else:
            padded = len(batch) * max(it.cost for it in batch)
            rate = padded / max(took, 1e-6)
            self.samples_per_s = rate if self.samples_per_s is None else 0.7 * self.samples_per_s + 0.3 * rate
            cost = sum(it.cost for it in batch) / len(batch)
            self._avg_cost = cost if self._avg_cost is None else 0.8 * self._avg_cost + 0.2 * cost
            if self._stats.on_batch:
                self._stats.on_batch(len(batch), took)
        now = time.monotonic()
        late = sum(1 for it in batch if it.future.done() or (it.deadline is not None and now > it.deadline))
        if late and self._stats.on_wasted:
            self._stats.on_wasted(late)
        for i, it in enumerate(batch):
            if it.future.done():
                continue
            if exc is not None:
                it.future.set_exception(exc)
            else:
                emb = fut.result()
                it.future.set_result(BatchResult(emb[i], started - it.enqueued, took, len(batch)))
