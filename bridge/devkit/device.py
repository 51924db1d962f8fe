"""Device side of file transfer over MQTT (docs/file-transfer.md), on paho-mqtt.

`upload_file` is what a device (or `simulate --file`, `dev` and the tests) runs: init, the
segments, then fin once the broker has every segment. It streams the source, so a file of
any size costs a few segments of memory.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

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


def upload_file(client: paho.Client, device_id: str, file_id: str, source: bytes | Path, *,
                prefix: str = "devices", segment_bytes: int = SEGMENT_BYTES,
                name: str | None = None, content_type: str | None = None,
                user_data: Any = None, hmac_key: bytes | None = None,
                shuffle: bool = False, duplicates: float = 0.0, fin: bool = True,
                rng: random.Random | None = None) -> Upload:
    """Upload one file with QoS 1 and return what was sent.

    `shuffle` and `duplicates` (a fraction of segments sent twice) are for tests: the bridge
    must accept segments in any order and more than once. `fin=False` stops before the fin.
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
    if fin:
        _publish(client, [(f"{base}/fin/{size}", b"")], hmac_key)
    return Upload(file_id, size, digest, len(offsets), time.monotonic() - started)


def _publish(client: paho.Client, messages: Any, hmac_key: bytes | None) -> None:
    """Publish QoS 1 and wait until the broker acked each one."""
    infos = []
    for topic, body in messages:
        properties = signed(hmac_key, topic, body)[2] if hmac_key is not None else None
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
