"""Scale-out: 1, 2 and 3 bridge processes in MQTT 5 shared subscriptions, same backlog.

Each case gets its own share group whose member sessions exist (offline) before the one
preload, so Mosquitto spreads the backlog over them as it arrives and every case drains the
same messages; then a case's bridges start together. Rates come from the records' Kafka
timestamps: steady state (10-90% of all records) and end to end (spawn to last record,
Python start-up included). The order of the cases rotates run by run, and the ratios (2/1,
3/1) are taken within each run. Over each case's steady window the CPU of every process on
the path is read from /proc (the bridges summed over members, Tansu, Mosquitto, moto, this
harness) with the machine's busy CPU from /proc/stat, so the result says where the cores
went: CPU seconds per 1,000 messages per kind, and each kind's share of the busy CPU. Each
bridge's threads are sampled (CPU per thread name, every 100 ms) so a stall, a gap of
>= 0.5 s in a bridge's records before its drain ends, can be told apart: librdkafka's
broker threads burning CPU with nothing acked, or everything idle. `--debug` adds
librdkafka's `debug=broker,protocol` to the [kafka] properties (the lines land in each
bridge's JSON log as kafka_log events).

    python bench/scaleout.py [--quick] [--runs 3] [--debug]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Bridge,
    CpuSampler,
    Record,
    RssSampler,
    cell,
    cpu_window,
    crossing,
    exit_on_sigterm,
    open_session,
    percentile,
    preload,
    progress,
    read_records,
    stack,
    steady_rate,
    summary,
    write_config,
)
from bridge.devkit.localstack import LocalStack

GAP = 0.5  # seconds without a record from a bridge that count as a stall
CASES = (1, 2, 3)  # bridge processes per share group
# the processes on the path, as the CPU breakdown names them (rest: the machine's other work)
KINDS = ("bridges", "tansu", "mosquitto", "moto", "harness", "rest")
LABELS = {"bridges": "bridges", "tansu": "Tansu", "mosquitto": "Mosquitto", "moto": "moto",
          "harness": "harness", "rest": "rest of machine"}


def backlog(local: LocalStack, work: Path, prefix: str, messages: int,
            cases: tuple[int, ...]) -> int:
    """The member sessions of one share group per case (1, 2, 3 bridges), then one preload:
    each group gets every message (spread over its members), so the cases drain the same
    backlog."""
    for bridges in cases:
        for client in _clients(prefix, bridges):
            open_session(local.mqtt.port, client, f"{prefix}/+/telemetry",
                         share_group=f"{prefix}-{bridges}")
    preload(local.mqtt.port, prefix, 8, messages // 8, 200, f"{prefix}-{time.time_ns()}", work)
    return messages // 8 * 8


def _clients(prefix: str, bridges: int) -> list[str]:
    return [f"{prefix}-{bridges}-{i}" for i in range(bridges)]


def case(local: LocalStack, work: Path, prefix: str, bridges: int, n: int,
         debug: bool = False) -> dict[str, Any]:
    """`bridges` processes in share group PREFIX-N drain its backlog of `n` together."""
    name = f"{prefix}-{bridges}"
    topic = f"scale.{name}"
    local.create_topics([topic, "bench.deadletter"])
    ids = _clients(prefix, bridges)
    kafka = {"debug": "broker,protocol"} if debug else {}
    procs = [Bridge(write_config(work / f"{c}.toml", local, c,
                                 [{"filter": f"{prefix}/{{device_id}}/telemetry",
                                   "kafka_topic": topic}], share_group=name, kafka=kafka),
                    work / f"{c}.log") for c in ids]
    with contextlib.ExitStack() as stop:
        for bridge in procs:
            bridge.start()
            stop.callback(bridge.stop)
        samplers = [stop.enter_context(RssSampler(b.pid, 0.1, threads=True)) for b in procs]
        machine_cpu = stop.enter_context(CpuSampler(
            {"bridges": [b.pid for b in procs], "tansu": [_pid(local.kafka)],
             "mosquitto": [_pid(local.mqtt)], "moto": [_pid(local.s3)],
             "harness": [os.getpid()]}))
        deadline = time.monotonic() + 600
        while sum(int(b.stats().get("mqtt_acks_sent", 0)) for b in procs) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"scale-out {name}: not drained in 600 s")
            time.sleep(0.2)
    records = read_records(local.bootstrap, topic, expected=n)
    curve = progress(records)
    started = min(b.started for b in procs)
    per_bridge = {c: sum(1 for r in records if r.instance == c) for c in ids}
    timeline = {c: bridge_timeline(records, c, b.started) for c, b in zip(ids, procs, strict=True)}
    window = cpu_window(machine_cpu.samples, crossing(curve, n * 0.1), crossing(curve, n * 0.9),
                        os.sysconf("SC_CLK_TCK"))
    return {"bridges": bridges, "messages": n, "records": len(records),
            "steady": steady_rate(curve, n),
            "end_to_end": n / (curve[-1][0] - started) if curve else float("nan"),
            "per_bridge": per_bridge,
            "timeline": timeline,
            "window": window,
            "cpu_per_1000": cpu_per_1000(window, curve),
            "cpu_share": cpu_share(window),
            "cpu_cores": cpu_cores(window),
            "cpu_s": {c: _cpu_between(smp, smp.cpu[0][0], smp.cpu[-1][0]) if smp.cpu else {}
                      for c, smp in zip(ids, samplers, strict=True)},
            "stalls": [s for c, smp in zip(ids, samplers, strict=True)
                       for s in stalls(records, c, smp)],
            "logs": [str(b.log) for b in procs]}


def bridge_timeline(records: list[Record], instance: str, spawned: float) -> dict[str, float]:
    """When one bridge's first and last records were produced, in seconds after its spawn:
    what an end-to-end rate far below the steady one spent its time on (start-up or tail)."""
    stamps = [r.timestamp_ms / 1000 for r in records if r.instance == instance]
    if not stamps:
        return {}
    return {"first_s": round(min(stamps) - spawned, 3), "last_s": round(max(stamps) - spawned, 3)}


def _pid(service: Any) -> int:
    if service.pid is None:
        raise RuntimeError(f"{service.name} is not running")
    return int(service.pid)


def in_window(curve: list[tuple[float, float]], start: float, end: float) -> int:
    """How many records of a progress curve have their Kafka timestamp in [start, end]."""
    return sum(1 for t, _ in curve if start <= t <= end)


def cpu_per_1000(window: dict[str, Any] | None,
                 curve: list[tuple[float, float]]) -> dict[str, float]:
    """CPU seconds per 1,000 messages bridged inside the window, per kind of process, plus
    `rest` (the machine's other busy CPU) and `busy` (the whole machine's)."""
    if window is None:
        return {}
    done = in_window(curve, window["start"], window["end"])
    if not done:
        return {}
    cpu = {**window["cpu_s"], "rest": window["rest_s"], "busy": window["busy_s"]}
    return {k: v / done * 1000 for k, v in cpu.items()}


def cpu_share(window: dict[str, Any] | None) -> dict[str, float]:
    """Each kind's share (%) of the machine's busy CPU in the window, `rest` included, and
    `busy`: the busy share (%) of all the machine's cores."""
    if window is None or not window["busy_s"]:
        return {}
    cpu = {**window["cpu_s"], "rest": window["rest_s"]}
    out = {k: 100 * min(v, window["busy_s"]) / window["busy_s"] for k, v in cpu.items()}
    return {**out, "busy": 100 * window["busy_share"]}


def stalls(records: list[Record], instance: str, sampler: RssSampler) -> list[dict[str, Any]]:
    """Gaps of >= GAP s between one bridge's consecutive records, before its last one, with
    the CPU each kind of thread spent meanwhile (rdk:broker* are librdkafka's broker
    threads; MainThread is the bridge's event loop)."""
    stamps = sorted(r.timestamp_ms / 1000 for r in records if r.instance == instance)
    out = []
    for before, after in itertools.pairwise(stamps):
        if after - before >= GAP:
            cpu = _cpu_between(sampler, before, after)
            out.append({"instance": instance, "at": before, "seconds": round(after - before, 3),
                        "cpu_s": cpu})
    return out


def _cpu_between(sampler: RssSampler, start: float, end: float) -> dict[str, float]:
    """CPU seconds per thread group between two wall times, from the nearest samples."""
    inside = [s for s in sampler.cpu if start <= s[0] <= end]
    if len(inside) < 2:
        return {}
    first, last = inside[0][1], inside[-1][1]
    groups: dict[str, float] = {}
    for name, seconds in last.items():
        group = "rdk:broker" if name.startswith("rdk:broker") else name
        groups[group] = round(groups.get(group, 0.0) + seconds - first.get(name, 0.0), 2)
    return {k: v for k, v in groups.items() if v > 0}


# librdkafka's protocol debug line for each ProduceResponse: its round trip to the broker
_RESPONSE = re.compile(r"Received ProduceResponse \(v\d+, \d+ bytes, CorrId \d+, rtt ([\d.]+)ms\)")


def produce_rtts(log: Path) -> list[tuple[float, float]]:
    """(wall time, round trip s) of each ProduceResponse in a bridge's debug log: a stall
    whose responses took as long as it did is the broker's wait; one with fast responses is
    the client's. The time is when the bridge logged the line (served from poll())."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "ProduceResponse" not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            event = json.loads(line)
            found = _RESPONSE.search(event["message"])
            if found:
                when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                out.append((when.timestamp(), float(found.group(1)) / 1000))
    return out


def debug_summary(run: dict[str, Any]) -> dict[str, Any]:
    """For a run with librdkafka's debug: ProduceResponse round trips overall, and the
    slowest one answered inside each stall."""
    rtts = [r for log in run["logs"] for r in produce_rtts(Path(log))]
    seconds = sorted(r for _, r in rtts)
    for stall in run["stalls"]:
        inside = [r for t, r in rtts if stall["at"] <= t <= stall["at"] + stall["seconds"] + 0.2]
        stall["slowest_response_s"] = max(inside, default=None)
    return {"responses": len(seconds), "rtt_p50_s": percentile(seconds, 50),
            "rtt_p99_s": percentile(seconds, 99), "rtt_max_s": max(seconds, default=None),
            "over_0_5_s": sum(1 for r in seconds if r >= 0.5), "stalls": run["stalls"]}


def cpu_cores(window: dict[str, Any] | None) -> dict[str, float]:
    """How many cores each kind kept busy on average over the window (CPU s / wall s)."""
    if window is None or window["end"] <= window["start"]:
        return {}
    wall = window["end"] - window["start"]
    cpu = {**window["cpu_s"], "rest": window["rest_s"], "busy": window["busy_s"]}
    return {k: v / wall for k, v in cpu.items()}


def ceiling(per_1000: dict[str, float], cores: int) -> float:
    """The rate the path could reach with every core to itself: the cores over the CPU a
    message costs the bridges, Tansu, Mosquitto and moto together (the harness and the
    machine's other work left out)."""
    path = sum(per_1000.get(k, 0.0) for k in ("bridges", "tansu", "mosquitto", "moto"))
    return cores / path * 1000 if path else float("nan")


def bench(work: Path, quick: bool, runs: int, debug: bool | None = None) -> dict[str, Any]:
    """The suite's entry: `runs` of 1, 2 and 3 bridges (the order rotating by run), then
    (unless quick) one more two-bridge drain with librdkafka's debug, for the stalls' round
    trips."""
    debug = not quick if debug is None else debug
    messages = 20_000 if quick else 200_000
    out: dict[str, Any] = {"messages": messages, "cases": list(CASES), "runs": [],
                           "cores": os.cpu_count() or 1}
    with stack(work) as local:
        for run in range(runs):
            n = backlog(local, work, f"so{run}", messages, CASES)
            order = CASES[run % len(CASES):] + CASES[:run % len(CASES)]
            done = {str(b): case(local, work, f"so{run}", b, n) for b in order}
            out["runs"].append({str(b): done[str(b)] for b in CASES})
        if debug:
            n = backlog(local, work, "sodebug", messages, (2,))
            out["debug_run"] = debug_summary(case(local, work, "sodebug", 2, n, debug=True))
    out.update(aggregate(out["runs"], out["cores"]))
    return out


def aggregate(runs: list[dict[str, Any]], cores: int = 2) -> dict[str, Any]:
    """Median/min/max over runs of each case's rates, CPU per 1,000 messages and CPU shares;
    the ratios N/1 within each run; every stall."""
    out: dict[str, Any] = {}
    for b in CASES:
        key = str(b)
        for phase in ("steady", "end_to_end"):
            out[f"{key}.{phase}"] = summary([r[key][phase] for r in runs])
            if b > 1:
                out[f"ratio.{key}.{phase}"] = summary([r[key][phase] / r["1"][phase]
                                                       for r in runs])
        out[f"{key}.ceiling"] = summary([ceiling(r[key]["cpu_per_1000"], cores) for r in runs
                                         if r[key].get("cpu_per_1000")])
        for field in ("cpu_per_1000", "cpu_share", "cpu_cores"):
            kinds = {k for r in runs for k in r[key].get(field, {})}
            out[f"{key}.{field}"] = {k: summary([r[key][field][k] for r in runs
                                                 if k in r[key].get(field, {})])
                                     for k in sorted(kinds)}
    out["stalls"] = [s for r in runs for k in map(str, CASES) for s in r[k]["stalls"]]
    return out


def limit(result: dict[str, Any], bridges: int) -> str:
    """Where the busy CPU went in one case (medians), and whether the cores were saturated."""
    share = result.get(f"{bridges}.cpu_share", {})
    if "busy" not in share:
        return "no CPU window"
    busy = share["busy"]["median"]
    cores = result.get(f"{bridges}.cpu_cores", {})
    parts = ", ".join(f"{LABELS[k]} {share[k]['median']:.0f}%"
                      + (f" ({cores[k]['median']:.2f} cores)" if k == "bridges" and k in cores
                         else "")
                      for k in KINDS if k in share)
    state = "saturated" if busy >= 90 else "not saturated"
    return f"cores {busy:.0f}% busy ({state}): {parts}"


def _case_label(bridges: int) -> str:
    return f"{bridges} bridge{'s' if bridges > 1 else ''}"


def rows(result: dict[str, Any]) -> list[list[str]]:
    n = f"{result['messages']:,}"
    out = []
    for b in CASES:
        note = "one share group" if b > 1 else ""
        out.append(["scale-out", f"{_case_label(b)}, {n} backlog, steady (msg/s)",
                    cell(result[f"{b}.steady"]), note])
    for b in CASES[1:]:
        out.append(["scale-out", f"ratio {b} / 1, steady / end to end",
                    f"{cell(result[f'ratio.{b}.steady'], '{:.2f}')} / "
                    f"{cell(result[f'ratio.{b}.end_to_end'], '{:.2f}')}",
                    "same run; end to end incl. start-up"])
    for b in CASES:
        per = result.get(f"{b}.cpu_per_1000", {})
        figures = " / ".join(cell(per[k], "{:.3f}") if k in per else "n/a"
                             for k in ("bridges", "tansu", "mosquitto", "busy"))
        out.append(["scale-out", f"{_case_label(b)}: CPU s per 1,000 msgs, bridges / Tansu / "
                    "Mosquitto / whole machine", figures, limit(result, b)])
    if "1.ceiling" in result:
        out.append(["scale-out", f"ceiling: {result.get('cores', '?')} cores / the path's CPU per "
                    "msg (msg/s), " + " / ".join(_case_label(b) for b in CASES),
                    " / ".join(cell(result[f"{b}.ceiling"]) for b in CASES),
                    "bridges + Tansu + Mosquitto + moto, nothing else running"])
    stalled = sum(1 for r in result["runs"] for k in map(str, CASES[1:]) if r[k]["stalls"])
    out.append(["scale-out", f"drains with a >= {GAP:g} s stall (2 and 3 bridges)",
                f"{stalled} of {len(result['runs']) * (len(CASES) - 1)}", "see stalls in JSON"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--debug", action="store_true", default=None)
    parser.add_argument("--keep", help="keep the work directory (bridge logs) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = bench(work, args.quick, args.runs, args.debug)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for run in result["runs"]:
        print(json.dumps(run))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
