"""The daemon under systemd's notify protocol: a real datagram socket where systemd's would be.

READY=1 must wait until the broker is reachable (and Kafka answered), WATCHDOG=1 must come
from the event loop as often as WATCHDOG_USEC asks, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.devkit.localstack import mosquitto_service, s3_environment
from tests.conftest import ROOT, Case

pytestmark = pytest.mark.integration


class NotifySocket:
    """What systemd listens on: an abstract AF_UNIX datagram socket."""

    def __init__(self) -> None:
        self.name = f"@mkb-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.got.append((time.monotonic(), line))

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, seen in self.got:
                if seen == line:
                    return at
            self.collect(0.2)
        raise AssertionError(f"no {line} within {timeout} s; got {self.got[-10:]}")

    def lines(self, prefix: str) -> list[str]:
        return [line for _, line in self.got if line.startswith(prefix)]


def test_ready_only_once_the_broker_is_reachable_then_watchdog_and_stopping(
        case: Case, tmp_path: Path) -> None:
    broker = mosquitto_service(tmp_path / "late-broker")  # not started yet
    config = case.config().read_text().replace(case.stack.mqtt_url,
                                               f"mqtt://127.0.0.1:{broker.port}")
    path = tmp_path / "notify.toml"
    path.write_text(config)
    notify = NotifySocket()
    env = {**os.environ, **s3_environment(), "NOTIFY_SOCKET": notify.name,
           "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "bridge.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "run", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        notify.collect(5)  # the broker is down: alive (watchdog), not ready
        assert "READY=1" not in [line for _, line in notify.got], notify.got
        assert len(notify.lines("WATCHDOG=1")) >= 3, notify.got
        assert any("waiting for mqtt" in line for line in notify.lines("STATUS=")), notify.got
        broker.start()
        ready_at = notify.wait_for("READY=1", timeout=30)
        log_text = (tmp_path / "bridge.log").read_text()
        assert '"mqtt_subscribed"' in log_text
        notify.collect(3)
        pings = [at for at, line in notify.got if line == "WATCHDOG=1" and at > ready_at]
        assert len(pings) >= 4, notify.got  # every half second with WatchdogSec=1
        assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=10)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        broker.stop()
