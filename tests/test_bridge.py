"""The at-least-once promise on real servers: Mosquitto, Tansu (S3-backed on moto), moto.

Each test publishes with paho, like a device, and counts what Kafka holds by reading every
partition with `assign()`. Duplicates are allowed; a missing (device, seq) is a failure.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from paho.mqtt.properties import Properties

from bridge.devkit import simulate
from tests.conftest import Bridge, Case, distinct

pytestmark = pytest.mark.integration


def publish_in_background(case: Case, **kwargs: object) -> threading.Thread:
    thread = threading.Thread(target=simulate.telemetry,
                              kwargs={"url": case.stack.mqtt_url, "prefix": case.prefix, **kwargs})
    thread.start()
    return thread


def assert_all_arrived(case: Case, devices: int, messages: int, first_seq: int = 0) -> int:
    """Every (device, seq) is in Kafka under the right device id; returns the duplicates."""
    expected = {(f"dev-{d:05d}", s) for d in range(devices)
                for s in range(first_seq, first_seq + messages)}
    got = case.read(expect=len(expected))
    seen = distinct(got)
    missing = expected - seen
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:5]}"
    return len(got) - len(seen)


def publish_as_device(case: Case, messages: Sequence[tuple[str, bytes] |
                                                     tuple[str, bytes, Properties]]) -> None:
    """Publish a few hand-made QoS 1 messages (with MQTT 5 properties, if given), waiting
    until the broker has each."""
    client = simulate.device_client(case.stack.mqtt_url, f"{case.client_id}-dev")
    try:
        simulate.publish_all(client, messages, qos=1)
    finally:
        client.disconnect()
        client.loop_stop()


def read_until(case: Case, topic: str, count: int, timeout: float = 30) -> list[Any]:
    """A topic's records, once it holds `count` of them (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    got = case.read(topic)
    while len(got) < count and time.monotonic() < deadline:
        got = case.read(topic)
    return got


@contextlib.contextmanager
def kafka_stalled_with_backlog(case: Case, shutdown_timeout: float) -> Iterator[Bridge]:
    """A running bridge holding 200 messages it cannot deliver: Kafka is stopped."""
    bridge = case.bridge(case.config(shutdown_timeout=shutdown_timeout))
    case.stack.kafka.pause()
    try:
        simulate.telemetry(case.stack.mqtt_url, devices=5, messages=40, prefix=case.prefix)
        time.sleep(1)
        yield bridge
    finally:
        case.stack.kafka.resume()


def test_ten_thousand_messages_from_a_hundred_devices(case: Case) -> None:
    case.bridge()
    simulate.telemetry(case.stack.mqtt_url, devices=100, messages=100, prefix=case.prefix)
    got = case.read(expect=10_000)
    assert len(distinct(got)) == 10_000
    for key, env in got:
        device = env["mqtt"]["topic"].split("/")[1]
        assert env["device_id"] == device
        assert env["v"] == 1 and env["mqtt"]["qos"] == 1
        assert key == str(env["arrival_time_millis"]).encode()
        assert env["bridge"]["route"] == "telemetry"
        assert f'"device": "{device}"' in env["body"].decode()


def test_kill9_mid_stream_then_restart_loses_nothing(case: Case) -> None:
    bridge = case.bridge()
    publisher = publish_in_background(case, devices=50, messages=300, rate=3000)
    time.sleep(2)
    bridge.kill9()
    time.sleep(2)  # the fleet keeps publishing while the bridge is down
    case.bridge()
    publisher.join()
    duplicates = assert_all_arrived(case, 50, 300)
    print(f"kill -9: 15000 published, {duplicates} duplicates")


def test_messages_published_while_bridge_is_down_arrive_after_restart(case: Case) -> None:
    bridge = case.bridge()
    assert bridge.terminate() == 0
    simulate.telemetry(case.stack.mqtt_url, devices=10, messages=50, prefix=case.prefix)
    restarted = case.bridge()
    assert restarted.wait_for("mqtt_connected")["session_present"] is True
    assert assert_all_arrived(case, 10, 50) == 0


def test_kafka_paused_under_load_loses_nothing(case: Case) -> None:
    case.bridge()
    publisher = publish_in_background(case, devices=20, messages=300, rate=2000)
    time.sleep(1)
    case.stack.kafka.pause()
    try:
        time.sleep(8)
    finally:
        case.stack.kafka.resume()
    publisher.join()
    assert_all_arrived(case, 20, 300)


def test_nothing_is_acked_before_kafka_has_it(case: Case) -> None:
    """Kafka stalls, the bridge dies, Kafka dies: only unacked messages can be redelivered.

    While Tansu is stopped nothing it was sent can be durable. Killing the bridge, then
    Tansu, throws away whatever was in flight; the broker must still hold every message, so
    each one reaches Kafka after both come back.
    """
    case.bridge(case.config(extra_broker="receive_max = 100"))
    case.stack.kafka.pause()
    try:
        simulate.telemetry(case.stack.mqtt_url, devices=10, messages=50, prefix=case.prefix)
        time.sleep(2)
        case.bridges[0].kill9()
    finally:
        case.stack.kafka.kill()
    case.stack.kafka.start()
    case.bridge()
    assert_all_arrived(case, 10, 50)


def test_receive_max_bounds_what_is_in_flight(case: Case) -> None:
    bridge = case.bridge(case.config(extra_broker="receive_max = 50"))
    case.stack.kafka.pause()
    try:
        simulate.telemetry(case.stack.mqtt_url, devices=10, messages=100, prefix=case.prefix)
        time.sleep(3)
        during = bridge.stats()[-2:]
    finally:
        case.stack.kafka.resume()
    assert during and all(s["pending"] <= 50 for s in during), during
    assert all(s.get("mqtt_acks_sent", 0) <= s.get("kafka_records_delivered", 0)
               for s in bridge.stats())
    assert_all_arrived(case, 10, 100)


def test_kafka_restart_mid_stream_loses_nothing(case: Case) -> None:
    case.bridge()
    publisher = publish_in_background(case, devices=20, messages=300, rate=2000)
    time.sleep(1)
    case.stack.kafka.restart()
    publisher.join()
    assert_all_arrived(case, 20, 300)


def test_mosquitto_restart_mid_stream_reconnects_and_resubscribes(case: Case) -> None:
    bridge = case.bridge()
    simulate.telemetry(case.stack.mqtt_url, devices=20, messages=300, prefix=case.prefix)
    case.stack.mqtt.restart()  # SIGTERM: Mosquitto saves sessions and queues
    bridge.wait_for("mqtt_connected", after=1)
    simulate.telemetry(case.stack.mqtt_url, devices=20, messages=100, first_seq=300,
                       prefix=case.prefix)
    assert_all_arrived(case, 20, 400)


def test_qos0_is_forwarded_best_effort(case: Case) -> None:
    case.bridge()
    simulate.telemetry(case.stack.mqtt_url, devices=10, messages=100, qos=0, rate=2000,
                       prefix=case.prefix)
    got = case.read(expect=1000, timeout=30)
    assert len(distinct(got)) >= 990  # best effort: loopback loses nothing in practice
    assert {env["mqtt"]["qos"] for _, env in got} == {0}


def test_qos2_is_bridged_once_per_publish(case: Case) -> None:
    case.bridge()
    simulate.telemetry(case.stack.mqtt_url, devices=10, messages=100, qos=2, prefix=case.prefix)
    got = case.read(expect=1000)
    assert len(distinct(got)) == 1000
    assert {env["mqtt"]["qos"] for _, env in got} == {2}


def test_sigterm_under_load_exits_cleanly_and_loses_nothing(case: Case) -> None:
    bridge = case.bridge()
    publisher = publish_in_background(case, devices=20, messages=500, rate=4000)
    time.sleep(1.5)
    assert bridge.terminate(timeout=60) == 0
    stopped = bridge.wait_for("bridge_stopped")
    assert stopped["drained"] is True
    publisher.join()
    case.bridge()
    assert_all_arrived(case, 20, 500)


def test_unbridgeable_messages_go_to_dead_letter_with_a_reason(case: Case) -> None:
    bridge = case.bridge(case.config(extra_kafka='"message.max.bytes" = 20000'))
    publish_as_device(case, [
        (f"{case.prefix}//telemetry", b"no device id"),
        (f"{case.prefix}/big/telemetry", b"x" * 50_000),
        (f"{case.prefix}/ok/telemetry", simulate.payload("ok", 0, 10)),
    ])
    dead = read_until(case, case.dead_letter, 2)
    codes = {env["error"]["code"]: env for _, env in dead}
    assert set(codes) == {"no_device_id", "record_too_large"}
    too_large = codes["record_too_large"]
    assert too_large["size"] == 50_000 and too_large["truncated"] is True
    assert too_large["device_id"] == "big"
    assert codes["no_device_id"]["body"] == b"no device id"
    assert len(case.read(expect=1)) == 1
    stats = bridge.wait_for("bridge_stats", after=bridge.events_count())
    assert stats["dead_letters"] == {"no_device_id": 1, "record_too_large": 1}


def test_sigterm_waits_for_kafka_only_until_the_deadline(case: Case) -> None:
    with kafka_stalled_with_backlog(case, shutdown_timeout=2) as bridge:
        started = time.monotonic()
        assert bridge.terminate(timeout=30) == 0
        assert 1.5 < time.monotonic() - started < 15
        stopped = bridge.wait_for("bridge_stopped")
        assert stopped["drained"] is False and stopped["left_unacked"] > 0
    case.bridge()
    assert_all_arrived(case, 5, 40)


def test_a_second_signal_exits_at_once(case: Case) -> None:
    with kafka_stalled_with_backlog(case, shutdown_timeout=60) as bridge:
        assert bridge.proc is not None
        bridge.proc.send_signal(signal.SIGTERM)
        bridge.wait_for("bridge_stopping")
        started = time.monotonic()
        bridge.proc.send_signal(signal.SIGINT)
        assert bridge.proc.wait(10) == 128 + signal.SIGINT
        assert time.monotonic() - started < 5
        bridge.wait_for("bridge_forced_exit")
    case.bridge()
    assert_all_arrived(case, 5, 40)


def test_each_route_keys_records_its_own_way(case: Case) -> None:
    routes = f"""
[[routes]]
name = "telemetry"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
key = "device_id"

[[routes]]
name = "status"
filter = "{case.prefix}/{{device_id}}/status"
kafka_topic = "{case.topic}"
key = "hash_bucket"
key_buckets = 4

[[routes]]
name = "windows"
filter = "{case.prefix}/{{device_id}}/windows"
kafka_topic = "{case.topic}"
key = "time_bucket"
key_window = 60
"""
    case.bridge(case.config(routes=routes))
    for kind in ("telemetry", "status", "windows"):
        simulate.telemetry(case.stack.mqtt_url, devices=10, messages=5, prefix=case.prefix,
                           kind=kind)
    got = read_until(case, case.topic, 150, timeout=60)
    by_route: dict[str, set[tuple[str, bytes | None]]] = {}
    for key, env in got:
        by_route.setdefault(env["bridge"]["route"], set()).add((env["device_id"], key))
    assert {k for d, k in by_route["telemetry"]} == {d.encode() for d, _ in by_route["telemetry"]}
    status = dict(by_route["status"])
    assert len(status) == 10 and set(status.values()) <= {b"0", b"1", b"2", b"3"}
    assert len(by_route["status"]) == 10, "one bucket per device, whatever the arrival time"
    for device, key in by_route["windows"]:
        name, start = (key or b"").decode().rsplit("@", 1)
        assert name == device and int(start) % 60 == 0


def test_a_json_route_dead_letters_what_does_not_parse(case: Case) -> None:
    routes = f"""
[[routes]]
name = "json"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
format = "json"
"""
    case.bridge(case.config(routes=routes))
    deep = b"[" * 100_000 + b"]" * 100_000  # valid JSON, checked off the loop (200 KB)
    publish_as_device(case, [
        (f"{case.prefix}/good/telemetry", simulate.payload("good", 0, 10)),
        (f"{case.prefix}/bad/telemetry", b"{not json"),
        (f"{case.prefix}/deep/telemetry", deep),
        (f"{case.prefix}/unclosed/telemetry", deep[:-1]),
    ])
    good = read_until(case, case.topic, 2)
    assert sorted(env["device_id"] for _, env in good) == ["deep", "good"]
    assert {env["content_type"] for _, env in good} == {"application/json"}
    dead = read_until(case, case.dead_letter, 2)
    reasons = {env["device_id"]: env["error"] for _, env in dead}
    assert set(reasons) == {"bad", "unclosed"}
    assert all(e["code"] == "bad_payload" for e in reasons.values())
    assert reasons["bad"]["reason"].startswith("not valid json: ")


def test_topic_templates_route_per_site_and_refuse_bad_names(case: Case) -> None:
    routes = f"""
[[routes]]
name = "sites"
filter = "{case.prefix}/{{site}}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}.{{site}}"
"""
    case.stack.create_topics([f"{case.topic}.berlin"])
    case.bridge(case.config(routes=routes))
    publish_as_device(case, [
        (f"{case.prefix}/berlin/d1/telemetry", simulate.payload("d1", 0, 10)),
        (f"{case.prefix}/no site!/d2/telemetry", simulate.payload("d2", 0, 10)),
    ])
    berlin = case.read(f"{case.topic}.berlin", expect=1)
    assert [env["device_id"] for _, env in berlin] == ["d1"]
    dead = read_until(case, case.dead_letter, 1)
    refused = [(env["device_id"], env["error"]["code"]) for _, env in dead]
    assert refused == [("d2", "invalid_topic")]
