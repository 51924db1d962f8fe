"""Fixtures: one real local stack per session, a bridge process per test, unique topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.devkit.localstack import LocalStack, s3_environment
from bridge.devkit.tail import records

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack")) as local:
        yield local


class Bridge:
    """The bridge as a child process, as systemd would run it: kill -9 and SIGTERM are real."""

    def __init__(self, config: Path, log: Path, module: str = "bridge",
                 env: dict[str, str] | None = None) -> None:
        self.config, self.log, self.module = config, log, module  # tests.faults injects faults
        self.env = env or {}  # e.g. what ${NAME} in the config's identities names
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Bridge:
        """Start and wait until the session is ready: resumed, or new and subscribed."""
        before = self.events_count()
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "run", "--config",
                                      str(self.config)], stdout=self._log_file,
                                     stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **s3_environment(), **self.env})
        connected = self.wait_for("mqtt_connected", after=before)
        if not connected["session_present"]:
            self.wait_for("mqtt_subscribed", after=before)
        return self

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "raw", "line": line})
        return out

    def events_count(self) -> int:
        return len(self.events())

    def wait_for(self, event: str, timeout: float = 30, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events()[after:]:
                if e.get("event") == event:
                    return e
            assert self.proc is None or self.proc.poll() is None, \
                f"bridge exited:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no {event} within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stats(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "bridge_stats"]

    def wait_stat(self, name: str, at_least: int, timeout: float = 60) -> int:
        """Wait until the stats log says `name` >= at_least; returns the value."""
        deadline = time.monotonic() + timeout
        value = 0
        while time.monotonic() < deadline:
            stats = self.stats()
            value = stats[-1].get(name, 0) if stats else 0
            if value >= at_least:
                return int(value)
            time.sleep(0.1)
        raise AssertionError(f"{name} stayed at {value} < {at_least}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Case:
    """One test's own MQTT prefix, Kafka topics and bridge session id on the shared stack."""

    def __init__(self, stack: LocalStack, tmp: Path) -> None:
        self.stack, self.tmp = stack, tmp
        tag = uuid.uuid4().hex[:10]
        self.prefix = f"t{tag}"
        self.topic = f"data.{tag}"
        self.dead_letter = f"dl.{tag}"
        self.client_id = f"mkb-{tag}"
        stack.create_topics([self.topic, self.dead_letter])
        self.bridges: list[Bridge] = []

    def config(self, extra_broker: str = "", extra_kafka: str = "", shutdown_timeout: float = 30,
               routes: str | None = None, name: str = "bridge.toml", extra: str = "") -> Path:
        routes = routes if routes is not None else f"""
[[routes]]
name = "telemetry"
filter = "{self.prefix}/{{device_id}}/telemetry"
kafka_topic = "{self.topic}"
"""
        path = self.tmp / name
        path.write_text(f"""
[bridge]
instance = "test-{self.client_id}"
shutdown_timeout = {shutdown_timeout}
log_format = "json"
stats_interval = 1
[[brokers]]
url = "{self.stack.mqtt_url}"
client_id = "{self.client_id}"
keepalive = 10
reconnect_max = 2
{extra_broker}
[kafka]
"bootstrap.servers" = "{self.stack.bootstrap}"
{extra_kafka}
{extra}
[dead_letter]
kafka_topic = "{self.dead_letter}"
{routes}
""")
        return path

    def two_lanes(self) -> str:
        """Routes on two lanes, so two sessions and two producers: telemetry on bulk,
        alerts on fast, both into the test's topic."""
        return f"""
[[routes]]
name = "telemetry"
filter = "{self.prefix}/{{device_id}}/telemetry"
kafka_topic = "{self.topic}"
[[routes]]
name = "alerts"
filter = "{self.prefix}/{{device_id}}/alerts"
kafka_topic = "{self.topic}"
lane = "fast"
"""

    def bridge(self, config: Path | None = None, start: bool = True,
               module: str = "bridge", env: dict[str, str] | None = None) -> Bridge:
        bridge = Bridge(config or self.config(), self.tmp / f"bridge-{len(self.bridges)}.log",
                        module, env)
        self.bridges.append(bridge)
        return bridge.start() if start else bridge

    def read(self, topic: str | None = None, expect: int | None = None,
             timeout: float = 120) -> list[tuple[bytes | None, dict[str, Any]]]:
        """Every record of the topic; with `expect`, keep reading until that many distinct
        (device, seq) payloads are in or the timeout passes."""
        topic = topic or self.topic
        deadline = time.monotonic() + timeout
        while True:
            got = list(records(self.stack.bootstrap, topic, idle=2.0, deadline=deadline))
            if expect is None or len(distinct(got)) >= expect or time.monotonic() > deadline:
                return got
            time.sleep(1)


def distinct(got: list[tuple[bytes | None, dict[str, Any]]]) -> set[tuple[str, int]]:
    """The (device, seq) pairs in the payloads of the envelopes read."""
    out = set()
    for _key, env in got:
        body = json.loads(env["body"])
        out.add((body["device"], body["seq"]))
    return out


@pytest.fixture
def case(stack: LocalStack, tmp_path: Path) -> Iterator[Case]:
    c = Case(stack, tmp_path)
    yield c
    for bridge in c.bridges:
        bridge.stop()
    for service in (stack.kafka, stack.mqtt):
        if service.alive:
            service.resume()
        else:
            service.start()

