"""What a retire must survive: backpressure, a full window, a stop while it drains (a scripted
broker, as in tests/test_mqtt_session.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import mqtt5
import pytest

from tests.test_mqtt_session import QOS0, Recorder, ScriptedBroker, client, publish, run, until


def expiry_zero(conn) -> list[mqtt5.DisconnectPacket]:
    return [d for d in conn.disconnects() if d.session_expiry_interval == 0]


def test_retire_does_not_end_the_session_while_reading_is_paused_with_publishes_unread() -> None:
    """Quiet must mean the broker sent nothing, not that the bridge read nothing: a handler
    that pushes back (Kafka's queue full, on a QoS 0 message) pauses reading with every QoS 1
    ack sent, while the broker's next PUBLISHes wait unread in the buffer. A retire then must
    not DISCONNECT with session expiry 0: the broker would forget those messages."""
    async def body() -> None:
        room = asyncio.get_running_loop().create_future()
        recorder = Recorder(ack_at_once=True)

        def handler(message, inflight):
            recorder(message, inflight)
            return room if message.qos == 0 else None

        async with ScriptedBroker() as broker, client(broker, handler) as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            retiring = asyncio.create_task(c.session.retire(quiet=0.3))
            await until(lambda: conn.of(mqtt5.UnsubscribePacket), "UNSUBSCRIBE")
            await broker.fence(conn)  # the UNSUBACK, sent before the fence, is read
            # what the broker still queued for the session
            conn.send(publish(1, payload=b"first") + publish(None, qos=QOS0, payload=b"q0")
                      + publish(2, payload=b"unread"))
            await recorder.wait(2)
            await until(lambda: conn.pubacks() == [1], "PUBACK 1")
            await asyncio.sleep(1.5)
            assert not expiry_zero(conn), "the session ended with PUBLISH 2 unread"
            room.set_result(None)
            await asyncio.wait_for(retiring, 5)
            assert conn.pubacks() == [1, 2]
            assert [m.payload for m in recorder.messages] == [b"first", b"q0", b"unread"]

    run(body)


def test_a_stop_during_a_retire_keeps_the_session() -> None:
    """SIGTERM during a retire: `_shutdown` stops every session reading, then waits for jobs
    (up to shutdown_timeout) before it cancels the retire. The retire must not go on to end
    the session meanwhile: what the broker sends after the stop is never read, and the
    daemon promises to keep the session (a restart)."""
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        async with ScriptedBroker() as broker, client(broker, recorder) as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            conn.send(publish(1, payload=b"busy"))  # the broker is still draining
            await recorder.wait(1)
            retiring = asyncio.create_task(c.session.retire(quiet=0.3))
            await until(lambda: conn.of(mqtt5.UnsubscribePacket), "UNSUBSCRIBE")
            c.session.stop_reading()  # SIGTERM
            conn.send(publish(2, payload=b"never read"))
            await asyncio.sleep(1.5)
            assert not expiry_zero(conn), "a SIGTERM's stop ended the session"
            retiring.cancel()
            await asyncio.gather(retiring, return_exceptions=True)

    run(body)


def test_retire_does_not_end_the_session_when_a_full_window_has_just_opened(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The common case of the above: Kafka is slow for longer than `quiet`, the receive
    window is full, so reading is paused while the broker's next PUBLISHes (Mosquitto sends
    past receive_max) wait in the buffer. The delivery reports come and flush every ack in
    the same loop turn as the retire's check, before the read loop's next step (the
    order is forced here by acking from the retire's own sleep). Every ack sent, nothing
    read for `quiet` seconds: on main the retire ended the session, and the broker forgot
    PUBLISHes 3 and 4, which it had handed over."""
    real_sleep = asyncio.sleep
    hook: list[Any] = []

    async def sleep(delay: float, result: Any = None) -> Any:
        await real_sleep(delay)
        if delay == 0.3 / 4 and hook:  # the retire's poll: the reports land just before it
            hook.pop()()
        return result

    async def body() -> None:
        recorder = Recorder(ack_at_once=False)
        async with ScriptedBroker() as broker, client(broker, recorder, receive_max=2) as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            retiring = asyncio.create_task(c.session.retire(quiet=0.3))
            await until(lambda: conn.of(mqtt5.UnsubscribePacket), "UNSUBSCRIBE")
            await broker.fence(conn)
            conn.send(b"".join(publish(i, payload=b"m%d" % i) for i in (1, 2, 3, 4)))
            await recorder.wait(2)
            await asyncio.sleep(0.6)  # Kafka is slow: the window stays full, unread

            def reports() -> None:
                recorder.inflight(0)()
                recorder.inflight(1)()
                assert c.session.connection is not None
                c.session.connection.flush_acks()

            hook.append(reports)
            await until(lambda: len(recorder.received) == 4 or expiry_zero(conn),
                        "PUBLISH 3 and 4 handed on, or the session ended")
            assert not expiry_zero(conn), "the session ended with PUBLISH 3 and 4 unread"
            recorder.inflight(2)()
            recorder.inflight(3)()
            await asyncio.wait_for(retiring, 5)
            assert conn.pubacks() == [1, 2, 3, 4]

    monkeypatch.setattr(asyncio, "sleep", sleep)
    run(body)


def test_a_retire_that_waits_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that never answers the UNSUBSCRIBE keeps a retire waiting for good (safe:
    the session stays); on main nothing in the log said so, or why."""
    from structlog.testing import capture_logs

    import bridge.mqtt
    from tests.test_mqtt_session import BrokerConn

    monkeypatch.setattr(bridge.mqtt, "_RETIRE_SAY_EVERY", 0.3)

    class Silent(ScriptedBroker):
        def _answer(self, conn: BrokerConn, packet: mqtt5.Packet) -> None:
            if not isinstance(packet, mqtt5.UnsubscribePacket):
                super()._answer(conn, packet)

    async def body() -> None:
        async with Silent() as broker, client(broker) as c:
            conn = await broker.connection(0)
            await until(lambda: conn.of(mqtt5.SubscribePacket), "SUBSCRIBE")
            with capture_logs() as logs:
                retiring = asyncio.create_task(c.session.retire(quiet=0.1))
                await asyncio.sleep(1)
            waits = [e for e in logs if e["event"] == "mqtt_retire_waiting"]
            assert waits and waits[-1]["why"] == "no UNSUBACK yet", logs
            assert not expiry_zero(conn)
            retiring.cancel()
            await asyncio.gather(retiring, return_exceptions=True)

    run(body)
