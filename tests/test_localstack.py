"""The local stack runs real servers whose state survives the restarts the bridge tests rely on."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.devkit.localstack import LocalStack, LocalStackError, Service, wait_for_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("localstack")) as s:
        yield s


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[bytes]:
    """Read every partition from offset 0 with assign(): group offsets/watermarks lag on Tansu."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4()}",
                         "enable.auto.commit": False})  # fmt: skip
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(values) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=expected, timeout=1):
                assert msg.error() is None, msg.error()
                values.append(msg.value() or b"")
        return values
    finally:
        consumer.close()


def test_kafka_records_survive_broker_restart(stack: LocalStack) -> None:
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    stack.create_topics([topic], partitions=3)
    stack.create_topics([topic], partitions=3)  # already exists: no error
    failures: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err)

    producer = Producer({"bootstrap.servers": stack.bootstrap, "acks": "all"})
    for i in range(100):
        producer.produce(topic, key=str(i).encode(), value=f"v{i}".encode(), on_delivery=delivered)
    assert producer.flush(30) == 0
    assert failures == []
    del producer

    stack.kafka.restart()
    assert stack.kafka.alive

    values = read_all(stack.bootstrap, topic, expected=100)
    assert sorted(values) == sorted(f"v{i}".encode() for i in range(100))


class Session:
    """A paho v2 MQTT 5 client that connects synchronously and records what it receives."""

    def __init__(self, stack: LocalStack, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)  # fmt: skip
        self.port = stack.mqtt.port
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.session_present: bool | None = None
        self.received: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        assert not reason.is_failure, reason
        self.session_present = flags.session_present
        self.connected.set()

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"got {len(self.received)} of {count}"


def publish(stack: LocalStack, topic: str, payloads: list[bytes]) -> None:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", stack.mqtt.port)
    pub.loop_start()
    try:
        for info in [pub.publish(topic, p, qos=1) for p in payloads]:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_mqtt_queued_messages_survive_sigterm_restart(stack: LocalStack) -> None:
    topic = f"persist/{uuid.uuid4().hex[:8]}"
    sub = Session(stack, client_id=f"sub-{uuid.uuid4().hex[:8]}")
    sub.connect()
    sub.client.subscribe(topic, qos=1)
    assert sub.subscribed.wait(10)
    sub.disconnect()

    # More than Mosquitto's default max_queued_messages (1000): the config must lift the limit.
    payloads = [f"m{i}".encode() for i in range(1500)]
    publish(stack, topic, payloads)
    stack.mqtt.restart()  # SIGTERM: Mosquitto writes its persistence file

    sub.connect()
    assert sub.session_present
    sub.wait_for(len(payloads))
    sub.disconnect()
    assert [m.payload for m in sub.received] == payloads
    assert all(m.qos == 1 for m in sub.received)


def test_mqtt_carries_16_mib_payload(stack: LocalStack) -> None:
    topic = f"big/{uuid.uuid4().hex[:8]}"
    sub = Session(stack, client_id=f"big-{uuid.uuid4().hex[:8]}")
    sub.connect()
    sub.client.subscribe(topic, qos=1)
    assert sub.subscribed.wait(10)
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    publish(stack, topic, [payload])
    sub.wait_for(1)
    sub.disconnect()
    assert sub.received[0].payload == payload


def test_paused_kafka_does_not_answer_until_resumed(stack: LocalStack) -> None:
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    stack.kafka.pause()
    try:
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=1)
    finally:
        stack.kafka.resume()
    admin.list_topics(timeout=10)


def test_stop_ends_every_process_and_frees_ports(tmp_path: Path) -> None:
    with LocalStack(tmp_path) as s:
        services = [s.mqtt, s.s3, s.kafka]
        assert all(svc.alive for svc in services)
    for svc in services:
        assert not svc.alive
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", svc.port), timeout=1).close()


def test_failed_start_names_the_service_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "false.log"
    svc = Service("doomed", ["sh", "-c", "echo boom >&2; exit 3"], 1, log)
    with pytest.raises(LocalStackError, match=r"(?s)doomed exited with code 3.*boom"):
        svc.start()
    assert not svc.alive
    with pytest.raises(LocalStackError, match=r"within 0\.2s"):
        wait_for_port("127.0.0.1", 1, 0.2, name="nothing")
