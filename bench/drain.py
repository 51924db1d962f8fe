"""Throughput beside both ceilings: a preloaded QoS 1 backlog drained three ways, per run.

One publish fills two offline persistent sessions, so each run drains the same queue:
1. `mosquitto_sub` drains one (the MQTT ceiling: the broker's delivery speed, no Kafka);
2. the bridge drains the other into Kafka, acking each message once Kafka has it
   (`bench.throughput.drain_with_bridge`, the hot path's own harness, in this process);
3. a tight confluent-kafka loop produces the same records (key, value, headers copied from
   what the bridge wrote) with the bridge's bulk-lane producer settings to the same Tansu
   (the Kafka ceiling).
End to end is start to last ack; steady state is 10-90% of the drain (mosquitto_sub: its
output file's growth; the bridge: its records' Kafka timestamps; the loop: its delivery
reports). Not a pass/fail test.

    python bench/drain.py [--messages 100000] [--size 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.common import (
    cell,
    exit_on_sigterm,
    open_session,
    preload,
    progress,
    read_records,
    stack,
    steady_rate,
    summary,
)
from bench.throughput import drain_with_bridge
from bridge import config as config_module
from bridge import logs
from bridge.devkit.localstack import LocalStack
from bridge.kafka import QUIET


def sub_drain(port: int, client_id: str, topic_filter: str, messages: int, size: int,
              out: Path) -> dict[str, float]:
    """mosquitto_sub drains its session into a file; the file's growth (each payload and a
    newline) is its progress curve."""
    samples: list[tuple[float, float]] = []
    argv = ["mosquitto_sub", "-p", str(port), "-V", "5", "-c", "-x", "3600", "-i", client_id,
            "-q", "1", "-t", topic_filter, "-C", str(messages)]
    start = time.monotonic()
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink)
        while proc.poll() is None:
            samples.append((time.monotonic(), out.stat().st_size / (size + 1)))
            time.sleep(0.002)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mosquitto_sub exited with {proc.returncode}")
    samples.append((start + seconds, messages))
    return {"end_to_end": messages / seconds, "steady": steady_rate(samples, messages)}


def bridge_config(local: LocalStack, client_id: str, prefix: str,
                  topic: str) -> config_module.Config:
    return config_module.parse({
        "bridge": {"instance": client_id, "log_format": "json", "stats_interval": 3600},
        "brokers": [{"url": local.mqtt_url, "client_id": client_id, "receive_max": 1000}],
        "kafka": {"bootstrap.servers": local.bootstrap},
        "dead_letter": {"kafka_topic": "bench.deadletter"},
        "routes": [{"filter": f"{prefix}/{{device_id}}/telemetry", "kafka_topic": topic}],
    }, source=b"bench")


def kafka_ceiling(properties: dict[str, Any], topic: str, record: tuple[Any, ...],
                  messages: int) -> dict[str, float]:
    """Produce `messages` copies of one record as fast as librdkafka takes them; timed from
    the producer's creation (as the bridge's end to end includes its producers') to the
    last delivery report."""
    key, value, headers = record
    reports: list[tuple[float, float]] = []
    done = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is None:
            done[0] += 1
            if done[0] % 100 == 0:
                reports.append((time.monotonic(), done[0]))

    start = time.monotonic()
    producer = Producer({**properties, "logger": QUIET})
    for _ in range(messages):
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.001)
        producer.poll(0)
    producer.flush(120)
    seconds = time.monotonic() - start
    return {"end_to_end": done[0] / seconds, "steady": steady_rate(reports, messages),
            "delivered": done[0]}


def sample_record(bootstrap: str, topic: str) -> tuple[Any, ...]:
    """One record the bridge wrote (key, value, headers): the ceiling's template."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-sample"},
                        logger=QUIET)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        while True:
            message = consumer.poll(5)
            if message is not None and not message.error():
                return message.key(), message.value(), message.headers()
    finally:
        consumer.close()


def one_run(local: LocalStack, work: Path, size: int, messages: int, run: int) -> dict[str, Any]:
    """Preload once into both sessions; drain with mosquitto_sub, the bridge, the loop."""
    prefix, topic = f"d{size}r{run}", f"drain.s{size}.r{run}"
    local.create_topics([topic, f"{topic}.ceiling", "bench.deadletter"])
    port = local.mqtt.port
    open_session(port, f"{prefix}-sub", f"{prefix}/+/telemetry")
    open_session(port, f"{prefix}-bridge", f"{prefix}/+/telemetry")
    preload(port, prefix, 4, messages // 4, size, prefix, work)
    n = messages // 4 * 4
    sub = sub_drain(port, f"{prefix}-sub", f"{prefix}/+/telemetry", n, size,
                    work / "sub.out")
    config = bridge_config(local, f"{prefix}-bridge", prefix, topic)
    # (seconds, daemon), or on the hot path's branch (seconds, steady, first ack, daemon)
    drained = asyncio.run(drain_with_bridge(config, n))
    records = read_records(local.bootstrap, topic, expected=n)
    bridge = {"end_to_end": n / drained[0], "steady": steady_rate(progress(records), n),
              "records": len(records)}
    if len(drained) == 4:
        bridge.update(steady_by_acks=drained[1], first_ack_s=drained[2])
    kafka = kafka_ceiling(config.producer_config("bulk"), f"{topic}.ceiling",
                          sample_record(local.bootstrap, topic), n)
    return {"messages": n, "mosquitto_sub": sub, "bridge": bridge, "kafka_loop": kafka}


def measure(work: Path, sizes: list[int], messages: int, runs: int) -> dict[str, Any]:
    """Every size, `runs` times, sizes interleaved so that noise spreads over both."""
    logs.configure("json", level=30)  # the in-process bridge's info lines are not figures
    raw: dict[int, list[dict[str, Any]]] = {s: [] for s in sizes}
    with stack(work) as local:
        for run in range(runs):
            for size in sizes:
                raw[size].append(one_run(local, work, size, messages, run))
    return {str(size): aggregate(runs_, size) for size, runs_ in raw.items()}


def aggregate(runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Per side and phase: msg/s and MB/s (payload bytes) as median/min/max, plus the
    bridge's ratio to each ceiling, computed per run (same-run ratios), then summarised."""
    out: dict[str, Any] = {"size": size, "messages": runs[0]["messages"], "runs": runs}
    for side in ("mosquitto_sub", "bridge", "kafka_loop"):
        for phase in ("end_to_end", "steady"):
            rates = [r[side][phase] for r in runs]
            out[f"{side}.{phase}.msg_s"] = summary(rates)
            out[f"{side}.{phase}.mb_s"] = summary([x * size / 1e6 for x in rates])
    for ceiling in ("mosquitto_sub", "kafka_loop"):
        for phase in ("end_to_end", "steady"):
            out[f"ratio.{ceiling}.{phase}"] = summary(
                [r["bridge"][phase] / r[ceiling][phase] for r in runs])
    out["bridge.duplicates"] = [r["bridge"]["records"] - r["messages"] for r in runs]
    return out


def bench(work: Path, quick: bool, runs: int) -> dict[str, Any]:
    """For the suite: 100k messages of 200 B and of 4 KB (10k with --quick)."""
    return measure(work, [200, 4096], 10_000 if quick else 100_000, runs)


SIDES = {"bridge": "bridge", "mosquitto_sub": "mosquitto_sub (MQTT ceiling)",
         "kafka_loop": "confluent-kafka loop (Kafka ceiling)"}
PHASES = {"end_to_end": "end to end", "steady": "steady 10-90%"}


def rows(result: dict[str, Any]) -> list[list[str]]:
    """Per size and phase: each side's msg/s (MB/s beside it), the bridge with its two
    same-run ratios."""
    out = []
    for size, fig in result.items():
        if not size.isdigit():
            continue
        label = f"{int(size):,} B" if int(size) < 1024 else f"{int(size) // 1024} KB"
        for phase, phase_label in PHASES.items():
            for side, side_label in SIDES.items():
                note = f"{cell(fig[f'{side}.{phase}.mb_s'], '{:.1f}')} MB/s"
                if side == "bridge":
                    note += "; " + ", ".join(
                        f"{cell(fig[f'ratio.{c}.{phase}'], '{:.2f}')}x {c}"
                        for c in ("mosquitto_sub", "kafka_loop"))
                out.append(["throughput", f"{label} {side_label}, {phase_label} (msg/s)",
                            cell(fig[f"{side}.{phase}.msg_s"]), note])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, action="append")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = measure(Path(work), args.size or [200, 4096], args.messages, args.runs)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
