"""The proof an operator runs, end to end on real servers and through the real commands:
`simulate --log` records what the broker acked while the bridge is killed with -9 and
restarted, then `verify` finds every acked message in Kafka (or as a dead letter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.devkit.localstack import s3_environment
from tests.conftest import ROOT, Case
from tests.test_large_payloads import Files

pytestmark = pytest.mark.integration


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", *args]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **s3_environment()})


def simulate(case: Case, log: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(command("simulate", "--url", case.stack.mqtt_url, "--prefix",
                                    case.prefix, "--log", str(log), *args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)


def finished(process: subprocess.Popen[str], timeout: float = 180) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def verify(case: Case, files: Files, log: Path, *topics: str) -> tuple[int, dict[str, Any]]:
    done = run("verify", "--bootstrap", case.stack.bootstrap, "--log", str(log),
               *[a for t in topics for a in ("--topic", t)],
               "--s3-endpoint", case.stack.s3_endpoint, "--idle", "15", "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def outcomes(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines():
        outcome = json.loads(line)["outcome"]
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def test_a_fleet_a_herd_and_files_through_a_kill9_lose_nothing(case: Case,
                                                               tmp_path: Path) -> None:
    files = Files(case)
    config = files.config()
    bridge = case.bridge(config)
    log = tmp_path / "sim.log"

    fleet = simulate(case, log, "--devices", "50", "--messages", "200", "--rate", "1000")
    bridge.wait_stat("bridged_messages", 1500, timeout=90)
    assert fleet.poll() is None, "the fleet ended before the kill"
    bridge.kill9()  # mid-run: what it wrote to Kafka but had not acked comes again
    bridge = case.bridge(config)
    finished(fleet)

    finished(simulate(case, log, "--herd", "--devices", "500", "--messages", "2"))
    finished(simulate(case, log, "--devices", "2", "--messages", "2", "--size", "70000"))
    for n in range(2):
        small = tmp_path / f"small-{n}.bin"
        small.write_bytes(os.urandom(300_000 + n))
        finished(simulate(case, log, "--file", str(small), "--device-id", f"cam-{n}",
                          "--segment-bytes", "65536"))

    counts = outcomes(log)
    acked = 50 * 200 + 500 * 2 + 2 * 2 + 2
    assert counts.get("acked") == acked, counts  # the broker took every publish

    status, report = verify(case, files, log, case.topic, files.files_topic, case.dead_letter)
    assert (status, report["verdict"], report["lost"]) == (0, "ok", 0), report
    assert report["acked"] == report["found"] == acked
    assert report["unexpected"] == 0, report["unexpected_first"]


def test_verify_after_a_kill9_reports_what_a_topic_lacks_and_exits_1(case: Case,
                                                                     tmp_path: Path) -> None:
    """The same proof fails loudly when told to look in too few places: the files topic is
    left out, so the two uploads the broker acked are reported lost."""
    files = Files(case)
    bridge = case.bridge(files.config())
    log = tmp_path / "sim.log"
    finished(simulate(case, log, "--devices", "5", "--messages", "20"))
    for n in range(2):
        small = tmp_path / f"small-{n}.bin"
        small.write_bytes(os.urandom(10_000))
        finished(simulate(case, log, "--file", str(small), "--device-id", f"cam-{n}"))
    bridge.wait_stat("file_transfers_completed", 2, timeout=60)

    status, report = verify(case, files, log, case.topic, case.dead_letter)
    assert (status, report["verdict"], report["lost"]) == (1, "lost", 2), report
    assert sorted(x["device_id"] for x in report["lost_first"]) == ["cam-0", "cam-1"]
    assert report["found"] == 5 * 20
