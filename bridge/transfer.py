"""File transfer over MQTT, the S3 side: staging, coverage, streamed assembly, verification.

Every piece of a transfer's state lives in S3, never in one process, because its segments may
reach different bridges or arrive across restarts; any bridge can finish any transfer.

    staging/{device_id}/{file_id}/init                  the init, `created-millis` in metadata,
                                                        or the transfer's refusal (`refused`)
    staging/{device_id}/{file_id}/seg/{offset:016d}     one segment; its length is the size
    files/{device_id}/{file_id}                         the assembled, verified file

Refusals raise `Rejected` and never delete anything: the daemon makes the dead letter durable
first, then calls `discard` (which keeps the refusal in place of the init), then acks.
`S3Error` propagates so the daemon retries. Nothing here waits without saying so: segments
never wait for their init, and a fin's grace waits run inside `idle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import msgpack

from bridge.errors import REASON_MAX, Rejected
from bridge.routing import DEVICE_ID, checked_device_id
from bridge.s3 import STAGING_PREFIX, ObjectStore, S3Error

FILE_ID = re.compile(DEVICE_ID.pattern)  # it names S3 keys and Kafka fields, like a device id
FILES_PREFIX = "files/"
_DECIMAL = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() takes '²' and '٣'
_CHECKSUM = re.compile(r"[0-9a-fA-F]{64}")
_HEADER_TEXT = re.compile(r"[\x20-\x7e]{1,255}")  # a content type travels as an HTTP header
_MAX_NAME_BYTES = 255
_MAX_USER_DATA_HEADER = 1024  # S3 allows 2 KiB of user metadata in all
INIT_MAX_BYTES = 65536  # an init is metadata: name, size, checksum, a little user_data
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
    max_segments_per_file: int = 10000
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


class Refusal(NamedTuple):
    """A transfer refused for good: kept where its init was, so every bridge refuses its
    later segments at once, until a new init for the same file id starts over."""

    code: str
    reason: str
    created_millis: int


class TransferStore:
    """File transfers kept in one bucket; a cache of inits spares each segment a GET.

    The cache only ever speeds up accepting: a check that would refuse on what the cache
    says is made again on a fresh read first (another bridge may have started the transfer
    over). `idle` is entered around every wait that is not S3 work of its own (the fin
    grace), so the caller can lend its job slot out meanwhile."""

    def __init__(self, store: ObjectStore, limits: TransferLimits,
                 idle: Callable[[], AbstractAsyncContextManager[None]] | None = None,
                 assembling: Callable[[], AbstractAsyncContextManager[None]] | None = None,
                 stage_orphans: bool = True) -> None:
        self.store = store
        self.limits = limits
        self.idle = idle or contextlib.nullcontext
        # Held around each assembly: what bounds their number, and so their memory (two
        # parts and a few prefetched segments each), whatever the fins that wait meanwhile.
        self.assembling = assembling or contextlib.nullcontext
        # Segments without a known init: staged when another bridge of a share group may be
        # storing the init right now, refused when this bridge sees every message in order.
        self.stage_orphans = stage_orphans
        self._orphans: OrderedDict[tuple[str, str], int] = OrderedDict()  # segments seen
        self._states: OrderedDict[tuple[str, str], FileMeta | Refusal] = OrderedDict()

    async def init(self, device_id: str, file_id: str, payload: bytes,
                   now_millis: int) -> FileMeta:
        """Record a transfer. A redelivered init overwrites (and restarts its expiry); an
        init for a refused or completed file id starts that id over."""
        prefix = _staging(device_id, file_id, "bad_transfer_init")
        meta = _parse_init(payload, now_millis, device_id)
        if meta.size > self.limits.max_file_bytes:
            raise Rejected("file_too_large", f"{meta.size} bytes is more than the "
                           f"{self.limits.max_file_bytes} allowed", device_id)
        await self._check_room(device_id, prefix, now_millis)
        previous = await self._state(device_id, file_id)
        if isinstance(previous, Refusal) or (isinstance(previous, FileMeta) and (
                previous.size, previous.checksum) != (meta.size, meta.checksum)):
            # The id starts over: what the earlier transfer staged is not this file's. (A
            # redelivered init keeps its segments; segments staged before any init may be
            # this transfer's own, early through another bridge, and stay.)
            await self._abort_all(device_id, file_id)
            await self.store.delete_prefix(prefix)
        await self.store.put(prefix + "init", _dump_meta(meta).encode(),
                             {"created-millis": str(now_millis)}, "application/json")
        self._remember(device_id, file_id, meta)
        self._orphans.pop((device_id, file_id), None)
        return meta

    async def segment(self, device_id: str, file_id: str, offset_text: str, data: bytes,
                      now_millis: int | None = None) -> None:
        """Store one segment: one PUT when the init is cached. A resent segment overwrites
        itself; an empty one is checked and stores nothing. A segment whose init has not
        reached S3 yet (it may be on its way through another bridge) is stored all the same,
        without waiting: the fin, or the sweeper after expiry, decides its transfer."""
        if not _DECIMAL.fullmatch(offset_text):
            raise Rejected("bad_segment_offset", f"offset {offset_text[:40]!r} is not a "
                           "non-negative decimal integer", device_id)
        offset = int(offset_text)
        if len(data) > self.limits.max_segment_bytes:
            raise Rejected("segment_too_large", f"{len(data)} bytes is more than the "
                           f"{self.limits.max_segment_bytes} allowed", device_id)
        prefix = _staging(device_id, file_id, "unknown_transfer")
        state = await self._checked(device_id, file_id, lambda state: self._segment_fits(
            state, offset, len(data), _now(now_millis), device_id))
        if state is None:
            if await self._already_stored(device_id, file_id, offset, data):
                return  # redelivered after the file was assembled and its staging removed
            await self._admit_orphan(device_id, file_id, prefix, offset + len(data),
                                     _now(now_millis))
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
        state = await self._init_within_grace(device_id, file_id, prefix)
        if isinstance(state, Refusal):
            raise _refused(state, device_id)
        if state is None:
            return await self._finished(device_id, file_id, size)
        meta = state
        if size != meta.size:
            raise Rejected("size_mismatch", f"fin says {size} bytes, init said {meta.size}",
                           device_id)
        self._check_age(meta, now_millis, device_id)
        pieces = await self._coverage(prefix, meta, device_id)
        async with self.assembling():
            return await self._assemble(device_id, file_id, meta, pieces)

    async def discard(self, device_id: str, file_id: str, refusal: Rejected | None = None,
                      before: int | None = None) -> int:
        """Delete the staging objects, aborting any upload a crashed finish left open;
        returns how many objects were deleted. With `refusal`, the transfer's init is
        replaced by that refusal first (an earlier refusal is kept as it was), so later
        messages of the transfer are refused at once by every bridge. With `before` (when the
        outcome was decided), a transfer whose init or refusal was recorded later is a newer one
        reusing the file id, and is left alone (one recorded in the same millisecond cannot be
        told apart: it is taken for the same transfer)."""
        self._states.pop((device_id, file_id), None)
        if DEVICE_ID.fullmatch(device_id) is None or FILE_ID.fullmatch(file_id) is None:
            return 0  # no key was ever made from it
        prefix = f"{STAGING_PREFIX}{device_id}/{file_id}/"
        state = None
        if refusal is not None or before is not None:
            state = await self._state(device_id, file_id)
            if before is not None and state is not None and \
                    state.created_millis > before:
                return 0
        keep = None
        if refusal is not None:
            keep = prefix + "init"
            if not isinstance(state, Refusal):
                await self.store.put(keep, _dump_refusal(refusal, _now(None)),
                                     {"created-millis": str(_now(None)),
                                      "refused": refusal.code}, "application/json")
            self._states.pop((device_id, file_id), None)
        await self._abort_all(device_id, file_id)
        return await self.store.delete_prefix(prefix, keep=keep)

    async def expired(self, now_millis: int) -> list[tuple[str, str, FileMeta | Refusal | None]]:
        """Transfers whose init (or refusal) is older than expiry, and orphans (segments
        without an init) all older than expiry. One device at a time, so memory follows
        the busiest device, not the bucket."""
        _, devices = await self.store.list(STAGING_PREFIX, "/")
        found: list[tuple[str, str, FileMeta | Refusal | None]] = []
        for device_prefix in devices:
            _, transfers = await self.store.list(device_prefix, "/")
            device_id = device_prefix[len(STAGING_PREFIX):-1]
            checks = [self._expired_one(device_id, t[len(device_prefix):-1], now_millis)
                      for t in transfers]
            found += [hit for hit in await asyncio.gather(*checks) if hit is not None]
        return found

    async def _expired_one(self, device_id: str, file_id: str, now_millis: int
                           ) -> tuple[str, str, FileMeta | Refusal | None] | None:
        cutoff = now_millis - self.limits.expiry_seconds * 1000
        state = await self._state(device_id, file_id)
        if state is not None:
            return (device_id, file_id, state) if state.created_millis < cutoff else None
        objects, _ = await self.store.list(f"{STAGING_PREFIX}{device_id}/{file_id}/")
        newest = max((o["LastModified"].timestamp() * 1000 for o in objects), default=0.0)
        return (device_id, file_id, None) if newest < cutoff else None

    async def _check_room(self, device_id: str, prefix: str, now_millis: int) -> None:
        """Refuse a new transfer when the device has enough others still alive: an init
        within expiry, or segments staged without one (the sweeper removes those once
        expired); refusals do not count."""
        limit = self.limits.max_transfers_per_device
        _, transfers = await self.store.list(f"{STAGING_PREFIX}{device_id}/", "/")
        others = [t for t in transfers if t != prefix]
        if len(others) < limit:
            return
        cutoff = now_millis - self.limits.expiry_seconds * 1000
        heads = await asyncio.gather(*(self.store.head(t + "init") for t in others))
        alive = sum(1 for h in heads if h is None or (
            _created(h) >= cutoff and "refused" not in h.get("Metadata", {})))
        if alive >= limit:
            raise Rejected("too_many_transfers", f"{alive} transfers of this device are in "
                           f"progress, {limit} allowed", device_id)

    def _check_age(self, meta: FileMeta, now_millis: int, device_id: str) -> None:
        age = now_millis - meta.created_millis
        if age > self.limits.expiry_seconds * 1000:
            raise Rejected("transfer_expired", f"begun {age // 1000} s ago, transfers expire "
                           f"after {self.limits.expiry_seconds:g} s", device_id)

    def _segment_fits(self, state: FileMeta | Refusal | None, offset: int, length: int,
                      now_millis: int, device_id: str) -> None:
        """The checks a segment passes against its transfer's init, when there is one."""
        if isinstance(state, Refusal):
            raise _refused(state, device_id)
        if state is None:
            return
        self._check_age(state, now_millis, device_id)
        end = offset + length
        if end > state.size:
            raise Rejected("segment_beyond_size", f"bytes {offset}..{end} pass the file's "
                           f"size {state.size}", device_id)
        smallest = self._smallest_segment(state.size)
        if 0 < length < smallest and end != state.size:  # an empty one stores nothing
            raise Rejected("too_many_segments", f"a segment of {length} bytes: a file of "
                           f"{state.size} bytes may come in at most "
                           f"{self.limits.max_segments_per_file} segments, so each but the "
                           f"last must have at least {smallest} bytes", device_id)

    async def _admit_orphan(self, device_id: str, file_id: str, prefix: str, end: int,
                            now_millis: int) -> None:
        """A segment whose init is unknown. With one bridge the init always comes first, so
        there is none: refused. In a share group it may be on its way through another
        bridge: staged, within what an init would have allowed (the device's transfers, the
        largest file, the segment count, here), so a device cannot stage without bound."""
        if not self.stage_orphans:
            raise Rejected("unknown_transfer", f"no init for file {file_id!r}", device_id)
        if end > self.limits.max_file_bytes:
            raise Rejected("segment_beyond_size", f"a segment ending at {end} passes "
                           f"max_file_bytes {self.limits.max_file_bytes}", device_id)
        key = (device_id, file_id)
        seen = self._orphans[key] = self._orphans.get(key, 0) + 1  # before any await: exact
        if len(self._orphans) > _CACHE_SIZE:
            self._orphans.popitem(last=False)
        if seen > self.limits.max_segments_per_file:
            raise Rejected("too_many_segments", f"more than "
                           f"{self.limits.max_segments_per_file} segments without an init",
                           device_id)
        if seen == 1:  # a new transfer without an init counts against the device's limit
            try:
                await self._check_room(device_id, prefix, now_millis)
            except Rejected:
                self._orphans.pop(key, None)
                raise

    def known_refusal(self, device_id: str, file_id: str) -> bool:
        """True when the last read of this transfer found its refusal."""
        return self.refusal(device_id, file_id) is not None

    def refusal(self, device_id: str, file_id: str) -> Refusal | None:
        """The transfer's refusal when the last read of it found one."""
        state = self._states.get((device_id, file_id))
        return state if isinstance(state, Refusal) else None

    def _smallest_segment(self, size: int) -> int:
        return -(-size // self.limits.max_segments_per_file)

    async def _checked(self, device_id: str, file_id: str,
                       check: Callable[[FileMeta | Refusal | None], None]
                       ) -> FileMeta | Refusal | None:
        """The transfer's state after `check` passed on it; a refusal based on the cache is
        confirmed on a fresh read before it stands."""
        state = await self._state(device_id, file_id, cached=True)
        try:
            check(state)
            return state
        except Rejected:
            if (device_id, file_id) not in self._states:
                raise  # it was a fresh read already
        state = await self._state(device_id, file_id)
        check(state)
        return state

    async def _state(self, device_id: str, file_id: str,
                     cached: bool = False) -> FileMeta | Refusal | None:
        """The transfer's init, its refusal, or None when S3 has neither."""
        key = (device_id, file_id)
        if cached and key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        body = await self.store.get(f"{STAGING_PREFIX}{device_id}/{file_id}/init")
        if body is None:
            self._states.pop(key, None)
            return None
        state = _load_state(body)
        self._remember(device_id, file_id, state)
        return state

    def _remember(self, device_id: str, file_id: str, state: FileMeta | Refusal) -> None:
        self._states[(device_id, file_id)] = state
        self._states.move_to_end((device_id, file_id))
        if len(self._states) > _CACHE_SIZE:
            self._states.popitem(last=False)

    async def _init_within_grace(self, device_id: str, file_id: str,
                                 prefix: str) -> FileMeta | Refusal | None:
        """The transfer's state, waiting up to the fin grace for an init that is still on
        its way through another bridge while segments of it are already staged."""
        deadline = time.monotonic() + self.limits.fin_grace_seconds
        pause = 0.05
        while True:
            state = await self._state(device_id, file_id)
            if state is not None:
                return state
            staged, _ = await self.store.list(prefix, limit=1)
            remaining = deadline - time.monotonic()
            if not staged or remaining <= 0:
                if staged:
                    raise Rejected("unknown_transfer", f"segments of file {file_id!r} are "
                                   "staged but its init never arrived", device_id)
                return None
            async with self.idle():
                await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 1.0)

    async def _already_stored(self, device_id: str, file_id: str, offset: int,
                              data: bytes) -> bool:
        """True when the assembled file holds exactly these bytes at this offset: the
        segment is a redelivery of a transfer that completed. Anything else is new data and
        is staged, never acked unstored."""
        key = _final_key(device_id, file_id)
        head = await self.store.head(key)
        if head is None or offset + len(data) > int(head.get("ContentLength", 0)):
            return False
        return await self.store.get_range(key, offset, len(data)) == data

    async def _coverage(self, prefix: str, meta: FileMeta, device_id: str) -> list[_Piece]:
        """The segments that cover 0..size, re-listed with backoff for up to the grace period
        (the last segments may still be on their way through another bridge), and at most
        `max_segments_per_file` of them."""
        deadline = time.monotonic() + self.limits.fin_grace_seconds
        most = self.limits.max_segments_per_file
        pause = 0.05
        while True:
            objects, _ = await self.store.list(prefix + "seg/", limit=most + 1)
            if len(objects) > most:
                raise Rejected("too_many_segments", f"more than {most} segments staged; a "
                               f"file may come in at most {most}", device_id)
            segments = sorted((int(o["Key"].rsplit("/", 1)[1]), int(o["Size"]), o["Key"])
                              for o in objects)
            pieces, gap = _cover(segments, meta.size, device_id)
            if gap is None:
                return pieces
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                gaps = "" if gap[2] == 1 else f" (and {gap[2] - 1} more gaps)"
                raise Rejected("missing_segments", f"bytes {gap[0]}..{gap[1]} of {meta.size} "
                               f"never arrived{gaps}", device_id)
            async with self.idle():
                await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 1.0)

    async def _assemble(self, device_id: str, file_id: str, meta: FileMeta,
                        pieces: list[_Piece]) -> StoredFile:
        """Stream segments through sha256 into parts of `part_bytes`; complete the upload only
        once size and checksum match, abort it on anything else."""
        key = _final_key(device_id, file_id)
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
                            await self._abort_all(device_id, file_id)
                            upload_id = await self.store.start_multipart(
                                key, metadata, meta.content_type)
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
            if upload_id is not None and not done:
                await self._abort(key, upload_id)
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

    async def _abort_all(self, device_id: str, file_id: str) -> None:
        """Abort every upload still open for the transfer's file: one a crash left behind
        (its id may have been overwritten by a later attempt) would otherwise stay open."""
        key = _final_key(device_id, file_id)
        for upload_id in await self.store.open_uploads(key):
            await self._abort(key, upload_id)

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

    if len(payload) > INIT_MAX_BYTES:
        raise bad(f"{len(payload)} bytes; an init is at most {INIT_MAX_BYTES}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON: {exc}") from None
    except RecursionError:
        raise bad("not JSON the bridge reads: nested too deeply") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    name, size, checksum = doc.get("name"), doc.get("size"), doc.get("checksum")
    content_type = doc.get("content_type", "application/octet-stream")
    if not isinstance(name, str) or not 0 < len(name.encode("utf-8", "replace")) \
            <= _MAX_NAME_BYTES or not _encodable(name):
        raise bad(f"name must be text of 1-{_MAX_NAME_BYTES} bytes of UTF-8")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("size must be a non-negative integer")
    if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
        raise bad("checksum must be the sha256 as 64 hex digits")
    if not isinstance(content_type, str) or not _HEADER_TEXT.fullmatch(content_type):
        raise bad("content_type must be 1-255 printable ASCII characters")
    user_data = doc.get("user_data")
    try:  # it travels in the reference envelope (msgpack) and in S3 (JSON)
        msgpack.packb(user_data)
        json.dumps(user_data)
    except (OverflowError, ValueError, TypeError, RecursionError) as exc:
        raise bad(f"user_data cannot be carried in an envelope: {type(exc).__name__}: "
                  f"{str(exc)[:200]}") from None
    return FileMeta(name, size, checksum.lower(), content_type, user_data, now_millis)


def _encodable(text: str) -> bool:
    """False for text UTF-8 cannot carry (a lone surrogate, from a JSON escape)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _dump_meta(meta: FileMeta) -> str:
    return json.dumps({"name": meta.name, "size": meta.size, "checksum": meta.checksum,
                       "content_type": meta.content_type, "user_data": meta.user_data,
                       "created_millis": meta.created_millis})


def _dump_refusal(rejected: Rejected, now_millis: int) -> bytes:
    return json.dumps({"refused": {"code": rejected.code,
                                   "reason": rejected.reason[:REASON_MAX]},
                       "created_millis": now_millis}).encode()


def _load_state(body: bytes) -> FileMeta | Refusal:
    doc = json.loads(body)
    refused = doc.get("refused")
    if refused is not None:
        return Refusal(refused["code"], refused["reason"], doc["created_millis"])
    return FileMeta(doc["name"], doc["size"], doc["checksum"], doc["content_type"],
                    doc["user_data"], doc["created_millis"])


def _refused(refusal: Refusal, device_id: str) -> Rejected:
    return Rejected("unknown_transfer", f"the transfer was refused earlier "
                    f"({refusal.code}: {refusal.reason}); start over with a new init",
                    device_id)


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
