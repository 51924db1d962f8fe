"""Every outcome counted (invariant 2), exposed as Prometheus metrics by prometheus_client.

The names under "Metrics" in the README are a contract: dashboards, alerts, an autoscaler,
the benchmark and `verify` read them. The one that matters most is the bookkeeping of
messages, kept by the `Ledger`: every message a session hands on gets a `Receipt`, which is
the ack callback the pipeline carries, and which says on settling whether the outcome was
bridged or dead-lettered. So, for every lane and at any moment,

    received == bridged + dead_lettered + in_flight

and `in_flight` is 0 at rest. The ledger's counts change once per message on the event loop,
so they are plain integers there, read by a custom collector (prometheus_client's own
mechanism for values kept elsewhere) when `/metrics` is scraped from the HTTP thread;
everything else uses the library's thread-safe Counter and Gauge.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

PREFIX = "mqtt_kafka_bridge_"
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call] # the `_created` series only double the output

# Receive to durable, in seconds: Kafka acks in milliseconds; S3 offloads and retries
# during an outage take seconds to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)

# Counters other than the ledger's: name (without prefix and `_total`) -> (help, labels).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dead_lettered_messages": ("Messages whose dead letter is durable, by code", ("code",)),
    "mqtt_acks_sent": ("PUBACK/PUBREC sent to brokers, each once its message was settled",
                       ()),
    "mqtt_acks_dropped_stale_connection": (
        "Acks not sent because their connection had closed (the broker redelivers)", ()),
    "mqtt_connects": ("Connections a broker accepted", ("broker", "lane")),
    "mqtt_reconnects": ("Connections that failed or dropped and are retried",
                        ("broker", "lane")),
    "mqtt_sessions_lost": ("Reconnects where the broker no longer had the bridge's session: "
                           "messages queued meanwhile are gone", ("broker",)),
    "mqtt_session_crashes": ("Sessions that ended on a bug (and reconnected)", ()),
    "mqtt_malformed_packets": ("Packets from a broker that could not be decoded", ()),
    "mqtt_publishes_held_back": ("Messages of the bridge's own (answers, commands) not "
                                 "sent: the broker's Receive Maximum of them awaited a "
                                 "PUBACK", ("broker",)),
    "mqtt_publishes_too_large": ("Messages of the bridge's own (answers, commands) not "
                                 "sent: larger than the broker's Maximum Packet Size",
                                 ("broker",)),
    "mqtt_window_full": ("Times a session stopped reading: its receive window was full", ()),
    "mqtt_subscribe_failures": ("Topic filters a broker refused to subscribe", ()),
    "mqtt_unsubscribe_failures": ("Topic filters a broker refused to unsubscribe", ()),
    "mqtt_presence_refused": ("Presence messages a broker refused (an ACL): adopt cannot "
                              "tell whether the session is connected", ()),
    "kafka_records_delivered": ("Records Kafka reported durable", ("lane",)),
    "kafka_records_rejected": ("Records Kafka refused for good (dead-lettered instead)",
                               ("lane",)),
    "kafka_retries": ("Records produced again after a delivery error", ("lane",)),
    "kafka_backpressure": ("Times producing waited for room in the local queue", ("lane",)),
    "kafka_producers_replaced": ("Producers replaced after a fatal error", ("lane",)),
    "kafka_callback_crashes": ("Delivery callbacks that raised", ()),
    "kafka_poll_crashes": ("Producer polls that raised something other than a Kafka error",
                           ()),
    "payloads_offloaded": ("Payloads written to S3 and sent by reference", ()),
    "dead_letters_shrunk": ("Dead letters Kafka refused as too large, sent again smaller", ()),
    "dead_letters_refused": ("Dead letters Kafka refused for good (left unacked)", ()),
    "internal_errors": ("Exceptions a stage raised, each settled as an internal_error", ()),
    "unsettled_messages": ("Messages neither bridged nor dead-lettered: a bug, and an alert",
                           ()),
    "invalid_traceparents": ("Messages whose traceparent user property is not a valid W3C "
                             "one: kept under the user-property prefix, not as traceparent",
                             ()),
    "plan_cache_resets": ("Times the routing plan cache was full and started over", ()),
    "s3_requests": ("S3 requests, by operation", ("operation",)),
    "s3_errors": ("S3 requests that failed, by operation", ("operation",)),
    "s3_bytes": ("Bytes sent to and read from S3", ("direction",)),
    "s3_retries": ("S3 calls retried after an error", ()),
    "file_inits": ("File-transfer inits accepted", ()),
    "file_segments": ("File-transfer segments stored", ()),
    "file_transfers_completed": ("Files assembled and announced", ()),
    "file_transfers_failed": ("File transfers refused or abandoned", ()),
    "file_results": ("Fin results published to devices ([file_transfer] respond), by outcome: "
                     "sent, refused (PUBACK >= 0x80), lost, not_connected", ("outcome",)),
    "file_result_topics_refused": ("Fin Response Topics outside the device's own result "
                                   "topics, answered on the default topic instead", ()),
    "file_results_ignored": ("Bridges' answers heard on a result topic (they carry the "
                             "answer's user property), acked unrecorded", ()),
    "reloads": ("Config reloads, by outcome", ("outcome",)),
    "sparkplug_state_reasserted": ("Host STATE births published again after an offline "
                                   "STATE on the bridge's own host id", ()),
    "sparkplug_messages": ("Sparkplug B messages bridged, by message type", ("message_type",)),
    "sparkplug_stale": ("Sparkplug B messages bridged with names missing or out of turn, by "
                        "issue", ("issue",)),
    "sparkplug_rebirth_requests": ("NCMD rebirth requests sent to edge nodes, by reason",
                                   ("reason",)),
    "sparkplug_rebirth_failures": ("Rebirth requests not sent or refused by the broker", ()),
    "sparkplug_nodes_evicted": ("Edge nodes whose tables were dropped to stay within the "
                                "limits", ()),
}
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mqtt_connected": ("1 while the session is connected and subscribed", ("broker", "lane")),
    "kafka_reachable": ("1 while the lane's producer has an answer from Kafka", ("lane",)),
    "kafka_records_pending": ("Records produced and not yet reported durable", ("lane",)),
    "file_transfers_active": ("File transfers this bridge is taking part in", ()),
    "sparkplug_nodes": ("Edge nodes whose birth tables the bridge holds", ()),
    "lane_jobs": ("Jobs (S3, large checks) running or waiting in the lane's pool", ("lane",)),
}


class Receipt:
    """One received message until its outcome is durable: call it then, once. It calls the
    message's MQTT ack (None for QoS 0) and tells the ledger how it ended: bridged, or
    dead-lettered with the code `refused` set. A QoS 1/2 message's `Inflight` is a Receipt
    itself, so each such message costs one object here, not two."""

    __slots__ = ("ack", "born", "code", "done", "lane")

    def __init__(self, lane: LaneLedger | None, ack: Callable[[], None] | None) -> None:
        self.lane, self.ack = lane, ack
        self.born = time.monotonic()
        self.code: str | None = None
        self.done = False

    def refused(self, code: str) -> None:
        """The message goes to the dead-letter topic (the last code set is the one counted)."""
        self.code = code

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if self.lane is not None:
            self.lane.settled(self)
        if self.ack is not None:
            self.ack()


class SettleClock:
    """The time a batch of delivery reports settles at, taken once for the batch (None
    outside one: a receipt then reads the clock itself). Loop time is time.monotonic()."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now: float | None = None


SETTLE_CLOCK = SettleClock()


def mark_dead_lettered(on_durable: Callable[[], None] | None, code: str) -> None:
    """Mark a message's outcome as a dead letter, if its ack callback keeps count (a
    Receipt, or a stage's own stand-in that passes it on)."""
    mark = getattr(on_durable, "refused", None)
    if mark is not None:
        mark(code)


class LaneLedger:
    """One lane's message counts, kept on the event loop."""

    def __init__(self, name: str, dead_lettered: Counter) -> None:
        self.name = name
        self.received: dict[str, int] = {}  # per broker
        self.received_total = 0
        self.bridged = 0
        self.settled_total = 0
        self._dead_lettered = dead_lettered
        self.open: deque[Receipt] = deque()  # arrival order; settled ones leave from the head
        # bucket counts (not cumulative), then the count of all and their sum, one list so
        # that a copy of it is one consistent snapshot
        self.latency: list[float] = [0] * (len(LATENCY_BUCKETS) + 1) + [0, 0.0]

    def receive(self, broker: str, ack: Callable[[], None] | None) -> Receipt:
        """The message's Receipt: the ack itself when it is one not yet counted (a QoS 1/2
        `Inflight`), else a new one that calls the ack."""
        if isinstance(ack, Receipt) and ack.lane is None:
            receipt = ack
            receipt.lane = self
        else:
            receipt = Receipt(self, ack)
        self.received[broker] = self.received.get(broker, 0) + 1
        self.received_total += 1
        self.open.append(receipt)
        return receipt

    def settled(self, receipt: Receipt) -> None:
        self.settled_total += 1
        if receipt.code is None:
            self.bridged += 1
        else:
            self._dead_lettered.labels(receipt.code).inc()
        now = SETTLE_CLOCK.now
        seconds = (time.monotonic() if now is None else now) - receipt.born
        latency = self.latency
        latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency[-2] += 1
        latency[-1] += seconds
        open_ = self.open
        while open_ and open_[0].done:
            open_.popleft()

    @property
    def in_flight(self) -> int:
        return self.received_total - self.settled_total

    def oldest_age(self) -> float:
        """Seconds the oldest message not yet settled has waited (0 when there is none)."""
        try:
            oldest = self.open[0]
        except IndexError:
            return 0.0
        return 0.0 if oldest.done else max(0.0, time.monotonic() - oldest.born)


class Ledger(Collector):
    """Every lane's counts, exposed when the registry is collected (any thread)."""

    def __init__(self, lanes: tuple[str, ...], dead_lettered: Counter) -> None:
        self.lanes = {lane: LaneLedger(lane, dead_lettered) for lane in lanes}

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(PREFIX + "received_messages",
                                       "Messages received from brokers",
                                       labels=["broker", "lane"])
        bridged = CounterMetricFamily(PREFIX + "bridged_messages",
                                      "Messages whose outcome is durable in its data topic "
                                      "(file segments: in S3)", labels=["lane"])
        in_flight = GaugeMetricFamily(PREFIX + "in_flight_messages",
                                      "Messages received whose outcome is not yet durable",
                                      labels=["lane"])
        oldest = GaugeMetricFamily(PREFIX + "oldest_unacked_age_seconds",
                                   "How long the oldest message not yet settled has waited: "
                                   "alert and autoscale on this", labels=["lane"])
        latency = HistogramMetricFamily(PREFIX + "delivery_latency_seconds",
                                        "MQTT receive to durable outcome", labels=["lane"])
        for name, lane in self.lanes.items():
            for broker, count in dict(lane.received).items():
                received.add_metric([broker, name], count)
            bridged.add_metric([name], lane.bridged)
            in_flight.add_metric([name], lane.in_flight)
            oldest.add_metric([name], lane.oldest_age())
            snapshot = list(lane.latency)
            cumulative: float = 0
            buckets: list[tuple[str, float]] = []
            for bound, in_bucket in zip([*LATENCY_BUCKETS, float("inf")], snapshot,
                                        strict=False):
                cumulative += in_bucket
                buckets.append((_le(bound), cumulative))
            latency.add_metric([name], buckets, snapshot[-1])
        yield from (received, bridged, in_flight, oldest, latency)


class Metrics:
    """The daemon's metrics, in a registry of its own (tests run several daemons)."""

    def __init__(self, lanes: tuple[str, ...] = ("fast", "bulk", "fat")) -> None:
        self.registry = CollectorRegistry()
        self.counters = {name: Counter(PREFIX + name, text, labels, registry=self.registry)
                         for name, (text, labels) in COUNTERS.items()}
        self.gauges = {name: Gauge(PREFIX + name, text, labels, registry=self.registry)
                       for name, (text, labels) in GAUGES.items()}
        self.ledger = Ledger(lanes, self.counters["dead_lettered_messages"])
        self.registry.register(self.ledger)
        self.map_info = Info(PREFIX + "map", "The topic map in use (config and registry hash)",
                             registry=self.registry)
        self.build_info = Info(PREFIX + "build", "The bridge's version", registry=self.registry)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add to a counter of COUNTERS (thread-safe); an unknown name is a bug: KeyError."""
        counter = self.counters[name]
        (counter.labels(**labels) if labels else counter).inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        gauge = self.gauges[name]
        (gauge.labels(**labels) if labels else gauge).set(value)

    def receive(self, broker: str, lane: str, ack: Callable[[], None] | None) -> Receipt:
        """A message handed on by a session: its Receipt, to be called once it is settled."""
        return self.ledger.lanes[lane].receive(broker, ack)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything (callable from any thread)."""
        return prometheus_client.generate_latest(self.registry)

    def snapshot(self) -> dict[str, float]:
        """Each counter and gauge that is not 0, summed over its labels, by short name: the
        stats log line."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge"):
                continue
            name = family.name.removeprefix(PREFIX)
            total = sum(s.value for s in family.samples
                        if not s.name.endswith("_created"))
            if total:
                out[name] = int(total) if float(total).is_integer() else round(total, 3)
        return dict(sorted(out.items()))

    def by_label(self, name: str, label: str) -> dict[str, int]:
        """A counter's values by one label (e.g. dead letters by code), those not 0."""
        out: dict[str, int] = {}
        for metric in self.counters[name].collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    key = sample.labels[label]
                    out[key] = out.get(key, 0) + int(sample.value)
        return dict(sorted(out.items()))

    def value(self, name: str, **labels: str) -> float:
        """One series' value (tests, the benchmark): the sum over labels not given."""
        total = 0.0
        collector = self.counters.get(name) or self.gauges.get(name)
        families = collector.collect() if collector is not None else self.registry.collect()
        for family in families:
            if family.name.removeprefix(PREFIX) != name:
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
