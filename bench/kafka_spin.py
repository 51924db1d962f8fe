"""Why librdkafka's broker threads burn CPU while Kafka is slow to answer (issue 10, scale-out
anomaly b), shown on the bridge's own producer settings.

A producer with the bridge's lane settings (acks=all, idempotence; linger.ms 0, 2 and 5) keeps
producing at a steady rate while Tansu is paused (SIGSTOP) for `--pause` seconds: no
ProduceResponse can come back. Its threads' CPU is sampled from /proc before, during and after
the pause. An idempotent librdkafka producer keeps at most one ProduceRequest in flight per
partition (it compares its in-flight *message* count with the 5-request limit), and once a
partition's queued batch is past linger.ms it asks to be woken at once, finds it may not
send, and loops: the broker thread spins at a full core for as long as the answer takes.
The same run without idempotence is the control. Not a pass/fail test.

    python bench/kafka_spin.py [--pause 2] [--rate 5000] [--linger 0,2,5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer

from bench.common import exit_on_sigterm, stack, thread_cpu
from bridge.config import producer_config
from bridge.kafka import QUIET


def trial(bootstrap: str, kafka: Any, topic: str, properties: dict[str, Any],
          pause: float, rate: float) -> dict[str, Any]:
    """Produce at `rate` for 1 s, pause Tansu for `pause` s, resume for 1 s: CPU seconds of
    librdkafka's broker threads in each phase, and how many reports came back in each."""
    producer = Producer({**properties, "logger": QUIET})
    reports = [0]
    stop = threading.Event()

    def produce() -> None:
        start, sent = time.monotonic(), 0
        while not stop.is_set():
            try:
                producer.produce(topic, b"x" * 300, on_delivery=lambda *_: reports.__setitem__(
                    0, reports[0] + 1))
                sent += 1
            except BufferError:
                pass
            producer.poll(0)
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)

    producer.list_topics(timeout=10)
    worker = threading.Thread(target=produce)
    worker.start()
    phases: dict[str, Any] = {}
    try:
        for phase, seconds in (("before", 1.0), ("paused", pause), ("after", 1.0)):
            cpu0, done0 = _broker_cpu(), reports[0]
            if phase == "paused":
                kafka.pause()
            time.sleep(seconds)
            if phase == "paused":
                kafka.resume()
            phases[phase] = {"seconds": seconds, "broker_cpu_s": round(_broker_cpu() - cpu0, 2),
                             "delivered": reports[0] - done0}
    finally:
        stop.set()
        worker.join()
        producer.flush(30)
    return phases


def _broker_cpu() -> float:
    """CPU seconds of this process's librdkafka broker threads (rdk:broker*)."""
    return sum(s for name, s in thread_cpu(os.getpid()).items() if name.startswith("rdk:broker"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--linger", default="0,2,5", help="linger.ms values to try")
    args = parser.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as work, stack(Path(work)) as local:
        for linger in args.linger.split(","):
            for idempotent in (True, False):
                topic = f"spin.{linger}.{idempotent}"
                local.create_topics([topic])
                props = producer_config({"bootstrap.servers": local.bootstrap},
                                        {"linger.ms": linger}, "bulk")
                if not idempotent:
                    props["enable.idempotence"] = False
                out[f"linger.ms {linger}, idempotence {idempotent}"] = \
                    trial(local.bootstrap, local.kafka, topic, props, args.pause, args.rate)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
