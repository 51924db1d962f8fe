"""The file-transfer protocol against a model, without servers: `TransferStore` over an
in-memory S3 with S3's rules, driven by generated interleavings of one or two devices' inits,
segments, fins and the daemon's discards. The model predicts every call's verdict; the
store's contents must match the model's after every step, so an acked segment is never lost
and a refused transfer stays refused."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from bridge.errors import Rejected
from bridge.files import _KEEPS_STAGING
from bridge.s3 import ObjectStore, S3Error
from bridge.transfer import (
    FILE_ID,
    INIT_MAX_BYTES,
    FileMeta,
    StoredFile,
    TransferLimits,
    TransferStore,
    _parse_init,
)
from tests.test_properties import JSON, SAFE, often

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3: every part but the last
PAGE = 1000  # S3: entries per list page
METADATA_MAX = 2048  # S3: bytes of user metadata, names and values


# ------------------------------------------------------------------ an S3 in memory


class ClientError(Exception):
    """What TransferStore reads of botocore's ClientError: `response["Error"]["Code"]`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


def s3_error(operation: str, code: str) -> S3Error:
    """An S3Error as `ObjectStore` raises it: the client's error as its cause."""
    error = S3Error(f"{operation}: {code}")
    error.__cause__ = ClientError(code)
    return error


@dataclass
class Stored:
    body: bytes
    metadata: dict[str, str]
    content_type: str
    modified: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Upload:
    key: str
    metadata: dict[str, str]
    content_type: str
    parts: dict[int, tuple[str, bytes]] = field(default_factory=dict)


def header_problem(metadata: dict[str, str], content_type: str) -> str | None:
    """S3 takes metadata and a content type as HTTP headers: printable ASCII, 2 KiB of
    metadata at most."""
    texts = [*metadata, *metadata.values(), content_type]
    if not all(t.isascii() and t.isprintable() for t in texts):
        return "a header that is not printable ASCII"
    if sum(len(k) + len(v) for k, v in metadata.items()) > METADATA_MAX:
        return "MetadataTooLarge"
    return None


class MemoryStore:
    """`bridge.s3.ObjectStore`'s async interface as TransferStore uses it, over dicts, with
    S3's rules: keys listed in UTF-8 order in pages of 1000, common prefixes, metadata names
    lower-cased and 2 KiB at most, a range starting past the end refused, multipart parts of
    at least 5 MiB but the last, and NoSuchUpload for an upload that is not open. Every call
    yields to the loop once, so concurrent calls interleave as they would over a network."""

    bucket = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, Stored] = {}
        self.uploads: dict[str, Upload] = {}
        self.started = 0  # multipart uploads ever started
        self._ids = itertools.count(1)

    def reference(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None:
        await asyncio.sleep(0)
        metadata = metadata or {}
        problem = header_problem(metadata, content_type)
        if problem:
            raise s3_error("put_object", problem)
        self.objects[key] = Stored(bytes(body), {k.lower(): v for k, v in metadata.items()},
                                   content_type)

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        stored = self.objects.get(key)
        return None if stored is None else stored.body

    async def get_range(self, key: str, start: int, length: int) -> bytes | None:
        if length <= 0:
            return b""
        await asyncio.sleep(0)
        stored = self.objects.get(key)
        if stored is None:
            return None
        if start >= len(stored.body):
            raise s3_error("get_object", "InvalidRange")
        return stored.body[start:start + length]

    async def head(self, key: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        stored = self.objects.get(key)
        if stored is None:
            return None
        return {"Metadata": dict(stored.metadata), "ContentLength": len(stored.body),
                "ContentType": stored.content_type, "LastModified": stored.modified}

    async def list(self, prefix: str, delimiter: str | None = None,
                   limit: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        await asyncio.sleep(0)
        entries: list[dict[str, Any] | str] = []
        for key in sorted((k for k in self.objects if k.startswith(prefix)),
                          key=lambda k: k.encode()):
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if not entries or entries[-1] != common:
                    entries.append(common)
                continue
            stored = self.objects[key]
            entries.append({"Key": key, "Size": len(stored.body),
                            "LastModified": stored.modified})
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        for start in range(0, len(entries), PAGE):  # pages until `limit` entries are in
            for entry in entries[start:start + PAGE]:
                (prefixes if isinstance(entry, str) else objects).append(entry)  # type: ignore[arg-type]
            if limit is not None and len(objects) + len(prefixes) >= limit:
                break
        return objects, prefixes

    async def delete_prefix(self, prefix: str, keep: str | None = None) -> int:
        await asyncio.sleep(0)
        doomed = [k for k in self.objects if k.startswith(prefix) and k != keep]
        for key in doomed:
            del self.objects[key]
        return len(doomed)

    async def open_uploads(self, key: str) -> builtins.list[str]:
        await asyncio.sleep(0)
        return [upload_id for upload_id, u in self.uploads.items() if u.key == key]

    async def start_multipart(self, key: str, metadata: dict[str, str],
                              content_type: str) -> str:
        await asyncio.sleep(0)
        problem = header_problem(metadata, content_type)
        if problem:
            raise s3_error("create_multipart_upload", problem)
        self.started += 1
        upload_id = f"upload-{next(self._ids)}"
        self.uploads[upload_id] = Upload(key, {k.lower(): v for k, v in metadata.items()},
                                         content_type)
        return upload_id

    def _upload(self, operation: str, key: str, upload_id: str) -> Upload:
        upload = self.uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise s3_error(operation, "NoSuchUpload")
        return upload

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        await asyncio.sleep(0)
        upload = self._upload("upload_part", key, upload_id)
        if not 1 <= number <= 10000:
            raise s3_error("upload_part", "InvalidArgument")
        etag = f'"{hashlib.md5(body).hexdigest()}"'
        upload.parts[number] = (etag, bytes(body))
        return etag

    async def complete_multipart(self, key: str, upload_id: str,
                                 etags: builtins.list[str]) -> None:
        await asyncio.sleep(0)
        upload = self._upload("complete_multipart_upload", key, upload_id)
        parts = [upload.parts.get(number) for number in range(1, len(etags) + 1)]
        if not etags or any(p is None or p[0] != etag for p, etag in zip(parts, etags,
                                                                         strict=True)):
            raise s3_error("complete_multipart_upload", "InvalidPart")
        bodies = [p[1] for p in parts if p is not None]
        if any(len(body) < MIN_PART for body in bodies[:-1]):
            raise s3_error("complete_multipart_upload", "EntityTooSmall")
        self.objects[key] = Stored(b"".join(bodies), upload.metadata, upload.content_type)
        del self.uploads[upload_id]

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await asyncio.sleep(0)
        self._upload("abort_multipart_upload", key, upload_id)
        del self.uploads[upload_id]


def test_the_memory_store_follows_s3s_rules() -> None:
    """The stand-in itself, on what TransferStore relies on."""
    async def body() -> None:
        s3 = MemoryStore()
        for key in ("a/x/1", "a/x/2", "a/y", "a/é", "a/z/3", "b"):
            await s3.put(key, key.encode(), {"Created-Millis": "1"})
        objects, prefixes = await s3.list("a/", "/")
        assert [o["Key"] for o in objects] == ["a/y", "a/é"] and prefixes == ["a/x/", "a/z/"]
        assert (await s3.head("a/y") or {})["Metadata"] == {"created-millis": "1"}
        assert await s3.get_range("a/y", 1, 9) == b"/y" and await s3.get("nope") is None
        with pytest.raises(S3Error):
            await s3.get_range("a/y", 3, 1)
        with pytest.raises(S3Error):
            await s3.put("k", b"", {"name": "é"})
        assert await s3.delete_prefix("a/", keep="a/y") == 4 and sorted(s3.objects) == [
            "a/y", "b"]
        upload = await s3.start_multipart("f", {}, "text/plain")
        tags = [await s3.upload_part("f", upload, 1, b"small"),
                await s3.upload_part("f", upload, 2, b"last")]
        with pytest.raises(S3Error, match="EntityTooSmall"):
            await s3.complete_multipart("f", upload, tags)
        assert await s3.open_uploads("f") == [upload]
        await s3.abort_multipart("f", upload)
        with pytest.raises(S3Error, match="NoSuchUpload"):
            await s3.abort_multipart("f", upload)
        for i in range(PAGE + 5):
            await s3.put(f"p/{i:05d}", b"")
        assert len((await s3.list("p/", limit=3))[0]) == PAGE  # a whole page, as S3 gives
        assert len((await s3.list("p/"))[0]) == PAGE + 5

    asyncio.run(body())


# ------------------------------------------------------------------ the model

DEVICES = ("d1", "d2")
FILES = ("f1", "f2", "f3")
BAD_FILE_IDS = ("..", "a+b")
BAD_OFFSETS = ("-1", "+1", "1a", "", " 1", "1.0", "\u0663", "9" * 40)
BAD_SIZES = ("12x", "", "-1", "9" * 20)
NOW = 1_700_000_000_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Op(NamedTuple):
    """One step: `init`, `segment`, `all` (every segment of the file, shuffled, some twice),
    `fin`, `settle` (the daemon's pending discards) or `crash` (a multipart upload a killed
    bridge left open)."""

    kind: str
    device: str = "d1"
    file: str = "f1"
    variant: str = ""
    size: int = 0
    seed: int = 0
    n: int = 1  # init: how many segments the device cuts its file into; segment: which one


@dataclass(frozen=True)
class Sending:
    """What a transfer's device sends: the file of its latest init, cut into segments."""

    data: bytes
    chunk: int
    checksum: str  # what the init claims
    declared: int  # the size the init claims


@dataclass
class Transfer:
    """What S3 must hold for one transfer, and what its device sends."""

    state: Sending | str | None = None  # the init the bridge took, a refusal's code, or none
    staged: dict[int, bytes] = field(default_factory=dict)
    completed: bytes | None = None  # files/{device}/{file}
    sending: Sending = Sending(b"", 1, sha256(b""), 0)
    orphans: int | None = None  # segments taken with no init, once admitted (in process)


def malformed(variant: str, doc: dict[str, Any]) -> bytes | None:
    """An init `_parse_init` refuses, made from a valid one; None for a variant that is not
    one of these."""
    bad: dict[str, Any] = {
        "no_name": {k: v for k, v in doc.items() if k != "name"},
        "long_name": {**doc, "name": "é" * 128},  # 256 bytes
        "name_not_text": {**doc, "name": 7},
        "size_as_text": {**doc, "size": str(doc["size"])},
        "size_negative": {**doc, "size": -1},
        "size_bool": {**doc, "size": True},
        "size_float": {**doc, "size": float(doc["size"])},
        "checksum_short": {**doc, "checksum": doc["checksum"][:63]},
        "checksum_not_hex": {**doc, "checksum": "g" * 64},
        "content_type_empty": {**doc, "content_type": ""},
        "content_type_unicode": {**doc, "content_type": "tëxt/plain"},
        "user_data_huge_int": {**doc, "user_data": 2**70},
        "over_64k": {**doc, "user_data": "u" * INIT_MAX_BYTES},
    }
    raw = {"not_json": b"{not json", "not_utf8": b"\xff\xfe{}", "not_object": b"[1, 2]",
           "deep": b"[" * 100_000}
    if variant in raw:
        return raw[variant]
    return json.dumps(bad[variant]).encode() if variant in bad else None


MALFORMED = ("no_name", "long_name", "name_not_text", "size_as_text", "size_negative",
             "size_bool", "size_float", "checksum_short", "checksum_not_hex",
             "content_type_empty", "content_type_unicode", "user_data_huge_int", "over_64k",
             "not_json", "not_utf8", "not_object", "deep")
INIT_VARIANTS = ("valid",) * 8 + ("lying", "too_large") + MALFORMED
SEGMENT_VARIANTS = ("right",) * 4 + ("padded", "wrong", "empty", "shifted", "beyond",
                                     "bad_offset", "huge_offset", "too_big")
FIN_VARIANTS = ("right",) * 4 + ("padded", "wrong", "bad")
ALL_VARIANTS = ("right", "one_wrong", "one_missing")


def assembled(staged: dict[int, bytes], size: int) -> bytes | None:
    """The file staged segments make, each byte from the lowest offset that holds it; None
    when a byte is in no segment."""
    reach = 0
    for offset in sorted(staged):
        if offset > reach:
            return None
        reach = max(reach, offset + len(staged[offset]))
    if reach < size:
        return None
    file = bytearray(size)
    for offset in sorted(staged, reverse=True):  # lower offsets written last win
        file[offset:offset + len(staged[offset])] = staged[offset]
    return bytes(file)


class Model:
    """Runs operations against a TransferStore over a MemoryStore, predicting each verdict
    and checking S3's contents after each step. A refusal is followed by what the daemon
    does (bridge/files.py `_refuse`): `discard(device, file, rejected)` unless the code keeps
    staging or the refusal is known already; a completed fin by a plain `discard`. Both wait
    for a `settle` step, as the daemon waits for the dead letter or the reference to be in
    Kafka, so other steps can come between. (The daemon also passes `before`, so a
    newer transfer of the same file id taken meanwhile is spared; that has its own test.)"""

    def __init__(self, limits: TransferLimits) -> None:
        self.limits = limits
        self.s3 = MemoryStore()
        self.store = TransferStore(cast(ObjectStore, self.s3), limits)  # duck-typed
        self.transfers = {(d, f): Transfer() for d in DEVICES for f in FILES}
        self.pending: list[tuple[str, str, Rejected | None]] = []
        self.crashed: set[str] = set()  # uploads the `crash` steps opened
        self.clock = NOW
        self._data: dict[tuple[int, int], bytes] = {}

    async def run(self, ops: list[Op]) -> None:
        for op in ops:
            self.clock += 1
            await getattr(self, op.kind)(op)
            self.check_store()
        await self.settle(Op("settle"))
        self.check_store()

    def transfer(self, device: str, file: str) -> Transfer:
        """The model of a transfer; one with a bad file id never holds anything."""
        return self.transfers.get((device, file)) or Transfer()

    @staticmethod
    async def attempt(call: Any) -> Any:
        """The call's result or its Rejected; any other exception fails the test."""
        try:
            return await call
        except Rejected as rejected:
            return rejected

    def judge(self, op: Op, got: Any, want: str) -> bool:
        """Assert the predicted verdict ("ok" or a code); True when the call succeeded."""
        verdict = got.code if isinstance(got, Rejected) else "ok"
        event(f"{op.kind}: {verdict}")
        assert verdict == want, f"{op}: expected {want}, got {got!r}"
        if isinstance(got, Rejected):
            assert got.device_id == op.device
            if got.code not in _KEEPS_STAGING:
                self.pending.append((op.device, op.file, got))
        return verdict == "ok"

    # -- init

    def file_of(self, op: Op) -> bytes:
        key = (op.size, op.seed)
        if key not in self._data:
            self._data[key] = random.Random(op.seed).randbytes(op.size)
        return self._data[key]

    async def init(self, op: Op) -> None:
        data = self.file_of(op)
        checksum = sha256(data + b"!" if op.variant == "lying" else data)
        declared = self.limits.max_file_bytes + 1 if op.variant == "too_large" else len(data)
        doc: dict[str, Any] = {"name": f"naïve-{op.seed}.bin", "size": declared,
                               "checksum": checksum.upper() if op.seed % 2 else checksum}
        if op.seed % 3 == 0:
            doc |= {"content_type": "image/png", "user_data": {"seed": op.seed}}
        payload = malformed(op.variant, doc) or json.dumps(doc).encode()
        sending = Sending(data, max(1, -(-len(data) // op.n)), checksum, declared)
        want = self.init_verdict(op, declared)
        got = await self.attempt(self.store.init(op.device, op.file, payload, self.clock))
        t = self.transfer(op.device, op.file)
        t.sending = sending
        if self.judge(op, got, want):
            assert (got.size, got.checksum, got.created_millis) == (declared, checksum,
                                                                    self.clock)
            previous = t.state
            if isinstance(previous, str) or (isinstance(previous, Sending) and (
                    previous.declared, previous.checksum) != (declared, checksum)):
                t.staged = {}  # the id starts over: the earlier transfer's segments go
            t.state, t.orphans = sending, None

    def init_verdict(self, op: Op, declared: int) -> str:
        if FILE_ID.fullmatch(op.file) is None or op.variant in MALFORMED:
            return "bad_transfer_init"
        if declared > self.limits.max_file_bytes:
            return "file_too_large"
        return "too_many_transfers" if self.room_full(op.device, op.file) else "ok"

    def room_full(self, device: str, file: str) -> bool:
        """The device's other transfers alive: an init, or segments staged without one."""
        alive = [t for (d, f), t in self.transfers.items() if d == device and f != file and (
            isinstance(t.state, Sending) or (t.state is None and t.staged))]
        return len(alive) >= self.limits.max_transfers_per_device

    # -- segments

    def piece(self, sending: Sending, op: Op) -> tuple[str, bytes]:
        """The offset level and bytes of one segment the device sends, right or not."""
        data, chunk, rng = sending.data, sending.chunk, random.Random(op.seed)
        offset = min(op.n * chunk, len(data))
        piece = data[offset:offset + chunk]
        if op.variant == "padded":
            return f"000{offset}", piece
        if op.variant == "wrong" and piece:
            at = rng.randrange(len(piece))
            return str(offset), piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1:]
        if op.variant == "empty":
            return str(offset), b""
        if op.variant == "shifted":  # overlaps its neighbour, with the right bytes
            start = max(0, offset - rng.randint(1, chunk))
            return str(start), data[start:start + chunk]
        if op.variant == "beyond":
            piece = piece or b"x"
            return str(len(data) - len(piece) + rng.randint(1, 3)), piece
        if op.variant == "bad_offset":
            return rng.choice(BAD_OFFSETS), piece
        if op.variant == "huge_offset":
            return "9" * 19, b"x"
        if op.variant == "too_big":
            return str(offset), bytes(self.limits.max_segment_bytes + 1)
        return str(offset), piece

    async def segment(self, op: Op) -> None:
        offset, data = self.piece(self.transfer(op.device, op.file).sending, op)
        await self.send_segment(op, offset, data)

    async def all(self, op: Op) -> None:
        """Every segment of the file, shuffled, a few of them twice; `one_wrong`: the last
        one sent has a byte changed, `one_missing`: one is left out."""
        sending = self.transfer(op.device, op.file).sending
        rng = random.Random(op.seed)
        offsets = list(range(0, len(sending.data), sending.chunk)) or [0]
        if op.variant == "one_missing":
            offsets.remove(rng.choice(offsets))
        offsets += rng.sample(offsets, min(2, len(offsets)))
        rng.shuffle(offsets)
        for i, offset in enumerate(offsets):
            data = sending.data[offset:offset + sending.chunk]
            if op.variant == "one_wrong" and data and i == len(offsets) - 1:  # sent last
                data = bytes([data[0] ^ 1]) + data[1:]
            await self.send_segment(op, str(offset), data)

    async def send_segment(self, op: Op, offset_text: str, data: bytes) -> None:
        t = self.transfer(op.device, op.file)
        want, stores = self.segment_verdict(t, op.file, offset_text, data)
        got = await self.attempt(self.store.segment(op.device, op.file, offset_text, data,
                                                    self.clock))
        assert not isinstance(t.state, str) or isinstance(got, Rejected), \
            "a refused transfer takes no segment until a new init"
        if self.judge(op, got, want) and stores:
            t.staged[int(offset_text)] = data

    def segment_verdict(self, t: Transfer, file: str, offset_text: str,
                        data: bytes) -> tuple[str, bool]:
        """The verdict, and whether the bytes are staged."""
        if not (offset_text.isascii() and offset_text.isdigit() and len(offset_text) <= 19):
            return "bad_segment_offset", False
        if len(data) > self.limits.max_segment_bytes:
            return "segment_too_large", False
        if FILE_ID.fullmatch(file) is None or isinstance(t.state, str):
            return "unknown_transfer", False
        offset, end = int(offset_text), int(offset_text) + len(data)
        if isinstance(t.state, Sending):
            size = t.state.declared
            smallest = -(-size // self.limits.max_segments_per_file)
            if end > size:
                return "segment_beyond_size", False
            if 0 < len(data) < smallest and end != size:
                return "too_many_segments", False
        else:
            if t.completed is not None and t.completed[offset:end] == data and \
                    end <= len(t.completed):
                return "ok", False  # a redelivery after the file was assembled
            if end > self.limits.max_file_bytes:  # no init: within what one would allow
                return "segment_beyond_size", False
            if t.orphans is None:
                if self.room_full(self.device_of(t), file):
                    return "too_many_transfers", False
                t.orphans = 0
            t.orphans += 1
            if t.orphans > self.limits.max_segments_per_file:
                return "too_many_segments", False
        return "ok", bool(data)

    def device_of(self, t: Transfer) -> str:
        return next(d for (d, _), other in self.transfers.items() if other is t)

    # -- fin

    async def fin(self, op: Op) -> None:
        t = self.transfer(op.device, op.file)
        declared = t.sending.declared
        size_text = {"padded": f"0{declared}", "wrong": str(declared + 1),
                     "bad": BAD_SIZES[op.seed % len(BAD_SIZES)]}.get(op.variant, str(declared))
        want, file = self.fin_verdict(t, op.file, size_text)
        covered = isinstance(t.state, Sending) and size_text == str(t.state.declared) and \
            assembled(t.staged, t.state.declared) == t.state.data and \
            t.state.checksum == sha256(t.state.data) and \
            len(t.staged) <= self.limits.max_segments_per_file
        started = self.s3.started
        got = await self.attempt(self.store.finish(op.device, op.file, size_text, self.clock))
        if self.s3.started > started:
            event("fin: assembled in parts")
        assert not covered or isinstance(got, StoredFile), \
            "a fin over segments that cover the file with the right bytes succeeds"
        assert not isinstance(t.state, str) or isinstance(got, Rejected), \
            "a refused transfer is not finished until a new init"
        if not self.judge(op, got, want):
            return
        assert file is not None
        body = self.s3.objects[got.key].body
        assert body == file and (got.size, got.sha256) == (len(file), sha256(body))
        if isinstance(t.state, Sending):
            assert (got.size, got.sha256) == (t.state.declared, t.state.checksum)
        t.completed = body
        self.pending.append((op.device, op.file, None))  # clean-up once the envelope is in

    def fin_verdict(self, t: Transfer, file: str, size_text: str) -> tuple[str, bytes | None]:
        """The verdict, and the file a successful fin stores (or reports)."""
        if not (size_text.isascii() and size_text.isdigit() and len(size_text) <= 19):
            return "bad_transfer_fin", None
        size = int(size_text)
        if FILE_ID.fullmatch(file) is None or isinstance(t.state, str):
            return "unknown_transfer", None
        if t.state is None:  # no init: staged orphans, or a fin redelivered after clean-up
            if t.staged or t.completed is None:
                return "unknown_transfer", None
            return ("ok", t.completed) if size == len(t.completed) else ("size_mismatch", None)
        meta = t.state
        if size != meta.declared:
            return "size_mismatch", None
        if len(t.staged) > self.limits.max_segments_per_file:
            return "too_many_segments", None
        if any(offset + len(data) > size for offset, data in t.staged.items()):
            return "segment_beyond_size", None  # staged under an earlier, larger init
        whole = assembled(t.staged, size)
        if whole is None:
            return "missing_segments", None
        return ("ok", whole) if sha256(whole) == meta.checksum else ("checksum_mismatch", None)

    # -- what the daemon does after an outcome, and a crashed bridge

    async def settle(self, op: Op) -> None:
        pending, self.pending = self.pending, []
        for device, file, rejected in pending:
            t = self.transfer(device, file)
            if rejected is not None and self.store.known_refusal(device, file):
                assert isinstance(t.state, str) and not t.staged
                continue  # the daemon's `_refuse` leaves a transfer refused already alone
            if FILE_ID.fullmatch(file) is None:
                want = 0
            elif rejected is None:
                want = len(t.staged) + (t.state is not None)
                t.state = None
            else:
                want = len(t.staged)  # the init's place keeps the (first) refusal
                t.state = t.state if isinstance(t.state, str) else rejected.code
            t.staged = {}
            assert await self.store.discard(device, file, rejected) == want
            assert not await self.s3.open_uploads(f"files/{device}/{file}"), \
                "a discard leaves no upload open"

    async def crash(self, op: Op) -> None:
        if FILE_ID.fullmatch(op.file) is not None:
            self.crashed.add(await self.s3.start_multipart(
                f"files/{op.device}/{op.file}", {}, "application/octet-stream"))

    def check_store(self) -> None:
        """S3 holds exactly what the model says: every staged segment, each init or
        refusal, each assembled file, and no upload TransferStore opened."""
        assert set(self.s3.uploads) <= self.crashed, "TransferStore left an upload open"
        expected: dict[str, bytes | None] = {}  # None: an init or refusal, checked below
        for (device, file), t in self.transfers.items():
            prefix = f"staging/{device}/{file}/"
            expected |= {f"{prefix}seg/{offset:016d}": data for offset, data in t.staged.items()}
            if t.state is not None:
                expected[prefix + "init"] = None
                stored = json.loads(self.s3.objects[prefix + "init"].body)
                if isinstance(t.state, str):
                    assert stored["refused"]["code"] == t.state
                else:
                    assert (stored["size"], stored["checksum"]) == (t.state.declared,
                                                                    t.state.checksum)
            if t.completed is not None:
                expected[f"files/{device}/{file}"] = t.completed
        assert set(self.s3.objects) == set(expected)
        for key, body in expected.items():
            assert body is None or self.s3.objects[key].body == body, key


# ------------------------------------------------------------------ runs of the model

SEEDS = st.integers(0, 2**16)


def init_ops(device: st.SearchStrategy[str], file: st.SearchStrategy[str],
             sizes: st.SearchStrategy[int], pieces: st.SearchStrategy[int],
             variants: st.SearchStrategy[str]) -> st.SearchStrategy[Op]:
    return st.builds(Op, st.just("init"), device, file, variants, sizes, SEEDS, pieces)


def any_op(sizes: st.SearchStrategy[int], pieces: st.SearchStrategy[int]
           ) -> st.SearchStrategy[Op]:
    """Any step of any transfer, a bad file id now and then."""
    device = st.sampled_from(DEVICES)
    file = often(st.sampled_from(FILES), st.sampled_from(BAD_FILE_IDS))
    segment = st.builds(Op, st.just("segment"), device, file,
                        st.sampled_from(SEGMENT_VARIANTS), st.just(0), SEEDS, st.integers(0, 8))
    return st.one_of(
        init_ops(device, file, sizes, pieces, st.sampled_from(INIT_VARIANTS)), segment, segment,
        st.builds(Op, st.just("all"), device, file, st.sampled_from(ALL_VARIANTS), seed=SEEDS),
        st.builds(Op, st.just("fin"), device, file, st.sampled_from(FIN_VARIANTS), seed=SEEDS),
        st.just(Op("settle")), st.builds(Op, st.just("crash"), device, file))


@st.composite
def transfer_script(draw: st.DrawFn, sizes: st.SearchStrategy[int],
                    pieces: st.SearchStrategy[int]) -> list[Op]:
    """One device's attempt at one transfer: an init (mostly valid), its segments (all of
    them, or some, mostly right), a fin (mostly right)."""
    device = draw(often(st.just("d1"), st.sampled_from(DEVICES)))
    file = draw(st.sampled_from(FILES))
    init = draw(init_ops(st.just(device), st.just(file), sizes, pieces,
                         often(st.just("valid"), st.sampled_from(INIT_VARIANTS))))
    every = Op("all", device, file, draw(often(st.just("right"), st.sampled_from(ALL_VARIANTS))),
               seed=draw(SEEDS))
    some = st.lists(st.builds(Op, st.just("segment"), st.just(device), st.just(file),
                              often(st.just("right"), st.sampled_from(SEGMENT_VARIANTS)),
                              st.just(0), SEEDS, st.integers(0, init.n)), max_size=8)
    segments = draw(often(st.just([every]), some))
    fin = Op("fin", device, file, draw(often(st.just("right"), st.sampled_from(FIN_VARIANTS))))
    return [init, *segments, fin]


@st.composite
def interleavings(draw: st.DrawFn, sizes: st.SearchStrategy[int],
                  pieces: st.SearchStrategy[int], noise: int) -> list[Op]:
    """One to three transfer scripts and up to `noise` steps of anything, interleaved in
    any order that keeps each script's own."""
    scripts = draw(st.lists(transfer_script(sizes, pieces), min_size=1, max_size=3))
    scripts.append(draw(st.lists(any_op(sizes, pieces), max_size=noise)))
    total = sum(map(len, scripts))
    picks = draw(st.lists(st.integers(0, 3), min_size=total, max_size=total))
    merged: list[Op] = []
    for pick in picks:
        left = [s for s in scripts if s]
        merged.append(left[pick % len(left)].pop(0))
    return merged


SMALL = {"max_file_bytes": 4000, "max_segment_bytes": 1024, "max_transfers_per_device": 2,
         "fin_grace_seconds": 0, "part_bytes": MIN_PART}


def init(file: str = "f1", size: int = 3000, n: int = 3, variant: str = "valid",
         device: str = "d1") -> Op:
    return Op("init", device, file, variant, size, seed=size, n=n)


def steps(file: str = "f1", *kinds: str, device: str = "d1") -> list[Op]:
    """Steps of one transfer: `all`, `fin`, `settle` or `segment:<variant>:<index>`."""
    ops = []
    for kind in kinds:
        parts = kind.split(":")
        variant = parts[1] if len(parts) > 1 else "right"
        ops.append(Op(parts[0], device, file, variant, n=int(parts[2]) if len(parts) > 2 else 0))
    return ops


@settings(max_examples=80, deadline=None)
@given(ops=interleavings(st.integers(0, 3000), st.integers(1, 6), noise=15),
       most=st.sampled_from([3, 8, 10000]))
@example(ops=[init("f1"), init("f2"), init("f3"), *steps("f1", "all", "fin", "settle"),
              init("f3")], most=10000)  # too_many_transfers until one is done
@example(ops=[init("f1", variant="not_json"), Op("settle"), *steps("f1", "all", "fin"),
              init("f1"), *steps("f1", "all", "fin", "settle")], most=10000)  # refused, anew
@example(ops=[init("f1"), *steps("f1", "segment:beyond:2", "all", "fin", "settle", "all",
                                 "fin", "settle")], most=10000)  # a late refusal; redelivered
@example(ops=[init("f1", n=6), *steps("f1", "all", "segment:shifted:3", "fin")], most=3)
@example(ops=[init("f1", 0), *steps("f1", "segment:empty:0", "fin")], most=10000)
def test_small_transfers_in_any_interleaving_follow_the_model(ops: list[Op], most: int) -> None:
    asyncio.run(Model(TransferLimits(**SMALL, max_segments_per_file=most)).run(ops))


LARGE = TransferLimits(max_file_bytes=16 * MiB, max_segment_bytes=6 * MiB,
                       max_transfers_per_device=2, fin_grace_seconds=0, part_bytes=MIN_PART)


@settings(max_examples=4, deadline=None)
@given(ops=interleavings(st.integers(MIN_PART - 2, 12 * MiB), st.integers(2, 12), noise=3))
@example(ops=[init("f1", 12 * MiB, 12), Op("crash", "d1", "f1"),
              *steps("f1", "all", "fin", "settle", "fin")])  # in 3 parts; a crash's upload
@example(ops=[init("f1", 11 * MiB, 4), *steps("f1", "all:one_wrong", "fin", "settle")])
@example(ops=[init("f1", 6 * MiB, 2), *steps("f1", "all", "fin")])  # one PUT of 6 MiB
def test_large_transfers_assemble_in_parts_and_follow_the_model(ops: list[Op]) -> None:
    """Files of 5-12 MiB: assembled in 5 MiB parts, or in one PUT when the last segment
    brings the buffer past a part's size; an upload of a refused assembly is aborted."""
    asyncio.run(Model(LARGE).run(ops))


def init_of(data: bytes) -> bytes:
    return json.dumps({"name": "x", "size": len(data), "checksum": sha256(data)}).encode()


def test_the_clean_up_of_a_finished_transfer_spares_a_newer_one_of_the_same_file_id() -> None:
    """files._finish cleans up only after the reference is in Kafka; an init of the same
    file id taken meanwhile must keep its init and acked segments, and its fin must report
    the new file, not the earlier one."""
    async def body() -> str:
        store = TransferStore(cast(ObjectStore, MemoryStore()), TransferLimits(
            fin_grace_seconds=0))
        old, new = b"A" * 100, b"B" * 100
        await store.init("d1", "f1", init_of(old), NOW)
        await store.segment("d1", "f1", "0", old, NOW)
        await store.finish("d1", "f1", "100", NOW)  # its reference is on its way to Kafka
        await store.init("d1", "f1", init_of(new), NOW + 1)  # the device starts the next file
        await store.segment("d1", "f1", "0", new, NOW + 1)  # stored, so acked
        # The first fin's clean-up, once its reference is in, as files._finish makes it:
        await store.discard("d1", "f1", before=NOW)
        return (await store.finish("d1", "f1", "100", NOW + 2)).sha256

    assert asyncio.run(body()) == sha256(b"B" * 100)

# ------------------------------------------------------------------ the init parser

CHECKSUM = sha256(b"abc")
BASE = {"name": "report.bin", "size": 3, "checksum": CHECKSUM}


def parsed(payload: bytes) -> FileMeta | str:
    """The FileMeta, or the code of the refusal (which must name the device)."""
    try:
        return _parse_init(payload, NOW, "d1")
    except Rejected as refused:
        assert refused.device_id == "d1"
        return refused.code


def assert_faithful(meta: FileMeta, doc: Any) -> None:
    """An accepted init is a JSON object with the fields docs/file-transfer.md asks for,
    and the FileMeta says exactly what it said."""
    assert isinstance(doc, dict)
    name, size, checksum = doc["name"], doc["size"], doc["checksum"]
    assert isinstance(name, str) and 1 <= len(name.encode()) <= 255
    assert type(size) is int and size >= 0
    assert isinstance(checksum, str) and len(checksum) == 64 and int(checksum, 16) >= 0
    content_type = doc.get("content_type", "application/octet-stream")
    assert isinstance(content_type, str) and 1 <= len(content_type) <= 255
    assert content_type.isascii() and content_type.isprintable()
    assert meta == FileMeta(name, size, checksum.lower(), content_type, doc.get("user_data"),
                            NOW)


@pytest.mark.parametrize(("payload", "expected"), [
    (json.dumps(BASE).encode(), "ok"),
    (json.dumps({**BASE, "checksum": CHECKSUM.upper()}).encode(), "ok"),
    (json.dumps({**BASE, "size": 0, "name": "é" * 127 + "x"}).encode(), "ok"),  # 255 bytes
    (json.dumps({**BASE, "size": 10**30}).encode(), "ok"),  # file_too_large comes later
    (json.dumps({**BASE, "content_type": "~" * 255, "user_data": [{"a": None}]}).encode(),
     "ok"),
    (b'{"name": "x", "size": 3, "checksum": "' + CHECKSUM.encode() + b'", "user_data": NaN}',
     "ok"),
    (b"", "bad_transfer_init"),
    (b"\xef\xbb\xbf" + json.dumps(BASE).encode(), "ok"),  # json.loads skips a UTF-8 BOM
    (json.dumps(BASE).encode("utf-16"), "ok"),  # json.loads detects UTF-16 and UTF-32
    (json.dumps({**BASE, "size": 1e3}).encode(), "bad_transfer_init"),
    (json.dumps({**BASE, "size": "1" * 5000}).encode(), "bad_transfer_init"),
    (b'{"name": "x", "size": ' + b"1" * 5000 + b"}", "bad_transfer_init"),  # int digits limit
    (json.dumps({**BASE, "content_type": "a" * 256}).encode(), "bad_transfer_init"),
    (json.dumps({**BASE, "content_type": "text/plain\n"}).encode(), "bad_transfer_init"),
    (json.dumps({**BASE, "checksum": CHECKSUM + "\n"}).encode(), "bad_transfer_init"),
    (json.dumps({**BASE, "user_data": "\udc80"}).encode(), "bad_transfer_init"),
    (json.dumps({**BASE, "user_data": {"\ud800": 1}}).encode(), "bad_transfer_init"),
    (json.dumps({**BASE, "user_data": -(2**64)}).encode(), "bad_transfer_init"),
    (b'{"user_data": ' + b"[" * 900 + b"]" * 900 + b", " + json.dumps(BASE).encode()[1:],
     "ok"),  # deep, yet within what json and msgpack carry
    (b'{"user_data": ' + b"[" * 5000 + b"]" * 5000 + b", " + json.dumps(BASE).encode()[1:],
     "bad_transfer_init"),  # RecursionError
    *[(malformed(variant, {**BASE}), "bad_transfer_init") for variant in MALFORMED],
], ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else v)
def test_parse_init_accepts_what_the_docs_allow_and_refuses_the_rest(
        payload: bytes, expected: str) -> None:
    meta = parsed(payload)
    assert (meta if isinstance(meta, str) else "ok") == expected
    if isinstance(meta, FileMeta):
        assert_faithful(meta, json.loads(payload))


def test_an_init_whose_name_is_a_lone_surrogate_is_refused() -> None:
    payload = b'{"name": "\\ud800", "size": 3, "checksum": "' + CHECKSUM.encode() + b'"}'
    assert parsed(payload) == "bad_transfer_init"


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                        | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                        max_leaves=8)
HEX = often(st.text("0123456789abcdefABCDEF", min_size=64, max_size=64),
            st.text("0123456789abcdefABCDEF", min_size=63, max_size=65))
PRINTABLE = often(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                          max_size=255),
                  st.text(st.characters(min_codepoint=0x1F, max_codepoint=0x7F), max_size=257))
# Names here are text MQTT could carry; a lone surrogate has its own test above.
INIT_DOCS = often(
    st.fixed_dictionaries(
        {"name": often(st.text(SAFE, max_size=300), JSON),
         "size": often(st.integers(-1, 2**70), ANY_JSON),
         "checksum": often(HEX, ANY_JSON)},
        optional={"content_type": often(PRINTABLE, ANY_JSON), "user_data": ANY_JSON,
                  "extra": ANY_JSON}),
    JSON)


@settings(max_examples=150, deadline=None)
@given(doc=INIT_DOCS)
def test_parse_init_of_any_json_document_gives_a_faithful_meta_or_bad_transfer_init(
        doc: Any) -> None:
    meta = parsed(json.dumps(doc).encode())
    event("accepted" if isinstance(meta, FileMeta) else "refused")
    if isinstance(meta, FileMeta):
        assert_faithful(meta, doc)
    else:
        assert meta == "bad_transfer_init"


@st.composite
def init_bytes(draw: st.DrawFn) -> bytes:
    """Any bytes, or a valid init with bytes changed, cut short or added."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    raw = bytearray(json.dumps({**BASE, "content_type": "a/b", "user_data": [1]}).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        edit = draw(st.sampled_from(["change", "cut", "add"]))
        if edit == "change" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del raw[at:]
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


@settings(max_examples=200, deadline=None)
@given(payload=init_bytes())
def test_parse_init_of_any_bytes_gives_a_faithful_meta_or_bad_transfer_init(
        payload: bytes) -> None:
    meta = parsed(payload)
    event("accepted" if isinstance(meta, FileMeta) else "refused")
    if isinstance(meta, FileMeta):
        assert_faithful(meta, json.loads(payload))
    else:
        assert meta == "bad_transfer_init"
