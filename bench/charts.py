"""Charts of the suite's results, rendered headless (matplotlib's Agg) from the JSON, so they
can be redrawn without measuring again:

    python bench/charts.py [bench/results/latest.json]

throughput.png: the bridge against both ceilings; latency.png: the distribution (CDF) of
publish -> Kafka latency per lane; memory.png: the bridge's RSS over the 1M drain;
scaleout.png: msg/s by number of bridge processes in one share group, and where the CPU per
message went (bridges, Tansu, Mosquitto, the rest of the machine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
SIDES = (("bridge", "bridge", "tab:blue"), ("mosquitto_sub", "mosquitto_sub (MQTT ceiling)",
                                           "tab:gray"),
         ("kafka_loop", "confluent-kafka loop (Kafka ceiling)", "tab:orange"))
COLOURS = {"fast": "tab:red", "bulk": "tab:blue"}
KINDS = (("bridges", "bridges", "tab:blue"), ("tansu", "Tansu", "tab:orange"),
         ("mosquitto", "Mosquitto", "tab:green"), ("moto", "moto", "tab:purple"),
         ("harness", "harness", "tab:brown"), ("rest", "rest of machine", "lightgray"))


def render(results: dict[str, Any], out: Path) -> list[Path]:
    """Every chart the results have data for; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    benchmarks = results.get("benchmarks", {})
    made = []
    for name, draw in (("throughput", throughput), ("latency", latency),
                       ("memory", memory), ("scaleout", scaleout)):
        result = benchmarks.get(name)
        if result and "error" not in result:
            path = out / f"{name}.png"
            draw(result, path, results.get("machine", {}))
            made.append(path)
    return made


def _caption(fig: Any, result: dict[str, Any], meta: dict[str, str]) -> None:
    fig.text(0.01, 0.01, f"{meta.get('nproc', '?')} cores, {meta.get('cpu', '')}; commit "
             f"{result.get('commit', '?')[:60]}; {result.get('date', '')}", fontsize=7,
             color="gray")


def _save(fig: Any, path: Path, result: dict[str, Any], meta: dict[str, str]) -> None:
    """Caption (machine, commit, date), lay out, write the PNG, free the figure."""
    _caption(fig, result, meta)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput(result: dict[str, Any], path: Path, meta: dict[str, str]) -> None:
    """msg/s per size and phase, median with min-max error bars, three sides per group."""
    sizes = [k for k in result if k.isdigit()]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        fig_ = result[size]
        for i, (side, label, colour) in enumerate(SIDES):
            xs, meds, errs = [], [], [[], []]
            for j, phase in enumerate(("end_to_end", "steady")):
                s = fig_[f"{side}.{phase}.msg_s"]
                xs.append(j + (i - 1) * 0.27)
                meds.append(s["median"])
                errs[0].append(s["median"] - s["min"])
                errs[1].append(s["max"] - s["median"])
            ax.bar(xs, meds, 0.25, yerr=errs, capsize=3, label=label, color=colour)
        ax.set_xticks([0, 1], ["end to end", "steady (10-90%)"])
        ax.set_title(f"{int(size):,} B QoS 1, {fig_['messages']:,} preloaded")
        ax.set_ylabel("msg/s (median, min-max)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path, result, meta)


def latency(result: dict[str, Any], path: Path, meta: dict[str, str]) -> None:
    """CDF of publish -> Kafka record latency, one line per lane and run."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, run in enumerate(result["runs"]):
        for lane, lane_run in run.items():
            cdf = lane_run.get("cdf_ms", [])
            if cdf:
                ax.plot(cdf, [i / (len(cdf) - 1) for i in range(len(cdf))],
                        color=COLOURS.get(lane, "black"), alpha=0.8,
                        label=f"{lane} lane" if r == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("publish -> Kafka record (ms, log scale)")
    ax.set_ylabel("fraction of messages")
    ax.axhline(0.99, color="gray", lw=0.6, ls="--")
    ax.set_title(f"Latency at {result['rate']:,.0f} msg/s per lane, {len(result['runs'])} runs")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path, result, meta)


def memory(result: dict[str, Any], path: Path, meta: dict[str, str]) -> None:
    """The bridge's RSS against the drain's progress, one line per run, with the target."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(result["runs"]):
        curve = run["rss_curve"]
        ax.plot([p * 100 for p, _ in curve], [m for _, m in curve], label=f"run {i + 1}")
    ax.axhline(64, color="tab:red", ls="--", lw=0.8, label="target 64 MiB")
    ax.set_ylim(0, max(80, *(m for r in result["runs"] for _, m in r["rss_curve"])) * 1.1)
    ax.set_xlabel("drain progress (% of records in Kafka)")
    ax.set_ylabel("bridge VmRSS (MiB)")
    ax.set_title(f"Bridge RSS draining a {result['messages']:,}-message backlog")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path, result, meta)


def scaleout(result: dict[str, Any], path: Path, meta: dict[str, str]) -> None:
    """Left: steady msg/s per number of bridges (median, min-max, each run a dot) with the
    same-run ratio N/1. Right: CPU seconds per 1,000 messages in the steady window, stacked
    by process kind, with how busy the machine's cores were."""
    cases = [n for n in result.get("cases", []) if f"{n}.steady" in result]
    top = 0.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, n in enumerate(cases):
        s = result[f"{n}.steady"]
        left.bar(i, s["median"], 0.6, yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                 capsize=4, color="tab:blue")
        left.plot([i] * len(result["runs"]), [r[str(n)]["steady"] for r in result["runs"]],
                  "o", color="black", ms=3)
        ratio = result.get(f"ratio.{n}.steady")
        if ratio:
            left.annotate(f"{ratio['median']:.2f}x", (i, s["max"]), ha="center",
                          xytext=(0, 4), textcoords="offset points", fontsize=9)
    left.set_ylim(0, max([result[f"{n}.steady"]["max"] for n in cases], default=1) * 1.12)
    left.set_xticks(range(len(cases)), [str(n) for n in cases])
    left.set_xlabel("bridge processes in one share group")
    left.set_ylabel("msg/s, steady 10-90% (median, min-max)")
    left.set_title(f"{result['messages']:,} preloaded, 200 B QoS 1; ratio to 1 in the same run",
                   fontsize=9)
    left.grid(axis="y", alpha=0.3)
    for i, n in enumerate(cases):
        per = result.get(f"{n}.cpu_per_1000", {})
        bottom = 0.0
        for kind, label, colour in KINDS:
            value = per.get(kind, {}).get("median", 0.0)
            right.bar(i, value, 0.6, bottom=bottom, color=colour, label=label if i == 0 else None)
            bottom += value
        top = max(top, bottom)
        busy = result.get(f"{n}.cpu_share", {}).get("busy")
        if busy:
            right.annotate(f"cores {busy['median']:.0f}% busy", (i, bottom), ha="center",
                           xytext=(0, 4), textcoords="offset points", fontsize=8)
    right.set_xticks(range(len(cases)), [str(n) for n in cases])
    right.set_xlabel("bridge processes in one share group")
    right.set_ylabel("CPU s per 1,000 messages (medians)")
    right.set_title("Where the CPU went, steady window", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    right.set_ylim(0, top * 1.15 or 1)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path, result, meta)


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/results/latest.json"
    for path in render(json.loads(source.read_text()), ROOT / "bench" / "charts"):
        print(path)


if __name__ == "__main__":
    main()
