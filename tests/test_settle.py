"""Settlement by construction, without servers: the lane's job pool, the guard that turns
whatever a stage raises into a dead letter, the bounded plan cache, and dead-letter records
that cannot fail to encode. The sink is a fake that records what it is given."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Awaitable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import config, envelope, pipeline
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.pipeline import Job, Pipeline
from bridge.settle import JobPool, Lane
from tests.test_config import GOOD

REGISTRY_ROUTE = GOOD + """
[registry]
file = "devices.toml"
[[routes]]
filter = "secure/{device_id}/alerts"
kafka_topic = "iot.alerts"
auth = "registry"
"""


class FakeSink:
    """Records what is produced; `deliver()` plays Kafka acknowledging all of it."""

    def __init__(self) -> None:
        self.sent: list[Delivery] = []

    def try_send(self, delivery: Delivery) -> bool:
        self.sent.append(delivery)
        return True

    async def send(self, delivery: Delivery) -> None:
        self.sent.append(delivery)

    def submit(self, delivery: Delivery) -> None:
        self.sent.append(delivery)

    def deliver(self) -> None:
        for delivery in self.sent:
            if delivery.on_durable is not None:
                delivery.on_durable()

    def codes(self) -> list[str]:
        return [envelope.decode(d.value).get("error", {}).get("code", "") for d in self.sent]


class FakeObjects:
    """An object store that keeps nothing and always succeeds."""

    async def put(self, *_: Any, **__: Any) -> None:
        return None

    def reference(self, key: str) -> str:
        return f"s3://b/{key}"


class Ack:
    """An Inflight stand-in: called once the outcome is durable."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self) -> None:
        assert not self.done, "acked twice"
        self.done = True


def make(text: str = GOOD, tmp: Any = None) -> tuple[Pipeline, FakeSink, Lane]:
    parsed = config.parse(tomllib.loads(text), base=tmp)
    sink = FakeSink()
    lane = Lane("bulk", 2, 1 << 20, Metrics())
    pipe = Pipeline(parsed, "bulk", Metrics(), {"bulk": sink, "fat": sink})  # type: ignore[dict-item]
    pipe.runner = lane.runner_for(pipe)
    return pipe, sink, lane


def message(topic: str = "devices/d1/telemetry", payload: bytes = b"21.5") -> Message:
    return Message("b", topic, payload, 1, False, False, 1_700_000_000_000)


async def settle(lane: Lane, outcome: Awaitable[None] | None) -> None:
    if outcome is not None:
        await outcome
    while lane.tasks:
        await asyncio.gather(*lane.tasks)


# ------------------------------------------------------------------ the job pool


def test_the_pool_bounds_jobs_by_count_and_by_bytes_but_lets_a_huge_one_run_alone() -> None:
    pool = JobPool(slots=2, max_bytes=100)
    assert pool.try_take(60) and not pool.try_take(60)  # bytes
    assert pool.try_take(40) and not pool.try_take(0)  # count
    pool.give(60)
    pool.give(40)
    assert pool.try_take(1000)  # larger than max_bytes: runs when the pool is empty
    assert not pool.try_take(1)
    pool.give(1000)
    assert (pool.busy, pool.held) == (0, 0)


def test_slots_are_handed_over_first_come_first_served_and_idle_lends_one_out() -> None:
    async def body() -> None:
        pool = JobPool(slots=1, max_bytes=1 << 20)
        assert pool.try_take(10)
        order: list[str] = []

        async def wait(name: str) -> None:
            await pool.take(5)
            order.append(name)

        first, second = asyncio.create_task(wait("a")), asyncio.create_task(wait("b"))
        await asyncio.sleep(0)
        assert not pool.try_take(1), "a newcomer never jumps the queue"
        async with pool.idle():  # the holder waits on something else: "a" may run
            await asyncio.sleep(0)
            assert order == ["a"]
        assert (pool.busy, pool.held) == (2, 15)  # back from idle without waiting; bytes kept
        pool.give(5)  # "a" done, but the pool is still over its count: "b" waits
        await asyncio.sleep(0)
        assert order == ["a"]
        pool.give(10)  # the first holder done: "b" gets its slot
        await asyncio.gather(first, second)
        assert order == ["a", "b"]
        assert (pool.busy, pool.held) == (1, 5)

    asyncio.run(body())


def test_a_cancelled_waiter_takes_no_slot() -> None:
    async def body() -> None:
        pool = JobPool(slots=1, max_bytes=100)
        assert pool.try_take(1)
        waiter = asyncio.create_task(pool.take(1))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        pool.give(1)
        assert (pool.busy, pool.held) == (0, 0)
        assert pool.try_take(1)

    asyncio.run(body())


def test_lanes_do_not_share_a_pool() -> None:
    """One lane's pool full of stuck jobs does not hold up another lane's job."""
    async def body() -> None:
        parsed = config.parse(tomllib.loads(GOOD))
        stuck, free = Lane("fat", 1, 1 << 20, Metrics()), Lane("bulk", 1, 1 << 20, Metrics())
        sink = FakeSink()
        pipe = Pipeline(parsed, "bulk", Metrics(), {"bulk": sink})  # type: ignore[dict-item]
        never = asyncio.Event()

        async def blocked() -> None:
            await never.wait()

        assert stuck.job(pipe, message(), None, blocked) is None
        pushed_back = stuck.job(pipe, message(), None, blocked)  # that lane's source waits
        assert pushed_back is not None
        waiting = asyncio.ensure_future(pushed_back)
        ran = asyncio.Event()

        async def quick() -> None:
            ran.set()

        assert free.job(pipe, message(), None, quick) is None
        await asyncio.wait_for(ran.wait(), 1)
        assert not waiting.done()
        never.set()
        await asyncio.wait_for(waiting, 1)

    asyncio.run(body())


# ------------------------------------------------------------------ the guard


def test_a_stage_that_raises_gives_an_internal_error_dead_letter_acked_once_durable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        pipe, sink, lane = make()
        monkeypatch.setattr(pipe.router, "match", lambda topic: 1 / 0)
        ack = Ack()
        await settle(lane, lane.accept(pipe, message(), ack))
        assert sink.codes() == ["internal_error"]
        error = envelope.decode(sink.sent[0].value)["error"]
        assert error["reason"] == "ZeroDivisionError: division by zero"
        assert not ack.done
        sink.deliver()
        assert ack.done

    asyncio.run(body())


@pytest.mark.parametrize("also_the_dead_letter", [False, True])
def test_a_job_that_raises_is_dead_lettered_even_when_its_dead_letters_job_raises(
        monkeypatch: pytest.MonkeyPatch, also_the_dead_letter: bool) -> None:
    async def body() -> None:
        pipe, sink, lane = make()
        pipe.objects = FakeObjects()  # type: ignore[assignment]  # big bodies go by reference

        async def broken(*_: Any) -> Any:
            raise OSError("disk on fire")

        if also_the_dead_letter:
            monkeypatch.setattr(pipe, "_dead_letter_large", broken)
        ack = Ack()
        big = message(payload=b"x" * 300_000)
        await settle(lane, lane.start(pipe, Job(big, ack, broken)))
        assert sink.codes() == ["internal_error"]
        record = envelope.decode(sink.sent[0].value)
        if also_the_dead_letter:  # the fallback: inline, cut to fit, flagged
            assert record["truncated"] is True and "reference" not in record
        else:
            assert record["reference"].startswith("s3://b/dead-letter/")
        sink.deliver()
        assert ack.done

    asyncio.run(body())


def test_producing_that_raises_sends_the_dead_letter_instead() -> None:
    async def body() -> None:
        pipe, sink, lane = make()
        calls = 0

        def try_send(delivery: Delivery) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise TypeError("a bug in producing")
            sink.sent.append(delivery)
            return True

        sink.try_send = try_send  # type: ignore[method-assign]
        ack = Ack()
        await settle(lane, lane.accept(pipe, message(), ack))
        assert sink.codes() == ["internal_error"]
        sink.deliver()
        assert ack.done

    asyncio.run(body())


def test_a_job_that_settled_its_message_is_not_dead_lettered_when_it_raises_after() -> None:
    async def body() -> None:
        pipe, sink, lane = make()
        ack = Ack()

        async def settles_then_raises() -> None:
            ack()
            raise RuntimeError("after the ack")

        await settle(lane, lane.job(pipe, message(), ack, settles_then_raises))
        assert sink.sent == [] and ack.done

    asyncio.run(body())


# ------------------------------------------------------------------ bounded plan cache


def test_refusals_are_not_cached_and_the_cache_is_bounded_in_bytes(tmp_path: Any) -> None:
    (tmp_path / "devices.toml").write_text('[devices."known"]\n')
    pipe, _, _ = make(REGISTRY_ROUTE, tmp_path)
    for i in range(3000):  # unknown devices, a new topic each time: refused, never cached
        assert envelope.decode(pipe.prepare(message(f"secure/stranger-{i}/alerts"),
                                            None).value)["error"]["code"] == "unknown_device"
    assert pipe._plans == {}
    pipe.prepare(message(f"devices/{'x' * 1100}/telemetry"), None)  # over 1 KiB: per message
    assert pipe._plans == {}
    for i in range(40_000):  # a fleet larger than the budget: the cache starts over
        pipe.prepare(message(f"devices/{'y' * 120}{i}/telemetry"), None)
        assert pipe._plans_bytes <= pipeline._PLANS_MAX_BYTES
    assert 0 < len(pipe._plans) < 40_000


# ------------------------------------------------------------------ dead-letter records


@settings(max_examples=200, deadline=None)
@given(topic=st.text(max_size=300), reason=st.text(max_size=300), device=st.text(max_size=20),
       payload=st.binary(max_size=600), body_max=st.integers(0, 700))
def test_a_dead_letter_record_is_encoded_whatever_the_message_holds(
        topic: str, reason: str, device: str, payload: bytes, body_max: int) -> None:
    msg = message(topic, payload)
    lineage = envelope.Lineage("edge\ud800", "route", "v1")  # a lone surrogate, say
    record = envelope.decode(envelope.encode_dead_letter(msg, device, lineage, "bad_payload",
                                                         reason + "\udcff", body_max))
    assert record["error"]["code"] == "bad_payload"
    assert record["size"] == len(payload)
    assert record["body"] == payload[:body_max]



def test_a_payload_no_record_can_hold_is_dead_lettered_without_building_its_envelope() -> None:
    async def body() -> None:
        pipe, sink, lane = make()  # no [s3]: nothing goes by reference
        ack = Ack()
        await settle(lane, lane.accept(pipe, message(payload=b"x" * 2_000_000), ack))
        [record] = [envelope.decode(d.value) for d in sink.sent]
        assert record["error"]["code"] == "record_too_large"
        assert record["truncated"] is True and record["size"] == 2_000_000
        sink.deliver()
        assert ack.done

    asyncio.run(body())


def test_producing_that_raises_after_waiting_for_room_sends_the_dead_letter() -> None:
    async def body() -> None:
        pipe, sink, lane = make()

        def full(delivery: Delivery) -> bool:
            if "error.code" in dict(delivery.headers):
                sink.sent.append(delivery)
                return True
            return False  # the local queue is full: the source must wait

        async def broken_send(delivery: Delivery) -> None:
            raise RuntimeError("a bug while waiting for room")

        sink.try_send = full  # type: ignore[method-assign]
        sink.send = broken_send  # type: ignore[method-assign]
        ack = Ack()
        await settle(lane, lane.accept(pipe, message(), ack))
        assert sink.codes() == ["internal_error"]
        sink.deliver()
        assert ack.done

    asyncio.run(body())


def test_a_message_waiting_for_room_settles_though_its_source_stops_waiting() -> None:
    """Kafka's queue is full and the session waits; its connection drops, so the wait is
    cancelled: the message must still be produced and settle (its receipt too), or the
    ledger would count it in flight for ever."""
    async def body() -> None:
        pipe, sink, lane = make()
        room = asyncio.Event()
        full = {"yes": True}

        def try_send(delivery: Delivery) -> bool:
            if full["yes"]:
                return False
            sink.sent.append(delivery)
            return True

        async def send(delivery: Delivery) -> None:
            await room.wait()
            sink.sent.append(delivery)

        sink.try_send = try_send  # type: ignore[method-assign]
        sink.send = send  # type: ignore[method-assign]
        metrics = Metrics()
        receipt = metrics.receive("b", "bulk", Ack())
        waiting = lane.accept(pipe, message(), receipt)
        assert waiting is not None
        source = asyncio.ensure_future(waiting)
        await asyncio.sleep(0)
        source.cancel()  # the session's connection dropped
        await asyncio.sleep(0)
        full["yes"] = False
        room.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(sink.sent) == 1
        sink.deliver()
        assert receipt.done and metrics.ledger.lanes["bulk"].in_flight == 0

    asyncio.run(body())
