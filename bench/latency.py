"""Latency per lane: publish -> Kafka record at a steady 2,000 msg/s, with simulate + verify.

Measured with the project's own tools, as an operator would: `simulate` (the asyncio
fleet) and `verify`. One bridge process runs two routes: `latfast/{device_id}/telemetry`
on the fast lane and `latbulk/{device_id}/telemetry` on the bulk lane. Each run publishes
to one lane at a time (the order alternates run by run) with `simulate --rate 2000 --log FILE`, then
`verify --json` checks that lane's topic against the log: lost, duplicates, and latency
p50/p99/max from each payload's `sent_ns` to its record's Kafka timestamp. The same
latencies are read back here too, for the distribution chart, and so is how many records
were in Kafka when the publisher finished (a lane that cannot hold the rate falls behind).

    python bench/latency.py [--quick] [--rate 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    Bridge,
    cdf,
    cell,
    exit_on_sigterm,
    percentile,
    read_records,
    stack,
    summary,
    write_config,
)
from bridge.devkit.localstack import LocalStack

LANES = ("fast", "bulk")
DEVICES = 100


def simulate(url: str, prefix: str, rate: float, seconds: float, log: Path) -> float:
    """`mqtt-kafka-bridge simulate` at `rate` msg/s from DEVICES devices, QoS 1, 200 B,
    logging every settled publish; returns when it finished (wall time)."""
    subprocess.run([sys.executable, "-m", "bridge", "simulate", "--url", url,
                    "--devices", str(DEVICES), "--rate", str(rate), "--size", "200",
                    "--qos", "1", "--duration", str(seconds), "--prefix", prefix,
                    "--log", str(log)], cwd=ROOT, check=True, timeout=seconds + 120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.time()


def verify(bootstrap: str, log: Path, topic: str) -> dict[str, Any]:
    """`mqtt-kafka-bridge verify --json` on one lane's topic: its JSON report."""
    done = subprocess.run([sys.executable, "-m", "bridge", "verify", "--bootstrap", bootstrap,
                           "--log", str(log), "--topic", topic, "--json", "--idle", "30"],
                          cwd=ROOT, timeout=300, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"verify failed ({done.returncode}): {done.stderr.strip()}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def lane_run(local: LocalStack, work: Path, lane: str, run: int, rate: float,
             seconds: float) -> dict[str, Any]:
    """One lane at `rate` for `seconds`: verify's report and our own read of the records."""
    log = work / f"lat-{lane}-{run}.jsonl"
    topic = f"lat.{lane}"
    finished = simulate(local.mqtt_url, f"lat{lane}", rate, seconds, log)
    runs = {json.loads(line)["run"] for line in log.read_text().splitlines() if line.strip()}
    report = verify(local.bootstrap, log, topic)
    mine = [r for r in read_records(local.bootstrap, topic, idle=2) if r.run in runs]
    latencies = sorted(r.timestamp_ms - r.sent_ns / 1e6 for r in mine)
    return {"lane": lane, "verify": report, "records": len(mine),
            "offered_msg_s": report.get("acked", 0) / seconds,
            "in_kafka_at_finish": sum(1 for r in mine if r.timestamp_ms / 1000 <= finished),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": latencies[-1] if latencies else float("nan"),
            "cdf_ms": [round(x, 2) for x in cdf(latencies)]}


def figures(report: dict[str, Any], topic: str) -> dict[str, float]:
    """p50/p99/max (ms, sent -> Kafka timestamp), lost and extra copies from verify's JSON
    (`topics.T.latency_ms.kafka`; README, verify)."""
    kafka = report.get("topics", {}).get(topic, {}).get("latency_ms", {}).get("kafka", {})
    nan = float("nan")
    return {"p50_ms": kafka.get("p50") or nan, "p99_ms": kafka.get("p99") or nan,
            "max_ms": kafka.get("max") or nan, "lost": float(report.get("lost", nan)),
            "duplicates": float(report.get("extra_copies", nan))}


def bench(work: Path, quick: bool, runs: int, rate: float = 2000.0) -> dict[str, Any]:
    seconds = 4.0 if quick else 15.0
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "runs": []}
    with stack(work) as local:
        local.create_topics(["lat.fast", "lat.bulk", "bench.deadletter"])
        config = write_config(work / "lat.toml", local, "lat", [
            {"filter": "latfast/{device_id}/telemetry", "kafka_topic": "lat.fast",
             "lane": "fast"},
            {"filter": "latbulk/{device_id}/telemetry", "kafka_topic": "lat.bulk"}])
        bridge = Bridge(config, work / "lat.log").start()
        try:
            time.sleep(3)  # connected, subscribed, producers answered
            for run in range(runs):
                order = LANES if run % 2 == 0 else LANES[::-1]
                out["runs"].append({lane: lane_run(local, work, lane, run, rate, seconds)
                                    for lane in order})
            out["counters"] = bridge.stats()
        finally:
            bridge.stop()
    for lane in LANES:
        lane_runs = [r[lane] for r in out["runs"]]
        for key in ("p50_ms", "p99_ms", "max_ms"):
            out[f"{lane}.{key}"] = summary([figures(r["verify"], f"lat.{lane}")[key]
                                            for r in lane_runs])
        out[f"{lane}.lost"] = [figures(r["verify"], f"lat.{lane}")["lost"] for r in lane_runs]
        out[f"{lane}.behind_at_finish"] = [r["records"] - r["in_kafka_at_finish"]
                                           for r in lane_runs]
        out[f"{lane}.offered"] = summary([r["offered_msg_s"] for r in lane_runs])
    return out


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for lane in LANES:
        p = " / ".join(cell(result[f"{lane}.{k}"], "{:,.1f}") for k in ("p50_ms", "p99_ms",
                                                                        "max_ms"))
        lost = ", ".join(f"{x:.0f}" for x in result[f"{lane}.lost"])
        behind = ", ".join(str(x) for x in result[f"{lane}.behind_at_finish"])
        offered = cell(result.get(f"{lane}.offered", {}))
        out.append(["latency", f"{lane} lane at {result['rate']:,.0f} msg/s: p50 / p99 / max "
                    "(ms)", p, f"acked {offered} msg/s; lost {lost}; not in Kafka when "
                    f"simulate ended {behind}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2000.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = bench(Path(work), args.quick, args.runs, args.rate)
    for run in result.pop("runs"):
        for lane in run.values():
            lane.pop("cdf_ms")
        print(json.dumps(run))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
