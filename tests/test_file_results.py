"""Results back to devices ([file_transfer] respond) on real servers: the answer to a fin,
on which topic, with what, and only once the outcome is in Kafka."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.devkit import simulate
from bridge.results import ANSWER_MARK
from tests.conftest import ROOT, Case
from tests.test_bridge import publish_as_device, read_until
from tests.test_large_payloads import Files

pytestmark = pytest.mark.integration


class Listener:
    """A device-side subscriber that keeps (topic, JSON payload, correlation data)."""

    def __init__(self, case: Case, *filters: str) -> None:
        self.got: list[tuple[str, Any, bytes | None]] = []
        self.user_properties: list[list[tuple[str, str]]] = []  # of each answer in `got`
        self.lock = threading.Lock()
        self.client = simulate.device_client(case.stack.mqtt_url, f"ls-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(10)

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        if not message.topic.endswith("/result") and "sessions" not in message.topic:
            return  # the uploads themselves
        with self.lock:
            self.got.append((message.topic, json.loads(message.payload),
                             getattr(message.properties, "CorrelationData", None)))
            self.user_properties.append(getattr(message.properties, "UserProperty", []))

    def wait(self, count: int, timeout: float = 30) -> list[tuple[str, Any, bytes | None]]:
        """The answers heard, once there are `count` (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def responding(case: Case, **limits: Any) -> Files:
    return Files(case, respond="true", **limits)


def test_an_upload_is_answered_ok_with_the_reference_kafka_has(case: Case) -> None:
    files = responding(case)
    bridge = case.bridge(files.config())
    data = bytes(range(256)) * 4000
    upload = files.upload("cam-1", "clip-1", data, segment_bytes=100_000, wait_result=30)
    [reference] = files.references(1)
    assert upload.result is not None
    assert isinstance(upload.result.pop("reason"), str)
    assert upload.result == {
        "file_id": "clip-1", "result": "ok", "reference": reference["reference"],
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest()}
    assert reference["reference"] == f"s3://{files.bucket}/files/cam-1/clip-1"
    assert bridge.wait_stat("file_results", 1) == 1
    # The bridge hears its own answer (it is under the prefix) and records nothing for it.
    assert bridge.wait_stat("file_results_ignored", 1) == 1
    assert read_until(case, case.dead_letter, 1, timeout=3) == []


def test_a_response_topic_and_correlation_data_are_answered_there(case: Case) -> None:
    files = responding(case)
    case.bridge(files.config())
    inbox = f"{case.prefix}/cam-2/files/inbox/result"
    listener = Listener(case, f"{case.prefix}/cam-2/files/+/result")
    try:
        correlation = b"\x00\xffrequest-7" * 10
        upload = files.upload("cam-2", "clip-2", b"hello" * 1000, wait_result=30,
                              response_topic=inbox, correlation_data=correlation)
        assert upload.result is not None and upload.result["result"] == "ok"
        got = listener.wait(1)
        time.sleep(1)  # and on no other result topic
        assert [(t, c) for t, _, c in listener.got] == [(inbox, correlation)]
        assert got[0][1]["file_id"] == "clip-2"
    finally:
        listener.close()


def test_answers_carry_the_mark_and_a_device_writing_a_result_topic_is_a_dead_letter(
        case: Case) -> None:
    files = responding(case)
    bridge = case.bridge(files.config())
    p = f"{case.prefix}/cam-8/files"
    listener = Listener(case, f"{p}/+/result")
    try:
        upload = files.upload("cam-8", "clip-8", b"marked" * 500, wait_result=30)
        assert upload.result is not None and upload.result["result"] == "ok"
        listener.wait(1)
        assert listener.user_properties == [[ANSWER_MARK]]
        assert bridge.wait_stat("file_results_ignored", 1) == 1  # its own answer
        forged = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        forged.UserProperty = [ANSWER_MARK]
        publish_as_device(case, [
            (f"{p}/clip-8/result", b'{"result": "ok"}'),  # written where it should read
            (f"{p}/clip-9/result", b'{"result": "ok"}', forged),  # it only fools itself
        ])
        [dead] = files.dead_letters(1)
        assert (dead["mqtt"]["topic"], dead["error"]["code"], dead["device_id"]) == (
            f"{p}/clip-8/result", "bad_transfer_topic", "cam-8")
        assert "answers a transfer" in dead["error"]["reason"]
        assert bridge.wait_stat("file_results_ignored", 2) == 2
        assert len(files.references(1)) == 1  # the transfer is left alone
    finally:
        listener.close()


def test_failed_transfers_are_answered_with_their_code(case: Case) -> None:
    files = responding(case, max_file_bytes=2_000_000)
    case.bridge(files.config())
    p = f"{case.prefix}/cam-3/files"
    listener = Listener(case, f"{p}/+/result")
    good = bytes(range(256)) * 1000
    init = json.dumps({"name": "x", "size": len(good),
                       "checksum": hashlib.sha256(good).hexdigest()}).encode()
    try:
        publish_as_device(case, [
            (f"{p}/corrupt/init", init),
            (f"{p}/corrupt/0", good[:100_000]),
            (f"{p}/corrupt/100000", b"X" * 156_000),
            (f"{p}/corrupt/fin/{len(good)}", b""),
            (f"{p}/missing/init", init),
            (f"{p}/missing/0", good[:100_000]),
            (f"{p}/missing/fin/{len(good)}", b""),
            # refused at init: the fin is answered with that first refusal
            (f"{p}/huge/init", json.dumps({"name": "x", "size": 3_000_000,
                                           "checksum": "0" * 64}).encode()),
            (f"{p}/huge/fin/3000000", b""),
            (f"{p}/nofin/init", init),  # no fin: nothing to answer
        ])
        got = {t.split("/")[3]: doc for t, doc, _ in listener.wait(3)}
        assert {k: doc["result"] for k, doc in got.items()} == {
            "corrupt": "checksum_mismatch", "missing": "missing_segments",
            "huge": "file_too_large"}
        assert "sha256" in got["corrupt"]["reason"] and "reference" not in got["corrupt"]
        assert "100000" in got["missing"]["reason"]
        assert got["huge"]["file_id"] == "huge"
        # Each answer came after its dead letter: it is in Kafka by now.
        dead = {(e["mqtt"]["topic"].split("/")[3], e["error"]["code"])
                for e in files.dead_letters(4)}
        assert dead >= {("corrupt", "checksum_mismatch"), ("missing", "missing_segments"),
                        ("huge", "file_too_large"), ("huge", "unknown_transfer")}
    finally:
        listener.close()


def test_a_response_topic_outside_the_devices_results_is_answered_on_the_default(
        case: Case) -> None:
    files = responding(case)
    bridge = case.bridge(files.config())
    other = f"{case.prefix}/cam-5/files/clip-4/result"
    presence = f"mqtt-kafka-bridge/sessions/{case.prefix}"
    listener = Listener(case, f"{case.prefix}/#", presence)
    try:
        for n, asked in enumerate([other, presence, f"{case.prefix}/cam-4/telemetry",
                                   f"{case.prefix}/cam-4/files/clip-x/fin/1"]):
            upload = files.upload("cam-4", f"clip-{n}", b"data" * 100, wait_result=2,
                                  response_topic=asked, correlation_data=b"c")
            assert upload.result is None  # not where it asked
        answers = [(t, c) for t, _, c in listener.wait(4)]
        assert sorted(answers) == [(f"{case.prefix}/cam-4/files/clip-{n}/result", b"c")
                                   for n in range(4)]
        assert bridge.wait_stat("file_result_topics_refused", 4) == 4
    finally:
        listener.close()


def test_with_respond_off_nothing_is_published(case: Case) -> None:
    files = Files(case)
    bridge = case.bridge(files.config())
    listener = Listener(case, f"{case.prefix}/#")
    try:
        upload = files.upload("cam-6", "clip-6", b"quiet" * 100, wait_result=3)
        assert upload.result is None
        assert len(files.references(1)) == 1
        assert listener.wait(1, timeout=1) == []
        assert "file_results" not in bridge.stats()[-1]
    finally:
        listener.close()


def test_simulate_file_waits_for_the_result_and_prints_it(case: Case, tmp_path: Path) -> None:
    files = responding(case)
    case.bridge(files.config())
    source = tmp_path / "x.bin"
    source.write_bytes(b"z" * 5000)
    done = subprocess.run([sys.executable, "-m", "bridge", "simulate", "--url",
                           case.stack.mqtt_url, "--file", str(source), "--prefix", case.prefix,
                           "--device-id", "cam-7", "--wait-result", "30"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    line = done.stdout.splitlines()[-1]
    assert line.startswith("result: ")
    result = json.loads(line.removeprefix("result: "))
    assert result["result"] == "ok" and result["size"] == 5000
    assert result["reference"].startswith(f"s3://{files.bucket}/files/cam-7/f")
