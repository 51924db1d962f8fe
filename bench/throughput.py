"""Throughput: 100,000 QoS 1 messages of 200 B preloaded into a session, drained two ways.

1. `mosquitto_sub` drains its own preloaded session (the broker's delivery speed, no Kafka);
2. the bridge drains its preloaded session into Kafka, acking each message after Kafka has it;
3. with `--kafka-ceiling`, a tight confluent-kafka produce loop writes as many records of the
   envelope's size to the same broker with the same producer settings (the Kafka ceiling).

Rates are end to end and in steady state (10-90% of the drain, so start-up and the tail do
not count), each beside the MQTT ceiling's.

Both run in the same process tree on the same local stack, one after the other, so the ratio
is what to read on a shared, noisy machine. Prints figures; it is not a pass/fail test.

    .venv/bin/python bench/throughput.py [--messages 100000] [--size 200] [--storage memory|s3]
        [--kafka-ceiling]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import config as config_module
from bridge import logs
from bridge.daemon import Daemon
from bridge.devkit import simulate
from bridge.devkit.localstack import LocalStack, kafka_service
from bridge.devkit.tail import records

TOPIC_FILTER = "bench/+/telemetry"


def open_session(url: str, client_id: str) -> None:
    """Create a persistent session subscribed at QoS 1, then leave it offline."""
    client = simulate.device_client(url, client_id)
    client.disconnect()
    client.loop_stop()
    client = paho.Client(simulate.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    props = paho.Properties(paho.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", int(url.rsplit(":", 1)[1]), clean_start=False, properties=props)
    client.loop_start()
    client.subscribe(TOPIC_FILTER, qos=1)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()


def preload(url: str, messages: int, size: int) -> float:
    result = simulate.telemetry(url, devices=100, messages=messages // 100, qos=1, size=size,
                                prefix="bench", connections=4)
    return result.rate


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """msg/s between 10% and 90% of `total` done, from (time, done) samples."""
    low = next(t for t, n in samples if n >= total * 0.1)
    high = next(t for t, n in samples if n >= total * 0.9)
    return total * 0.8 / max(high - low, 1e-9)


def drain_with_mosquitto_sub(port: int, client_id: str, messages: int) -> tuple[float, float]:
    """Seconds end to end and the steady rate: its output lines are counted as they come."""
    start = time.monotonic()
    proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "5",
                             "-c", "-x", "3600", "-i", client_id, "-q", "1", "-t",
                             TOPIC_FILTER, "-C", str(messages)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    samples, lines = [(start, 0)], 0
    while chunk := proc.stdout.read1(1 << 20):
        lines += chunk.count(b"\n")
        samples.append((time.monotonic(), lines))
    if proc.wait(600):
        raise subprocess.CalledProcessError(proc.returncode, "mosquitto_sub")
    return time.monotonic() - start, steady_rate(samples, messages)


def kafka_ceiling(bootstrap: str, properties: dict[str, object], messages: int,
                  value_size: int) -> float:
    """msg/s of a tight produce loop (the same records' size, topic and producer settings),
    from the first produce to the last delivery report."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, **properties})
    producer.list_topics(timeout=10)
    time.sleep(1)  # past librdkafka's PID timer: the loop measures producing, not start-up
    value, key, done = os.urandom(value_size), b"1700000000000", [0]

    def report(err: object, _msg: object) -> None:
        done[0] += 1

    start = time.monotonic()
    for _ in range(messages):
        while True:
            try:
                producer.produce("bench.ceiling", value, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.001)
        producer.poll(0)
    producer.flush(60)
    assert done[0] == messages
    return messages / (time.monotonic() - start)


def bridge_config(stack: LocalStack, client_id: str, receive_max: int,
                  kafka: dict[str, str]) -> config_module.Config:
    return config_module.parse({
        "bridge": {"instance": "bench", "log_format": "json", "stats_interval": 3600},
        "brokers": [{"url": stack.mqtt_url, "client_id": client_id, "receive_max": receive_max}],
        "kafka": {"bootstrap.servers": stack.bootstrap, **kafka},
        "dead_letter": {"kafka_topic": "bench.deadletter"},
        "routes": [{"filter": "bench/{device_id}/telemetry", "kafka_topic": "bench.telemetry"}],
    }, source=b"bench")


async def drain_with_bridge(config: config_module.Config,
                            messages: int) -> tuple[float, float, float, Daemon]:
    """Seconds end to end, the steady rate, and seconds from start to the first ack."""
    daemon = Daemon(config)
    running = asyncio.create_task(daemon.run())
    start = time.monotonic()
    samples, acked = [(start, 0)], 0
    while acked < messages:
        if running.done():
            running.result()
        await asyncio.sleep(0.005)
        acked = daemon_metric(daemon, "mqtt_acks_sent")
        samples.append((time.monotonic(), acked))
    elapsed = time.monotonic() - start
    first = next(t for t, n in samples if n > 0) - start
    daemon.stop()
    await running
    return elapsed, steady_rate(samples, messages), first, daemon


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> Counter[str]:
    """CPU seconds per thread name of this process (librdkafka's threads are named rdk:...)."""
    out: Counter[str] = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def envelope_bytes(envelope: dict[str, object]) -> bytes:
    """The record value an envelope was read from, packed again (its size is what counts)."""
    import msgpack

    packed: bytes = msgpack.packb(envelope)
    return packed


def daemon_metric(daemon: Daemon, name: str) -> int:
    metrics = getattr(daemon, "metrics", None)
    return int(metrics.value(name)) if metrics else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--storage", choices=("memory", "s3"), default="memory")
    parser.add_argument("--receive-max", type=int, default=1000)
    parser.add_argument("--kafka", action="append", default=[], metavar="PROP=VALUE",
                        help="extra librdkafka producer property, e.g. linger.ms=1")
    parser.add_argument("--kafka-ceiling", action="store_true",
                        help="also time a tight confluent-kafka produce loop (Kafka ceiling)")
    args = parser.parse_args()
    logs.configure("json", level=30)
    with tempfile.TemporaryDirectory() as work, LocalStack(Path(work)) as stack:
        if args.storage == "memory":  # swap the S3-backed Tansu for the in-memory one
            stack.kafka.stop()
            stack.kafka = kafka_service(Path(work), port=stack.kafka.port)
            stack.kafka.start()
        stack.create_topics(["bench.telemetry", "bench.deadletter", "bench.ceiling"])
        port = int(stack.mqtt_url.rsplit(":", 1)[1])

        open_session(stack.mqtt_url, "bench-sub")
        open_session(stack.mqtt_url, "bench-bridge")
        publish_rate = preload(stack.mqtt_url, args.messages, args.size)
        sub_seconds, sub_steady = drain_with_mosquitto_sub(port, "bench-sub", args.messages)

        kafka = dict(p.split("=", 1) for p in args.kafka)
        config = bridge_config(stack, "bench-bridge", args.receive_max, kafka)
        servers = {"tansu": stack.kafka.pid, "mosquitto": stack.mqtt.pid}
        before = {name: cpu_seconds(pid) for name, pid in servers.items()}
        own_before, threads_before = time.process_time(), thread_cpu()
        bridge_seconds, bridge_steady, first_ack, daemon = asyncio.run(
            drain_with_bridge(config, args.messages))
        own_cpu = time.process_time() - own_before
        threads = thread_cpu()
        threads.subtract(threads_before)
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in servers.items()}
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        in_kafka, value_size = 0, 0
        for _key, envelope in records(stack.bootstrap, "bench.telemetry", idle=3):
            in_kafka += 1
            value_size = value_size or len(envelope_bytes(envelope))
        ceiling = kafka_ceiling(stack.bootstrap, config.producer_config("bulk"), args.messages,
                                value_size) if args.kafka_ceiling else None

    n = args.messages
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, Kafka: Tansu ({args.storage} storage), "
          f"receive_max {args.receive_max}, producer {kafka or 'defaults'}")
    print(f"preload: {n} QoS 1 messages of {args.size} B at {publish_rate:,.0f} msg/s")
    print(f"mosquitto_sub drain:      {n / sub_seconds:>10,.0f} msg/s  ({sub_seconds:.2f} s)")
    print(f"bridge drain into Kafka:  {n / bridge_seconds:>10,.0f} msg/s  ({bridge_seconds:.2f} s,"
          f" acked after Kafka acks=all)")
    print(f"ratio bridge / mosquitto_sub: {sub_seconds / bridge_seconds:.2f}")
    print(f"steady state (10-90%): bridge {bridge_steady:,.0f} msg/s, mosquitto_sub "
          f"{sub_steady:,.0f} msg/s, ratio {bridge_steady / sub_steady:.2f}; first ack "
          f"{first_ack:.3f} s after start")
    if ceiling is not None:
        mb = value_size * n / bridge_seconds / 1e6
        print(f"Kafka ceiling (tight produce loop, {value_size} B records): {ceiling:,.0f} "
              f"msg/s; bridge {mb:.0f} MB/s; ratio bridge / ceiling "
              f"{n / bridge_seconds / ceiling:.2f}")
    print(f"CPU during the bridge drain: bridge {own_cpu:.2f} s ({own_cpu / n * 1e6:.1f} us/msg), "
          + ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items())
          + f"; wall {bridge_seconds:.2f} s on {os.cpu_count()} cores")
    print("bridge CPU by thread: " + ", ".join(
        f"{name} {cpu:.2f} s" for name, cpu in threads.most_common(4) if cpu > 0))
    print(f"records in Kafka: {in_kafka} (duplicates {in_kafka - n}); "
          f"bench process peak RSS {rss_mib:.0f} MiB; counters {daemon.metrics.snapshot()}")


if __name__ == "__main__":
    main()
