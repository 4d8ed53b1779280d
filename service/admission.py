"""Admission by estimated wait for a model's batcher (``service.batcher``).

The batcher measures its throughput (padded samples per second of inference, a moving average) and estimates
how long a new utterance would wait behind the audio already queued. A request whose deadline would pass
before it is served, or that would wait longer than ``max_queue_wait``, is refused at once (Overloaded, with a
retry hint) instead of waiting to fail. Retry hints are staggered: each refused caller is given the next free
*turn* after the work queued ahead and after the turns promised to the callers refused before it, one average
utterance's service time apart. Callers that honour the hint (gRPC clients with a retry policy, ``grpc-retry-pushback-ms``)
then come back at the rate the model serves them instead of all at once, so a storm of callers
is not refused over and over (each refusal still costs the receive and parse of its audio). Hints never hold
anyone back: admission looks only at the real queue.
"""

from __future__ import annotations

import time

from service.errors import Overloaded, Unavailable

__all__ = ["Admission"]


class Admission:
    """Admission by estimated wait, mixed into ``DynamicBatcher``: reads its queue, throughput and limits
    (``_queue``, ``samples_per_s``, ``_avg_cost``, ``workers``, ``deadline_margin``, ``max_queue_wait_s``,
    ``_next_turn``, ``_closed``, ``name``, and for the kept worker ``reserve_s``, ``reserve_hold_s``,
    ``_urgent_seen``)."""

    def estimated_wait(self, samples: int | None = None, pending: int = 0) -> float | None:
        """Seconds a new utterance would wait and run behind the queue and ``pending`` utterances
        still being prepared (of the average size, as is the new one when ``samples`` is None);
        None before any batch was measured. A long utterance (``_serving_workers``) counts one worker
        fewer while one is kept for live windows."""
        if not self.samples_per_s:
            return None
        avg = self._avg_cost or 0.0
        own = avg if samples is None else samples
        queued = sum(it.cost for it in self._queue) + own + pending * avg
        return queued / (self.samples_per_s * self._serving_workers(own))

    def _serving_workers(self, samples: float) -> int:
        """Workers that may run an utterance of ``samples`` padded samples: all of them, but one fewer
        while a worker is kept for live windows (urgent utterances within ``reserve_hold_s``) and the
        utterance alone is estimated to take longer than ``reserve_s`` (see ``service.batch_forming``)."""
        if self.reserve_s <= 0 or self.workers < 2 or samples <= self.reserve_s * self.samples_per_s:
            return self.workers
        if time.monotonic() - self._urgent_seen > self.reserve_hold_s:
            return self.workers
        return self.workers - 1

    def admit(self, deadline: float | None, pending: int = 0, extra_s: float = 0.0) -> None:
        """Refuse (Overloaded) a request now when its utterance could not be served in time;
        ``extra_s`` is the time it needs before it reaches the queue (decoding behind others)."""
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        wait = self.estimated_wait(None, pending)
        ahead = self.estimated_wait(0, pending)
        self._check_wait(None if wait is None else wait + extra_s, deadline, time.monotonic(),
                         None if ahead is None else ahead + extra_s)

    def _check_wait(self, wait: float | None, deadline: float | None, now: float, queued: float | None) -> None:
        """Refuse when ``wait`` (the work ahead and the request's own) misses the deadline, or when ``queued``
        (the work ahead only: a request's own compute is never queueing) exceeds ``max_queue_wait``."""
        if wait is None:
            return
        if deadline is not None and now + wait > deadline - self.deadline_margin * (deadline - now):
            retry = self._retry_after(queued if queued is not None else wait, now)
            raise Overloaded(f"model {self.name}: the estimated queueing time {wait:.2f} s exceeds the request's "
                             f"deadline ({max(deadline - now, 0):.2f} s left); retry in {retry:.1f} s", retry)
        if self.max_queue_wait_s is not None and queued is not None and queued > self.max_queue_wait_s:
            retry = self._retry_after(queued - self.max_queue_wait_s, now)
            raise Overloaded(f"model {self.name}: the estimated queueing time {queued:.2f} s exceeds max_queue_wait "
                             f"({self.max_queue_wait_s:.2f} s); retry in {retry:.1f} s", retry)

    MAX_RETRY_S = 30.0  # the longest retry hint given (the turns of a long line of refused callers)

    def _retry_after(self, ahead: float, now: float) -> float:
        """Seconds until a refused caller's turn: after ``ahead`` (the work queued before it) and after the
        turns promised to the callers refused before it, one average utterance's service time apart
        (so callers that honour their hints return at the rate the model serves them)."""
        step = (self._avg_cost or 0.0) / (self.samples_per_s * self.workers) if self.samples_per_s else 0.0
        turn = min(max(now + max(ahead, 0.0), self._next_turn), now + self.MAX_RETRY_S)
        self._next_turn = turn + step
        return max(turn - now, step, 0.001)
