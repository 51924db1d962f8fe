"""Read a Kafka topic as decoded envelopes: `mqtt-kafka-bridge tail`, and the tests' reader.

It assigns every partition from the beginning instead of joining a consumer group, which
starts at once and counts what the topic really holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from bridge import envelope
from bridge.kafka import QUIET


class UnknownTopic(KafkaException):
    """The topic is not in the cluster; `known` are the topics it has (internal ones left
    out), for a reader who mistyped the name; `topic` is the one asked for."""

    def __init__(self, error: KafkaError, known: list[str], topic: str = "") -> None:
        super().__init__(error)
        self.known, self.topic = known, topic


Header = tuple[str, bytes | None]


def records(bootstrap: str, topic: str, idle: float = 5.0, follow: bool = False,
            deadline: float | None = None) -> Iterator[tuple[bytes | None, dict[str, Any]]]:
    """Yield (key, envelope) from the start of `topic` until `idle` seconds bring nothing
    (or forever with `follow`), or until the absolute `deadline` (time.monotonic)."""
    for key, _headers, env in records_with_headers(bootstrap, topic, idle, follow, deadline):
        yield key, env


def records_with_headers(bootstrap: str, topic: str, idle: float = 5.0, follow: bool = False,
                         deadline: float | None = None
                         ) -> Iterator[tuple[bytes | None, list[Header], dict[str, Any]]]:
    """`records`, with each record's headers in order (repeats kept)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "mqtt-kafka-bridge-tail",
                         "enable.auto.commit": False, "enable.partition.eof": False},
                        logger=QUIET)  # a broker it cannot reach is an exception, said once
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        info = metadata.topics[topic]
        if info.error is not None:
            if info.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                known = consumer.list_topics(timeout=10).topics
                raise UnknownTopic(info.error, sorted(t for t in known if not t.startswith("__")),
                                   topic)
            raise KafkaException(info.error)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
        last = time.monotonic()
        while follow or time.monotonic() - last < idle:
            if deadline is not None and time.monotonic() > deadline:
                return
            batch = consumer.consume(1000, 0.5)
            for record in batch:
                if record.error():
                    raise KafkaException(record.error())
                last = time.monotonic()
                yield record.key(), _headers(record), envelope.decode(record.value() or b"")
    finally:
        consumer.close()


def _headers(record: Message) -> list[Header]:
    found = record.headers() or []
    pairs = found.items() if isinstance(found, dict) else found
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]


def printable(value: Any) -> Any:
    """An envelope as JSON-friendly data: bodies as UTF-8 text when they are, else hex."""
    if isinstance(value, dict):
        return {k: printable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"hex": value.hex()}
    return value


def tail(bootstrap: str, topic: str, follow: bool) -> int:
    for key, env in records(bootstrap, topic, follow=follow):
        print(json.dumps({"key": key.decode() if key else None, **printable(env)}), flush=True)
    return 0
