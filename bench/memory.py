"""Memory: the bridge's RSS while it drains a 1,000,000-message backlog, and during a herd.

The bridge runs as its own process (`python -m bridge run`), so VmRSS/VmHWM are its alone,
sampled every 50 ms. The backlog (QoS 1, 200 B, payloads with device_id/seq/run) waits in
the bridge's offline session; the drain's progress comes from the records' Kafka timestamps,
so RSS is read at 10/50/90% of the drain (flat means the bridge holds a window, not the
backlog). Every record is read back and its (run, device_id, seq) counted: duplicates are
classified by what their copies carry (the MQTT DUP flag, the arrival time, the partition),
next to the bridge's own counters (mqtt_reconnects, kafka_retries) and warnings. Then a
`simulate --herd` of 1,000 devices publishes to the running bridge: its peak RSS.

    python bench/memory.py [--messages 1000000] [--runs 1] [--herd 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    Bridge,
    Record,
    RssSampler,
    duplicates,
    exit_on_sigterm,
    open_session,
    preload,
    progress,
    read_records,
    stack,
    steady_rate,
    summary,
    write_config,
)
from bridge.devkit.localstack import LocalStack

FRACTIONS = (0.1, 0.5, 0.9)
WARNINGS = ("warning", "error", "critical")


DEVICES = 20


def backlog(local: LocalStack, work: Path, messages: int, runs: int) -> int:
    """One offline session per run, then one preload: Mosquitto queues each publish for every
    session, so each run drains the same backlog and the preload is paid once."""
    for run in range(runs):
        open_session(local.mqtt.port, f"mem-r{run}", "mem/+/telemetry")
    preload(local.mqtt.port, "mem", DEVICES, messages // DEVICES, 200, f"mem-{time.time_ns()}",
            work)
    return messages // DEVICES * DEVICES


def drain(local: LocalStack, work: Path, n: int, run: int,
          kafka: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the bridge on run `run`'s session (its backlog of `n` waiting), sample it to the
    end, read its topic back."""
    topic, client = f"mem.r{run}", f"mem-r{run}"
    local.create_topics([topic, "bench.deadletter"])
    config = write_config(work / f"{client}.toml", local, client,
                          [{"filter": "mem/{device_id}/telemetry", "kafka_topic": topic}],
                          kafka=kafka)
    bridge = Bridge(config, work / f"{client}.log").start()
    try:
        with RssSampler(bridge.pid) as rss:
            bridge.wait_acked(n, timeout=900)
            time.sleep(1.2)  # one more stats line, settled
        stats = bridge.stats()
    finally:
        bridge.stop()
    records = read_records(local.bootstrap, topic, expected=n)
    curve = progress(records)
    at = {f"{int(f * 100)}%": rss.at(_time_at(curve, f * n)) for f in FRACTIONS}
    return {"messages": n, "records": len(records), "steady_msg_s": steady_rate(curve, n),
            "rss_mib": at, "peak_mib": rss.peak_mib,
            "rss_curve": _rss_curve(rss, curve, n), "duplicates": explain(records),
            "counters": {k: stats.get(k, 0) for k in (
                "mqtt_acks_sent", "mqtt_reconnects", "mqtt_connects", "kafka_retries",
                "kafka_backpressure", "kafka_producers_replaced", "mqtt_window_full")},
            "warnings": _warnings(bridge)}


def _time_at(curve: list[tuple[float, float]], done: float) -> float:
    return next((t for t, d in curve if d >= done), curve[-1][0] if curve else 0.0)


def _rss_curve(rss: RssSampler, curve: list[tuple[float, float]], n: int) -> list[list[float]]:
    """RSS against the drain's progress (0..1), one point per percent: the chart's line."""
    return [[p / 100, rss.at(_time_at(curve, n * p / 100))] for p in range(0, 101)]


def explain(records: list[Record]) -> dict[str, Any]:
    """Where duplicate copies came from, judged by what they carry: a copy with the MQTT DUP
    flag is a broker redelivery; copies with the same arrival time were produced from one
    receipt (a producer or Kafka duplicate); else the broker sent it twice without DUP."""
    groups = duplicates(records)
    kinds: Counter[str] = Counter()
    for group in groups:
        if len({(r.partition, r.offset) for r in group}) < len(group):
            kinds["one record read twice (same offset): the reader's, not Kafka's"] += \
                len(group) - 1
        elif any(r.dup for r in group):
            kinds["broker redelivery (DUP flag)"] += len(group) - 1
        elif len({r.arrival_ms for r in group}) == 1:
            kinds["one receipt, produced twice (same arrival time)"] += len(group) - 1
        else:
            kinds["received twice, no DUP flag"] += len(group) - 1
    sample = [[(r.partition, r.offset, r.arrival_ms, r.timestamp_ms, r.dup) for r in g]
              for g in groups[:5]]
    return {"messages": len(groups), "extra_copies": sum(len(g) - 1 for g in groups),
            "kinds": dict(kinds), "examples": sample}


def _warnings(bridge: Bridge) -> dict[str, int]:
    """Events the bridge logged at warning or above, counted by name."""
    return dict(Counter(line.get("event", "?") for line in bridge.lines()
                        if str(line.get("level", "")).lower() in WARNINGS))


def herd(local: LocalStack, work: Path, devices: int) -> dict[str, Any]:
    """A running bridge while `simulate --herd` connects `devices` devices at once and each
    publishes a burst: its peak RSS, and how long the herd took."""
    config = write_config(work / "herd.toml", local, "mem-herd",
                          [{"filter": "devices/{device_id}/telemetry",
                            "kafka_topic": "mem.herd"}])
    local.create_topics(["mem.herd"])
    bridge = Bridge(config, work / "herd.log").start()
    try:
        time.sleep(3)  # connected and subscribed before the herd
        with RssSampler(bridge.pid) as rss:
            idle = rss.samples[0][1] if rss.samples else 0.0
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "bridge", "simulate", "--url", local.mqtt_url,
                            "--herd", "--devices", str(devices), "--messages", "5"],
                           cwd=ROOT, check=True, timeout=600, capture_output=True)
            seconds = time.monotonic() - start
            bridge.wait_acked(devices * 5, timeout=120)
        idle = idle or rss.samples[0][1]
        bridged = int(bridge.stats().get("mqtt_acks_sent", 0))
    finally:
        bridge.stop()
    return {"devices": devices, "seconds": seconds, "peak_mib": rss.peak_mib, "idle_mib": idle,
            "bridged": bridged, "sent": devices * 5}


def bench(work: Path, quick: bool, runs: int, storage: str = "memory",
          kafka: dict[str, str] | None = None, herd_devices: int | None = None) -> dict[str, Any]:
    messages = 50_000 if quick else 1_000_000
    out: dict[str, Any] = {"messages": messages, "storage": storage, "runs": []}
    with stack(work, storage) as local:
        n = backlog(local, work, messages, runs)
        for run in range(runs):
            out["runs"].append(drain(local, work, n, run, kafka))
        out["herd"] = herd(local, work, herd_devices or (200 if quick else 1000))
    for key in ("10%", "50%", "90%"):
        out[f"rss.{key}"] = summary([r["rss_mib"][key] for r in out["runs"]])
    out["peak"] = summary([r["peak_mib"] for r in out["runs"]])
    out["steady"] = summary([r["steady_msg_s"] for r in out["runs"]])
    out["extra_copies"] = [r["duplicates"]["extra_copies"] for r in out["runs"]]
    return out


def rows(result: dict[str, Any]) -> list[list[str]]:
    from bench.common import cell

    n = f"{result['messages']:,}"
    herd_ = result["herd"]
    copies = ", ".join(str(c) for c in result["extra_copies"])
    return [
        ["memory", f"RSS at 10% / 50% / 90% of a {n} drain (MiB)",
         " / ".join(cell(result[f"rss.{k}"]) for k in ("10%", "50%", "90%")), "target <= 64, flat"],
        ["memory", "peak RSS of the drain, VmHWM (MiB)", cell(result["peak"]), ""],
        ["memory", "drain rate, steady 10-90% (msg/s)", cell(result["steady"]), "bridge process"],
        ["memory", "duplicate copies in Kafka per run", copies, "clean drain: should be 0"],
        ["memory", f"peak RSS during a herd of {herd_['devices']:,} devices (MiB)",
         f"{herd_['peak_mib']:.0f} (idle {herd_['idle_mib']:.0f})",
         f"1 run; bridged {herd_.get('bridged', '?'):,} of {herd_.get('sent', 0):,}"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep", help="keep the work directory (bridge logs) here")
    parser.add_argument("--storage", choices=("memory", "s3"), default="memory",
                        help="Tansu's storage: memory (the suite's) or s3 (the tests' stack)")
    parser.add_argument("--kafka", action="append", default=[], metavar="PROP=VALUE",
                        help="extra librdkafka property, e.g. debug=broker,protocol")
    parser.add_argument("--herd", type=int, help="devices in the herd")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = bench(work, args.quick, args.runs, args.storage,
                       dict(p.split("=", 1) for p in args.kafka), args.herd)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for run in result["runs"]:
        print(json.dumps({k: v for k, v in run.items() if k != "rss_curve"}))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
