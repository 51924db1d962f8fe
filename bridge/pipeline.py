"""The stages between the MQTT source and the Kafka sink: route, authenticate, check the
payload, envelope, dead letter.

`Pipeline.prepare` turns one Message into one Delivery. A message that cannot be bridged
becomes a dead-letter Delivery instead; either way the MQTT ack rides on its `on_durable`,
so nothing is acked before its outcome is in Kafka (invariants 1 and 2). A pipeline serves
one lane under one config: a reload builds new pipelines, and messages already prepared
finish under the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
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
from bridge.s3 import ObjectStore, retrying

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
    inline_max: int | None  # larger bodies go to S3 (None: no S3, all inline)
    truncate: int | None  # the route keeps only this head of each body


class Offload(NamedTuple):
    """A message whose body goes to S3 before its reference envelope (or, with `rejected`,
    its dead-letter record) goes to Kafka."""

    message: Message
    plan: Plan | None  # None for a message dead-lettered before it had a plan
    on_durable: Callable[[], None] | None
    rejected: Rejected | None = None
    lineage: envelope.Lineage | None = None
    device_id: str = ""


DEAD_LETTER_PREFIX = "dead-letter/"  # whole bodies of dead letters too large to keep inline



class Pipeline:
    """Routes and encodes one lane's messages under one config; the lane's sink carries
    them to Kafka."""

    def __init__(self, config: Config, lane: str, metrics: Metrics,
                 sinks: Mapping[str, KafkaSink] | None = None,
                 objects: ObjectStore | None = None) -> None:
        self.config, self.lane, self.metrics = config, lane, metrics
        # No sinks for a dry run (`route`), which never produces.
        self.sink = sinks[lane] if sinks else None
        self.fat_sink = sinks.get("fat") if sinks else None  # references to S3 objects
        self.objects = objects
        self.router = Router([route for route in config.routes if route.lane == lane])
        self.registry = config.registry
        # Another lane's pipeline for a topic no route of this lane takes: a message the
        # broker sent on this lane's session just before a reload moved its route.
        self.elsewhere: Callable[[Message, Callable[[], None] | None],
                                 Delivery | Offload | None] | None = None
        self.dead_letter_topic = config.dead_letter_topic
        self._lineage = {
            route.name: envelope.Lineage(config.bridge.instance, route.name, config.version)
            for route in config.routes
        }
        self._no_route = envelope.Lineage(config.bridge.instance, "", config.version)
        # Half the producer's record limit leaves room for the envelope around the body.
        self._dead_letter_body_max = min(envelope.DEAD_LETTER_BODY_MAX,
                                         config.record_max(lane) // 2)
        self._plans: dict[tuple[str, str], Plan] = {}

    def prepare(self, message: Message,
                on_durable: Callable[[], None] | None) -> Delivery | Offload:
        """The Delivery for one message (its envelope, or its dead-letter record), or the
        Offload of a body too large for Kafka."""
        plan = self._plans.get((message.broker, message.topic))
        if plan is None:
            try:
                plan = self._plan(message)
            except Rejected as rejected:
                if rejected.code == "no_route" and self.elsewhere is not None:
                    delivery = self.elsewhere(message, on_durable)
                    if delivery is not None:
                        return delivery
                return self.refuse(message, rejected.device_id, self._no_route, rejected,
                                   on_durable)
        if plan.refusal is not None:
            return self.refuse(message, plan.device_id, plan.lineage, plan.refusal, on_durable)
        if plan.hmac_key is not None:
            try:
                auth.verify(plan.hmac_key, plan.device_id, message.topic, message.payload,
                            message.user_properties)
            except Rejected as rejected:
                return self.refuse(message, plan.device_id, plan.lineage, rejected, on_durable)
        if plan.check is not None:
            try:
                plan.check(message.payload)
            except (ValueError, RecursionError) as exc:
                bad = Rejected("bad_payload", f"not valid {plan.route.format}: {exc}")
                return self.refuse(message, plan.device_id, plan.lineage, bad, on_durable)
        size = len(message.payload)
        if plan.truncate is not None and size > plan.truncate:
            return self._delivery(message, plan, on_durable, envelope.encode_truncated(
                message, plan.device_id, plan.lineage, plan.template.content_type,
                plan.truncate), self.sink)
        if plan.inline_max is not None and size > plan.inline_max:
            return Offload(message, plan, on_durable)
        return self._delivery(message, plan, on_durable, plan.template.encode(message), self.sink)

    def refuse(self, message: Message, device_id: str, lineage: envelope.Lineage,
               rejected: Rejected, on_durable: Callable[[], None] | None) -> Delivery | Offload:
        """The dead letter of a message: inline, or, when its body is too large for that
        and S3 is there, an Offload that keeps the whole body."""
        if len(message.payload) > self._dead_letter_body_max and self.objects is not None:
            return Offload(message, None, on_durable, rejected, lineage, device_id)
        return self.dead_letter(message, device_id, lineage, rejected, on_durable)

    async def offload(self, job: Offload) -> Delivery:
        """Store the body in S3 under a key derived from its content, so a redelivery after
        a crash writes the same object again rather than an orphan; then the reference
        envelope for the fat lane (or the dead-letter record, for this lane). S3 failures
        are retried: the message stays unacked."""
        assert self.objects is not None
        message, plan = job.message, job.plan
        digest = await asyncio.to_thread(lambda: hashlib.sha256(message.payload).hexdigest())
        if plan is None or job.rejected is not None:
            key = f"{DEAD_LETTER_PREFIX}{job.device_id or '_'}/{digest}"
            await self._put(key, message.payload, job.device_id, digest, envelope.RAW)
            assert job.rejected is not None and job.lineage is not None
            return self.dead_letter(message, job.device_id, job.lineage, job.rejected,
                                    job.on_durable, self.objects.reference(key), digest)
        assert self.fat_sink is not None
        prefix = self.config.s3.object_prefix if self.config.s3 else ""
        key = f"{prefix}{plan.device_id}/{digest}"
        await self._put(key, message.payload, plan.device_id, digest,
                        plan.template.content_type)
        self.metrics.inc("offloaded")
        return self._delivery(message, plan, job.on_durable, envelope.encode_reference(
            message, plan.device_id, plan.lineage, plan.template.content_type,
            self.objects.reference(key), len(message.payload), digest), self.fat_sink)

    async def _put(self, key: str, body: bytes, device_id: str, digest: str,
                   content_type: str) -> None:
        objects = self.objects
        assert objects is not None
        await retrying(lambda: objects.put(key, body, {"device-id": device_id or "-",
                                                       "sha256": digest}, content_type),
                       self.metrics, "s3_put_failed", key=key)

    def _delivery(self, message: Message, plan: Plan, on_durable: Callable[[], None] | None,
                  value: bytes, sink: KafkaSink | None) -> Delivery:
        key = plan.key if plan.key_per_message is None else \
            plan.key_per_message.key(plan.device_id, message.arrival_millis)
        return Delivery(plan.kafka_topic, key, value, plan.headers, on_durable,
                        self._rejected_by_kafka, (message, plan), sink)

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
            device.hmac_key if device is not None and route.auth == "hmac" else None,
            self._inline_max(route), route.truncate_bytes)
        return plan

    def _inline_max(self, route: Route) -> int | None:
        s3 = self.config.s3
        if s3 is None or self.objects is None:
            return None
        return route.inline_max_bytes if route.inline_max_bytes is not None \
            else s3.inline_max_bytes

    def _rejected_by_kafka(self, delivery: Delivery, rejected: Rejected) -> None:
        message, plan = delivery.origin
        assert delivery.sink is not None  # it was produced, so it had a sink
        delivery.sink.submit(self.dead_letter(message, plan.device_id, plan.lineage,
                                              rejected, delivery.on_durable))

    def dead_letter(self, message: Message, device_id: str, lineage: envelope.Lineage,
                    rejected: Rejected, on_durable: Callable[[], None] | None,
                    reference: str | None = None, sha256: str | None = None) -> Delivery:
        """The dead-letter record of a message, on this lane's producer; its body inline
        (cut to fit Kafka) or, with `reference`, in S3."""
        self.metrics.inc(f"dead_letter_{rejected.code}")
        log.warning("dead_letter", code=rejected.code, reason=rejected.reason,
                    topic=message.topic, broker=message.broker)
        return Delivery(
            self.dead_letter_topic,
            str(message.arrival_millis).encode(),
            envelope.encode_dead_letter(message, device_id, lineage, rejected.code,
                                        rejected.reason, self._dead_letter_body_max,
                                        reference, sha256),
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
