"""File transfer against a real S3 (moto's server): assembly, sharing, refusals, clean-up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from bridge.config import S3Config
from bridge.devkit import localstack
from bridge.errors import Rejected
from bridge.s3 import ObjectStore, S3Error
from bridge.transfer import FileMeta, Refusal, StoredFile, TransferLimits, TransferStore

pytestmark = pytest.mark.integration

MiB = 1 << 20
FAST = TransferLimits(fin_grace_seconds=0.3, part_bytes=5 * MiB)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    service = localstack.s3_service(tmp_path_factory.mktemp("s3"))
    service.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", localstack.S3_KEY)
            env.setenv("AWS_SECRET_ACCESS_KEY", localstack.S3_KEY)
            localstack.create_bucket(service.endpoint_url, "transfers")
            store = ObjectStore(S3Config(bucket="transfers", endpoint_url=service.endpoint_url,
                                         region=localstack.S3_REGION))
            yield store
            store.close()
    finally:
        service.stop()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def ids() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"dev-{tag}", f"file-{tag}"


def now() -> int:
    return int(time.time() * 1000)


def init_payload(data: bytes, **extra: Any) -> bytes:
    return json.dumps({"name": "report.bin", "size": len(data),
                       "checksum": hashlib.sha256(data).hexdigest(), **extra}).encode()


async def send(transfers: TransferStore, device: str, file: str, data: bytes,
               segment: int, skip: frozenset[int] = frozenset()) -> None:
    await transfers.init(device, file, init_payload(data), now())
    for offset in range(0, len(data), segment):
        if offset not in skip:
            await transfers.segment(device, file, str(offset), data[offset:offset + segment])


def leftovers(s3: ObjectStore, device: str, file: str) -> dict[str, Any]:
    """What a transfer left: staging objects, the final object, open multipart uploads."""
    staging = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=f"staging/{device}/{file}/")
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=f"files/{device}/")
    final = run(s3.head(f"files/{device}/{file}"))
    return {"staging": [o["Key"] for o in staging.get("Contents", [])],
            "uploads": [u["Key"] for u in uploads.get("Uploads", [])], "final": final}


def assert_clean(s3: ObjectStore, device: str, file: str) -> None:
    assert leftovers(s3, device, file) == {"staging": [], "uploads": [], "final": None}


def refused(coro: Coroutine[Any, Any, Any]) -> Rejected:
    with pytest.raises(Rejected) as caught:
        run(coro)
    return caught.value


def test_shuffled_duplicated_segments_assemble_in_parts(s3: ObjectStore) -> None:
    device, file = ids()
    data = random.Random(1).randbytes(12 * MiB)
    transfers = TransferStore(s3, FAST)
    offsets = list(range(0, len(data), 256 << 10))
    sends = offsets + random.Random(2).sample(offsets, 10)
    random.Random(3).shuffle(sends)

    async def go() -> StoredFile:
        await transfers.init(device, file, init_payload(data, content_type="image/png",
                                                        user_data={"shot": 7}), now())
        for offset in sends:
            await transfers.segment(device, file, str(offset), data[offset:offset + (256 << 10)])
        return await transfers.finish(device, file, str(len(data)), now())

    stored = run(go())
    assert (stored.key, stored.size) == (f"files/{device}/{file}", len(data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.reference == f"s3://transfers/files/{device}/{file}"
    assert stored.meta.user_data == {"shot": 7}
    head = run(s3.head(stored.key))
    assert head is not None
    assert head["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["sha256"] == stored.sha256
    assert run(s3.get(stored.key)) == data
    assert run(transfers.discard(device, file)) == len(offsets) + 1  # + init
    assert leftovers(s3, device, file)["staging"] == []


def test_overlapping_segments_add_only_new_bytes(s3: ObjectStore) -> None:
    device, file = ids()
    data = bytes(range(200))
    transfers = TransferStore(s3, FAST)

    async def go() -> StoredFile:
        await transfers.init(device, file, init_payload(data), now())
        for start, end in [(50, 150), (0, 100), (60, 80), (150, 200), (120, 190)]:
            await transfers.segment(device, file, str(start), data[start:end])
        await transfers.segment(device, file, "7", b"")  # empty: allowed, stores nothing
        return await transfers.finish(device, file, "200", now())

    stored = run(go())
    assert run(s3.get(stored.key)) == data
    assert run(transfers.discard(device, file)) == 6


def test_two_bridges_share_one_transfer(s3: ObjectStore) -> None:
    device, file = ids()
    data = random.Random(4).randbytes(3 * MiB + 5)
    other_s3 = ObjectStore(S3Config(bucket=s3.bucket,
                                    endpoint_url=s3.client.meta.endpoint_url,
                                    region=localstack.S3_REGION))
    one, two = TransferStore(s3, FAST), TransferStore(other_s3, FAST)

    async def go() -> StoredFile:
        await one.init(device, file, init_payload(data), now())
        for index, offset in enumerate(range(0, len(data), MiB)):
            bridge = (one, two)[index % 2]
            await bridge.segment(device, file, str(offset), data[offset:offset + MiB])
        return await two.finish(device, file, str(len(data)), now())

    try:
        stored = run(go())
    finally:
        other_s3.close()
    assert run(s3.get(stored.key)) == data
    run(one.discard(device, file))


def test_redelivered_fin_after_discard_returns_the_same_file(s3: ObjectStore) -> None:
    device, file = ids()
    data = b"hello file transfer"
    transfers, fresh = TransferStore(s3, FAST), TransferStore(s3, FAST)

    async def go() -> tuple[StoredFile, StoredFile, StoredFile]:
        await transfers.init(device, file, init_payload(data, name="naïve résumé.txt",
                                                        content_type="text/plain",
                                                        user_data=[1, "two"]), now())
        await transfers.segment(device, file, "0", data)
        first = await transfers.finish(device, file, str(len(data)), now())
        again = await transfers.finish(device, file, str(len(data)), now())  # before clean-up
        await transfers.discard(device, file)
        await transfers.segment(device, file, "0", data)  # a late redelivery: ignored
        return first, again, await fresh.finish(device, file, str(len(data)), now())

    first, again, after = run(go())
    assert first == again == after
    assert after.meta.name == "naïve résumé.txt"
    assert leftovers(s3, device, file)["staging"] == []
    size_mismatch = refused(fresh.finish(device, file, str(len(data) + 1), now()))
    assert size_mismatch.code == "size_mismatch"


def test_new_data_for_a_completed_file_id_is_staged_never_reported_as_the_old_file(
        s3: ObjectStore) -> None:
    """A file id used again without a (successful) init: its segments are new bytes, so they
    are stored, and its fin is refused; it never yields the old file's reference."""
    device, file = ids()
    old, new = b"the first file", b"another file!!"
    transfers = TransferStore(s3, FAST)

    async def go() -> Rejected:
        await transfers.init(device, file, init_payload(old), now())
        await transfers.segment(device, file, "0", old)
        await transfers.finish(device, file, str(len(old)), now())
        await transfers.discard(device, file)
        await transfers.segment(device, file, "0", new)  # differs from what files/ holds
        with pytest.raises(Rejected) as caught:
            await transfers.finish(device, file, str(len(new)), now())
        return caught.value

    error = run(go())
    assert error.code == "unknown_transfer"
    assert "init never arrived" in error.reason
    assert leftovers(s3, device, file)["staging"] == [f"staging/{device}/{file}/seg/{0:016d}"]
    run(transfers.discard(device, file, error))
    assert refused(transfers.segment(device, file, "0", new)).code == "unknown_transfer"
    assert run(s3.get(f"files/{device}/{file}")) == old


def test_a_refused_transfer_is_refused_by_every_bridge_until_a_new_init(s3: ObjectStore) -> None:
    device, file = ids()
    one, two = TransferStore(s3, FAST), TransferStore(s3, FAST)
    bad = refused(one.init(device, file, b"{not json", now()))
    assert bad.code == "bad_transfer_init"
    run(one.discard(device, file, bad))  # what the daemon does once the dead letter is in
    later = refused(two.segment(device, file, "0", b"abc"))
    assert later.code == "unknown_transfer"
    assert "bad_transfer_init" in later.reason
    assert refused(two.finish(device, file, "3", now())).code == "unknown_transfer"
    assert leftovers(s3, device, file)["staging"] == [f"staging/{device}/{file}/init"]
    # A second refusal keeps the first reason; a new init starts the id over.
    run(two.discard(device, file, later))
    assert "bad_transfer_init" in refused(one.segment(device, file, "0", b"abc")).reason
    run(two.init(device, file, init_payload(b"abc"), now()))
    run(one.segment(device, file, "0", b"abc"))  # the cached refusal is read again first
    assert run(one.finish(device, file, "3", now())).size == 3
    run(one.discard(device, file))


def test_a_file_may_come_in_at_most_max_segments_per_file(s3: ObjectStore) -> None:
    device, file = ids()
    limits = TransferLimits(max_segments_per_file=4, fin_grace_seconds=0.2, part_bytes=5 * MiB)
    transfers = TransferStore(s3, limits)
    data = bytes(range(100))
    run(transfers.init(device, file, init_payload(data), now()))
    small = refused(transfers.segment(device, file, "0", data[:10]))
    assert small.code == "too_many_segments"
    assert "at least 25 bytes" in small.reason
    for offset in (0, 25, 50):
        run(transfers.segment(device, file, str(offset), data[offset:offset + 25]))
    run(transfers.segment(device, file, "75", data[75:]))  # the last may be any size
    run(transfers.segment(device, file, "99", data[99:]))  # ends the file: allowed too
    staged = refused(transfers.finish(device, file, "100", now()))  # 5 objects staged
    assert staged.code == "too_many_segments"
    run(transfers.discard(device, file))
    assert_clean(s3, device, file)


def test_an_upload_a_crash_left_open_is_aborted_when_the_file_is_assembled(
        s3: ObjectStore) -> None:
    device, file = ids()
    data = random.Random(7).randbytes(6 * MiB)
    transfers = TransferStore(s3, FAST)
    run(send(transfers, device, file, data, MiB))
    # A bridge killed during assembly: its multipart upload stays open, its id known nowhere.
    left = run(s3.start_multipart(f"files/{device}/{file}", {}, "application/octet-stream"))
    stored = run(transfers.finish(device, file, str(len(data)), now()))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert leftovers(s3, device, file)["uploads"] == []
    assert left not in run(s3.open_uploads(f"files/{device}/{file}"))
    run(transfers.discard(device, file))


def test_zero_byte_file(s3: ObjectStore) -> None:
    device, file = ids()
    transfers = TransferStore(s3, FAST)

    async def go() -> StoredFile:
        await transfers.init(device, file, init_payload(b""), now())
        await transfers.segment(device, file, "0", b"")
        return await transfers.finish(device, file, "0", now())

    stored = run(go())
    assert (stored.size, stored.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert run(s3.get(stored.key)) == b""
    assert run(transfers.discard(device, file)) == 1


@pytest.mark.parametrize(("payload", "code"), [
    (b"not json", "bad_transfer_init"),
    (b"\xff\xfe", "bad_transfer_init"),
    (b"[1, 2]", "bad_transfer_init"),
    (b'{"size": 3, "checksum": "' + b"a" * 64 + b'"}', "bad_transfer_init"),
    (b'{"name": "x", "size": "3", "checksum": "' + b"a" * 64 + b'"}', "bad_transfer_init"),
    (b'{"name": "x", "size": true, "checksum": "' + b"a" * 64 + b'"}', "bad_transfer_init"),
    (b'{"name": "x", "size": -1, "checksum": "' + b"a" * 64 + b'"}', "bad_transfer_init"),
    (b'{"name": "x", "size": 3, "checksum": "' + b"a" * 63 + b'"}', "bad_transfer_init"),
    (b'{"name": "x", "size": 3, "checksum": "' + b"g" * 64 + b'"}', "bad_transfer_init"),
    (b'{"name": "x", "size": 3, "checksum": "' + b"a" * 64 + b'", "content_type": 5}',
     "bad_transfer_init"),
    (b'{"name": "x", "size": 1025, "checksum": "' + b"a" * 64 + b'"}', "file_too_large"),
    (b"[" * 100_000, "bad_transfer_init"),  # RecursionError in the parser
    (b'{"name": "x", "size": 3, "checksum": "' + b"a" * 64 + b'", "user_data": '
     + str(2**70).encode() + b"}", "bad_transfer_init"),  # msgpack cannot carry it
    (b'{"name": "x", "size": 3, "checksum": "' + b"a" * 64 + b'", "user_data": "'
     + b"u" * 70_000 + b'"}', "bad_transfer_init"),  # an init is metadata, not a payload
])
def test_init_refusals_write_nothing(s3: ObjectStore, payload: bytes, code: str) -> None:
    device, file = ids()
    transfers = TransferStore(s3, TransferLimits(max_file_bytes=1024))
    error = refused(transfers.init(device, file, payload, now()))
    assert (error.code, error.device_id) == (code, device)
    assert_clean(s3, device, file)


def test_init_refuses_a_bad_file_id(s3: ObjectStore) -> None:
    device, _ = ids()
    transfers = TransferStore(s3, FAST)
    for file in ["..", "", "a+b", "x" * 129]:
        assert refused(transfers.init(device, file, init_payload(b"x"), now())).code == \
            "bad_transfer_init"


def test_too_many_transfers(s3: ObjectStore) -> None:
    device, _ = ids()
    limits = TransferLimits(max_transfers_per_device=2, expiry_seconds=60)
    transfers = TransferStore(s3, limits)
    payload = init_payload(b"abc")

    async def go() -> None:
        await transfers.init(device, "old", payload, now() - 61_000)  # expired: not counted
        await transfers.init(device, "a", payload, now())
        await transfers.init(device, "b", payload, now())
        await transfers.init(device, "a", payload, now())  # a redelivered init is fine

    run(go())
    error = refused(transfers.init(device, "c", payload, now()))
    assert error.code == "too_many_transfers"
    run(transfers.discard(device, "a"))
    run(transfers.init(device, "c", payload, now()))
    for file in ("old", "b", "c"):
        run(transfers.discard(device, file))
    assert_clean(s3, device, "c")


def test_segment_refusals(s3: ObjectStore) -> None:
    device, file = ids()
    limits = TransferLimits(max_segment_bytes=10, expiry_seconds=60)
    transfers = TransferStore(s3, limits)
    run(transfers.init(device, file, init_payload(b"0123456789" * 3), now()))

    def code(offset: str, data: bytes, when: int | None = None) -> str:
        return refused(transfers.segment(device, file, offset, data, when)).code

    for offset in ["-1", "+1", "1a", " 1", "", "1.0", "\u0663", "9" * 40]:
        assert code(offset, b"x") == "bad_segment_offset", offset
    assert code("0", b"x" * 11) == "segment_too_large"
    assert code("25", b"x" * 6) == "segment_beyond_size"
    assert code("31", b"") == "segment_beyond_size"
    assert code("0", b"x", now() + 61_000) == "transfer_expired"
    assert refused(transfers.segment(device, "..", "0", b"x")).code == "unknown_transfer"
    assert refused(TransferStore(s3, limits).segment(device, file, "0", b"x", now() + 61_000)
                   ).code == "transfer_expired"  # also when the init is not cached
    assert run(transfers.discard(device, file)) == 1
    assert_clean(s3, device, file)
    # No init (yet): the segment is staged at once, never waited on; its fin decides.
    run(transfers.segment(device, "never-inited", "0", b"x"))
    assert leftovers(s3, device, "never-inited")["staging"] == [
        f"staging/{device}/never-inited/seg/{0:016d}"]
    run(transfers.discard(device, "never-inited"))


@pytest.mark.parametrize(("case", "code"), [
    ("bad_fin", "bad_transfer_fin"),
    ("size_mismatch", "size_mismatch"),
    ("expired", "transfer_expired"),
    ("missing", "missing_segments"),
    ("checksum", "checksum_mismatch"),
    ("checksum_multipart", "checksum_mismatch"),
    ("unknown", "unknown_transfer"),
    ("orphans", "unknown_transfer"),
])
def test_finish_refusals_leave_nothing_after_discard(s3: ObjectStore, case: str,
                                                     code: str) -> None:
    device, file = ids()
    transfers = TransferStore(s3, TransferLimits(fin_grace_seconds=0.3, part_bytes=5 * MiB,
                                                 expiry_seconds=60))
    data = random.Random(5).randbytes(6 * MiB if case == "checksum_multipart" else 3000)
    segment = 1000 if len(data) == 3000 else MiB

    async def prepare() -> None:
        if case == "unknown":
            return
        if case == "orphans":  # segments staged, the init never comes: waits out the grace
            await transfers.segment(device, file, "0", data[:1000])
            return
        await send(transfers, device, file, data, segment,
                   skip=frozenset({1000}) if case == "missing" else frozenset())
        if case.startswith("checksum"):  # same length, different bytes
            await transfers.segment(device, file, "0", bytes(segment))

    run(prepare())
    size, when = str(len(data)), now()
    if case == "bad_fin":
        size = "12x"
    elif case == "size_mismatch":
        size = str(len(data) - 1)
    elif case == "expired":
        when += 61_000
    started = time.monotonic()
    error = refused(transfers.finish(device, file, size, when))
    assert (error.code, error.device_id) == (code, device)
    if case in ("missing", "orphans"):
        assert "bytes 1000..2000 of 3000" in error.reason or case == "orphans"
        assert 0.3 <= time.monotonic() - started < 2
    if case != "unknown":  # refusing deletes nothing: the daemon dead-letters first
        assert leftovers(s3, device, file)["staging"]
    run(transfers.discard(device, file))
    assert_clean(s3, device, file)


class BrokenStore(ObjectStore):
    """Fails to complete and to abort a multipart upload: a finish that crashes half-way."""

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        raise S3Error("complete_multipart: connection reset")

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        raise S3Error("abort_multipart: connection reset")


def test_s3_errors_propagate_and_discard_aborts_the_open_upload(s3: ObjectStore) -> None:
    device, file = ids()
    data = random.Random(6).randbytes(6 * MiB)
    broken = BrokenStore(S3Config(bucket=s3.bucket, endpoint_url=s3.client.meta.endpoint_url,
                                  region=localstack.S3_REGION))
    try:
        transfers = TransferStore(broken, FAST)
        run(send(transfers, device, file, data, MiB))
        with pytest.raises(S3Error):
            run(transfers.finish(device, file, str(len(data)), now()))
    finally:
        broken.close()
    assert len(leftovers(s3, device, file)["uploads"]) == 1
    assert run(TransferStore(s3, FAST).discard(device, file)) == 7  # init, 6 segments
    assert_clean(s3, device, file)


def test_expired_finds_old_transfers_and_orphans(s3: ObjectStore) -> None:
    device, file = ids()
    transfers = TransferStore(s3, TransferLimits(expiry_seconds=60))
    run(transfers.init(device, file, init_payload(b"abc"), now()))
    run(transfers.segment(device, file, "0", b"a"))
    # a bridge whose cached init outlived a discard wrote a segment without an init
    run(s3.put(f"staging/{device}/orphan/seg/{0:016d}", b"late"))

    refusal = Rejected("file_too_large", "too big", device)
    run(transfers.discard(device, "refused", refusal))

    def mine(when: int) -> dict[str, FileMeta | Refusal | None]:
        return {f: meta for d, f, meta in run(transfers.expired(when)) if d == device}

    assert mine(now()) == {}
    found = mine(now() + 61_000)
    assert set(found) == {file, "orphan", "refused"}
    assert found["orphan"] is None
    assert isinstance(found["refused"], Refusal) and found["refused"].code == "file_too_large"
    meta = found[file]
    assert meta is not None
    assert (meta.name, meta.size) == ("report.bin", 3)
    for expired_file in found:
        run(transfers.discard(device, expired_file))
    assert mine(now() + 61_000) == {}
    assert_clean(s3, device, file)
