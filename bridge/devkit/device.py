"""Device side of file transfer over MQTT (docs/file-transfer.md), on paho-mqtt.

`upload_file` is what a device (or `simulate --file`, `dev` and the tests) runs: init, the
segments, then fin once the broker has every segment. It streams the source, so a file of
any size costs a few segments of memory. With `wait_result` it also waits for the bridge's
answer to the fin (`[file_transfer] respond`, see bridge/results.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.devkit.simulate import signed

SEGMENT_BYTES = 256 * 1024
_WINDOW = 64  # segments published before waiting for the broker's acks


@dataclass(frozen=True)
class Upload:
    file_id: str
    size: int
    sha256: str
    segments: int  # published, duplicates included
    seconds: float
    result: dict[str, Any] | None = None  # the bridge's answer to the fin, when waited for


def upload_file(client: paho.Client, device_id: str, file_id: str, source: bytes | Path, *,
                prefix: str = "devices", segment_bytes: int = SEGMENT_BYTES,
                name: str | None = None, content_type: str | None = None,
                user_data: Any = None, hmac_key: bytes | None = None,
                shuffle: bool = False, duplicates: float = 0.0, fin: bool = True,
                rng: random.Random | None = None, wait_result: float | None = None,
                response_topic: str | None = None,
                correlation_data: bytes | None = None) -> Upload:
    """Upload one file with QoS 1 and return what was sent.

    `shuffle` and `duplicates` (a fraction of segments sent twice) are for tests: the bridge
    must accept segments in any order and more than once. `fin=False` stops before the fin.
    `wait_result` (seconds) subscribes to the result topic before the fin and waits that
    long for the bridge's answer (`Upload.result`, None if none came): the transfer's own
    result topic, or `response_topic`, which the fin then names as its MQTT 5 Response
    Topic, with `correlation_data` (the answer must echo it).
    """
    rng = rng or random.Random()
    size, digest = _size_and_sha256(source)
    base = f"{prefix}/{device_id}/files/{file_id}"
    started = time.monotonic()
    meta: dict[str, Any] = {"name": name or (source.name if isinstance(source, Path) else
                                             file_id), "size": size, "checksum": digest}
    if content_type:
        meta["content_type"] = content_type
    if user_data is not None:
        meta["user_data"] = user_data
    _publish(client, [(f"{base}/init", json.dumps(meta).encode())], hmac_key)
    offsets = list(range(0, size, segment_bytes))
    offsets += rng.sample(offsets, int(len(offsets) * duplicates))
    if shuffle:
        rng.shuffle(offsets)
    for start in range(0, len(offsets), _WINDOW):
        batch = offsets[start:start + _WINDOW]
        _publish(client, ((f"{base}/{offset}", _read(source, offset, segment_bytes))
                          for offset in batch), hmac_key)
    result = None
    if fin and wait_result is not None:
        with _Answer(client, response_topic or f"{base}/result", file_id,
                     correlation_data) as answer:
            _publish(client, [(f"{base}/fin/{size}", b"")], hmac_key,
                     _request(response_topic, correlation_data))
            result = answer.wait(wait_result)
    elif fin:
        _publish(client, [(f"{base}/fin/{size}", b"")], hmac_key)
    return Upload(file_id, size, digest, len(offsets), time.monotonic() - started, result)


class _Answer:
    """A subscription to one result topic, from before the fin until the answer came."""

    def __init__(self, client: paho.Client, topic: str, file_id: str,
                 correlation_data: bytes | None) -> None:
        self.client, self.topic, self.file_id = client, topic, file_id
        self.correlation_data = correlation_data
        self.got: dict[str, Any] | None = None
        self.came = threading.Event()

    def __enter__(self) -> _Answer:
        self.client.message_callback_add(self.topic, self._on_message)
        acked: dict[int, Any] = {}  # mid -> the SUBACK's reason codes
        before = self.client.on_subscribe

        def on_subscribe(*args: Any) -> None:
            acked[args[2]] = args[3]
            if before is not None:
                before(*args)

        self.client.on_subscribe = on_subscribe
        try:
            _, mid = self.client.subscribe(self.topic, qos=1)
            deadline = time.monotonic() + 30
            while mid not in acked and time.monotonic() < deadline:
                time.sleep(0.01)
            if mid not in acked:
                raise TimeoutError(f"the broker did not acknowledge subscribing {self.topic}")
            if any(getattr(code, "is_failure", False) for code in acked[mid]):
                raise PermissionError(f"the broker refused subscribing {self.topic}: "
                                      f"{acked[mid]}")
        except BaseException:
            self.client.message_callback_remove(self.topic)
            raise
        finally:
            self.client.on_subscribe = before
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.message_callback_remove(self.topic)
        self.client.unsubscribe(self.topic)

    def _on_message(self, _client: paho.Client, _userdata: Any,
                    message: paho.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and doc.get("file_id") == self.file_id and \
                (self.correlation_data is None or correlation == self.correlation_data):
            self.got = doc
            self.came.set()

    def wait(self, timeout: float) -> dict[str, Any] | None:
        self.came.wait(timeout)
        return self.got


def _request(response_topic: str | None, correlation_data: bytes | None) -> Properties | None:
    if response_topic is None and correlation_data is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation_data is not None:
        properties.CorrelationData = correlation_data
    return properties


def _publish(client: paho.Client, messages: Any, hmac_key: bytes | None,
             request: Properties | None = None) -> None:
    """Publish QoS 1 and wait until the broker acked each one. `request` adds a Response
    Topic and Correlation Data (a fin's)."""
    infos = []
    for topic, body in messages:
        properties = signed(hmac_key, topic, body)[2] if hmac_key is not None else request
        if hmac_key is not None and request is not None:
            for name in ("ResponseTopic", "CorrelationData"):
                if hasattr(request, name):
                    setattr(properties, name, getattr(request, name))
        infos.append(client.publish(topic, body, qos=1, properties=properties))
    for info in infos:
        info.wait_for_publish(120)
        if not info.is_published():
            raise TimeoutError("the broker did not acknowledge a segment within 120 s")


def _size_and_sha256(source: bytes | Path) -> tuple[int, str]:
    if isinstance(source, bytes):
        return len(source), hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with source.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return source.stat().st_size, digest.hexdigest()


def _read(source: bytes | Path, offset: int, length: int) -> bytes:
    if isinstance(source, bytes):
        return source[offset:offset + length]
    with source.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def sized_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of pseudo-random bytes (for tests, benchmarks and `dev`), written in chunks."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        for chunk in _chunks(size):
            f.write(rng.randbytes(chunk))
    return path


def _chunks(size: int, chunk: int = 1 << 20) -> Iterator[int]:
    while size > 0:
        yield min(chunk, size)
        size -= chunk
