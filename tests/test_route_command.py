"""`mqtt-kafka-bridge route`: the dry run operators use before a map goes live. It runs the
daemon's own pipeline, so what it prints is what the daemon would do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bridge import auth
from tests.conftest import ROOT

KEY = bytes(range(32))
CONFIG = """
[bridge]
instance = "edge-1"
[[brokers]]
url = "mqtt://127.0.0.1:1883"
client_id = "mkb-1"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
[registry]
file = "devices.toml"
[dead_letter]
kafka_topic = "iot.deadletter"
[[routes]]
name = "status"
filter = "sites/{site}/devices/{device_id}/status"
kafka_topic = "iot.{site}.status"
key = "hash_bucket"
key_buckets = 8
format = "json"
lane = "fast"
auth = "hmac"
"""


def route(tmp_path: Path, topic: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "devices.toml").write_text(f'[devices.d1]\nhmac_key = "{KEY.hex()}"\n')
    (tmp_path / "bridge.toml").write_text(CONFIG)
    return subprocess.run([sys.executable, "-m", "bridge", "route", "--config",
                           str(tmp_path / "bridge.toml"), *extra, topic],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)


def fields(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def test_a_signed_payload_shows_route_bindings_key_lane_and_passes(tmp_path: Path) -> None:
    topic = "sites/berlin/devices/d1/status"
    (tmp_path / "p.json").write_bytes(b'{"ok": true}')
    signature = auth.sign(KEY, topic, b'{"ok": true}')
    done = route(tmp_path, topic, "--payload-file", str(tmp_path / "p.json"),
                 "--signature", signature)
    assert done.returncode == 0, done.stderr
    out = fields(done.stdout)
    assert out["route"] == "status (sites/{site}/devices/{device_id}/status)"
    assert out["bindings"] == "{'site': 'berlin', 'device_id': 'd1'}"
    assert out["device_id"] == "d1"
    assert out["lane"] == "fast"
    assert out["key"].startswith("hash_bucket -> b'") and out["key"].endswith("'")
    assert out["kafka_topic"] == "iot.berlin.status"
    assert out["auth"] == f"hmac (signature for this payload: {signature})"
    assert out["result"] == "bridged"


def test_dry_run_says_why_a_message_would_be_dead_lettered(tmp_path: Path) -> None:
    topic = "sites/berlin/devices/d1/status"
    (tmp_path / "p.json").write_bytes(b'{"ok": true}')
    unsigned = route(tmp_path, topic, "--payload-file", str(tmp_path / "p.json"))
    assert unsigned.returncode == 1
    assert fields(unsigned.stdout)["dead letter"].startswith("missing_signature:")
    assert fields(unsigned.stdout)["kafka_topic"] == "iot.deadletter"

    (tmp_path / "bad.json").write_bytes(b"{not json")
    signature = auth.sign(KEY, topic, b"{not json")
    bad = route(tmp_path, topic, "--payload-file", str(tmp_path / "bad.json"),
                "--signature", signature)
    assert fields(bad.stdout)["dead letter"].startswith("bad_payload: not valid json")

    stranger = route(tmp_path, "sites/berlin/devices/d9/status")
    assert fields(stranger.stdout)["dead letter"].startswith("unknown_device:")

    nowhere = route(tmp_path, "elsewhere/d1")
    assert nowhere.returncode == 1
    assert fields(nowhere.stdout)["dead letter"].startswith("no_route:")


def test_a_sparkplug_topic_is_dry_run_through_the_sparkplug_stage(tmp_path: Path) -> None:
    """`[sparkplug]` takes spBv1.0/ topics before the routes: the dry run says so, decodes
    the payload as the daemon would, and names its dead-letter code when it does not."""
    import pysparkplug as spb

    (tmp_path / "devices.toml").write_text("")
    (tmp_path / "bridge.toml").write_text(CONFIG + '[sparkplug]\nkafka_topic = '
                                          '"iot.sparkplug.{message_type}"\n')
    birth = tmp_path / "nbirth.bin"
    birth.write_bytes(spb.NBirth(timestamp=9, seq=0, metrics=(
        spb.Metric(timestamp=5, name="bdSeq", datatype=spb.DataType.INT64, value=0),
        spb.Metric(timestamp=5, name="temp", datatype=spb.DataType.DOUBLE, value=21.5,
                   alias=1))).encode(include_dtypes=True))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not protobuf")

    def dry_run(topic: str, payload: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bridge", "route", "--config",
                               str(tmp_path / "bridge.toml"), "--payload-file", str(payload),
                               topic], capture_output=True, text=True, cwd=ROOT, timeout=30)

    done = dry_run("spBv1.0/plant1/NBIRTH/press-4", birth)
    assert done.returncode == 0, done.stderr
    assert fields(done.stdout)["sparkplug"] == "NBIRTH of plant1/press-4 (bulk lane), 2 metric(s)"
    assert fields(done.stdout)["kafka_topic"] == "iot.sparkplug.nbirth"
    bad = dry_run("spBv1.0/plant1/NDATA/press-4", garbage)
    assert bad.returncode == 1
    assert fields(bad.stdout)["dead letter"].startswith("bad_sparkplug_payload: ")
    assert fields(bad.stdout)["kafka_topic"] == "iot.deadletter"
