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
from confluent_kafka import KafkaError, KafkaException

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


class Faulty:
    """The sink's producer, raising once from poll() or produce() what the test chose (what
    confluent-kafka does when librdkafka's idempotence state is lost, seen on Tansu with
    three producers: poll() raises the fatal error instead of calling error_cb)."""

    def __init__(self, real: Any, poll: BaseException | None = None,
                 produce: BaseException | None = None) -> None:
        self.real, self.poll_error, self.produce_error = real, poll, produce

    def poll(self, timeout: float) -> int:
        error, self.poll_error = self.poll_error, None
        if error is not None:
            raise error
        return int(self.real.poll(timeout))

    def produce(self, *args: Any, **kwargs: Any) -> None:
        error, self.produce_error = self.produce_error, None
        if error is not None:
            raise error
        self.real.produce(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


FATAL = KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
                                  "injected: sequence desynchronization", fatal=True))
PRODUCER_FATAL = KafkaException(KafkaError(KafkaError._FATAL, "Local: Fatal error"))


@pytest.mark.parametrize(("where", "error", "replaced"), [
    pytest.param("poll", FATAL, 1, id="poll-raises-fatal"),
    pytest.param("produce", PRODUCER_FATAL, 1, id="produce-refuses-fatal"),
    pytest.param("poll", RuntimeError("injected bug"), 0, id="poll-raises-a-bug"),
    pytest.param("poll", KafkaException(KafkaError(KafkaError._TRANSPORT, "injected")), 0,
                 id="poll-raises-not-fatal"),
])
def test_whatever_the_producer_raises_polling_goes_on_and_every_record_settles(
        stack: LocalStack, where: str, error: BaseException, replaced: int) -> None:
    """The class of failure: an exception out of the poll timer stopped polling for good
    (every record of the lane unsettled, its MQTT messages never acked), and a producer in
    its fatal state was retried forever instead of replaced."""
    topic, acks = fresh_topic(stack), Acks()

    async def body(sink: KafkaSink) -> None:
        for n in range(2000):
            await sink.send(acks.delivery(topic, n))
            if n == 1000:
                sink._producer = Faulty(sink._producer, **{where: error})

    metrics = asyncio.run(run_sink(stack, {"linger.ms": 20}, body))
    assert metrics.value("kafka_producers_replaced") == replaced
    assert acks.durable == Counter(range(2000)), "each record is acked exactly once"
    assert set(values_in(stack, topic)) == set(range(2000))
