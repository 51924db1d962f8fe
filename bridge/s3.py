"""The S3 adapter: objects for payloads too large for Kafka, and file transfers' staging.

boto3 blocks, so every call runs on a small thread pool of the adapter's own; the event loop
never waits on S3. Credentials come from boto3's usual chain (environment, profile, instance
role). Errors are `S3Error`: the caller retries (the MQTT message stays unacked meanwhile).
"""

from __future__ import annotations

import asyncio
import builtins
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import structlog

from bridge.config import S3Config
from bridge.errors import BridgeError
from bridge.metrics import Metrics

T = TypeVar("T")
log = structlog.get_logger("bridge.s3")

STAGING_PREFIX = "staging/"  # file transfers in progress; the lifecycle rule expires them


class S3Error(BridgeError):
    """An S3 call failed; retryable unless the bucket or credentials are wrong."""


class ObjectStore:
    """One bucket, used from asyncio."""

    def __init__(self, config: S3Config, workers: int = 8,
                 metrics: Metrics | None = None) -> None:
        self.bucket = config.bucket
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=config.endpoint_url, region_name=config.region,
            config=botocore.config.Config(max_pool_connections=workers,
                                          retries={"mode": "standard", "max_attempts": 3}))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="s3")
        self.metrics = metrics
        if metrics is not None:  # botocore's own events see every request, retries included
            events = self.client.meta.events
            events.register("after-call.s3", self._answered)
            events.register("after-call-error.s3", self._failed)

    def _answered(self, http_response: Any, event_name: str, **_: Any) -> None:
        """Count one S3 request (runs on the S3 thread; prometheus_client is thread-safe)."""
        assert self.metrics is not None
        operation = event_name.rsplit(".", 1)[-1]
        self.metrics.inc("s3_requests", operation=operation)
        if getattr(http_response, "status_code", 200) >= 400:
            self.metrics.inc("s3_errors", operation=operation)

    def _failed(self, event_name: str, **_: Any) -> None:
        """A request that got no answer (connection refused, timeout)."""
        assert self.metrics is not None
        operation = event_name.rsplit(".", 1)[-1]
        self.metrics.inc("s3_requests", operation=operation)
        self.metrics.inc("s3_errors", operation=operation)

    def _moved(self, direction: str, size: int) -> None:
        if self.metrics is not None and size:
            self.metrics.inc("s3_bytes", size, direction=direction)

    def reference(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def _call(self, function: Callable[..., T], **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(function, **kwargs))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise S3Error(f"{function.__name__}: {exc}") from exc

    async def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None:
        await self._call(self.client.put_object, Bucket=self.bucket, Key=key, Body=body,
                         Metadata=metadata or {}, ContentType=content_type)
        self._moved("sent", len(body))

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        return await self._read(Key=key)

    async def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """`length` bytes of an object from `start`, or None if there is no object."""
        if length <= 0:
            return b""
        return await self._read(Key=key, Range=f"bytes={start}-{start + length - 1}")

    async def _read(self, **request: Any) -> bytes | None:
        try:
            response = await self._call(self.client.get_object, Bucket=self.bucket, **request)
        except S3Error as exc:
            if _missing(exc):
                return None
            raise
        body: bytes = await self._call(response["Body"].read)
        self._moved("received", len(body))
        return body

    async def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata (`Metadata`, `ContentLength`, ...), or None if absent."""
        try:
            return await self._call(self.client.head_object, Bucket=self.bucket, Key=key)
        except S3Error as exc:
            if _missing(exc):
                return None
            raise

    async def list(self, prefix: str, delimiter: str | None = None,
                   limit: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        """Objects under a prefix (every page, or pages until `limit` entries are in: what
        a device can make many of is never read whole), and the common prefixes with a
        delimiter."""
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = await self._call(self.client.list_objects_v2, **kwargs)
            objects += page.get("Contents", [])
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            full = limit is not None and len(objects) + len(prefixes) >= limit
            if not page.get("IsTruncated") or full:
                return objects, prefixes
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    async def open_uploads(self, key: str) -> builtins.list[str]:
        """The ids of multipart uploads still open for exactly this key."""
        response = await self._call(self.client.list_multipart_uploads, Bucket=self.bucket,
                                    Prefix=key)
        return [u["UploadId"] for u in response.get("Uploads", []) if u["Key"] == key]

    async def delete_prefix(self, prefix: str, keep: str | None = None) -> int:
        """Delete every object under a prefix (but `keep`), a page at a time; returns how
        many."""
        deleted = 0
        while True:
            objects, _ = await self.list(prefix, limit=1000)
            batch = [{"Key": o["Key"]} for o in objects[:1000] if o["Key"] != keep]
            if not batch:
                return deleted
            response = await self._call(self.client.delete_objects, Bucket=self.bucket,
                                        Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                raise S3Error(f"delete_objects: {response['Errors'][0]}")
            deleted += len(batch)

    async def start_multipart(self, key: str, metadata: dict[str, str],
                              content_type: str) -> str:
        response = await self._call(self.client.create_multipart_upload, Bucket=self.bucket,
                                    Key=key, Metadata=metadata, ContentType=content_type)
        upload_id: str = response["UploadId"]
        return upload_id

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        response = await self._call(self.client.upload_part, Bucket=self.bucket, Key=key,
                                    UploadId=upload_id, PartNumber=number, Body=body)
        self._moved("sent", len(body))
        etag: str = response["ETag"]
        return etag

    async def complete_multipart(self, key: str, upload_id: str,
                                 etags: builtins.list[str]) -> None:
        await self._call(self.client.complete_multipart_upload, Bucket=self.bucket, Key=key,
                         UploadId=upload_id, MultipartUpload={"Parts": [
                             {"PartNumber": i, "ETag": etag} for i, etag in enumerate(etags, 1)]})

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._call(self.client.abort_multipart_upload, Bucket=self.bucket, Key=key,
                         UploadId=upload_id)

    def apply_lifecycle(self, staging_days: int, abort_days: int) -> dict[str, Any]:
        """Expire file-transfer staging objects and abort incomplete multipart uploads
        (blocking; `s3-setup` and start-up). Replaces the bucket's lifecycle rules of the
        same ids and keeps any others."""
        rules = [
            {"ID": "mqtt-kafka-bridge-staging", "Status": "Enabled",
             "Filter": {"Prefix": STAGING_PREFIX}, "Expiration": {"Days": staging_days}},
            {"ID": "mqtt-kafka-bridge-multipart", "Status": "Enabled", "Filter": {"Prefix": ""},
             "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": abort_days}},
        ]
        try:
            current = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)["Rules"]
        except botocore.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] != "NoSuchLifecycleConfiguration":
                raise S3Error(f"get_bucket_lifecycle_configuration: {exc}") from exc
            current = []
        except botocore.exceptions.BotoCoreError as exc:  # no credentials, no connection, ...
            raise S3Error(f"get_bucket_lifecycle_configuration: {exc}") from exc
        ours = {r["ID"] for r in rules}
        merged = [r for r in current if r.get("ID") not in ours] + rules
        try:
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": merged})
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise S3Error(f"put_bucket_lifecycle_configuration: {exc}") from exc
        return {"Rules": merged}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_RETRY_MIN, _RETRY_MAX = 0.5, 30.0


async def retrying(call: Callable[[], Awaitable[T]], metrics: Metrics,
                   event: str = "s3_failed", **context: Any) -> T:
    """Run an S3 step until it succeeds, backing off from 0.5 s to 30 s; the MQTT message
    it serves stays unacked meanwhile, so the broker holds on to it."""
    delay = _RETRY_MIN
    while True:
        try:
            return await call()
        except S3Error as exc:
            metrics.inc("s3_retries")
            log.warning(event, error=str(exc), retry_in=delay, **context)
            await asyncio.sleep(delay)
            delay = min(_RETRY_MAX, delay * 2)


def _missing(exc: S3Error) -> bool:
    cause = exc.__cause__
    return isinstance(cause, botocore.exceptions.ClientError) and \
        cause.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}
