"""Does Tansu drop the copy when an idempotent producer retries a ProduceRequest? (issue 10,
memory anomaly a: where could duplicates on a clean drain come from?)

An idempotent producer (the bridge's bulk-lane settings) sends numbered records; Tansu is
paused (SIGSTOP) for longer than `request.timeout.ms`, so librdkafka times the in-flight
requests out and sends them again with the same producer id and sequence numbers, then
Tansu resumes and reads both. Kafka would write each batch once; every number found twice
is a copy the broker kept. Reported with how many in-flight requests librdkafka timed out
(its REQTMOUT log lines). Not a pass/fail test.

    python bench/tansu_idempotence.py [--records 20000] [--pause 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from bench.common import exit_on_sigterm, stack
from bridge.config import producer_config
from bridge.kafka import QUIET


def trial(local: Any, topic: str, records: int, pause: float, idempotent: bool
          ) -> dict[str, Any]:
    props = producer_config({"bootstrap.servers": local.bootstrap,
                             "request.timeout.ms": 1000, "socket.timeout.ms": 1000}, {},
                            "bulk")
    props["enable.idempotence"] = idempotent
    timeouts = TimeoutCount()
    logger = logging.getLogger(f"idem.{idempotent}")
    logger.addHandler(timeouts)
    logger.propagate = False
    producer = Producer({**props, "logger": logger})
    failed = [0]

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            failed[0] += 1

    for i in range(records):
        if i == records // 2:  # half sent: pause Tansu past the request timeout
            threading.Timer(0.05, local.kafka.pause).start()
            threading.Timer(0.05 + pause, local.kafka.resume).start()
        while True:
            try:
                producer.produce(topic, str(i).encode(), on_delivery=report)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
        time.sleep(0.0002)
    producer.flush(60)
    producer.poll(1)
    counts = Counter(_read(local.bootstrap, topic))
    return {"idempotent": idempotent, "sent": records, "delivery_errors": failed[0],
            "requests_timed_out": timeouts.count, "distinct_in_kafka": len(counts),
            "extra_copies": sum(c - 1 for c in counts.values())}


class TimeoutCount(logging.Handler):
    """Sums librdkafka's "Timed out N in-flight" (REQTMOUT) lines: requests it gave up
    waiting for, whose records it sends again once reconnected."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"Timed out (\d+) in-flight", record.getMessage())
        if found:
            self.count += int(found.group(1))


def _read(bootstrap: str, topic: str) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "idem"}, logger=QUIET)
    values: list[bytes] = []
    try:
        info = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
        last = time.monotonic()
        while time.monotonic() - last < 3:
            for message in consumer.consume(10000, 0.5):
                if not message.error():
                    values.append(message.value())
                    last = time.monotonic()
    finally:
        consumer.close()
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--pause", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, stack(Path(work)) as local:
        for idempotent in (True, False):
            topic = f"idem.{idempotent}"
            local.create_topics([topic])
            print(json.dumps(trial(local, topic, args.records, args.pause, idempotent)))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
