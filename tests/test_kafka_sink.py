"""KafkaSink against the local Tansu: every record settles exactly once, whatever happens.

`on_durable` is what acks an MQTT message, so each test checks it runs once per record and
only after Kafka has the record.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from bridge.devkit.localstack import LocalStack
from bridge.kafka import Delivery, KafkaSink
from bridge.metrics import Metrics

pytestmark = pytest.mark.integration


class Acks:
    """Counts on_durable calls per record, and the rejections."""

    def __init__(self) -> None:
        self.durable: Counter[int] = Counter()
        self.rejected: list[tuple[int, str]] = []

    def delivery(self, topic: str, n: int) -> Delivery:
        return Delivery(topic, None, b"%d" % n, [], lambda: self.durable.update([n]),
                        lambda d, r: self.rejected.append((n, r.code)), n)


def fresh_topic(stack: LocalStack) -> str:
    topic = f"sink.{uuid.uuid4().hex[:8]}"
    stack.create_topics([topic], partitions=1)
    return topic


def values_in(stack: LocalStack, topic: str) -> Counter[int]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": "sink-test"})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    seen: Counter[int] = Counter()
    idle = time.monotonic()
    while time.monotonic() - idle < 3:
        for record in consumer.consume(1000, 0.5):
            assert not record.error()
            seen.update([int(record.value())])
            idle = time.monotonic()
    consumer.close()
    return seen


async def run_sink(stack: LocalStack, properties: dict[str, Any], body: Any) -> Metrics:
    metrics = Metrics()
    sink = KafkaSink({"bootstrap.servers": stack.bootstrap, "acks": "all",
                      "enable.idempotence": True, **properties},
                     asyncio.get_running_loop(), metrics)
    sink.start()
    try:
        await body(sink)
        assert await sink.drain(60), f"{sink.pending} records never settled"
    finally:
        sink.close()
    return metrics


def test_a_replaced_producer_replays_what_was_not_durable(stack: LocalStack) -> None:
    """A fatal producer error cannot be caused on demand here, so the test takes the path
    the error callback takes: a new producer, and a replay of every record in flight."""
    topic, acks = fresh_topic(stack), Acks()

    async def body(sink: KafkaSink) -> None:
        for n in range(3000):
            await sink.send(acks.delivery(topic, n))
            if n == 1500:
                assert sink.pending > 0
                sink._replace_producer("test: fatal error", sink._generation)

    metrics = asyncio.run(run_sink(stack, {"linger.ms": 20}, body))
    assert metrics.value("kafka_producers_replaced") == 1
    assert acks.durable == Counter(range(3000)), "each record is acked exactly once"
    assert set(values_in(stack, topic)) == set(range(3000))


def test_a_full_local_queue_is_backpressure_not_loss(stack: LocalStack) -> None:
    topic, acks = fresh_topic(stack), Acks()

    async def body(sink: KafkaSink) -> None:
        for n in range(2000):
            await sink.send(acks.delivery(topic, n))

    metrics = asyncio.run(run_sink(stack, {"queue.buffering.max.messages": 50}, body))
    assert metrics.value("kafka_backpressure") > 0
    assert acks.durable == Counter(range(2000))
    assert set(values_in(stack, topic)) == set(range(2000))


def test_delivery_errors_are_retried_never_acked(stack: LocalStack) -> None:
    """Kafka stops answering for longer than message.timeout.ms: every record fails with
    'outcome unknown', nothing is acked, and all of it is produced again once Kafka is back."""
    topic, acks = fresh_topic(stack), Acks()

    async def body(sink: KafkaSink) -> None:
        stack.kafka.pause()
        try:
            for n in range(200):
                await sink.send(acks.delivery(topic, n))
            await asyncio.sleep(3)
            assert not acks.durable, "acked while Kafka could not have the record"
        finally:
            stack.kafka.resume()

    metrics = asyncio.run(run_sink(stack, {"message.timeout.ms": 1000}, body))
    assert metrics.value("kafka_retries") > 0
    assert acks.durable == Counter(range(200))
    assert set(values_in(stack, topic)) == set(range(200))


def test_a_record_kafka_can_never_take_is_rejected_with_a_code(stack: LocalStack) -> None:
    topic, acks = fresh_topic(stack), Acks()

    async def body(sink: KafkaSink) -> None:
        sink.submit(Delivery(topic, None, b"x" * 5000, [], lambda: acks.durable.update([1]),
                             lambda d, r: acks.rejected.append((1, r.code))))
        await sink.send(acks.delivery(topic, 2))

    asyncio.run(run_sink(stack, {"message.max.bytes": 2000}, body))
    assert acks.rejected == [(1, "record_too_large")]
    assert acks.durable == Counter([2])
