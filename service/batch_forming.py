"""How the next batch is formed (mixed into ``service.batcher.DynamicBatcher``): who leads it, who joins.

The oldest waiting utterance leads, or a live stream's window (*urgent*) while the oldest has waited
less than ``priority_age_s``; companions of similar length join while the batch stays under its budgets
(``max_batch_size``, padded samples ``max_batch_samples``, ``min_fill`` real audio) and ends before its
members' deadlines at the measured throughput. While live windows keep arriving (within
``reserve_hold_s``), a worker is kept for short batches: when every other worker runs a batch estimated
to take longer than ``reserve_s``, the next one may hold at most ``reserve_s`` of work, so a live window
never waits for every worker to finish a long upload; long work still runs on the others, in its order.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.batcher import _Item

__all__ = ["BatchForming", "RESERVE_HOLD_S"]

RESERVE_HOLD_S = 1.0  # live windows submitted this recently keep the last free worker for short batches


class BatchForming:
    """Batch formation for ``DynamicBatcher``: reads its queue, budgets and measured throughput (``_queue``,
    ``max_batch_size``, ``max_batch_samples``, ``min_fill``, ``same_length_only``, ``priority_age_s``,
    ``reserve_s``, ``reserve_hold_s``, ``workers``, ``samples_per_s``, ``deadline_margin``, ``_urgent_seen``,
    ``_long_running``) and reports its depth (``_report_depth``) when it takes a batch."""

    def _leader(self, now: float, limit: float | None = None) -> _Item | None:
        """The utterance the next batch is built around: the oldest urgent one while the oldest of all
        has waited less than ``priority_age_s``, else the oldest. With ``limit`` (padded samples, see
        ``_limit``) only utterances within it count; None when none is."""
        queue = self._queue if limit is None else [it for it in self._queue if it.cost <= limit]
        if not queue:
            return None
        first = queue[0]
        if first.urgent or now - first.enqueued >= self.priority_age_s:
            return first
        return next((it for it in queue if it.urgent), first)

    def _limit(self, now: float) -> float | None:
        """Most padded samples the next batch may hold to keep a worker for live windows (``reserve_s``): None
        (no limit) unless urgent utterances arrived within ``reserve_hold_s`` and every other worker already
        runs a long batch."""
        if self.reserve_s <= 0 or self.workers < 2 or not self.samples_per_s:
            return None
        if now - self._urgent_seen > self.reserve_hold_s or self._long_running < self.workers - 1:
            return None
        return self.reserve_s * self.samples_per_s

    def _is_long(self, batch: list[_Item]) -> bool:
        """Whether ``batch`` is estimated to take longer than ``reserve_s`` at the measured throughput."""
        if self.reserve_s <= 0 or not self.samples_per_s:
            return False
        return len(batch) * max(it.cost for it in batch) > self.reserve_s * self.samples_per_s

    def _compatible(self, first: _Item) -> list[_Item]:
        """Waiting utterances that may join a batch led by ``first``, in arrival order."""
        if not self.same_length_only:
            return self._queue
        return [it for it in self._queue if it.cost == first.cost]

    def _take_batch(self, limit: float | None = None) -> list[_Item]:
        """Remove and return the next batch: the leader (``_leader``: the oldest utterance, or an urgent one)
        and companions of similar length.

        Batches are padded to their longest member, so mixing a 1 s and a 10 s utterance wastes
        9 s of compute. Companions are taken nearest in length first (ties: older first), while
        the batch stays under both budgets and at least ``min_fill`` of its padded samples are
        real audio; the oldest utterance leads (an urgent one may go first for ``priority_age_s``), so none
        waits behind newer ones forever.
        A batch is also kept short enough to end, at the measured throughput, before the nearest
        deadline of its members: every member waits for the whole batch, and a large batch that
        ends after its members' deadlines is work for nobody. With ``limit`` (``_limit``), the batch
        holds at most that many padded samples (empty when no waiting utterance fits).
        """
        if not self._queue:
            return []
        now, rate = time.monotonic(), self.samples_per_s
        first = self._leader(now, limit)
        if first is None:
            return []
        order = {id(it): i for i, it in enumerate(self._queue)}
        others = sorted((it for it in self._compatible(first) if it is not first),
                        key=lambda it: (abs(it.cost - first.cost), order[id(it)]))
        batch, longest, total = [first], first.cost, first.cost
        due = first.deadline if first.deadline is not None else float("inf")
        for it in others:
            if len(batch) >= self.max_batch_size:
                break
            widest = max(longest, it.cost)
            n = len(batch) + 1
            if widest * n > min(self.max_batch_samples, limit or float("inf")) or \
                    (total + it.cost) < self.min_fill * widest * n:
                continue
            it_due = min(due, it.deadline if it.deadline is not None else float("inf"))
            if rate and now + widest * n / rate > it_due - self.deadline_margin * (it_due - now):
                continue  # with it, the batch would end after (or too near) a member's deadline
            batch.append(it)
            longest, total, due = widest, total + it.cost, it_due
        taken = set(map(id, batch))
        self._queue = [it for it in self._queue if id(it) not in taken]
        self._report_depth()
        return batch

    def _batch_ready(self, first: _Item) -> bool:
        """Whether the batch led by ``first`` is as full as it can get."""
        group = self._compatible(first)
        if len(group) >= self.max_batch_size:
            return True
        longest = max(it.cost for it in group)
        return longest * (len(group) + 1) > self.max_batch_samples
