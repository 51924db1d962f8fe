"""Large payloads on real servers: claim-check offload of single messages, and file transfer
reassembly into S3 (Mosquitto, Tansu, moto's S3 server)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from bridge.devkit import simulate
from bridge.devkit.device import upload_file
from bridge.devkit.localstack import S3_KEY, S3_REGION, s3_environment
from tests.conftest import ROOT, Case
from tests.test_bridge import publish_as_device, read_until

pytestmark = pytest.mark.integration


class Files:
    """One test's bucket, file-transfer config and S3 view."""

    def __init__(self, case: Case, **limits: Any) -> None:
        self.case = case
        self.bucket = f"b-{uuid.uuid4().hex[:12]}"
        case.stack.create_bucket(self.bucket)
        self.files_topic = f"files.{case.prefix}"
        case.stack.create_topics([self.files_topic])
        self.s3 = boto3.client("s3", endpoint_url=case.stack.s3_endpoint, region_name=S3_REGION,
                               aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY)
        settings = {"fin_grace_seconds": 2, **limits}
        self.extra = f"""
[s3]
endpoint_url = "{case.stack.s3_endpoint}"
bucket = "{self.bucket}"
region = "{S3_REGION}"
inline_max_bytes = 65536
[file_transfer]
prefix = "{case.prefix}/{{device_id}}/files"
kafka_topic = "{self.files_topic}"
""" + "".join(f"{k} = {v}\n" for k, v in settings.items())

    def config(self, extra_broker: str = "", routes: str | None = None) -> Path:
        return self.case.config(extra_broker=extra_broker, routes=routes, extra=self.extra)

    def object_sha256(self, reference: str) -> str:
        bucket, key = reference.removeprefix("s3://").split("/", 1)
        assert bucket == self.bucket
        digest = hashlib.sha256()
        for chunk in self.s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                  Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def open_uploads(self) -> list[Any]:
        return list(self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))

    def upload(self, device: str, file_id: str, data: bytes | Path, **kwargs: Any) -> Any:
        client = simulate.device_client(self.case.stack.mqtt_url, f"up-{uuid.uuid4().hex[:8]}")
        try:
            return upload_file(client, device, file_id, data, prefix=self.case.prefix, **kwargs)
        finally:
            client.disconnect()
            client.loop_stop()

    def references(self, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        return [env for _, env in read_until(self.case, self.files_topic, count, timeout)]

    def dead_letters(self, count: int) -> list[dict[str, Any]]:
        return [env for _, env in read_until(self.case, self.case.dead_letter, count)]


def test_a_10mb_message_goes_by_reference_and_a_1kb_one_inline(case: Case) -> None:
    files = Files(case)
    case.bridge(files.config(routes=f"""
[[routes]]
name = "telemetry"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
[[routes]]
name = "heads"
filter = "{case.prefix}/{{device_id}}/camera"
kafka_topic = "{case.topic}"
truncate_bytes = 100
"""))
    big, small, frame = b"\x01" * 10_000_000, b"s" * 1024, b"f" * 500_000
    publish_as_device(case, [(f"{case.prefix}/d1/telemetry", big),
                             (f"{case.prefix}/d1/telemetry", small),
                             (f"{case.prefix}/d1/camera", frame)])
    got = {env.get("size", len(env.get("body", b""))): env
           for _, env in read_until(case, case.topic, 3)}
    inline = got[1024]
    assert inline["body"] == small and "reference" not in inline
    by_reference = got[10_000_000]
    digest = hashlib.sha256(big).hexdigest()
    assert "body" not in by_reference
    assert by_reference["sha256"] == digest
    assert by_reference["reference"] == f"s3://{files.bucket}/payloads/d1/{digest}"
    assert files.object_sha256(by_reference["reference"]) == digest
    head = got[500_000]
    assert head["body"] == frame[:100] and head["truncated"] is True
    assert head["sha256"] == hashlib.sha256(frame).hexdigest()


def test_a_50mb_file_shuffled_with_duplicates_becomes_one_object(case: Case,
                                                                    tmp_path: Path) -> None:
    files = Files(case)
    bridge = case.bridge(files.config())
    source = tmp_path / "50mb.bin"
    source.write_bytes(hashlib.sha256(b"seed").digest() * (50 * 2**20 // 32))
    upload = files.upload("cam-1", "video-1", source, shuffle=True, duplicates=0.05,
                          name="video.mp4", content_type="video/mp4", user_data={"n": 1})
    assert upload.segments == 200 + 10
    [reference] = files.references(1)
    assert reference["sha256"] == upload.sha256 == files.object_sha256(reference["reference"])
    assert reference["size"] == 50 * 2**20
    assert reference["file"] == {"id": "video-1", "name": "video.mp4", "user_data": {"n": 1}}
    assert reference["content_type"] == "video/mp4"
    assert reference["bridge"]["route"] == "file_transfer"
    bridge.wait_stat("file_transfers_completed", 1)
    assert files.keys("staging/") == []
    assert files.open_uploads() == []
    time.sleep(2)  # nothing else arrives: exactly one reference envelope
    assert len(files.references(1, timeout=5)) == 1


def test_kill9_in_the_middle_of_a_transfer_then_restart_completes_it(case: Case,
                                                                      tmp_path: Path) -> None:
    files = Files(case)
    config = files.config()
    bridge = case.bridge(config)
    source = tmp_path / "20mb.bin"
    source.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest()
                                for i in range(20 * 2**20 // 32)))
    sent: list[Any] = []
    uploader = threading.Thread(target=lambda: sent.append(
        files.upload("cam-2", "clip-9", source)))
    uploader.start()
    bridge.wait_stat("file_segments", 10)
    bridge.kill9()
    case.bridge(config)
    uploader.join(180)
    assert sent, "the device could not finish uploading"
    references = files.references(1)
    assert {r["reference"] for r in references} == {
        f"s3://{files.bucket}/files/cam-2/clip-9"}  # a redelivered fin repeats the reference
    assert files.object_sha256(references[0]["reference"]) == sent[0].sha256
    assert files.keys("staging/") == []


def test_two_bridges_in_one_shared_subscription_share_a_transfer(case: Case,
                                                                 tmp_path: Path) -> None:
    files = Files(case)
    shared = 'share_group = "bridges"'
    first = case.bridge(files.config(extra_broker=shared))
    second_config = case.config(extra_broker=shared, extra=files.extra, name="second.toml")
    second_config.write_text(second_config.read_text().replace(
        f'client_id = "{case.client_id}"', f'client_id = "{case.client_id}-b"'))
    second = case.bridge(second_config)
    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(8 * 2**20 // 32))
    upload = files.upload("cam-3", "shared-1", data, segment_bytes=64 * 1024)
    [reference] = files.references(1)
    assert files.object_sha256(reference["reference"]) == upload.sha256
    # Both bridges stored segments of this one transfer.
    assert first.wait_stat("file_segments", 1) > 0
    assert second.wait_stat("file_segments", 1) > 0


def test_each_failed_transfer_dead_letters_its_reason_and_leaves_no_staging(case: Case) -> None:
    files = Files(case, max_file_bytes=2_000_000, max_segment_bytes=100_000,
                  expiry_seconds=6, max_transfers_per_device=10)
    case.bridge(files.config())
    p = f"{case.prefix}/cam-4/files"
    good = bytes(range(256)) * 1000  # 256,000 bytes
    init = json.dumps({"name": "x", "size": len(good),
                       "checksum": hashlib.sha256(good).hexdigest()}).encode()
    publish_as_device(case, [
        # corrupted: a segment's bytes differ from what the checksum says
        (f"{p}/corrupt/init", init),
        (f"{p}/corrupt/0", good[:100_000]),
        (f"{p}/corrupt/100000", b"X" * 100_000),
        (f"{p}/corrupt/200000", good[200_000:]),
        (f"{p}/corrupt/fin/{len(good)}", b""),
        # missing: the middle segment never comes
        (f"{p}/missing/init", init),
        (f"{p}/missing/0", good[:100_000]),
        (f"{p}/missing/200000", good[200_000:]),
        (f"{p}/missing/fin/{len(good)}", b""),
        # oversize: the whole file, and one segment
        (f"{p}/huge/init", json.dumps({"name": "x", "size": 3_000_000,
                                       "checksum": "0" * 64}).encode()),
        (f"{p}/fat/init", init),
        (f"{p}/fat/0", good[:150_000]),
        # beyond size
        (f"{p}/beyond/init", init),
        (f"{p}/beyond/250000", good[:10_000]),
        # expiry: started, never finished
        (f"{p}/stale/init", init),
        (f"{p}/stale/0", good[:100_000]),
    ])
    expected = {("corrupt", "checksum_mismatch"), ("missing", "missing_segments"),
                ("huge", "file_too_large"), ("fat", "segment_too_large"),
                ("beyond", "segment_beyond_size"), ("stale", "transfer_expired")}
    deadline = time.monotonic() + 60
    while True:  # the expiry comes last, from the sweeper
        dead = files.dead_letters(len(expected))
        codes = {(env["mqtt"]["topic"].split("/")[3], env["error"]["code"]) for env in dead}
        if codes >= expected or time.monotonic() > deadline:
            break
    assert codes == expected
    missing = next(e for e in dead if e["error"]["code"] == "missing_segments")
    assert "100000" in missing["error"]["reason"]
    deadline = time.monotonic() + 30
    while files.keys("staging/") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert files.keys("staging/") == []
    assert files.keys("files/") == []
    assert files.open_uploads() == []
    assert files.references(0, timeout=3) == []


def test_s3_setup_applies_the_lifecycle_and_keeps_other_rules(case: Case) -> None:
    files = Files(case)
    files.s3.put_bucket_lifecycle_configuration(Bucket=files.bucket, LifecycleConfiguration={
        "Rules": [{"ID": "operators-own", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
                   "Expiration": {"Days": 30}}]})
    config = files.config()
    config.write_text(config.read_text().replace("[file_transfer]",
                                                 "staging_expiry_days = 3\n[file_transfer]"))
    done = subprocess.run([sys.executable, "-m", "bridge", "s3-setup", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, **s3_environment()})
    assert done.returncode == 0, done.stderr
    rules = {r["ID"]: r for r in files.s3.get_bucket_lifecycle_configuration(
        Bucket=files.bucket)["Rules"]}
    assert rules["mqtt-kafka-bridge-staging"]["Expiration"]["Days"] == 3
    assert rules["mqtt-kafka-bridge-staging"]["Filter"]["Prefix"] == "staging/"
    assert rules["mqtt-kafka-bridge-multipart"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 3}
    assert rules["operators-own"]["Expiration"]["Days"] == 30


def test_the_lifecycle_can_be_applied_at_start_up(case: Case) -> None:
    files = Files(case)
    config = files.config()
    config.write_text(config.read_text().replace("[file_transfer]",
                                                 "apply_lifecycle = true\n[file_transfer]"))
    bridge = case.bridge(config)
    assert bridge.wait_for("s3_lifecycle_applied")["days"] == 7
    rules = files.s3.get_bucket_lifecycle_configuration(Bucket=files.bucket)["Rules"]
    assert {r["ID"] for r in rules} == {"mqtt-kafka-bridge-staging",
                                        "mqtt-kafka-bridge-multipart"}


def test_a_dead_letter_too_large_to_keep_inline_keeps_its_whole_body_in_s3(case: Case) -> None:
    files = Files(case)
    case.bridge(files.config(routes=f"""
[[routes]]
name = "readings"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
format = "json"
inline_max_bytes = 900000
"""))
    big, small = b"not json " * 70_000, b"{broken"
    publish_as_device(case, [(f"{case.prefix}/d1/telemetry", big),
                             (f"{case.prefix}/d1/telemetry", small)])
    dead = {env["size"]: env for env in files.dead_letters(2)}
    digest = hashlib.sha256(big).hexdigest()
    assert dead[len(big)]["error"]["code"] == "bad_payload"
    assert dead[len(big)]["reference"] == f"s3://{files.bucket}/dead-letter/d1/{digest}"
    assert "body" not in dead[len(big)]
    assert files.object_sha256(dead[len(big)]["reference"]) == digest
    assert dead[len(small)]["body"] == small and "reference" not in dead[len(small)]
