"""Start-up primes every lane's producer before any session hands on a PUBLISH.

A fresh idempotent librdkafka producer asks for its producer id only on a 500 ms timer, so
records produced at once waited ~0.5-1 s; the sessions now hold their first PUBLISH until
every producer has its id and Kafka answered its metadata. Both tests run the daemon in
this process on the real local stack, with messages queued in its persistent sessions
while it was away, so PUBLISHes arrive the moment a session connects.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from bridge import config as config_module
from bridge.daemon import Daemon
from bridge.message import Message
from bridge.mqtt import Inflight
from tests.conftest import Case, distinct

pytestmark = pytest.mark.integration
N = 20  # messages per lane


def daemon_config(case: Case) -> config_module.Config:
    port = int(case.stack.mqtt_url.rsplit(":", 1)[1])
    return config_module.parse({
        "bridge": {"instance": "test-priming", "log_format": "json", "stats_interval": 3600},
        "brokers": [{"url": f"mqtt://127.0.0.1:{port}", "client_id": case.client_id,
                     "reconnect_max": 1}],
        "kafka": {"bootstrap.servers": case.stack.bootstrap},
        "dead_letter": {"kafka_topic": case.dead_letter},
        "routes": [
            {"name": "telemetry", "filter": f"{case.prefix}/{{device_id}}/telemetry",
             "kafka_topic": case.topic},
            {"name": "alerts", "filter": f"{case.prefix}/{{device_id}}/alerts",
             "kafka_topic": case.topic, "lane": "fast"},
        ],
    }, source=b"test-priming")


def publish(case: Case, kind: str, count: int) -> None:
    """QoS 1 messages, each acked by the broker, from one paho client."""
    port = int(case.stack.mqtt_url.rsplit(":", 1)[1])
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{case.prefix}-{kind}",
                         protocol=paho.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert connected.wait(10)
        infos = [client.publish(f"{case.prefix}/d-{kind}/{kind}",
                                json.dumps({"device": f"d-{kind}", "seq": seq}), qos=1)
                 for seq in range(count)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


async def run_until(daemon: Daemon, done: Callable[[], bool], timeout: float) -> None:
    running = asyncio.create_task(daemon.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            assert not running.done(), running.result()
            assert asyncio.get_running_loop().time() < deadline, daemon.readiness()
            await asyncio.sleep(0.02)
    finally:
        daemon.stop()
        await running


def watch_handler(daemon: Daemon) -> list[bool]:
    """Record, for every message a session hands on, whether every producer was primed."""
    seen: list[bool] = []
    handle = daemon._handle

    def recording(lane: str, message: Message, inflight: Inflight | None) -> Any:
        seen.append(all(sink.primed.is_set() for sink in daemon.sinks.values()))
        return handle(lane, message, inflight)

    daemon._handle = recording  # type: ignore[method-assign]
    return seen


def open_sessions(case: Case) -> None:
    """Create the daemon's persistent sessions (one per lane), then leave them offline."""
    daemon = Daemon(daemon_config(case))
    asyncio.run(run_until(daemon, lambda: daemon.ready.is_set(), 60))


def acked(daemon: Daemon) -> int:
    return int(daemon.metrics.value("mqtt_acks_sent"))


def test_no_publish_is_handed_on_before_every_producer_is_primed(case: Case) -> None:
    open_sessions(case)
    publish(case, "telemetry", N)
    publish(case, "alerts", N)
    daemon = Daemon(daemon_config(case))
    seen = watch_handler(daemon)
    with capture_logs() as logs:
        asyncio.run(run_until(daemon, lambda: acked(daemon) >= 2 * N, 60))
    assert len(seen) >= 2 * N and all(seen), seen
    events = [e["event"] for e in logs]
    primed = [e for e in logs if e["event"] == "kafka_producer_primed"]
    assert sorted(e["lane"] for e in primed) == ["bulk", "fast"]
    # Both sessions had their queued PUBLISHes before the producers were primed, and held
    # them: the gate, not luck, made the order.
    waited = [i for i, e in enumerate(events) if e == "mqtt_waiting_for_kafka"]
    assert len(waited) == 2, events
    assert max(waited) < events.index("kafka_producer_primed"), events
    assert len(distinct(case.read(expect=2 * N))) == 2 * N


def test_a_kafka_down_at_start_gets_what_it_always_got(case: Case) -> None:
    """Priming holds PUBLISHes for a Kafka that answers soon, not for one that is down:
    then the sessions read as before, nothing is acked, readiness waits, and once Kafka is
    back every message is in it."""
    open_sessions(case)
    publish(case, "telemetry", N)
    publish(case, "alerts", N)
    daemon = Daemon(daemon_config(case))
    seen = watch_handler(daemon)
    checked: dict[str, Any] = {}

    async def scenario() -> None:
        running = asyncio.create_task(run_until(daemon, lambda: acked(daemon) >= 2 * N, 90))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (daemon.primed.is_set() and len(seen) >= 2 * N):
            assert loop.time() < deadline, (len(seen), daemon.readiness())
            await asyncio.sleep(0.05)
        checked.update(waiting=daemon.readiness(), acked=acked(daemon),
                       ready=daemon.ready.is_set())
        case.stack.kafka.resume()
        await running

    case.stack.kafka.pause()
    try:
        with capture_logs() as logs:
            asyncio.run(scenario())
    finally:
        case.stack.kafka.resume()
    assert checked["acked"] == 0 and not checked["ready"], checked
    assert any(w.startswith("kafka ") for w in checked["waiting"]), checked
    assert "kafka_not_primed" in [e["event"] for e in logs]
    assert not all(seen)  # handed on before the producers were primed, as before
    assert all(lane.in_flight == 0 for lane in daemon.metrics.ledger.lanes.values())
    assert len(distinct(case.read(expect=2 * N))) == 2 * N
