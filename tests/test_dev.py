"""`mqtt-kafka-bridge dev` as a newcomer runs it: it says what it started, sends a dead letter
labelled as a demo, prints how far it got when it has been quiet, and Ctrl-C stops it all."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bridge.devkit.tail import records
from tests.conftest import ROOT

PROGRESS = re.compile(r"dev: (\d+) messages bridged, (\d+) dead-lettered so far \(Ctrl-C stops\)")


class Dev:
    """`dev` as a child; its stdout read line by line."""

    def __init__(self, tmp: Path) -> None:
        self.stderr = (tmp / "dev.stderr").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "dev", "--workdir", str(tmp / "work"),
             "--rate", "20", "--progress-after", "3"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"dev printed no line matching {pattern!r} within {timeout} s")


def refused(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.integration
def test_dev_says_what_it_started_labels_its_demo_and_reports_progress(tmp_path: Path) -> None:
    dev = Dev(tmp_path)
    try:
        dev.until(r"^mqtt-kafka-bridge dev: started, data and logs in ")
        mqtt = dev.until(r"^  Mosquitto +(mqtt://127\.0\.0\.1:\d+)$")[1]
        kafka, topics = dev.until(r"^  Kafka \(Tansu\) +(127\.0\.0\.1:\d+) +topics (.+)$").groups()
        s3 = dev.until(r"^  S3 \(moto\) +(http://127\.0\.0\.1:\d+) +bucket iot-payloads$")[1]
        assert topics.split(", ") == sorted(["iot.alerts", "iot.deadletter", "iot.files",
                                            "iot.status", "iot.telemetry"])
        demo = dev.until(r"^dev: published a demo dead letter on (\S+) \(not a valid device "
                         rf"id\); see it: .* tail --bootstrap {kafka} iot.deadletter$")[1]
        assert demo == "devices/demo:dead-letter/telemetry"
        bridged = dead = 0
        while not (bridged and dead):
            bridged, dead = map(int, dev.until(PROGRESS.pattern, timeout=30).groups())
        assert dead == 1
        [(_key, letter)] = [r for r in records(kafka, "iot.deadletter", idle=2.0)
                            if r[1]["mqtt"]["topic"] == demo]
        assert letter["error"]["code"] == "invalid_device_id"
        assert letter["body"] == b"dev's demo dead letter: its device id is not valid"
        dev.proc.send_signal(signal.SIGINT)
        assert dev.proc.wait(60) == 0
        assert all(refused(url) for url in (mqtt, kafka, s3)), "dev left a server running"
    finally:
        if dev.proc.poll() is None:
            dev.proc.send_signal(signal.SIGINT)  # so it stops the servers it started
            try:
                dev.proc.wait(30)
            except subprocess.TimeoutExpired:
                dev.proc.kill()
        dev.stderr.close()
    assert "Traceback" not in (tmp_path / "dev.stderr").read_text()
