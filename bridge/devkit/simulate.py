"""Device helpers for `dev`, benchmarks and tests on paho-mqtt, and simulate's file upload.

`telemetry` (a few paho connections, from threads) is what the integration tests publish
with: each payload is JSON `{"device": id, "seq": n, "pad": ...}`, so a reader of Kafka can
check that every (device, seq) arrived under the right device id. The `simulate` command's
fleet, with one connection per device and a log of outcomes, is `bridge.devkit.fleet`;
`herd` runs on it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge import auth
from bridge.config import mqtt_endpoint

if TYPE_CHECKING:
    from bridge.devkit.device import Upload
    from bridge.devkit.fleet import FleetSpec


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
    """A reconnect herd: every device connects at once, as its own connection, and sends
    (on the fleet: one event loop, not a thread per device)."""
    from bridge.devkit import fleet

    report = fleet.run(fleet.FleetSpec(url, devices=devices, messages=messages, qos=qos,
                                       size=size, prefix=prefix, herd=True))
    return FleetResult(report.published, report.seconds)


def upload(spec: FleetSpec, device_id: str, path: Path, segment_bytes: int,
           wait_result: float | None = None) -> Upload:
    """`simulate --file`: one upload as `device_id`, and its line in `spec.log` (acked once
    the fin's PUBACK arrived; unknown if the upload failed part way), waiting `wait_result`
    seconds for the bridge's result of it if given."""
    from bridge.devkit.device import upload_file

    file_id, sent_ns = f"f{time.time_ns()}", time.time_ns()
    head = {"run": spec.run_id, "kind": "file", "device_id": device_id, "file_id": file_id,
            "name": path.name}
    tail = {"topic": f"{spec.prefix}/{device_id}/files/{file_id}", "qos": 1,
            "sent_ns": sent_ns}
    try:
        client = device_client(spec.url, device_id)
        try:
            done = upload_file(client, device_id, file_id, path, prefix=spec.prefix,
                               segment_bytes=segment_bytes, wait_result=wait_result)
        finally:
            client.disconnect()
            client.loop_stop()
    except BaseException:
        _log_file_line(spec.log, head | _size_and_sha256(path) | tail | {"outcome": "unknown"})
        raise
    _log_file_line(spec.log, head | {"size": done.size, "sha256": done.sha256} | tail |
                   {"outcome": "acked", "acked_ns": time.time_ns()})
    return done


def _size_and_sha256(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256")
                .hexdigest()}


def _log_file_line(log: Path | None, line: dict[str, object]) -> None:
    if log is not None:
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


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
