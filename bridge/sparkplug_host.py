"""The `[sparkplug]` section: Sparkplug B messages into Kafka, as a host application would.

Its topics are taken before the routes of its lane (`Daemon._handle`). Each message is
decoded (`bridge/sparkplug.py`), its names filled in from the edge node's birth tables, and
bridged with a `sparkplug` map beside the raw body, keyed `group/edge_node` so one node's
messages stay in order in one partition. What the tables cannot explain (DATA before any
BIRTH, an unknown alias, a `seq` gap) is still bridged, flagged `stale`, and the edge node
is asked for a rebirth (NCMD `Node Control/Rebirth`), at most once per `rebirth_interval`.
A payload that does not decode is a dead letter with its raw body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from bridge import envelope
from bridge.config import Config, SparkplugConfig
from bridge.errors import Rejected
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.mqtt import BrokerSession, Inflight
from bridge.pipeline import LOG_TOPIC_MAX, Job, Origin, Pipeline
from bridge.sparkplug import (
    NAMESPACE,
    HostState,
    Limits,
    Topic,
    decode,
    rebirth_request,
    records,
)

log = structlog.get_logger("bridge.sparkplug")
ROUTE_NAME = "sparkplug"  # what lineage calls these messages
CONTENT_TYPE = "application/x-protobuf; messageType=org.eclipse.tahu.protobuf.Payload"
Publish = Callable[..., "asyncio.Future[int | None] | None"]
_STATE_MAX = 1024  # bytes: a STATE payload is {"online": ..., "timestamp": ...}
# NCMDs sent and not yet answered: a device can name a new node per message, and a client
# past the broker's Receive Maximum (Mosquitto: 20) commits a protocol error.
REBIRTHS_UNANSWERED_MAX = 8


def limits(settings: SparkplugConfig) -> Limits:
    return Limits(settings.max_nodes, settings.max_aliases_per_node, settings.max_state_bytes,
                  settings.rebirth_interval)


class Sparkplug:
    """Turns the Sparkplug B messages of one config into Deliveries for one lane's sink."""

    def __init__(self, config: Config, settings: SparkplugConfig, pipeline: Pipeline,
                 metrics: Metrics, publish: Publish, state: HostState | None = None) -> None:
        self.settings, self.pipeline, self.metrics, self._publish = \
            settings, pipeline, metrics, publish
        # Kept across a reload whose limits did not change: the tables stay valid.
        self.state = state if state is not None and state.limits == limits(settings) \
            else HostState(limits(settings))
        self.lineage = envelope.Lineage(config.bridge.instance, ROUTE_NAME, config.version)
        self._record_max = config.record_max(settings.lane)
        self._unanswered = 0  # NCMDs sent whose PUBACK has not come
        group = settings.group_id
        self._prefix = f"{NAMESPACE}/" if group == "+" else f"{NAMESPACE}/{group}/"

    @property
    def lane(self) -> str:
        return self.settings.lane

    def subscriptions(self) -> list[str]:
        group = self.settings.group_id
        return [f"{NAMESPACE}/{group}/+/+", f"{NAMESPACE}/{group}/+/+/+"]

    def takes(self, topic: str) -> bool:
        return topic.startswith(self._prefix) and topic.count("/") in (3, 4)

    def prepare(self, message: Message, on_durable: Callable[[], None] | None
                ) -> Delivery | Job:
        """The message's Delivery: its envelope, or its dead letter."""
        key = ""
        try:
            topic = Topic.parse(message.topic)
            key = topic.key(self.settings.key == "device")
            size = len(message.payload)
            if size > self.settings.max_payload_bytes:
                raise Rejected("sparkplug_payload_too_large", f"{size} bytes, more than "
                               f"max_payload_bytes = {self.settings.max_payload_bytes}", key)
            decoded = decode(message.payload, self.settings.max_metrics)
        except Rejected as rejected:
            rejected.device_id = key
            return self.pipeline.refuse(message, key, self.lineage, rejected, on_durable)
        verdict = self.state.observe(topic, decoded, time.monotonic())
        if verdict.evicted:
            self.metrics.inc("sparkplug_nodes_evicted", len(verdict.evicted))
            log.warning("sparkplug_nodes_evicted", nodes=[f"{g}/{e}" for g, e in
                                                         verdict.evicted[:10]],
                        count=len(verdict.evicted), why="max_nodes or max_state_bytes: "
                        "their next DATA asks them for a rebirth")
        self.metrics.set("sparkplug_nodes", len(self.state.nodes))
        for issue in verdict.issues:
            self.metrics.inc("sparkplug_stale", issue=issue)
        requested = verdict.rebirth is not None and self.settings.rebirth and \
            self._request_rebirth(message.broker, topic, verdict.rebirth)
        fields: dict[str, Any] = {
            "group": topic.group, "edge_node": topic.edge_node, "device": topic.device,
            "message_type": topic.message_type, "seq": decoded.seq,
            "timestamp": decoded.timestamp, "bd_seq": decoded.bd_seq,
            "metrics": records(decoded.metrics),
            "stale": bool(verdict.issues), "issues": list(verdict.issues),
            "rebirth_requested": requested}
        if verdict.online is not None:
            fields["online"] = verdict.online
        value = envelope.encode_with(message, key, self.lineage, CONTENT_TYPE,
                                     sparkplug=fields)
        if len(value) > self._record_max:
            return self.pipeline.refuse(message, key, self.lineage, Rejected(
                "record_too_large", f"the Sparkplug envelope is {len(value)} bytes, more "
                f"than this lane's message.max.bytes {self._record_max}", key), on_durable)
        self.metrics.inc("sparkplug_messages", message_type=topic.message_type)
        kafka_topic = self.settings.kafka_topic.replace("{message_type}",
                                                        topic.message_type.lower())
        return Delivery(kafka_topic, key.encode(), value,
                        envelope.headers(message, key, self.lineage), on_durable,
                        self.pipeline.rejected_by_kafka, Origin(message, key, self.lineage),
                        self.pipeline.sink)

    def _request_rebirth(self, broker: str, topic: Topic, reason: str) -> bool:
        """Publish NCMD Node Control/Rebirth to the node (QoS 1); True if it was sent. With
        REBIRTHS_UNANSWERED_MAX waiting for their PUBACK, none (counted as a failure)."""
        if self._unanswered >= REBIRTHS_UNANSWERED_MAX:
            self.metrics.inc("sparkplug_rebirth_failures")
            return False
        ncmd = f"{NAMESPACE}/{topic.group}/NCMD/{topic.edge_node}"
        answer = self._publish(broker, ncmd, rebirth_request(time.time_ns() // 1_000_000))
        node = f"{topic.group}/{topic.edge_node}"
        if answer is None:
            self.metrics.inc("sparkplug_rebirth_failures")
            log.warning("sparkplug_rebirth_not_sent", node=node, reason=reason,
                        why="no connected session to that broker; the next message asks again")
            return False
        self.metrics.inc("sparkplug_rebirth_requests", reason=reason)
        self._unanswered += 1
        log.info("sparkplug_rebirth_requested", node=node[:LOG_TOPIC_MAX], reason=reason)
        answer.add_done_callback(lambda done: self._answered(done, node))
        return True

    def _answered(self, answer: asyncio.Future[int | None], node: str) -> None:
        self._unanswered -= 1
        reason = None if answer.cancelled() else answer.result()
        if reason is not None and reason >= 0x80:
            self.metrics.inc("sparkplug_rebirth_failures")
            log.error("sparkplug_rebirth_refused", node=node, reason_code=reason,
                      why="the broker refused the NCMD: allow the bridge to publish "
                          "spBv1.0/+/NCMD/+ (mosquitto/acl)")


def state_payload(online: bool, timestamp: int) -> bytes:
    """A Sparkplug 3.0 host application's STATE message (JSON, retained)."""
    return json.dumps({"online": online, "timestamp": timestamp},
                      separators=(",", ":")).encode()


def host_sessions(config: Config, settings: SparkplugConfig,
                  metrics: Metrics) -> list[BrokerSession]:
    """With `host_id`: per broker a session of its own that announces the bridge as a
    Sparkplug 3.0 host application: STATE online (retained, QoS 1) on each connect, and
    offline as its will, with the same timestamp. It subscribes to that STATE topic alone
    (`OwnState`); its client id is the broker's plus `-sparkplug-host`, it keeps no session
    and joins no share group."""
    topic = f"{NAMESPACE}/STATE/{settings.host_id}"

    def announce() -> tuple[str, bytes, bytes]:
        now = time.time_ns() // 1_000_000
        return topic, state_payload(True, now), state_payload(False, now)

    sessions = []
    for broker in config.brokers:
        watch = OwnState(topic, metrics)
        session = BrokerSession(dataclasses.replace(
            broker, client_id=f"{broker.client_id}-sparkplug-host", presence_prefix="",
            session_expiry=0, share_group=None), [topic], watch, metrics, "sparkplug-host",
            None, config.bridge.instance, announce)
        session.retain_as_published = False  # so a retained STATE is one that predates it
        watch.session = session
        sessions.append(session)
    return sessions


class OwnState:
    """The host session's handler: what is said on its own STATE topic. An offline STATE
    heard while connected (the will of an older connection of ours, which the broker
    publishes when this one takes over; another process with the same host_id; anyone the
    ACL lets write it) would leave edge nodes believing the host is gone, so the birth is
    published again (Sparkplug 3.0, 5.3), at most once per `interval` seconds, the last
    one delayed rather than dropped. The retained STATE sent on subscribing predates this
    connection's birth and is left alone; so is the session's own birth, heard back."""

    def __init__(self, topic: str, metrics: Metrics, interval: float = 1.0) -> None:
        self.topic, self.metrics, self.interval = topic, metrics, interval
        self.session: BrokerSession | None = None
        self._last = float("-inf")
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self, message: Message, inflight: Inflight | None) -> None:
        if inflight is not None:
            inflight()
        if message.retain or message.topic != self.topic or self._pending is not None or \
                says_online(message.payload) is not False:
            return
        loop = asyncio.get_running_loop()
        wait = self._last + self.interval - loop.time()
        if wait > 0:
            self._pending = loop.call_later(wait, self._again)
        else:
            self._again()

    def _again(self) -> None:
        self._pending = None
        self._last = asyncio.get_running_loop().time()
        if self.session is not None and self.session.announce_again():
            self.metrics.inc("sparkplug_state_reasserted")
            log.warning("sparkplug_state_reasserted", topic=self.topic[:LOG_TOPIC_MAX],
                        why="an offline STATE came on the bridge's own host id while it is "
                            "connected: its online STATE is published again")


def says_online(payload: bytes) -> bool | None:
    """The `online` of a STATE payload; None when it is not a STATE object (an empty
    payload clearing the retained one, anything else): nothing to answer."""
    if len(payload) > _STATE_MAX:
        return None
    try:
        state = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    online = state.get("online") if isinstance(state, dict) else None
    return online if isinstance(online, bool) else None
