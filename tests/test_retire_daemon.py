"""Daemon.retire against signals and reloads, on a scripted broker and a Kafka that is not
there (no record is produced: the broker sends no PUBLISH)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import mqtt5
import pytest

import bridge.daemon
from bridge import config as config_module
from bridge.daemon import Daemon
from tests.test_mqtt_session import ScriptedBroker, until


def daemon_config(port: int, routes: list[dict[str, Any]], version: bytes) -> config_module.Config:
    return config_module.parse({
        "bridge": {"instance": "retire", "log_format": "json", "stats_interval": 3600},
        "brokers": [{"url": f"mqtt://127.0.0.1:{port}", "client_id": "mkb-retire",
                     "reconnect_min": 0.1, "reconnect_max": 0.2, "presence_prefix": ""}],
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "dead_letter": {"kafka_topic": "dlq"},
        "routes": routes,
    }, source=version)


def without_kafka(monkeypatch: pytest.MonkeyPatch, reload_max: float | None = None) -> None:
    """A daemon with no Kafka behind it: priming gives up after 0.1 s (a reload's after
    `reload_max`, if given) and the check of the Kafka topics is skipped."""
    monkeypatch.setattr(bridge.daemon, "_PRIME_MAX", 0.1)
    if reload_max is not None:
        monkeypatch.setattr(bridge.daemon, "_PRIME_RELOAD_MAX", reload_max)

    async def no_check(self: Daemon) -> None:
        return None

    monkeypatch.setattr(Daemon, "_check_topics", no_check)


BULK = {"name": "t", "filter": "devices/{device_id}/telemetry", "kafka_topic": "t"}
MORE = [BULK, {"name": "a", "filter": "devices/{device_id}/alerts", "kafka_topic": "t"},
        {"name": "f", "filter": "devices/{device_id}/fast", "kafka_topic": "t", "lane": "fast"}]


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_retire_or_stop_during_a_reload_is_not_undone_by_it(
        monkeypatch: pytest.MonkeyPatch, sig: str) -> None:
    """SIGHUP, then SIGUSR1 while the reload primes its producers (up to 10 s): the reload
    must not then apply its config to a retiring daemon. On main it subscribed the retiring
    session again (so it never drains, or ends subscribed) and opened a session for the new
    lane that nothing retires: the daemon exits 0 'retired' leaving that session, subscribed,
    on the broker, where what it queues waits for a bridge that never comes back. A SIGTERM
    during a reload did the same: the reload applied after `bridge_stopped`."""
    without_kafka(monkeypatch, reload_max=0.5)

    async def body() -> None:
        async with ScriptedBroker() as broker:
            first = daemon_config(broker.port, [BULK], b"v1")
            second = daemon_config(broker.port, MORE, b"v2")
            daemon = Daemon(first, loader=lambda: second)
            running = asyncio.create_task(daemon.run())
            try:
                conn = await broker.connection(0, timeout=5)
                await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE", 5)
                daemon._on_reload_signal()
                await asyncio.sleep(0.05)
                if sig == "SIGUSR1":
                    daemon.retire()
                else:
                    daemon._on_signal(signal.SIGTERM)
                await until(lambda: not daemon._reloading, "the reload to finish", 10)
                await asyncio.sleep(0.3)
                kinds = [type(p).__name__ for p in conn.packets]
                assert kinds.count("SubscribePacket") == 1, kinds
                ids = [c.of(mqtt5.ConnectPacket)[0].client_id for c in broker.connections]
                assert ids == ["mkb-retire"], ids
            finally:
                daemon.stop()
                await asyncio.wait_for(running, 30)

    asyncio.run(asyncio.wait_for(body(), 60))


class SlowUnsubscribe(ScriptedBroker):
    """Answers no UNSUBSCRIBE of `client_id` until the test says so: a session whose
    retire takes a while (a queue to drain, a slow broker)."""

    def __init__(self, client_id: str) -> None:
        super().__init__()
        self.held_id = client_id
        self.held: list[tuple[Any, int, int]] = []

    def _answer(self, conn: Any, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.UnsubscribePacket) and \
                conn.of(mqtt5.ConnectPacket)[0].client_id == self.held_id:
            self.held.append((conn, packet.packet_id, len(packet.patterns)))
            return
        super()._answer(conn, packet)

    def release(self) -> None:
        for conn, packet_id, count in self.held:
            conn.send(mqtt5.UnsubAckPacket(packet_id, [
                mqtt5.UnsubAckReasonCode.SUCCESS] * count).write())
        self.held.clear()


def test_a_retire_waits_for_the_sessions_a_reload_removed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload removed the fast lane; its session is still retiring (handing over what
    its broker queued) when SIGUSR1 comes. On main the daemon counted only its current
    sessions: once bulk ended it stopped, cancelled the fast lane's retire and closed that
    session keeping it, with what it still queued, for a bridge that is not coming back
    (exit 0: not restarted), and said bridge_retired."""
    without_kafka(monkeypatch, reload_max=0.1)

    async def body() -> None:
        async with SlowUnsubscribe("mkb-retire-fast") as broker:
            first = daemon_config(broker.port, MORE, b"v1")
            second = daemon_config(broker.port, [BULK], b"v2")
            daemon = Daemon(first, loader=lambda: second)
            running = asyncio.create_task(daemon.run())
            try:
                await broker.connection(1, timeout=5)
                await until(lambda: all(c.of(mqtt5.SubscribePacket)
                                        for c in broker.connections), "SUBSCRIBEs", 5)
                fast = next(c for c in broker.connections
                            if c.of(mqtt5.ConnectPacket)[0].client_id == "mkb-retire-fast")
                daemon._on_reload_signal()
                await until(lambda: daemon._leaving, "the fast lane to be leaving", 10)
                await until(lambda: not daemon._reloading, "the reload to finish", 10)
                daemon.retire()
                await asyncio.sleep(4)  # bulk is quiet and ends
                assert not fast.disconnects(), "the fast session was closed, kept"
                assert not running.done()
                broker.release()
                await asyncio.wait_for(asyncio.shield(running), 15)
                assert daemon.retired
                assert [d.session_expiry_interval for d in fast.disconnects()] == [0]
            finally:
                daemon.stop()
                await asyncio.wait_for(running, 30)

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_retire_after_a_stop_leaves_the_sessions_subscribed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (a restart), then SIGUSR1 while the shutdown waits for Kafka: on main the
    retire unsubscribed every session, which the shutdown then kept: until the restarted
    bridge subscribed again, nothing published was queued for it (lost)."""
    without_kafka(monkeypatch)

    async def body() -> None:
        async with ScriptedBroker() as broker:
            daemon = Daemon(daemon_config(broker.port, [BULK], b"v1"))
            running = asyncio.create_task(daemon.run())
            try:
                conn = await broker.connection(0, timeout=5)
                await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE", 5)
                daemon._on_signal(signal.SIGTERM)
                daemon.retire()
                await asyncio.wait_for(asyncio.shield(running), 30)
                await until(lambda: conn.eof, "the connection closed", 5)
                assert not conn.of(mqtt5.UnsubscribePacket)
                assert [d.session_expiry_interval for d in conn.disconnects()] == [None]
            finally:
                daemon.stop()
                await asyncio.wait_for(running, 30)

    asyncio.run(asyncio.wait_for(body(), 60))


EARLY = """
import os, signal, sys
import bridge.cli as cli
load = cli._load
def _load(path, *rest):
    os.kill(os.getpid(), signal.SIGUSR1)  # `retire` while the bridge starts up
    return load(path, *rest)
cli._load = _load
sys.exit(cli.main(["run", "--config", sys.argv[1]]))
"""


def test_a_sigusr1_during_start_up_retires_rather_than_kills(tmp_path: Any) -> None:
    """On main the signal's default action ended the process at once (exit -10): no
    session ended, while `retire` saw it gone and said 'retired its sessions and exited'."""
    import subprocess
    import sys
    import time

    config = tmp_path / "bridge.toml"
    config.write_text('[bridge]\ninstance = "early"\nlog_format = "json"\n'
                      '[[brokers]]\nurl = "mqtt://127.0.0.1:1"\nclient_id = "mkb-early"\n'
                      '[kafka]\n"bootstrap.servers" = "127.0.0.1:1"\n'
                      '[dead_letter]\nkafka_topic = "dlq"\n'
                      '[[routes]]\nfilter = "devices/{device_id}/telemetry"\nkafka_topic = "t"\n')
    proc = subprocess.Popen([sys.executable, "-c", EARLY, str(config)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline, seen = time.monotonic() + 20, ""
        while "bridge_retiring" not in seen and proc.poll() is None and \
                time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert "bridge_retiring" in seen, (proc.poll(), seen[-2000:])
    finally:
        proc.terminate()
        proc.wait(30)


def test_retire_knows_a_daemon_by_its_command_word() -> None:
    """On main `run --config=FILE` (argparse takes it; a unit file may say it) was 'not a
    bridge daemon', so `retire` refused it; and `adopt ... --client-id run` was one."""
    from bridge.cli import _is_daemon

    assert _is_daemon(["/opt/mkb/bin/mqtt-kafka-bridge", "run", "--config=/etc/b.toml"])
    assert _is_daemon(["/usr/bin/python3", "/opt/mkb/bin/mqtt-kafka-bridge", "run",
                       "--config", "/etc/b.toml"])
    assert _is_daemon(["python", "-m", "bridge", "run", "--config", "b.toml"])
    assert not _is_daemon(["/opt/mkb/bin/mqtt-kafka-bridge", "adopt", "--config", "b.toml",
                           "--client-id", "run"])
    assert not _is_daemon(["sleep", "30"])
    assert not _is_daemon(["/opt/mkb/bin/mqtt-kafka-bridge", "retire", "--pid", "1"])
