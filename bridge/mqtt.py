"""The MQTT adapter: one MQTT 5 session per broker, on asyncio streams and the mqtt5 codec.

The bridge owns its session so each PUBACK / PUBREC leaves exactly when the message's outcome
is durable, in the order the PUBLISHes arrived (MQTT 5, 4.6). `receive_max` bounds how many
QoS 1/2 messages the broker sends before it gets an ack: when Kafka is slow the window fills
and the broker holds the rest (invariant 3). Acks belong to one network connection: after a
reconnect the broker reuses packet ids, so an ack owed on an older connection is dropped and
the broker redelivers that message instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mqtt5
import structlog

from bridge.config import BrokerConfig, tls_context
from bridge.errors import MalformedPacket, MqttError
from bridge.message import Message, Properties
from bridge.metrics import Metrics, Receipt

log = structlog.get_logger("bridge.mqtt")

# Acks with reason Success and no properties may omit both (MQTT 5, 3.4.2.1): 4 bytes each.
_ACK = {1: 0x40, 2: 0x50}  # PUBACK, PUBREC
_PUBCOMP = 0x70
_PACK_ACK = struct.Struct(">BBH").pack
_PINGREQ = mqtt5.PingReqPacket().write()
_READ_SIZE = 256 * 1024
# The bridge's own QoS 1 PUBLISHes (answers, commands) awaiting a PUBACK, at most: fewer
# when the broker's Receive Maximum says so; this bound keeps packet ids to spare.
_OWN_PUBLISHES_MAX = 1024
# Topics (as bytes) mqtt5 decoded once: a PUBLISH on one of them, without properties, is
# read straight from the buffer. Bounded: a full table starts over.
_TOPICS_MAX = 4096
_TOPIC_MAX = 1024  # longer topics always go through mqtt5
_new_message = tuple.__new__  # Message's own __new__ is a Python function: a frame each
_CONNECT_TIMEOUT = 10.0
_PRESENCE_ACK_WAIT = 5.0  # seconds a retiring session waits for its presence to be cleared
_RETIRE_SAY_EVERY = 30.0  # seconds between the log lines of a retire that waits

# Called for every PUBLISH; the ack handle is None for QoS 0. It may await (backpressure).
Handler = Callable[[Message, "Inflight | None"], Awaitable[None] | None]
# A session's own birth and will besides presence, asked for at each connect:
# (topic, birth payload, will payload), both retained at QoS 1 (Sparkplug's host STATE).
Announce = Callable[[], tuple[str, bytes, bytes]]


class Inflight(Receipt):
    """A QoS 1/2 message owed an ack on one connection, and its Receipt: calling it says
    durable (or dead-lettered durably), count it and ack it."""

    __slots__ = ("connection", "packet_id", "qos")

    def __init__(self, connection: Connection, packet_id: int, qos: int,
                 born: float | None = None) -> None:
        self.connection, self.packet_id, self.qos = connection, packet_id, qos
        self.lane, self.ack, self.code, self.done = None, None, None, False
        self.born = time.monotonic() if born is None else born

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if self.lane is not None:
            self.lane.settled(self)
        self.connection.settled()


class Connection:
    """One network connection: its writer and the acks it owes, in receive order."""

    def __init__(self, writer: asyncio.StreamWriter, metrics: Metrics, window: int) -> None:
        self.writer, self.metrics, self.window = writer, metrics, window
        self.owed: deque[Inflight] = deque()
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.closed = False
        self._flush_scheduled = False
        self.last_received = asyncio.get_running_loop().time()
        self.reading_paused = False
        # Loop time since which the read loop has been waiting for the broker with every
        # byte it read handed on (no partial packet held); None while it is not (reading,
        # paused by backpressure or a full window, or stopped). Only this is quiet to a
        # retire: silence while the bridge is not reading says nothing about the broker.
        self.idle_since: float | None = None
        self.publishes = 0  # PUBLISHes handed on from this connection

    def settled(self) -> None:
        """One more message is durable: flush the acks now due, once per loop turn."""
        if self.closed:
            self.metrics.inc("mqtt_acks_dropped_stale_connection")
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        """Write the acks of the longest durable prefix of what was received, in one write."""
        self._flush_scheduled = False
        if self.closed:
            return
        owed, out = self.owed, bytearray()
        while owed and owed[0].done:
            inflight = owed.popleft()
            out += _PACK_ACK(_ACK[inflight.qos], 2, inflight.packet_id)
        if out:
            self.metrics.inc("mqtt_acks_sent", len(out) // 4)
            self.writer.write(out)
            if len(owed) < self.window:
                self.window_open.set()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def disconnect(self, packet: bytes) -> None:
        """Write the DISCONNECT; nothing may follow it on this connection (MQTT 5, 3.14.4),
        so from now on it is closed to every writer, though its bytes still drain."""
        self.write(packet)
        self.closed = True

    def close(self) -> None:
        self.closed = True
        self.writer.close()


def packet_length(buffer: memoryview | bytes | bytearray, start: int) -> int | None:
    """Total length of the packet starting at `start`, or None until enough bytes arrived."""
    if start + 1 < len(buffer) and buffer[start + 1] < 0x80:  # one length byte: most packets
        return 2 + buffer[start + 1]
    multiplier, remaining, index = 1, 0, start + 1
    while True:
        if index >= len(buffer):
            return None
        byte = buffer[index]
        remaining += (byte & 0x7F) * multiplier
        index += 1
        if not byte & 0x80:
            return index - start + remaining
        multiplier *= 128
        if multiplier > 128**3:
            raise MalformedPacket("remaining length is longer than 4 bytes")


class BrokerSession:
    """The persistent session with one broker: connect, subscribe, read, ack, keep alive,
    and reconnect with exponential backoff and full jitter."""

    def __init__(self, config: BrokerConfig, subscriptions: list[str], handler: Handler,
                 metrics: Metrics, lane: str = "bulk",
                 gate: asyncio.Event | None = None, instance: str = "",
                 announce: Announce | None = None) -> None:
        """`announce`: a birth published on each connect, and its will, for a session
        without presence (a connection has one will: with presence on, presence has it)."""
        self.config, self.handler, self.metrics, self.lane = config, handler, metrics, lane
        self._announce = announce
        self._announcement: tuple[str, bytes, bytes] | None = None
        self.instance = instance  # named in the presence message
        # Set once Kafka can take records at once (the daemon's primed producers): until
        # then the session connects, but neither subscribes nor reads past the CONNACK.
        self.gate = gate
        self.subscriptions = list(subscriptions)
        # Messages keep the retain flag their publisher set (what the envelope records);
        # False: only the retained messages sent on subscribing carry it.
        self.retain_as_published = True
        self.name = config.name
        self.log = log.bind(broker=self.name, client_id=config.client_id)
        self.connection: Connection | None = None
        self.connected = asyncio.Event()
        # Connected, and the broker answered the connect's SUBSCRIBE (or there was none):
        # what readiness (/readyz, READY=1) waits for.
        self.subscribed = asyncio.Event()
        self._first_subscribe: int | None = None  # that SUBSCRIBE's packet id, until its SUBACK
        self._lost_at: float | None = None  # when the last connection was lost (loop time)
        self._ever_connected = False
        self.metrics.set("mqtt_connected", 0, broker=self.name, lane=lane)
        self._stopping = False
        self._packet_id = 0
        self._removed: list[str] = []  # filters to unsubscribe, until an UNSUBACK says done
        self._requests: dict[int, list[str]] = {}  # (UN)SUBSCRIBE packet id -> its filters
        self._topics: dict[bytes, str] = {}  # raw topic -> topic, as mqtt5 decoded it
        self._unsubscribed = asyncio.Event()
        self.session_present: bool | None = None  # what the last CONNACK said
        # The bridge's own QoS 1 PUBLISHes (presence, answers to devices), by packet id,
        # until their PUBACK: its reason code, or None when the connection went first.
        self._published: dict[int, asyncio.Future[int | None]] = {}
        # What the broker's CONNACK allows the bridge's own PUBLISHes: how many may await
        # their PUBACK (its Receive Maximum; none at a Maximum QoS of 0), and their size.
        self._send_quota = _OWN_PUBLISHES_MAX
        self._send_max_bytes: int | None = None

    async def run(self) -> None:
        """Keep a connection up until `stop_reading`; each failure is logged and retried."""
        attempt = 0
        while not self._stopping:
            try:
                await self._connect_and_read()
            except (OSError, MqttError, TimeoutError, ssl.SSLError) as exc:
                self.metrics.inc("mqtt_reconnects", broker=self.name, lane=self.lane)
                self.log.warning("mqtt_disconnected", error=str(exc) or type(exc).__name__)
            except Exception:  # a bug must cost a reconnect (and redelivery), not the daemon
                self.metrics.inc("mqtt_session_crashes")
                self.log.exception("mqtt_session_crashed")
            finally:
                if self.connected.is_set():  # the broker accepted us: backoff starts over
                    attempt = 0
                self._drop_connection()
            if self._stopping:
                break
            attempt += 1
            cap = min(self.config.reconnect_max, self.config.reconnect_min * 2 ** min(attempt, 20))
            await asyncio.sleep(random.uniform(0, cap))

    def stop_reading(self) -> None:
        """Stop taking messages; the connection stays open so owed acks can still go out."""
        self._stopping = True

    def update_subscriptions(self, filters: list[str]) -> None:
        """Change what the session subscribes without dropping it (a config reload): new
        filters are subscribed, removed ones unsubscribed, now if connected, else on the
        next connect."""
        self._removed = [f for f in dict.fromkeys([*self._removed, *self.subscriptions])
                         if f not in filters]
        added = [f for f in filters if f not in self.subscriptions]
        self.subscriptions = list(filters)
        connection = self._open_connection()
        if connection is None:
            return
        if added:
            self._subscribe(connection, added)
        self._unsubscribe_removed(connection)

    def unsubscribe_all(self) -> None:
        """The first step of a retire, taken at once: nothing is subscribed again, every
        filter is unsubscribed now or at the next connect."""
        self._unsubscribed.clear()
        self.update_subscriptions([])

    async def retire(self, quiet: float = 2.0) -> None:
        """End a session for good (a lane no route needs, a bridge scaled in, an adopted
        session): unsubscribe everything, bridge what the broker still had queued until it
        has been quiet for `quiet` seconds with every ack sent, clear the presence message,
        then DISCONNECT with session expiry 0 so the broker forgets the session."""
        self.unsubscribe_all()  # again, if the caller did already: harmless
        loop = asyncio.get_running_loop()
        cleared: Connection | None = None  # the connection the presence was cleared on
        seen = 0  # its PUBLISHes handed on by then
        said = loop.time()
        while True:
            if loop.time() - said >= _RETIRE_SAY_EVERY:  # a retire can wait for good: say why
                said = loop.time()
                self._say_why_retire_waits(loop.time())
            if self._stopping:  # a shutdown (SIGTERM) stopped reading: the session stays
                raise MqttError("stopped before the session was ended: what the broker "
                                "still queues stays in the session")
            connection = self.connection
            idle = None if connection is None else connection.idle_since
            if connection is not None and not connection.closed and idle is not None and \
                    self.connected.is_set() and self._unsubscribed.is_set() and \
                    not connection.owed:
                if cleared is connection and connection.publishes == seen:
                    break  # nothing arrived since the quiet that cleared it: end it now
                if loop.time() - idle >= quiet:
                    publishes = connection.publishes
                    if await self._clear_presence(connection):
                        cleared, seen = connection, publishes
                        continue
            await asyncio.sleep(quiet / 4)
        # No await from the check above to the DISCONNECT: nothing unacked can arrive
        # in between and be forgotten with the session.
        self.stop_reading()
        await self.close(session_expiry=0)
        self.log.info("mqtt_session_ended", why="retired: the broker forgets this session")

    def _say_why_retire_waits(self, now: float) -> None:
        connection = self._open_connection()
        if connection is None:
            owed, idle, why = None, None, "not connected"
        else:
            owed = len(connection.owed)
            idle = None if connection.idle_since is None else now - connection.idle_since
            why = ("no UNSUBACK yet" if not self._unsubscribed.is_set() else
                   "messages not yet durable in Kafka" if owed else
                   "not reading (backpressure)" if idle is None else
                   "the broker is still sending what it queued")
        self.log.warning("mqtt_retire_waiting", why=why, unsubscribing=self._removed,
                         acks_owed=owed, quiet_seconds=None if idle is None else round(idle, 1))

    async def close(self, session_expiry: int | None = None) -> None:
        """Send the acks now due, then DISCONNECT; the session and unacked messages stay
        (unless `session_expiry` is 0). A session that stays asks the broker to publish its
        will, so its presence says offline: it may come back, or be adopted."""
        connection = self.connection
        if connection is None or connection.closed:
            return
        connection.flush_acks()
        reason = mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION
        if session_expiry is None and (self.config.presence_topic or self._announce):
            reason = mqtt5.DisconnectReasonCode.DISCONNECT_WITH_WILL_MESSAGE
        connection.disconnect(mqtt5.DisconnectPacket(
            reason_code=reason, session_expiry_interval=session_expiry).write())
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(connection.writer.drain(), 5)
        connection.close()
        self.log.info("mqtt_closed", acks_owed=len(connection.owed))

    def _drop_connection(self) -> None:
        for answer in self._published.values():  # a PUBACK never comes on a new connection
            if not answer.done():
                answer.set_result(None)
        self._published.clear()
        if self.connected.is_set():
            self._lost_at = asyncio.get_running_loop().time()
        self.connected.clear()
        self.subscribed.clear()
        self.metrics.set("mqtt_connected", 0, broker=self.name, lane=self.lane)
        if self.connection is not None and not self._stopping:
            owed = sum(1 for i in self.connection.owed if not i.done)
            if owed:
                self.log.info("mqtt_acks_abandoned", count=owed, why="broker redelivers them")
            self.connection.close()

    async def _connect_and_read(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.config.host, self.config.port, ssl=self._tls(),
                                    limit=_READ_SIZE), _CONNECT_TIMEOUT)
        connection = Connection(writer, self.metrics, self.config.receive_max)
        self.connection = connection
        self._announcement = self._announce() if self._announce is not None else None
        writer.write(self._connect_packet())
        buffer = bytearray()
        connack = await asyncio.wait_for(self._read_connack(reader, buffer), _CONNECT_TIMEOUT)
        connection.last_received = asyncio.get_running_loop().time()
        # A Server Keep Alive replaces ours (MQTT 5, 3.2.2.3.14); 0 turns keepalive off.
        keepalive = self.config.keepalive if connack.server_keep_alive is None \
            else connack.server_keep_alive
        self.log.info("mqtt_connected", session_present=connack.session_present,
                      keepalive=keepalive, receive_max=self.config.receive_max)
        self.session_present = connack.session_present
        self._send_quota = 0 if connack.max_qos == mqtt5.QoS.AT_MOST_ONCE else \
            min(connack.receive_max or _OWN_PUBLISHES_MAX, _OWN_PUBLISHES_MAX)
        self._send_max_bytes = connack.max_packet_size
        self.metrics.inc("mqtt_connects", broker=self.name, lane=self.lane)
        if not connack.session_present:
            self._session_not_present()
        self._ever_connected = True
        if self.gate is not None:
            await self._open_gate()
        # Subscribing again on a present session is harmless (retained messages are sent
        # only for a new subscription) and picks up filters added while the bridge was away.
        self._requests.clear()  # answers to an older connection's requests never come
        self._first_subscribe = self._subscribe(connection, self.subscriptions)
        if self._first_subscribe is None:
            self._now_subscribed()
        self._unsubscribe_removed(connection)
        self._publish_presence(connection, self._presence("online"))
        self._announce_on(connection)
        self.connected.set()
        reading = asyncio.create_task(self._read_loop(reader, connection, buffer))
        tasks = {reading}
        if keepalive:
            tasks.add(asyncio.create_task(self._keepalive(connection, keepalive)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        # The keepalive's reason wins: its abort is what made the read fail.
        for task in sorted(done, key=lambda t: t is reading):
            task.result()

    def _session_not_present(self) -> None:
        """The broker holds no session for us. At the first connect of this process that is
        a new session (or one lost while the bridge was down too: nothing here can tell);
        on a reconnect it means the broker lost our session (no persistence, a failover,
        the session expired), and with it whatever was queued for the bridge meanwhile."""
        if not self._ever_connected:
            self.log.info("mqtt_session_new",
                          why="no session on the broker for this client id; after a restart "
                              "of the bridge that means messages queued meanwhile were lost")
            return
        now = asyncio.get_running_loop().time()
        away = 0.0 if self._lost_at is None else now - self._lost_at
        self.metrics.inc("mqtt_sessions_lost", broker=self.name)
        self.log.warning("mqtt_session_lost", away_seconds=round(away, 1),
                         session_expiry=self.config.session_expiry,
                         why="the broker no longer had this session: what it queued for the "
                             "bridge while it was away is gone (see README, 'The broker "
                             "forgot our session')")

    def _now_subscribed(self) -> None:
        self._first_subscribe = None
        self.subscribed.set()
        self.metrics.set("mqtt_connected", 1, broker=self.name, lane=self.lane)

    def _tls(self) -> ssl.SSLContext | None:
        return _tls(self.config)

    def _connect_packet(self) -> bytes:
        password = _password(self.config)
        topic = self.config.presence_topic
        will = None if topic is None else mqtt5.Will(
            topic, payload=self._presence("offline"), qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)
        if will is None and self._announcement is not None:
            announced, _, last = self._announcement
            will = mqtt5.Will(announced, payload=last, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)
        return mqtt5.ConnectPacket(
            self.config.client_id,
            username=self.config.username,
            password=password,
            clean_start=False,
            will=will,
            keep_alive=self.config.keepalive,
            session_expiry_interval=self.config.session_expiry,
            receive_max=self.config.receive_max,
            max_packet_size=self.config.max_packet_size,
        ).write()

    async def _read_connack(self, reader: asyncio.StreamReader,
                            buffer: bytearray) -> mqtt5.ConnAckPacket:
        while True:
            length = packet_length(buffer, 0)
            if length is not None and len(buffer) >= length:
                packet, _ = _decode(memoryview(buffer)[:length])
                del buffer[:length]
                if not isinstance(packet, mqtt5.ConnAckPacket):
                    raise MqttError(f"expected CONNACK, got {type(packet).__name__}")
                if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                    raise MqttError(f"connection refused: {packet.reason_code.name}"
                                    + (f" ({packet.reason_str})" if packet.reason_str else ""))
                return packet
            chunk = await reader.read(_READ_SIZE)
            if not chunk:
                raise MqttError("connection closed before CONNACK")
            buffer += chunk

    def _presence(self, state: str) -> bytes:
        """The presence message: who holds this session, and whether it is connected."""
        return json.dumps({"state": state, "client_id": self.config.client_id,
                           "instance": self.instance, "host": socket.gethostname(),
                           "pid": os.getpid(), "at_millis": time.time_ns() // 1_000_000},
                          separators=(",", ":")).encode()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                content_type: str | None = None, correlation_data: bytes | None = None,
                user_properties: list[tuple[str, str]] | None = None
                ) -> asyncio.Future[int | None] | None:
        """A message of the bridge's own at QoS 1 (an answer to a device, a command to an
        edge node), on the open connection: a future of the PUBACK's reason code (None when
        the connection was lost first: the caller decides whether to send it again), or
        None at once while not connected, while as many of them as the broker's Receive
        Maximum await their PUBACK, or when it is larger than the broker's Maximum Packet
        Size (either would be a protocol error that costs the connection; see `_send`).
        Nothing is queued: the broker's session is for what the bridge receives."""
        connection = self._open_connection()
        if connection is None:
            return None
        return self._send(connection, topic, payload, retain, content_type=content_type,
                          correlation_data=correlation_data,
                          user_properties=user_properties or [])

    def _send(self, connection: Connection, topic: str, payload: bytes, retain: bool,
              **properties: Any) -> asyncio.Future[int | None] | None:
        """The one way out for a QoS 1 PUBLISH of the bridge's own: sent only within what
        the broker's CONNACK allows (its Receive Maximum, MQTT 5, 3.3.4; its Maximum Packet
        Size, 3.1.2.25: a device chooses the correlation data an answer echoes), since more
        is a protocol error that costs the connection; else None, counted."""
        if len(self._published) >= self._send_quota:
            self.metrics.inc("mqtt_publishes_held_back", broker=self.name)
            return None
        packet_id = self._next_packet_id()
        data = mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
                                   retain=retain, packet_id=packet_id, **properties).write()
        if self._send_max_bytes is not None and len(data) > self._send_max_bytes:
            self.metrics.inc("mqtt_publishes_too_large", broker=self.name)
            self.log.warning("mqtt_publish_too_large", topic=topic[:200], size=len(data),
                             maximum=self._send_max_bytes,
                             why="larger than the broker's Maximum Packet Size: not sent")
            return None
        answer: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._published[packet_id] = answer
        connection.write(data)
        return answer

    def _publish_presence(self, connection: Connection,
                          payload: bytes) -> asyncio.Future[int | None] | None:
        """Retain `payload` (empty: clear it) on the presence topic, QoS 1 so an ACL that
        refuses it is answered (and logged) rather than silent."""
        topic = self.config.presence_topic
        if topic is None:
            return None
        answer = self._send(connection, topic, payload, True)
        if answer is not None:
            answer.add_done_callback(self._presence_answered)
        return answer

    def _presence_answered(self, answer: asyncio.Future[int | None]) -> None:
        reason = answer.result()
        if reason is not None and reason >= 0x80:
            self.metrics.inc("mqtt_presence_refused")
            self.log.error("mqtt_presence_refused", topic=self.config.presence_topic,
                           reason=mqtt5.PubAckReasonCode(reason).name,
                           why="adopt cannot tell whether this session is connected: allow "
                               "the bridge to write and read the presence topics "
                               "(mosquitto/acl), or set presence_prefix = \"\"")

    def _open_connection(self) -> Connection | None:
        """The connection, while it is open and CONNACK'd; else None."""
        connection = self.connection
        if connection is None or connection.closed or not self.connected.is_set():
            return None
        return connection

    def announce_again(self) -> bool:
        """Publish this connection's birth once more (the same payload, so it still matches
        the will); False when there is none or no open connection."""
        connection = self._open_connection()
        if connection is None:
            return False
        return self._announce_on(connection)

    def _announce_on(self, connection: Connection) -> bool:
        if self._announcement is None:
            return False
        topic, birth, _ = self._announcement
        answer = self._send(connection, topic, birth, True)
        if answer is not None:
            answer.add_done_callback(self._announced)
        return answer is not None

    def _announced(self, answer: asyncio.Future[int | None]) -> None:
        reason = answer.result()
        if reason is not None and reason >= 0x80:
            self.log.error("mqtt_announce_refused", reason=mqtt5.PubAckReasonCode(reason).name,
                           topic=self._announcement[0] if self._announcement else None,
                           why="the broker refused the session's birth message (ACL?)")
        elif reason is not None:
            self.log.info("mqtt_announced",
                          topic=self._announcement[0] if self._announcement else None)

    async def _clear_presence(self, connection: Connection) -> bool:
        """A session that ends leaves no presence behind (and, disconnecting normally, no
        will): wait a moment for the broker to take that. False when it could not be sent
        yet (the broker's Receive Maximum of our PUBLISHes await their PUBACK)."""
        if self.config.presence_topic is None:
            return True
        answer = self._publish_presence(connection, b"")
        if answer is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(answer), _PRESENCE_ACK_WAIT)
        return True

    def _wire(self, topic_filter: str) -> str:
        group = self.config.share_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def _subscribe(self, connection: Connection, filters: list[str]) -> int | None:
        """SUBSCRIBE `filters`; returns its packet id (None when there is nothing to do)."""
        if not filters:
            return None
        qos = mqtt5.QoS(self.config.subscribe_qos)
        packet_id = self._next_packet_id()
        self._requests[packet_id] = filters
        connection.write(mqtt5.SubscribePacket(packet_id, [
            mqtt5.TopicFilter(self._wire(f), max_qos=qos,
                              retain_handling=mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS,
                              retain_as_published=self.retain_as_published)
            for f in filters]).write())
        self.log.info("mqtt_subscribing", filters=[self._wire(f) for f in filters])
        return packet_id

    def _unsubscribe_removed(self, connection: Connection) -> None:
        if not self._removed:
            self._unsubscribed.set()
            return
        packet_id = self._next_packet_id()
        self._requests[packet_id] = self._removed
        connection.write(mqtt5.UnsubscribePacket(
            packet_id, [self._wire(f) for f in self._removed]).write())
        self.log.info("mqtt_unsubscribing", filters=[self._wire(f) for f in self._removed])

    def _next_packet_id(self) -> int:
        """The next packet id not in use by a PUBLISH, SUBSCRIBE or UNSUBSCRIBE of ours
        still waiting for its answer (MQTT 5, 2.2.1): one long unanswered must not have
        its answer taken by a newer packet."""
        while True:
            self._packet_id = self._packet_id % 65535 + 1
            if self._packet_id not in self._published and self._packet_id not in \
                    self._requests:
                return self._packet_id

    async def _keepalive(self, connection: Connection, keepalive: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(keepalive / 2)
            silent = loop.time() - connection.last_received
            if silent > keepalive * 1.5 and not connection.reading_paused:
                connection.writer.transport.abort()
                raise MqttError(f"keepalive timeout: nothing from the broker for {silent:.0f} s")
            connection.write(_PINGREQ)

    async def _read_loop(self, reader: asyncio.StreamReader, connection: Connection,
                         buffer: bytearray) -> None:
        """Read, split into packets, hand each on. The common PUBLISH (a topic mqtt5
        decoded before, no properties) is read straight from the buffer; everything else,
        and every error, goes through mqtt5. One timestamp serves each read."""
        loop = asyncio.get_running_loop()
        publish_type = mqtt5.PublishPacket
        limit = self.config.max_packet_size
        topics = self._topics
        broker = self.name
        arrival, born = time.time_ns() // 1_000_000, loop.time()
        while not self._stopping:
            start = 0
            view = memoryview(buffer)
            size = len(view)
            try:
                while not self._stopping:
                    # The remaining length, inline when it takes one or two bytes.
                    if start + 2 < size and view[start + 1] < 0x80:
                        body = start + 2
                        end = body + view[start + 1]
                    elif start + 2 < size and 0 < view[start + 2] < 0x80:
                        body = start + 3
                        end = body + (view[start + 1] & 0x7F) + (view[start + 2] << 7)
                    else:
                        length = packet_length(view, start)
                        if length is None:
                            break
                        body, end = -1, start + length
                    if end - start > limit:
                        raise PacketTooLarge(f"packet of {end - start} bytes exceeds the "
                                             f"maximum of {limit} the bridge announced")
                    if end > size:
                        break
                    first = view[start]
                    if first >> 4 == 3 and body > 0:
                        fields = read_publish(view, first, body, end, topics)
                        if fields is not None:
                            start = end
                            topic, payload, qos, packet_id = fields
                            message = _new_message(Message, (
                                broker, topic, payload, qos, bool(first & 1),
                                bool(first & 8), arrival, (), None))
                            del fields, payload
                            waiting = self._hand_on(connection, message, packet_id, born)
                            del message
                            if waiting is not None:
                                await self._paused(connection, waiting)
                            continue
                    length = end - start
                    packet, _ = _decode(view[start:end])
                    if type(packet) is publish_type:
                        self._remember_topic(view, start, end, packet.topic)
                    start = end
                    if length > _READ_SIZE:  # a large packet: its raw bytes go before it
                        view.release()  # is handed on, so memory holds it once, not twice
                        del buffer[:start]
                        start, view = 0, memoryview(buffer)
                        size = len(view)
                    if type(packet) is publish_type:
                        waiting = self._on_publish(connection, packet, arrival, born)
                        del packet  # the session keeps no payload once it is handed on
                        if waiting is not None:
                            await self._paused(connection, waiting)
                    else:
                        self._on_control(connection, packet)
            except MalformedPacket as exc:
                self.metrics.inc("mqtt_malformed_packets")
                self.log.error("mqtt_malformed_packet", error=str(exc))
                connection.write(mqtt5.DisconnectPacket(
                    reason_code=mqtt5.DisconnectReasonCode(exc.reason)).write())
                raise
            finally:
                view.release()
            del buffer[:start]
            connection.flush_acks()
            if self._stopping:
                return
            if not buffer:  # everything read was handed on: waiting on the broker alone
                connection.idle_since = loop.time()
            try:
                chunk = await reader.read(_READ_SIZE)
            finally:
                connection.idle_since = None
            if not chunk:
                raise MqttError("connection closed by the broker")
            arrival, born = time.time_ns() // 1_000_000, loop.time()
            connection.last_received = born
            buffer += chunk

    def _remember_topic(self, view: memoryview, start: int, end: int, topic: str) -> None:
        """Keep the raw bytes of a topic mqtt5 decoded, so its next PUBLISHes skip it."""
        raw = topic_bytes(view, start, end)
        if not raw or len(raw) > _TOPIC_MAX or raw in self._topics or \
                raw.decode("utf-8", "replace") != topic:  # an alias, say: not this one
            return
        if len(self._topics) >= _TOPICS_MAX:
            self._topics.clear()
        self._topics[raw] = topic

    def _on_publish(self, connection: Connection, packet: mqtt5.PublishPacket, arrival: int,
                    born: float) -> Awaitable[object] | None:
        """Hand one PUBLISH decoded by mqtt5 on; returns what to wait for before reading
        on, if anything."""
        qos = packet.qos.value
        if qos and packet.packet_id is None:
            raise ProtocolError("QoS 1/2 PUBLISH without a packet id")
        user = packet.user_properties
        message = Message(self.name, packet.topic, packet.payload, qos, packet.retain,
                          packet.duplicate, arrival, tuple(user) if user else (),
                          Properties.of(packet))
        return self._hand_on(connection, message, packet.packet_id, born)

    def _hand_on(self, connection: Connection, message: Message, packet_id: int | None,
                 born: float) -> Awaitable[object] | None:
        inflight = None
        if message.qos:
            assert packet_id is not None
            inflight = Inflight(connection, packet_id, message.qos, born)
            connection.owed.append(inflight)
        connection.publishes += 1
        waiting = self.handler(message, inflight)
        if len(connection.owed) < connection.window:
            return waiting
        # The window is full. Brokers should not send more (Mosquitto 2.0 does, measured: 257
        # unacked with receive_max 100), so stop reading until acks free a slot: the bound
        # holds whatever the broker does, and TCP pushes back on it.
        self.metrics.inc("mqtt_window_full")
        connection.window_open.clear()
        window = connection.window_open.wait()
        return window if waiting is None else asyncio.gather(waiting, window)

    async def _open_gate(self) -> None:
        """Before the first SUBSCRIBE of the process and the first read past CONNACK, wait
        until Kafka can take records at once (the gate); then never again. A new session
        gets no PUBLISH before it subscribes, a present one none before it is read."""
        gate = self.gate
        assert gate is not None
        if not gate.is_set():
            self.log.info("mqtt_waiting_for_kafka",
                          why="no PUBLISH is read before every lane's producer is primed")
            await gate.wait()
        self.gate = None

    @staticmethod
    async def _paused(connection: Connection, waiting: Awaitable[object]) -> None:
        """Wait without reading; silence from the broker meanwhile is not a dead link."""
        connection.reading_paused = True
        try:
            await waiting
        finally:
            connection.reading_paused = False

    def _on_control(self, connection: Connection, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PubRelPacket):
            connection.write(_PACK_ACK(_PUBCOMP, 2, packet.packet_id))
        elif isinstance(packet, mqtt5.PubAckPacket):  # the answer to a PUBLISH of ours
            answer = self._published.pop(packet.packet_id, None)
            if answer is not None and not answer.done():
                answer.set_result(packet.reason_code.value)
        elif isinstance(packet, mqtt5.SubAckPacket | mqtt5.UnsubAckPacket):
            filters = self._requests.pop(packet.packet_id, [])
            failed = [(f, c.name) for f, c in zip(filters, packet.reason_codes, strict=False)
                      if c.value >= 0x80]
            verb = "subscribe" if isinstance(packet, mqtt5.SubAckPacket) else "unsubscribe"
            if failed:
                self.metrics.inc(f"mqtt_{verb}_failures", len(failed))
                self.log.error(f"mqtt_{verb}_failed", filters=failed)
            else:
                self.log.info(f"mqtt_{verb}d", filters=filters)
            # Answered is subscribed: a filter the broker refuses (an ACL) stays refused
            # however often the bridge restarts, so it is an error to alert on
            # (mqtt_subscribe_failures_total), not a readiness that never comes.
            if packet.packet_id == self._first_subscribe and verb == "subscribe":
                self._now_subscribed()
            if verb == "unsubscribe":
                self._removed = [f for f in self._removed if f not in filters]
                if not self._removed:
                    self._unsubscribed.set()
        elif isinstance(packet, mqtt5.DisconnectPacket):
            raise MqttError(f"broker sent DISCONNECT {packet.reason_code.name}"
                            + (f" ({packet.reason_str})" if packet.reason_str else ""))
        elif not isinstance(packet, mqtt5.PingRespPacket):
            raise ProtocolError(f"unexpected {type(packet).__name__} from the broker")


def _tls(config: BrokerConfig) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    try:
        return tls_context(config.ca_file, config.cert_file, config.key_file)
    except ValueError as exc:  # the key became encrypted after check-config
        raise MqttError(str(exc)) from exc


def _password(config: BrokerConfig) -> bytes | None:
    if not config.password_file:
        return None
    return Path(config.password_file).read_bytes().rstrip(b"\r\n")


async def read_presence(config: BrokerConfig, client_ids: list[str],
                        wait: float = 1.0) -> dict[str, dict[str, object] | None]:
    """What the broker retains on the presence topic of each session id (None: nothing, or
    not JSON), read over a throwaway connection with the bridge's credentials: whether a
    session is connected right now, without taking it over (`adopt`)."""
    topics = {f"{config.presence_prefix}/{client_id}": client_id for client_id in client_ids}
    found: dict[str, dict[str, object] | None] = dict.fromkeys(client_ids)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        config.host, config.port, ssl=_tls(config), limit=_READ_SIZE), _CONNECT_TIMEOUT)
    try:
        writer.write(mqtt5.ConnectPacket(
            f"mkb-presence-{os.getpid()}-{random.getrandbits(32):08x}",
            username=config.username, password=_password(config), clean_start=True,
            keep_alive=30, session_expiry_interval=0).write())
        writer.write(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(t, max_qos=mqtt5.QoS(0))
                                               for t in topics]).write())
        buffer, loop, deadline = bytearray(), asyncio.get_running_loop(), None
        seen: set[str] = set()
        while deadline is None or (loop.time() < deadline and len(seen) < len(topics)):
            length = packet_length(buffer, 0)
            if length is None or len(buffer) < length:
                left = _CONNECT_TIMEOUT if deadline is None else deadline - loop.time()
                try:
                    chunk = await asyncio.wait_for(reader.read(_READ_SIZE), max(left, 0.01))
                except TimeoutError:
                    if deadline is None:
                        raise
                    break
                if not chunk:
                    raise MqttError("connection closed by the broker")
                buffer += chunk
                continue
            packet, _ = _decode(memoryview(buffer)[:length])
            del buffer[:length]
            if isinstance(packet, mqtt5.ConnAckPacket) and \
                    packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                raise MqttError(f"connection refused: {packet.reason_code.name}")
            if isinstance(packet, mqtt5.SubAckPacket):
                refused = [(t, c.name) for t, c in zip(topics, packet.reason_codes,
                                                         strict=False) if c.value >= 0x80]
                if refused:
                    raise MqttError(f"the broker refused to let the bridge read "
                                    f"{refused[0][0]} ({refused[0][1]}): allow it in the ACL")
                deadline = loop.time() + wait
            elif isinstance(packet, mqtt5.PublishPacket) and packet.topic in topics:
                seen.add(packet.topic)
                with contextlib.suppress(ValueError):
                    value = json.loads(packet.payload)
                    found[topics[packet.topic]] = value if isinstance(value, dict) else None
        writer.write(mqtt5.DisconnectPacket().write())
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.drain(), 2)
    finally:
        writer.close()
    return found


def read_publish(view: memoryview, first: int, body: int, end: int,
                 topics: dict[bytes, str]) -> tuple[str, bytes, int, int | None] | None:
    """(topic, payload, qos, packet id) of the PUBLISH whose variable header starts at
    `body` and which ends at `end`, read straight from the buffer; None unless it is the
    common case that gives exactly what mqtt5 would: no properties, a valid QoS, and a
    topic whose raw bytes mqtt5 decoded before (`topics`). The caller then asks mqtt5,
    which also answers every malformed packet."""
    if end - body < 3:
        return None
    topic_end = body + 2 + (view[body] << 8 | view[body + 1])
    qos = first >> 1 & 3
    packet_id = None
    position = topic_end
    if qos:
        if qos == 3 or position + 2 > end:
            return None
        packet_id = view[position] << 8 | view[position + 1]
        position += 2
    if position >= end or view[position]:  # no property length, or properties
        return None
    topic = topics.get(bytes(view[body + 2:topic_end]))
    if topic is None:
        return None
    return topic, bytes(view[position + 1:end]), qos, packet_id


def topic_bytes(view: memoryview, start: int, end: int) -> bytes | None:
    """The raw topic of the well-formed PUBLISH at `start`, or None when it has none."""
    index = start + 1
    while view[index] & 0x80:
        index += 1
    body = index + 1
    if body + 2 > end:
        return None
    topic_end = body + 2 + (view[body] << 8 | view[body + 1])
    return bytes(view[body + 2:topic_end]) if topic_end <= end else None


class ProtocolError(MalformedPacket):
    reason = 0x82


class PacketTooLarge(MalformedPacket):
    reason = 0x95


def _decode(data: memoryview) -> tuple[mqtt5.Packet, int]:
    try:
        return mqtt5.read(data)
    except (ValueError, IndexError) as exc:
        raise MalformedPacket(str(exc)) from exc
    except BaseException as exc:
        # mqtt5 0.8 panics on invalid UTF-8; pyo3's PanicException derives from BaseException.
        if type(exc).__name__ != "PanicException":
            raise
        raise MalformedPacket(f"undecodable packet: {exc}") from exc
