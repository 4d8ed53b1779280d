"""DynamicBatcher unit tests with a fake model."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import BatchStats, DynamicBatcher
from service.errors import DeadlineExceeded, Overloaded


class FakeModel:
    """Records batches; the embedding of a wave is [len, first sample]."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, waves):
        self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append([len(w) for w in waves])
        return np.array([[len(w), w[0]] for w in waves], dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    model = FakeModel(delay=0.02)

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.05, max_batch_samples=10**9)
        b.start()
        waves = [np.full(100 + i, float(i), np.float32) for i in range(20)]
        res = await asyncio.gather(*[b.submit(w) for w in waves])
        await b.close()
        return waves, res

    waves, res = run(main())
    for w, r in zip(waves, res):
        assert r.embedding[0] == len(w) and r.embedding[1] == w[0]
    assert max(len(x) for x in model.batches) == 8
    assert sum(len(x) for x in model.batches) == 20


def test_padded_budget_and_same_length_grouping():
    model = FakeModel()

    async def main(same_length):
        model.batches.clear()
        model.gate.clear()  # hold the worker so everything queues up
        b = DynamicBatcher(model, max_batch_size=16, max_wait_s=0.01, max_batch_samples=1000,
                           same_length_only=same_length)
        b.start()
        blocker = asyncio.ensure_future(b.submit(np.zeros(10, np.float32)))
        await asyncio.sleep(0.05)
        lengths = [100, 200, 100, 300, 200, 100, 900]
        futs = [asyncio.ensure_future(b.submit(np.zeros(n, np.float32))) for n in lengths]
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(blocker, *futs)
        await b.close()
        return [x for x in model.batches[1:]]

    for batch in run(main(False)):
        assert len(batch) * max(batch) <= 1000 or len(batch) == 1
    grouped = run(main(True))
    for batch in grouped:
        assert len(set(batch)) == 1
    assert sorted(n for b in grouped for n in b) == sorted([100, 200, 100, 300, 200, 100, 900])


def test_full_queue_is_overloaded():
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=3)
        b.start()
        futs = [asyncio.ensure_future(b.submit(np.zeros(5, np.float32)))]
        await asyncio.sleep(0.05)  # taken by the (blocked) worker
        futs += [asyncio.ensure_future(b.submit(np.zeros(5, np.float32))) for _ in range(3)]
        await asyncio.sleep(0.05)  # three queued
        with pytest.raises(Overloaded, match="max_queue=3"):
            await b.submit(np.zeros(5, np.float32))
        model.gate.set()
        await asyncio.gather(*futs)
        await b.close()

    run(main())


def test_cancelled_and_expired_requests_are_dropped_before_inference():
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0)
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros(1, np.float32)))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit(np.zeros(2, np.float32)))
        late = asyncio.ensure_future(b.submit(np.zeros(3, np.float32), deadline=time.monotonic() + 0.01))
        kept = asyncio.ensure_future(b.submit(np.zeros(4, np.float32)))
        await asyncio.sleep(0.05)
        gone.cancel()
        model.gate.set()
        await first
        await kept
        with pytest.raises(DeadlineExceeded):
            await late
        await b.close()

    run(main())
    assert [x[0] for x in model.batches] == [1, 4]


def test_model_errors_reach_every_caller_and_batcher_survives():
    calls = {"n": 0}

    def flaky(waves):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.ones((len(waves), 2), np.float32)

    async def main():
        b = DynamicBatcher(flaky, max_batch_size=4, max_wait_s=0.02)
        b.start()
        res = await asyncio.gather(*[b.submit(np.zeros(3, np.float32)) for _ in range(3)], return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in res)
        ok = await b.submit(np.zeros(3, np.float32))
        await b.close()
        return ok

    assert run(main()).embedding.shape == (2,)


def test_admission_by_estimated_wait_refuses_at_once_with_a_retry_hint():
    model = FakeModel(delay=0.05)  # 1,000 samples per 50 ms: 20,000 samples/s

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=1000, max_queue_wait_s=1.0)
        b.start()
        await b.submit(np.zeros(1000, np.float32))  # measures the throughput
        assert b.samples_per_s == pytest.approx(20_000, rel=0.5)
        model.gate.clear()
        queued = [asyncio.ensure_future(b.submit(np.zeros(1000, np.float32))) for _ in range(8)]
        await asyncio.sleep(0.05)  # ~7 x 1,000 samples ahead: about 0.35-0.4 s of work
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="deadline") as e:
            await b.submit(np.zeros(1000, np.float32), deadline=time.monotonic() + 0.1)
        assert time.monotonic() - t0 < 0.05 and e.value.retry_after_s > 0.2  # refused now, told when to retry
        more, refused = [], None
        for _ in range(200):  # fill the queue until the estimate passes max_queue_wait_s
            estimate = b.estimated_wait(1000)
            task = asyncio.ensure_future(b.submit(np.zeros(1000, np.float32)))
            await asyncio.sleep(0)
            if task.done():
                refused = task.exception()
                break
            more.append(task)
        assert isinstance(refused, Overloaded) and "max_queue_wait" in str(refused)
        assert estimate > 1.0 and len(more) > 5  # admitted while the estimate allowed it, refused once it did not
        model.gate.set()
        await asyncio.gather(*queued, *more)
        await b.close()

    run(main())


def test_retry_hints_are_staggered_so_refused_callers_return_at_the_rate_they_are_served():
    """A storm of refused callers is told successive turns, one utterance's service time apart, not one
    instant for all (which would bring them back together to be refused again)."""
    model = FakeModel(delay=0.05)  # 1,000 samples per 50 ms

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=1000, max_queue_wait_s=1.0)
        b.start()
        await b.submit(np.zeros(1000, np.float32))  # measures the throughput: about 20 utterances/s
        model.gate.clear()
        queued = [asyncio.ensure_future(b.submit(np.zeros(1000, np.float32))) for _ in range(8)]
        await asyncio.sleep(0.05)
        step = 1000 / b.samples_per_s  # one utterance's service time
        ahead = b.estimated_wait(0)
        hints, returns = [], []
        for _ in range(20):  # 20 callers refused in one burst: each deadline too near
            with pytest.raises(Overloaded) as e:
                await b.submit(np.zeros(1000, np.float32), deadline=time.monotonic() + 0.1)
            hints.append(e.value.retry_after_s)
            returns.append(time.monotonic() + e.value.retry_after_s)  # when this caller is told to come back
            assert f"retry in {e.value.retry_after_s:.1f} s" in str(e.value)
        assert hints[0] == pytest.approx(ahead, abs=0.05)  # the first: when the work ahead is done
        # then one turn each, in order: the promised return times (not the hints, which also shrink by however long
        # a loaded machine took between two refusals) are one service time apart
        gaps = np.diff(returns)
        assert np.allclose(gaps, step, rtol=0.2)
        model.gate.set()
        await asyncio.gather(*queued)
        await asyncio.sleep(hints[-1] + 0.05)  # the promised turns are over: a new refusal starts afresh
        model.gate.clear()
        queued = [asyncio.ensure_future(b.submit(np.zeros(1000, np.float32))) for _ in range(8)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as e:
            await b.submit(np.zeros(1000, np.float32), deadline=time.monotonic() + 0.1)
        assert e.value.retry_after_s == pytest.approx(b.estimated_wait(0), abs=0.05)
        model.gate.set()
        await asyncio.gather(*queued)
        await b.close()

    run(main())


def test_a_long_utterance_is_not_refused_for_its_own_compute():
    """On an idle batcher a long input waits for nothing: max_queue_wait counts only the work ahead of it."""
    model = FakeModel(delay=0.05)

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=1000, max_queue_wait_s=0.5)
        b.start()
        await b.submit(np.zeros(1000, np.float32))  # measures the throughput: about 20,000 samples/s
        long = np.zeros(100_000, np.float32)  # its own compute estimate: about 5 s, far over max_queue_wait
        assert b.estimated_wait(len(long)) > 0.5 and b.estimated_wait(0) < 0.5
        with pytest.raises(Overloaded, match="deadline"):  # its own compute still counts against its deadline
            await b.submit(long, deadline=time.monotonic() + 0.5)
        b.admit(None)  # admission before decoding lets it in
        assert (await b.submit(long)).embedding.shape == (2,)  # and so does the queue: nothing is ahead of it
        await b.close()

    run(main())


def test_abandoned_utterances_leave_the_queue_at_once_and_are_counted_by_reason():
    model = FakeModel()
    model.gate.clear()
    dropped = []

    async def main():
        from service.batcher import BatchStats

        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=3,
                           stats=BatchStats(on_dropped=dropped.append))
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros(1, np.float32)))
        await asyncio.sleep(0.05)
        gone = [asyncio.ensure_future(b.submit(np.zeros(2, np.float32))) for _ in range(2)]
        timed = asyncio.ensure_future(asyncio.wait_for(b.submit(np.zeros(3, np.float32),
                                                                deadline=time.monotonic() + 0.02), 0.02))
        await asyncio.sleep(0.01)
        for g in gone:
            g.cancel()
        await asyncio.sleep(0.05)  # the deadline passes: the caller's wait_for cancels its submit
        assert b.depth == 0  # nothing dead holds a queue place
        kept = [asyncio.ensure_future(b.submit(np.zeros(4, np.float32))) for _ in range(3)]  # fits max_queue=3 again
        model.gate.set()
        await asyncio.gather(first, *kept)
        with pytest.raises(asyncio.TimeoutError):
            await timed
        await b.close()

    run(main())
    assert sorted(dropped) == ["cancelled", "cancelled", "deadline"]
    assert [x[0] for x in model.batches] == [1, 4, 4, 4]  # abandoned ones never ran


def test_mixed_lengths_are_batched_with_similar_lengths():
    model = FakeModel()

    async def main(min_fill):
        model.batches.clear()
        model.gate.clear()
        b = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0, max_batch_samples=10**9, min_fill=min_fill)
        b.start()
        blocker = asyncio.ensure_future(b.submit(np.zeros(10, np.float32)))
        await asyncio.sleep(0.05)
        lengths = [1000, 10000, 1100, 9000, 1050, 9500, 1200, 8800]
        futs = [asyncio.ensure_future(b.submit(np.full(n, float(n), np.float32))) for n in lengths]
        await asyncio.sleep(0.01)
        model.gate.set()
        res = await asyncio.gather(blocker, *futs)
        await b.close()
        assert all(r.embedding[0] == n for r, n in zip(res[1:], lengths))  # each caller its own row
        return model.batches[1:]

    bucketed = run(main(0.75))
    assert sorted(map(sorted, bucketed)) == [[1000, 1050, 1100, 1200], [8800, 9000, 9500, 10000]]
    unbucketed = run(main(0.0))  # one batch of everything, padded to 10000
    assert len(unbucketed) == 1 and sorted(unbucketed[0]) == sorted([1000, 10000, 1100, 9000, 1050, 9500, 1200, 8800])


def test_overload_answers_resource_exhausted_with_a_retry_pushback_trailer():
    from types import SimpleNamespace

    import grpc

    from service.metrics import Metrics
    from service.rpc import rpc

    class Context:  # what the rpc wrapper uses of grpc.aio.ServicerContext
        trailer = initial = None

        def invocation_metadata(self):
            return (("x-request-id", "r-1"),)

        async def send_initial_metadata(self, md):
            self.initial = md

        def set_trailing_metadata(self, md):
            self.trailer = md

        async def abort(self, code, message):
            self.code, self.message = code, message

    class Servicer:
        ready = True
        auth = None
        engine = SimpleNamespace(metrics=Metrics(), config=SimpleNamespace(access_log=True))

        @rpc
        async def Embed(self, request, context):
            raise Overloaded("model m: the estimated queueing time 1.50 s exceeds ...", 1.5)

    ctx = Context()
    run(Servicer().Embed(None, ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctx.trailer == (("grpc-retry-pushback-ms", "1500"),)
    assert ctx.initial == (("x-request-id", "r-1"),)  # the caller's request id comes back


def test_work_that_would_end_after_its_deadline_is_not_run_and_late_results_are_counted():
    """An utterance whose own run would end after its deadline leaves the queue unrun ("too_late");
    one that ends after its caller gave up is counted as wasted."""
    model = FakeModel(delay=0.3)  # every batch takes 0.3 s whatever its size
    dropped, wasted = [], []

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=100, deadline_margin=0.0,
                           stats=BatchStats(on_dropped=dropped.append, on_wasted=wasted.append))
        b.start()
        await b.submit(np.zeros(1000, np.float32))  # measured: about 3,300 samples/s
        blocker = asyncio.ensure_future(b.submit(np.zeros(1000, np.float32)))  # runs for 0.3 s
        await asyncio.sleep(0.1)
        # admitted (its own ~0.3 s run fits 0.4 s), but the worker frees up 0.2 s later: then it no longer fits
        doomed = asyncio.ensure_future(b.submit(np.zeros(1000, np.float32), deadline=time.monotonic() + 0.4))
        await blocker
        with pytest.raises(DeadlineExceeded, match="would end after its deadline"):
            await doomed
        assert "too_late" in dropped and len(model.batches) == 2  # the doomed one never ran
        # a caller that goes away while its batch runs: the result is wasted, and counted
        model.gate.clear()
        gone = asyncio.ensure_future(b.submit(np.zeros(1000, np.float32)))
        await asyncio.sleep(0.05)
        gone.cancel()
        model.gate.set()
        await asyncio.sleep(0.6)
        assert sum(wasted) == 1
        await b.close()

    run(main())



def test_batches_end_before_their_members_deadlines():
    """Companions that would make the batch end after a member's deadline wait for the next batch."""
    model = FakeModel()

    async def main():
        b = DynamicBatcher(model, max_batch_size=32, max_wait_s=0.0, max_queue=100, deadline_margin=0.0)
        b.samples_per_s = 10_000.0  # as measured: 1,000 samples take 0.1 s
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        from service.batcher import _Item

        b._queue = [_Item(np.zeros(1000, np.float32), loop.create_future(), now, now + 0.25) for _ in range(5)]
        batch = b._take_batch()
        assert len(batch) == 2 and len(b._queue) == 3  # 3 x 0.1 s would end after the first one's 0.25 s
        for it in b._queue:  # no deadlines: the budgets alone decide
            it.deadline = None
        assert len(b._take_batch()) == 3

    run(main())


def test_urgent_utterances_lead_ahead_of_older_ones_until_the_oldest_has_waited_priority_age():
    model = FakeModel()

    async def main(priority_age_s, hold_s):
        model.batches.clear()
        model.gate.clear()  # hold the worker so everything queues up behind the blocker
        b = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0, max_batch_samples=10**9, min_fill=0.9,
                           priority_age_s=priority_age_s)
        b.start()
        blocker = asyncio.ensure_future(b.submit(np.zeros(10, np.float32)))
        await asyncio.sleep(0.05)
        long = [asyncio.ensure_future(b.submit(np.ones(16000 * n, np.float32))) for n in (30, 25)]  # reference audio
        await asyncio.sleep(0.01)
        windows = [asyncio.ensure_future(b.submit(np.full(32000, float(i), np.float32), urgent=True))
                   for i in range(3)]
        await asyncio.sleep(hold_s)
        model.gate.set()
        res = await asyncio.gather(blocker, *long, *windows)
        await b.close()
        assert [r.embedding[0] for r in res[1:]] == [480000, 400000, 32000, 32000, 32000]  # each its own row
        return model.batches[1:]

    # the live windows (2 s) run first, in one batch, ahead of the older long utterances
    assert run(main(5.0, 0.0)) == [[32000] * 3, [480000, 400000]]
    # the oldest utterance has waited past priority_age_s: it leads again (urgent work never starves the rest)
    assert run(main(0.05, 0.2)) == [[480000, 400000], [32000] * 3]
    # 0: arrival order
    assert run(main(0.0, 0.0)) == [[480000, 400000], [32000] * 3]


class TimedModel:
    """Takes time in proportion to the padded samples of a batch; logs (first sample, start, end) per batch."""

    def __init__(self, samples_per_s: float):
        self.samples_per_s = samples_per_s
        self.log: list[tuple[float, float, float]] = []
        self.lock = threading.Lock()

    def __call__(self, waves):
        start = time.monotonic()
        time.sleep(len(waves) * max(len(w) for w in waves) / self.samples_per_s)
        with self.lock:
            self.log.append((float(waves[0][0]), start, time.monotonic()))
        return np.array([[len(w), w[0]] for w in waves], dtype=np.float32)


@pytest.mark.parametrize("reserve_s", [0.1, 0.0])
def test_a_worker_is_kept_for_live_windows_while_they_arrive(reserve_s):
    """Two workers, long uploads queued and live windows arriving: with ``reserve_s`` one worker never starts a
    long batch while the other runs one, so a window runs at once; without it, the window waits for a long batch.
    Once windows stop for ``reserve_hold_s``, long batches use both workers again; none is starved."""
    rate = 1_000_000.0  # samples per second: a long upload (500k samples) takes 0.5 s, a window (2k) 2 ms
    model = TimedModel(rate)

    async def main():
        b = DynamicBatcher(model, workers=2, max_batch_size=1, max_wait_s=0.0, reserve_s=reserve_s,
                           max_queue_wait_s=None, priority_age_s=0.0)
        b.samples_per_s = rate  # as measured
        b.reserve_hold_s = 0.6
        b.start()
        await b.submit(np.full(2000, -1.0, np.float32), urgent=True)  # live traffic has begun
        longs = [asyncio.ensure_future(b.submit(np.full(500_000, float(i), np.float32))) for i in range(4)]
        await asyncio.sleep(0.1)
        window = await b.submit(np.full(2000, -2.0, np.float32), urgent=True)
        await asyncio.gather(*longs)
        await b.close()
        return window

    window = run(main())
    spans = {first: (start, end) for first, start, end in model.log}
    long_spans = sorted(spans[float(i)] for i in range(4))
    if reserve_s:
        assert window.queue_s < 0.2  # ran on the kept worker while a long batch ran on the other
        assert spans[-2.0][0] < long_spans[0][1]
        # the first two uploads ran one after the other (the last window came 0.1 s in, the hold ends at 0.7 s) ...
        assert long_spans[1][0] >= long_spans[0][1] - 0.01
        # ... then the kept worker took the third upload as soon as the hold lapsed, while the second still ran
        assert long_spans[2][0] < long_spans[1][1] - 0.1
    else:
        assert window.queue_s > 0.2  # both workers were in long batches
        assert long_spans[1][0] < long_spans[0][1]


def test_a_long_utterance_is_estimated_on_one_worker_fewer_while_one_is_kept_for_live_windows():
    """Admission counts the kept worker: while live windows arrive, an utterance estimated longer than
    ``reserve_s`` is served by the other workers only; short ones, and everything once the windows stop,
    by all of them."""
    rate = 1_000_000.0

    async def main():
        b = DynamicBatcher(FakeModel(), workers=2, max_batch_size=1, max_wait_s=0.0, reserve_s=0.1,
                           max_queue_wait_s=None)
        b.samples_per_s = rate
        b._avg_cost = 50_000.0
        assert b.estimated_wait(500_000) == pytest.approx(0.25)  # no live traffic yet: both workers
        b._urgent_seen = time.monotonic()
        assert b.estimated_wait(500_000) == pytest.approx(0.5)  # long: one worker is kept
        assert b.estimated_wait(50_000) == pytest.approx(0.025)  # short: it may run on the kept one
        assert b.estimated_wait(None) == pytest.approx(0.025)  # of the average size
        b._urgent_seen = time.monotonic() - b.reserve_hold_s - 0.1
        assert b.estimated_wait(500_000) == pytest.approx(0.25)  # the windows stopped: both again
        b.reserve_s = 0.0
        b._urgent_seen = time.monotonic()
        assert b.estimated_wait(500_000) == pytest.approx(0.25)  # no worker kept when reserve_s is 0
        await b.close()

    run(main())
