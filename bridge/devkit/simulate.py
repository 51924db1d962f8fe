"""A device fleet for `mqtt-kafka-bridge simulate`, `dev`, benchmarks and tests (paho-mqtt).

Each payload is JSON `{"device": id, "seq": n, "pad": ...}`, so a reader of Kafka can check
that every (device, seq) arrived under the right device id.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge import auth
from bridge.config import mqtt_endpoint


@dataclass
class FleetResult:
    published: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds else 0.0


def device_client(url: str, client_id: str, username: str | None = None,
                  password: str | None = None,
                  protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> paho.Client:
    """A connected paho client with its network loop running."""
    scheme, host, port = mqtt_endpoint(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.max_inflight_messages_set(20)  # Mosquitto's default Receive Maximum
    client.max_queued_messages_set(0)
    if username is not None:
        client.username_pw_set(username, password)
    if scheme == "mqtts":
        client.tls_set()
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise ConnectionError(f"device {client_id} could not connect to {url}")
    return client


def payload(device: str, seq: int, size: int) -> bytes:
    body = json.dumps({"device": device, "seq": seq}).encode()
    if len(body) < size:
        body = json.dumps({"device": device, "seq": seq, "pad": "x" * (size - len(body) - 10)})\
            .encode()
    return body


def signed(key: bytes, topic: str, body: bytes) -> tuple[str, bytes, Properties]:
    """A message with the `signature` user property an `auth = "hmac"` route checks."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [(auth.SIGNATURE_PROPERTY, auth.sign(key, topic, body))]
    return topic, body, properties


def publish_all(client: paho.Client,
                messages: Iterable[tuple[str, bytes] | tuple[str, bytes, Properties]], qos: int,
                rate: float | None = None) -> int:
    """Publish and wait until the broker has every QoS 1/2 message (PUBACK / PUBCOMP)."""
    infos, start, count = [], time.monotonic(), 0
    for topic, body, *properties in messages:
        infos.append(client.publish(topic, body, qos=qos,
                                    properties=properties[0] if properties else None))
        count += 1
        if rate:
            ahead = count / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(60)
        if qos and not info.is_published():
            raise TimeoutError("the broker did not acknowledge a publish within 60 s")
    return count


def telemetry(url: str, devices: int = 100, messages: int = 100, qos: int = 1,
              size: int = 200, rate: float | None = None, prefix: str = "devices",
              kind: str = "telemetry", first_seq: int = 0, connections: int = 4) -> FleetResult:
    """`messages` per device from `devices` devices, interleaved, over a few connections."""
    ids = [f"dev-{i:05d}" for i in range(devices)]
    plan = [(f"{prefix}/{d}/{kind}", payload(d, seq, size))
            for seq in range(first_seq, first_seq + messages) for d in ids]
    shards = [plan[i::connections] for i in range(connections)]
    share = rate / connections if rate else None
    start = time.monotonic()
    clients = [device_client(url, f"sim-{time.time_ns()}-{i}") for i in range(connections)]
    try:
        threads = [threading.Thread(target=publish_all, args=(c, s, qos, share))
                   for c, s in zip(clients, shards, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
    return FleetResult(len(plan), time.monotonic() - start)


def herd(url: str, devices: int = 200, messages: int = 5, qos: int = 1, size: int = 200,
         prefix: str = "devices") -> FleetResult:
    """A reconnect herd: every device connects at once, as each its own client, and sends."""
    start = time.monotonic()
    clients: list[paho.Client] = []
    lock = threading.Lock()

    def one(device: str) -> None:
        client = device_client(url, device)
        with lock:
            clients.append(client)
        publish_all(client, [(f"{prefix}/{device}/telemetry", payload(device, s, size))
                             for s in range(messages)], qos)

    threads = [threading.Thread(target=one, args=(f"dev-{i:05d}",)) for i in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.disconnect()
        c.loop_stop()
    return FleetResult(devices * messages, time.monotonic() - start)


def trickle(url: str, stop: threading.Event, rate: float = 5.0, devices: int = 10,
            prefix: str = "devices") -> int:
    """Telemetry at `rate` msg/s until `stop` is set, for `dev`; returns how many were sent."""
    client = device_client(url, f"sim-trickle-{time.time_ns()}")
    sent = 0
    try:
        while not stop.wait(1 / rate):
            device = f"dev-{sent % devices:05d}"
            client.publish(f"{prefix}/{device}/telemetry", payload(device, sent, 64), qos=1)
            sent += 1
    finally:
        client.disconnect()
        client.loop_stop()
    return sent
