"""The stages between the MQTT source and the Kafka sink: route, authenticate, check the
payload, envelope, dead letter.

`Pipeline.prepare` turns one Message into its outcome: a Delivery (its envelope, or its
dead-letter record) ready for the sink, or a Job that must do work off the fast path first
(store the body in S3, check a large payload, ask Kafka whether a topic exists) and then
gives the Delivery. Either way the MQTT ack rides on `on_durable`, so nothing is acked before
its outcome is in Kafka (invariants 1 and 2).

Every dead letter goes through `refuse`, which keeps the whole body: inline when it fits a
record, else in S3 by reference. It never raises, and neither does `crashed`, which turns
anything a stage raised into an `internal_error` dead letter (see `bridge/settle.py`).

A pipeline serves one lane under one config: a reload builds new pipelines, and messages
already prepared finish under the old one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar

import structlog

from bridge import auth, envelope, formats, properties
from bridge.config import Config, Route
from bridge.errors import Rejected
from bridge.kafka import Delivery, KafkaSink
from bridge.message import Message
from bridge.metrics import Metrics, mark_dead_lettered
from bridge.routing import KeySpec, Router
from bridge.s3 import ObjectStore, retrying

if TYPE_CHECKING:
    from bridge.tracing import Tracer

T = TypeVar("T")
_new_origin = tuple.__new__  # Origin's own __new__ is a Python function: a frame each
log = structlog.get_logger("bridge.pipeline")

# The plan cache holds what a fleet's topics need, never what an attacker chooses to send:
# it is bounded in bytes, topics longer than _PLAN_TOPIC_MAX are planned per message, and a
# refusal is never cached. One plan measured 1.26 KiB plus 4 copies of its topic (the key,
# headers, template, packed lineage), one more per QoS/retain/dup combination seen: about
# 38,000 plans of typical topics fit.
_PLANS_MAX_BYTES = 64 * 2**20
_PLAN_TOPIC_MAX = 1024
_PLAN_OVERHEAD = 1536
_PLAN_TOPIC_COPIES = 6
DEAD_LETTER_PREFIX = "dead-letter/"  # whole bodies of dead letters too large to keep inline
_HASH_ON_LOOP_MAX = 65536  # larger bodies are hashed on a worker thread
LOG_TOPIC_MAX = 200  # characters of a topic in a log line: devices choose topics


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
    format: formats.Format
    refusal: Rejected | None  # the registry refuses this device: every message dead-letters
    hmac_key: bytes | None  # the device's key, when the route checks signatures
    inline_max: int | None  # larger bodies go to S3 (None: no S3, all inline)
    truncate: int | None  # the route keeps only this head of each body
    topic_known: bool  # False: ask Kafka whether the rendered topic exists before producing
    # Bodies up to this size need no stage but the envelope (no refusal, signature, format
    # check, truncation, offload, and they fit a record): -1 when every body needs one.
    direct_max: int = -1


class Job(NamedTuple):
    """A message whose Delivery needs work off the fast path first. `run` does that work
    and gives the Delivery (or the next Job); the daemon runs it in the lane's job pool,
    under the settlement guard."""

    message: Message
    on_durable: Callable[[], None] | None
    run: Callable[[], Awaitable[Delivery | Job | None]]  # None: the job settled it itself
    device_id: str = ""  # who sent it, for a dead letter if `run` crashes


class Origin(NamedTuple):
    """What a record's refusal by Kafka needs to build the dead letter in its place. For a
    body already in S3, `message` has no payload (it is not kept in memory) and
    `reference`, `sha256` and `size` describe it."""

    message: Message
    device_id: str
    lineage: envelope.Lineage
    reference: str | None = None
    sha256: str | None = None
    size: int | None = None
    rejected: Rejected | None = None  # for a dead-letter record: why it is one
    shrunk: bool = False  # a dead-letter record already cut to fit


class Runner(Protocol):
    """What a pipeline needs from the daemon's lane: start an outcome from a callback that
    cannot wait, and run CPU work off the event loop."""

    def dispatch(self, outcome: Delivery | Job) -> None: ...

    def in_thread(self, work: Callable[[], T]) -> Awaitable[T]: ...


class Pipeline:
    """Routes and encodes one lane's messages under one config; the lane's sink carries
    them to Kafka."""

    def __init__(self, config: Config, lane: str, metrics: Metrics,
                 sinks: Mapping[str, KafkaSink] | None = None,
                 objects: ObjectStore | None = None, runner: Runner | None = None) -> None:
        self.config, self.lane, self.metrics = config, lane, metrics
        # No sinks for a dry run (`route`), which never produces.
        self.sink = sinks[lane] if sinks else None
        self.fat_sink = sinks.get("fat") if sinks else None  # references to S3 objects
        self.objects = objects
        self.runner = runner
        self.router = Router([route for route in config.routes if route.lane == lane])
        self.registry = config.registry
        # Another lane's pipeline for a topic no route of this lane takes: a message the
        # broker sent on this lane's session just before a reload moved its route.
        self.elsewhere: Callable[[Message, Callable[[], None] | None],
                                 Delivery | Job | None] | None = None
        self.dead_letter_topic = config.dead_letter_topic
        self._lineage = {
            route.name: envelope.Lineage(config.bridge.instance, route.name, config.version)
            for route in config.routes
        }
        self.no_route_lineage = envelope.Lineage(config.bridge.instance, "", config.version)
        # Half the producer's record limit leaves room for the envelope around the body.
        self._record_max = config.record_max(lane)
        self._dead_letter_body_max = min(envelope.DEAD_LETTER_BODY_MAX, self._record_max // 2)
        self._plans: dict[tuple[str, str], Plan] = {}
        self._plans_bytes = 0
        self._arrival_key: tuple[int, bytes] = (-1, b"")  # the last arrival_millis key
        self._tracer: Tracer | None = None
        if config.tracing_spans:  # imports OpenTelemetry only when asked to
            from bridge.tracing import Tracer
            self._tracer = Tracer(config.bridge.instance)

    # -- the fast path ---------------------------------------------------------------------

    def prepare(self, message: Message, on_durable: Callable[[], None] | None) -> Delivery | Job:
        """The outcome of one message: its Delivery, or the Job that leads to it."""
        plan = self._plans.get((message.broker, message.topic))
        if plan is not None and len(message.payload) <= plan.direct_max and \
                message.properties is None and not message.user_properties:
            return self._delivery(message, plan, on_durable, plan.template.encode(message),
                                  self.sink)
        if plan is None:
            try:
                plan = self._plan(message)
            except Rejected as rejected:
                if rejected.code == "no_route" and self.elsewhere is not None:
                    outcome = self.elsewhere(message, on_durable)
                    if outcome is not None:
                        return outcome
                return self.refuse(message, rejected.device_id, self.no_route_lineage, rejected,
                                   on_durable)
            if not plan.topic_known:
                return Job(message, on_durable,
                           lambda: self._after_topic_lookup(message, plan, on_durable))
        return self._admit(message, plan, on_durable)

    def _admit(self, message: Message, plan: Plan,
               on_durable: Callable[[], None] | None) -> Delivery | Job:
        """Authenticate and check the payload; large checks run off the loop."""
        if plan.refusal is not None:
            return self.refuse(message, plan.device_id, plan.lineage, plan.refusal, on_durable)
        extra = 0  # what the MQTT 5 properties add to the record, in bytes
        if message.user_properties or message.properties is not None:
            try:
                extra = properties.weight(message, plan.route.properties, plan.device_id,
                                          plan.route.auth == "hmac")
            except Rejected as rejected:
                return self.refuse(message, plan.device_id, plan.lineage, rejected, on_durable)
        if plan.hmac_key is not None:
            try:
                auth.verify(plan.hmac_key, plan.device_id, message.topic, message.payload,
                            message.user_properties)
            except Rejected as rejected:
                return self.refuse(message, plan.device_id, plan.lineage, rejected, on_durable)
        check = plan.format.check
        if check is not None:
            size = len(message.payload)
            if size > plan.route.format_max_bytes:
                return self.refuse(message, plan.device_id, plan.lineage, Rejected(
                    "payload_too_large", f"{size} bytes; a {plan.route.format} route checks "
                    f"payloads up to format_max_bytes = {plan.route.format_max_bytes}",
                    plan.device_id), on_durable)
            if size > formats.INLINE_CHECK_MAX:
                return Job(message, on_durable,
                           lambda: self._checked_off_loop(message, plan, on_durable, extra))
            try:
                check(message.payload)
            except ValueError as exc:
                return self._bad_payload(message, plan, on_durable, exc)
        return self._bridge(message, plan, on_durable, extra)

    def _bridge(self, message: Message, plan: Plan, on_durable: Callable[[], None] | None,
                extra: int = 0) -> Delivery | Job:
        size = len(message.payload)
        if plan.truncate is not None and size > plan.truncate:
            if size > _HASH_ON_LOOP_MAX:  # the whole payload's sha256 is hashed off the loop
                return Job(message, on_durable,
                           lambda: self._truncated_off_loop(message, plan, on_durable))
            return self._truncated(message, plan, on_durable, None)
        if plan.inline_max is not None and size > plan.inline_max:
            return Job(message, on_durable, lambda: self._offload(message, plan, on_durable))
        if size + extra > self._record_max:  # the producer would refuse it: no envelope
            with_properties = f" and {extra} bytes of MQTT properties" if extra else ""
            return self.refuse(message, plan.device_id, plan.lineage, Rejected(
                "record_too_large", f"{size} bytes inline{with_properties}, more than this "
                f"lane's message.max.bytes {self._record_max}; with [s3] it would go by "
                "reference", plan.device_id), on_durable)
        if message.properties is None:
            value = plan.template.encode(message)
        else:  # the mqtt map differs per message
            value = envelope.encode(message, plan.device_id, plan.lineage,
                                    plan.template.content_type)
        return self._headed(self._delivery(message, plan, on_durable, value, self.sink),
                            message, plan)

    def _truncated(self, message: Message, plan: Plan, on_durable: Callable[[], None] | None,
                   sha256: str | None) -> Delivery:
        assert plan.truncate is not None
        return self._headed(self._delivery(message, plan, on_durable, envelope.encode_truncated(
            message, plan.device_id, plan.lineage, plan.template.content_type, plan.truncate,
            sha256), self.sink), message, plan)

    async def _truncated_off_loop(self, message: Message, plan: Plan,
                                  on_durable: Callable[[], None] | None) -> Delivery:
        return self._truncated(message, plan, on_durable, await self._digest(message.payload))

    def _delivery(self, message: Message, plan: Plan, on_durable: Callable[[], None] | None,
                  value: bytes, sink: KafkaSink | None) -> Delivery:
        spec = plan.key_per_message
        if spec is None:
            key = plan.key
        elif spec.strategy == "arrival_millis":  # messages of one read share their arrival
            millis = message.arrival_millis
            if millis != self._arrival_key[0]:
                self._arrival_key = (millis, str(millis).encode())
            key = self._arrival_key[1]
        else:
            key = spec.key(plan.device_id, message.arrival_millis)
        return Delivery(plan.kafka_topic, key, value, plan.headers, on_durable,
                        self.rejected_by_kafka, _new_origin(Origin, (
                            message, plan.device_id, plan.lineage, None, None, None, None,
                            False)), sink)

    def _headed(self, delivery: Delivery, message: Message, plan: Plan) -> Delivery:
        """A data record off the fast path, with the headers of its MQTT 5 properties."""
        if message.user_properties or self._tracer is not None:
            self._add_headers(delivery, message, plan)
        return delivery

    def _add_headers(self, delivery: Delivery, message: Message, plan: Plan) -> None:
        """A data record's headers after lineage: the trace context, then the user
        properties under the route's prefix; with spans on, the bridge's span starts here
        and its context replaces the device's (the ack callback ends it)."""
        traceparent, tracestate, trace, user = None, None, [], []
        if message.user_properties:
            copied = properties.copy(message.user_properties, plan.route.properties,
                                     plan.device_id, plan.route.auth == "hmac")
            trace, user = copied.trace, copied.user
            if copied.invalid_traceparent:
                self.metrics.inc("invalid_traceparents")
            elif trace:
                traceparent = trace[0][1].decode()
                tracestate = trace[1][1].decode() if len(trace) > 1 else None
        if self._tracer is not None:
            trace, delivery.on_durable = self._tracer.send(
                delivery.topic, delivery.key, len(message.payload), message.topic,
                traceparent, tracestate, delivery.on_durable)
        delivery.headers = [*plan.headers, *trace, *user]

    # -- work off the fast path (Jobs) ------------------------------------------------------

    async def _checked_off_loop(self, message: Message, plan: Plan,
                                on_durable: Callable[[], None] | None,
                                extra: int) -> Delivery | Job:
        """A payload too large to check on the event loop: the format's streaming check, on
        the lane's worker thread, in memory that follows nesting depth, not size."""
        streaming = plan.format.check_streaming
        assert streaming is not None and self.runner is not None
        try:
            await self.runner.in_thread(lambda: streaming(message.payload))
        except ValueError as exc:
            return self._bad_payload(message, plan, on_durable, exc)
        return self._bridge(message, plan, on_durable, extra)

    async def _after_topic_lookup(self, message: Message, plan: Plan,
                                  on_durable: Callable[[], None] | None) -> Delivery | Job:
        """A rendered topic the catalog does not know: ask Kafka (one lookup serves every
        message waiting), then bridge, or dead-letter it if the cluster has no such topic.
        A device must never create topics by choosing a topic level."""
        assert self.sink is not None
        if not await self.sink.catalog.exists(plan.kafka_topic):
            return self.refuse(message, plan.device_id, plan.lineage, Rejected(
                "kafka_topic_missing", f"the cluster has no topic {plan.kafka_topic!r}; the "
                f"route {plan.route.name!r} does not create topics (create_topics = false)",
                plan.device_id), on_durable)
        plan = plan._replace(topic_known=True)
        self._remember(message, plan)
        return self._admit(message, plan, on_durable)

    async def _offload(self, message: Message, plan: Plan,
                       on_durable: Callable[[], None] | None) -> Delivery:
        """Store the body in S3 under a key derived from its content, so a redelivery after
        a crash writes the same object again rather than an orphan; then the reference
        envelope for the fat lane. S3 failures are retried: the message stays unacked."""
        assert self.objects is not None and self.fat_sink is not None
        payload, size = message.payload, len(message.payload)
        digest = await self._digest(payload)
        prefix = self.config.s3.object_prefix if self.config.s3 else ""
        key = f"{prefix}{plan.device_id}/{digest}"
        await self._put(key, payload, plan.device_id, digest, plan.template.content_type)
        self.metrics.inc("payloads_offloaded")
        reference = self.objects.reference(key)
        value = envelope.encode_reference(message, plan.device_id, plan.lineage,
                                          plan.template.content_type, reference, size, digest)
        key_bytes = plan.key if plan.key_per_message is None else \
            plan.key_per_message.key(plan.device_id, message.arrival_millis)
        # From here on only the reference travels: the body is not kept in memory.
        origin = Origin(message._replace(payload=b""), plan.device_id, plan.lineage, reference,
                        digest, size)
        return self._headed(Delivery(plan.kafka_topic, key_bytes, value, plan.headers,
                                     on_durable, self.rejected_by_kafka, origin,
                                     self.fat_sink), message, plan)

    async def _dead_letter_large(self, message: Message, device_id: str,
                                 lineage: envelope.Lineage, rejected: Rejected,
                                 on_durable: Callable[[], None] | None,
                                 shrunk: bool) -> Delivery:
        """A dead letter whose body does not fit a record: hashed off the loop, then stored
        in S3 and referenced, or (without S3) cut to fit."""
        digest = await self._digest(message.payload)
        if self.objects is None:
            return self.dead_letter(message, device_id, lineage, rejected, on_durable, None,
                                    digest, None, shrunk)
        key = f"{DEAD_LETTER_PREFIX}{device_id or '_'}/{digest}"
        await self._put(key, message.payload, device_id, digest, envelope.RAW)
        return self.dead_letter(message._replace(payload=b""), device_id, lineage, rejected,
                                on_durable, self.objects.reference(key), digest,
                                len(message.payload), shrunk)

    async def _digest(self, payload: bytes) -> str:
        if self.runner is None or len(payload) <= _HASH_ON_LOOP_MAX:
            return hashlib.sha256(payload).hexdigest()
        return await self.runner.in_thread(lambda: hashlib.sha256(payload).hexdigest())

    async def _put(self, key: str, body: bytes, device_id: str, digest: str,
                   content_type: str) -> None:
        objects = self.objects
        assert objects is not None
        await retrying(lambda: objects.put(key, body, {"device-id": device_id or "-",
                                                       "sha256": digest}, content_type),
                       self.metrics, "s3_put_failed", key=key)

    # -- plans -------------------------------------------------------------------------------

    def _plan(self, message: Message) -> Plan:
        route, device_id, _, kafka_topic = self.router.match(message.topic)
        lineage = self._lineage[route.name]
        payload_format = formats.FORMATS[route.format]
        refusal, device = None, None
        try:
            device = self.registry.admit(route.auth, device_id)
        except Rejected as rejected:
            refusal = rejected
        topic_known = True
        if "{" in route.kafka_topic and not route.create_topics and self.sink is not None:
            topic_known = self.sink.catalog.known(kafka_topic)
            if not topic_known and self.sink.catalog.fresh():
                raise Rejected("kafka_topic_missing", f"the cluster has no topic "
                               f"{kafka_topic!r}; the route {route.name!r} does not create "
                               "topics (create_topics = false)", device_id)
        plan = Plan(
            route, kafka_topic, device_id, route.key.key(device_id, 0),
            None if route.key.per_device() else route.key,
            envelope.headers(message, device_id, lineage),
            envelope.Template(message.topic, message.broker, device_id, lineage,
                              payload_format.content_type),
            lineage, payload_format, refusal,
            device.hmac_key if device is not None and route.auth == "hmac" else None,
            self._inline_max(route), route.truncate_bytes, topic_known)
        if refusal is None and plan.hmac_key is None and payload_format.check is None and \
                plan.truncate is None and self._tracer is None:
            plan = plan._replace(direct_max=self._record_max if plan.inline_max is None
                                 else min(plan.inline_max, self._record_max))
        if refusal is None and topic_known:
            self._remember(message, plan)
        return plan

    def plan_cache(self) -> tuple[int, int]:
        """How many plans are cached, and their estimated bytes."""
        return len(self._plans), self._plans_bytes

    def _remember(self, message: Message, plan: Plan) -> None:
        """Cache a plan, within the byte budget: a full cache starts over, which costs the
        fleet one plan per topic, never memory."""
        if len(message.topic) > _PLAN_TOPIC_MAX:
            return
        cost = _PLAN_OVERHEAD + _PLAN_TOPIC_COPIES * len(message.topic)
        if self._plans_bytes + cost > _PLANS_MAX_BYTES:
            self._plans.clear()
            self._plans_bytes = 0
            self.metrics.inc("plan_cache_resets")
        self._plans[(message.broker, message.topic)] = plan
        self._plans_bytes += cost

    def _inline_max(self, route: Route) -> int | None:
        s3 = self.config.s3
        if s3 is None or self.objects is None:
            return None
        return route.inline_max_bytes if route.inline_max_bytes is not None \
            else s3.inline_max_bytes

    # -- dead letters ------------------------------------------------------------------------

    def _bad_payload(self, message: Message, plan: Plan, on_durable: Callable[[], None] | None,
                     exc: ValueError) -> Delivery | Job:
        bad = Rejected("bad_payload", f"not valid {plan.route.format}: {exc}", plan.device_id)
        return self.refuse(message, plan.device_id, plan.lineage, bad, on_durable)

    def refuse(self, message: Message, device_id: str, lineage: envelope.Lineage,
               rejected: Rejected, on_durable: Callable[[], None] | None,
               reference: str | None = None, sha256: str | None = None,
               size: int | None = None, shrink: bool = False) -> Delivery | Job:
        """The one way to dead-letter a message, keeping its whole body: inline when it
        fits a record (`shrink`: never), else stored in S3 and referenced (without S3, cut
        to fit and flagged `truncated`). A body already in S3 keeps its `reference`."""
        body_max = 0 if shrink else self._dead_letter_body_max
        held = len(message.payload)
        if reference is None and held > body_max and (
                self.objects is not None or held > _HASH_ON_LOOP_MAX):
            return Job(message, on_durable, lambda: self._dead_letter_large(
                message, device_id, lineage, rejected, on_durable, shrink))
        return self.dead_letter(message, device_id, lineage, rejected, on_durable, reference,
                                sha256, size, shrink)

    def crashed(self, message: Message, on_durable: Callable[[], None] | None,
                exc: BaseException, device_id: str = "") -> Delivery | Job:
        """The dead letter of a message a stage crashed on (`internal_error`, naming the
        exception), so a bug costs one dead letter, never a wedged lane."""
        lineage = self.no_route_lineage
        try:  # name the device and route when the topic still routes
            match = self.router.match(message.topic)
            device_id, lineage = match.device_id, self._lineage[match.route.name]
        except Exception:  # the router may be what crashed
            pass
        return self.refuse(message, device_id, lineage, Rejected.internal(exc, device_id),
                           on_durable)

    def dead_letter(self, message: Message, device_id: str, lineage: envelope.Lineage,
                    rejected: Rejected, on_durable: Callable[[], None] | None,
                    reference: str | None = None, sha256: str | None = None,
                    size: int | None = None, shrunk: bool = False) -> Delivery:
        """The dead-letter record of a message, on this lane's producer: its body inline
        (cut to fit Kafka) or, with `reference`, in S3. It never raises."""
        mark_dead_lettered(on_durable, rejected.code)
        log.warning("dead_letter", code=rejected.code,
                    reason=envelope.printable(rejected.reason)[:500],
                    topic=message.topic[:LOG_TOPIC_MAX], broker=message.broker)
        # Shrunk (Kafka refused it as too large): no body inline, and nothing optional
        # (MQTT properties, up to 128 KiB; trace headers), so this attempt is the last.
        body_max = 0 if shrunk else self._dead_letter_body_max
        if shrunk and message.properties is not None:
            message = message._replace(properties=None)
        value = envelope.encode_dead_letter(message, device_id, lineage, rejected.code,
                                            rejected.reason, body_max, reference, sha256, size)
        try:
            trace = () if shrunk else properties.trace_headers(
                *properties.trace_context(message.user_properties)[:2])
            headers = [*envelope.headers(message, device_id, lineage),
                       ("error.code", rejected.code.encode()), *trace]
        except Exception:  # text a header cannot carry: the value still says it all
            headers = [("error.code", rejected.code.encode())]
        origin = Origin(message, device_id, lineage, reference, sha256, size, rejected, shrunk)
        return Delivery(self.dead_letter_topic, str(message.arrival_millis).encode(), value,
                        headers, on_durable, self._dead_letter_refused, origin, self.sink)

    def rejected_by_kafka(self, delivery: Delivery, rejected: Rejected) -> None:
        """Kafka will never take this record: its dead letter goes in its place."""
        o: Origin = delivery.origin
        self._dispatch(self.refuse(o.message, o.device_id, o.lineage, rejected,
                                   delivery.on_durable, o.reference, o.sha256, o.size))

    def _dead_letter_refused(self, delivery: Delivery, rejected: Rejected) -> None:
        """Kafka refuses even the dead-letter record. Too large: send it again without its
        body inline (by reference when S3 is there). Anything else (no such topic, no
        right to write) needs an operator: it stays unacked and is tried again with a
        backoff, so it flows once the dead-letter topic is fixed."""
        o: Origin = delivery.origin
        if rejected.code == "record_too_large" and not o.shrunk and o.rejected is not None:
            self.metrics.inc("dead_letters_shrunk")
            self._dispatch(self.refuse(o.message, o.device_id, o.lineage, o.rejected,
                                       delivery.on_durable, o.reference, o.sha256, o.size,
                                       shrink=True))
            return
        self.metrics.inc("dead_letters_refused")
        log.error("dead_letter_refused", topic=delivery.topic, reason=rejected.reason,
                  hint="check the dead-letter topic exists and accepts records this size")
        assert delivery.sink is not None
        delivery.sink.retry_later(delivery)

    def _dispatch(self, outcome: Delivery | Job) -> None:
        assert self.runner is not None  # only a producing pipeline gets Kafka's verdicts
        self.runner.dispatch(outcome)
