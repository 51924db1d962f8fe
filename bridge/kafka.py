"""The Kafka adapter: produce records, and report each one durable only from its delivery report.

librdkafka serves delivery reports from `poll()`, which the event loop calls every
millisecond while records are in flight (every 5 ms when idle). A poll thread would need the
GIL once per report and fight the loop for it: measured on the throughput benchmark, the
bridge drained 38-42k msg/s with a poll thread and 63-70k msg/s polling from the loop.

Error handling follows the at-least-once rule:
- a delivery error is "outcome unknown": the record is produced again after a backoff;
- an error that says this record can never be written (too large, invalid) is `Rejected`;
- `BufferError` is backpressure: the caller waits for room, nothing is dropped;
- a fatal producer error (e.g. idempotence state lost) makes a new producer that replays
  every record not yet reported durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from bridge.envelope import Headers
from bridge.errors import Rejected
from bridge.logs import KafkaLog
from bridge.metrics import SETTLE_CLOCK, Metrics

log = structlog.get_logger("bridge.kafka")

# Errors after which this record will never be accepted: dead-letter it rather than loop.
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE: "record_too_large",
    KafkaError.INVALID_RECORD: "invalid_record",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic_not_authorized",
    KafkaError.TOPIC_EXCEPTION: "invalid_topic",
    KafkaError.UNKNOWN_TOPIC_OR_PART: "kafka_topic_missing",
    KafkaError._UNKNOWN_TOPIC: "kafka_topic_missing",
}
_RETRY_MIN, _RETRY_MAX = 0.1, 5.0
_POLL_BUSY, _POLL_IDLE = 0.001, 0.005  # seconds between polls with / without records in flight
_CATALOG_FRESH = 1.0  # seconds a topic listing answers "no such topic" without asking again
_METADATA_TIMEOUT = 5.0
# How often librdkafka reports statistics unless [kafka] says: the report is how the sink
# learns that its producer holds a producer id (librdkafka exposes it nowhere else).
_STATS_EVERY_MS = 100


_NO_REPORTS: list[Any] = []  # replaced by the sink's list when produced
_GONE = object()  # what a settled delivery's pending entry pops as


_BROKER_LISTS = ("bootstrap.servers", "metadata.broker.list")  # one property, two names
# A client's logger that drops librdkafka's lines (the probe's and `tail`'s): they would
# repeat, in librdkafka's words, what the caller says once.
QUIET = logging.getLogger("bridge.kafka.quiet")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def refused_properties(properties: dict[str, Any],
                       suspects: Sequence[str]) -> list[tuple[str | None, str]]:
    """What librdkafka (and confluent-kafka) refuse in producer `properties`, asked of the
    library itself by building a real producer. It names one refusal at a time, sometimes
    under another name (an alias such as linger.ms, or an interplay of properties), so
    each is pinned on the first of `suspects` whose removal changes the answer, which is
    then removed before trying again: (name, reason) per refusal, (None, reason) for one no
    suspect explains. The brokers are left out: the probe must not resolve or reach them
    (librdkafka takes any text there; the caller checks it)."""
    remaining = {k: v for k, v in properties.items() if k not in _BROKER_LISTS}
    found: list[tuple[str | None, str]] = []
    reason = _refusal(remaining)
    while reason is not None:
        for name in _named_first(reason, [n for n in suspects if n in remaining]):
            trial = {k: v for k, v in remaining.items() if k != name}
            answer = _refusal(trial)
            if answer != reason:
                found.append((name, reason))
                remaining, reason = trial, answer
                break
        else:
            found.append((None, reason))
            break
    return found


def _named_first(reason: str, suspects: list[str]) -> list[str]:
    """The suspects the reason names (librdkafka quotes names "so" or `so`) go first."""
    named = [n for n in suspects if f'"{n}"' in reason or f"`{n}`" in reason]
    return list(dict.fromkeys([*named, *suspects]))


def _refusal(properties: dict[str, Any]) -> str | None:
    """Why the library refuses to build a producer of these properties, or None. A built
    one is dropped at once: CPython destroys it on the spot, and rd_kafka_destroy joins
    its threads within milliseconds, as none of them waits on a broker's name or address;
    the logger and error_cb keep it silent meanwhile."""
    try:
        producer = Producer(properties, logger=QUIET, error_cb=_ignore)
    except KafkaException as exc:
        return error_text(exc)
    except Exception as exc:  # the Python client's own checks raise TypeError, ValueError, ...
        return str(exc)
    del producer
    return None


def error_text(exc: KafkaException) -> str:
    """librdkafka's own words for a KafkaException (its str() wraps them in a repr)."""
    error = exc.args[0] if exc.args else None
    return (error.str() if isinstance(error, KafkaError) else str(exc)).strip()


def _ignore(_err: KafkaError) -> None:
    """The probe's error_cb: it is never polled, so this is never called."""


def _is_fatal(err: KafkaError) -> bool:
    """The producer is unusable: fatal itself, or produce() refusing because it is."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


class Delivery:
    """One record on its way to Kafka, and what to call once Kafka has it durably.

    It is its own delivery callback, so producing allocates nothing more per message.
    """

    __slots__ = ("attempts", "headers", "key", "on_durable", "on_rejected", "origin", "reports",
                 "sink", "topic", "value")

    def __init__(self, topic: str, key: bytes | None, value: bytes,
                 headers: Headers,
                 on_durable: Callable[[], None] | None,
                 on_rejected: Callable[[Delivery, Rejected], None],
                 origin: Any = None, sink: KafkaSink | None = None) -> None:
        self.topic, self.key, self.value, self.headers = topic, key, value, headers
        self.sink = sink  # the lane's producer it goes through
        self.on_durable, self.on_rejected = on_durable, on_rejected
        self.origin = origin  # what on_rejected needs to build a dead-letter record
        self.attempts = 0
        self.reports: list[tuple[Delivery, KafkaError | None]] = _NO_REPORTS

    def __call__(self, err: KafkaError | None, _msg: Any) -> None:
        self.reports.append((self, err))  # served by poll(); settled right after it


class TopicCatalog:
    """The topics the cluster has, as last listed. A rendered topic it does not know is
    looked up once more (one listing serves every message waiting, at most one a second),
    so a device cannot create topics where the cluster auto-creates them, and an
    operator's new topic is seen within a second."""

    def __init__(self, lookup: Callable[[], set[str]], loop: asyncio.AbstractEventLoop) -> None:
        self._lookup, self._loop = lookup, loop
        self._topics: frozenset[str] = frozenset()
        self._listed_at = -_CATALOG_FRESH
        self._listing: asyncio.Future[None] | None = None

    def known(self, topic: str) -> bool:
        return topic in self._topics

    def fresh(self) -> bool:
        """True when the last listing is recent enough to say a topic does not exist."""
        return self._loop.time() - self._listed_at < _CATALOG_FRESH

    async def exists(self, topic: str) -> bool:
        """Whether the cluster has the topic; while Kafka cannot answer, keep asking (the
        message stays unacked meanwhile)."""
        delay = _RETRY_MIN
        while topic not in self._topics and not self.fresh():
            try:
                await self._list()
            except KafkaException as exc:
                log.warning("kafka_metadata_unavailable", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(_RETRY_MAX, delay * 2)
        return topic in self._topics

    async def _list(self) -> None:
        if self._listing is None:
            self._listing = asyncio.ensure_future(self._fetch())
            self._listing.add_done_callback(lambda _: setattr(self, "_listing", None))
        await asyncio.shield(self._listing)

    async def _fetch(self) -> None:
        topics = await self._loop.run_in_executor(None, self._lookup)
        self._topics, self._listed_at = frozenset(topics), self._loop.time()


class KafkaSink:
    """Owns one lane's producer; polls it and settles deliveries on the event loop."""

    def __init__(self, properties: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 metrics: Metrics, lane: str = "bulk") -> None:
        self.properties, self.lane = dict(properties), lane
        self._loop, self._metrics = loop, metrics
        self._pending: dict[Delivery, None] = {}  # produced, not settled; ordered for replay
        self._waiting: set[Delivery] = set()  # failed, waiting to be produced again
        self._reports: list[tuple[Delivery, KafkaError | None]] = []
        self._generation = 0
        self._producer = self._new_producer()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self.successor: KafkaSink | None = None  # the lane's producer after a reload
        self._waiting_max = int(str(self.properties.get("queue.buffering.max.messages",
                                                        100000)))
        self._poller: asyncio.TimerHandle | None = None
        self.catalog = TopicCatalog(self._list_topics, loop)
        # Kafka answered this producer (metadata or a delivery) and librdkafka has not
        # said since that every broker is down: what readiness asks of a lane's producer.
        self.reachable = False
        self.answered_at = float("-inf")  # loop time of Kafka's last answer
        # Primed: the producer holds its producer id and Kafka answered its metadata, so a
        # record produced now leaves at once. A fresh idempotent producer first asks for an
        # id 500 ms after it is built (librdkafka's PID timer, again every 500 ms until a
        # broker is up): the daemon reads no PUBLISH before every lane's producer is primed.
        self.primed = asyncio.Event()
        self._has_pid = False
        self._born = loop.time()

    def start(self) -> None:
        """Poll from the loop (once: a reload may start a sink it is priming)."""
        if self._poller is None and not self._stopping:
            self._poll()

    def _new_producer(self) -> Producer:
        generation = self._generation

        def on_error(err: KafkaError) -> None:  # served by poll(), on the loop
            if err.code() == KafkaError._ALL_BROKERS_DOWN:
                self.reachable = False
            if err.fatal():
                self._loop.call_soon(self._replace_producer, err.str(), generation)
            elif err.code() != KafkaError._TRANSPORT:
                log.warning("kafka_error", lane=self.lane, error=err.str())

        def on_stats(stats: str) -> None:  # served by poll(), on the loop
            if generation == self._generation and not self._has_pid:
                self._stats(stats)

        stats_every = {} if "statistics.interval.ms" in self.properties \
            else {"statistics.interval.ms": _STATS_EVERY_MS}
        return Producer({**self.properties, **stats_every, "error_cb": on_error,
                         "stats_cb": on_stats},
                        logger=KafkaLog(self.lane, debug=bool(self.properties.get("debug"))))

    def _stats(self, stats: str) -> None:
        """librdkafka's statistics: `eos.idemp_state` says when the producer id came."""
        try:
            eos = json.loads(stats).get("eos")
        except ValueError:
            return
        if eos is None or eos.get("idemp_state") == "Assigned":
            self._has_pid = True
            self._check_primed()

    def _check_primed(self) -> None:
        if self._has_pid and self.reachable and not self.primed.is_set():
            self.primed.set()
            log.info("kafka_producer_primed", lane=self.lane,
                     after_ms=round((self._loop.time() - self._born) * 1000))

    @property
    def waits_for_pid(self) -> bool:
        """True while readiness must wait for the producer id: librdkafka reports it only
        in its statistics, which `statistics.interval.ms` = 0 turns off."""
        return not self._has_pid and str(self.properties.get("statistics.interval.ms",
                                                             _STATS_EVERY_MS)) != "0"

    def _list_topics(self) -> set[str]:
        """Every topic the cluster has (blocking); KafkaException when it cannot say."""
        listing = self._producer.list_topics(timeout=_METADATA_TIMEOUT).topics
        return {name for name, topic in listing.items() if topic.error is None}

    def probe(self, timeout: float = 2.0) -> bool:
        """Ask for the cluster's metadata (blocking: run it in an executor); True, and
        `reachable`, once Kafka answers."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException:
            self.reachable = False
            return False
        self.reachable, self.answered_at = True, self._loop.time()
        if not self.waits_for_pid:
            self._has_pid = True
        self._loop.call_soon_threadsafe(self._check_primed)
        return True

    def missing_topics(self, topics: list[str], timeout: float = 10) -> list[str]:
        """Topics the cluster does not have (blocking: run it in an executor)."""
        try:
            known = self._producer.list_topics(timeout=timeout).topics
        except KafkaException as exc:
            log.warning("kafka_metadata_unavailable", error=str(exc))
            return []
        return [t for t in topics if t not in known or known[t].error is not None]

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._waiting)

    def try_send(self, delivery: Delivery) -> bool:
        """Produce now; False means the local queue is full and the caller must wait.

        A retired sink hands the record to its successor: a job of a pipeline from before a
        reload may still produce after this producer drained and stopped polling. Records
        waiting to be produced again (Kafka failed them) live outside librdkafka's capped
        queue, so they count against a second cap of the same size: a Kafka outage must not
        let the source read on without end."""
        if self._stopping and self.successor is not None:
            delivery.sink = self.successor
            return self.successor.try_send(delivery)
        waiting = self._waiting
        if waiting and len(waiting) >= self._waiting_max and delivery not in waiting:
            self._metrics.inc("kafka_backpressure", lane=self.lane)
            return False
        delivery.reports = self._reports
        try:
            self._producer.produce(delivery.topic, delivery.value, delivery.key,
                                   headers=delivery.headers, on_delivery=delivery)
        except BufferError:
            self._metrics.inc("kafka_backpressure", lane=self.lane)
            return False
        except KafkaException as exc:
            self._reject_or_retry(delivery, exc.args[0])
            return True
        pending = self._pending
        if not pending:
            self._idle.clear()
        pending[delivery] = None
        return True

    def submit(self, delivery: Delivery) -> None:
        """Produce from a callback that cannot wait: waits in a task when the queue is full."""
        if not self.try_send(delivery):
            self._resend(delivery)

    async def send(self, delivery: Delivery) -> None:
        """Produce, waiting for room as long as it takes: backpressure, never a drop."""
        while not self.try_send(delivery):
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 0.05)

    async def drain(self, timeout: float) -> bool:
        """Wait until every produced record is settled; False if the deadline passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop polling; records not yet durable were never acked, so nothing is lost."""
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()

    def _poll(self) -> None:
        """Serve delivery reports (and errors), settle them as one batch, poll again soon.
        Whatever poll() raises, polling goes on: a timer that died with it would leave every
        record of the lane unsettled, and its MQTT messages unacked, for good."""
        if self._stopping:
            return
        try:
            self._producer.poll(0)
        except KafkaException as exc:  # confluent-kafka 2.x raises a fatal error here
            self._on_poll_error(exc)
        except Exception:
            self._metrics.inc("kafka_poll_crashes")
            log.exception("kafka_poll_crashed", lane=self.lane)
        finally:
            busy = self._pending or self._waiting
            self._poller = self._loop.call_later(_POLL_BUSY if busy else _POLL_IDLE,
                                                 self._poll)
        if self._reports:
            batch = self._reports.copy()
            self._reports.clear()
            self._settle(batch, self._generation)

    def _on_poll_error(self, exc: KafkaException) -> None:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is not None and _is_fatal(err):
            self._replace_producer(err.str(), self._generation)
        else:
            log.warning("kafka_error", lane=self.lane, error=error_text(exc))

    def _settle(self, batch: list[tuple[Delivery, KafkaError | None]], generation: int) -> None:
        """Ack what is durable, retry or reject what is not; the batch shares one clock
        reading for its latencies."""
        durable = 0
        pending = self._pending
        SETTLE_CLOCK.now = now = self._loop.time()
        try:
            for delivery, err in batch:
                try:
                    if err is None:
                        if pending.pop(delivery, _GONE) is _GONE:
                            continue  # settled already, e.g. by an older producer
                        durable += 1
                        on_durable = delivery.on_durable
                        if on_durable is not None:
                            on_durable()
                    elif generation == self._generation and \
                            pending.pop(delivery, _GONE) is not _GONE:
                        self._reject_or_retry(delivery, err)
                except Exception:  # one bad callback must not leave the rest of the batch
                    self._metrics.inc("kafka_callback_crashes")
                    log.exception("kafka_callback_crashed", lane=self.lane,
                                  topic=delivery.topic)
        finally:
            SETTLE_CLOCK.now = None
        if durable:
            self.reachable, self.answered_at = True, now
            self._metrics.inc("kafka_records_delivered", durable, lane=self.lane)
        self._room.set()
        if not pending and not self._waiting:
            self._idle.set()

    def _reject_or_retry(self, delivery: Delivery, err: KafkaError) -> None:
        code = _PERMANENT.get(err.code())
        if code is not None:
            self._metrics.inc("kafka_records_rejected", lane=self.lane)
            delivery.on_rejected(delivery, Rejected(code, f"Kafka refused the record: {err.str()}"))
            return
        if _is_fatal(err):
            self._pending[delivery] = None  # the new producer replays it
            self._replace_producer(err.str(), self._generation)
            return
        log.warning("kafka_delivery_failed", lane=self.lane, topic=delivery.topic, error=err.str(),
                    attempt=delivery.attempts + 1)
        self.retry_later(delivery)

    def retry_later(self, delivery: Delivery) -> None:
        """Produce again after an exponential backoff; the record stays owed until then."""
        delivery.attempts += 1
        delay = min(_RETRY_MAX, _RETRY_MIN * 2 ** min(delivery.attempts, 10))
        self._metrics.inc("kafka_retries", lane=self.lane)
        self._waiting.add(delivery)
        self._idle.clear()
        self._loop.call_later(delay, self._resend, delivery)

    def _resend(self, delivery: Delivery) -> None:
        """Produce a waiting record again; it counts as pending until the producer has it."""
        self._waiting.add(delivery)
        self._idle.clear()
        task = self._loop.create_task(self.send(delivery))
        task.add_done_callback(lambda _: self._waiting.discard(delivery))

    def _replace_producer(self, reason: str, generation: int) -> None:
        """Idempotence state is gone: start over with a new producer and replay the rest."""
        if self._stopping or generation != self._generation:
            return  # already replaced for this failure
        old = self._producer
        self._generation += 1
        self._has_pid, self._born = False, self._loop.time()
        self.primed.clear()
        self._producer = self._new_producer()
        self._metrics.inc("kafka_producers_replaced", lane=self.lane)
        replay = list(self._pending)
        self._pending.clear()
        log.error("kafka_producer_fatal", lane=self.lane, reason=reason, replaying=len(replay))
        threading.Thread(target=old.purge, name="kafka-retire", daemon=True).start()
        for delivery in replay:
            self._resend(delivery)
