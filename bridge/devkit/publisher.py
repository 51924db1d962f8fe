"""One device's MQTT 5 publisher on asyncio streams and the `mqtt5` codec (the fleet's
state machine): CONNECT / CONNACK, PUBLISH QoS 0/1/2 with packet ids, PUBACK,
PUBREC/PUBREL/PUBCOMP, the broker's Receive Maximum as the in-flight window, PINGREQ,
DISCONNECT. Each publish is settled exactly once through a `Settler`: `acked`, `refused`
(with the reason code), `unknown` (the connection went first) or `sent` (QoS 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import mqtt5

from bridge.config import mqtt_endpoint
from bridge.errors import MqttError
from bridge.mqtt import packet_length

if TYPE_CHECKING:
    from bridge.devkit.fleet import FleetSpec

_PINGREQ = mqtt5.PingReqPacket().write()
_DISCONNECT = mqtt5.DisconnectPacket().write()
_WRITE_HIGH = 256 * 1024  # buffered bytes before a QoS 0 publisher waits for the socket


@dataclass(slots=True)
class Publish:
    device_id: str
    seq: int
    topic: str
    qos: int
    sent_ns: int
    released: bool = False  # QoS 2: PUBREC arrived, PUBREL sent


class Settler(Protocol):
    def settle(self, publish: Publish, outcome: str, reason_code: int | None = None) -> None:
        ...


class ConnectionLost(MqttError):
    """The device's connection dropped; what it had in flight is settled `unknown`."""


class Connection:
    """One device's MQTT 5 connection: its window of unacked publishes by packet id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 window: int, outcomes: Settler) -> None:
        self.reader, self.writer, self.window, self.outcomes = reader, writer, window, outcomes
        self.pending: dict[int, Publish] = {}
        self.room = asyncio.Event()
        self.closed = False
        self._packet_id = 0
        self.last_received = asyncio.get_running_loop().time()

    async def reserve(self) -> None:
        """Wait for a free slot in the broker's Receive Maximum window."""
        while len(self.pending) >= self.window and not self.gone():
            self.room.clear()
            await self.room.wait()
        if self.gone():
            raise ConnectionLost("connection lost")

    def gone(self) -> bool:
        """Lost, or closing under us: writing on would only fail (and log each write)."""
        return self.closed or self.writer.transport.is_closing()

    async def publish(self, publish: Publish, body: bytes) -> None:
        packet_id = None
        if publish.qos:
            packet_id = self._next_packet_id()
            self.pending[packet_id] = publish
        self.writer.write(mqtt5.PublishPacket(publish.topic, body, qos=mqtt5.QoS(publish.qos),
                                              packet_id=packet_id).write())
        if not publish.qos:
            self.outcomes.settle(publish, "sent")
            if self.writer.transport.get_write_buffer_size() > _WRITE_HIGH:
                await self.writer.drain()

    def _next_packet_id(self) -> int:
        while True:
            self._packet_id = self._packet_id % 65535 + 1
            if self._packet_id not in self.pending:
                return self._packet_id

    async def read_loop(self) -> None:
        """Read acks until the broker closes (or `keep_alive` aborts a silent link).

        No wait_for here: on 3.11 it can swallow a cancel when data arrives at the same
        moment (CPython gh-86296), and a Ctrl-C must end every device at once."""
        buffer = bytearray()
        loop = asyncio.get_running_loop()
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionLost("connection closed by the broker")
            self.last_received = loop.time()
            buffer += chunk
            start = 0
            while (length := packet_length(buffer, start)) is not None and \
                    start + length <= len(buffer):
                self._on_packet(mqtt5.read(memoryview(buffer)[start:start + length])[0])
                start += length
            del buffer[:start]

    def _on_packet(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PubAckPacket):
            self._done(packet.packet_id, packet.reason_code.value)
        elif isinstance(packet, mqtt5.PubRecPacket):
            self._received(packet.packet_id, packet.reason_code.value)
        elif isinstance(packet, mqtt5.PubCompPacket):
            self._done(packet.packet_id, 0 if packet.reason_code.value < 0x80 else None)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            raise ConnectionLost(f"broker sent DISCONNECT {packet.reason_code.name}")

    def _received(self, packet_id: int, reason: int) -> None:
        """QoS 2's first ack: a refusal settles it, else PUBREL and wait for PUBCOMP."""
        if reason >= 0x80:
            self._done(packet_id, reason)
        elif (publish := self.pending.get(packet_id)) is not None:
            publish.released = True
            self.writer.write(mqtt5.PubRelPacket(packet_id).write())

    def _done(self, packet_id: int, reason: int | None) -> None:
        """The final ack: `reason` None is a PUBCOMP failure, whose outcome stays unknown."""
        publish = self.pending.pop(packet_id, None)
        if publish is None:
            return
        if reason is None:
            self.outcomes.settle(publish, "unknown")
        elif reason >= 0x80:
            self.outcomes.settle(publish, "refused", reason)
        else:
            self.outcomes.settle(publish, "acked")
        self.room.set()

    def lose(self) -> None:
        """The connection is gone: whatever it had in flight may or may not have arrived."""
        if not self.closed:
            self.closed = True
            self.writer.transport.abort()
        for publish in self.pending.values():
            self.outcomes.settle(publish, "unknown")
        self.pending.clear()
        self.room.set()

    async def disconnect(self, settle_timeout: float) -> None:
        """Wait for the acks in flight (up to `settle_timeout`), then DISCONNECT."""
        deadline = asyncio.get_running_loop().time() + settle_timeout
        while self.pending and not self.closed:
            self.room.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    await self.room.wait()
            except TimeoutError:
                break
        if not self.closed:
            self.writer.write(_DISCONNECT)
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(5):
                    await self.writer.drain()
        self.lose()


async def connect(spec: FleetSpec, client_id: str, outcomes: Settler) -> Connection:
    """Open one connection and read its CONNACK; a refusal raises MqttError."""
    scheme, host, port = mqtt_endpoint(spec.url)
    tls = spec.ssl_context or (ssl.create_default_context() if scheme == "mqtts" else None)
    try:
        async with asyncio.timeout(spec.connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    except OSError as exc:  # asyncio's "Connect call failed (...)": say it as the OS does
        raise OSError(exc.errno, os.strerror(exc.errno)) if exc.errno else exc from None
    writer.write(mqtt5.ConnectPacket(client_id, username=spec.username, password=spec.password,
                                     clean_start=True, keep_alive=spec.keepalive).write())
    try:
        async with asyncio.timeout(spec.connect_timeout):
            connack = await _read_connack(reader)
    except BaseException:
        writer.transport.abort()
        raise
    return Connection(reader, writer, connack.receive_max, outcomes)


async def _read_connack(reader: asyncio.StreamReader) -> mqtt5.ConnAckPacket:
    buffer = bytearray()
    while (length := packet_length(buffer, 0)) is None or len(buffer) < length:
        chunk = await reader.read(4096)
        if not chunk:
            raise MqttError("connection closed before CONNACK")
        buffer += chunk
    packet = mqtt5.read(memoryview(buffer)[:length])[0]
    if not isinstance(packet, mqtt5.ConnAckPacket):
        raise MqttError(f"expected CONNACK, got {type(packet).__name__}")
    if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
        raise MqttError(f"connection refused: {packet.reason_code.name}")
    return packet



async def keep_alive(connection: Connection, keepalive: int) -> None:
    """PINGREQ twice per keepalive; nothing from the broker for 1.5 of them is a drop."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(keepalive / 2)
        if loop.time() - connection.last_received > keepalive * 1.5:
            raise ConnectionLost(f"no answer from the broker in {keepalive * 1.5:g} s")
        connection.writer.write(_PINGREQ)
