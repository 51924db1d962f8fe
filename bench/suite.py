"""The benchmark suite (`make bench`): every benchmark, one table, JSON and charts.

Each benchmark starts its own local stack (Mosquitto, Tansu, moto), measures every
comparison side by side in the same run, and reports each figure as the median of `--runs`
runs with min and max. The machine is shared and noisy, so ratios measured within one run
are the figures to read, not lone absolute times. Results go to bench/results/latest.json
(with the machine and the commit of each benchmark), charts to bench/charts/.

    python bench/suite.py [--quick] [--only NAME ...] [--runs N]

`--quick`: one run, small sizes, to prove the harness (a few minutes). `--only NAME` runs
some benchmarks and keeps the others' last results in latest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import drain, large_files, latency, memory, scaleout
from bench.common import ROOT, cell, exit_on_sigterm, machine, table

BENCHMARKS: dict[str, ModuleType] = {"throughput": drain, "latency": latency,
                                     "memory": memory, "files": large_files,
                                     "scaleout": scaleout}
RESULTS = ROOT / "bench" / "results" / "latest.json"
HEADER = ("benchmark", "figure", "median (min-max)", "beside it")


def run_one(name: str, quick: bool, runs: int) -> dict[str, Any]:
    """One benchmark in a scratch directory; a crash is recorded, not raised, so the rest
    of the suite still runs (a benchmark is never pass/fail)."""
    started = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
            result: dict[str, Any] = BENCHMARKS[name].bench(Path(work), quick, runs)
    except Exception:  # report and go on
        result = {"error": traceback.format_exc()}
        print(result["error"], file=sys.stderr)
    meta = machine()
    result.update(seconds=round(time.monotonic() - started, 1), commit=meta["commit"],
                  date=meta["date"], quick=quick, runs_asked=runs)
    print(f"[{time.strftime('%H:%M:%S')}] {name} done in {result['seconds']:.0f} s",
          file=sys.stderr, flush=True)
    return result


def render_table(results: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    for name, module in BENCHMARKS.items():
        result = results.get("benchmarks", {}).get(name)
        if result is None:
            continue
        if "error" in result:
            rows.append([name, "failed", "n/a", result["error"].strip().splitlines()[-1][:80]])
            continue
        rows.extend(module.rows(result))
    return table(HEADER, rows)


def targets(results: dict[str, Any]) -> list[list[str]]:
    """Issue 10's targets against the medians measured (same-run ratios): met or missed."""
    b = results.get("benchmarks", {})
    out: list[list[str]] = []

    def add(label: str, figure: dict[str, float] | None, goal: float, fmt: str,
            above: bool = True) -> None:
        if not figure or not figure.get("runs"):
            return
        median = figure["median"]
        met = median >= goal if above else median <= goal
        out.append([label, cell(figure, fmt), "met" if met else "missed"])

    t = b.get("throughput", {})
    if "200" in t:
        add("200 B end to end >= 0.5x mosquitto_sub", t["200"]["ratio.mosquitto_sub.end_to_end"],
            0.5, "{:.2f}")
        add("200 B steady >= 0.7x mosquitto_sub", t["200"]["ratio.mosquitto_sub.steady"], 0.7,
            "{:.2f}")
    if "4096" in t:
        add("4 KB >= 0.8x the tight producer loop (steady)", t["4096"]["ratio.kafka_loop.steady"],
            0.8, "{:.2f}")
        add("4 KB >= 0.8x the tight producer loop (end to end)",
            t["4096"]["ratio.kafka_loop.end_to_end"], 0.8, "{:.2f}")
    if "fast.p99_ms" in b.get("latency", {}):
        lat = b["latency"]
        add("fast lane p99 <= 20 ms at 2,000 msg/s (median of runs)", lat["fast.p99_ms"], 20,
            "{:.1f}", above=False)
        worst = {"median": lat["fast.p99_ms"]["max"], "runs": 1}
        add("fast lane p99 <= 20 ms in every run (worst run)", worst, 20, "{:.1f}", above=False)
    if "peak" in b.get("memory", {}):
        add("RSS <= 64 MiB on the 1M backlog (peak)", b["memory"]["peak"], 64, "{:.0f}",
            above=False)
    s = b.get("scaleout", {})
    for n in scaleout.CASES[1:]:
        figure = s.get(f"ratio.{n}.steady")
        if figure and figure.get("runs"):  # the issue asks for the figure, it sets no goal
            out.append([f"scale-out {n} / 1 processes, steady (no target: reported)",
                        cell(figure, "{:.2f}"), "reported"])
    return out


def scaleout_limits(results: dict[str, Any]) -> list[str]:
    """What limits scale-out here, one line per case: the busy share of the cores in the
    steady window and each process kind's share of that busy CPU (medians)."""
    s = results.get("benchmarks", {}).get("scaleout", {})
    if not s or "error" in s or "1.cpu_share" not in s:
        return []
    return [f"- {n} bridge{'s' if n > 1 else ''}: {scaleout.limit(s, n)}"
            for n in scaleout.CASES]


def markdown(results: dict[str, Any]) -> str:
    """The machine, the command, each benchmark's commit and duration, and the table: the
    part of RESULTS.md a run writes itself (bench/results/latest.md)."""
    meta = results.get("machine", {})
    lines = [f"Command: `{results.get('command', '')}` ({results.get('seconds', 0) / 60:.1f} min)",
             "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    lines += ["", "| benchmark | commit | finished | minutes |", "|---|---|---|---|"]
    for name, result in results.get("benchmarks", {}).items():
        lines.append(f"| {name} | {result.get('commit', '?')[:7]} | {result.get('date', '?')} | "
                     f"{result.get('seconds', 0) / 60:.1f} |")
    goals = table(("target (issue 10)", "measured", ""), targets(results))
    limits = scaleout_limits(results)
    if limits:
        limits = ["", "Scale-out, where the CPU went in the steady window (medians):", "",
                  *limits]
    return "\n".join([*lines, "", render_table(results), "", goals, *limits, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run, small sizes")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    results: dict[str, Any] = {}
    if args.only and args.out.exists():
        results = json.loads(args.out.read_text())
    results.update(machine=machine(), command=" ".join(["bench/suite.py", *sys.argv[1:]]))
    results.setdefault("benchmarks", {})
    started = time.monotonic()
    for name in args.only or BENCHMARKS:
        results["benchmarks"][name] = run_one(name, args.quick, runs)
        save(results, args.out)  # what finished survives a later crash
    results["seconds"] = round(time.monotonic() - started, 1)
    save(results, args.out)
    args.out.with_suffix(".md").write_text(markdown(results))
    print(render_table(results))
    from bench import charts  # matplotlib: the bench extra, which the tests do not install

    for path in charts.render(results, ROOT / "bench" / "charts"):
        print(f"chart: {path.relative_to(ROOT)}")
    print(f"results: {args.out} ({results['seconds']:.0f} s)")


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
