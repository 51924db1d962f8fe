"""BrokerSession against a scripted MQTT 5 broker.

A real Mosquitto cannot be told to split a packet byte by byte, send garbage, refuse a
CONNACK or go silent on a keepalive, so these tests put a tiny asyncio server on 127.0.0.1
in front of the session: it decodes what the client sends with `mqtt5.read` and answers
with the bytes each test chooses.

Waiting is done on conditions with timeouts (`until`). To prove that the client did NOT
send something, a test uses a *fence*: the broker sends a PUBREL, which the client answers
at once with a PUBCOMP; the client writes to its socket in order, so anything it had sent
before answering the fence has arrived by the time the fence's PUBCOMP has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import mqtt5
import pytest

import bridge.mqtt
from bridge.config import MQTT_MAX_PACKET_SIZE, BrokerConfig
from bridge.errors import MalformedPacket
from bridge.message import Message, Properties
from bridge.metrics import Metrics
from bridge.mqtt import BrokerSession, Inflight, packet_length

SUBSCRIPTIONS = ["devices/+/telemetry", "devices/+/files/#"]
QOS0, QOS1, QOS2 = mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE
FENCE_IDS = 60000  # packet ids the fences use, far above any a test uses for messages


# --------------------------------------------------------------------------- helpers


def run(test: Callable[[], Coroutine[Any, Any, None]], limit: float = 8.0) -> None:
    """Run one async test body; a hang fails the test instead of blocking the suite."""
    asyncio.run(asyncio.wait_for(test(), limit))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 2.0) -> None:
    """Wait until `predicate()` is true, polling the loop; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(packet_id: int | None, topic: str = "devices/d1/telemetry", payload: bytes = b"x",
            qos: mqtt5.QoS = QOS1, **kw: Any) -> bytes:
    return mqtt5.PublishPacket(topic, payload, qos=qos, packet_id=packet_id, **kw).write()


def connack(session_present: bool = False, **kw: Any) -> bytes:
    return mqtt5.ConnAckPacket(session_present=session_present, **kw).write()


class BrokerConn:
    """One client connection as the scripted broker sees it."""

    def __init__(self, index: int, writer: asyncio.StreamWriter) -> None:
        self.index, self.writer = index, writer
        self.packets: list[mqtt5.Packet] = []
        self.times: list[float] = []  # loop time each packet arrived
        self.eof = False              # the client closed (or reset) the connection
        self.connack_at: float | None = None
        self._partial = bytearray()  # a packet the test has begun to write, not finished
        self._held: list[bytes] = []  # the broker's answers meanwhile

    def send(self, data: bytes) -> None:
        """Write bytes as the broker: whole packets, or part of one the test finishes
        with a later send."""
        if data[:1] == b"\x20" and not self._partial:  # CONNACK
            self.connack_at = asyncio.get_running_loop().time()
        self.writer.write(data)
        self._track(data)

    def answer(self, data: bytes) -> None:
        """The broker's own answer (SUBACK, UNSUBACK, PINGRESP). It waits while the test is
        in the middle of a packet: a real broker never puts one packet inside another."""
        if self._partial:
            self._held.append(data)
        else:
            self.send(data)

    async def send_in_pieces(self, data: bytes, size: int, pause: float = 0.0) -> None:
        """Write `data` in pieces of `size` bytes, draining (and pausing) after each."""
        for i in range(0, len(data), size):
            self.send(data[i:i + size])
            await self.writer.drain()
            await asyncio.sleep(pause)

    def _track(self, data: bytes) -> None:
        """Follow packet boundaries in what was written; at one, send the held answers."""
        self._partial += data
        try:
            while (n := packet_length(self._partial, 0)) is not None and \
                    len(self._partial) >= n:
                del self._partial[:n]
        except MalformedPacket:  # garbage the test writes on purpose: no packet to finish
            self._partial.clear()
        if not self._partial and self._held:
            held, self._held = self._held, []
            for answer in held:
                self.send(answer)

    def close(self) -> None:
        self.writer.close()

    def of(self, kind: type) -> list[Any]:
        return [p for p in self.packets if isinstance(p, kind)]

    def pubacks(self) -> list[int]:
        return [p.packet_id for p in self.of(mqtt5.PubAckPacket)]

    def pubrecs(self) -> list[int]:
        return [p.packet_id for p in self.of(mqtt5.PubRecPacket)]

    def pubcomps(self) -> list[int]:
        return [p.packet_id for p in self.of(mqtt5.PubCompPacket) if p.packet_id < FENCE_IDS]

    def disconnects(self) -> list[mqtt5.DisconnectPacket]:
        return self.of(mqtt5.DisconnectPacket)


OnConnect = Callable[[BrokerConn, mqtt5.ConnectPacket], None]


def accept(conn: BrokerConn, connect: mqtt5.ConnectPacket) -> None:
    """The default answer to CONNECT: success, no session present."""
    conn.send(connack(session_present=False))


def answering(**fields: Any) -> OnConnect:
    """An `on_connect` that accepts each CONNECT with a CONNACK carrying `fields` (a Server
    Keep Alive, a Receive Maximum, a Maximum Packet Size...)."""
    def on_connect(conn: BrokerConn, _connect: mqtt5.ConnectPacket) -> None:
        conn.send(connack(**fields))
    return on_connect


class ScriptedBroker:
    """An MQTT 5 'broker' whose every answer is chosen by the test.

    `on_connect(conn, connect)` answers each CONNECT (default: CONNACK success, new session).
    SUBSCRIBE is answered with a SUBACK granting QoS 2 to every filter (`suback` overrides)
    and PINGREQ with PINGRESP while `answer_pings` is true. Everything else only gets the
    answers the test writes itself.
    """

    def __init__(self, on_connect: OnConnect = accept) -> None:
        self.on_connect = on_connect
        self.answer_pings = True
        self.suback: Callable[[mqtt5.SubscribePacket], bytes] | None = None
        self.connections: list[BrokerConn] = []
        self._fence_id = FENCE_IDS
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = BrokerConn(len(self.connections), writer)
        self.connections.append(conn)
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        try:
            while chunk := await reader.read(1 << 16):
                buffer += chunk
                while (n := packet_length(buffer, 0)) is not None and len(buffer) >= n:
                    packet, _ = mqtt5.read(bytes(buffer[:n]))
                    del buffer[:n]
                    conn.packets.append(packet)
                    conn.times.append(loop.time())
                    self._answer(conn, packet)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.eof = True

    def _answer(self, conn: BrokerConn, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            self.on_connect(conn, packet)
        elif isinstance(packet, mqtt5.SubscribePacket):
            conn.answer(self.suback(packet) if self.suback else mqtt5.SubAckPacket(
                packet.packet_id,
                [mqtt5.SubAckReasonCode.GRANTED_QOS_EXACTLY_ONCE] * len(packet.topic_filters),
            ).write())
        elif isinstance(packet, mqtt5.UnsubscribePacket):
            conn.answer(mqtt5.UnsubAckPacket(packet.packet_id, [
                mqtt5.UnsubAckReasonCode.SUCCESS] * len(packet.patterns)).write())
        elif isinstance(packet, mqtt5.PingReqPacket) and self.answer_pings:
            conn.answer(mqtt5.PingRespPacket().write())

    async def connection(self, index: int, timeout: float = 2.0) -> BrokerConn:
        """The index-th connection, once its CONNECT has arrived."""
        await until(lambda: len(self.connections) > index
                    and self.connections[index].of(mqtt5.ConnectPacket),
                    f"CONNECT on connection #{index}", timeout)
        return self.connections[index]

    async def fence(self, conn: BrokerConn) -> None:
        """Return once the client has answered a PUBREL sent now: it has nothing older unsent."""
        self._fence_id += 1
        fence_id = self._fence_id
        conn.send(mqtt5.PubRelPacket(fence_id).write())
        await until(lambda: any(p.packet_id == fence_id for p in conn.of(mqtt5.PubCompPacket)),
                    f"PUBCOMP answering fence {fence_id}")


class Recorder:
    """The session's handler: records (message, inflight); optionally acks at once."""

    def __init__(self, ack_at_once: bool = False) -> None:
        self.ack_at_once = ack_at_once
        self.received: list[tuple[Message, Inflight | None]] = []

    def __call__(self, message: Message, inflight: Inflight | None) -> None:
        self.received.append((message, inflight))
        if self.ack_at_once and inflight is not None:
            inflight()

    @property
    def messages(self) -> list[Message]:
        return [m for m, _ in self.received]

    def inflight(self, index: int) -> Inflight:
        handle = self.received[index][1]
        assert handle is not None
        return handle

    async def wait(self, count: int, timeout: float = 2.0) -> None:
        await until(lambda: len(self.received) >= count, f"{count} messages at the handler",
                    timeout)


def broker_config(port: int, **overrides: Any) -> BrokerConfig:
    fields: dict[str, Any] = dict(
        url=f"mqtt://127.0.0.1:{port}", client_id="mkb-test-1", host="127.0.0.1", port=port,
        tls=False, keepalive=5, receive_max=17, reconnect_min=0.01, reconnect_max=0.05,
        presence_prefix="")  # the presence tests below turn it on
    fields.update(overrides)
    return BrokerConfig(**fields)


class Client:
    """A running BrokerSession and what the test needs to look at."""

    def __init__(self, session: BrokerSession, metrics: Metrics, task: asyncio.Task[None],
                 handler: Any) -> None:
        self.session, self.metrics, self.task, self.handler = session, metrics, task, handler

    def count(self, name: str) -> int:
        return int(self.metrics.value(name))

    def assert_alive(self) -> None:
        if self.task.done():
            died = None if self.task.cancelled() else self.task.exception()
            raise AssertionError(f"the session task ended: {died!r}")


@contextlib.asynccontextmanager
async def client(broker: ScriptedBroker, handler: Any = None,
                 subscriptions: list[str] | None = None, **overrides: Any
                 ) -> AsyncIterator[Client]:
    handler = handler if handler is not None else Recorder(ack_at_once=True)
    metrics = Metrics()
    session = BrokerSession(broker_config(broker.port, **overrides),
                            list(subscriptions or SUBSCRIPTIONS), handler, metrics)
    task = asyncio.create_task(session.run())
    try:
        yield Client(session, metrics, task, handler)
    finally:
        session.stop_reading()
        task.cancel()
        # The task may have died with anything (even a BaseException): collect, never raise.
        await asyncio.gather(task, return_exceptions=True)
        await session.close()


@pytest.fixture
def backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record each reconnect delay cap the session draws its jitter from; sleep 0 instead."""
    caps: list[float] = []

    def uniform(low: float, high: float) -> float:
        caps.append(high)
        return 0.0

    monkeypatch.setattr(bridge.mqtt.random, "uniform", uniform)
    return caps


# --------------------------------------------------------------------------- 1. CONNECT, SUBSCRIBE


def test_connect_asks_for_a_persistent_session_and_subscribes_a_new_one() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker, receive_max=17, subscribe_qos=1,
                                                      session_expiry=86400):
            conn = await broker.connection(0)
            connect = conn.of(mqtt5.ConnectPacket)[0]
            assert connect.clean_start is False
            assert connect.client_id == "mkb-test-1"
            assert connect.session_expiry_interval == 86400
            assert connect.receive_max == 17
            assert connect.keep_alive == 5
            assert connect.max_packet_size == MQTT_MAX_PACKET_SIZE  # never below a broker's

            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            [subscribe] = conn.of(mqtt5.SubscribePacket)
            assert [f.pattern for f in subscribe.topic_filters] == SUBSCRIPTIONS
            assert {int(f.max_qos) for f in subscribe.topic_filters} == {1}
            assert 1 <= subscribe.packet_id <= 65535

    run(body)


def test_a_present_session_is_subscribed_again_without_resending_retained() -> None:
    """Filters added to the config while the bridge was away must be subscribed; asking
    again for the ones the broker has costs nothing: retained messages are sent only for a
    subscription that did not exist."""
    async def body() -> None:
        def resume(conn: BrokerConn, connect: mqtt5.ConnectPacket) -> None:
            conn.send(connack(session_present=True))

        async with ScriptedBroker(resume) as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            [subscribe] = conn.of(mqtt5.SubscribePacket)
            assert [f.pattern for f in subscribe.topic_filters] == SUBSCRIPTIONS
            assert [f.retain_handling.value for f in subscribe.topic_filters] == [
                mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS.value] * 2
            assert c.count("mqtt_connects") == 1

    run(body)


def test_changed_filters_are_subscribed_and_unsubscribed_on_the_live_connection() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(c.session.connected.is_set, "session connected")
            c.session.update_subscriptions(["devices/+/telemetry", "devices/+/alerts/#"])
            await until(lambda: len(conn.of(mqtt5.SubscribePacket)) == 2, "second SUBSCRIBE")
            await until(lambda: conn.of(mqtt5.UnsubscribePacket), "UNSUBSCRIBE")
            added = conn.of(mqtt5.SubscribePacket)[1]
            [removed] = conn.of(mqtt5.UnsubscribePacket)
            assert [f.pattern for f in added.topic_filters] == ["devices/+/alerts/#"]
            assert list(removed.patterns) == ["devices/+/files/#"]
            assert len(broker.connections) == 1  # the session was never dropped
            await until(c.session._unsubscribed.is_set, "UNSUBACK handled")
            c.assert_alive()

    run(body)


def test_filters_removed_while_disconnected_are_unsubscribed_on_reconnect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge.mqtt.random, "uniform", lambda low, high: 0.3)  # time to change

    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker, reconnect_min=0.01) as c:
            first = await broker.connection(0)
            await until(c.session.connected.is_set, "session connected")
            first.close()
            await until(lambda: not c.session.connected.is_set(), "disconnect noticed")
            c.session.update_subscriptions(["devices/+/telemetry"])
            second = await broker.connection(1)
            await until(lambda: second.of(mqtt5.UnsubscribePacket), "UNSUBSCRIBE")
            [removed] = second.of(mqtt5.UnsubscribePacket)
            assert list(removed.patterns) == ["devices/+/files/#"]
            [subscribe] = second.of(mqtt5.SubscribePacket)
            assert [f.pattern for f in subscribe.topic_filters] == ["devices/+/telemetry"]

    run(body)


def test_share_group_subscribes_shared_filters() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker, share_group="bridges"):
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            [subscribe] = conn.of(mqtt5.SubscribePacket)
            assert [f.pattern for f in subscribe.topic_filters] == [
                "$share/bridges/devices/+/telemetry", "$share/bridges/devices/+/files/#"]

    run(body)


def test_refused_subscription_is_counted_and_the_session_goes_on() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker:
            broker.suback = lambda sub: mqtt5.SubAckPacket(sub.packet_id, [
                mqtt5.SubAckReasonCode.GRANTED_QOS_EXACTLY_ONCE,
                mqtt5.SubAckReasonCode.NOT_AUTHORIZED]).write()
            async with client(broker) as c:
                conn = await broker.connection(0)
                await until(lambda: c.count("mqtt_subscribe_failures") == 1,
                            "mqtt_subscribe_failures == 1")
                await broker.fence(conn)  # still connected and reading
                c.assert_alive()
                assert len(broker.connections) == 1
                # answered is subscribed: a refusal is an alert, not a readiness never met
                assert c.session.subscribed.is_set()

    run(body)


# --------------------------------------------------------------------------- 2-4. acks


def test_qos1_puback_only_after_durable_and_in_receive_order() -> None:
    async def body() -> None:
        recorder = Recorder()
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            conn.send(publish(1, payload=b"one") + publish(2, payload=b"two")
                      + publish(3, payload=b"three"))
            await recorder.wait(3)
            assert [m.payload for m in recorder.messages] == [b"one", b"two", b"three"]
            assert [m.qos for m in recorder.messages] == [1, 1, 1]
            await broker.fence(conn)
            assert conn.pubacks() == [], "PUBACK before the message was durable"

            recorder.inflight(2)()  # message 3 durable: 1 and 2 still owed, so nothing yet
            await broker.fence(conn)
            assert conn.pubacks() == []

            recorder.inflight(0)()  # message 1 durable: its ack may leave, 3 still waits for 2
            await broker.fence(conn)
            assert conn.pubacks() == [1]

            recorder.inflight(1)()  # message 2 durable: 2 and 3 leave, in that order
            await broker.fence(conn)
            assert conn.pubacks() == [1, 2, 3]
            assert all(p.reason_code == mqtt5.PubAckReasonCode.SUCCESS
                       for p in conn.of(mqtt5.PubAckPacket))

    run(body)


def test_a_full_window_stops_reading_even_when_the_broker_overshoots() -> None:
    """Mosquitto 2.0 sends past the client's Receive Maximum; the bound must hold anyway."""
    async def body() -> None:
        recorder = Recorder()
        async with ScriptedBroker() as broker, client(broker, recorder, receive_max=3) as c:
            conn = await broker.connection(0)
            conn.send(b"".join(publish(i, payload=b"%d" % i) for i in range(1, 6)))
            await recorder.wait(3)
            await asyncio.sleep(0.2)
            assert len(recorder.received) == 3, "read past a full window"
            assert c.count("mqtt_window_full") == 1

            recorder.inflight(1)()  # message 2 durable, 1 still owed: the window stays full
            await asyncio.sleep(0.2)
            assert len(recorder.received) == 3

            recorder.inflight(0)()  # 1 and 2 acked: two slots free
            await recorder.wait(5)
            assert [m.payload for m in recorder.messages] == [b"1", b"2", b"3", b"4", b"5"]
            await until(lambda: conn.pubacks() == [1, 2], "PUBACK 1, 2")

    run(body)


def test_qos2_pubrec_after_durable_and_pubrel_answered_with_pubcomp() -> None:
    async def body() -> None:
        recorder = Recorder()
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            conn.send(publish(7, payload=b"exactly", qos=QOS2))
            await recorder.wait(1)
            assert recorder.messages[0].qos == 2
            await broker.fence(conn)
            assert conn.pubrecs() == []

            recorder.inflight(0)()
            await until(lambda: conn.pubrecs() == [7], "PUBREC 7")
            assert conn.pubacks() == []

            conn.send(mqtt5.PubRelPacket(7).write())
            await until(lambda: conn.pubcomps() == [7], "PUBCOMP 7")

    run(body)


def test_qos0_has_no_ack_handle_and_gets_no_answer() -> None:
    async def body() -> None:
        recorder = Recorder()
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            conn.send(publish(None, qos=QOS0, payload=b"a") + publish(None, qos=QOS0,
                                                                       payload=b"b"))
            await recorder.wait(2)
            assert [(m.payload, m.qos, i) for m, i in recorder.received] == [
                (b"a", 0, None), (b"b", 0, None)]
            await broker.fence(conn)
            sent = [type(p) for p in conn.packets]
            assert sent == [mqtt5.ConnectPacket, mqtt5.SubscribePacket, mqtt5.PubCompPacket]

    run(body)


def test_handler_backpressure_pauses_reading() -> None:
    async def body() -> None:
        gate = asyncio.get_running_loop().create_future()
        seen: list[bytes] = []

        def handler(message: Message, inflight: Inflight | None) -> Any:
            seen.append(message.payload)
            if inflight is not None:
                inflight()
            return gate if message.payload == b"slow" else None

        async with ScriptedBroker() as broker, client(broker, handler):
            conn = await broker.connection(0)
            conn.send(publish(1, payload=b"slow") + publish(2, payload=b"next"))
            await until(lambda: seen == [b"slow"], "the first message")
            await asyncio.sleep(0.1)  # nothing to wait for: the point is that nothing happens
            assert seen == [b"slow"], "read on while the handler pushed back"
            gate.set_result(None)
            await until(lambda: seen == [b"slow", b"next"], "the second message")
            await until(lambda: conn.pubacks() == [1, 2], "PUBACK 1, 2")

    run(body)


# --------------------------------------------------------------------------- 5-6. framing


def test_publish_written_one_byte_at_a_time() -> None:
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        payload = bytes(range(200))  # remaining length > 127: a two-byte length to split too
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            await conn.send_in_pieces(publish(9, "devices/d9/telemetry", payload), 1, 0.001)
            await recorder.wait(1, timeout=15)  # 200+ pauses: slow on a loaded machine
            [message] = recorder.messages
            assert (message.topic, message.payload, message.qos) == (
                "devices/d9/telemetry", payload, 1)
            await until(lambda: conn.pubacks() == [9], "PUBACK 9")

    run(body)


def test_coalesced_publishes_arrive_in_order() -> None:
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        ids = range(1, 201)
        blob = b"".join(publish(i, f"devices/d{i % 7}/telemetry", f"m{i}".encode())
                        for i in ids)
        tail = publish(201, payload=b"tail")
        async with ScriptedBroker() as broker, client(broker, recorder, receive_max=1000):
            conn = await broker.connection(0)
            conn.send(blob + tail[:5])  # 200 whole packets and the start of one more
            await recorder.wait(200)
            conn.send(tail[5:])
            await recorder.wait(201)
            assert [m.payload for m in recorder.messages] == [f"m{i}".encode() for i in ids] + [
                b"tail"]
            assert [m.topic for m in recorder.messages[:7]] == [
                f"devices/d{i % 7}/telemetry" for i in range(1, 8)]
            await until(lambda: len(conn.pubacks()) == 201, "201 PUBACKs")
            assert conn.pubacks() == list(range(1, 202))

    run(body)


def test_two_mib_payload_split_across_many_writes() -> None:
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        payload = bytes(i * 7 % 251 for i in range(2 * 2**20))
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            await conn.send_in_pieces(publish(3, "devices/big/files/f1/0", payload), 65_537)
            await recorder.wait(1)
            [message] = recorder.messages
            assert message.topic == "devices/big/files/f1/0"
            assert len(message.payload) == len(payload)
            # no 2 MiB diff on failure: pytest's would take minutes
            first_difference = next((i for i, (a, b) in enumerate(
                zip(message.payload, payload, strict=True)) if a != b), None)
            assert first_difference is None
            await until(lambda: conn.pubacks() == [3], "PUBACK 3")

    run(body)


# --------------------------------------------------------------------------- 7. malformed input


async def _expect_malformed_disconnect_and_reconnect(garbage: bytes) -> None:
    async with ScriptedBroker() as broker, client(broker) as c:
        first = await broker.connection(0)
        await until(lambda: first.of(mqtt5.SubscribePacket), "SUBSCRIBE")
        first.send(garbage)
        await until(lambda: first.disconnects() or c.task.done(), "DISCONNECT from the client")
        c.assert_alive()
        [disconnect] = first.disconnects()
        assert disconnect.reason_code.value == 0x81  # MALFORMED_PACKET
        await until(lambda: first.eof, "the client to close the connection")
        second = await broker.connection(1)
        assert second.of(mqtt5.ConnectPacket)[0].client_id == "mkb-test-1"
        assert c.count("mqtt_malformed_packets") == 1
        c.assert_alive()


@pytest.mark.parametrize("garbage", [
    pytest.param(b"\xf0\x00", id="undecodable-auth"),
    pytest.param(b"\x00\x00", id="reserved-packet-type"),
    pytest.param(b"\x30\xff\xff\xff\xff\x01", id="remaining-length-over-4-bytes"),
    pytest.param(publish(1) + b"\x00\x00", id="garbage-after-a-good-publish"),
])
def test_malformed_bytes_disconnect_with_reason_and_reconnect(garbage: bytes) -> None:
    run(lambda: _expect_malformed_disconnect_and_reconnect(garbage))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_invalid_utf8_topic_is_malformed_not_fatal() -> None:
    bad_topic = publish(1, topic="a/b").replace(b"\x00\x03a/b", b"\x00\x03a\xffb")
    run(lambda: _expect_malformed_disconnect_and_reconnect(bad_topic))


def test_oversize_packet_is_refused_from_its_header() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker, max_packet_size=100_000) as c:
            conn = await broker.connection(0)
            assert conn.of(mqtt5.ConnectPacket)[0].max_packet_size == 100_000
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            conn.send(b"\x30" + varint(100_000) + b"\x00\x03a/b")
            await until(lambda: conn.disconnects(), "DISCONNECT for an oversize packet", 1.0)
            # MQTT 5 3.1.2.24: PACKET_TOO_LARGE
            assert conn.disconnects()[0].reason_code.value == 0x95
            await broker.connection(1)
            c.assert_alive()

    run(body)


# --------------------------------------------------------------------------- 8. refusals, backoff


def test_broker_disconnect_with_reason_makes_the_client_reconnect() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker) as c:
            first = await broker.connection(0)
            await until(lambda: first.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            first.send(mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN,
                reason_str="maintenance").write())
            await until(lambda: first.eof, "the client to close the connection")
            assert first.disconnects() == []  # a client never answers DISCONNECT (4.13)
            await broker.connection(1)
            assert c.count("mqtt_reconnects") == 1
            assert c.count("mqtt_connects") >= 1
            c.assert_alive()

    run(body)


def test_refused_connack_is_retried_with_growing_backoff(backoff: list[float]) -> None:
    async def body() -> None:
        def refuse_three_times(conn: BrokerConn, connect: mqtt5.ConnectPacket) -> None:
            if conn.index < 3:
                conn.send(connack(reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED,
                                  reason_str="who are you"))
            else:
                conn.send(connack())

        async with ScriptedBroker(refuse_three_times) as broker, client(broker) as c:
            fourth = await broker.connection(3)
            await until(c.session.connected.is_set, "connected after three refusals")
            await until(lambda: fourth.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            assert c.count("mqtt_reconnects") == 3
            assert c.count("mqtt_connects") == 1
            # full jitter over min * 2**attempt, capped at reconnect_max: 0.02, 0.04, 0.05
            assert backoff == pytest.approx([0.02, 0.04, 0.05])
            for refused in broker.connections[:3]:
                await until(lambda r=refused: r.eof, "refused connection closed")
                assert sent_only_connect(refused)
            c.assert_alive()

    run(body)


def sent_only_connect(conn: BrokerConn) -> bool:
    return [type(p) for p in conn.packets] == [mqtt5.ConnectPacket]


def test_backoff_starts_over_after_a_successful_connect(backoff: list[float]) -> None:
    async def body() -> None:
        def accept_then_hang_up(conn: BrokerConn, connect: mqtt5.ConnectPacket) -> None:
            conn.send(connack())
            conn.close()

        async with ScriptedBroker(accept_then_hang_up) as broker, client(broker) as c:
            await broker.connection(5)
            assert c.count("mqtt_connects") >= 5
            assert backoff[:5] == pytest.approx([0.02] * 5), (
                f"backoff kept growing across accepted connections: {backoff}")

    run(body)


# --------------------------------------------------------------------------- 9. stale acks


def test_ack_owed_on_an_old_connection_is_dropped() -> None:
    async def body() -> None:
        recorder = Recorder()

        def resume(conn: BrokerConn, connect: mqtt5.ConnectPacket) -> None:
            conn.send(connack(session_present=conn.index > 0))

        async with ScriptedBroker(resume) as broker, client(broker, recorder) as c:
            first = await broker.connection(0)
            first.send(publish(1, payload=b"before"))
            await recorder.wait(1)
            old = recorder.inflight(0)
            first.close()

            second = await broker.connection(1)
            await until(c.session.connected.is_set, "reconnected")
            old()  # durable now, but the connection it was owed on is gone
            await broker.fence(second)
            assert second.pubacks() == []
            assert c.count("mqtt_acks_dropped_stale_connection") == 1

            # The broker redelivers with the same id; that one is acked on this connection.
            second.send(publish(1, payload=b"before", duplicate=True))
            await recorder.wait(2)
            assert recorder.messages[1].dup is True
            recorder.inflight(1)()
            await until(lambda: second.pubacks() == [1], "PUBACK 1 on the new connection")
            await broker.fence(second)
            assert second.pubacks() == [1]
            assert first.pubacks() == []

    run(body)


# --------------------------------------------------------------------------- 10. keepalive


def test_keepalive_sends_pingreq() -> None:
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker, keepalive=2) as c:
            conn = await broker.connection(0)
            assert conn.of(mqtt5.ConnectPacket)[0].keep_alive == 2
            await until(lambda: conn.of(mqtt5.PingReqPacket), "PINGREQ", 2.0)
            assert conn.connack_at is not None
            first_ping = conn.times[conn.packets.index(conn.of(mqtt5.PingReqPacket)[0])]
            assert 0.8 <= first_ping - conn.connack_at <= 1.6  # every keepalive / 2
            c.assert_alive()
            assert len(broker.connections) == 1

    run(body)


def test_keepalive_timeout_drops_a_silent_broker_and_reconnects() -> None:
    # keepalive=2 in the config would need > 3 s of silence; the broker's Server Keep Alive
    # (which the client must adopt, MQTT 5 3.2.2.3.14) brings it to 1 s: timeout after 1.5 s.
    async def body() -> None:
        async with ScriptedBroker(answering(server_keep_alive=1)) as broker, \
                client(broker, keepalive=2) as c:
            broker.answer_pings = False
            first = await broker.connection(0)
            await until(lambda: first.eof, "the client to give up the silent connection", 3.0)
            assert first.connack_at is not None
            gave_up_after = asyncio.get_running_loop().time() - first.connack_at
            assert 1.2 <= gave_up_after <= 2.6
            assert first.of(mqtt5.PingReqPacket), "no PINGREQ before giving up"
            await broker.connection(1)
            assert c.count("mqtt_reconnects") >= 1
            c.assert_alive()

    run(body)


def test_answered_pings_keep_the_connection() -> None:
    async def body() -> None:
        async with ScriptedBroker(answering(server_keep_alive=1)) as broker, \
                client(broker, keepalive=2) as c:
            conn = await broker.connection(0)
            await until(lambda: len(conn.of(mqtt5.PingReqPacket)) >= 4, "4 PINGREQs", 2.8)
            assert len(broker.connections) == 1 and not conn.eof
            assert c.count("mqtt_reconnects") == 0

    run(body)


def test_slow_connack_does_not_count_against_keepalive() -> None:
    async def body() -> None:
        def slow(conn: BrokerConn, connect: mqtt5.ConnectPacket) -> None:
            asyncio.get_running_loop().call_later(
                1.5, conn.send, connack(session_present=True, server_keep_alive=1))

        async with ScriptedBroker(slow) as broker, client(broker, keepalive=2) as c:
            conn = await broker.connection(0)
            await until(lambda: conn.connack_at is not None, "CONNACK sent", 2.0)
            await asyncio.sleep(1.2)  # the broker answers every PINGREQ meanwhile
            assert not conn.eof and len(broker.connections) == 1, (
                "connection dropped right after a slow CONNACK")
            assert c.count("mqtt_reconnects") == 0

    run(body)


# --------------------------------------------------------------------------- 11. shutdown


def test_stop_reading_then_close_sends_durable_acks_then_disconnect() -> None:
    async def body() -> None:
        recorder = Recorder()
        async with ScriptedBroker() as broker, client(broker, recorder) as c:
            conn = await broker.connection(0)
            conn.send(publish(1, payload=b"a") + publish(2, payload=b"b"))
            await recorder.wait(2)
            await broker.fence(conn)

            c.session.stop_reading()
            conn.send(publish(3, payload=b"after stop"))  # must not be taken any more
            await until(c.task.done, "run() to return after stop_reading", 2.0)
            assert [m.payload for m in recorder.messages] == [b"a", b"b"]

            recorder.inflight(0)()  # 1 is durable; 2 never becomes durable
            await c.session.close()
            await until(lambda: conn.eof, "the client to close the connection")
            after_fence = [p for p in conn.packets[conn.packets.index(
                conn.of(mqtt5.PubCompPacket)[-1]) + 1:]]
            assert [type(p) for p in after_fence] == [mqtt5.PubAckPacket,
                                                      mqtt5.DisconnectPacket]
            assert after_fence[0].packet_id == 1
            assert after_fence[1].reason_code.value == 0x00  # NORMAL_DISCONNECTION
            assert c.task.exception() is None

    run(body)


# --------------------------------------------------------------------------- 12. presence, retire


def test_presence_is_retained_online_with_a_will_that_says_offline() -> None:
    """`adopt` tells a live member from a gone one by this: online on connect (QoS 1, so an
    ACL's refusal is answered and counted), offline as the will, published by the broker when
    the connection dies, and on a restart's DISCONNECT (reason 0x04)."""
    async def body() -> None:
        async with ScriptedBroker() as broker, \
                client(broker, presence_prefix="mkb/sessions") as c:
            conn = await broker.connection(0)
            connect = conn.of(mqtt5.ConnectPacket)[0]
            assert connect.will is not None and connect.will.retain
            assert connect.will.topic == "mkb/sessions/mkb-test-1"
            assert json.loads(connect.will.payload or b"")["state"] == "offline"
            await until(lambda: conn.of(mqtt5.PublishPacket), "the presence PUBLISH")
            online = conn.of(mqtt5.PublishPacket)[0]
            assert (online.topic, online.retain, online.qos.value) == (
                "mkb/sessions/mkb-test-1", True, 1)
            assert json.loads(online.payload)["state"] == "online"
            assert json.loads(online.payload)["pid"] == os.getpid()
            conn.send(mqtt5.PubAckPacket(online.packet_id,
                                         reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED
                                         ).write())
            await until(lambda: c.metrics.value("mqtt_presence_refused") == 1,
                        "the refusal to be counted")
            assert not c.task.done()  # a refused presence costs no reconnect
            c.session.stop_reading()
            await c.session.close()
            await until(lambda: conn.of(mqtt5.DisconnectPacket), "DISCONNECT")
            assert conn.of(mqtt5.DisconnectPacket)[0].reason_code.value == 0x04

    run(body)


def test_retire_unsubscribes_drains_clears_presence_then_ends_the_session() -> None:
    """What the broker queued is bridged and acked first; then the presence is cleared and
    the DISCONNECT says session expiry 0. A message that arrives while the presence is
    being cleared is acked before the session ends, never forgotten with it, and says the
    broker may not be done: the retire waits for quiet again."""
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        async with ScriptedBroker() as broker, \
                client(broker, recorder, presence_prefix="mkb/sessions") as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            retiring = asyncio.create_task(c.session.retire(quiet=0.3))
            await until(lambda: conn.of(mqtt5.UnsubscribePacket), "UNSUBSCRIBE")
            assert sorted(conn.of(mqtt5.UnsubscribePacket)[0].patterns) == \
                sorted(SUBSCRIPTIONS)
            conn.send(publish(1, payload=b"queued"))  # still queued for the session
            await until(lambda: len(conn.of(mqtt5.PublishPacket)) == 2, "presence cleared")
            cleared = conn.of(mqtt5.PublishPacket)[1]
            assert (cleared.topic, cleared.payload, cleared.retain) == (
                "mkb/sessions/mkb-test-1", b"", True)
            conn.send(publish(2, payload=b"late"))  # arrives before the clear is acked
            await asyncio.sleep(0.1)
            conn.send(mqtt5.PubAckPacket(cleared.packet_id).write())
            # "late" says the broker was not done: quiet again, and clear again, first
            await until(lambda: len(conn.of(mqtt5.PublishPacket)) == 3, "cleared again")
            again = conn.of(mqtt5.PublishPacket)[2]
            assert (again.topic, again.payload) == ("mkb/sessions/mkb-test-1", b"")
            conn.send(mqtt5.PubAckPacket(again.packet_id).write())
            await asyncio.wait_for(retiring, 10)
            acked = [p.packet_id for p in conn.of(mqtt5.PubAckPacket)]
            assert acked == [1, 2]
            last = conn.packets[-1]
            assert isinstance(last, mqtt5.DisconnectPacket)
            assert last.session_expiry_interval == 0 and last.reason_code.value == 0
            assert [m.payload for m in recorder.messages] == [b"queued", b"late"]

    run(body)


def test_the_bridges_own_publish_answers_with_the_puback_or_none() -> None:
    """An answer to a device or a command to an edge node: QoS 1 on the open connection, a
    future of the PUBACK's reason code; None once the connection is lost, None at once while
    not connected (nothing is queued for later)."""
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(c.session.connected.is_set, "connected")
            answer = c.session.publish("devices/d1/files/f1/result", b'{"result":"ok"}',
                                       correlation_data=b"\x01\x02",
                                       user_properties=[("k", "v")])
            assert answer is not None
            await until(lambda: conn.of(mqtt5.PublishPacket), "the PUBLISH")
            sent = conn.of(mqtt5.PublishPacket)[0]
            assert (sent.topic, sent.qos.value, sent.correlation_data, sent.user_properties) \
                == ("devices/d1/files/f1/result", 1, b"\x01\x02", [("k", "v")])
            conn.send(mqtt5.PubAckPacket(sent.packet_id, reason_code=mqtt5.PubAckReasonCode
                                         .NOT_AUTHORIZED).write())
            assert await asyncio.wait_for(answer, 5) == 0x87
            lost = c.session.publish("devices/d1/x", b"")
            assert lost is not None
            await until(lambda: len(conn.of(mqtt5.PublishPacket)) == 2, "the second PUBLISH")
            broker.on_connect = lambda _conn, _connect: None  # no CONNACK from now on
            conn.writer.close()  # the broker goes: no PUBACK will come on this connection
            assert await asyncio.wait_for(lost, 5) is None
            await until(lambda: not c.session.connected.is_set(), "disconnected")
            await broker.connection(1)  # it tries again, and waits for a CONNACK
            assert c.session.publish("devices/d1/x", b"") is None

    run(body)


def test_the_bridges_own_publishes_stay_within_the_brokers_receive_maximum() -> None:
    """MQTT 5, 3.3.4: no more unanswered QoS 1 PUBLISHes than the CONNACK's Receive Maximum
    (more is a protocol error that costs the connection); past it, None at once (counted),
    and a PUBACK makes room. A packet id still awaiting its answer is never reused."""
    async def body() -> None:
        async with ScriptedBroker(answering(receive_max=2)) as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(c.session.connected.is_set, "connected")
            first, second = (c.session.publish(f"devices/d1/r{i}", b"") for i in (1, 2))
            assert first is not None and second is not None
            assert c.session.publish("devices/d1/r3", b"") is None
            assert c.metrics.value("mqtt_publishes_held_back", broker=c.session.name) == 1
            await until(lambda: len(conn.of(mqtt5.PublishPacket)) == 2, "two PUBLISHes")
            [one, two] = conn.of(mqtt5.PublishPacket)
            conn.send(mqtt5.PubAckPacket(two.packet_id).write())
            assert await asyncio.wait_for(second, 5) == 0
            c.session._packet_id = one.packet_id - 1  # ids come round to one still unanswered
            third = c.session.publish("devices/d1/r3", b"")
            assert third is not None
            await until(lambda: len(conn.of(mqtt5.PublishPacket)) == 3, "the third PUBLISH")
            assert conn.of(mqtt5.PublishPacket)[2].packet_id != one.packet_id
            conn.send(mqtt5.PubAckPacket(one.packet_id).write())
            assert await asyncio.wait_for(first, 5) == 0
            assert not third.done()  # its PUBACK has not come: the first's was not taken

    run(body)


def test_publish_properties_travel_with_the_message() -> None:
    """Content type, payload format, expiry, response topic and correlation data reach the
    pipeline (headers, answers to devices); a PUBLISH without them carries None, the same on
    the fast path as through mqtt5."""
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            conn.send(publish(1, payload=b"a", content_type="application/json",
                              payload_format_indicator=1, message_expiry_interval=60,
                              response_topic="devices/d1/answers",
                              correlation_data=b"\x00\x01",
                              user_properties=[("traceparent", "00-ab-cd-01")])
                      + publish(2, payload=b"b") + publish(3, payload=b"c"))
            await recorder.wait(3)
            first, second, third = recorder.messages
            assert first.properties == Properties("application/json", 1, 60,
                                                  "devices/d1/answers", b"\x00\x01")
            assert first.user_properties == (("traceparent", "00-ab-cd-01"),)
            assert second.properties is None and third.properties is None

    run(body)


def test_presence_and_announce_at_connect_stay_within_the_receive_maximum() -> None:
    """The presence and the birth a connect publishes go through the same Receive Maximum
    as every other PUBLISH of the bridge's own: with room for one, only one is sent, and
    nothing more until its PUBACK."""
    async def body() -> None:
        async with ScriptedBroker(answering(receive_max=1)) as broker:
            metrics = Metrics()
            session = BrokerSession(
                broker_config(broker.port, presence_prefix="mkb/sessions"), SUBSCRIPTIONS,
                Recorder(ack_at_once=True), metrics,
                announce=lambda: ("spBv1.0/STATE/h", b"online", b"offline"))
            task = asyncio.create_task(session.run())
            try:
                conn = await broker.connection(0)
                await until(session.connected.is_set, "connected")
                await broker.fence(conn)
                assert len(conn.of(mqtt5.PublishPacket)) == 1
                assert session.publish("devices/d1/x", b"") is None
                assert not session.announce_again()
            finally:
                session.stop_reading()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await session.close()

    run(body)


def test_retire_clears_presence_only_within_the_receive_maximum() -> None:
    """A retire that clears its presence while an answer to a device still awaits its
    PUBACK, with room for one, waits for that PUBACK first (a second unanswered PUBLISH is
    a protocol error that costs the connection), then clears it and ends the session."""
    async def body() -> None:
        async with ScriptedBroker(answering(receive_max=1)) as broker, \
                client(broker, presence_prefix="mkb/sessions") as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.PublishPacket), "the presence PUBLISH")
            conn.send(mqtt5.PubAckPacket(conn.of(mqtt5.PublishPacket)[0].packet_id).write())
            await until(lambda: not c.session._published, "the presence's PUBACK")
            answer = c.session.publish("devices/d1/files/f1/result", b"{}")
            assert answer is not None
            retiring = asyncio.create_task(c.session.retire(quiet=0.1))
            await asyncio.sleep(0.5)  # quiet several times over
            await broker.fence(conn)
            assert len(conn.of(mqtt5.PublishPacket)) == 2, "cleared past the maximum"
            conn.send(mqtt5.PubAckPacket(conn.of(mqtt5.PublishPacket)[1].packet_id).write())
            await until(lambda: len(conn.of(mqtt5.PublishPacket)) == 3, "presence cleared")
            cleared = conn.of(mqtt5.PublishPacket)[2]
            assert (cleared.topic, cleared.payload) == ("mkb/sessions/mkb-test-1", b"")
            conn.send(mqtt5.PubAckPacket(cleared.packet_id).write())
            await asyncio.wait_for(retiring, 5)

    run(body)


def test_a_publish_larger_than_the_brokers_maximum_packet_size_is_not_sent() -> None:
    """MQTT 5, 3.1.2.25: a client never sends a packet larger than the CONNACK's Maximum
    Packet Size (the broker disconnects with 0x95). A device controls the correlation data
    an answer echoes: sent, it cost the connection before the fin's PUBACK, and the
    redelivered fin's answer cost it again, for ever. Not sent, counted; the session goes on."""
    async def body() -> None:
        async with ScriptedBroker(answering(max_packet_size=200)) as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(c.session.connected.is_set, "connected")
            assert c.session.publish("devices/d1/files/f1/result", b"{}",
                                     correlation_data=b"c" * 300) is None
            assert c.metrics.value("mqtt_publishes_too_large", broker=c.session.name) == 1
            fits = c.session.publish("devices/d1/files/f1/result", b"{}",
                                     correlation_data=b"c" * 20)
            assert fits is not None
            await broker.fence(conn)
            assert [len(p.correlation_data) for p in conn.of(mqtt5.PublishPacket)] == [20]
            c.assert_alive()

    run(body)


def test_nothing_is_published_after_the_disconnect() -> None:
    """MQTT 5, 3.14.4: nothing follows a DISCONNECT on its connection. While `close` waits
    for the DISCONNECT to be written, a late answer or a STATE again is not sent."""
    async def body() -> None:
        async with ScriptedBroker() as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(c.session.connected.is_set, "connected")
            c.session.stop_reading()
            closing = asyncio.create_task(c.session.close())
            await asyncio.sleep(0)  # close wrote its DISCONNECT and waits for the drain
            assert c.session.publish("devices/d1/files/f1/result", b"{}") is None
            await closing
            await until(lambda: conn.eof, "the connection closed")
            assert isinstance(conn.packets[-1], mqtt5.DisconnectPacket)

    run(body)
