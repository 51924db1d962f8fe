"""MQTT 5 properties end to end, on real servers (Mosquitto, Tansu): a device's user
properties arrive as Kafka headers in order, its trace context under its own names, its
other properties in the envelope's `mqtt` map; a flood of properties is a dead letter and
the lane keeps flowing."""

from __future__ import annotations

import time
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.devkit.tail import Header, records_with_headers
from tests.conftest import Case
from tests.test_bridge import publish_as_device

pytestmark = pytest.mark.integration
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
Record = tuple[bytes | None, list[Header], dict[str, Any]]


def user(pairs: list[tuple[str, str]], **fields: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if pairs:
        props.UserProperty = pairs
    for name, value in fields.items():
        setattr(props, name, value)
    return props


def read(case: Case, topic: str, count: int, timeout: float = 60) -> list[Record]:
    deadline = time.monotonic() + timeout
    while True:
        got = list(records_with_headers(case.stack.bootstrap, topic, idle=2.0,
                                        deadline=deadline))
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def by_topic(records: list[Record]) -> dict[str, tuple[list[Header], dict[str, Any]]]:
    return {env["mqtt"]["topic"].split("/", 1)[1]: (headers, env) for _, headers, env in records}


def test_properties_become_headers_and_mqtt_keys(case: Case) -> None:
    case.bridge(case.config(routes=f"""
[[routes]]
name = "telemetry"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
[[routes]]
name = "quiet"
filter = "{case.prefix}/{{device_id}}/quiet"
kafka_topic = "{case.topic}"
user_properties = false
"""))
    sent = [("site", "berlin"), ("tag", "a"), ("tag", "b"), ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE")]
    publish_as_device(case, [
        (f"{case.prefix}/d1/telemetry", b'{"t": 21.5}', user(
            sent, ContentType="application/json", PayloadFormatIndicator=1,
            MessageExpiryInterval=3600, ResponseTopic=f"{case.prefix}/d1/reply",
            CorrelationData=b"req-7")),
        (f"{case.prefix}/d2/quiet", b"x", user(sent)),
        (f"{case.prefix}/d3/telemetry", b"plain", user([])),
    ])
    got = by_topic(read(case, case.topic, 3))
    lineage = ["mqtt.topic", "device_id", "mqtt.broker", "bridge.instance"]

    headers, env = got["d1/telemetry"]
    assert [name for name, _ in headers[:4]] == lineage
    assert headers[4:] == [
        ("traceparent", TRACEPARENT.encode()), ("tracestate", b"congo=t61rcWkgMzE"),
        *((f"mqtt.user.{name}", value.encode()) for name, value in sent)]
    mqtt = env["mqtt"]
    assert env["content_type"] == "application/octet-stream"  # the route's format
    assert (mqtt["content_type"], mqtt["payload_format_indicator"], mqtt["response_topic"],
            mqtt["correlation_data"]) == ("application/json", 1, f"{case.prefix}/d1/reply",
                                          b"req-7")
    assert 3590 <= mqtt["message_expiry_interval"] <= 3600  # what was left on arrival

    headers, env = got["d2/quiet"]
    assert headers[4:] == [("traceparent", TRACEPARENT.encode()),
                           ("tracestate", b"congo=t61rcWkgMzE")]
    assert set(env["mqtt"]) == {"topic", "qos", "broker", "retain", "dup"}

    headers, env = got["d3/telemetry"]
    assert [name for name, _ in headers] == lineage
    assert set(env["mqtt"]) == {"topic", "qos", "broker", "retain", "dup"}


def test_thousands_of_properties_are_a_dead_letter_and_the_lane_flows(case: Case) -> None:
    bridge = case.bridge()
    flood = [(f"k{i}", "v" * 10) for i in range(5000)] + [("traceparent", TRACEPARENT)]
    publish_as_device(case, [
        (f"{case.prefix}/noisy/telemetry", b"1", user(flood)),
        (f"{case.prefix}/canary/telemetry", b"2", user([("site", "b")])),
    ])
    (dead,) = read(case, case.dead_letter, 1)
    _, headers, env = dead
    assert env["error"]["code"] == "properties_too_large"
    assert "5001 user properties" in env["error"]["reason"]
    assert env["mqtt"]["topic"] == f"{case.prefix}/noisy/telemetry"
    assert dict(headers)["traceparent"] == TRACEPARENT.encode()  # the trace goes on
    (canary,) = read(case, case.topic, 1)
    assert canary[2]["body"] == b"2" and canary[1][-1] == ("mqtt.user.site", b"b")
    assert not [e for e in bridge.events() if e.get("event") == "internal_error"]
