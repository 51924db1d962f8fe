"""File transfer over MQTT: the stage between the fat lane's session and the S3 store.

Topics (docs/file-transfer.md), under `[file_transfer].prefix`:

    PREFIX/{file_id}/init          JSON {name, size, checksum, content_type?, user_data?}
    PREFIX/{file_id}/{offset}      one segment's bytes
    PREFIX/{file_id}/fin/{size}    empty: the file is complete

An init or a segment is acked once it is stored in S3. A fin is acked once the file is
assembled and verified, its reference envelope is in Kafka and the staging data is gone.
Any refusal is a dead-letter record first, then the transfer's staging data is removed, then
the ack: nothing is redelivered forever and nothing vanishes. All state is in S3 (see
`bridge/transfer.py`), so any bridge of a shared subscription can take any message. With
`respond`, each fin's outcome, once durable, is also published to the device
(`bridge/results.py`); PREFIX/{file_id}/result is that answer, never transfer input.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from bridge import auth, envelope
from bridge.config import Config, FileTransferConfig
from bridge.errors import Rejected
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics, mark_dead_lettered
from bridge.pipeline import Job, Origin, Pipeline
from bridge.results import ANSWER_MARK, RESULT_LEVEL, Publish, Results
from bridge.routing import DEVICE_ID, checked_device_id
from bridge.s3 import ObjectStore, retrying
from bridge.transfer import Refusal, StoredFile, TransferLimits, TransferStore

if TYPE_CHECKING:
    from bridge.settle import JobPool

log = structlog.get_logger("bridge.files")
ROUTE_NAME = "file_transfer"  # what lineage calls these messages


class FileTransfers:
    """Handles the file-transfer messages of one config; `handle` runs as a job of the fat
    lane's pool, and lends its slot out whenever it waits for something else."""

    def __init__(self, config: Config, settings: FileTransferConfig, pipeline: Pipeline,
                 objects: ObjectStore, metrics: Metrics, pool: JobPool,
                 publish: Publish | None = None) -> None:
        self.settings, self.pipeline, self.metrics, self.pool = settings, pipeline, metrics, pool
        self.store = TransferStore(objects, TransferLimits(
            max_file_bytes=settings.max_file_bytes, max_segment_bytes=settings.max_segment_bytes,
            max_transfers_per_device=settings.max_transfers_per_device,
            expiry_seconds=settings.expiry_seconds, fin_grace_seconds=settings.fin_grace_seconds,
            max_segments_per_file=settings.max_segments_per_file), idle=pool.idle,
            assembling=self._assembling,
            stage_orphans=any(b.share_group for b in config.brokers))
        # A quarter of the lane's slots may assemble at once (two by default): each holds
        # about 21 MiB (two 8 MiB parts and prefetched segments) that no payload counts.
        self._assemblies = asyncio.Semaphore(max(1, pool.slots // 4))
        self.registry = config.registry
        self.lineage = envelope.Lineage(config.bridge.instance, ROUTE_NAME, config.version)
        self._depth = len(settings.filter.pattern.split("/")) - 1  # levels before the `#`
        # `respond`: each fin's outcome, once durable, published to the device
        self.results = Results(self._depth, publish, metrics) \
            if settings.respond and publish is not None else None
        # Steps in flight in this process, per transfer. The broker acks a device's init at
        # once, so its segments can reach us while the init is still being stored: segments
        # wait for the init, and a fin for both.
        self._inits: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._in_flight: dict[tuple[str, str], set[asyncio.Future[None]]] = defaultdict(set)
        # One init of a device at a time here, so concurrent inits cannot pass the
        # per-device transfer limit together (check, then act).
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()
        self._active: dict[tuple[str, str], float] = {}  # transfer -> when its init came

    def takes(self, topic: str) -> bool:
        return self.settings.filter.match(topic) is not None

    def device_of(self, topic: str) -> str:
        """The topic's device id when it is a safe one, else ""."""
        device_id = (self.settings.filter.match(topic) or {}).get("device_id", "")
        return device_id if DEVICE_ID.fullmatch(device_id) else ""

    def subscription(self) -> str:
        return self.settings.filter.subscription

    async def handle(self, message: Message, on_durable: Callable[[], None] | None) -> None:
        """One init, segment or fin, through to its ack. S3 trouble is retried meanwhile.
        Later messages of a transfer wait for an init in flight here until its outcome,
        refusal included, is recorded."""
        bound = self.settings.filter.match(message.topic) or {}
        rest = message.topic.split("/")[self._depth:]
        if rest == [RESULT_LEVEL] and ANSWER_MARK in message.user_properties:
            # A bridge's answer to a device (this bridge hears its own and its replicas',
            # as it subscribes to the prefix): acked without a record. Unmarked, it is a
            # device writing where it should only read: a dead letter (see _handle).
            self.metrics.inc("file_results_ignored")
            if on_durable is not None:
                on_durable()
            return
        if rest != ["init"]:
            try:
                await self._handle(message, on_durable, bound)
            except Exception:
                if rest[:1] == ["fin"]:  # it ends as an internal_error: the transfer is over
                    self._ended((bound.get("device_id", ""), bound.get("file_id", "")))
                raise
            return
        key = (bound.get("device_id", ""), bound.get("file_id", ""))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inits[key] = done
        try:
            await self._handle(message, on_durable, bound)
        finally:
            done.set_result(None)
            if self._inits.get(key) is done:
                del self._inits[key]

    async def _handle(self, message: Message, on_durable: Callable[[], None] | None,
                      bound: dict[str, str]) -> None:
        device_id, file_id = "", ""
        try:
            device_id = checked_device_id(bound.get("device_id", ""))
            file_id = bound.get("file_id", "")
            self._authenticate(device_id, message)
            rest = message.topic.split("/")[self._depth:]
            if rest == ["init"]:
                await self._init(device_id, file_id, message)
            elif len(rest) == 2 and rest[0] == "fin":
                await self._finish(message, device_id, file_id, rest[1], on_durable)
                return
            elif rest == ["fin"]:
                raise Rejected("bad_transfer_fin", "a fin names the file's size: "
                               ".../{file_id}/fin/{size}", device_id)
            elif rest == [RESULT_LEVEL]:
                raise Rejected("bad_transfer_topic", f".../{{file_id}}/{RESULT_LEVEL} is where "
                               "the bridge answers a transfer: a device reads it, it does not "
                               "write it", device_id)
            elif len(rest) == 1:
                await self._segment(device_id, file_id, rest[0], message.payload)
            else:
                raise Rejected("bad_transfer_topic", "expected .../{file_id}/init, "
                               ".../{file_id}/{offset} or .../{file_id}/fin/{size}", device_id)
        except Rejected as rejected:
            await self._refuse(message, rejected.device_id or device_id, file_id, rejected,
                               on_durable)
            return
        if on_durable is not None:
            on_durable()

    def _authenticate(self, device_id: str, message: Message) -> None:
        device = self.registry.admit(self.settings.auth, device_id)
        if device is not None and self.settings.auth == "hmac":
            assert device.hmac_key is not None  # admit() refuses hmac without a key
            auth.verify(device.hmac_key, device_id, message.topic, message.payload,
                        message.user_properties)

    async def _init(self, device_id: str, file_id: str, message: Message) -> None:
        async with self._device_lock(device_id):
            await self._retrying(lambda: self.store.init(
                device_id, file_id, message.payload, message.arrival_millis))
        self.metrics.inc("file_inits")
        self._active[(device_id, file_id)] = time.monotonic()
        self._count_active()

    def _ended(self, key: tuple[str, str]) -> None:
        """The transfer is over here (finished, refused or crashed at its fin)."""
        self._active.pop(key, None)
        self._count_active()

    def _count_active(self) -> None:
        """Transfers begun here and not yet finished or refused here (in a share group
        another bridge may finish one: it leaves at its expiry, see `sweep`)."""
        self.metrics.set("file_transfers_active", len(self._active))

    @contextlib.asynccontextmanager
    async def _assembling(self) -> AsyncIterator[None]:
        """An assembly's turn; the wait for it lends the job's slot out."""
        if self._assemblies.locked():
            async with self.pool.idle():
                await self._assemblies.acquire()
        else:
            await self._assemblies.acquire()
        try:
            yield
        finally:
            self._assemblies.release()

    @contextlib.asynccontextmanager
    async def _device_lock(self, device_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(device_id, asyncio.Lock())
        self._lock_users[device_id] += 1
        try:
            if lock.locked():
                async with self.pool.idle():
                    await lock.acquire()
            else:
                await lock.acquire()
            try:
                yield
            finally:
                lock.release()
        finally:
            self._lock_users[device_id] -= 1
            if not self._lock_users[device_id]:
                del self._lock_users[device_id], self._locks[device_id]

    async def _segment(self, device_id: str, file_id: str, offset: str, data: bytes) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._in_flight[(device_id, file_id)]
        waiting.add(done)
        try:
            init = self._inits.get((device_id, file_id))
            if init is not None:
                async with self.pool.idle():
                    await asyncio.shield(init)
            await self._retrying(lambda: self.store.segment(device_id, file_id, offset, data))
            self.metrics.inc("file_segments")
        finally:
            done.set_result(None)
            waiting.discard(done)
            if not waiting:
                self._in_flight.pop((device_id, file_id), None)

    async def _finish(self, message: Message, device_id: str, file_id: str, size: str,
                      on_durable: Callable[[], None] | None) -> None:
        key = (device_id, file_id)
        async with self.pool.idle():  # the init and segments still being stored here
            init = self._inits.get(key)
            if init is not None:
                await asyncio.shield(init)
            waiting = list(self._in_flight.get(key, ()))
            if waiting:
                await asyncio.gather(*(asyncio.shield(w) for w in waiting))
        log.info("file_assembling", device_id=device_id, file_id=file_id, size=size[:20])
        stored = await self._retrying(lambda: self.store.finish(
            device_id, file_id, size, message.arrival_millis))
        refused = await self._durably(self._reference(message, device_id, file_id, stored))
        await self._clean_up(device_id, file_id, before=stored.meta.created_millis)
        self._ended(key)
        if refused is not None:  # Kafka refused the reference: its dead letter went instead
            mark_dead_lettered(on_durable, refused)
            self.metrics.inc("file_transfers_failed")
        else:
            self.metrics.inc("file_transfers_completed")
            log.info("file_completed", device_id=device_id, file_id=file_id, size=stored.size,
                     reference=stored.reference)
        if self.results is not None:
            if refused is None:
                self.results.ok(message, file_id, stored)
            else:
                self.results.failed(message, file_id, refused, "Kafka refused the reference "
                                    "envelope; its dead letter went in its place")
        if on_durable is not None:
            on_durable()

    def _reference(self, message: Message, device_id: str, file_id: str,
                   stored: StoredFile) -> Delivery:
        meta = stored.meta
        value = envelope.encode_reference(
            message, device_id, self.lineage, meta.content_type, stored.reference, stored.size,
            stored.sha256, {"id": file_id, "name": meta.name, "user_data": meta.user_data})
        origin = Origin(message, device_id, self.lineage, stored.reference, stored.sha256,
                        stored.size)
        return Delivery(self.settings.kafka_topic, device_id.encode(), value,
                        envelope.headers(message, device_id, self.lineage), None,
                        self.pipeline.rejected_by_kafka, origin, self.pipeline.fat_sink)

    async def _refuse(self, message: Message, device_id: str, file_id: str, rejected: Rejected,
                      on_durable: Callable[[], None] | None) -> None:
        """Dead letter first, then the transfer's staging data goes (its refusal stays in
        place of its init, so every bridge refuses its later messages at once), then the
        ack."""
        await self._durably(self.pipeline.refuse(message, device_id, self.lineage, rejected,
                                                  None))
        mark_dead_lettered(on_durable, rejected.code)
        answer = self._answer_refused(message, device_id, file_id, rejected)
        if device_id and file_id and rejected.code not in _KEEPS_STAGING and \
                not self.store.known_refusal(device_id, file_id):
            await self._clean_up(device_id, file_id, rejected, message.arrival_millis)
            self._ended((device_id, file_id))
        self.metrics.inc("file_transfers_failed")
        if answer is not None:
            answer()
        if on_durable is not None:
            on_durable()

    def _answer_refused(self, message: Message, device_id: str, file_id: str,
                        rejected: Rejected) -> Callable[[], None] | None:
        """How to tell the device its fin was refused, if it is a fin with a device to tell.
        A transfer refused before its fin answers with that first refusal (the fin's own
        dead letter is `unknown_transfer`, naming it); read now, before the clean-up."""
        results = self.results
        if results is None or not self.device_of(message.topic) or \
                message.topic.split("/")[self._depth:][:1] != ["fin"]:
            return None
        first = self.store.refusal(device_id, file_id) \
            if rejected.code == "unknown_transfer" else None
        code, reason = (first.code, first.reason) if first else (rejected.code, rejected.reason)
        return lambda: results.failed(message, file_id, code, reason)

    async def _clean_up(self, device_id: str, file_id: str, refusal: Rejected | None = None,
                        before: int | None = None) -> None:
        """Remove staging data once the outcome is durable, unless a newer transfer reuses
        the file id by now. A failure here is logged, not raised: the outcome stands, and
        leftovers expire (sweeper, bucket lifecycle)."""
        try:
            await self._retrying(lambda: self.store.discard(device_id, file_id, refusal,
                                                            before))
        except Exception as exc:
            log.error("file_cleanup_failed", device_id=device_id, file_id=file_id,
                      error=repr(exc)[:500], why="staging data stays until it expires")

    async def sweep(self, now_millis: int) -> int:
        """Dead-letter and remove transfers past their expiry (run now and then); old
        refusals are removed quietly, their dead letters went out when they were made."""
        horizon = time.monotonic() - self.settings.expiry_seconds
        for key in [k for k, started in self._active.items() if started < horizon]:
            del self._active[key]
        self._count_active()
        expired = await self._retrying(lambda: self.store.expired(now_millis))
        for device_id, file_id, state in expired:
            async with self.pool.slot():
                if isinstance(state, Refusal):
                    await self._clean_up(device_id, file_id, before=state.created_millis)
                    continue
                topic = self.settings.filter.pattern.split("{file_id}")[0].replace(
                    "{device_id}", device_id) + f"{file_id}/init"
                stand_in = Message("", topic, b"", 0, False, False, now_millis)
                age = "" if state is None else \
                    f" (started {(now_millis - state.created_millis) / 1000:.0f} s ago)"
                await self._refuse(stand_in, device_id, file_id, Rejected(
                    "transfer_expired", f"not finished within "
                    f"{self.settings.expiry_seconds:.0f} s{age}", device_id), None)
        return len(expired)

    async def _durably(self, outcome: Delivery | Job) -> str | None:
        """Produce and wait for the delivery report (acks=all); the wait lends the slot.
        Returns the dead-letter code when Kafka refused the record and its dead letter went
        in its place."""
        while isinstance(outcome, Job):
            result = await outcome.run()
            assert result is not None  # a pipeline's jobs end in a Delivery
            outcome = result
        delivery = outcome
        durable = _Durable()
        delivery.on_durable = durable
        sink = delivery.sink
        assert sink is not None
        await sink.send(delivery)
        async with self.pool.idle():
            await durable.future
        return durable.code

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await retrying(call, self.metrics)


class _Durable:
    """The ack callback of a record a transfer step waits for: a future to await, and the
    code of the dead letter that went instead, if Kafka refused the record."""

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.code: str | None = None

    def refused(self, code: str) -> None:
        self.code = code

    def __call__(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


# Refusals that must not touch a transfer: a failed signature or a malformed topic says
# nothing about the transfer's data (and is not proof of who sent it).
_KEEPS_STAGING = {"bad_transfer_topic", "bad_segment_offset", "bad_transfer_fin",
                  "unknown_device", "revoked_device", "missing_signature", "bad_signature",
                  "invalid_device_id", "no_device_id"}
