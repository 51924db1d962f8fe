"""Envelope v1: the msgpack map a Kafka record carries, and its lineage headers.

Readers ignore keys they do not know, so keys may be added without a version bump. A
dead-letter record is the same envelope plus `error: {code, reason}`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from bridge.message import Message
from bridge.properties import mqtt_fields

VERSION = 1
RAW = "application/octet-stream"  # the content type of a route that checks no format
# A dead-letter record keeps at most this much of the body by default: it must fit Kafka even
# when the reason it is dead-lettered is that the body did not.
DEAD_LETTER_BODY_MAX = 256 * 1024


@dataclass(frozen=True, slots=True)
class Lineage:
    """Who bridged a message, under which route and map version."""

    instance: str
    route: str
    map_version: str


def encode(message: Message, device_id: str, lineage: Lineage,
           content_type: str = RAW) -> bytes:
    """The envelope of a message whose body travels inline."""
    packed: bytes = msgpack.packb(_fields(message, device_id, lineage, message.payload,
                                          content_type))
    return packed


class Template:
    """Encodes the envelopes of one topic: what every message there shares is packed once.

    A msgpack map is its header followed by packed keys and values, so the constant pairs
    are kept as bytes (per QoS/retain/dup, up to the arrival time's marker) and only the
    arrival time and the body's header are added per message. The output decodes to
    exactly what `encode` gives.
    """

    __slots__ = ("_broker", "_device_id", "_flags", "_head", "_topic", "content_type")

    def __init__(self, topic: str, broker: str, device_id: str, lineage: Lineage,
                 content_type: str = RAW) -> None:
        self._topic, self._broker, self._device_id = topic, broker, device_id
        self.content_type = content_type
        self._head = b"".join(msgpack.packb(x) for x in (
            "v", VERSION, "device_id", device_id, "content_type", content_type,
            "bridge", {"instance": lineage.instance, "route": lineage.route,
                       "map_version": lineage.map_version}))
        # by qos + 4 * retain + 8 * dup: the envelope up to the arrival time's value
        self._flags: list[bytes | None] = [None] * 16

    def encode(self, message: Message) -> bytes:
        flags = message.qos + 4 * message.retain + 8 * message.dup
        mqtt = self._flags[flags]
        if mqtt is None:
            mqtt = self._flags[flags] = _MAP7 + self._head + msgpack.packb("mqtt") + \
                msgpack.packb({"topic": self._topic, "qos": message.qos,
                               "broker": self._broker, "retain": message.retain,
                               "dup": message.dup}) + _ARRIVAL
        payload = message.payload
        size = len(payload)
        body = _BIN8[size] if size < 0x100 else _body_header(size)
        return b"".join((mqtt, message.arrival_millis.to_bytes(8, "big"), body, payload))


def _body_header(size: int) -> bytes:
    """The "body" key and its msgpack bin 8/16/32 header; the body bytes follow it without
    being copied into a packer first."""
    if size < 0x100:
        return _BODY + b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return _BODY + b"\xc5" + size.to_bytes(2, "big")
    return _BODY + b"\xc6" + size.to_bytes(4, "big")


# fixmap of 7 pairs: v, device_id, content_type, bridge, mqtt, arrival_time_millis, body
_MAP7 = b"\x87"
# the arrival time's key and a uint 64's marker: fixed width, so no branch on the value
_ARRIVAL: bytes = msgpack.packb("arrival_time_millis") + b"\xcf"
_BODY: bytes = msgpack.packb("body")
_BIN8 = [_body_header(size) for size in range(0x100)]


def encode_dead_letter(message: Message, device_id: str, lineage: Lineage, code: str,
                       reason: str, body_max: int = DEAD_LETTER_BODY_MAX,
                       reference: str | None = None, sha256: str | None = None,
                       size: int | None = None) -> bytes:
    """A dead-letter record: the envelope plus the reason. `size` and `sha256` always
    describe the whole payload (given when the message no longer holds it). The body is
    inline, cut to `body_max` (`truncated`), or, with `reference`, stored whole in S3.

    It never raises: a dead letter is where a message goes when everything else failed, so
    a value msgpack cannot take gives the minimal record instead of a second failure."""
    payload = message.payload
    digest = sha256 or hashlib.sha256(payload).hexdigest()
    size = len(payload) if size is None else size
    try:
        fields = _fields(message, device_id, lineage, payload[:body_max], RAW)
        fields["size"] = size
        fields["sha256"] = digest
        if reference is not None:
            del fields["body"]
            fields["reference"] = reference
        elif size > body_max:
            fields["truncated"] = True
        fields["error"] = {"code": code, "reason": printable(reason)}
        packed: bytes = msgpack.packb(fields)
        return packed
    except Exception as exc:  # the record must exist whatever went wrong
        return _minimal_dead_letter(message, code, f"{printable(reason)} (record simplified: "
                                    f"{type(exc).__name__})", body_max, reference, digest, size)


def _minimal_dead_letter(message: Message, code: str, reason: str, body_max: int,
                         reference: str | None, sha256: str, size: int) -> bytes:
    """A dead-letter record of ASCII text, integers and the body bytes alone."""
    fields: dict[str, Any] = {
        "v": VERSION, "device_id": "", "arrival_time_millis": int(message.arrival_millis),
        "size": int(size), "sha256": _ascii(sha256),
        "mqtt": {"topic": _ascii(message.topic), "qos": int(message.qos),
                 "broker": _ascii(message.broker), "retain": bool(message.retain),
                 "dup": bool(message.dup)},
        "error": {"code": _ascii(code), "reason": _ascii(reason)},
    }
    if reference is not None:
        fields["reference"] = _ascii(reference)
    else:
        fields["body"] = bytes(message.payload[:body_max])
        if size > body_max:
            fields["truncated"] = True
    packed: bytes = msgpack.packb(fields)
    return packed


def printable(text: str) -> str:
    """Text msgpack can always encode: lone surrogates (from bytes decoded with
    surrogateescape, say) become backslash escapes."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _ascii(text: object) -> str:
    return str(text).encode("ascii", "backslashreplace").decode()


def encode_reference(message: Message, device_id: str, lineage: Lineage, content_type: str,
                     reference: str, size: int, sha256: str,
                     file: dict[str, Any] | None = None) -> bytes:
    """The envelope of a payload stored in S3: `reference`, `size` and `sha256`, no body.
    A file transfer adds `file: {id, name, user_data}` from its init message."""
    fields = _fields(message, device_id, lineage, b"", content_type)
    del fields["body"]
    fields.update(reference=reference, size=size, sha256=sha256)
    if file is not None:
        fields["file"] = file
    packed: bytes = msgpack.packb(fields)
    return packed


def encode_truncated(message: Message, device_id: str, lineage: Lineage, content_type: str,
                     keep: int, sha256: str | None = None) -> bytes:
    """The envelope of a route that keeps only the head of each body: `truncated: true`,
    with `size` and `sha256` of the whole payload (given when hashed elsewhere)."""
    payload = message.payload
    fields = _fields(message, device_id, lineage, payload[:keep], content_type)
    fields.update(size=len(payload), sha256=sha256 or hashlib.sha256(payload).hexdigest(),
                  truncated=True)
    packed: bytes = msgpack.packb(fields)
    return packed


Headers = list[tuple[str, str | bytes | None]]  # what confluent-kafka's produce() takes


def headers(message: Message, device_id: str, lineage: Lineage) -> Headers:
    """Lineage as Kafka headers, so tools can filter without decoding the value."""
    return [
        ("mqtt.topic", message.topic.encode()),
        ("device_id", device_id.encode()),
        ("mqtt.broker", message.broker.encode()),
        ("bridge.instance", lineage.instance.encode()),
    ]


def decode(value: bytes) -> dict[str, Any]:
    """Read an envelope; raises ValueError if it is not one."""
    try:
        envelope = msgpack.unpackb(value, raw=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"not an envelope: {exc}") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("v"), int):
        raise ValueError("not an envelope: no version key 'v'")
    return envelope


def _fields(message: Message, device_id: str, lineage: Lineage, body: bytes,
            content_type: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": VERSION,
        "device_id": device_id,
        "content_type": content_type,
        "arrival_time_millis": message.arrival_millis,
        "body": body,
        "mqtt": {
            "topic": message.topic,
            "qos": message.qos,
            "broker": message.broker,
            "retain": message.retain,
            "dup": message.dup,
        },
        "bridge": {
            "instance": lineage.instance,
            "route": lineage.route,
            "map_version": lineage.map_version,
        },
    }
    if message.properties is not None:  # MQTT 5 properties: only those the PUBLISH had
        fields["mqtt"].update(mqtt_fields(message.properties))
    return fields


def encode_with(message: Message, device_id: str, lineage: Lineage, content_type: str,
                **extra: Any) -> bytes:
    """The envelope of an inline body plus keys of a section's own (`sparkplug: {...}`)."""
    fields = _fields(message, device_id, lineage, message.payload, content_type)
    fields.update(extra)
    packed: bytes = msgpack.packb(fields)
    return packed
