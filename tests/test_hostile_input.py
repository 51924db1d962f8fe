"""The promise under hostile input, on real servers (Mosquitto, Tansu, moto's S3).

Each test attacks the bridge as a device or an unlucky operator would, with a canary device
publishing alongside: the canary's messages must keep arriving, and every QoS 1 message sent
must end in exactly one place (its topic, or the dead-letter topic, whole or by reference),
acked once that is durable. Each finding of the hostile-input review has its test here.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from bridge.devkit import simulate
from tests.conftest import Bridge, Case
from tests.test_bridge import publish_as_device
from tests.test_large_payloads import Files

pytestmark = pytest.mark.integration
Sent = list[tuple[str, bytes]]


class Ledger:
    """The QoS 1 messages a test sent (file transfers aside): each must end in one place."""

    def __init__(self, case: Case, files: Files | None = None) -> None:
        self.case, self.files = case, files
        self.sent: Sent = []
        self._lock = threading.Lock()

    def publish(self, messages: Sent) -> None:
        publish_as_device(self.case, messages)
        self.add(messages)

    def add(self, messages: Sent) -> None:
        with self._lock:
            self.sent += messages

    def assert_settled(self, topics: list[str], timeout: float = 60) -> dict[str, Any]:
        """Every message sent is in exactly one of `topics` (duplicates in that one are
        at-least-once); a body kept by reference is whole in S3. Returns each message's
        envelope by (topic, sha256) for further checks."""
        wanted = {(topic, _sha(payload)) for topic, payload in self.sent}
        deadline = time.monotonic() + timeout
        while True:
            places: dict[tuple[str, str], set[str]] = defaultdict(set)
            envelopes: dict[Any, Any] = {}
            for topic in topics:
                for _, env in self.case.read(topic):
                    key = (env["mqtt"]["topic"], env.get("sha256") or _sha(env["body"]))
                    places[key].add(topic)
                    envelopes[key] = env
            if wanted <= set(places) or time.monotonic() > deadline:
                break
            time.sleep(1)
        missing = wanted - set(places)
        assert not missing, f"{len(missing)} messages never arrived, e.g. {sorted(missing)[:3]}"
        twice = {k: v for k, v in places.items() if k in wanted and len(v) > 1}
        assert not twice, f"messages in more than one place: {twice}"
        for key in wanted:
            env = envelopes[key]
            assert not env.get("truncated"), f"{key}: body cut although S3 is configured"
            if "reference" in env and self.files is not None:
                assert self.files.object_sha256(env["reference"]) == env["sha256"]
        return {key: envelopes[key] for key in wanted}


class Canary(threading.Thread):
    """A well-behaved device publishing beside the attack until stopped."""

    def __init__(self, ledger: Ledger, kind: str = "telemetry", rate: float = 20) -> None:
        super().__init__(daemon=True)
        self.ledger, self.kind, self.rate = ledger, kind, rate
        self.stop = threading.Event()
        self.device = f"canary-{kind}"

    def run(self) -> None:
        case = self.ledger.case
        client = simulate.device_client(case.stack.mqtt_url,
                                        f"{self.device}-{uuid.uuid4().hex[:6]}")
        try:
            seq = 0
            while not self.stop.wait(1 / self.rate):
                message = (f"{case.prefix}/{self.device}/{self.kind}",
                           simulate.payload(self.device, seq, 100))
                simulate.publish_all(client, [message], qos=1)
                self.ledger.add([message])
                seq += 1
        finally:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> Canary:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(30)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_all_acked(bridge: Bridge, timeout: float = 60) -> dict[str, Any]:
    """At rest every QoS 1 message received was acked: nothing is left unsettled."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = bridge.stats()
        last = stats[-1] if stats else {}
        received = last.get("received_messages")
        if received and received == last.get("mqtt_acks_sent") and \
                not last.get("in_flight_messages"):
            return last
        time.sleep(0.5)
    raise AssertionError(f"received {last.get('received_messages')} but acked "
                         f"{last.get('mqtt_acks_sent')}")


def hostile_config(case: Case, files: Files, receive_max: int = 5, extra_routes: str = "",
                   registry: str = "", shared: bool = False) -> Path:
    """Routes on every lane; a small window, so one unsettled message would stop its lane."""
    (case.tmp / "devices.toml").write_text(registry or '[devices."canary-alerts"]\n'
                                           '[devices."fault-auth"]\n')
    p = case.prefix
    share = '\nshare_group = "bridges"' if shared else ""
    return case.config(extra_broker=f"receive_max = {receive_max}{share}", extra=files.extra +
                       '[registry]\nfile = "devices.toml"\n', routes=f"""
[[routes]]
name = "telemetry"
filter = "{p}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
[[routes]]
name = "readings"
filter = "{p}/{{device_id}}/readings"
kafka_topic = "{case.topic}"
format = "json"
[[routes]]
name = "big"
filter = "{p}/{{device_id}}/big"
kafka_topic = "{case.topic}"
inline_max_bytes = 600000
[[routes]]
name = "alerts"
filter = "{p}/{{device_id}}/alerts"
kafka_topic = "{case.topic}"
lane = "fast"
auth = "registry"
{extra_routes}""")


# ------------------------------------------------------------------ 1. poison messages


def test_whatever_a_stage_raises_the_message_is_dead_lettered_and_its_lane_flows(
        case: Case) -> None:
    """A fault injected at every stage (route, auth, format, envelope, offload, producing,
    each file-transfer step, dead-letter encoding) costs one dead letter, never a lane."""
    files = Files(case)
    bridge = case.bridge(hostile_config(case, files), module="tests.faults")
    ledger, p = Ledger(case, files), case.prefix
    with Canary(ledger, "telemetry"), Canary(ledger, "alerts"):
        ledger.publish([
            (f"{p}/fault-route/telemetry", b"route"),
            (f"{p}/fault-auth/alerts", b"auth"),
            (f"{p}/fault-envelope/telemetry", b"envelope"),
            (f"{p}/fault-offload/telemetry", b"o" * 100_000),  # over inline_max: to S3
            (f"{p}/d1/readings", b'{"x": "fault-format"}'),
            (f"{p}/d2/readings", json.dumps({"pad": "fault-format" + "x" * 100_000}).encode()),
            (f"{p}/fault-deadletter/readings", b"{not json"),
            (f"{p}/fault-produce/telemetry", b"produce"),
            (f"{p}/fault-toolarge/telemetry", b"t" * 300_000),  # its reference is refused
            (f"{p}/fault-toolarge/big", b"b" * 400_000),  # inline, refused, kept in S3
        ])
        for stage in ("init", "segment", "finish", "reference"):
            files.upload(f"fault-{stage}", "f1", b"%d" % time.time_ns() * 1000,
                   segment_bytes=4000)
        good = files.upload("canary-files", "after", b"fine" * 5000, segment_bytes=4000)
        time.sleep(2)
    envelopes = ledger.assert_settled([case.topic, case.dead_letter])
    dead = [env for env in envelopes.values() if "error" in env]
    internal = [env["error"]["reason"] for env in dead if env["error"]["code"] == "internal_error"]
    for stage in ("route", "auth", "envelope", "offload", "format", "produce"):
        assert any(f"RuntimeError: injected fault in {stage}" in r for r in internal), stage
    assert sum("injected fault in format" in r for r in internal) == 2  # on and off the loop
    minimal = next(env for env in dead if env["mqtt"]["topic"].startswith(f"{p}/fault-dead"))
    assert minimal["error"]["code"] == "bad_payload"
    assert "record simplified" in minimal["error"]["reason"]
    too_large = [env for env in dead if env["error"]["code"] == "record_too_large"]
    assert {env["reference"].split("/")[3] for env in too_large} == {"payloads", "dead-letter"}
    # The file-transfer steps: each fault is an internal_error dead letter of that device.
    steps = ("init", "segment", "finish", "reference")
    deadline = time.monotonic() + 60
    while True:
        crashed = {env["device_id"]: env["error"]["reason"] for env in files.dead_letters(1)
                   if env["error"]["code"] == "internal_error"}
        if all(f"fault-{s}" in crashed for s in steps) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for stage in steps:
        assert f"injected fault in {stage}" in crashed.get(f"fault-{stage}", ""), stage
    [reference] = [env for env in files.references(1) if env["device_id"] == "canary-files"]
    assert reference["sha256"] == good.sha256
    wait_all_acked(bridge)
    # Every transfer ended, crashed ones too: none is left counted as active.
    deadline = time.monotonic() + 15
    while bridge.stats()[-1].get("file_transfers_active") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not bridge.stats()[-1].get("file_transfers_active"), bridge.stats()[-1]


def test_poison_inits_are_refused_and_other_uploads_complete_across_a_restart(
        case: Case) -> None:
    """An init nested 30,000 deep, and one whose user_data no envelope can carry (an integer
    beyond 64 bits), used to crash their job, wedge the fat lane and crash again after a
    restart: now each is a bad_transfer_init dead letter and acked."""
    files = Files(case)
    config = hostile_config(case, files)
    bridge = case.bridge(config)
    p = f"{case.prefix}/poison/files"
    checksum = "0" * 64
    deep = b'{"name": "x", "size": 1, "checksum": "%s", "user_data": %s%s}' % (
        checksum.encode(), b"[" * 30_000, b"]" * 30_000)
    huge = json.dumps({"name": "x", "size": 1, "checksum": checksum,
                       "user_data": {"n": 2**70}}).encode()
    publish_as_device(case, [(f"{p}/deep/init", deep), (f"{p}/huge/init", huge)])
    uploads = [files.upload("other", f"clip-{i}", b"%05d" % i * 2000, segment_bytes=3000)
               for i in range(8)]
    assert {env["sha256"] for env in files.references(8)} == {u.sha256 for u in uploads}
    dead = {env["mqtt"]["topic"].split("/")[3]: env["error"] for env in files.dead_letters(2)}
    assert dead["deep"]["code"] == dead["huge"]["code"] == "bad_transfer_init"
    assert "nested too deeply" in dead["deep"]["reason"]
    assert "OverflowError" in dead["huge"]["reason"]
    wait_all_acked(bridge)
    bridge.terminate()
    restarted = case.bridge(config)  # nothing is redelivered: both were acked
    time.sleep(3)
    assert len(files.dead_letters(2)) == 2
    assert not [e for e in restarted.events() if e.get("event") == "internal_error"]


# ------------------------------------------------------------------ 2. payloads past 16 MiB


def test_payloads_far_past_16_mib_arrive_by_reference(case: Case) -> None:
    """The bridge announces MQTT's maximum packet size, so a broker that takes a 40 MiB
    PUBLISH from a device also passes it on, rather than dropping it after its PUBACK."""
    files = Files(case)
    case.bridge(hostile_config(case, files))
    ledger = Ledger(case, files)
    with Canary(ledger):
        ledger.publish([(f"{case.prefix}/cam/telemetry", bytes([i]) * (17 * 2**20 + i))
                        for i in range(2)] + [(f"{case.prefix}/cam/telemetry",
                                               b"\x07" * (40 * 2**20))])
    envelopes = ledger.assert_settled([case.topic, case.dead_letter], timeout=120)
    big = [env for env in envelopes.values() if env.get("size", 0) > 16 * 2**20]
    assert len(big) == 3 and all("reference" in env and "error" not in env for env in big)


# ------------------------------------------------------------------ 4, 12. file ids, fins


def test_a_file_id_used_again_never_reports_the_old_file(case: Case) -> None:
    """After a completed upload, a refused init for the same id makes its segments and fin
    dead letters (never a success carrying the old sha256); a good init starts it over."""
    files = Files(case)
    case.bridge(hostile_config(case, files))
    first = files.upload("cam", "clip", b"first" * 3000, segment_bytes=5000)
    [old] = files.references(1)
    assert old["sha256"] == first.sha256
    base, data = f"{case.prefix}/cam/files/clip", b"second" * 3000
    ledger = Ledger(case, files)
    with Canary(ledger):
        publish_as_device(case, [
            (f"{base}/init", json.dumps({"name": "x", "size": len(data),
                                         "checksum": "not a sha256"}).encode()),
            *[(f"{base}/{o}", data[o:o + 6000]) for o in range(0, len(data), 6000)],
            (f"{base}/fin/{len(data)}", b""),
        ])
    ledger.assert_settled([case.topic])
    dead = files.dead_letters(5)
    codes = sorted(env["error"]["code"] for env in dead)
    assert codes == ["bad_transfer_init"] + ["unknown_transfer"] * 4
    assert all("refused earlier" in env["error"]["reason"] for env in dead
               if env["error"]["code"] == "unknown_transfer")
    assert len(files.references(1, timeout=5)) == 1  # no second "success"
    again = files.upload("cam", "clip", data, segment_bytes=6000)
    references = files.references(2)
    assert [r["sha256"] for r in references] == [first.sha256, again.sha256]
    assert files.object_sha256(references[1]["reference"]) == again.sha256


def test_a_fin_without_its_size_is_refused_and_leaves_the_transfer(case: Case) -> None:
    files = Files(case)
    case.bridge(hostile_config(case, files))
    base, data = f"{case.prefix}/cam/files/f1", b"0123456789" * 1000
    ledger = Ledger(case, files)
    with Canary(ledger):
        sent = files.upload("cam", "f1", data, segment_bytes=5000, fin=False)
        publish_as_device(case, [(f"{base}/fin", b"")])
    ledger.assert_settled([case.topic])
    [dead] = files.dead_letters(1)
    assert dead["error"]["code"] == "bad_transfer_fin"
    publish_as_device(case, [(f"{base}/fin/{len(data)}", b"")])
    [reference] = files.references(1)
    assert reference["sha256"] == sent.sha256


# ------------------------------------------------------------------ 5. waiting holds no slot


def test_fins_waiting_out_their_grace_hold_no_slot(case: Case) -> None:
    """In a share group, forty fins of transfers whose init never comes (their segments are
    staged: the init may be on its way through another bridge) each wait the whole fin grace
    (30 s here), with two S3 slots per lane: another device's upload and the bulk lane's S3
    work finish while they all still wait."""
    files = Files(case, fin_grace_seconds=30, max_transfers_per_device=50)
    extra = files.extra.replace("inline_max_bytes = 65536",
                                "inline_max_bytes = 65536\nconcurrency = 2")
    files.extra = extra
    bridge = case.bridge(hostile_config(case, files, receive_max=200, shared=True))
    p = f"{case.prefix}/mallory/files"
    publish_as_device(case, [m for i in range(40) for m in (
        (f"{p}/never-{i}/0", b"x"), (f"{p}/never-{i}/fin/1", b""))])
    ledger = Ledger(case, files)
    canary = files.upload("canary", "photo", b"c" * 20_000, segment_bytes=5000)
    ledger.publish([(f"{case.prefix}/canary/telemetry", b"o" * 100_000)])  # bulk lane, S3
    [reference] = files.references(1)
    assert reference["sha256"] == canary.sha256
    ledger.assert_settled([case.topic])
    assert files.dead_letters(0) == [], "the waiting fins were decided before the canary"
    assert bridge.events_count() and not [e for e in bridge.events()
                                          if e.get("code") == "unknown_transfer"]


def test_a_file_in_too_many_segments_is_refused_at_its_first_small_segment(case: Case) -> None:
    files = Files(case, max_segments_per_file=20)
    bridge = case.bridge(hostile_config(case, files))
    data = bytes(range(256)) * 80  # 20,480 bytes: segments of at least 1,024 bytes
    files.upload("chatty", "tiny", data, segment_bytes=256)  # 80 segments and a fin
    dead = files.dead_letters(81)
    codes = Counter(env["error"]["code"] for env in dead)
    assert set(codes) == {"too_many_segments", "unknown_transfer"} and len(dead) == 81
    first = next(env for env in dead if env["error"]["code"] == "too_many_segments")
    assert "at least 1024 bytes" in first["error"]["reason"]
    fine = files.upload("chatty", "ok", data, segment_bytes=1024)  # exactly 20
    assert files.references(1)[0]["sha256"] == fine.sha256
    wait_all_acked(bridge)
    # Every later segment of the refused transfer was refused at once, without S3 writes.
    assert not [k for k in files.keys("staging/chatty/tiny/") if "/seg/" in k]


# ------------------------------------------------------------------ 9. concurrent inits


def test_concurrent_inits_cannot_pass_the_per_device_transfer_limit(case: Case) -> None:
    files = Files(case, max_transfers_per_device=4)
    case.bridge(hostile_config(case, files, receive_max=100))
    init = json.dumps({"name": "x", "size": 10, "checksum": "0" * 64}).encode()
    ledger = Ledger(case, files)
    with Canary(ledger):
        publish_as_device(case, [(f"{case.prefix}/greedy/files/t{i}/init", init)
                                 for i in range(8)])
    ledger.assert_settled([case.topic])
    dead = files.dead_letters(4)
    assert [env["error"]["code"] for env in dead] == ["too_many_transfers"] * 4
    time.sleep(1)
    inits = [k for k in files.keys("staging/greedy/") if k.endswith("/init")]
    alive = [k for k in inits if "refused" not in files.s3.head_object(
        Bucket=files.bucket, Key=k)["Metadata"]]
    assert len(alive) == 4


# ------------------------------------------------------------------ 6. memory and topics


def test_topics_a_device_chooses_do_not_grow_the_bridge(case: Case) -> None:
    """An unknown device sending a new 30 KB topic each time, and a known one sending 2 KB
    topics: nothing of theirs is cached (the review saw 389 MB for 3,000 such topics)."""
    files = Files(case)
    p = case.prefix
    bridge = case.bridge(hostile_config(case, files, receive_max=100, extra_routes=f"""
[[routes]]
name = "logs"
filter = "{p}/{{device_id}}/logs/#"
kafka_topic = "{case.topic}"
auth = "registry"
[[routes]]
name = "trace"
filter = "{p}/{{device_id}}/trace/#"
kafka_topic = "{case.topic}"
"""))
    ledger = Ledger(case, files)
    with Canary(ledger):
        before = rss_mib(bridge)
        ledger.publish([(f"{p}/stranger/logs/{i}/{'x' * 30_000}", b"?") for i in range(1000)])
        ledger.publish([(f"{p}/known/trace/{i}/{'y' * 2000}", b"!") for i in range(1000)])
    envelopes = ledger.assert_settled([case.topic, case.dead_letter])
    assert {e.get("error", {}).get("code") for k, e in envelopes.items()
            if "/stranger/" in k[0]} == {"unknown_device"}
    wait_all_acked(bridge)
    time.sleep(1.5)
    stats = bridge.stats()[-1]
    assert stats["plans"] <= 2 and stats["plan_bytes"] < 10_000  # the canary's topic only
    print(f"RSS {before:.0f} -> {rss_mib(bridge):.0f} MiB after 2,000 distinct long topics")


def rss_mib(bridge: Bridge) -> float:
    assert bridge.proc is not None
    for line in Path(f"/proc/{bridge.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------ 8. kill -9 mid-assembly


def test_a_kill_during_assembly_leaves_no_multipart_upload_open(case: Case,
                                                               tmp_path: Path) -> None:
    """The upload a killed bridge had open is aborted when the file is assembled again,
    whatever became of its id; nothing waits for a lifecycle rule."""
    files = Files(case)
    config = hostile_config(case, files)
    bridge = case.bridge(config)
    source = tmp_path / "40mb.bin"
    source.write_bytes(hashlib.sha256(b"x").digest() * (40 * 2**20 // 32))
    uploader = threading.Thread(target=files.upload, args=("cam", "clip", source.read_bytes()),
                                kwargs={"segment_bytes": 1 << 20})
    uploader.start()
    ledger = Ledger(case, files)
    with Canary(ledger):
        deadline = time.monotonic() + 120
        while not files.open_uploads() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert files.open_uploads(), "the assembly never opened its multipart upload"
        bridge.kill9()
        uploader.join(60)
        case.bridge(config)
    ledger.assert_settled([case.topic])  # the canary too, duplicates allowed
    [reference] = files.references(1, timeout=120)
    assert files.object_sha256(reference["reference"]) == reference["sha256"]
    assert files.open_uploads() == []
    assert files.keys("staging/") == []


# ------------------------------------------------------------------ 10. reload


def test_a_reload_with_a_producer_property_librdkafka_refuses_keeps_the_running_map(
        case: Case) -> None:
    config = case.config()
    bridge = case.bridge(config)
    before = bridge.events_count()
    config.write_text(config.read_text().replace(
        '[kafka]\n', '[kafka]\n"linger.msec" = 5\n'))
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGHUP)
    refused = bridge.wait_for("reload_refused", after=before)
    assert any(p.startswith('kafka."linger.msec"') for p in refused["problems"])
    ledger = Ledger(case)
    ledger.publish([(f"{case.prefix}/d1/telemetry", b"still bridged")])
    ledger.assert_settled([case.topic])
    assert not [e for e in bridge.events()[before:] if "Task exception" in str(e)]


# ------------------------------------------------------------------ 11. topics devices choose


def test_a_device_cannot_create_kafka_topics_through_a_template(case: Case) -> None:
    """Tansu, like many clusters, creates a topic on first produce. A rendered topic the
    cluster does not have is a kafka_topic_missing dead letter, unless the route says
    create_topics = true."""
    from confluent_kafka.admin import AdminClient

    tag = case.prefix
    case.stack.create_topics([f"site.berlin.{tag}"])
    files = Files(case)
    p = case.prefix
    case.bridge(hostile_config(case, files, extra_routes=f"""
[[routes]]
name = "status"
filter = "{p}/sites/{{site}}/{{device_id}}/status"
kafka_topic = "site.{{site}}.{tag}"
[[routes]]
name = "made"
filter = "{p}/made/{{site}}/{{device_id}}/status"
kafka_topic = "made.{{site}}.{tag}"
create_topics = true
"""))
    ledger = Ledger(case, files)
    with Canary(ledger):
        ledger.publish([(f"{p}/sites/berlin/d1/status", b"ok"),
                        (f"{p}/sites/nosuchsite/d1/status", b"no"),
                        (f"{p}/made/lisbon/d1/status", b"new")])
    envelopes = ledger.assert_settled([case.topic, case.dead_letter, f"site.berlin.{tag}",
                                       f"made.lisbon.{tag}"])
    codes = {k[0].split("/")[2]: e.get("error", {}).get("code") for k, e in envelopes.items()
             if "/d1/" in k[0]}
    assert codes == {"berlin": None, "nosuchsite": "kafka_topic_missing", "lisbon": None}
    topics = AdminClient({"bootstrap.servers": case.stack.bootstrap}).list_topics(timeout=10).topics
    assert f"site.nosuchsite.{tag}" not in topics
    assert f"made.lisbon.{tag}" in topics


# ------------------------------------------------------------------ 7. checked formats


def test_checked_formats_are_bounded_by_size_and_large_checks_leave_the_loop(
        case: Case) -> None:
    """A checked payload over format_max_bytes is a payload_too_large dead letter (its body
    kept); one over 16 KiB is checked on the lane's worker thread by a validator whose memory
    follows nesting depth, not size; verdicts do not depend on size."""
    files = Files(case)
    p = case.prefix
    case.bridge(hostile_config(case, files, extra_routes=f"""
[[routes]]
name = "packed"
filter = "{p}/{{device_id}}/packed"
kafka_topic = "{case.topic}"
format = "msgpack"
[[routes]]
name = "bulky"
filter = "{p}/{{device_id}}/bulky"
kafka_topic = "{case.topic}"
format = "json"
format_max_bytes = 16777216
"""))
    maps = b"[" + b"{}," * 70_000 + b"{}]"  # 210 KB: what json.loads builds 60x larger
    huge = b"[" + b"{}," * (16 * 2**20 // 3 - 1) + b"{}]"
    ledger = Ledger(case, files)
    with Canary(ledger, "alerts"):  # the fast lane, while the bulk lane checks
        ledger.publish([
            (f"{p}/d1/readings", maps),
            (f"{p}/d1/readings", b"[" * 100_000 + b"]" * 100_000),  # deep but valid
            (f"{p}/d1/readings", maps[:-1]),  # cut short: refused whatever its size
            (f"{p}/d1/readings", b"[" + b"1," * 600_000 + b"1]"),  # 1.2 MB > 1 MiB default
            (f"{p}/d1/packed", b"\xdd\x00\x04\x00\x00" + b"\x80" * 0x40000),  # 256 Ki maps
            (f"{p}/d1/packed", b"\xdd\x00\x04\x00\x00" + b"\x80" * 0x3ffff),  # one short
            (f"{p}/d1/bulky", huge),  # 16 MiB, allowed on this route
        ])
    envelopes = ledger.assert_settled([case.topic, case.dead_letter], timeout=120)
    verdicts = sorted((k[0].rsplit("/", 1)[1], e.get("error", {}).get("code", "bridged"),
                       e["size"] if "size" in e else len(e["body"]))
                      for k, e in envelopes.items() if "/d1/" in k[0])
    assert verdicts == [
        ("bulky", "bridged", len(huge)),
        ("packed", "bad_payload", 5 + 0x3ffff), ("packed", "bridged", 5 + 0x40000),
        ("readings", "bad_payload", len(maps) - 1), ("readings", "bridged", 200_000),
        ("readings", "bridged", len(maps)), ("readings", "payload_too_large", 1_200_003),
    ]


# ------------------------------------------------------------------ found attacking the fixes


def test_a_reload_that_replaces_a_producer_under_a_waiting_job_settles_that_job(
        case: Case) -> None:
    """A fin waits out its grace under the old map while a reload replaces the fat lane's
    producer (a new linger.ms): its dead letter goes through the new producer, is acked, and
    the lane keeps flowing (the old producer, closed, used to swallow its delivery report)."""
    files = Files(case, fin_grace_seconds=6)
    config = hostile_config(case, files, receive_max=5)
    bridge = case.bridge(config)
    data = b"0123456789" * 2000
    base = f"{case.prefix}/cam/files/gap"
    publish_as_device(case, [
        (f"{base}/init", json.dumps({"name": "g", "size": len(data),
                                     "checksum": _sha(data)}).encode()),
        *[(f"{base}/{o}", data[o:o + 5000]) for o in (0, 10000, 15000)],  # 5000.. never comes
        (f"{base}/fin/{len(data)}", b""),
    ])
    before = bridge.events_count()
    config.write_text(config.read_text().replace('[kafka]\n', '[kafka]\n"linger.ms" = 7\n'))
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGHUP)
    bridge.wait_for("reload_applied", after=before)
    [dead] = files.dead_letters(1)
    assert dead["error"]["code"] == "missing_segments"
    again = files.upload("cam", "after", data, segment_bytes=5000)
    assert [r["sha256"] for r in files.references(1)] == [again.sha256]
    assert wait_all_acked(bridge)


def test_assemblies_are_bounded_whatever_fins_wait_for(case: Case) -> None:
    """Fins that waited (lending their slots out) come back together: still at most a
    quarter of the lane's slots assemble at once, each holding two parts of memory."""
    files = Files(case, fin_grace_seconds=5)
    files.extra = files.extra.replace("inline_max_bytes = 65536",
                                      "inline_max_bytes = 65536\nconcurrency = 4")
    case.bridge(hostile_config(case, files, receive_max=50))
    data = hashlib.sha256(b"big").digest() * (9 * 2**20 // 32)  # two parts each
    clients = []
    for device in ("a", "b", "c", "d"):  # every fin waits for one late segment
        client = simulate.device_client(case.stack.mqtt_url, f"asm-{device}")
        clients.append(client)
        base = f"{case.prefix}/{device}/files/f"
        simulate.publish_all(client, [(f"{base}/init", json.dumps({
            "name": "f", "size": len(data), "checksum": _sha(data)}).encode())], qos=1)
        simulate.publish_all(client, [(f"{base}/{o}", data[o:o + 2**20])
                                      for o in range(2**20, len(data), 2**20)], qos=1)
        simulate.publish_all(client, [(f"{base}/fin/{len(data)}", b"")], qos=1)
    time.sleep(1)
    for device, client in zip("abcd", clients, strict=True):  # now all fins can go at once
        simulate.publish_all(client, [(f"{case.prefix}/{device}/files/f/0", data[:2**20])],
                             qos=1)
        client.disconnect()
        client.loop_stop()
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(len(files.open_uploads()))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert len(files.references(4, timeout=90)) == 4
    finally:
        done.set()
        sampler.join()
    assert max(seen) == 1, f"{max(seen)} assemblies at once with concurrency = 4"


def test_records_kafka_failed_count_against_the_producer_queue(case: Case) -> None:
    """With Kafka stopped, records that time out wait outside librdkafka's queue to be
    produced again; they count against a cap of the queue's size, so a QoS 0 flood pushes
    back instead of growing the bridge."""
    bridge = case.bridge(case.config(extra_kafka='"message.timeout.ms" = 1000\n'
                                     '"queue.buffering.max.messages" = 200'))
    case.stack.kafka.pause()
    try:
        flood = threading.Thread(target=simulate.telemetry, kwargs={
            "url": case.stack.mqtt_url, "devices": 10, "messages": 400, "qos": 0,
            "prefix": case.prefix})
        flood.start()
        time.sleep(8)
        held = max(e.get("pending", 0) for e in bridge.stats())
    finally:
        case.stack.kafka.resume()
    flood.join(60)
    assert 0 < held <= 2 * 200 + 50, f"{held} records held with a queue of 200"


def test_segments_without_an_init_are_bounded(case: Case) -> None:
    """One bridge: a segment whose init it never saw is refused at once. In a share group it
    is staged (the init may be elsewhere), within the device's transfer and segment limits."""
    files = Files(case, max_transfers_per_device=2, max_segments_per_file=3)
    case.bridge(hostile_config(case, files))
    publish_as_device(case, [(f"{case.prefix}/solo/files/f1/0", b"x" * 100)])
    [alone] = files.dead_letters(1)
    assert alone["error"]["code"] == "unknown_transfer"
    assert files.keys("staging/solo/") == ["staging/solo/f1/init"]  # its refusal, no bytes
    case.bridges[0].stop()
    config = hostile_config(case, files, shared=True)
    config.write_text(config.read_text().replace(f'client_id = "{case.client_id}"',
                                                 f'client_id = "{case.client_id}-shared"'))
    bridge = case.bridge(config)
    p = f"{case.prefix}/evil/files"
    publish_as_device(case, [(f"{p}/o{i}/{o}", b"y" * 10) for i in range(3)
                             for o in range(0, 50, 10)])
    wait_all_acked(bridge)
    dead = [e for e in files.dead_letters(2) if e["device_id"] == "evil"]
    codes = {e["error"]["code"] for e in dead}
    assert codes & {"too_many_segments", "too_many_transfers"}, codes
    assert codes <= {"too_many_segments", "too_many_transfers", "unknown_transfer"}
    assert len([k for k in files.keys("staging/evil/") if "/seg/" in k]) <= 2 * 3


def test_an_id_started_over_after_an_abandoned_transfer_completes(case: Case) -> None:
    """A transfer left unfinished, then the same file id with new content in other segment
    sizes: the new init clears the old transfer's segments, so none of them is assembled
    into the new file."""
    files = Files(case)
    case.bridge(hostile_config(case, files))
    old, new = b"o" * 1500, b"n" * 1500
    files.upload("cam", "same", old, segment_bytes=500, fin=False)
    sent = files.upload("cam", "same", new, segment_bytes=750)
    [reference] = files.references(1)
    assert reference["sha256"] == sent.sha256 == files.object_sha256(reference["reference"])
    assert files.dead_letters(0) == []
