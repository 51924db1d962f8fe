"""Payload format checks: the fast path per message, and the streaming validators' speed,
memory and the event loop's lag beside them on worst-case payloads.

    .venv/bin/python bench/formats.py [--mib 1,16] [--plain]

Each streaming case runs in a fresh subprocess, so one case's memory cannot hide another's:
the best of 3 runs (MB/s), the Python heap's peak (tracemalloc, a run of its own), the
process's RSS growth (VmHWM reset once the payload is built; Linux), and the lag of an
asyncio loop ticking every millisecond while the validator runs on a worker thread.
`--plain` adds json.loads / msgpack.unpackb on the same payloads, for comparison.
Prints figures; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ijson
import msgpack

from bridge.formats import FORMATS, INLINE_CHECK_MAX

DEEP = 100_000
SIZED: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "json [{},{},...]": ("json", lambda n: b"[" + b"{}," * (n // 3 - 1) + b"{}]"),
    "json [1.5,1.5,...]": ("json", lambda n: b"[" + b"1.5," * (n // 4 - 1) + b"1.5]"),
    "msgpack 0xdd of 0x80 maps": ("msgpack", lambda n: b"\xdd" + (n - 5).to_bytes(4, "big")
                                  + b"\x80" * (n - 5)),
    "msgpack 0xdd of [0] arrays": ("msgpack", lambda n: b"\xdd" + ((n - 5) // 2).to_bytes(
        4, "big") + b"\x91\x00" * ((n - 5) // 2)),
    # One long token: decoded whole, so memory follows it.
    "json one string": ("json", lambda n: b'"' + b"a" * (n - 2) + b'"'),
    "json one number": ("json", lambda n: b"1." + b"1" * (n - 2)),
    "msgpack one str": ("msgpack", lambda n: msgpack.packb("a" * (n - 5))),
}
FIXED: dict[str, tuple[str, Callable[[int], bytes]]] = {
    f"json arrays {DEEP // 1000}k deep": ("json", lambda _: b"[" * DEEP + b"]" * DEEP),
    f"msgpack arrays {DEEP // 1000}k deep": ("msgpack", lambda _: b"\x91" * DEEP + b"\xc0"),
    f"msgpack [x, nil] {DEEP // 1000}k deep": ("msgpack", lambda _: b"\x92" * DEEP
                                               + b"\xc0" * (DEEP + 1)),
}
CASES = {**SIZED, **FIXED}
DOC = {"device": "sensor-0042", "ts": 1733050000123, "t": 21.5, "h": 48.25, "ok": True,
       "tags": ["a", "b", "c"], "v": [1.0, 2.5, 3.25, 4.125], "note": "x" * 40}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_growth(run: Callable[[], object]) -> int:
    """Bytes the process's peak RSS grows by while `run` runs."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = status_kib("VmRSS")
    run()
    return (status_kib("VmHWM") - base) * 1024


def heap_peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def loop_lag(run: Callable[[], object]) -> list[float]:
    """How late each 1 ms sleep of the loop wakes while `run` runs on a worker thread."""
    lags: list[float] = []
    job = asyncio.ensure_future(asyncio.to_thread(run))
    while not job.done():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)
    await job
    return sorted(lags)


def plain(name: str) -> Callable[[bytes], object]:
    return json.loads if name == "json" else \
        lambda payload: msgpack.unpackb(payload, strict_map_key=False)


def refusing(check: Callable[[bytes], object], payload: bytes) -> Callable[[], object]:
    def run() -> object:
        try:
            return check(payload)
        except (ValueError, RecursionError) as exc:
            return exc
    return run


def one(case: str, size: int, use_plain: bool) -> dict[str, Any]:
    """The figures of one case, measured in this (fresh) process."""
    name, build = CASES[case]
    payload = build(size)
    check = plain(name) if use_plain else FORMATS[name].check_streaming
    assert check is not None
    run = refusing(check, payload)
    growth = rss_growth(run)
    outcome = run()
    seconds = min(timeit.repeat(run, number=1, repeat=3))
    lags = asyncio.run(loop_lag(run))
    return {"size": len(payload), "seconds": seconds, "rss": growth, "heap": heap_peak(run),
            "refused": type(outcome).__name__ if isinstance(outcome, Exception) else None,
            "lag": [statistics.median(lags), lags[int(len(lags) * 0.99)], lags[-1]]}


def child(case: str, size: int, use_plain: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--one", case, str(size)]
                         + ["--plain"] * use_plain, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout))


def per_call(run: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(run, number=number, repeat=5)) / number


def inline_figures() -> None:
    for name, payload in (("json", json.dumps(DOC).encode()), ("msgpack", msgpack.packb(DOC))):
        check, streaming = FORMATS[name].check, FORMATS[name].check_streaming
        assert check is not None and streaming is not None
        fast, slow = per_call(refusing(check, payload), 20000), \
            per_call(refusing(streaming, payload), 5000)
        print(f"{name}, {len(payload)} B: check() {fast * 1e6:.1f} us per call (fast path);"
              f" check_streaming() {slow * 1e6:.1f} us")
    print(f"check() on {INLINE_CHECK_MAX // 1024} KiB worst cases, stalling the event loop"
          " (valid: the fast path; cut short by a byte: the fast path, then streaming):")
    for case, (name, build) in list(SIZED.items())[:4]:
        payload, check = build(INLINE_CHECK_MAX), FORMATS[name].check
        assert check is not None
        valid = per_call(refusing(check, payload), 20)
        cut = per_call(refusing(check, payload[:-1]), 20)
        print(f"  {case:28} valid {valid * 1e3:5.1f} ms   cut short {cut * 1e3:5.1f} ms")


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def amount(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"


def row(case: str, figures: dict[str, Any]) -> str:
    size, seconds = figures["size"], figures["seconds"]
    verdict = f"  refused: {figures['refused']}" if figures["refused"] else ""
    p50, p99, top = (lag * 1e3 for lag in figures["lag"])
    return (f"  {case:30} {amount(size):>9} {seconds:7.3f} s {size / seconds / 1e6:7.1f} MB/s"
            f"  heap {amount(figures['heap']):>10}  RSS +{amount(figures['rss']):>10}"
            f"  lag {p50:4.1f}/{p99:6.1f}/{top:6.1f} ms{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", default="1,16", help="sizes of the sized cases, in MiB")
    parser.add_argument("--plain", action="store_true", help="also json.loads / unpackb")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.plain)))
        return
    print(f"{cpu()}, {os.cpu_count()} CPUs,"
          f" {platform.system()} {platform.release()}, Python {platform.python_version()},"
          f" ijson {ijson.__version__} ({ijson.backend}), msgpack"
          f" {'.'.join(map(str, msgpack.version))}; load average"
          f" {os.getloadavg()[0]:.1f} at the start")
    inline_figures()
    sizes = [int(float(mib) * 2**20) for mib in args.mib.split(",")]
    runs = [(case, size) for case in SIZED for size in sizes] + [(case, 0) for case in FIXED]
    for label, use_plain in [("check_streaming", False)] + [("plain parser", True)] * args.plain:
        print(f"{label} (time best of 3; heap: tracemalloc peak; RSS: peak growth;"
              " loop lag p50/p99/max):")
        for case, size in runs:
            print(row(case, child(case, size, use_plain)), flush=True)


if __name__ == "__main__":
    main()
