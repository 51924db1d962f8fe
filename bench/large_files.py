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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RssSampler
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


def wait_for_line(log: Path, marker: bytes, proc: subprocess.Popen[bytes],
                  timeout: float) -> None:
    """Until the bridge's latest run (after its last bridge_started) logged `marker`."""
    deadline = time.monotonic() + timeout
    while marker not in log.read_bytes().split(b"bridge_started")[-1]:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the bridge did not log {marker.decode()}: see {log}")
        time.sleep(0.02)


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
        report(run(args, size, work))


def bench(work: Path, quick: bool, runs: int) -> dict[str, Any]:
    """For the suite: `runs` transfers (each on a fresh stack), as median/min/max."""
    from bench.common import summary

    args = argparse.Namespace(mib=20 if quick else 200, segment_kib=256)
    results = []
    for i in range(runs):
        (work / f"files-{i}").mkdir()
        results.append(run(args, args.mib * 2**20, work / f"files-{i}"))
    out: dict[str, Any] = {"mib": args.mib, "segment_kib": args.segment_kib, "runs": results}
    for key in ("bridge_mib_s", "direct_mib_s", "by_hand_mib_s", "publish_mib_s", "peak_mib",
                "ratio_by_hand", "ratio_direct"):
        out[key] = summary([r[key] for r in results])
    return out


def rows(result: dict[str, Any]) -> list[list[str]]:
    from bench.common import cell

    mib = result["mib"]
    return [
        ["large files", f"{mib} MiB transfer through the bridge (MiB/s)",
         cell(result["bridge_mib_s"], "{:.1f}"), "from process start to reference"],
        ["large files", "same S3 requests by hand, boto3 (MiB/s)",
         cell(result["by_hand_mib_s"], "{:.1f}"), "the S3 ceiling for this protocol"],
        ["large files", "ratio bridge / same S3 work", cell(result["ratio_by_hand"], "{:.2f}"),
         "same run"],
        ["large files", "one multipart upload straight to S3 (MiB/s)",
         cell(result["direct_mib_s"], "{:.1f}"), ""],
        ["large files", "peak RSS during the transfer, VmHWM (MiB)",
         cell(result["peak_mib"]), "bridge process"],
    ]


def report(fig: dict[str, Any]) -> None:
    mib = fig["mib"]
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Mosquitto + Tansu (data in moto S3) + moto S3 on loopback")
    print(f"file: {mib:.0f} MiB in {fig['segments']} segments of {fig['segment_kib']} KiB")
    print(f"direct boto3 upload to S3:       {fig['direct_mib_s']:7.1f} MiB/s")
    print(f"device publish to Mosquitto:     {fig['publish_mib_s']:7.1f} MiB/s")
    print(f"bridge drain to reference:       {fig['bridge_mib_s']:7.1f} MiB/s  (from process "
          f"start: segments to staging, assembly, verify, envelope)")
    print(f"same S3 work by hand (boto3):    {fig['by_hand_mib_s']:7.1f} MiB/s  "
          f"({fig['segments']} PUTs, {fig['segments']} GETs, 8 MiB parts)")
    print(f"ratio bridge / direct S3:        {fig['ratio_direct']:.2f}")
    print(f"ratio bridge / same S3 work:     {fig['ratio_by_hand']:.2f}")
    print(f"bridge RSS: peak {fig['peak_mib']:.0f} MiB during the transfer, "
          f"{fig['idle_mib']:.0f} MiB after")
    print(f"reference: {fig['reference']} size {fig['size']}")


def run(args: argparse.Namespace, size: int, work: Path) -> dict[str, Any]:
    """One transfer on a fresh stack: the figures (MiB/s of each way, peak RSS)."""
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
        log_path = work / "bridge.log"
        # Start once so the session and its subscription exist, then stop: the upload
        # waits in Mosquitto and the bridge drains it from a standing start. Ready, not a
        # fixed sleep: on a loaded machine start-up alone can take longer than one.
        bridge = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_line(log_path, b'"bridge_ready"', bridge, 120)
        finally:
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
        try:
            with RssSampler(bridge.pid, 0.02) as rss:
                wait_for_line(log_path, b'"file_completed"', bridge, 600)
                drained = time.monotonic() - start
            idle_rss = rss_mib(bridge.pid)
        finally:
            bridge.terminate()
            bridge.wait(60)
        got = list(records(stack.bootstrap, "bench.files", idle=3.0,
                           deadline=time.monotonic() + 60))
        assert got, "no reference envelope in Kafka"
        envelope = got[0][1]
        assert envelope["sha256"] == upload.sha256, "sha256 mismatch"

    mib = size / 2**20
    return {"mib": mib, "segments": upload.segments, "segment_kib": args.segment_kib,
            "direct_mib_s": mib / direct, "publish_mib_s": mib / publish,
            "bridge_mib_s": mib / drained, "by_hand_mib_s": mib / by_hand,
            "ratio_direct": direct / drained, "ratio_by_hand": by_hand / drained,
            "peak_mib": rss.peak_mib, "idle_mib": idle_rss,
            "reference": envelope["reference"], "size": envelope["size"]}


if __name__ == "__main__":
    main()
