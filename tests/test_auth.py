"""Device authentication: every outcome of the registry and of HMAC signatures, through the
same pipeline the daemon uses (no servers: the dry-run pipeline has no sink)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import tomllib
from types import MappingProxyType

import pytest

from bridge import auth, config, envelope
from bridge.auth import Device, Registry
from bridge.errors import Rejected
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline
from tests.test_config import GOOD

KEY = bytes(range(32))
TOPIC = "devices/d1/telemetry"

REGISTRY = Registry(MappingProxyType({
    "d1": Device("active", KEY),
    "d2": Device("revoked"),
    "d3": Device("disabled", KEY),
    "d4": Device("active"),  # known, no key
}))


def pipeline(mode: str) -> Pipeline:
    parsed = config.parse(tomllib.loads(GOOD))
    route = parsed.routes[0]
    parsed = dataclasses.replace(parsed, registry=REGISTRY,
                                 routes=(dataclasses.replace(route, auth=mode),))
    return Pipeline(parsed, "bulk", Metrics())


def outcome(mode: str, topic: str = TOPIC, payload: bytes = b"21.5",
            properties: tuple[tuple[str, str], ...] = ()) -> str:
    """The data topic, or `dead_letter:<code>`."""
    message = Message("b", topic, payload, 1, False, False, 1, properties)
    delivery = pipeline(mode).prepare(message, None)
    assert isinstance(delivery, Delivery)
    if delivery.topic == "iot.deadletter":
        return "dead_letter:" + envelope.decode(delivery.value)["error"]["code"]
    return delivery.topic


def signed(topic: str = TOPIC, payload: bytes = b"21.5", key: bytes = KEY) -> tuple[
        tuple[str, str], ...]:
    return (("signature", auth.sign(key, topic, payload)),)


def test_canonical_form_is_topic_nul_payload_hmac_sha256_hex() -> None:
    expected = hmac.new(KEY, b"devices/d1/telemetry\x0021.5", hashlib.sha256).hexdigest()
    assert auth.sign(KEY, TOPIC, b"21.5") == expected
    assert len(expected) == 64 and expected == expected.lower()


def test_none_trusts_the_topic() -> None:
    assert outcome("none", "devices/stranger/telemetry") == "iot.telemetry"


@pytest.mark.parametrize(("topic", "expected"), [
    (TOPIC, "iot.telemetry"),
    ("devices/d4/telemetry", "iot.telemetry"),
    ("devices/stranger/telemetry", "dead_letter:unknown_device"),
    ("devices/d2/telemetry", "dead_letter:revoked_device"),
    ("devices/d3/telemetry", "dead_letter:revoked_device"),
])
def test_registry_outcomes(topic: str, expected: str) -> None:
    assert outcome("registry", topic) == expected


def test_hmac_outcomes() -> None:
    assert outcome("hmac", properties=signed()) == "iot.telemetry"
    upper = (("signature", signed()[0][1].upper()),)
    assert outcome("hmac", properties=upper) == "iot.telemetry"
    assert outcome("hmac") == "dead_letter:missing_signature"
    assert outcome("hmac", properties=(("other", "x"),)) == "dead_letter:missing_signature"
    assert outcome("hmac", payload=b"99.9", properties=signed()) == "dead_letter:bad_signature"
    assert outcome("hmac", properties=signed(key=b"k" * 32)) == "dead_letter:bad_signature"
    assert outcome("hmac", properties=(("signature", "zz"),)) == "dead_letter:bad_signature"
    assert outcome("hmac", properties=signed() * 2) == "dead_letter:bad_signature"
    # a signature made for one topic does not pass on another
    other = "devices/d1/telemetry2"
    assert auth.sign(KEY, other, b"21.5") != signed()[0][1]
    # registry rules first: revoked, unknown, or no key to check against
    assert outcome("hmac", "devices/d3/telemetry", properties=signed("devices/d3/telemetry")) \
        == "dead_letter:revoked_device"
    assert outcome("hmac", "devices/nobody/telemetry") == "dead_letter:unknown_device"
    assert outcome("hmac", "devices/d4/telemetry") == "dead_letter:bad_signature"


def test_verify_names_the_device_in_its_refusal() -> None:
    with pytest.raises(Rejected) as refused:
        auth.verify(KEY, "d1", TOPIC, b"x", ())
    assert (refused.value.code, refused.value.device_id) == ("missing_signature", "d1")
