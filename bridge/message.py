"""The one core type: an MQTT message as it travels from the source to the sink.

It is built once at the MQTT edge (`Message.from_publish`), so codec objects never travel
further in. A NamedTuple: immutable like a frozen dataclass, and built in a third of the
time, which matters at tens of thousands of messages a second.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import mqtt5


class Properties(NamedTuple):
    """The MQTT 5 PUBLISH properties besides user properties that a consumer may need
    (MQTT 5, 3.3.2.3); the broker's topic alias and subscription ids are its own business."""

    content_type: str | None = None
    payload_format_indicator: int = 0  # 1: the payload is UTF-8 text
    message_expiry_interval: int | None = None  # seconds left when the broker sent it
    response_topic: str | None = None  # request/response: where the device wants an answer
    correlation_data: bytes | None = None  # ... and what to answer it with

    @classmethod
    def of(cls, packet: mqtt5.PublishPacket) -> Properties | None:
        """The packet's, or None when it has none of them (most messages)."""
        found = cls(packet.content_type, packet.payload_format_indicator,
                    packet.message_expiry_interval, packet.response_topic,
                    packet.correlation_data)
        return None if found == _NONE else found


_NONE = Properties()


class Message(NamedTuple):
    """One PUBLISH received from a broker of the fleet."""

    broker: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    arrival_millis: int
    user_properties: tuple[tuple[str, str], ...] = ()
    properties: Properties | None = None

    @classmethod
    def from_publish(cls, broker: str, packet: mqtt5.PublishPacket) -> Message:
        user = packet.user_properties
        return cls(broker, packet.topic, packet.payload, packet.qos.value, packet.retain,
                   packet.duplicate, time.time_ns() // 1_000_000,
                   tuple(user) if user else (), Properties.of(packet))
