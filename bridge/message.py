"""The one core type: an MQTT message as it travels from the source to the sink.

It is built once at the MQTT edge (`Message.from_publish`), so codec objects never travel
further in, and it is frozen so no stage can change what another stage saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mqtt5


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH received from a broker of the fleet."""

    broker: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    arrival_millis: int
    user_properties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_publish(cls, broker: str, packet: mqtt5.PublishPacket) -> Message:
        return cls(
            broker=broker,
            topic=packet.topic,
            payload=packet.payload,
            qos=int(packet.qos),
            retain=packet.retain,
            dup=packet.duplicate,
            arrival_millis=time.time_ns() // 1_000_000,
            user_properties=tuple(packet.user_properties),
        )
