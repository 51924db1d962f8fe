"""The stages between the MQTT source and the Kafka sink: route, authenticate, check the
payload, envelope, dead letter.

`Pipeline.prepare` turns one Message into one Delivery. A message that cannot be bridged
becomes a dead-letter Delivery instead; either way the MQTT ack rides on its `on_durable`,
so nothing is acked before its outcome is in Kafka (invariants 1 and 2). A pipeline serves
one lane under one config: a reload builds new pipelines, and messages already prepared
finish under the old one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import structlog

from bridge import auth, envelope
from bridge.config import Config, Route
from bridge.errors import Rejected
from bridge.formats import FORMATS
from bridge.kafka import Delivery, KafkaSink
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.routing import KeySpec, Router

log = structlog.get_logger("bridge.pipeline")
_PLANS_MAX = 65536  # distinct (broker, topic) pairs remembered; a device fleet's worth


class Plan(NamedTuple):
    """What every message on one topic of one broker shares: found once, then reused."""

    route: Route
    kafka_topic: str
    device_id: str
    key: bytes | None  # the key, when the route's key depends on the device alone
    key_per_message: KeySpec | None  # else the spec that keys each message
    headers: envelope.Headers
    template: envelope.Template
    lineage: envelope.Lineage
    check: Callable[[bytes], object] | None  # the route's payload format
    refusal: Rejected | None  # the registry refuses this device: every message dead-letters
    hmac_key: bytes | None  # the device's key, when the route checks signatures


class Pipeline:
    """Routes and encodes one lane's messages under one config; the lane's sink carries
    them to Kafka."""

    def __init__(self, config: Config, lane: str, sink: KafkaSink | None,
                 metrics: Metrics) -> None:
        self.config, self.lane, self.metrics = config, lane, metrics
        self.sink = sink  # None for a dry run (`route`), which never produces
        self.router = Router([route for route in config.routes if route.lane == lane])
        self.registry = config.registry
        # Another lane's pipeline for a topic no route of this lane takes: a message the
        # broker sent on this lane's session just before a reload moved its route.
        self.elsewhere: Callable[[Message, Callable[[], None] | None], Delivery | None] | None \
            = None
        self.dead_letter_topic = config.dead_letter_topic
        self._lineage = {
            route.name: envelope.Lineage(config.bridge.instance, route.name, config.version)
            for route in config.routes
        }
        self._no_route = envelope.Lineage(config.bridge.instance, "", config.version)
        # Half the producer's record limit leaves room for the envelope around the body.
        record_max = int(config.kafka.get("message.max.bytes", 1_000_000))
        self._dead_letter_body_max = min(envelope.DEAD_LETTER_BODY_MAX, record_max // 2)
        self._plans: dict[tuple[str, str], Plan] = {}

    def prepare(self, message: Message, on_durable: Callable[[], None] | None) -> Delivery:
        """The Delivery for one message: its envelope, or its dead-letter record."""
        plan = self._plans.get((message.broker, message.topic))
        if plan is None:
            try:
                plan = self._plan(message)
            except Rejected as rejected:
                if rejected.code == "no_route" and self.elsewhere is not None:
                    delivery = self.elsewhere(message, on_durable)
                    if delivery is not None:
                        return delivery
                return self._dead_letter(message, rejected.device_id, self._no_route, rejected,
                                         on_durable)
        if plan.refusal is not None:
            return self._dead_letter(message, plan.device_id, plan.lineage, plan.refusal,
                                     on_durable)
        if plan.hmac_key is not None:
            try:
                auth.verify(plan.hmac_key, plan.device_id, message.topic, message.payload,
                            message.user_properties)
            except Rejected as rejected:
                return self._dead_letter(message, plan.device_id, plan.lineage, rejected,
                                         on_durable)
        if plan.check is not None:
            try:
                plan.check(message.payload)
            except (ValueError, RecursionError) as exc:
                bad = Rejected("bad_payload", f"not valid {plan.route.format}: {exc}")
                return self._dead_letter(message, plan.device_id, plan.lineage, bad, on_durable)
        return Delivery(
            plan.kafka_topic,
            plan.key if plan.key_per_message is None else
            plan.key_per_message.key(plan.device_id, message.arrival_millis),
            plan.template.encode(message),
            plan.headers,
            on_durable,
            self._rejected_by_kafka,
            (message, plan),
            self.sink,
        )

    def _plan(self, message: Message) -> Plan:
        route, device_id, _, kafka_topic = self.router.match(message.topic)
        lineage = self._lineage[route.name]
        payload_format = FORMATS[route.format]
        refusal, device = None, None
        try:
            device = self.registry.admit(route.auth, device_id)
        except Rejected as rejected:
            refusal = rejected
        if len(self._plans) >= _PLANS_MAX:
            self._plans.clear()
        plan = self._plans[(message.broker, message.topic)] = Plan(
            route, kafka_topic, device_id, route.key.key(device_id, 0),
            None if route.key.per_device() else route.key,
            envelope.headers(message, device_id, lineage),
            envelope.Template(message.topic, message.broker, device_id, lineage,
                              payload_format.content_type),
            lineage, payload_format.check, refusal,
            device.hmac_key if device is not None and route.auth == "hmac" else None)
        return plan

    def _rejected_by_kafka(self, delivery: Delivery, rejected: Rejected) -> None:
        message, plan = delivery.origin
        assert delivery.sink is not None  # it was produced, so it had a sink
        delivery.sink.submit(self._dead_letter(message, plan.device_id, plan.lineage,
                                               rejected, delivery.on_durable))

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
            sink=self.sink,
        )

    def _dead_letter_refused(self, delivery: Delivery, rejected: Rejected) -> None:
        """Kafka refuses even the dead-letter record: it stays unacked and is tried again
        with a backoff, so it flows once an operator fixes the dead-letter topic."""
        self.metrics.inc("dead_letter_refused")
        log.error("dead_letter_refused", topic=delivery.topic, reason=rejected.reason,
                  hint="check the dead-letter topic exists and accepts records this size")
        assert delivery.sink is not None
        delivery.sink.retry_later(delivery)
