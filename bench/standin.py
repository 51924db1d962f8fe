"""TEMPORARY stand-ins for `simulate --log` and `verify --json` until they land in main.

Same contract as /work/notes/issue10-spec.md, just enough for bench/latency.py. Delete this
file (and its use in latency.py) once `git merge main` brings the real commands.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import payload, percentile, read_records
from bridge.devkit import simulate as paho_sim


def simulate(url: str, prefix: str, rate: float, seconds: float, log: Path,
             devices: int = 100, connections: int = 4) -> float:
    run = f"r{time.time_ns()}"
    lines: list[str] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        client = paho_sim.device_client(url, f"standin-{run}-{index}")
        sent, start, share = [], time.monotonic(), rate / connections
        count = 0
        while time.monotonic() - start < seconds:
            device = f"dev-{(count * connections + index) % devices:05d}"
            seq = count
            topic = f"{prefix}/{device}/telemetry"
            body = payload(device, seq, 200, run)
            sent.append((device, seq, topic, json.loads(body)["sent_ns"],
                         client.publish(topic, body, qos=1)))
            count += 1
            ahead = count / share - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        out = []
        for device, seq, topic, sent_ns, info in sent:
            info.wait_for_publish(30)
            out.append(json.dumps({"run": run, "device_id": device, "seq": seq, "topic": topic,
                                   "qos": 1, "sent_ns": sent_ns,
                                   "outcome": "acked" if info.is_published() else "unknown"}))
        client.disconnect()
        client.loop_stop()
        with lock:
            lines.extend(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with log.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return time.time()


def verify(bootstrap: str, log: Path, topic: str) -> dict[str, Any]:
    acked = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["outcome"] == "acked":
            acked[(entry["run"], entry["device_id"], entry["seq"])] = entry
    runs = {k[0] for k in acked}
    seen: dict[tuple[str, str, int], int] = {}
    latencies = []
    for r in read_records(bootstrap, topic, idle=3, expected=len(acked)):
        if r.run not in runs:
            continue
        key = (r.run, r.device_id, r.seq)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 1:
            latencies.append(r.timestamp_ms - r.sent_ns / 1e6)
    return {"lost": sum(1 for k in acked if k not in seen),
            "duplicates": sum(1 for v in seen.values() if v > 1),
            "extra_copies": sum(v - 1 for v in seen.values()),
            "topics": {topic: {"latency_ms": {"kafka": {
                "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                "max": max(latencies, default=None)}}}}}
