"""File transfer over MQTT, the S3 side: staging, coverage, streamed assembly, verification.

Every piece of a transfer's state lives in S3, never in one process, because its segments may
reach different bridges or arrive across restarts; any bridge can finish any transfer.

    staging/{device_id}/{file_id}/init                  the init, `created-millis` in metadata
    staging/{device_id}/{file_id}/seg/{offset:016d}     one segment; its length is the size
    staging/{device_id}/{file_id}/upload                the open multipart upload id, if any
    files/{device_id}/{file_id}                         the assembled, verified file

Refusals raise `Rejected` and never delete anything: the daemon makes the dead letter durable
first, then calls `discard`, then acks. `S3Error` propagates so the daemon retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from bridge.errors import Rejected
from bridge.routing import DEVICE_ID, checked_device_id
from bridge.s3 import STAGING_PREFIX, ObjectStore, S3Error

FILE_ID = re.compile(DEVICE_ID.pattern)  # it names S3 keys and Kafka fields, like a device id
FILES_PREFIX = "files/"
_DECIMAL = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() takes '²' and '٣'
_CHECKSUM = re.compile(r"[0-9a-fA-F]{64}")
_HEADER_TEXT = re.compile(r"[\x20-\x7e]{1,255}")  # a content type travels as an HTTP header
_MAX_NAME_BYTES = 255
_MAX_USER_DATA_HEADER = 1024  # S3 allows 2 KiB of user metadata in all
_MIN_PART_BYTES = 5 << 20
_PREFETCH = 4  # segments fetched ahead of the one being hashed
_PARTS_AHEAD = 1  # parts uploading while the next is filled: memory is (1 + this) parts
_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class TransferLimits:
    max_file_bytes: int = 1 << 30
    max_segment_bytes: int = 1 << 20
    max_transfers_per_device: int = 4
    expiry_seconds: float = 86400.0
    fin_grace_seconds: float = 10.0  # how long finish() re-lists before deciding gaps are real
    part_bytes: int = 8 << 20  # multipart part size; peak memory of one assembly

    def __post_init__(self) -> None:
        if self.part_bytes < _MIN_PART_BYTES:
            raise ValueError("part_bytes: S3 needs parts of at least 5 MiB")


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What the device's init said, and when the transfer began."""

    name: str
    size: int
    checksum: str  # sha256, lower-case hex
    content_type: str
    user_data: Any
    created_millis: int


@dataclass(frozen=True, slots=True)
class StoredFile:
    """The assembled object, verified against the init's size and checksum."""

    key: str
    reference: str
    size: int
    sha256: str
    meta: FileMeta


class _Piece(NamedTuple):
    """The bytes a segment adds to coverage: `data[skip:skip + take]`."""

    key: str
    size: int
    skip: int
    take: int


class TransferStore:
    """File transfers kept in one bucket; a cache of inits spares each segment a GET."""

    def __init__(self, store: ObjectStore, limits: TransferLimits) -> None:
        self.store = store
        self.limits = limits
        self._metas: OrderedDict[tuple[str, str], FileMeta] = OrderedDict()

    async def init(self, device_id: str, file_id: str, payload: bytes,
                   now_millis: int) -> FileMeta:
        """Record a transfer. A redelivered init overwrites (and restarts its expiry)."""
        prefix = _staging(device_id, file_id, "bad_transfer_init")
        meta = _parse_init(payload, now_millis, device_id)
        if meta.size > self.limits.max_file_bytes:
            raise Rejected("file_too_large", f"{meta.size} bytes is more than the "
                           f"{self.limits.max_file_bytes} allowed", device_id)
        await self._check_room(device_id, prefix, now_millis)
        await self.store.put(prefix + "init", _dump_meta(meta).encode(),
                             {"created-millis": str(now_millis)}, "application/json")
        self._remember(device_id, file_id, meta)
        return meta

    async def segment(self, device_id: str, file_id: str, offset_text: str, data: bytes,
                      now_millis: int | None = None) -> None:
        """Store one segment: one PUT when the init is cached. A resent segment overwrites
        itself; an empty one is checked and stores nothing."""
        if not _DECIMAL.fullmatch(offset_text):
            raise Rejected("bad_segment_offset", f"offset {offset_text[:40]!r} is not a "
                           "non-negative decimal integer", device_id)
        offset = int(offset_text)
        if len(data) > self.limits.max_segment_bytes:
            raise Rejected("segment_too_large", f"{len(data)} bytes is more than the "
                           f"{self.limits.max_segment_bytes} allowed", device_id)
        prefix = _staging(device_id, file_id, "unknown_transfer")
        meta = await self._meta(device_id, file_id, cached=True)
        if meta is None:
            if await self.store.head(_final_key(device_id, file_id)) is not None:
                return  # redelivered after the file was stored and its staging removed
            raise Rejected("unknown_transfer", f"no init for file {file_id!r}", device_id)
        self._check_age(meta, _now(now_millis), device_id)
        if offset + len(data) > meta.size:
            raise Rejected("segment_beyond_size", f"bytes {offset}..{offset + len(data)} pass "
                           f"the file's size {meta.size}", device_id)
        if data:
            await self.store.put(f"{prefix}seg/{offset:016d}", data)

    async def finish(self, device_id: str, file_id: str, size_text: str,
                     now_millis: int) -> StoredFile:
        """Assemble, verify and store the file; idempotent once the staging is cleaned up."""
        if not _DECIMAL.fullmatch(size_text):
            raise Rejected("bad_transfer_fin", f"size {size_text[:40]!r} is not a "
                           "non-negative decimal integer", device_id)
        size = int(size_text)
        prefix = _staging(device_id, file_id, "unknown_transfer")
        meta = await self._meta(device_id, file_id, cached=False)
        if meta is None:
            return await self._finished(device_id, file_id, size)
        if size != meta.size:
            raise Rejected("size_mismatch", f"fin says {size} bytes, init said {meta.size}",
                           device_id)
        self._check_age(meta, now_millis, device_id)
        pieces = await self._coverage(prefix, meta.size, device_id)
        return await self._assemble(device_id, file_id, meta, pieces)

    async def discard(self, device_id: str, file_id: str) -> int:
        """Delete the staging objects, aborting an upload a crashed finish left open; returns
        how many objects were deleted."""
        self._metas.pop((device_id, file_id), None)
        if DEVICE_ID.fullmatch(device_id) is None or FILE_ID.fullmatch(file_id) is None:
            return 0  # no key was ever made from it
        prefix = f"{STAGING_PREFIX}{device_id}/{file_id}/"
        upload_id = await self.store.get(prefix + "upload")
        if upload_id:
            await self._abort(_final_key(device_id, file_id), upload_id.decode())
        return await self.store.delete_prefix(prefix)

    async def expired(self, now_millis: int) -> list[tuple[str, str, FileMeta | None]]:
        """Transfers whose init is older than expiry, and orphans (segments without an init,
        e.g. written by a bridge whose cache outlived a discard) all older than expiry. One
        device at a time, so memory follows the busiest device, not the bucket."""
        _, devices = await self.store.list(STAGING_PREFIX, "/")
        found: list[tuple[str, str, FileMeta | None]] = []
        for device_prefix in devices:
            _, transfers = await self.store.list(device_prefix, "/")
            device_id = device_prefix[len(STAGING_PREFIX):-1]
            checks = [self._expired_one(device_id, t[len(device_prefix):-1], now_millis)
                      for t in transfers]
            found += [hit for hit in await asyncio.gather(*checks) if hit is not None]
        return found

    async def _expired_one(self, device_id: str, file_id: str,
                           now_millis: int) -> tuple[str, str, FileMeta | None] | None:
        cutoff = now_millis - self.limits.expiry_seconds * 1000
        meta = await self._meta(device_id, file_id, cached=False)
        if meta is not None:
            return (device_id, file_id, meta) if meta.created_millis < cutoff else None
        objects, _ = await self.store.list(f"{STAGING_PREFIX}{device_id}/{file_id}/")
        newest = max((o["LastModified"].timestamp() * 1000 for o in objects), default=0.0)
        return (device_id, file_id, None) if newest < cutoff else None

    async def _check_room(self, device_id: str, prefix: str, now_millis: int) -> None:
        """Refuse a new transfer when the device has enough others still alive; expired ones
        and orphans do not count, the sweeper is about to remove them."""
        _, transfers = await self.store.list(f"{STAGING_PREFIX}{device_id}/", "/")
        others = [t for t in transfers if t != prefix]
        if len(others) < self.limits.max_transfers_per_device:
            return
        cutoff = now_millis - self.limits.expiry_seconds * 1000
        heads = await asyncio.gather(*(self.store.head(t + "init") for t in others))
        alive = sum(1 for h in heads if h is not None and _created(h) >= cutoff)
        if alive >= self.limits.max_transfers_per_device:
            raise Rejected("too_many_transfers", f"{alive} transfers of this device are in "
                           f"progress, {self.limits.max_transfers_per_device} allowed",
                           device_id)

    def _check_age(self, meta: FileMeta, now_millis: int, device_id: str) -> None:
        age = now_millis - meta.created_millis
        if age > self.limits.expiry_seconds * 1000:
            raise Rejected("transfer_expired", f"begun {age // 1000} s ago, transfers expire "
                           f"after {self.limits.expiry_seconds:g} s", device_id)

    async def _meta(self, device_id: str, file_id: str, cached: bool) -> FileMeta | None:
        key = (device_id, file_id)
        if cached and key in self._metas:
            self._metas.move_to_end(key)
            return self._metas[key]
        body = await self.store.get(f"{STAGING_PREFIX}{device_id}/{file_id}/init")
        if body is None:
            self._metas.pop(key, None)
            return None
        meta = _load_meta(body)
        self._remember(device_id, file_id, meta)
        return meta

    def _remember(self, device_id: str, file_id: str, meta: FileMeta) -> None:
        self._metas[(device_id, file_id)] = meta
        self._metas.move_to_end((device_id, file_id))
        if len(self._metas) > _CACHE_SIZE:
            self._metas.popitem(last=False)

    async def _coverage(self, prefix: str, size: int, device_id: str) -> list[_Piece]:
        """The segments that cover 0..size, re-listed with backoff for up to the grace period:
        the last segments may still be on their way through another bridge."""
        deadline = time.monotonic() + self.limits.fin_grace_seconds
        pause = 0.05
        while True:
            objects, _ = await self.store.list(prefix + "seg/")
            segments = sorted((int(o["Key"].rsplit("/", 1)[1]), int(o["Size"]), o["Key"])
                              for o in objects)
            pieces, gap = _cover(segments, size, device_id)
            if gap is None:
                return pieces
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                gaps = "" if gap[2] == 1 else f" (and {gap[2] - 1} more gaps)"
                raise Rejected("missing_segments", f"bytes {gap[0]}..{gap[1]} of {size} never "
                               f"arrived{gaps}", device_id)
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 1.0)

    async def _assemble(self, device_id: str, file_id: str, meta: FileMeta,
                        pieces: list[_Piece]) -> StoredFile:
        """Stream segments through sha256 into parts of `part_bytes`; complete the upload only
        once size and checksum match, abort it on anything else."""
        key = _final_key(device_id, file_id)
        marker = f"{STAGING_PREFIX}{device_id}/{file_id}/upload"
        metadata = _final_metadata(meta)
        digest = hashlib.sha256()
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[asyncio.Future[str]] = []  # uploads in part order, _PARTS_AHEAD at most
        consumed, done = 0, False
        try:
            async with contextlib.aclosing(self._fetch(pieces)) as fetched:
                async for piece, data in fetched:
                    view = memoryview(data)[piece.skip:piece.skip + piece.take]
                    digest.update(view)
                    buffer += view
                    consumed += piece.take
                    if len(buffer) >= self.limits.part_bytes and consumed < meta.size:
                        if upload_id is None:
                            upload_id = await self.store.start_multipart(
                                key, metadata, meta.content_type)
                            await self.store.put(marker, upload_id.encode())
                        # Upload while the next part is fetched; wait when too many are.
                        parts.append(asyncio.ensure_future(self.store.upload_part(
                            key, upload_id, len(parts) + 1, bytes(buffer))))
                        buffer = bytearray()
                        running = [p for p in parts if not p.done()]
                        if len(running) > _PARTS_AHEAD:
                            await running[0]
            sha256 = digest.hexdigest()
            if sha256 != meta.checksum:
                raise Rejected("checksum_mismatch", f"the assembled bytes have sha256 {sha256}, "
                               f"init said {meta.checksum}", device_id)
            if upload_id is None:
                await self.store.put(key, bytes(buffer), metadata, meta.content_type)
            else:
                parts.append(asyncio.ensure_future(self.store.upload_part(
                    key, upload_id, len(parts) + 1, bytes(buffer))))
                etags = [await part for part in parts]
                await self.store.complete_multipart(key, upload_id, etags)
            done = True
        finally:
            for part in parts:
                part.cancel()
            if parts:
                await asyncio.gather(*parts, return_exceptions=True)
            if upload_id is not None:
                if not done:
                    await self._abort(key, upload_id)
                await self.store.put(marker, b"")  # no upload open any more
        return StoredFile(key, self.store.reference(key), meta.size, sha256, meta)

    async def _fetch(self, pieces: Sequence[_Piece]) -> AsyncGenerator[tuple[_Piece, bytes]]:
        """Each piece's segment in order, with the next few already on their way."""
        tasks: dict[int, asyncio.Task[bytes | None]] = {}
        try:
            for index, piece in enumerate(pieces):
                for ahead in range(index, min(index + _PREFETCH + 1, len(pieces))):
                    if ahead not in tasks:
                        tasks[ahead] = asyncio.ensure_future(self.store.get(pieces[ahead].key))
                data = await tasks.pop(index)
                if data is None or len(data) != piece.size:
                    # deleted or rewritten since the listing: retry from a fresh listing
                    raise S3Error(f"segment {piece.key} changed during assembly")
                yield piece, data
        finally:
            for task in tasks.values():
                task.cancel()

    async def _finished(self, device_id: str, file_id: str, size: int) -> StoredFile:
        """A redelivered fin after cleanup: the stored file as its metadata describes it."""
        key = _final_key(device_id, file_id)
        head = await self.store.head(key)
        if head is None or "sha256" not in head.get("Metadata", {}):
            raise Rejected("unknown_transfer", f"no init and no file for {file_id!r}",
                           device_id)
        meta = _meta_from_head(head)
        if size != meta.size:
            raise Rejected("size_mismatch", f"fin says {size} bytes, the stored file has "
                           f"{meta.size}", device_id)
        return StoredFile(key, self.store.reference(key), meta.size, meta.checksum, meta)

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.store.abort_multipart(key, upload_id)
        except S3Error as exc:
            response = getattr(exc.__cause__, "response", {})
            if response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise


def _cover(segments: list[tuple[int, int, str]], size: int,
           device_id: str) -> tuple[list[_Piece], tuple[int, int, int] | None]:
    """The pieces adding new bytes in offset order, and the first gap (start, end, how many
    gaps) if any. A segment inside covered bytes is skipped, an overlap adds its new tail."""
    pieces: list[_Piece] = []
    covered, first, gaps = 0, None, 0
    for offset, length, key in segments:
        end = offset + length
        if end > size:  # an earlier init of the same file id was larger
            raise Rejected("segment_beyond_size", f"a stored segment ends at {end}, past the "
                           f"file's size {size}", device_id)
        if offset > covered:
            first, gaps = (covered, offset) if first is None else first, gaps + 1
        if end > covered and length:
            skip = max(covered - offset, 0)
            pieces.append(_Piece(key, length, skip, length - skip))
            covered = end
    if covered < size:
        first, gaps = (covered, size) if first is None else first, gaps + 1
    return pieces, None if first is None else (*first, gaps)


def _staging(device_id: str, file_id: str, code: str) -> str:
    checked_device_id(device_id)
    if FILE_ID.fullmatch(file_id) is None:
        raise Rejected(code, "a file id is 1-128 letters, digits, '.', '_' or '-' (not '.' or "
                       f"'..'), got {file_id[:160]!r}", device_id)
    return f"{STAGING_PREFIX}{device_id}/{file_id}/"


def _final_key(device_id: str, file_id: str) -> str:
    return f"{FILES_PREFIX}{device_id}/{file_id}"


def _now(now_millis: int | None) -> int:
    return int(time.time() * 1000) if now_millis is None else now_millis


def _parse_init(payload: bytes, now_millis: int, device_id: str) -> FileMeta:
    def bad(reason: str) -> Rejected:
        return Rejected("bad_transfer_init", reason, device_id)

    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    name, size, checksum = doc.get("name"), doc.get("size"), doc.get("checksum")
    content_type = doc.get("content_type", "application/octet-stream")
    if not isinstance(name, str) or not 0 < len(name.encode()) <= _MAX_NAME_BYTES:
        raise bad(f"name must be a string of 1-{_MAX_NAME_BYTES} bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("size must be a non-negative integer")
    if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
        raise bad("checksum must be the sha256 as 64 hex digits")
    if not isinstance(content_type, str) or not _HEADER_TEXT.fullmatch(content_type):
        raise bad("content_type must be 1-255 printable ASCII characters")
    return FileMeta(name, size, checksum.lower(), content_type, doc.get("user_data"),
                    now_millis)


def _dump_meta(meta: FileMeta) -> str:
    return json.dumps({"name": meta.name, "size": meta.size, "checksum": meta.checksum,
                       "content_type": meta.content_type, "user_data": meta.user_data,
                       "created_millis": meta.created_millis})


def _load_meta(body: bytes) -> FileMeta:
    doc = json.loads(body)
    return FileMeta(doc["name"], doc["size"], doc["checksum"], doc["content_type"],
                    doc["user_data"], doc["created_millis"])


def _created(head: dict[str, Any]) -> int:
    return int(head.get("Metadata", {}).get("created-millis", 0))


def _final_metadata(meta: FileMeta) -> dict[str, str]:
    """S3 metadata is ASCII and 2 KiB at most: the name is percent-encoded, and user_data
    kept only when small (it is for a redelivered fin after cleanup, see `_finished`)."""
    metadata = {"sha256": meta.checksum, "size": str(meta.size), "name": quote(meta.name),
                "created-millis": str(meta.created_millis)}
    user_data = quote(json.dumps(meta.user_data, separators=(",", ":")))
    if len(user_data) <= _MAX_USER_DATA_HEADER:
        metadata["user-data"] = user_data
    return metadata


def _meta_from_head(head: dict[str, Any]) -> FileMeta:
    metadata = head["Metadata"]
    user_data = metadata.get("user-data")
    return FileMeta(unquote(metadata["name"]), int(metadata["size"]), metadata["sha256"],
                    head.get("ContentType", "application/octet-stream"),
                    None if user_data is None else json.loads(unquote(user_data)),
                    int(metadata.get("created-millis", 0)))
