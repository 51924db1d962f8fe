"""The stages between the MQTT source and the Kafka sink: route, envelope, dead letter.

`Pipeline.prepare` turns one Message into one Delivery. A message that cannot be bridged
becomes a dead-letter Delivery instead; either way the MQTT ack rides on its `on_durable`,
so nothing is acked before its outcome is in Kafka (invariants 1 and 2).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from bridge import envelope
from bridge.config import Config
from bridge.errors import Rejected
from bridge.kafka import Delivery, KafkaSink
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.routing import Router, kafka_key

log = structlog.get_logger("bridge.pipeline")


class Pipeline:
    """Routes and encodes messages under one config; the sink carries them to Kafka."""

    def __init__(self, config: Config, sink: KafkaSink, metrics: Metrics) -> None:
        self.config, self.sink, self.metrics = config, sink, metrics
        self.router = Router(config.routes)
        self.dead_letter_topic = config.dead_letter_topic
        self._lineage = {
            route.name: envelope.Lineage(config.bridge.instance, route.name, config.version)
            for route in config.routes
        }
        self._no_route = envelope.Lineage(config.bridge.instance, "", config.version)
        # Half the producer's record limit leaves room for the envelope around the body.
        record_max = int(config.kafka.get("message.max.bytes", 1_000_000))
        self._dead_letter_body_max = min(envelope.DEAD_LETTER_BODY_MAX, record_max // 2)

    def prepare(self, message: Message, on_durable: Callable[[], None] | None) -> Delivery:
        """The Delivery for one message: its envelope, or its dead-letter record."""
        self.metrics.inc("received")
        try:
            route, device_id = self.router.match(message.topic)
        except Rejected as rejected:
            return self._dead_letter(message, "", self._no_route, rejected, on_durable)
        lineage = self._lineage[route.name]
        return Delivery(
            route.kafka_topic,
            kafka_key(route.key, device_id, message.arrival_millis),
            envelope.encode(message, device_id, lineage),
            envelope.headers(message, device_id, lineage),
            on_durable,
            self._rejected_by_kafka(message, device_id, lineage),
        )

    def _rejected_by_kafka(self, message: Message, device_id: str,
                           lineage: envelope.Lineage) -> Callable[[Delivery, Rejected], None]:
        def reject(delivery: Delivery, rejected: Rejected) -> None:
            self.sink.submit(
                self._dead_letter(message, device_id, lineage, rejected, delivery.on_durable))
        return reject

    def _dead_letter(self, message: Message, device_id: str, lineage: envelope.Lineage,
                     rejected: Rejected, on_durable: Callable[[], None] | None) -> Delivery:
        self.metrics.inc(f"dead_letter_{rejected.code}")
        log.warning("dead_letter", code=rejected.code, reason=rejected.reason,
                    topic=message.topic, broker=message.broker)
        return Delivery(
            self.dead_letter_topic,
            str(message.arrival_millis).encode(),
            envelope.encode_dead_letter(message, device_id, lineage, rejected.code,
                                        rejected.reason, self._dead_letter_body_max),
            [*envelope.headers(message, device_id, lineage),
             ("error.code", rejected.code.encode())],
            on_durable,
            self._dead_letter_refused,
        )

    def _dead_letter_refused(self, delivery: Delivery, rejected: Rejected) -> None:
        """Kafka refuses even the dead-letter record: it stays unacked and is tried again
        with a backoff, so it flows once an operator fixes the dead-letter topic."""
        self.metrics.inc("dead_letter_refused")
        log.error("dead_letter_refused", topic=delivery.topic, reason=rejected.reason,
                  hint="check the dead-letter topic exists and accepts records this size")
        self.sink.retry_later(delivery)
