"""simulate's fleet: the pure parts (payload, log lines, backoff, rate), the MQTT state
machine against a scripted in-process broker (window, refusals, drops), and integration
runs on the real local Mosquitto (a subscriber sees every acked message, a herd, a broker
restart mid-run, the CLI)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mqtt5
import pytest

from bridge.devkit import fleet, simulate
from bridge.devkit.localstack import LocalStack
from bridge.mqtt import packet_length
from tests.conftest import ROOT

RUN = "r1764600000-3f2a"


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outcomes(lines: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(line["outcome"] for line in lines)


# --- pure parts ---------------------------------------------------------------------------

def test_the_payload_is_exactly_size_bytes_and_carries_the_trace() -> None:
    minimal = len(fleet.payload(RUN, "dev-00042", 17, 1764600000123456789, 0))
    for size in [*range(minimal - 2, minimal + 30), 200, 4096]:
        body = fleet.payload(RUN, "dev-00042", 17, 1764600000123456789, size)
        assert len(body) == max(size, minimal)
        decoded = json.loads(body)
        assert {k: decoded[k] for k in ("device_id", "seq", "sent_ns", "run")} == {
            "device_id": "dev-00042", "seq": 17, "sent_ns": 1764600000123456789, "run": RUN}
        assert set(decoded) <= {"device_id", "seq", "sent_ns", "run", "pad"}
    assert "pad" not in json.loads(fleet.payload(RUN, "d", 0, 1, 0))


def test_log_lines_follow_the_contract() -> None:
    p = fleet.Publish("dev-00042", 17, "devices/dev-00042/telemetry", 1, 1764600000123456789)
    acked = json.loads(fleet.log_line(RUN, p, "acked", 1764600000125000000))
    assert list(acked.items()) == [
        ("run", RUN), ("device_id", "dev-00042"), ("seq", 17),
        ("topic", "devices/dev-00042/telemetry"), ("qos", 1),
        ("sent_ns", 1764600000123456789), ("outcome", "acked"),
        ("acked_ns", 1764600000125000000)]
    refused = json.loads(fleet.log_line(RUN, p, "refused", reason_code=0x87))
    assert refused["reason_code"] == 135 and "acked_ns" not in refused
    for outcome in ("unknown", "sent"):
        line = fleet.log_line(RUN, p, outcome)
        assert line.endswith("}\n") and line.count("\n") == 1
        assert set(json.loads(line)) == set(acked) - {"acked_ns"}


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(5.0, 0.1 * 2 ** attempt)
        waits = [fleet.backoff(attempt, 0.1, 5.0, rng) for _ in range(300)]
        assert all(0 <= w <= cap for w in waits)
        assert min(waits) < cap * 0.1 and max(waits) > cap * 0.9  # spread over all of it


def test_the_rate_schedule_spreads_the_fleet_total_evenly() -> None:
    assert [fleet.due(k, 4.0) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]

    async def paced() -> float:
        pacer = fleet.Pacer(500.0)
        start = time.monotonic()
        for _ in range(101):
            await pacer.wait()
        return time.monotonic() - start

    assert 0.19 <= asyncio.run(paced()) < 1.0  # a loaded machine sleeps late, never early


def test_device_ids_and_run_ids() -> None:
    spec = fleet.FleetSpec("mqtt://127.0.0.1", devices=3, first_device=41)
    assert spec.device_ids() == ["dev-00041", "dev-00042", "dev-00043"]
    assert fleet.new_run_id() != fleet.new_run_id()
    assert fleet.new_run_id().startswith("r")


def test_the_fd_limit_is_lifted_or_the_need_said() -> None:
    assert fleet.raise_fd_limit(100) >= 100
    with pytest.raises(ValueError, match="hard limit"):
        fleet.raise_fd_limit(10**12)


# --- the state machine against a scripted broker ------------------------------------------

class ScriptedBroker:
    """An MQTT 5 server in the test's event loop: CONNACK with `receive_max`, then
    `answer(publish, n)` per PUBLISH: "ack", "refuse", "hold" (never answered) or "drop"
    (close the connection). Records the most publishes ever unanswered at once."""

    def __init__(self, receive_max: int, answer: Callable[[mqtt5.PublishPacket, int], str],
                 ack_delay: float = 0.0) -> None:
        self.receive_max, self.answer, self.ack_delay = receive_max, answer, ack_delay
        self.unanswered, self.most_unanswered, self.received = 0, 0, 0
        self.connects, self.connects_before_publishing = 0, 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                while (n := packet_length(buffer, 0)) is not None and len(buffer) >= n:
                    packet = mqtt5.read(memoryview(buffer)[:n])[0]
                    del buffer[:n]
                    if not self._on(packet, writer):
                        writer.close()
                        return
        except ConnectionError:
            pass

    def _on(self, packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> bool:
        if isinstance(packet, mqtt5.ConnectPacket):
            self.connects += 1
            writer.write(mqtt5.ConnAckPacket(receive_max=self.receive_max).write())
        elif isinstance(packet, mqtt5.PublishPacket):
            return self._on_publish(packet, writer)
        elif isinstance(packet, mqtt5.PubRelPacket):
            writer.write(mqtt5.PubCompPacket(packet.packet_id).write())
        elif isinstance(packet, mqtt5.DisconnectPacket):
            return False
        return True

    def _on_publish(self, packet: mqtt5.PublishPacket, writer: asyncio.StreamWriter) -> bool:
        self.received += 1
        if self.received == 1:
            self.connects_before_publishing = self.connects
        what = self.answer(packet, self.received)
        if what == "drop":
            return False
        if packet.packet_id is None or what == "hold":
            return True
        self.unanswered += 1
        self.most_unanswered = max(self.most_unanswered, self.unanswered)
        code = 0x87 if what == "refuse" else 0
        ack = (mqtt5.PubRecPacket(packet.packet_id, reason_code=mqtt5.PubRecReasonCode(code))
               if packet.qos == 2 else
               mqtt5.PubAckPacket(packet.packet_id, reason_code=mqtt5.PubAckReasonCode(code)))

        def send() -> None:
            self.unanswered -= 1
            writer.write(ack.write())
        asyncio.get_running_loop().call_later(self.ack_delay, send)
        return True


def scripted(tmp_path: Path, answer: Callable[[mqtt5.PublishPacket, int], str], *,
             receive_max: int = 20, ack_delay: float = 0.0, **spec: Any,
             ) -> tuple[fleet.FleetReport, list[dict[str, Any]], ScriptedBroker]:
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "sim.jsonl"
    broker = ScriptedBroker(receive_max, answer, ack_delay)

    async def main() -> fleet.FleetReport:
        async with broker as url:
            return await fleet.run_async(fleet.FleetSpec(
                url, log=log, run_id=RUN, backoff_base=0.01, backoff_cap=0.05,
                settle_timeout=0.5, **spec))

    report = asyncio.run(main())
    return report, read_log(log) if log.exists() else [], broker


@pytest.mark.parametrize("qos", [1, 2])
def test_the_window_is_the_brokers_receive_maximum(tmp_path: Path, qos: int) -> None:
    report, lines, broker = scripted(tmp_path, lambda _p, _n: "ack", receive_max=3,
                                     ack_delay=0.002, devices=1, messages=60, qos=qos)
    assert broker.most_unanswered == 3  # used to the full, never exceeded
    assert report.acked == 60 and outcomes(lines) == {"acked": 60}
    assert [line["seq"] for line in lines] == list(range(60))


def test_a_refusal_is_logged_with_its_reason_code(tmp_path: Path) -> None:
    def answer(packet: mqtt5.PublishPacket, _n: int) -> str:
        return "refuse" if json.loads(packet.payload)["seq"] % 2 else "ack"

    for qos in (1, 2):
        report, lines, _ = scripted(tmp_path / str(qos), answer, devices=2, messages=10, qos=qos)
        assert report.refused == 10 and report.acked == 10
        refused = [line for line in lines if line["outcome"] == "refused"]
        assert {line["reason_code"] for line in refused} == {135}
        assert all(line["seq"] % 2 for line in refused)


def test_a_drop_before_the_ack_is_unknown_and_the_device_goes_on_with_new_seqs(
        tmp_path: Path) -> None:
    """The broker holds publishes 5-9 unanswered and drops the connection on the 10th:
    those never get an `acked` line; after the reconnect the device sends fresh seqs."""
    def answer(_packet: mqtt5.PublishPacket, n: int) -> str:
        return "hold" if 5 <= n < 10 else "drop" if n == 10 else "ack"

    report, lines, _ = scripted(tmp_path, answer, devices=1, messages=30, qos=1)
    by_seq = {line["seq"]: line["outcome"] for line in lines}
    assert len(lines) == len(by_seq) == 30  # one line per seq, each seq sent once
    assert all(by_seq[s] == "unknown" for s in range(5, 10))
    assert outcomes(lines)["unknown"] >= 6 and report.connects == 2 and report.errors == 1
    assert all(by_seq[s] == "acked" for s in range(10, 30) if by_seq[s] != "unknown")


def test_the_end_of_the_run_settles_unanswered_publishes_as_unknown(tmp_path: Path) -> None:
    report, lines, _ = scripted(tmp_path, lambda _p, n: "hold" if n > 4 else "ack",
                                devices=1, messages=8)
    assert outcomes(lines) == {"acked": 4, "unknown": 4} and report.unknown == 4


def test_outside_a_herd_the_fleet_publishes_once_every_device_is_connected(
        tmp_path: Path) -> None:
    report, _, broker = scripted(tmp_path, lambda _p, _n: "ack", devices=200, messages=2)
    assert broker.connects_before_publishing == 201  # the probe and every device
    assert report.acked == 400 and report.connect_seconds is not None


def test_qos0_is_sent_and_the_duration_bounds_the_run(tmp_path: Path) -> None:
    report, lines, broker = scripted(tmp_path, lambda _p, _n: "ack", devices=3,
                                     messages=None, duration=0.5, rate=200.0, qos=0)
    assert outcomes(lines) == {"sent": report.published} and broker.received == report.published
    assert 60 <= report.published <= 110  # 200 msg/s for 0.5 s
    assert report.seconds < 2


# --- the real Mosquitto ---------------------------------------------------------------------

class Subscriber:
    """A paho client subscribed to PREFIX/+/telemetry that keeps each payload."""

    def __init__(self, url: str, prefix: str) -> None:
        self.payloads: list[bytes] = []
        self.client = simulate.device_client(url, f"sub-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda _c, _u, m: self.payloads.append(bytes(m.payload))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.subscribe(f"{prefix}/+/telemetry", qos=1)
        assert subscribed.wait(10)

    def seen(self, count: int, timeout: float = 20) -> set[tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while len(self.payloads) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return {(p["device_id"], p["seq"]) for p in map(json.loads, list(self.payloads))}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    return f"sim{uuid.uuid4().hex[:8]}"


@pytest.fixture
def subscriber(stack: LocalStack, prefix: str) -> Iterator[Subscriber]:
    sub = Subscriber(stack.mqtt_url, prefix)
    yield sub
    sub.close()


@pytest.mark.integration
@pytest.mark.parametrize("qos", [1, 2])
def test_fifty_devices_each_acked_publish_is_logged_once_and_delivered(
        stack: LocalStack, subscriber: Subscriber, prefix: str, tmp_path: Path,
        qos: int) -> None:
    log = tmp_path / "sim.jsonl"
    report = fleet.run(fleet.FleetSpec(stack.mqtt_url, devices=50, messages=20, qos=qos,
                                       prefix=prefix, log=log, id_prefix=f"{prefix}-"))
    lines = read_log(log)
    assert outcomes(lines) == {"acked": 1000} and report.acked == 1000
    logged = {(line["device_id"], line["seq"]) for line in lines}
    assert len(logged) == 1000
    assert subscriber.seen(1000) == logged
    assert {line["run"] for line in lines} == {report.run}
    assert all(line["topic"] == f"{prefix}/{line['device_id']}/telemetry" for line in lines)


@pytest.mark.integration
def test_qos0_publishes_are_logged_sent(stack: LocalStack, subscriber: Subscriber,
                                        prefix: str, tmp_path: Path) -> None:
    log = tmp_path / "sim.jsonl"
    fleet.run(fleet.FleetSpec(stack.mqtt_url, devices=10, messages=10, qos=0, prefix=prefix,
                              log=log, id_prefix=f"{prefix}-"))
    assert outcomes(read_log(log)) == {"sent": 100}
    assert len(subscriber.seen(100)) >= 90  # QoS 0 on loopback: nearly all, none promised


@pytest.mark.integration
def test_a_herd_of_500_connections_from_one_process(stack: LocalStack, prefix: str,
                                                    tmp_path: Path) -> None:
    report = fleet.run(fleet.FleetSpec(stack.mqtt_url, devices=500, messages=2, herd=True,
                                       prefix=prefix, id_prefix=f"{prefix}-",
                                       log=tmp_path / "sim.jsonl"))
    assert report.acked == 1000 and report.gave_up == 0 and report.connects >= 500
    assert len({line["device_id"] for line in read_log(tmp_path / "sim.jsonl")}) == 500


@pytest.mark.integration
def test_a_broker_restart_mid_run_leaves_unknowns_never_acked(stack: LocalStack, prefix: str,
                                                              tmp_path: Path) -> None:
    log = tmp_path / "sim.jsonl"
    spec = fleet.FleetSpec(stack.mqtt_url, devices=20, messages=None, duration=3.0,
                           prefix=prefix, id_prefix=f"{prefix}-", log=log,
                           backoff_base=0.05, backoff_cap=0.5, settle_timeout=2.0)
    done: list[fleet.FleetReport] = []
    runner = threading.Thread(target=lambda: done.append(fleet.run(spec)))
    runner.start()
    try:
        time.sleep(1.0)
        stack.mqtt.kill()  # mid-stream: acks in flight are lost with the connections
        time.sleep(0.3)
    finally:
        stack.mqtt.start()
    runner.join(30)
    assert done, "the fleet did not end"
    lines = read_log(log)
    by_key = collections.defaultdict(list)
    for line in lines:
        by_key[(line["device_id"], line["seq"])].append(line["outcome"])
    assert all(len(o) == 1 for o in by_key.values())  # one line per publish, never two
    counts = outcomes(lines)
    assert counts["unknown"] > 0 and counts["acked"] > 0 and done[0].errors >= 20
    assert done[0].connects >= 40  # every device came back
    last_unknown = max(line["sent_ns"] for line in lines if line["outcome"] == "unknown")
    assert any(line["outcome"] == "acked" and line["sent_ns"] > last_unknown
               for line in lines), "nothing acked after the restart"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", "simulate", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    return line


def test_cli_mistakes_are_one_line(tmp_path: Path) -> None:
    assert one_line(cli("--duration", "2", "--messages", "3")) == (
        "mqtt-kafka-bridge simulate: --duration and --messages exclude each other: give one")
    missing = tmp_path / "no" / "sim.jsonl"
    assert one_line(cli("--log", str(missing))) == (
        f"mqtt-kafka-bridge simulate: cannot write --log {missing}: No such file or directory")
    assert one_line(cli("--log", str(tmp_path))).endswith(f"--log {tmp_path}: Is a directory")


@pytest.mark.integration
def test_cli_runs_the_fleet_and_logs_a_file_upload(stack: LocalStack, prefix: str,
                                                   tmp_path: Path) -> None:
    log = tmp_path / "sim.jsonl"
    done = cli("--url", stack.mqtt_url, "--devices", "5", "--messages", "4", "--qos", "2",
               "--prefix", prefix, "--log", str(log))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(
        "published 20, acked 20, refused 0, unknown 0, sent 0 in ")
    (tmp_path / "x.bin").write_bytes(b"y" * 3000)
    done = cli("--url", stack.mqtt_url, "--file", str(tmp_path / "x.bin"), "--prefix", prefix,
               "--log", str(log))
    assert done.returncode == 0, done.stderr
    *telemetry, upload = read_log(log)
    assert outcomes(telemetry) == {"acked": 20}
    assert upload["kind"] == "file" and upload["outcome"] == "acked"
    assert upload["size"] == 3000 and upload["name"] == "x.bin"
    assert upload["topic"] == f"{prefix}/dev-00000/files/{upload['file_id']}"
    assert upload["sha256"] == hashlib.sha256(b"y" * 3000).hexdigest()
