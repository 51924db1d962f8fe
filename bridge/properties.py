"""MQTT 5 PUBLISH properties on their way into Kafka.

User properties become record headers under a route's prefix (`mqtt.user.` by default), in
order, repeats kept. The W3C trace context ("Trace Context: MQTT": user properties named
`traceparent` and `tracestate`) is also copied to headers of exactly those names, whatever
the prefix, so an OpenTelemetry consumer continues the device's trace. The other properties
(content type, payload format, expiry, response topic, correlation data) go into the
envelope's `mqtt` map: see `mqtt_fields`.

Devices choose all of it, so every copy is bounded (`Limits`): a message over them is a
`properties_too_large` dead letter, never a crash or a record Kafka refuses.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from bridge.auth import SIGNATURE_PROPERTY
from bridge.errors import Rejected
from bridge.message import Message, Properties

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
DEFAULT_PREFIX = "mqtt.user."
MAX_COUNT = 1000
MAX_BYTES = 64 * 1024
# Header names the bridge sets itself: no prefix may let a device's property forge one.
RESERVED = ("mqtt.topic", "device_id", "mqtt.broker", "bridge.instance", "error.code",
            TRACEPARENT, TRACESTATE)
# version-traceid-parentid-flags, lowercase hex (W3C Trace Context, 3.2); ids not all zero
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_MQTT_FIELD_OVERHEAD = 40  # the keys of the mqtt map's property fields, at most
# The longest tracestate W3C allows (3.3.1: 32 members of a 256-character key, '=' and a
# 256-character value, ',' between): a longer one is not propagated, so no record, not even
# a dead letter, carries megabytes of a device's text in a header.
TRACESTATE_MAX = 32 * (256 + 1 + 256) + 31


class Limits(NamedTuple):
    """What a route copies: its header prefix (None: user properties are not copied, the
    trace context still is), and at most how many user properties and bytes of them."""

    prefix: str | None = DEFAULT_PREFIX
    max_count: int = MAX_COUNT
    max_bytes: int = MAX_BYTES


class Copied(NamedTuple):
    """A message's headers besides lineage, and what the bridge learnt making them."""

    trace: list[tuple[str, bytes]]  # `traceparent` (and `tracestate`) when valid
    user: list[tuple[str, bytes]]  # the prefixed user properties, in order
    size: int  # bytes of the names and values of both
    invalid_traceparent: bool  # the device sent a traceparent that is not one


def valid_traceparent(value: str) -> bool:
    """Whether `value` is a W3C traceparent: version 00 exactly, or a later version's
    first four fields followed by nothing or '-' (what a version 00 parser may read)."""
    if len(value) < 55 or not _TRACEPARENT.fullmatch(value, 0, 55):
        return False
    version = value[:2]
    if version == "ff":
        return False
    return len(value) == 55 or (version != "00" and value[55] == "-")


def trace_context(user_properties: tuple[tuple[str, str], ...]
                  ) -> tuple[str | None, str | None, bool]:
    """(traceparent, tracestate, invalid): a valid traceparent, the tracestate that goes
    with it (several are joined with ',', as the HTTP binding does; none when longer than
    W3C allows), and whether the device sent a traceparent that is invalid (or more than
    one, which is ambiguous)."""
    parents = [value for name, value in user_properties if name == TRACEPARENT]
    if not parents:
        return None, None, False
    if len(parents) > 1 or not valid_traceparent(parents[0]):
        return None, None, True
    states = [value for name, value in user_properties if name == TRACESTATE]
    state = ",".join(states) if states else None
    if state is not None and len(state) > TRACESTATE_MAX:
        state = None
    return parents[0], state, False


def trace_headers(traceparent: str | None, tracestate: str | None) -> list[tuple[str, bytes]]:
    if traceparent is None:
        return []
    if tracestate is None:
        return [(TRACEPARENT, traceparent.encode())]
    return [(TRACEPARENT, traceparent.encode()), (TRACESTATE, _utf8(tracestate))]


def _utf8(text: str) -> bytes:
    """UTF-8 of any text: MQTT strings are UTF-8, but a lone surrogate must not crash."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _text(text: str) -> str:
    """Text that encodes as UTF-8 (a header name, an envelope string)."""
    return _utf8(text).decode()


def copy(user_properties: tuple[tuple[str, str], ...], limits: Limits,
         device_id: str = "", drop_signature: bool = False) -> Copied:
    """The headers of a message's user properties, or Rejected `properties_too_large`
    when those copied exceed the route's count or bytes. The count is checked before
    anything is encoded, and the bytes stop counting once over. `drop_signature` (hmac
    routes) leaves out the `signature` property the bridge checked."""
    parent, state, invalid = trace_context(user_properties)
    trace = trace_headers(parent, state)
    size = sum(len(name) + len(value) for name, value in trace)
    prefix = limits.prefix
    user: list[tuple[str, bytes]] = []
    if prefix is not None:
        count = len(user_properties)
        if count > limits.max_count:
            raise _too_large(f"{count} user properties", limits, device_id)
        for name, value in user_properties:
            if drop_signature and name == SIGNATURE_PROPERTY:
                continue
            header, data = _utf8(prefix + name), _utf8(value)
            size += len(header) + len(data)
            if size > limits.max_bytes:
                raise _too_large(f"more than {limits.max_bytes} bytes of user properties",
                                 limits, device_id)
            user.append((header.decode(), data))
    if size > limits.max_bytes:  # a tracestate alone can be that long
        raise _too_large(f"a trace context of {size} bytes", limits, device_id)
    return Copied(trace, user, size, invalid)


def _too_large(what: str, limits: Limits, device_id: str) -> Rejected:
    return Rejected("properties_too_large", f"{what}; the route copies up to "
                    f"user_properties_max_count = {limits.max_count} properties and "
                    f"user_properties_max_bytes = {limits.max_bytes} bytes", device_id)


def mqtt_fields(properties: Properties) -> dict[str, Any]:
    """The envelope's `mqtt` keys for the properties a PUBLISH had, only those present
    (a payload format indicator of 0, "unspecified bytes", is the same as none)."""
    fields: dict[str, Any] = {}
    if properties.content_type is not None:
        fields["content_type"] = _text(properties.content_type)
    if properties.payload_format_indicator:
        fields["payload_format_indicator"] = properties.payload_format_indicator
    if properties.message_expiry_interval is not None:
        fields["message_expiry_interval"] = properties.message_expiry_interval
    if properties.response_topic is not None:
        fields["response_topic"] = _text(properties.response_topic)
    if properties.correlation_data is not None:
        fields["correlation_data"] = properties.correlation_data
    return fields


def weight(message: Message, limits: Limits, device_id: str = "",
           drop_signature: bool = False) -> int:
    """The bytes a message's properties add to its record (headers and envelope keys, in
    UTF-8: a character may be four), or Rejected `properties_too_large` (see `copy`)."""
    size = copy(message.user_properties, limits, device_id, drop_signature).size if \
        message.user_properties else 0
    p = message.properties
    if p is not None:
        size += _MQTT_FIELD_OVERHEAD + len(_utf8(p.content_type or "")) + \
            len(_utf8(p.response_topic or "")) + len(p.correlation_data or b"")
    return size
