"""Topic maps and device authentication on real servers: lanes that do not block each other,
every authentication dead-letter reason, and SIGHUP reloads (good and bad) under a stream."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.devkit import simulate
from bridge.devkit.localstack import KafkaService, kafka_service
from bridge.devkit.tail import records
from tests.conftest import Case, distinct
from tests.test_bridge import assert_all_arrived, publish_as_device, read_until

pytestmark = pytest.mark.integration

KEY = bytes(range(32))


@pytest.fixture
def second_kafka(tmp_path: Path) -> Iterator[KafkaService]:
    """A Kafka of the bulk lane's own, which the test can stop without touching the fast one."""
    service = kafka_service(tmp_path / "bulk-kafka")
    service.start()
    yield service
    if service.alive:
        service.resume()
    service.stop()


def test_fast_lane_keeps_flowing_while_the_bulk_lane_is_backed_up(
        case: Case, second_kafka: KafkaService) -> None:
    """The bulk lane's Kafka is stopped with five windows' worth of messages waiting; fast-lane
    messages still reach their Kafka, because each lane has its own producer and session."""
    bulk_topic = f"bulk.{case.prefix}"
    routes = f"""
[[routes]]
name = "bulk-telemetry"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{bulk_topic}"
[[routes]]
name = "fast-alerts"
filter = "{case.prefix}/{{device_id}}/alerts"
kafka_topic = "{case.topic}"
lane = "fast"
"""
    config = case.config(extra_broker="receive_max = 20", routes=routes, extra_kafka=f"""
[lanes.bulk]
"bootstrap.servers" = "{second_kafka.bootstrap}"
""")
    bridge = case.bridge(config)
    bridge.wait_for("mqtt_subscribed")
    subscribed = [e for e in bridge.events() if e.get("event") == "mqtt_subscribed"]
    assert {e["client_id"] for e in subscribed} >= {case.client_id, f"{case.client_id}-fast"}

    second_kafka.pause()
    simulate.telemetry(case.stack.mqtt_url, devices=5, messages=20, prefix=case.prefix)
    bridge.wait_stat("mqtt_window_full", 1, timeout=30)  # the bulk session's window is full
    simulate.telemetry(case.stack.mqtt_url, devices=5, messages=10, prefix=case.prefix,
                       kind="alerts")
    fast = case.read(expect=50, timeout=60)
    assert len(distinct(fast)) == 50, "fast-lane messages waited behind the bulk lane"
    assert {env["bridge"]["route"] for _, env in fast} == {"fast-alerts"}

    second_kafka.resume()
    bulk = list(records(second_kafka.bootstrap, bulk_topic, idle=2.0,
                        deadline=time.monotonic() + 90))
    deadline = time.monotonic() + 90
    while len(distinct(bulk)) < 100 and time.monotonic() < deadline:
        bulk = list(records(second_kafka.bootstrap, bulk_topic, idle=2.0, deadline=deadline))
    assert len(distinct(bulk)) == 100


def registry_config(case: Case, registry: str) -> Path:
    (case.tmp / "devices.toml").write_text(registry)
    return case.config(routes=f"""
[registry]
file = "devices.toml"
[[routes]]
name = "signed"
filter = "{case.prefix}/{{device_id}}/signed"
kafka_topic = "{case.topic}"
auth = "hmac"
[[routes]]
name = "known"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
auth = "registry"
""")


REGISTRY = f"""
[devices.good]
hmac_key = "{KEY.hex()}"
[devices.gone]
status = "revoked"
hmac_key = "{KEY.hex()}"
"""


def test_each_authentication_failure_is_dead_lettered_and_acked(case: Case) -> None:
    bridge = case.bridge(registry_config(case, REGISTRY))
    p = case.prefix
    publish_as_device(case, [
        simulate.signed(KEY, f"{p}/good/signed", b"ok-1"),
        (f"{p}/good/telemetry", b"ok-2"),
        (f"{p}/good/signed", b"no signature"),
        (f"{p}/good/signed", b"signed something else",
         simulate.signed(KEY, f"{p}/good/signed", b"other")[2]),
        simulate.signed(bytes(32), f"{p}/good/signed", b"wrong key"),
        (f"{p}/stranger/telemetry", b"who?"),
        simulate.signed(KEY, f"{p}/gone/signed", b"revoked"),
        (f"{p}/gone/telemetry", b"revoked too"),
    ])
    data = read_until(case, case.topic, 2)
    assert sorted(env["body"] for _, env in data) == [b"ok-1", b"ok-2"]
    dead = read_until(case, case.dead_letter, 6)
    codes = sorted((env["body"], env["error"]["code"]) for _, env in dead)
    assert codes == [
        (b"no signature", "missing_signature"),
        (b"revoked", "revoked_device"),
        (b"revoked too", "revoked_device"),
        (b"signed something else", "bad_signature"),
        (b"who?", "unknown_device"),
        (b"wrong key", "bad_signature"),
    ]
    assert all(env["bridge"]["route"] in {"signed", "known"} for _, env in dead)
    # Each was acked once its record was in Kafka: none is redelivered forever.
    bridge.wait_stat("mqtt_acks_sent", 8, timeout=30)
    bridge.wait_stat("dead_lettered_messages", 6, timeout=30)
    assert bridge.stats()[-1]["dead_letters"] == {"bad_signature": 2, "missing_signature": 1,
                                                  "revoked_device": 2, "unknown_device": 1}


def map_versions(got: list[tuple[bytes | None, dict[str, Any]]]) -> set[str]:
    return {env["bridge"]["map_version"] for _, env in got}


def test_sighup_reload_switches_the_map_under_a_stream_and_refuses_a_bad_one(case: Case) -> None:
    alerts_topic = f"alerts.{case.prefix}"
    case.stack.create_topics([alerts_topic])
    path = case.config()
    bridge = case.bridge(path)
    old_version = bridge.wait_for("bridge_started")["map_version"]

    # Reload in the middle of 4,000 messages at ~1,000 msg/s.
    stream = threading.Thread(target=simulate.telemetry, kwargs=dict(
        url=case.stack.mqtt_url, devices=20, messages=200, prefix=case.prefix, rate=1000))
    stream.start()
    time.sleep(1.5)
    case.config(routes=f"""
[[routes]]
name = "telemetry"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
key = "device_id"
[[routes]]
name = "alerts"
filter = "{case.prefix}/{{device_id}}/alerts"
kafka_topic = "{alerts_topic}"
lane = "fast"
""")
    before = bridge.events_count()
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGHUP)
    applied = bridge.wait_for("reload_applied", after=before)
    new_version = applied["map_version"]
    assert new_version != old_version
    stream.join()

    duplicates = assert_all_arrived(case, devices=20, messages=200)
    got = case.read()
    assert map_versions(got) == {old_version, new_version}
    for key, env in got:  # records under the new map carry its key strategy
        if env["bridge"]["map_version"] == new_version:
            assert key == env["device_id"].encode()
    assert duplicates < 4000

    # The new filter is live without the bulk session reconnecting.
    publish_as_device(case, [(f"{case.prefix}/d1/alerts", b"fire")])
    [(_, alert)] = read_until(case, alerts_topic, 1)
    assert (alert["body"], alert["bridge"]["route"]) == (b"fire", "alerts")
    bulk_connects = [e for e in bridge.events() if e.get("event") == "mqtt_connected"
                     and e.get("client_id") == case.client_id]
    assert len(bulk_connects) == 1

    # A bad file is refused with key paths; the running map stays and keeps working.
    path.write_text(path.read_text().replace('key = "device_id"', 'key = "bogus"')
                    + "\n[surprise]\n")
    before = bridge.events_count()
    bridge.proc.send_signal(signal.SIGHUP)
    refused = bridge.wait_for("reload_refused", after=before)
    assert "surprise: unknown key" in refused["problems"]
    assert any(p.startswith("routes[0].key: unknown strategy 'bogus'")
               for p in refused["problems"])
    assert refused["map_version"] == new_version
    publish_as_device(case, [(f"{case.prefix}/d1/telemetry",
                              simulate.payload("after-bad-reload", 0, 10))])
    late = [env for _, env in read_until(case, case.topic, len(got) + 1)
            if env["device_id"] == "d1"]
    assert map_versions([(None, env) for env in late]) == {new_version}


def test_a_reload_that_drops_a_lane_unsubscribes_and_retires_its_session(case: Case) -> None:
    path = case.config(routes=case.two_lanes())
    bridge = case.bridge(path)
    bridge.wait_for("mqtt_subscribed")
    case.config()  # telemetry only: the fast lane has no route left
    before = bridge.events_count()
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGHUP)
    bridge.wait_for("reload_applied", after=before)
    unsubscribed = bridge.wait_for("mqtt_unsubscribed", after=before)
    assert unsubscribed["filters"] == [f"{case.prefix}/+/alerts"]
    retired = bridge.wait_for("mqtt_session_retired", after=before)
    assert retired["client_id"] == f"{case.client_id}-fast"
    bridge.wait_for("kafka_producer_retired", after=before)
    publish_as_device(case, [(f"{case.prefix}/d1/telemetry", simulate.payload("d1", 0, 10))])
    [(_, env)] = read_until(case, case.topic, 1)
    assert env["bridge"]["route"] == "telemetry"
