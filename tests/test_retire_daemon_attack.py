"""Attacks on Daemon.retire against a scripted broker and a Kafka that is not there (no
record is produced: the broker sends no PUBLISH)."""

from __future__ import annotations

import asyncio
from typing import Any

import mqtt5
import pytest

import bridge.daemon
from bridge import config as config_module
from bridge.daemon import Daemon
from tests.test_mqtt_session import ScriptedBroker, until


def daemon_config(port: int, routes: list[dict[str, Any]], version: bytes) -> config_module.Config:
    return config_module.parse({
        "bridge": {"instance": "attack", "log_format": "json", "stats_interval": 3600},
        "brokers": [{"url": f"mqtt://127.0.0.1:{port}", "client_id": "mkb-attack",
                     "reconnect_min": 0.1, "reconnect_max": 0.2, "presence_prefix": ""}],
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "dead_letter": {"kafka_topic": "dlq"},
        "routes": routes,
    }, source=version)


BULK = {"name": "t", "filter": "devices/{device_id}/telemetry", "kafka_topic": "t"}
MORE = [BULK, {"name": "a", "filter": "devices/{device_id}/alerts", "kafka_topic": "t"},
        {"name": "f", "filter": "devices/{device_id}/fast", "kafka_topic": "t", "lane": "fast"}]


@pytest.mark.parametrize("signal", ["SIGUSR1", "SIGTERM"])
def test_a_retire_or_stop_during_a_reload_is_not_undone_by_it(
        monkeypatch: pytest.MonkeyPatch, signal: str) -> None:
    """SIGHUP, then SIGUSR1 while the reload primes its producers (up to 10 s): the reload
    must not then apply its config to a retiring daemon. On main it subscribed the retiring
    session again (so it never drains, or ends subscribed) and opened a session for the new
    lane that nothing retires: the daemon exits 0 'retired' leaving that session, subscribed,
    on the broker, where what it queues waits for a bridge that never comes back. A SIGTERM
    during a reload did the same: the reload applied after `bridge_stopped`."""
    monkeypatch.setattr(bridge.daemon, "_PRIME_MAX", 0.1)
    monkeypatch.setattr(bridge.daemon, "_PRIME_RELOAD_MAX", 0.5)

    async def no_check(self: Daemon) -> None:
        return None

    monkeypatch.setattr(Daemon, "_check_topics", no_check)

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
                if signal == "SIGUSR1":
                    daemon.retire()
                else:
                    daemon._on_signal(__import__("signal").SIGTERM)
                await until(lambda: not daemon._reloading, "the reload to finish", 10)
                await asyncio.sleep(0.3)
                kinds = [type(p).__name__ for p in conn.packets]
                assert kinds.count("SubscribePacket") == 1, kinds
                ids = [c.of(mqtt5.ConnectPacket)[0].client_id for c in broker.connections]
                assert ids == ["mkb-attack"], ids
            finally:
                daemon.stop()
                await asyncio.wait_for(running, 30)

    asyncio.run(asyncio.wait_for(body(), 60))
