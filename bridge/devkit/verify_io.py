"""The I/O of `mqtt-kafka-bridge verify`: the log file, Kafka, S3, and the printed report.

`run(...)` is the whole command for a program (a benchmark): it returns the `Report` of
bridge.devkit.verify, whose arithmetic this module only feeds.

Kafka is read like `tail` reads it: every partition assigned from the beginning, no
consumer group (Tansu takes ~20 s to assign one) and no watermarks (Tansu's can lag behind
what it holds), so the reader stops on quiet instead: once every acked publish is found and
no record came for a second, or after `idle` seconds without one, or at `timeout`.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import Message as KafkaRecord
from tqdm import tqdm

from bridge import envelope
from bridge.devkit.tail import UnknownTopic
from bridge.devkit.verify import Checker, Latency, Log, Record, Report, parse_log
from bridge.kafka import QUIET

SETTLE_SECONDS = 1.0  # quiet after the last acked publish was found: late duplicates come in
CONNECT_SECONDS = 5.0  # an unreachable Kafka or S3 is said after this long
_MISSING = {"NoSuchKey", "404", "NotFound"}
# librdkafka prefetches up to 64 MiB per partition by default: more than verify's own state
PREFETCH_KIB = 4096
FETCH_BYTES = 8 << 20  # a fetch response is buffered whole (default 50 MiB)


def read_log(path: Path) -> Log:
    """The log at `path`, streamed line by line (a million lines need no list of them)."""
    with path.open("rb") as lines:
        return parse_log(lines)


def run(bootstrap: str, log: Path | Log, topics: list[str], s3_endpoint: str | None = None,
        follow_references: bool = False, idle: float = 10.0, timeout: float | None = None,
        progress: bool = False) -> Report:
    """Verify `topics` on the Kafka at `bootstrap` against a simulate log (a path, or one
    already read); references are followed into S3 with `s3_endpoint` or
    `follow_references` (boto3's default endpoint)."""
    objects = S3Objects(s3_endpoint) if s3_endpoint or follow_references else None
    checker = Checker(log if isinstance(log, Log) else read_log(log), objects)
    for topic in topics:
        checker.topic(topic)
    stopped = read(bootstrap, topics, checker, idle, timeout, progress)
    return checker.report(stopped)


def read(bootstrap: str, topics: list[str], checker: Checker, idle: float,
         timeout: float | None, progress: bool) -> str:
    """Feed every record of `topics` to `checker` until a stop rule holds; returns which
    (`all found`, `idle` or `timeout`)."""
    consumer = _consumer(bootstrap, topics)
    bar = tqdm(total=checker.log.acked, desc="verify: acked found", unit=" msg", leave=False,
               file=sys.stderr, disable=not progress)
    try:
        start = last = time.monotonic()
        while True:
            stopped = _stop(checker, start, last, idle, timeout)
            if stopped:
                return stopped
            batch = consumer.consume(1000, 0.2)
            for record in batch:
                checker.add(_record(record))
            if batch:
                last = time.monotonic()
                bar.update(checker.found - bar.n)
    finally:
        bar.close()
        consumer.close()


def _stop(checker: Checker, start: float, last: float, idle: float,
          timeout: float | None) -> str | None:
    now = time.monotonic()
    if timeout is not None and now - start >= timeout:
        return "timeout"
    if checker.log.acked and checker.all_found and now - last >= SETTLE_SECONDS:
        return "all found"
    return "idle" if now - last >= idle else None


def _consumer(bootstrap: str, topics: list[str]) -> Consumer:
    """A consumer assigned every partition of `topics` from the start; UnknownTopic names a
    missing one."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "mqtt-kafka-bridge-verify",
                         "enable.auto.commit": False, "enable.partition.eof": False,
                         "queued.max.messages.kbytes": PREFETCH_KIB,
                         "fetch.max.bytes": FETCH_BYTES}, logger=QUIET)
    try:
        partitions = []
        for topic in topics:
            info = consumer.list_topics(topic, timeout=CONNECT_SECONDS).topics[topic]
            if info.error is not None:
                _refuse(consumer, topic, info.error)
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions]
        consumer.assign(partitions)
    except BaseException:
        consumer.close()
        raise
    return consumer


def _refuse(consumer: Consumer, topic: str, error: KafkaError) -> None:
    if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
        known = consumer.list_topics(timeout=CONNECT_SECONDS).topics
        raise UnknownTopic(error, sorted(t for t in known if not t.startswith("__")), topic)
    raise KafkaException(error)


def _record(record: KafkaRecord) -> Record:
    """A consumed record as the checker takes it; a value that is no envelope is None."""
    error = record.error()
    if error is not None:
        raise KafkaException(error)
    kind, stamp = record.timestamp()
    try:
        decoded: dict[str, Any] | None = envelope.decode(record.value() or b"")
    except ValueError:
        decoded = None
    return Record(record.topic() or "", record.partition() or 0, record.offset() or 0,
                  None if kind == TIMESTAMP_NOT_AVAILABLE else stamp, decoded)


class S3Objects:
    """What `reference` envelopes point at, read with boto3 (credentials from its usual
    chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)."""

    def __init__(self, endpoint_url: str | None) -> None:
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=botocore.config.Config(
                connect_timeout=CONNECT_SECONDS, read_timeout=60,
                retries={"mode": "standard", "max_attempts": 2}))
        self._probe()

    def _probe(self) -> None:
        """Reach S3 once before Kafka is read: no endpoint or no credentials is said at
        once. A refusal (ListBuckets may be denied) proves it answers, and is enough."""
        with contextlib.suppress(botocore.exceptions.ClientError):
            self.client.list_buckets()

    def _get(self, reference: str) -> Any:
        bucket, _, key = reference.removeprefix("s3://").partition("/")
        try:
            return self.client.get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise

    def payload(self, reference: str, limit: int) -> bytes | None:
        got = self._get(reference)
        if got is None:
            return None
        body = got["Body"]
        try:
            data: bytes = body.read(limit + 1)
        finally:
            body.close()
        return data if len(data) <= limit else None

    def digest(self, reference: str) -> tuple[int, str] | None:
        """Size and SHA-256 of the object, read in 1 MiB pieces (files may be large)."""
        got = self._get(reference)
        if got is None:
            return None
        sha, size, body = hashlib.sha256(), 0, got["Body"]
        try:
            for chunk in body.iter_chunks(1 << 20):
                sha.update(chunk)
                size += len(chunk)
        finally:
            body.close()
        return size, sha.hexdigest()


def render(report: Report) -> str:
    """The short plain-text table a terminal gets: a row per topic, then the totals."""
    head = f"{'topic':<24} {'records':>8} {'matched':>8} {'extra':>6} {'unexp':>6} " \
           f"{'foreign':>7} {'dead':>6}  {'Kafka ms p50/p99/max':<26} bridge ms p50/p99/max"
    rows = [head]
    for name, topic in report.topics.items():
        latency = topic.latency()
        rows.append(f"{name:<24} {topic.records:>8} {topic.matched:>8} {topic.extra_copies:>6} "
                    f"{topic.unexpected:>6} {topic.foreign:>7} {topic.dead_lettered:>6}  "
                    f"{_ms(latency['kafka']):<26} {_ms(latency['arrival'])}")
    return "\n".join(rows + _totals(report))


def _ms(latency: Latency) -> str:
    if latency.count == 0:
        return "-"
    return " / ".join(f"{v:.1f}" for v in (latency.p50, latency.p99, latency.max) if v is not None)


def _totals(report: Report) -> list[str]:
    r = report
    dead = ", ".join(f"{code} {n}" for code, n in sorted(r.dead_lettered.items()))
    lines = [
        f"acked {r.acked} ({r.files_acked} files): found {r.found}" +
        (f" (dead-lettered: {dead})" if dead else "") + f", lost {r.lost}",
        f"duplicates {r.duplicates} ({r.extra_copies} extra copies), unexpected "
        f"{r.unexpected}, foreign {r.foreign}",
        f"refused {r.refused} ({r.refused_arrived} arrived), unknown {r.unknown} "
        f"({r.unknown_arrived} arrived), QoS 0 sent {r.qos0_sent} ({r.qos0_arrived} arrived)",
        f"runs: {', '.join(r.runs)}; stopped: {r.stopped}"]
    lines += [f"unexpected: {u['topic']} [{u['partition']}] @{u['offset']}: {u['why']}"
              for u in r.unexpected_first]
    if r.unread_references:
        lines.append(f"{r.unread_references} records hold their payload in S3: pass "
                     "--s3-endpoint URL or --follow-references to read them")
    if not r.ok and r.stopped != "all found":
        lines.append(f"stopped on {r.stopped} before every acked publish was found: on a slow "
                     "cluster, a larger --idle (or --timeout) waits longer")
    if r.ok:
        lines.append("lost 0: OK, every acked publish is in Kafka")
    else:
        first = ", ".join(_named(lost) for lost in r.lost_first)
        more = ", ..." if r.lost > len(r.lost_first) else ""
        lines.append(f"lost {r.lost}: LOST (first: {first}{more})")
    return lines


def _named(lost: dict[str, Any]) -> str:
    if "file_id" in lost:
        return f"{lost['device_id']} file {lost['file_id']}"
    return f"{lost['device_id']} seq {lost['seq']}"
