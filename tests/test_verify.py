"""verify: the arithmetic on hand-made logs and records (no servers), then the command against
a real Tansu (and moto S3 for references), with records written as the bridge writes them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import uuid
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from confluent_kafka import Producer

from bridge import envelope
from bridge.devkit import verify
from bridge.devkit.localstack import S3_REGION, LocalStack, s3_environment
from bridge.devkit.verify import Checker, LogError, Record, Report, check, parse_log, percentiles
from bridge.devkit.verify_io import render
from bridge.message import Message
from tests.conftest import ROOT

RUN = "r1764600000-3f2a"
LINEAGE = envelope.Lineage("test", "telemetry", "v1")
SENT = 1_764_600_000_000_000_000  # ns: every test publish is sent at this instant + offsets


def line(device: str, seq: int, outcome: str = "acked", run: str = RUN, **extra: Any) -> str:
    """A telemetry line as simulate --log writes it."""
    return json.dumps({"run": run, "device_id": device, "seq": seq,
                       "topic": f"devices/{device}/telemetry", "qos": 1, "sent_ns": SENT,
                       "outcome": outcome, **extra})


def body(device: str, seq: int, run: str = RUN, sent_ns: int = SENT) -> bytes:
    return json.dumps({"device_id": device, "seq": seq, "sent_ns": sent_ns, "run": run,
                       "pad": "xx"}).encode()


def message(device: str, payload: bytes, arrival_ms: int) -> Message:
    return Message("mqtt://broker", f"devices/{device}/telemetry", payload, 1, False, False,
                   arrival_ms)


def value(device: str, seq: int, run: str = RUN, arrival_ms: int = SENT // 10**6 + 2,
          envelope_device: str | None = None) -> bytes:
    """The envelope the bridge writes for one simulate publish."""
    return envelope.encode(message(device, body(device, seq, run), arrival_ms),
                           envelope_device or device, LINEAGE)


def record(raw: bytes, topic: str = "iot.telemetry", timestamp_ms: int | None = None,
           offset: int = 0) -> Record:
    try:
        decoded: dict[str, Any] | None = envelope.decode(raw)
    except ValueError:
        decoded = None
    stamp = SENT // 10**6 + 5 if timestamp_ms is None else timestamp_ms
    return Record(topic, 0, offset, stamp, decoded)


def telemetry(device: str, seq: int, **kwargs: Any) -> Record:
    return record(value(device, seq), **kwargs)


# --- the arithmetic --------------------------------------------------------------------------


def test_every_acked_publish_found_is_ok() -> None:
    lines = [line("dev-1", s) for s in range(3)]
    report = check(lines, [telemetry("dev-1", s) for s in range(3)])
    assert (report.acked, report.found, report.lost, report.ok) == (3, 3, 0, True)
    assert (report.duplicates, report.unexpected, report.foreign) == (0, 0, 0)
    assert report.topics["iot.telemetry"].matched == 3


def test_an_acked_publish_absent_is_lost_and_named() -> None:
    lines = [line(d, s) for d in ("dev-1", "dev-2") for s in range(4)]
    report = check(lines, [telemetry(d, s) for d in ("dev-1", "dev-2") for s in range(4)
                           if (d, s) not in {("dev-1", 2), ("dev-2", 0)}])
    assert (report.acked, report.found, report.lost, report.ok) == (8, 6, 2, False)
    assert report.lost_first == [{"run": RUN, "device_id": "dev-1", "seq": 2},
                                 {"run": RUN, "device_id": "dev-2", "seq": 0}]


def test_duplicates_count_publishes_and_extra_copies() -> None:
    lines = [line("dev-1", 0), line("dev-1", 1)]
    copies = [telemetry("dev-1", 0)] * 3 + [telemetry("dev-1", 1)] * 2
    report = check(lines, copies)
    assert (report.lost, report.duplicates, report.extra_copies) == (0, 2, 3)
    assert report.topics["iot.telemetry"].extra_copies == 3
    assert report.topics["iot.telemetry"].kafka.tolist() == [5000, 5000]  # first copies only


def test_a_record_of_a_logged_run_the_log_lacks_is_unexpected() -> None:
    lines = [line("dev-1", 0)]
    report = check(lines, [telemetry("dev-1", 0), telemetry("dev-1", 7, offset=1),
                           telemetry("dev-9", 0, offset=2),
                           record(value("dev-1", 0, envelope_device="dev-2"), offset=3)])
    assert (report.found, report.lost, report.unexpected, report.foreign) == (1, 0, 3, 0)
    assert [u["offset"] for u in report.unexpected_first] == [1, 2, 3]
    assert report.unexpected_first[0]["why"] == f"dev-1 seq 7 of run {RUN} is not in the log"
    assert "device_id 'dev-2' in the envelope" in report.unexpected_first[2]["why"]


def test_records_of_no_logged_run_are_foreign() -> None:
    other_run = value("dev-1", 0, run="r-other")
    old_payload = envelope.encode(message("dev-1", b'{"device": "dev-1", "seq": 0}', 1),
                                  "dev-1", LINEAGE)
    binary = envelope.encode(message("dev-1", b"\x00\x01", 1), "dev-1", LINEAGE)
    report = check([line("dev-1", 0)], [record(other_run), record(old_payload), record(binary),
                                        record(b"not msgpack at all"), telemetry("dev-1", 0)])
    assert (report.foreign, report.unexpected, report.lost) == (4, 0, 0)
    assert report.topics["iot.telemetry"].foreign == 4


def dead_letter_value(device: str, seq: int, code: str) -> bytes:
    return envelope.encode_dead_letter(message(device, body(device, seq), 1), device, LINEAGE,
                                       code, "refused for the test")


def dead_letter(device: str, seq: int, code: str, topic: str = "iot.deadletter") -> Record:
    return record(dead_letter_value(device, seq, code), topic=topic)


def test_dead_letters_settle_acked_publishes_per_code() -> None:
    lines = [line("dev-1", s) for s in range(4)]
    records = [telemetry("dev-1", 0), dead_letter("dev-1", 1, "bad_payload"),
               dead_letter("dev-1", 2, "bad_payload"), dead_letter("dev-1", 3, "unknown_device")]
    report = check(lines, records)
    assert (report.found, report.lost, report.unexpected) == (4, 0, 0)
    assert report.dead_lettered == {"bad_payload": 2, "unknown_device": 1}
    assert report.topics["iot.deadletter"].dead_lettered == 3
    assert report.topics["iot.deadletter"].kafka.tolist() == []  # no latency for dead letters


def test_unknown_that_arrived_is_not_unexpected_and_refused_is_not_expected() -> None:
    lines = [line("dev-1", 0), line("dev-1", 1, "unknown"), line("dev-1", 2, "unknown"),
             line("dev-1", 3, "refused", reason_code=135), line("dev-1", 4, "sent", qos=0),
             line("dev-1", 5, "sent", qos=0)]
    report = check(lines, [telemetry("dev-1", 0), telemetry("dev-1", 1), telemetry("dev-1", 4)])
    assert (report.acked, report.found, report.lost, report.unexpected) == (1, 1, 0, 0)
    assert (report.unknown, report.unknown_arrived) == (2, 1)
    assert (report.refused, report.refused_arrived) == (1, 0)
    assert (report.qos0_sent, report.qos0_arrived) == (2, 1)


def test_a_publish_logged_twice_takes_its_strongest_outcome() -> None:
    lines = [line("dev-1", 0, "unknown"), line("dev-1", 0, "acked"), line("dev-1", 0, "unknown")]
    report = check(lines, [])
    assert (report.acked, report.unknown, report.lost) == (1, 0, 1)


def test_a_huge_seq_does_not_allocate_its_range() -> None:
    log = parse_log([line("dev-1", 10**12), line("dev-1", 0)])
    stream = log.runs[RUN]["dev-1"]
    assert len(stream.dense) == 1 and list(stream.sparse) == [10**12]
    report = check([line("dev-1", 10**12)], [telemetry("dev-1", 10**12)])
    assert (report.found, report.lost) == (1, 0)


def test_a_seq_kept_apart_is_still_found_once_the_dense_range_reaches_it() -> None:
    lines = [line("dev-1", 5000)] + [line("dev-1", s, "unknown") for s in range(5002)]
    log = parse_log(lines)
    assert not log.runs[RUN]["dev-1"].sparse
    report = check(lines, [])
    assert (report.acked, report.lost, report.unknown) == (1, 1, 5001)


DATA = b"file content " * 1000
SHA = hashlib.sha256(DATA).hexdigest()


def file_line(file_id: str, size: int = len(DATA), sha256: str = SHA) -> str:
    return json.dumps({"run": RUN, "kind": "file", "device_id": "dev-0", "file_id": file_id,
                       "name": "x.bin", "size": size, "sha256": sha256,
                       "topic": f"devices/dev-0/files/{file_id}", "qos": 1, "sent_ns": SENT,
                       "outcome": "acked", "acked_ns": SENT + 1})


def file_record(file_id: str, size: int = len(DATA), sha256: str = SHA) -> Record:
    fin = Message("mqtt://broker", f"devices/dev-0/files/{file_id}/fin/{size}", b"", 1, False,
                  False, 1)
    raw = envelope.encode_reference(fin, "dev-0", LINEAGE, "application/octet-stream",
                                    f"s3://bucket/files/dev-0/{file_id}", size, sha256,
                                    file={"id": file_id, "name": "x.bin", "user_data": None})
    return record(raw, topic="iot.files")


class FakeS3:
    """Objects by reference, for the checker's `objects`."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def payload(self, reference: str, limit: int) -> bytes | None:
        return self.objects.get(reference)

    def digest(self, reference: str) -> tuple[int, str] | None:
        data = self.objects.get(reference)
        return None if data is None else (len(data), hashlib.sha256(data).hexdigest())


def test_file_records_are_matched_by_device_and_file_id_and_checked() -> None:
    lines = [file_line("f1"), file_line("f2"), file_line("f3", sha256="ab" * 32)]
    records = [file_record("f1"), file_record("f2", size=5), file_record("f3"),
               file_record("f-other")]
    report = check(lines, records)
    assert (report.acked, report.found, report.files_acked, report.files_found) == (3, 1, 3, 1)
    assert (report.lost, report.unexpected, report.foreign) == (2, 2, 1)
    assert {"device_id": "dev-0", "file_id": "f2"} in report.lost_first
    assert "size 5 sha256" in report.unexpected_first[0]["why"]


def test_a_followed_file_reference_is_checked_against_the_stored_bytes() -> None:
    lines = [file_line("f1"), file_line("f2"), file_line("f3")]
    s3 = FakeS3({"s3://bucket/files/dev-0/f1": DATA, "s3://bucket/files/dev-0/f2": b"torn"})
    report = check(lines, [file_record(f) for f in ("f1", "f2", "f3")], s3)
    assert (report.found, report.lost, report.unexpected) == (1, 2, 2)
    whys = [u["why"] for u in report.unexpected_first]
    assert "holds size 4 sha256" in whys[0] and "f3 is not in S3" in whys[1]


def test_a_dead_letter_of_a_file_transfer_settles_the_file() -> None:
    fin = Message("mqtt://broker", "devices/dev-0/files/f1/fin/13000", b"", 1, False, False, 1)
    raw = envelope.encode_dead_letter(fin, "dev-0", LINEAGE, "missing_segments", "gap at 0")
    report = check([file_line("f1")], [record(raw, topic="iot.deadletter")])
    assert (report.found, report.lost, report.dead_lettered) == (1, 0, {"missing_segments": 1})


def reference_record(device: str, seq: int) -> tuple[Record, str, bytes]:
    payload = body(device, seq)
    ref = f"s3://bucket/payloads/{device}-{seq}"
    raw = envelope.encode_reference(message(device, payload, SENT // 10**6 + 1), device,
                                    LINEAGE, "application/json", ref, len(payload),
                                    hashlib.sha256(payload).hexdigest())
    return record(raw), ref, payload


def test_telemetry_by_reference_is_read_only_when_followed() -> None:
    (first, ref, payload), (second, _, _) = reference_record("dev-1", 0), \
        reference_record("dev-1", 1)
    lines = [line("dev-1", 0), line("dev-1", 1)]
    followed = check(lines, [first, second], FakeS3({ref: payload}))
    assert (followed.found, followed.lost, followed.unexpected) == (1, 1, 1)
    assert followed.unexpected_first[0]["why"] == "s3://bucket/payloads/dev-1-1 is not in S3"
    unfollowed = check(lines, [first, second])
    assert (unfollowed.found, unfollowed.unread_references, unfollowed.foreign) == (0, 2, 0)
    assert "pass --s3-endpoint URL or --follow-references" in render(unfollowed)


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    random.Random(1).shuffle(values)
    assert percentiles(array("q", values), (50, 99, 100)) == [50, 99, 100]
    assert percentiles([7], (50, 99)) == [7, 7]
    assert percentiles([1, 2], (50, 99)) == [1, 2]
    latency = verify.Latency.of(array("q", [v * 1000 for v in values]))
    assert (latency.count, latency.p50, latency.p99, latency.max) == (100, 50.0, 99.0, 100.0)


@pytest.mark.parametrize("shape", ["uniform", "clustered", "constant"])
def test_percentiles_of_many_values_equal_a_full_sort(shape: str) -> None:
    rng = random.Random(shape)
    n = 200_000  # above the size the selection sorts outright
    if shape == "uniform":
        values = [rng.randrange(10**9) for _ in range(n)]
    elif shape == "clustered":  # most near 3 ms, a few tens of seconds late
        values = [rng.randrange(2900, 3100) for _ in range(n - 50)] + [60_000_000] * 50
    else:
        values = [4200] * n
    ordered = sorted(values)
    expected = [ordered[-(-p * n // 100) - 1] for p in (1, 50, 99, 100)]
    assert percentiles(array("q", values), (1, 50, 99, 100)) == expected


def test_latency_runs_from_sent_ns_to_the_kafka_timestamp_and_to_arrival() -> None:
    checker = Checker(parse_log([line("dev-1", s) for s in range(3)]))
    for seq in range(3):  # sent at SENT + seq ms; Kafka at +10 ms + seq; the bridge at +4 ms
        raw = envelope.encode(message("dev-1", body("dev-1", seq, sent_ns=SENT + seq * 10**6),
                                      SENT // 10**6 + 4), "dev-1", LINEAGE)
        checker.add(record(raw, timestamp_ms=SENT // 10**6 + 10 + seq))
    latency = checker.report().topics["iot.telemetry"].latency()
    assert (latency["kafka"].p50, latency["kafka"].max) == (10.0, 10.0)
    assert (latency["arrival"].p50, latency["arrival"].p99, latency["arrival"].max) == \
        (3.0, 4.0, 4.0)


def test_an_empty_topic_has_its_row_and_no_latency() -> None:
    checker = Checker(parse_log([line("dev-1", 0)]))
    checker.topic("iot.empty")
    report = checker.report("idle")
    assert report.topics["iot.empty"].records == 0 and report.lost == 1
    out = json.loads(json.dumps(report.to_json()))
    assert out["verdict"] == "lost" and out["stopped"] == "idle"
    assert out["topics"]["iot.empty"]["latency_ms"]["kafka"] == \
        {"count": 0, "p50": None, "p99": None, "max": None}
    table = render(report)
    assert "iot.empty" in table and table.endswith("lost 1: LOST (first: dev-1 seq 0)")
    assert "stopped on idle before every acked publish was found" in table


@pytest.mark.parametrize(("bad", "why"), [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: not a JSON object: list"),
    (json.dumps({"run": RUN, "device_id": "d", "outcome": "acked"}),
     "line 2: seq must be an integer >= 0, got None"),
    (line("d", 0, "maybe"), "line 2: outcome must be one of refused, sent, unknown, acked, got "
     "'maybe'"),
    (line("d", 0, kind="photo"), "line 2: kind must be telemetry or file, got 'photo'"),
    (line("d", 0, outcome=["acked"]), "line 2: outcome must be one of"),
    (line("d", 0, kind=["file"]), "line 2: kind must be telemetry or file, got ['file']"),
])
def test_a_bad_log_line_is_named_by_its_number(bad: str, why: str) -> None:
    with pytest.raises(LogError) as raised:
        parse_log([line("d", 0), bad, line("d", 1)])
    assert str(raised.value).startswith(why) and raised.value.line == 2


def test_blank_lines_are_skipped() -> None:
    log = parse_log([b"\n", line("d", 0).encode() + b"\n", b"  \n"])
    assert log.acked == 1


# --- the command: mistakes need no servers ---------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", "verify", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=env)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    [text] = done.stderr.splitlines()
    return text


@pytest.fixture
def refusing_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def good_log(tmp_path: Path) -> Path:
    path = tmp_path / "sim.log"
    path.write_text(line("dev-1", 0) + "\n")
    return path


def test_verify_refuses_a_bad_empty_or_unreadable_log(tmp_path: Path) -> None:
    log = tmp_path / "sim.log"
    log.write_text(line("dev-1", 0) + "\n" + line("dev-1", 1)[:20] + "\n")
    common = ("--bootstrap", "127.0.0.1:9", "--topic", "t")
    assert one_line(cli("--log", str(log), *common)).startswith(
        f"mqtt-kafka-bridge verify: --log {log} line 2: not JSON (")
    log.write_text("\n")
    assert one_line(cli("--log", str(log), *common)) == (
        f"mqtt-kafka-bridge verify: --log {log} holds no publishes: run simulate --log {log} "
        "first")
    assert one_line(cli("--log", str(tmp_path / "nope.log"), *common)) == (
        f"mqtt-kafka-bridge verify: cannot read --log {tmp_path / 'nope.log'}: No such file or "
        "directory")


def test_verify_says_in_one_line_that_kafka_is_unreachable(good_log: Path,
                                                          refusing_port: int) -> None:
    bootstrap = f"127.0.0.1:{refusing_port}"
    assert one_line(cli("--bootstrap", bootstrap, "--log", str(good_log), "--topic", "t")) == (
        f"mqtt-kafka-bridge verify: cannot reach Kafka at {bootstrap} (Failed to get metadata: "
        "Local: Broker transport failure): is it running? check --bootstrap")


def test_verify_says_in_one_line_that_s3_is_unreachable(good_log: Path, refusing_port: int,
                                                       tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{refusing_port}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **s3_environment()}
    text = one_line(cli("--bootstrap", "127.0.0.1:9", "--log", str(good_log), "--topic", "t",
                        "--s3-endpoint", url, env=env))
    assert text.startswith(f"mqtt-kafka-bridge verify: cannot reach S3 (Could not "
                           f"connect to the endpoint URL: \"{url}/\"")
    assert text.endswith("is it running? check --s3-endpoint")


def test_verify_takes_one_way_to_s3(good_log: Path) -> None:
    done = cli("--bootstrap", "x:1", "--log", str(good_log), "--topic", "t", "--s3-endpoint",
               "http://x", "--follow-references")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


# --- the command against a real Tansu (and moto) ---------------------------------------------


def produce(stack: LocalStack, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": stack.bootstrap, "acks": "all"})
    for n, raw in enumerate(values):
        producer.produce(topic, raw, key=str(n).encode())
    assert producer.flush(30) == 0


@pytest.fixture
def topics(stack: LocalStack) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    names = (f"verify.{tag}", f"verify-dl.{tag}")
    stack.create_topics(list(names))
    return names


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{text}\n" for text in lines))
    return path


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in done.stderr, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@pytest.mark.integration
def test_verify_exits_0_when_kafka_holds_every_logged_message(
        stack: LocalStack, topics: tuple[str, str], tmp_path: Path) -> None:
    data, dead = topics
    devices = [f"dev-{n:05}" for n in range(3)]
    log = write_log(tmp_path / "sim.log", [line(d, s) for d in devices for s in range(10)] +
                    [line("dev-00000", 10), line("dev-00000", 11, "unknown")])
    produce(stack, data, [value(d, s) for d in devices for s in range(10)] + [value(devices[1], 4)])
    produce(stack, dead, [dead_letter_value("dev-00000", 10, "bad_payload")])
    done = cli("--bootstrap", stack.bootstrap, "--log", str(log), "--topic", data, "--topic",
               dead, "--json", "--idle", "5")
    out = report_of(done)
    assert done.returncode == 0, done.stderr
    assert (out["verdict"], out["acked"], out["found"], out["lost"]) == ("ok", 31, 31, 0)
    assert (out["duplicates"], out["extra_copies"]) == (1, 1)
    assert out["dead_lettered"] == {"bad_payload": 1}
    assert (out["unknown"], out["unknown_arrived"], out["stopped"]) == (1, 0, "all found")
    assert out["topics"][data]["records"] == 31
    assert out["topics"][data]["latency_ms"]["kafka"]["count"] == 30


@pytest.mark.integration
def test_verify_names_exactly_the_missing_messages_and_exits_1(
        stack: LocalStack, topics: tuple[str, str], tmp_path: Path) -> None:
    data, _ = topics
    log = write_log(tmp_path / "sim.log", [line("dev-1", s) for s in range(20)])
    missing = {3, 11, 19}
    produce(stack, data, [value("dev-1", s) for s in range(20) if s not in missing])
    done = cli("--bootstrap", stack.bootstrap, "--log", str(log), "--topic", data, "--json",
               "--idle", "2")
    assert done.returncode == 1, done.stderr
    out = report_of(done)
    assert (out["lost"], out["found"], out["stopped"]) == (3, 17, "idle")
    assert out["lost_first"] == [{"run": RUN, "device_id": "dev-1", "seq": s}
                                 for s in sorted(missing)]
    table = cli("--bootstrap", stack.bootstrap, "--log", str(log), "--topic", data, "--idle", "2")
    assert table.returncode == 1
    assert table.stdout.splitlines()[-1] == \
        "lost 3: LOST (first: dev-1 seq 3, dev-1 seq 11, dev-1 seq 19)"


@pytest.mark.integration
def test_verify_follows_references_into_s3(stack: LocalStack, topics: tuple[str, str],
                                           tmp_path: Path) -> None:
    data, _ = topics
    bucket = f"verify-{uuid.uuid4().hex[:8]}"
    stack.create_bucket(bucket)
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=S3_REGION,
                      **{k.lower(): v for k, v in s3_environment().items()
                         if k != "AWS_DEFAULT_REGION"})
    payload = body("dev-1", 0)
    s3.put_object(Bucket=bucket, Key="payloads/p0", Body=payload)
    s3.put_object(Bucket=bucket, Key="files/dev-0/f1", Body=DATA)
    reference = envelope.encode_reference(message("dev-1", payload, 1), "dev-1", LINEAGE, "x",
                                          f"s3://{bucket}/payloads/p0", len(payload),
                                          hashlib.sha256(payload).hexdigest())
    fin = Message("b", "devices/dev-0/files/f1/fin/13000", b"", 1, False, False, 1)
    file_env = envelope.encode_reference(fin, "dev-0", LINEAGE, "x", f"s3://{bucket}/files/"
                                         "dev-0/f1", len(DATA), SHA, file={"id": "f1"})
    produce(stack, data, [reference, file_env])
    log = write_log(tmp_path / "sim.log", [line("dev-1", 0), file_line("f1")])
    args = ("--bootstrap", stack.bootstrap, "--log", str(log), "--topic", data, "--json",
            "--idle", "3")
    env = {**os.environ, **s3_environment()}
    followed = cli(*args, "--s3-endpoint", stack.s3_endpoint, env=env)
    assert followed.returncode == 0, followed.stderr
    out = report_of(followed)
    assert (out["found"], out["files_found"], out["unexpected"]) == (2, 1, 0)
    unfollowed = report_of(cli(*args, env=env))
    assert (unfollowed["lost"], unfollowed["unread_references"]) == (1, 1)


@pytest.mark.integration
def test_verify_of_a_missing_topic_names_the_topics_there(stack: LocalStack,
                                                          topics: tuple[str, str],
                                                          good_log: Path) -> None:
    missing = f"verify.missing.{uuid.uuid4().hex[:8]}"
    text = one_line(cli("--bootstrap", stack.bootstrap, "--log", str(good_log), "--topic",
                        topics[0], "--topic", missing))
    assert text.startswith(f"mqtt-kafka-bridge verify: Kafka at {stack.bootstrap} has no topic "
                           f"'{missing}': check its name (topics there: ")


def test_report_is_a_dataclass_the_benchmarks_read() -> None:
    report = check([line("d", 0)], [telemetry("d", 0)])
    assert isinstance(report, Report)
    assert report.topics["iot.telemetry"].latency()["kafka"].p99 == 5.0
