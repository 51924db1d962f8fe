"""File transfer over MQTT: the stage between the fat lane's session and the S3 store.

Topics (docs/file-transfer.md), under `[file_transfer].prefix`:

    PREFIX/{file_id}/init          JSON {name, size, checksum, content_type?, user_data?}
    PREFIX/{file_id}/{offset}      one segment's bytes
    PREFIX/{file_id}/fin/{size}    empty: the file is complete

An init or a segment is acked once it is stored in S3. A fin is acked once the file is
assembled and verified, its reference envelope is in Kafka and the staging data is gone.
Any refusal is a dead-letter record first, then the transfer's staging data is removed, then
the ack: nothing is redelivered forever and nothing vanishes. All state is in S3 (see
`bridge/transfer.py`), so any bridge of a shared subscription can take any message.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from bridge import auth, envelope
from bridge.config import Config, FileTransferConfig
from bridge.errors import Rejected
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.pipeline import Offload, Pipeline
from bridge.routing import checked_device_id
from bridge.s3 import ObjectStore, retrying
from bridge.transfer import StoredFile, TransferLimits, TransferStore

log = structlog.get_logger("bridge.files")
_REFUSED_MAX = 4096
ROUTE_NAME = "file_transfer"  # what lineage calls these messages


class FileTransfers:
    """Handles the file-transfer messages of one config; `handle` runs as a background task."""

    def __init__(self, config: Config, settings: FileTransferConfig, pipeline: Pipeline,
                 objects: ObjectStore, metrics: Metrics) -> None:
        self.settings, self.pipeline, self.metrics = settings, pipeline, metrics
        self.store = TransferStore(objects, TransferLimits(
            max_file_bytes=settings.max_file_bytes, max_segment_bytes=settings.max_segment_bytes,
            max_transfers_per_device=settings.max_transfers_per_device,
            expiry_seconds=settings.expiry_seconds, fin_grace_seconds=settings.fin_grace_seconds))
        self.registry = config.registry
        self.lineage = envelope.Lineage(config.bridge.instance, ROUTE_NAME, config.version)
        self._depth = len(settings.filter.pattern.split("/")) - 1  # levels before the `#`
        # Steps in flight in this process, per transfer. The broker acks a device's init at
        # once, so its segments can reach us while the init is still being stored: segments
        # wait for the init, and a fin for both.
        self._inits: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._in_flight: dict[tuple[str, str], set[asyncio.Future[None]]] = defaultdict(set)
        # Transfers refused here: their later segments are dead-lettered at once, with no
        # grace spent looking for an init that will never come.
        self._refused: OrderedDict[tuple[str, str], None] = OrderedDict()

    def takes(self, topic: str) -> bool:
        return self.settings.filter.match(topic) is not None

    def subscription(self) -> str:
        return self.settings.filter.subscription

    async def handle(self, message: Message, on_durable: Callable[[], None] | None) -> None:
        """One init, segment or fin, through to its ack. S3 trouble is retried meanwhile."""
        device_id, file_id = "", ""
        try:
            bound = self.settings.filter.match(message.topic) or {}
            device_id = checked_device_id(bound.get("device_id", ""))
            file_id = bound.get("file_id", "")
            self._authenticate(device_id, message)
            rest = message.topic.split("/")[self._depth:]
            if rest == ["init"]:
                await self._init(device_id, file_id, message)
            elif len(rest) == 2 and rest[0] == "fin":
                await self._finish(message, device_id, file_id, rest[1], on_durable)
                return
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
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inits[(device_id, file_id)] = done
        try:
            await self._retrying(lambda: self.store.init(
                device_id, file_id, message.payload, message.arrival_millis))
            self._refused.pop((device_id, file_id), None)  # an id may be used again
            self.metrics.inc("file_inits")
        finally:
            done.set_result(None)
            if self._inits.get((device_id, file_id)) is done:
                del self._inits[(device_id, file_id)]

    async def _segment(self, device_id: str, file_id: str, offset: str, data: bytes) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._in_flight[(device_id, file_id)]
        waiting.add(done)
        try:
            init = self._inits.get((device_id, file_id))
            if init is not None:
                await init
            await self._stored_after_init(device_id, file_id, offset, data)
            self.metrics.inc("file_segments")
        finally:
            done.set_result(None)
            waiting.discard(done)
            if not waiting:
                self._in_flight.pop((device_id, file_id), None)

    async def _stored_after_init(self, device_id: str, file_id: str, offset: str,
                                 data: bytes) -> None:
        """Store a segment. With a shared subscription its init may still be on its way into
        S3 at another bridge: an unknown transfer is looked up again for the fin grace."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.fin_grace_seconds
        delay = 0.05
        while True:
            try:
                await self._retrying(lambda: self.store.segment(device_id, file_id, offset,
                                                                data))
                return
            except Rejected as rejected:
                if rejected.code != "unknown_transfer" or loop.time() >= deadline or \
                        (device_id, file_id) in self._refused:
                    raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def _finish(self, message: Message, device_id: str, file_id: str, size: str,
                      on_durable: Callable[[], None] | None) -> None:
        init = self._inits.get((device_id, file_id))
        if init is not None:
            await init
        waiting = list(self._in_flight.get((device_id, file_id), ()))
        if waiting:  # segments received before the fin, still being stored here
            await asyncio.gather(*waiting)
        log.info("file_assembling", device_id=device_id, file_id=file_id, size=size)
        stored = await self._retrying(lambda: self.store.finish(
            device_id, file_id, size, message.arrival_millis))
        await self._durably(self._reference(message, device_id, file_id, stored))
        await self._retrying(lambda: self.store.discard(device_id, file_id))
        self.metrics.inc("files_completed")
        log.info("file_completed", device_id=device_id, file_id=file_id, size=stored.size,
                 reference=stored.reference)
        if on_durable is not None:
            on_durable()

    def _reference(self, message: Message, device_id: str, file_id: str,
                   stored: StoredFile) -> Delivery:
        meta = stored.meta
        value = envelope.encode_reference(
            message, device_id, self.lineage, meta.content_type, stored.reference, stored.size,
            stored.sha256, {"id": file_id, "name": meta.name, "user_data": meta.user_data})
        return Delivery(self.settings.kafka_topic, device_id.encode(), value,
                        envelope.headers(message, device_id, self.lineage), None,
                        self._rejected_by_kafka, message, self.pipeline.fat_sink)

    def _rejected_by_kafka(self, delivery: Delivery, rejected: Rejected) -> None:
        """Kafka will never take the reference record: dead-letter it in its place."""
        message: Message = delivery.origin
        device_id = (self.settings.filter.match(message.topic) or {}).get("device_id", "")
        assert delivery.sink is not None
        delivery.sink.submit(self.pipeline.dead_letter(message, device_id, self.lineage,
                                                       rejected, delivery.on_durable))

    async def _refuse(self, message: Message, device_id: str, file_id: str, rejected: Rejected,
                      on_durable: Callable[[], None] | None) -> None:
        """Dead letter first, then remove the transfer's staging data, then the ack."""
        dead = self.pipeline.refuse(message, device_id, self.lineage, rejected, None)
        await self._durably(await self.pipeline.offload(dead) if isinstance(dead, Offload)
                            else dead)
        if device_id and file_id and rejected.code not in _KEEPS_STAGING:
            await self._retrying(lambda: self.store.discard(device_id, file_id))
            self._refused[(device_id, file_id)] = None
            if len(self._refused) > _REFUSED_MAX:
                self._refused.popitem(last=False)
        self.metrics.inc("file_transfers_failed")
        if on_durable is not None:
            on_durable()

    async def sweep(self, now_millis: int) -> int:
        """Dead-letter and remove transfers past their expiry (run now and then)."""
        expired = await self._retrying(lambda: self.store.expired(now_millis))
        for device_id, file_id, meta in expired:
            topic = self.settings.filter.pattern.split("{file_id}")[0].replace(
                "{device_id}", device_id) + f"{file_id}/init"
            stand_in = Message("", topic, b"", 0, False, False, now_millis)
            age = "" if meta is None else \
                f" (started {(now_millis - meta.created_millis) / 1000:.0f} s ago)"
            await self._refuse(stand_in, device_id, file_id, Rejected(
                "transfer_expired", f"not finished within {self.settings.expiry_seconds:.0f} s"
                + age, device_id), None)
        return len(expired)

    async def _durably(self, delivery: Delivery) -> None:
        """Produce and wait for the delivery report (acks=all)."""
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settled() -> None:
            if not durable.done():
                durable.set_result(None)

        delivery.on_durable = settled
        sink = delivery.sink
        assert sink is not None
        await sink.send(delivery)
        await durable

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await retrying(call, self.metrics)


# Refusals that must not wipe a transfer another device message may still complete: a bad
# topic or a failed signature says nothing about the transfer's data.
_KEEPS_STAGING = {"bad_transfer_topic", "unknown_device", "revoked_device", "missing_signature",
                  "bad_signature", "invalid_device_id", "no_device_id", "too_many_transfers",
                  "unknown_transfer"}
