"""Watching the bridge on the real stack: /metrics adds up, /healthz and /readyz say the truth.

Each test runs the daemon as a process with `[http]` and reads its endpoint as Prometheus or
a load balancer would.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.devkit import simulate
from bridge.devkit.localstack import free_port, mosquitto_service
from tests.conftest import Bridge, Case, distinct

pytestmark = pytest.mark.integration
P = "mqtt_kafka_bridge_"


def http_config(case: Case, **kwargs: Any) -> tuple[Path, str]:
    port = free_port()
    extra = kwargs.pop("extra", "")
    path = case.config(extra=f'[http]\nlisten = "127.0.0.1:{port}"\n{extra}', **kwargs)
    return path, f"http://127.0.0.1:{port}"


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics, by sample name, then by its labels."""
    status, body = get(base + "/metrics")
    assert status == 200
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str,
          **labels: str) -> float:
    return sum(value for key, value in samples.get(P + name, {}).items()
               if all((k, v) in key for k, v in labels.items()))


def wait_until(check: Any, timeout: float = 60, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


JSON_ROUTE = """
[[routes]]
name = "telemetry"
filter = "{prefix}/{{device_id}}/telemetry"
kafka_topic = "{topic}"
format = "json"
"""


def test_the_counts_add_up_after_a_mixed_load_and_a_kafka_kill(case: Case) -> None:
    """Good messages, messages that must be dead-lettered, and Kafka killed half-way: at
    rest, received == bridged + dead_lettered + in_flight with in_flight 0, and the counts
    are what reached the topics.

    Kafka gets SIGTERM: Tansu, the test stack's Kafka, loses records it acknowledged when it
    is SIGKILLed (measured: 38 of the 150 records acked before the kill were gone, while the
    same run with SIGTERM keeps every one), which would say nothing about the bridge."""
    config, base = http_config(case, routes=JSON_ROUTE.format(prefix=case.prefix,
                                                             topic=case.topic))
    case.bridge(config)
    device = simulate.device_client(case.stack.mqtt_url, f"dev-{case.client_id}")
    good = bad = 0

    def publish(round_: int) -> None:
        nonlocal good, bad
        messages = [(f"{case.prefix}/d{i % 5}/telemetry", simulate.payload(f"d{i % 5}",
                                                                          round_ * 1000 + i, 50))
                    for i in range(150)]
        messages += [(f"{case.prefix}/d{i}/telemetry", b"{not json") for i in range(20)]
        messages += [(f"{case.prefix}//telemetry", b"{}") for _ in range(5)]  # no device id
        simulate.publish_all(device, messages, qos=1)
        good, bad = good + 150, bad + 25

    try:
        publish(0)
        case.stack.kafka.stop()
        publish(1)  # while Kafka is down: they wait, unacked
        time.sleep(2)
        during = scrape(base)
        assert total(during, "in_flight_messages") > 0
        assert total(during, "oldest_unacked_age_seconds") > 0
        case.stack.kafka.start()
        publish(2)
    finally:
        device.disconnect()
        device.loop_stop()

    def at_rest() -> Any:
        s = scrape(base)
        return s if total(s, "received_messages_total") == good + bad and \
            total(s, "in_flight_messages") == 0 else None

    samples = wait_until(at_rest, timeout=120)
    assert samples, scrape(base)
    received = total(samples, "received_messages_total")
    bridged = total(samples, "bridged_messages_total")
    dead = total(samples, "dead_lettered_messages_total")
    assert received == bridged + dead + total(samples, "in_flight_messages")
    assert (bridged, dead) == (good, bad)
    assert total(samples, "dead_lettered_messages_total", code="bad_payload") == 60
    assert total(samples, "dead_lettered_messages_total", code="no_device_id") == 15
    assert total(samples, "received_messages_total", lane="bulk") == received
    assert total(samples, "oldest_unacked_age_seconds") == 0
    assert total(samples, "delivery_latency_seconds_count") == received
    assert total(samples, "mqtt_acks_sent_total") == received
    # What the counters say reached Kafka did: every good message in its topic, every dead
    # letter in the dead-letter topic (a redelivery could only add copies).
    got = distinct(case.read(expect=good))
    assert got == {(f"d{i % 5}", r * 1000 + i) for r in range(3) for i in range(150)}
    letters = case.read(case.dead_letter, expect=None, timeout=60)
    assert len(letters) >= bad
    # and the latency histogram saw the outage: some waited more than a second
    assert total(samples, "delivery_latency_seconds_bucket", le="1.0") < received


def test_readyz_follows_the_broker_and_healthz_the_loop(case: Case) -> None:
    config, base = http_config(case)
    bridge = case.bridge(config)
    ready = wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=30)
    assert ready, get(base + "/readyz")
    status, body = get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert total(scrape(base), "mqtt_connected") == 1

    case.stack.mqtt.stop()
    try:
        def not_ready() -> Any:
            status, body = get(base + "/readyz")
            return json.loads(body) if status == 503 else None
        answer = wait_until(not_ready, timeout=30)
        assert answer and answer["ready"] is False, answer
        assert any(w.startswith("mqtt ") and "not connected" in w
                   for w in answer["waiting_for"]), answer
        assert total(scrape(base), "mqtt_connected") == 0
        assert get(base + "/healthz")[0] == 200  # alive, only not ready
    finally:
        case.stack.mqtt.start()
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=30)
    samples = scrape(base)
    assert total(samples, "mqtt_connected") == 1
    assert total(samples, "mqtt_reconnects_total") >= 1
    assert total(samples, "mqtt_sessions_lost_total") == 0  # Mosquitto kept our session
    assert bridge.proc is not None and bridge.proc.poll() is None
    # Anything else is a short answer, never a hang or a crash of the endpoint.
    assert get(base + "/nope")[0] == 404
    request = urllib.request.Request(base + "/metrics", method="POST")
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("POST answered 2xx")
    except urllib.error.HTTPError as error:
        assert error.code == 405


def test_readyz_waits_for_kafka(case: Case) -> None:
    config, base = http_config(case)
    case.stack.kafka.pause()
    try:
        bridge = Bridge(config, case.tmp / "bridge-kafka.log")
        case.bridges.append(bridge)
        bridge.start()  # the MQTT side connects and subscribes
        time.sleep(3)
        status, body = get(base + "/readyz")
        assert status == 503, body
        assert any(w.startswith("kafka ") for w in json.loads(body)["waiting_for"]), body
    finally:
        case.stack.kafka.resume()
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=30)
    assert total(scrape(base), "kafka_reachable") >= 1
    # A Kafka that hangs once the bridge is ready (its connections stay open, so librdkafka
    # would say so only after its socket timeout, a minute): not ready within seconds.
    case.stack.kafka.pause()
    try:
        hung = wait_until(lambda: get(base + "/readyz")[0] == 503, timeout=25)
        assert hung, get(base + "/readyz")
        assert total(scrape(base), "kafka_reachable") == 0
    finally:
        case.stack.kafka.resume()
    assert wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=30)


def test_healthz_says_when_the_event_loop_is_stuck(case: Case) -> None:
    """A stage that blocks the event loop (a bug): /healthz turns 503 while it does, from the
    endpoint's own thread, and 200 once the loop turns again; /metrics still answers."""
    config, base = http_config(case)
    case.bridge(config, module="tests.faults")
    assert wait_until(lambda: get(base + "/healthz")[0] == 200, timeout=30)
    device = simulate.device_client(case.stack.mqtt_url, f"dev-{case.client_id}")
    try:
        device.publish(f"{case.prefix}/fault-stall/telemetry", b"{}", qos=1)

        def stalled() -> Any:
            status, body = get(base + "/healthz")
            return json.loads(body) if status == 503 else None
        answer = wait_until(stalled, timeout=30)
        assert answer and answer["status"] == "stalled", answer
        assert get(base + "/metrics")[0] == 200
        status, body = get(base + "/readyz")  # a loop that does not turn acks nothing
        assert status == 503 and "the event loop" in json.loads(body)["waiting_for"][0]
        assert wait_until(lambda: get(base + "/healthz")[0] == 200, timeout=30)
    finally:
        device.disconnect()
        device.loop_stop()


def test_slow_and_idle_http_clients_do_not_stall_bridging(case: Case) -> None:
    import socket

    config, base = http_config(case)
    case.bridge(config)
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        for sock in idle[:5]:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # a head that never ends
        simulate.telemetry(case.stack.mqtt_url, devices=5, messages=40, prefix=case.prefix)
        assert len(case.read(expect=200)) >= 200
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: get(base + "/healthz")[0] == 200, timeout=15)


def test_a_broker_that_forgot_the_session_is_said_and_counted(case: Case) -> None:
    """Mosquitto restarted without its persistence file: the reconnect gets
    session_present = 0; the bridge warns `mqtt_session_lost` and counts it."""
    broker = mosquitto_service(case.tmp / "forgetful")
    broker.start()
    try:
        config, base = http_config(case)
        text = config.read_text().replace(case.stack.mqtt_url, f"mqtt://127.0.0.1:{broker.port}")
        config.write_text(text)
        bridge = case.bridge(config)
        broker.stop()
        for db in (case.tmp / "forgetful" / "mosquitto-data").glob("*.db"):
            db.unlink()
        time.sleep(1)
        broker.start()
        lost = bridge.wait_for("mqtt_session_lost", timeout=30)
        assert lost["level"] == "warning" and lost["away_seconds"] >= 1
        assert lost["broker"].endswith(str(broker.port))
        assert wait_until(lambda: total(scrape(base), "mqtt_sessions_lost_total") == 1, 10)
    finally:
        broker.stop()
