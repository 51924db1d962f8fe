"""The PUBLISH fast path gives exactly what the mqtt5 codec gives, or steps aside.

`read_publish` reads the common PUBLISH (a topic mqtt5 decoded before, no properties)
straight from the buffer; for anything else it returns None and the session asks mqtt5,
which also answers every malformed packet. Generated packets, valid and mutated, check
both halves: whatever the fast path returns equals mqtt5's reading of the same bytes, and
the common case does take the fast path. A session test feeds the same kind of stream
through a real BrokerSession twice, so the second pass runs on cached topics.
"""

from __future__ import annotations

import asyncio
from typing import Any

import mqtt5
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.errors import MalformedPacket
from bridge.message import Message
from bridge.mqtt import _decode, read_publish, topic_bytes
from tests.test_mqtt_session import Recorder, ScriptedBroker, client, run, until

TOPIC_CHARS = st.characters(codec="utf-8", exclude_characters="\x00+#")
topics = st.text(TOPIC_CHARS, min_size=1, max_size=40)
payloads = st.binary(max_size=300)


@st.composite
def publishes(draw: Any) -> bytes:
    qos = draw(st.sampled_from([0, 1, 2]))
    properties = draw(st.sampled_from([{}, {}, {"user_properties": [("k", "v")]},
                                       {"content_type": "a/b"}, {"message_expiry_interval": 9}]))
    return mqtt5.PublishPacket(
        draw(topics), draw(payloads), qos=mqtt5.QoS(qos),
        packet_id=draw(st.integers(1, 65535)) if qos else None,
        retain=draw(st.booleans()), duplicate=draw(st.booleans()), **properties).write()


def header(data: bytes) -> tuple[int, int] | None:
    """(start of the variable header, end of the packet), as the session finds them for
    its fast path: a remaining length of one byte, or of two in their shortest form."""
    if len(data) > 2 and data[1] < 0x80:
        return 2, 2 + data[1]
    if len(data) > 2 and 0 < data[2] < 0x80:
        return 3, 3 + (data[1] & 0x7F) + (data[2] << 7)
    return None


def reference(data: bytes) -> tuple[Any, ...] | None:
    """What mqtt5 reads from the packet, None when it refuses it."""
    try:
        packet, _ = _decode(memoryview(data))
    except MalformedPacket:
        return None
    if not isinstance(packet, mqtt5.PublishPacket):
        return ("other",)
    return (packet.topic, packet.payload, packet.qos.value, packet.packet_id, packet.retain,
            packet.duplicate, tuple(packet.user_properties))


def fast(data: bytes, known: dict[bytes, str]) -> tuple[Any, ...] | None:
    found = header(data)
    if found is None or found[1] > len(data) or data[0] >> 4 != 3:  # as the session asks
        return None
    body, end = found
    view = memoryview(data)
    fields = read_publish(view, data[0], body, end, known)
    if fields is None:
        return None
    topic, payload, qos, packet_id = fields
    return topic, payload, qos, packet_id, bool(data[0] & 1), bool(data[0] & 8), ()


def cache_of(data: bytes) -> dict[bytes, str]:
    """The session's topic table after mqtt5 decoded `data`."""
    ref = reference(data)
    raw = topic_bytes(memoryview(data), 0, len(data))
    return {raw: ref[0]} if ref and ref[0] != "other" and raw else {}


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(publishes())
def test_a_valid_publish_on_a_known_topic_reads_as_mqtt5_reads_it(data: bytes) -> None:
    ref = reference(data)
    assert ref is not None and ref[0] != "other"
    got = fast(data, cache_of(data))
    found = header(data)
    properties = found is None or data[found[0] + 2 + len(ref[0].encode()) + 2 * bool(ref[2])]
    if properties:  # properties, or a length of three bytes or more: mqtt5's
        assert got is None
    else:
        assert got == ref
    assert fast(data, {}) is None  # an unknown topic is mqtt5's


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(publishes(), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                             min_size=1, max_size=4),
       st.integers(0, 3))
@example(b"\x30\x06\x00\x03a/b\x00x", [(0, 0x36)], 0)  # QoS 3
@example(b"\x32\x08\x00\x03a/b\x00\x01\x00x", [(5, 0x00), (6, 0x00)], 0)  # packet id 0
@example(b"\x30\x06\x00\x03a/b\x00x", [(3, 0x09)], 0)  # topic length past the end
def test_a_mutated_publish_reads_as_mqtt5_reads_it_or_goes_to_mqtt5(
        data: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    known = cache_of(data)
    mutated = bytearray(data)
    for at, value in flips:
        mutated[at % len(mutated)] = value
    mutated = mutated[:len(mutated) - cut] if cut < len(mutated) else mutated
    found = header(bytes(mutated)) if len(mutated) > 1 else None
    if found is None or found[1] > len(mutated):
        return  # the session waits for more bytes; nothing is read
    packet = bytes(mutated[:found[1]])
    got = fast(packet, known)
    if got is not None:
        assert got == reference(packet), (packet.hex(), got)


def test_non_minimal_lengths_and_empty_topics_are_left_to_mqtt5() -> None:
    non_minimal = b"\x30\x86\x00\x00\x03a/b\x00x"
    assert reference(non_minimal) is None and header(non_minimal) is None
    assert topic_bytes(memoryview(b"\x30\x04\x00\x00\x00x"), 0, 6) == b""
    assert fast(b"\x30\x04\x00\x00\x00x", {b"": ""}) == ("", b"x", 0, None, False, False, ())
    # The session never caches an empty topic (it needs an alias), so this never happens:
    assert reference(b"\x30\x04\x00\x00\x00x") is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(publishes(), min_size=1, max_size=12))
def test_a_session_hands_on_what_mqtt5_reads_first_and_second_time(
        packets: list[bytes]) -> None:
    """Each packet twice: mqtt5 reads the first, the fast path the second (its topic is
    known by then, unless it has properties); the messages are the same either way."""
    expected = []
    for data in packets:
        ref = reference(data)
        assert ref is not None and ref[0] != "other"
        expected.append(ref[:3] + ref[4:])
    qos0 = [p for p in packets if not p[0] & 0x06]  # the window counts QoS 1/2 only

    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        async with ScriptedBroker() as broker, client(broker, recorder, receive_max=1000):
            conn = await broker.connection(0)
            conn.send(b"".join(packets))
            await recorder.wait(len(packets))
            conn.send(b"".join(packets))
            await recorder.wait(2 * len(packets))
            await until(lambda: len(conn.pubacks()) + len(conn.pubrecs()) ==
                        2 * (len(packets) - len(qos0)), "every ack")
            got = [as_tuple(m) for m in recorder.messages]
            assert got == expected + expected

    run(body)


def as_tuple(message: Message) -> tuple[Any, ...]:
    return (message.topic, message.payload, message.qos, message.retain, message.dup,
            message.user_properties)


def test_packet_ids_reach_the_acks_on_the_fast_path() -> None:
    async def body() -> None:
        recorder = Recorder(ack_at_once=True)
        first = mqtt5.PublishPacket("devices/d1/telemetry", b"a", qos=mqtt5.QoS(1),
                                    packet_id=7).write()
        second = mqtt5.PublishPacket("devices/d1/telemetry", b"b", qos=mqtt5.QoS(2),
                                     packet_id=8).write()
        async with ScriptedBroker() as broker, client(broker, recorder):
            conn = await broker.connection(0)
            conn.send(first + second)
            await until(lambda: conn.pubacks() == [7] and conn.pubrecs() == [8], "acks")

    asyncio.run(asyncio.wait_for(body(), 8))
