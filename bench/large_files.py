"""Large files: one file uploaded over MQTT file transfer, reassembled by the bridge into S3.

Measures, on the local stack (Mosquitto, Tansu, moto's S3 server), side by side in one run:
1. the same bytes uploaded straight to S3 with boto3 (multipart, 8 MiB parts): the S3 ceiling;
2. the device publishing the file to Mosquitto while the bridge is stopped: the MQTT ceiling;
3. the bridge draining that file (segments into S3 staging, assembly, reference envelope):
   from its start until the reference is in Kafka, while its RSS is sampled every 20 ms.

    .venv/bin/python bench/large_files.py [--mib 200] [--segment-kib 256]

Prints figures; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.devkit import simulate
from bridge.devkit.device import sized_file, upload_file
from bridge.devkit.localstack import S3_KEY, S3_REGION, LocalStack, s3_environment
from bridge.devkit.tail import records


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def staged_by_hand(s3: Any, source: Path, segment: int) -> None:
    """The bridge's S3 work without MQTT, Kafka or the bridge: PUT every segment (8 at a
    time), then GET them in order (5 at a time), hash, and upload 8 MiB parts."""
    size = source.stat().st_size
    offsets = range(0, size, segment)

    def put(offset: int) -> None:
        with source.open("rb") as f:
            f.seek(offset)
            s3.put_object(Bucket="bench", Key=f"hand/seg/{offset:016d}", Body=f.read(segment))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, offsets))
    upload = s3.create_multipart_upload(Bucket="bench", Key="hand/file.bin")["UploadId"]
    digest, buffer, etags = hashlib.sha256(), bytearray(), []

    def get(offset: int) -> bytes:
        body: bytes = s3.get_object(Bucket="bench", Key=f"hand/seg/{offset:016d}")["Body"].read()
        return body

    def part(data: bytes) -> None:
        etags.append(s3.upload_part(Bucket="bench", Key="hand/file.bin", UploadId=upload,
                                    PartNumber=len(etags) + 1, Body=data)["ETag"])

    with ThreadPoolExecutor(5) as pool:
        for data in pool.map(get, offsets):
            digest.update(data)
            buffer += data
            if len(buffer) >= 8 * 2**20:
                part(bytes(buffer))
                buffer = bytearray()
    if buffer:
        part(bytes(buffer))
    s3.complete_multipart_upload(Bucket="bench", Key="hand/file.bin", UploadId=upload,
                                 MultipartUpload={"Parts": [{"PartNumber": i, "ETag": e}
                                                            for i, e in enumerate(etags, 1)]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--segment-kib", type=int, default=256)
    parser.add_argument("--workdir", help="keep the stack's files and the bridge log here")
    args = parser.parse_args()
    size = args.mib * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(args, size, work)


def run(args: argparse.Namespace, size: int, work: Path) -> None:
    with LocalStack(work) as stack:
        stack.create_bucket("bench")
        stack.create_topics(["bench.files", "bench.deadletter"])
        source = sized_file(work / "file.bin", size)
        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=S3_REGION,
                          aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY)

        start = time.monotonic()
        s3.upload_file(str(source), "bench", "direct/file.bin", Config=TransferConfig(
            multipart_chunksize=8 * 2**20, multipart_threshold=8 * 2**20, max_concurrency=4))
        direct = time.monotonic() - start
        start = time.monotonic()
        staged_by_hand(s3, source, args.segment_kib * 1024)
        by_hand = time.monotonic() - start

        config = work / "bridge.toml"
        config.write_text(f"""
[bridge]
instance = "bench"
log_format = "json"
stats_interval = 3600
[[brokers]]
url = "{stack.mqtt_url}"
client_id = "bench-bridge"
[kafka]
"bootstrap.servers" = "{stack.bootstrap}"
[s3]
bucket = "bench"
endpoint_url = "{stack.s3_endpoint}"
region = "{S3_REGION}"
[file_transfer]
prefix = "devices/{{device_id}}/files"
kafka_topic = "bench.files"
max_segment_bytes = {args.segment_kib * 1024}
[dead_letter]
kafka_topic = "bench.deadletter"
[[routes]]
filter = "devices/{{device_id}}/telemetry"
kafka_topic = "bench.telemetry"
""")
        env = {**os.environ, **s3_environment()}
        argv = [sys.executable, "-m", "bridge", "run", "--config", str(config)]
        log = (work / "bridge.log").open("wb")
        # Start once so the session and its subscription exist, then stop: the upload
        # waits in Mosquitto and the bridge drains it from a standing start.
        bridge = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(3)
        bridge.terminate()
        bridge.wait(30)

        client = simulate.device_client(stack.mqtt_url, "bench-device")
        start = time.monotonic()
        upload = upload_file(client, "cam-1", "big-1", source,
                             segment_bytes=args.segment_kib * 1024)
        publish = time.monotonic() - start
        client.disconnect()
        client.loop_stop()

        bridge = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        start = time.monotonic()
        idle_rss = 0.0
        peak = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], rss_mib(bridge.pid))
                except (FileNotFoundError, ProcessLookupError):
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        log_path = work / "bridge.log"
        while b'"file_completed"' not in log_path.read_bytes().split(b"bridge_started")[-1]:
            if time.monotonic() - start > 1800 or bridge.poll() is not None:
                raise SystemExit(f"the bridge did not complete the file: see {log_path}")
            time.sleep(0.02)
        drained = time.monotonic() - start
        done.set()
        sampler.join()
        idle_rss = rss_mib(bridge.pid)
        bridge.terminate()
        bridge.wait(60)
        got = list(records(stack.bootstrap, "bench.files", idle=3.0,
                           deadline=time.monotonic() + 60))
        assert got, "no reference envelope in Kafka"
        envelope = got[0][1]
        assert envelope["sha256"] == upload.sha256, "sha256 mismatch"

    mib = size / 2**20
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Mosquitto + Tansu (memory) + moto S3 on loopback")
    print(f"file: {mib:.0f} MiB in {upload.segments} segments of {args.segment_kib} KiB")
    print(f"direct boto3 upload to S3:       {mib / direct:7.1f} MiB/s  ({direct:.1f} s)")
    print(f"device publish to Mosquitto:     {mib / publish:7.1f} MiB/s  ({publish:.1f} s)")
    print(f"bridge drain to reference:       {mib / drained:7.1f} MiB/s  ({drained:.1f} s from "
          f"process start: segments to staging, assembly, verify, envelope)")
    print(f"same S3 work by hand (boto3):    {mib / by_hand:7.1f} MiB/s  ({by_hand:.1f} s: "
          f"{upload.segments} PUTs, {upload.segments} GETs, 8 MiB parts)")
    print(f"ratio bridge / direct S3:        {direct / drained:.2f}")
    print(f"ratio bridge / same S3 work:     {by_hand / drained:.2f}")
    print(f"bridge RSS: peak {peak[0]:.0f} MiB during the transfer, {idle_rss:.0f} MiB after")
    print(f"reference: {envelope['reference']} size {envelope['size']}")


if __name__ == "__main__":
    main()
