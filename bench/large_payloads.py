"""Memory under large payloads: many single messages far past 16 MiB, sent at once.

`--devices` devices each publish `--count` QoS 1 messages of `--mib` MiB (up to MQTT's
256 MiB packet limit) while the bridge is stopped, so they wait in its session; then the
bridge starts and drains them by reference into S3, its RSS sampled every 20 ms. The figure
to read is peak RSS beside what the bridge was sent and beside its bound: one packet being
read per session, plus per lane `[s3].max_pending_bytes` of payloads in jobs (a larger
single payload runs alone). Prints figures; it is not a pass/fail test.

    .venv/bin/python bench/large_payloads.py [--devices 4] [--count 4] [--mib 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.large_files import rss_mib
from bridge.devkit import simulate
from bridge.devkit.localstack import LocalStack, s3_environment
from bridge.devkit.tail import records

ROOT = Path(__file__).resolve().parent.parent


def config(stack: LocalStack, path: Path, pending_mib: int) -> Path:
    path.write_text(f"""
[bridge]
instance = "bench-large"
log_format = "json"
stats_interval = 1
[[brokers]]
url = "{stack.mqtt_url}"
client_id = "bench-large"
[kafka]
"bootstrap.servers" = "{stack.bootstrap}"
[s3]
endpoint_url = "{stack.s3_endpoint}"
bucket = "bench-large"
max_pending_bytes = {pending_mib * 2**20}
[dead_letter]
kafka_topic = "large.deadletter"
[[routes]]
filter = "large/{{device_id}}/blob"
kafka_topic = "large.refs"
""")
    return path


def start_bridge(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bridge", "run", "--config",
                             str(config_path)], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **s3_environment()})


def acked(log: Path) -> int:
    """Messages the bridge has acked, from its last bridge_stats line (once a second)."""
    for line in reversed(log.read_text().splitlines()):
        if '"bridge_stats"' in line:
            return int(json.loads(line).get("mqtt_acks_sent", 0))
    return 0


def publish(url: str, device: str, count: int, size: int) -> None:
    client = simulate.device_client(url, f"bench-{device}")
    try:
        simulate.publish_all(client, [(f"large/{device}/blob", bytes([i]) * size)
                                      for i in range(count)], qos=1)
    finally:
        client.disconnect()
        client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--count", type=int, default=4, help="messages per device")
    parser.add_argument("--mib", type=int, default=40, help="MiB per message")
    parser.add_argument("--pending-mib", type=int, default=128, help="[s3].max_pending_bytes")
    args = parser.parse_args()
    total = args.devices * args.count
    with tempfile.TemporaryDirectory() as work, LocalStack(Path(work)) as stack:
        stack.create_topics(["large.refs", "large.deadletter"])
        stack.create_bucket("bench-large")
        conf, log = config(stack, Path(work) / "bridge.toml", args.pending_mib), \
            Path(work) / "bridge.log"
        bridge = start_bridge(conf, log)  # once, so its session exists and is subscribed
        time.sleep(3)
        idle = rss_mib(bridge.pid)
        bridge.terminate()
        bridge.wait(30)
        threads = [threading.Thread(target=publish, args=(stack.mqtt_url, f"d{i}", args.count,
                                                          args.mib << 20))
                   for i in range(args.devices)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started = time.monotonic()
        bridge = start_bridge(conf, log)
        peak = idle
        try:
            while acked(log) < total and time.monotonic() - started < 600:
                peak = max(peak, rss_mib(bridge.pid))
                time.sleep(0.02)
            seconds = time.monotonic() - started
        finally:
            bridge.terminate()
            bridge.wait(60)
        found = sum(1 for _ in records(stack.bootstrap, "large.refs", idle=5))
        retries = log.read_text().count('"s3_put_failed"')
        if found < total or retries:
            print(f"{retries} S3 PUTs failed and were retried; the log ends:")
            print("".join(line for line in log.read_text().splitlines(keepends=True)[-40:]
                          if "bridge_stats" not in line)[-3000:])
    sent = total * args.mib
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, moto S3, Tansu with S3 storage")
    print(f"{total} messages of {args.mib} MiB ({sent} MiB) from {args.devices} devices, "
          f"drained by reference in {seconds:.1f} s; {found} references in Kafka")
    bound = idle + 2 * args.mib + max(args.pending_mib, args.mib)
    print(f"bridge RSS: {idle:.0f} MiB idle, peak {peak:.0f} MiB, {peak - idle:.0f} MiB for "
          f"payloads ({(peak - idle) / sent:.2f} of what was sent)")
    print(f"the bound, about {bound:.0f} MiB: idle + per session two packets (one being read, "
          f"one waiting for a job slot) + per lane max_pending_bytes ({args.pending_mib} MiB) "
          f"or one payload if larger; peak / bound {peak / bound:.2f}")


if __name__ == "__main__":
    main()
