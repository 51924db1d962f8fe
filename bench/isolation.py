"""Isolation: how much one device flooding its lane costs another device's latency.

A canary device publishes QoS 1 telemetry (bulk lane) and alerts (fast lane) at a steady
rate. First alone; then while a second device floods the bulk lane with `--flood` messages
as fast as the broker takes them. Latency is the canary's publish time (in its payload) to
the record's Kafka timestamp (set when the bridge produced it). Prints p50 / p99 / max per
lane and phase, measured in one run on one stack; it is not a pass/fail test.

    .venv/bin/python bench/isolation.py [--flood 20000] [--rate 20] [--seconds 10]
                                        [--storage s3|memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bridge import envelope
from bridge.devkit import simulate
from bridge.devkit.localstack import LocalStack, kafka_service, s3_environment

ROOT = Path(__file__).resolve().parent.parent


def config(stack: LocalStack, path: Path) -> Path:
    path.write_text(f"""
[bridge]
instance = "bench-isolation"
log_format = "json"
[[brokers]]
url = "{stack.mqtt_url}"
client_id = "bench-isolation"
[kafka]
"bootstrap.servers" = "{stack.bootstrap}"
[dead_letter]
kafka_topic = "iso.deadletter"
[[routes]]
filter = "iso/{{device_id}}/telemetry"
kafka_topic = "iso.bulk"
[[routes]]
filter = "iso/{{device_id}}/alerts"
kafka_topic = "iso.fast"
lane = "fast"
""")
    return path


def canary(url: str, rate: float, seconds: float, phase: str) -> None:
    """QoS 1 telemetry and alerts from device `canary`, each stamped with its send time."""
    client = simulate.device_client(url, f"canary-{phase}")
    try:
        end, seq = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            for kind in ("telemetry", "alerts"):
                body = json.dumps({"phase": phase, "seq": seq, "sent_ns": time.time_ns()})
                client.publish(f"iso/canary/{kind}", body.encode(), qos=1)
            seq += 1
            time.sleep(1 / rate)
    finally:
        client.disconnect()
        client.loop_stop()


def latencies(bootstrap: str, topic: str) -> dict[str, list[float]]:
    """Canary latency in seconds per phase, from the records' Kafka timestamps."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-isolation",
                         "enable.auto.commit": False})
    info = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
    out: dict[str, list[float]] = {}
    idle = time.monotonic()
    while time.monotonic() - idle < 3:
        for record in consumer.consume(1000, 0.5):
            idle = time.monotonic()
            body = json.loads(envelope.decode(record.value())["body"])
            if "phase" in body:
                _, millis = record.timestamp()
                out.setdefault(body["phase"], []).append(millis / 1000 - body["sent_ns"] / 1e9)
    consumer.close()
    return out


def summary(values: list[float]) -> str:
    if not values:
        return "no records"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"p50 {statistics.median(ordered) * 1000:7.0f} ms  p99 {p99 * 1000:7.0f} ms  "
            f"max {ordered[-1] * 1000:7.0f} ms  (n={len(ordered)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0, help="canary messages/s per lane")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--storage", choices=("memory", "s3"), default="s3",
                        help="Tansu's storage: s3 (the tests' stack; slower acks) or memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, LocalStack(Path(work)) as stack:
        if args.storage == "memory":
            stack.kafka.stop()
            stack.kafka = kafka_service(Path(work), port=stack.kafka.port)
            stack.kafka.start()
        stack.create_topics(["iso.bulk", "iso.fast", "iso.deadletter"])
        log = (Path(work) / "bridge.log").open("wb")
        bridge = subprocess.Popen([sys.executable, "-m", "bridge", "run", "--config",
                                   str(config(stack, Path(work) / "bridge.toml"))],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, **s3_environment()})
        try:
            time.sleep(3)
            canary(stack.mqtt_url, args.rate, args.seconds, "alone")
            flood = threading.Thread(target=simulate.telemetry, kwargs={
                "url": stack.mqtt_url, "devices": 1, "messages": args.flood, "prefix": "iso"})
            flood.start()
            canary(stack.mqtt_url, args.rate, args.seconds, "flood")
            flood.join()
            time.sleep(3)
            bulk = latencies(stack.bootstrap, "iso.bulk")
            fast = latencies(stack.bootstrap, "iso.fast")
        finally:
            bridge.terminate()
            bridge.wait(60)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, Tansu with {args.storage} storage; flood "
          f"{args.flood} QoS 1 messages from one device on the bulk lane; canary "
          f"{args.rate:g} msg/s per lane")
    for lane, found in (("bulk (same lane as the flood)", bulk), ("fast (its own lane)", fast)):
        for phase in ("alone", "flood"):
            print(f"  {lane:32} {phase:6} {summary(found.get(phase, []))}")


if __name__ == "__main__":
    main()
