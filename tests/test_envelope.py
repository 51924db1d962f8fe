"""Envelope v1: the DESIGN.md table, msgpack, round trip."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from bridge import envelope
from bridge.message import Message

MSG = Message(broker="127.0.0.1:1883", topic="devices/d1/telemetry", payload=b"\x00\x01hello",
              qos=1, retain=False, dup=True, arrival_millis=1700000000123)
LINEAGE = envelope.Lineage("edge-1", "telemetry", "abc123")


def test_round_trip_has_exactly_the_contract_keys() -> None:
    decoded = envelope.decode(envelope.encode(MSG, "d1", LINEAGE))
    assert decoded == {
        "v": 1,
        "device_id": "d1",
        "content_type": "application/octet-stream",
        "arrival_time_millis": 1700000000123,
        "body": b"\x00\x01hello",
        "mqtt": {"topic": "devices/d1/telemetry", "qos": 1, "broker": "127.0.0.1:1883",
                 "retain": False, "dup": True},
        "bridge": {"instance": "edge-1", "route": "telemetry", "map_version": "abc123"},
    }
    assert "reference" not in decoded


def test_dead_letter_adds_error_and_cuts_huge_bodies() -> None:
    big = MSG._replace(payload=b"x" * (envelope.DEAD_LETTER_BODY_MAX + 10))
    decoded = envelope.decode(envelope.encode_dead_letter(big, "d1", LINEAGE, "record_too_large",
                                                          "too big"))
    assert decoded["error"] == {"code": "record_too_large", "reason": "too big"}
    assert len(decoded["body"]) == envelope.DEAD_LETTER_BODY_MAX
    assert decoded["truncated"] is True
    assert decoded["size"] == envelope.DEAD_LETTER_BODY_MAX + 10
    assert decoded["sha256"] == hashlib.sha256(big.payload).hexdigest()


@pytest.mark.parametrize("flags", [(0, False, False), (1, True, False), (2, False, True)])
def test_template_encodes_exactly_what_encode_does(flags: tuple[int, bool, bool]) -> None:
    template = envelope.Template(MSG.topic, MSG.broker, "d1", LINEAGE, "application/json")
    for payload in (b"", b"x" * 40, b"y" * 70_000):
        message = MSG._replace(qos=flags[0], retain=flags[1], dup=flags[2], payload=payload)
        assert envelope.decode(template.encode(message)) == \
            envelope.decode(envelope.encode(message, "d1", LINEAGE, "application/json"))


def test_headers_carry_lineage() -> None:
    assert dict(envelope.headers(MSG, "d1", LINEAGE)) == {
        "mqtt.topic": b"devices/d1/telemetry", "device_id": b"d1",
        "mqtt.broker": b"127.0.0.1:1883", "bridge.instance": b"edge-1"}


@pytest.mark.parametrize("value", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"x": 1})])
def test_decode_refuses_what_is_not_an_envelope(value: bytes) -> None:
    with pytest.raises(ValueError):
        envelope.decode(value)


def test_a_reference_envelope_has_no_body_and_describes_the_object() -> None:
    decoded = envelope.decode(envelope.encode_reference(
        MSG, "d1", LINEAGE, "video/mp4", "s3://b/payloads/d1/abc", 7, "abc",
        {"id": "f1", "name": "clip.mp4", "user_data": None}))
    assert "body" not in decoded
    assert (decoded["reference"], decoded["size"], decoded["sha256"]) == (
        "s3://b/payloads/d1/abc", 7, "abc")
    assert decoded["content_type"] == "video/mp4"
    assert decoded["file"] == {"id": "f1", "name": "clip.mp4", "user_data": None}
    assert decoded["bridge"]["route"] == "telemetry"


def test_a_truncated_envelope_keeps_the_head_and_describes_the_whole() -> None:
    decoded = envelope.decode(envelope.encode_truncated(MSG, "d1", LINEAGE,
                                                        "application/octet-stream", 3))
    assert decoded["body"] == MSG.payload[:3]
    assert decoded["truncated"] is True
    assert decoded["size"] == len(MSG.payload)
    assert decoded["sha256"] == hashlib.sha256(MSG.payload).hexdigest()


def test_a_dead_letter_too_large_to_keep_inline_points_at_the_whole_body() -> None:
    decoded = envelope.decode(envelope.encode_dead_letter(
        MSG, "d1", LINEAGE, "bad_payload", "not json", 3, "s3://b/dead-letter/d1/x", "x"))
    assert "body" not in decoded and "truncated" not in decoded
    assert (decoded["reference"], decoded["size"], decoded["sha256"]) == (
        "s3://b/dead-letter/d1/x", len(MSG.payload), "x")
    assert decoded["error"] == {"code": "bad_payload", "reason": "not json"}
