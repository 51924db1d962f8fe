"""Config validation: every problem is reported with its key path."""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import config
from bridge.errors import ConfigError
from tests.conftest import ROOT

GOOD = """
[bridge]
instance = "edge-1"
[[brokers]]
url = "mqtt://127.0.0.1:1883"
client_id = "mkb-1"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
[dead_letter]
kafka_topic = "iot.deadletter"
[[routes]]
filter = "devices/{device_id}/telemetry"
kafka_topic = "iot.telemetry"
"""


def problems_of(text: str) -> list[str]:
    import tomllib

    with pytest.raises(ConfigError) as caught:
        config.parse(tomllib.loads(text))
    return caught.value.problems


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD)
    loaded = config.load(path)
    broker = loaded.brokers[0]
    assert (broker.host, broker.port, broker.tls) == ("127.0.0.1", 1883, False)
    assert broker.receive_max == 1000
    assert loaded.routes[0].key.strategy == "arrival_millis"
    assert loaded.routes[0].filter.subscription == "devices/+/telemetry"
    assert len(loaded.version) == 12
    assert loaded.producer_config()["acks"] == "all"
    assert loaded.producer_config()["enable.idempotence"] is True


def test_every_problem_is_reported_with_its_key_path() -> None:
    bad = GOOD.replace("mqtt://127.0.0.1:1883", "http://127.0.0.1:1883")
    bad = bad.replace('kafka_topic = "iot.telemetry"', 'key = "bogus"')
    bad += "\n[extra]\nx = 1\n"
    found = problems_of(bad)
    assert "brokers[0].url: scheme must be mqtt or mqtts, got 'http'" in found
    assert "routes[0].kafka_topic: missing" in found
    assert any(p.startswith("routes[0].key: unknown strategy 'bogus'") for p in found)
    assert "extra: unknown key" in found


def test_unknown_and_mistyped_keys_are_errors() -> None:
    bad = GOOD.replace('client_id = "mkb-1"',
                       'client_id = "mkb-1"\nrecieve_max = 5\nkeepalive = "x"')
    found = problems_of(bad)
    assert "brokers[0].recieve_max: unknown key" in found
    assert "brokers[0].keepalive: must be an integer, got str" in found


def test_safety_properties_cannot_be_turned_off() -> None:
    found = problems_of(GOOD.replace('"bootstrap.servers"', 'acks = "1"\n"bootstrap.servers"'))
    assert any(p.startswith('kafka."acks": must be \'all\'') for p in found)


def test_route_filter_needs_a_device_id_and_whole_level_wildcards() -> None:
    found = problems_of(GOOD.replace("devices/{device_id}/telemetry", "devices/+/tele#"))
    assert any(p.startswith("routes[0].filter: level 'tele#'") for p in found)
    found = problems_of(GOOD.replace("devices/{device_id}/telemetry", "devices/+/telemetry"))
    assert any(p.startswith("routes[0].filter: needs a {device_id}") for p in found)


def test_tls_files_need_mqtts_and_must_exist() -> None:
    found = problems_of(GOOD.replace('client_id = "mkb-1"',
                                     'client_id = "mkb-1"\nca_file = "/nonexistent/ca.pem"'))
    assert ("brokers[0].ca_file: file '/nonexistent/ca.pem' does not exist: correct the path, "
            "or put the file there") in found


def test_missing_sections_are_named() -> None:
    found = problems_of('[bridge]\ninstance = "x"\n')
    assert "brokers: missing: add at least one [[brokers]] entry" in found
    assert "routes: missing: add at least one [[routes]] entry" in found
    assert "dead_letter.kafka_topic: missing" in found
    assert 'kafka."bootstrap.servers": missing' in found


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("mqtt://", "ftp://"))
    ok = subprocess.run([sys.executable, "-m", "bridge", "check-config", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([sys.executable, "-m", "bridge", "check-config", str(bad)],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert "brokers[0].url: scheme must be mqtt or mqtts, got 'ftp'" in refused.stderr
    run = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "brokers[0].url" in run.stderr


def test_example_config_is_valid() -> None:
    assert config.load(Path(__file__).parent.parent / "examples" / "bridge.toml").routes


def test_one_session_per_broker_and_client_id() -> None:
    twice = GOOD.replace('[kafka]', '[[brokers]]\nurl = "mqtt://127.0.0.1:1883"\n'
                         'client_id = "mkb-1"\n[kafka]')
    assert "brokers[1].client_id: 'mkb-1' is used twice for 127.0.0.1:1883" in problems_of(twice)
    elsewhere = twice.replace('url = "mqtt://127.0.0.1:1883"\nclient_id = "mkb-1"\n[kafka]',
                              'url = "mqtt://10.0.0.2:1883"\nclient_id = "mkb-1"\n[kafka]')
    import tomllib
    assert len(config.parse(tomllib.loads(elsewhere)).brokers) == 2


def test_key_options_belong_to_their_strategy() -> None:
    import tomllib

    route = 'kafka_topic = "iot.telemetry"'
    good = GOOD.replace(route, route + '\nkey = "time_bucket"\nkey_window = 300')
    assert config.parse(tomllib.loads(good)).routes[0].key.window == 300
    found = problems_of(GOOD.replace(route, route + '\nkey = "device_id"\nkey_buckets = 4'))
    assert "routes[0].key_buckets: only applies to key = 'hash_bucket'" in found
    found = problems_of(GOOD.replace(route, route + '\nkey = "hash_bucket"\nkey_buckets = 0'))
    assert any(p.startswith("routes[0].key_buckets: must be between 1") for p in found)


def test_topic_templates_are_checked_against_the_filter() -> None:
    import tomllib

    site = GOOD.replace("devices/{device_id}/telemetry", "sites/{site}/devices/{device_id}")
    good = site.replace('kafka_topic = "iot.telemetry"', 'kafka_topic = "iot.{site}.telemetry"')
    assert config.parse(tomllib.loads(good)).routes[0].kafka_topic == "iot.{site}.telemetry"
    found = problems_of(site.replace('kafka_topic = "iot.telemetry"', 'kafka_topic = "iot.{x}"'))
    assert "routes[0].kafka_topic: placeholder {x} is not bound by the filter" in found
    found = problems_of(site.replace('kafka_topic = "iot.telemetry"', 'kafka_topic = "a b.{site}"'))
    assert any(p.startswith("routes[0].kafka_topic: 'a b.x' is not a valid") for p in found)


def test_lanes_merge_over_kafka_and_routes_name_theirs() -> None:
    import tomllib

    text = GOOD.replace('[dead_letter]', '"linger.ms" = 20\n"compression.type" = "lz4"\n'
                        '[lanes.fast]\n"linger.ms" = 0\n[lanes.fat]\n"batch.size" = 65536\n'
                        '[dead_letter]')
    text += 'lane = "fast"\n'
    loaded = config.parse(tomllib.loads(text))
    assert loaded.routes[0].lane == "fast"
    assert loaded.session_lanes() == loaded.producer_lanes() == ["fast"]
    fast, bulk, fat = (loaded.producer_config(lane) for lane in ("fast", "bulk", "fat"))
    assert (fast["linger.ms"], fast["compression.type"]) == (0, "lz4")  # lane over [kafka]
    assert bulk["linger.ms"] == 20  # [kafka] over the lane default
    assert fat["batch.size"] == 65536 and "batch.size" not in bulk
    assert {p["acks"] for p in (fast, bulk, fat)} == {"all"}
    assert config.parse(tomllib.loads(GOOD)).routes[0].lane == "bulk"  # the default


def test_unknown_lanes_and_unsafe_lane_settings_are_refused() -> None:
    found = problems_of(GOOD.replace('[dead_letter]', '[lanes.slow]\n"linger.ms" = 1\n'
                                     '[lanes.fast]\nacks = "1"\n[dead_letter]')
                        + 'lane = "express"\n')
    assert "lanes.slow: unknown lane, expected one of fast, bulk, fat" in found
    assert any(p.startswith('lanes.fast."acks": must be \'all\'') for p in found)
    assert any(p.startswith("routes[0].lane: unknown lane 'express'") for p in found)


REGISTRY = """
[devices.d1]
hmac_key = "000102030405060708090a0b0c0d0e0f"
[devices.d2]
status = "revoked"
"""


def test_registry_is_read_beside_the_config_and_versioned_with_it(tmp_path: Path) -> None:
    (tmp_path / "devices.toml").write_text(REGISTRY)
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD.replace("[dead_letter]", '[registry]\nfile = "devices.toml"\n'
                                 '[dead_letter]') + 'auth = "hmac"\n')
    loaded = config.load(path)
    assert loaded.routes[0].auth == "hmac"
    assert loaded.registry.devices["d1"].hmac_key == bytes(range(16))
    assert loaded.registry.devices["d2"].status == "revoked"
    (tmp_path / "devices.toml").write_text(REGISTRY.replace("revoked", "disabled"))
    assert config.load(path).version != loaded.version  # a registry change is a new map


def test_registry_problems_carry_the_file_and_key_path(tmp_path: Path) -> None:
    (tmp_path / "devices.toml").write_text(
        '[devices."a/b"]\n[devices.d1]\nhmac_key = "xyz"\nstatus = "gone"\n'
        '[devices.d2]\nhmac_key = "00ff"\ncolour = "red"\n')
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD.replace("[dead_letter]", '[registry]\nfile = "devices.toml"\n'
                                 '[dead_letter]'))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    found = [p.replace(str(tmp_path / "devices.toml"), "F") for p in caught.value.problems]
    assert any(p.startswith("registry.file: F: devices.a/b: not a valid device id") for p in found)
    assert "registry.file: F: devices.d1.hmac_key: must be hex" in found
    assert any(p.startswith("registry.file: F: devices.d1.status: unknown status 'gone'")
               for p in found)
    assert any(p.startswith("registry.file: F: devices.d2.hmac_key: must be 16-64 bytes")
               for p in found)
    assert "registry.file: F: devices.d2.colour: unknown key" in found


def test_auth_needs_a_registry() -> None:
    found = problems_of(GOOD + 'auth = "registry"\n')
    assert any(p.startswith("routes[0].auth: 'registry' needs a device registry") for p in found)
    found = problems_of(GOOD + 'auth = "password"\n')
    assert any(p.startswith("routes[0].auth: unknown auth 'password'") for p in found)


def test_lane_sessions_must_not_take_over_another_entrys_session() -> None:
    other = GOOD.replace('[kafka]', '[[brokers]]\nurl = "mqtt://127.0.0.1:1883"\n'
                         'client_id = "mkb-1-fast"\n[kafka]')
    import tomllib
    assert len(config.parse(tomllib.loads(other)).brokers) == 2  # no fast lane: no clash
    found = problems_of(other + '[[routes]]\nfilter = "devices/{device_id}/alerts"\n'
                        'kafka_topic = "iot.alerts"\nlane = "fast"\n')
    assert "brokers[1].client_id: 'mkb-1-fast' is used twice for 127.0.0.1:1883" in found


def test_large_payload_settings_need_s3_and_are_checked() -> None:
    import tomllib

    files = '\n[file_transfer]\nkafka_topic = "iot.files"\nmax_segment_bytes = 0\n'
    found = problems_of(GOOD.replace("[dead_letter]", files + "[dead_letter]")
                        + "inline_max_bytes = 1000\n")
    assert "file_transfer: needs an [s3] bucket to assemble files in" in found
    assert "routes[0].inline_max_bytes: needs an [s3] bucket" in found
    assert any(p.startswith("file_transfer.max_segment_bytes: must be between 1") for p in found)
    s3 = '\n[s3]\nbucket = "iot-payloads"\nobject_prefix = "staging/"\n'
    found = problems_of(GOOD.replace("[dead_letter]", s3 + "[dead_letter]"))
    assert any(p.startswith("s3.object_prefix: must end with '/' and not be staging/")
               for p in found)
    good = GOOD.replace("[dead_letter]", s3.replace("staging/", "big/") + files.replace(
        "max_segment_bytes = 0", 'prefix = "sites/{site}/{device_id}/up"') + "[dead_letter]")
    loaded = config.parse(tomllib.loads(good))
    assert loaded.file_transfer is not None
    assert loaded.file_transfer.filter.subscription == "sites/+/+/up/+/#"
    assert loaded.session_lanes() == ["bulk", "fat"]  # file transfers ride the fat lane
    assert "iot.files" in loaded.fixed_topics()


@pytest.mark.parametrize("text", ["x = " + "[" * 5000 + "]" * 5000,  # the parser's recursion
                                  "x = " + "{a = " * 2000 + "1" + "}" * 2000,
                                  "x = 1" + "0" * 5000,  # int() refuses 4300+ digits
                                  "x = \"\\xff\""])
def test_a_file_that_does_not_parse_is_a_problem_not_a_crash(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD + text + "\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.problems[0].startswith(f"{path}: not valid TOML: ")
    (tmp_path / "devices.toml").write_text(text + "\n")
    path.write_text(GOOD.replace("[dead_letter]", '[registry]\nfile = "devices.toml"\n'
                                 "[dead_letter]"))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"registry.file: {tmp_path / 'devices.toml'}: not valid TOML: ")


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    for path, reason in ((tmp_path, "not a regular file"),
                         (Path("/dev/zero"), "not a regular file"),  # never read to the end
                         (tmp_path / "missing.toml", "No such file or directory")):
        with pytest.raises(ConfigError) as caught:
            config.load(path)
        assert caught.value.problems == [f"{path}: cannot read: {reason}"]


def broker_url_problems(url: str) -> list[str]:
    return [p for p in problems_of(GOOD.replace("mqtt://127.0.0.1:1883", url))
            if p.startswith("brokers[0].url")]


@pytest.mark.parametrize(("url", "reason"), [
    ("mqtt://[::1:1883", "is not a valid url (Invalid IPv6 URL)"),
    ("mqtt://h:99999", "is not a valid url (Port out of range 0-65535)"),
    ("mqtt://h:x", "is not a valid url (Port could not be cast"),
    ("mqtt://h:0", "port must be between 1 and 65535"),
    ("mqtt://h:", "port must be between 1 and 65535"),
    ("mqtt://", "must name a host"),
    ("mqtt://a b:1883", "must not contain spaces"),
    ("mqtt://bad..name:1883", "must name a host"),
    ("mqtt://256.1.1.1:1883", "must name a host"),
    ("mqtt://u:secret@h:1883", "must not carry a user or password"),
    ("mqtt://h:1883/devices", "must have no path"),
    ("tcp://h:1883", "scheme must be mqtt or mqtts, got 'tcp'"),
])
def test_a_broker_url_that_does_not_parse_is_a_problem_with_its_key_path(
        url: str, reason: str) -> None:
    [problem] = broker_url_problems(url)
    assert problem.startswith(f"brokers[0].url: {reason}")


def test_the_scheme_gives_the_port_only_when_the_url_has_none() -> None:
    import tomllib

    def broker(url: str) -> config.BrokerConfig:
        return config.parse(tomllib.loads(GOOD.replace("mqtt://127.0.0.1:1883", url))).brokers[0]

    assert (broker("mqtt://[::1]").host, broker("mqtt://[::1]").port) == ("::1", 1883)
    assert broker("mqtts://broker.example").port == 8883
    assert broker("mqtts://broker.example:1").port == 1


@pytest.mark.parametrize(("s3", "problem"), [
    ('endpoint_url = "http://[::1"', "s3.endpoint_url: is not a valid url (Invalid IPv6 URL)"),
    ('endpoint_url = "ftp://h"', "s3.endpoint_url: scheme must be http or https, got 'ftp'"),
    ('endpoint_url = "http://h:0"', "s3.endpoint_url: port must be between 1 and 65535"),
    ('endpoint_url = "http://minio_1:9000"', "s3.endpoint_url: has '_' in its host name"),
    ('region = "eu central"', "s3.region: is not a region name"),
])
def test_s3_endpoint_and_region_are_checked_as_botocore_will(s3: str, problem: str) -> None:
    found = problems_of(GOOD.replace("[dead_letter]", f'[s3]\nbucket = "iot-payloads"\n{s3}\n'
                                     "[dead_letter]"))
    assert [p for p in found if p.startswith(problem)] == found, found


def test_integers_beyond_64_bits_are_refused_not_printed() -> None:
    huge = "0x" + "f" * 5000  # tomllib reads it; str() of it would raise
    found = problems_of(GOOD.replace('client_id = "mkb-1"', f'client_id = "mkb-1"\n'
                                     f"keepalive = {huge}"))
    assert "brokers[0].keepalive: must fit in 64 bits, as TOML integers do" in found
    found = problems_of(GOOD.replace("[dead_letter]", f'"linger.ms" = {huge}\n[dead_letter]'))
    assert 'kafka."linger.ms": must fit in 64 bits, as TOML integers do' in found


def test_a_final_newline_does_not_slip_past_a_pattern() -> None:
    found = problems_of(GOOD.replace('client_id = "mkb-1"', 'client_id = "mkb-1\\n"\n'
                                     'share_group = "g\\n"'))
    assert any(p.startswith("brokers[0].client_id: must be 1-64 characters") for p in found)
    assert any(p.startswith("brokers[0].share_group: must be non-empty") for p in found)
    found = problems_of(GOOD.replace('"iot.telemetry"', '"iot.telemetry\\n"')
                        .replace('"iot.deadletter"', '"iot.deadletter\\n"'))
    assert any(p.startswith("routes[0].kafka_topic: 'iot.telemetry\\n' is not a valid")
               for p in found)
    assert any(p.startswith("dead_letter.kafka_topic: 'iot.deadletter\\n' is not a valid")
               for p in found)
    found = problems_of(GOOD.replace("devices/{device_id}/telemetry",
                                     "devices/{device_id}\\n/telemetry"))
    assert any(p.startswith("routes[0].filter: must be at most 65535 bytes without control")
               for p in found)


def with_kafka(properties: str, lane: str = "") -> str:
    """GOOD with more [kafka] properties, or with a [lanes.LANE] table of them."""
    table = f"[lanes.{lane}]\n" if lane else ""
    return GOOD.replace("[dead_letter]", f"{table}{properties}\n[dead_letter]")


@pytest.mark.parametrize(("properties", "problem"), [
    ('"delivery.report.only.error" = true',
     'kafka."delivery.report.only.error": must be false: MQTT is acked from each successful '
     "delivery report"),
    ('"transactional.id" = "mkb"',
     'kafka."transactional.id": not allowed: the bridge runs no transactions'),
    ('"request.required.acks" = 1', 'kafka."request.required.acks": must be \'all\''),
    ('"enable.idempotence" = false', 'kafka."enable.idempotence": must be true'),
    ('"default.topic.config" = "acks=1"', 'kafka."default.topic.config": not allowed'),
    *[(f'"{name}" = "print"', f'kafka."{name}": not allowed: the Python client takes a callable')
      for name in ("error_cb", "throttle_cb", "stats_cb", "oauth_cb", "logger", "on_delivery",
                   "on_commit", "dr_cb", "dr_msg_cb")],
])
def test_properties_that_break_at_least_once_are_refused(properties: str, problem: str) -> None:
    assert any(p.startswith(problem) for p in problems_of(with_kafka(properties))), problem
    lane = problem.replace("kafka.", "lanes.fat.", 1)
    assert any(p.startswith(lane) for p in problems_of(with_kafka(properties, "fat"))), lane


def test_owned_properties_may_repeat_the_bridges_value_and_stay_out_of_the_table() -> None:
    import tomllib

    loaded = config.parse(tomllib.loads(with_kafka(
        'acks = -1\n"enable.idempotence" = true\n"delivery.report.only.error" = false\n'
        '"request.required.acks" = "all"')))
    assert loaded.kafka == {"bootstrap.servers": "127.0.0.1:9092"}
    bulk = loaded.producer_config("bulk")
    assert (bulk["acks"], bulk["enable.idempotence"]) == ("all", True)
    assert "delivery.report.only.error" not in bulk and "request.required.acks" not in bulk


@pytest.mark.parametrize(("properties", "problem"), [
    ('"linger.ms" = nan', 'kafka."linger.ms": must be a finite number'),
    ('"linger.ms" = inf', 'kafka."linger.ms": must be a finite number'),
    ('"client.id" = "mkb\\u0000x"', 'kafka."client.id": must not contain U+0000'),
    ('"message.max.bytes" = "1000000abc"', 'kafka."message.max.bytes": must be a whole number'),
    ('"message.max.bytes" = 1e6', 'kafka."message.max.bytes": must be a whole number'),
    ('"linger.ms" = 2024-01-01', 'kafka."linger.ms": must be a string or an integer or a number'),
])
def test_values_librdkafka_would_misread_are_refused(properties: str, problem: str) -> None:
    assert any(p.startswith(problem) for p in problems_of(with_kafka(properties))), problem


@pytest.mark.parametrize("servers", ["", " , ", "kafka-1:0", "bad..host", "[::1:9092", "k:99999",
                                     "kafka-1:9092/x"])
def test_bootstrap_servers_must_name_brokers(servers: str) -> None:
    text = GOOD.replace('"127.0.0.1:9092"', f'"{servers}"')
    assert any(p.startswith('kafka."bootstrap.servers": ') for p in problems_of(text))


def test_bootstrap_servers_take_what_librdkafka_takes() -> None:
    import tomllib

    servers = "PLAINTEXT://kafka-1:9092, SSL://[::1]:9093 kafka-3"
    loaded = config.parse(tomllib.loads(GOOD.replace('"127.0.0.1:9092"', f'"{servers}"')))
    assert loaded.kafka["bootstrap.servers"] == servers


def test_librdkafka_checks_every_property_under_the_table_that_set_it() -> None:
    found = problems_of(with_kafka('"linger.msec" = 5\n"linger.ms" = "soon"\n'
                                   '"compression.type" = "zip"')
                        + '[lanes.bulk]\n"linger.ms" = true\n"batch.size" = "big"\n'
                          '"max.in.flight.requests.per.connection" = 10\n')
    refused = sorted(p.split(": refused by librdkafka: ")[0] for p in found)
    assert refused == ['kafka."compression.type"', 'kafka."linger.ms"', 'kafka."linger.msec"',
                       'lanes.bulk."batch.size"', 'lanes.bulk."linger.ms"',
                       'lanes.bulk."max.in.flight.requests.per.connection"']
    assert ('kafka."linger.msec": refused by librdkafka: No such configuration property: '
            '"linger.msec"') in found
    assert len(found) == len(set(found)) == 6  # [kafka] is in every lane, reported once


def test_values_librdkafka_takes_pass_whatever_their_toml_type() -> None:
    import tomllib

    loaded = config.parse(tomllib.loads(with_kafka(
        '"linger.ms" = 2.5\n"socket.keepalive.enable" = true\n"client.id" = 7\n'
        '"compression.type" = "lz4"\n"message.max.bytes" = " 2000000"')))
    assert loaded.record_max("bulk") == 2_000_000


def test_the_librdkafka_probe_is_quick_silent_and_leaves_no_thread(
        capfd: pytest.CaptureFixture[str]) -> None:
    import os
    import time
    import tomllib

    text = GOOD.replace("127.0.0.1:9092", "kafka.invalid:9092")  # a broker that does not exist
    data = tomllib.loads(with_kafka('"debug" = "all"').replace("127.0.0.1:9092",
                                                                 "kafka.invalid:9092"))
    threads = len(os.listdir("/proc/self/task"))
    started = time.monotonic()
    for _ in range(20):
        config.parse(tomllib.loads(text))
        config.parse(data)
    assert time.monotonic() - started < 2.0  # 120 producers: well under 20 ms each
    assert len(os.listdir("/proc/self/task")) == threads
    assert capfd.readouterr() == ("", "")


def test_a_refusal_no_suspect_explains_is_reported_whole() -> None:
    from bridge.kafka import refused_properties

    properties = {"enable.idempotence": True, "max.in.flight.requests.per.connection": 10}
    [(name, reason)] = refused_properties(properties, [])
    assert name is None and "max.in.flight" in reason
    assert refused_properties(properties, ["max.in.flight.requests.per.connection"]) == [
        ("max.in.flight.requests.per.connection", reason)]


def test_check_config_reports_librdkafka_refusals_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(with_kafka('"linger.msec" = 5\n"debug" = "all"', "fat")
                    .replace("127.0.0.1:9092", "kafka.invalid:9092"))
    done = subprocess.run([sys.executable, "-m", "bridge", "check-config", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{path}: 1 problem(s)",
        '  lanes.fat."linger.msec": refused by librdkafka: No such configuration property: '
        '"linger.msec"']
    assert done.stdout == ""


S3 = '[s3]\nbucket = "iot-payloads"\n'


def test_inline_bodies_must_fit_the_lanes_record_size() -> None:
    text = with_kafka(S3) + 'lane = "fast"\ninline_max_bytes = 2000000\ntruncate_bytes = 950000\n'
    found = problems_of(text)
    assert ("routes[0].inline_max_bytes: 2000000 bytes inline do not fit Kafka's "
            "message.max.bytes 1000000 of lane fast (keep it at most message.max.bytes - "
            "65536)") in found
    assert any(p.startswith("routes[0].truncate_bytes: 950000 bytes inline do not fit Kafka's "
                            "message.max.bytes 1000000 of lane fast") for p in found)
    import tomllib

    bigger = text.replace('[s3]', '[lanes.fast]\n"message.max.bytes" = 2065536\n[s3]')
    loaded = config.parse(tomllib.loads(bigger))
    assert loaded.record_max("fast") == 2065536 and loaded.record_max("bulk") == 1000000


def test_s3_inline_max_is_checked_against_every_lane_that_uses_it() -> None:
    import tomllib

    s3 = S3 + "inline_max_bytes = 960000\n"
    routes = ('[[routes]]\nname = "alerts"\nfilter = "devices/{device_id}/alerts"\n'
              'kafka_topic = "iot.alerts"\nlane = "fast"\n')
    text = with_kafka(s3 + '[lanes.bulk]\n"message.max.bytes" = 1100000') + routes
    assert problems_of(text) == [
        "s3.inline_max_bytes: 960000 bytes inline do not fit Kafka's message.max.bytes 1000000 "
        "of lane fast, used by route 'alerts' (keep it at most message.max.bytes - 65536)"]
    own = text + "inline_max_bytes = 1000\n"  # the fast route's own threshold: [s3]'s is unused
    assert config.parse(tomllib.loads(own)).routes[1].inline_max_bytes == 1000
    truncated = text + "truncate_bytes = 1000\n"  # its bodies never reach [s3]'s threshold
    assert config.parse(tomllib.loads(truncated)).routes[1].truncate_bytes == 1000
    found = problems_of(GOOD + "truncate_bytes = 999999\n")  # without [s3] too
    assert any(p.startswith("routes[0].truncate_bytes: 999999 bytes inline do not fit")
               for p in found)


ROUTE = '[[routes]]\nname = "{name}"\nfilter = "{filter}"\nkafka_topic = "iot.x"\n'


def test_a_route_an_earlier_route_of_its_lane_covers_is_refused() -> None:
    import tomllib

    text = (GOOD.replace("devices/{device_id}/telemetry", "devices/{device_id}/#")
            + ROUTE.format(name="telemetry", filter="devices/{device_id}/telemetry"))
    assert ("routes[1].filter: never matches: routes[0] (route-0) takes every topic it would "
            "(same lane)") in problems_of(text)
    twice = GOOD + ROUTE.format(name="again", filter="devices/{device_id}/telemetry")
    assert any(p.startswith("routes[1].filter: never matches: routes[0]")
               for p in problems_of(twice))
    elsewhere = text + 'lane = "fast"\n'  # its own lane, its own session: fine
    assert config.parse(tomllib.loads(elsewhere)).routes[1].lane == "fast"
    narrow_first = (GOOD + ROUTE.format(name="all", filter="devices/{device_id}/#"))
    assert len(config.parse(tomllib.loads(narrow_first)).routes) == 2


def test_file_transfers_come_first_in_the_fat_lane() -> None:
    files = ('[s3]\nbucket = "iot-payloads"\n[file_transfer]\nkafka_topic = "iot.files"\n'
             "[dead_letter]")
    text = (GOOD.replace("[dead_letter]", files)
            + ROUTE.format(name="segments", filter="devices/{device_id}/files/+/{n}")
            + 'lane = "fat"\n')
    assert ("routes[1].filter: never matches: file_transfer "
            "(devices/{device_id}/files/{file_id}/#) takes every topic it would (same lane)"
            ) in problems_of(text)


def test_broker_settings_the_session_would_fail_on_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "password"
    big.write_bytes(b"x" * 70000)
    found = problems_of(GOOD.replace('client_id = "mkb-1"', 'client_id = "mkb-1"\n'
                                     'username = "bridge\\u0000"\n'
                                     f'password_file = "{big}"\n'
                                     "reconnect_min = 5\nreconnect_max = 1"))
    assert "brokers[0].username: must be at most 65535 bytes without control characters" in found
    assert "brokers[0].password_file: holds 70000 bytes; MQTT takes at most 65535" in found
    assert "brokers[0].reconnect_min: must not exceed reconnect_max (1)" in found
    found = problems_of(GOOD.replace('client_id = "mkb-1"', 'client_id = "mkb-1"\n'
                                     f'username = "u"\npassword_file = "{tmp_path}"'))
    assert f"brokers[0].password_file: cannot read {str(tmp_path)!r}: Is a directory" in found


def test_route_names_tell_routes_apart_in_lineage() -> None:
    assert "routes[0].name: must not be empty" in problems_of(GOOD + 'name = " "\n')
    assert ("routes[0].name: is the route name of file-transfer envelopes"
            in problems_of(GOOD + 'name = "file_transfer"\n'))


def test_a_registry_path_with_u0000_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD.replace("[dead_letter]", '[registry]\nfile = "dev\\u0000ices.toml"\n'
                                 "[dead_letter]"))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    [problem] = caught.value.problems
    assert problem.startswith("registry.file: ") and "embedded null byte" in problem


HOSTILE = ["", "\x00", "a\nb", "x" * 70000, "mqtt://[::1:1883", "{device_id}/#", 0, -1,
           2**63 - 1, 10**30, float("nan"), float("inf"), True, [], [[]], {}, {"a": {}},
           datetime.date(2024, 1, 1)]


def test_no_value_anywhere_crashes_the_checker() -> None:
    """Every key of the example config (and a new librdkafka property) given each hostile
    value: a Config or a ConfigError, never another exception."""
    import copy
    import tomllib

    base = Path(__file__).parent.parent / "examples"
    example = tomllib.loads((base / "bridge.toml").read_text())

    def paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """The path of every table, array of tables and value under `node`."""
        if isinstance(node, dict):
            for key, child in node.items():
                yield from paths(child, (*path, key))
        elif isinstance(node, list) and all(isinstance(x, dict) for x in node):
            for index, child in enumerate(node):
                yield from paths(child, (*path, index))
        if path:
            yield path

    for path in [*paths(example), ("kafka", "x.y"), ("lanes", "fat", "x.y")]:
        for value in HOSTILE:
            data = copy.deepcopy(example)
            node = data
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            with contextlib.suppress(ConfigError):
                config.parse(data, base=base)


def test_instance_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import tomllib

    without = GOOD.replace('[bridge]\ninstance = "edge-1"\n', "")
    assert config.parse(tomllib.loads(without)).bridge.instance == socket.gethostname()
    assert config.parse(tomllib.loads(GOOD)).bridge.instance == "edge-1"
    assert "bridge.instance: must not be empty" in problems_of(
        GOOD.replace('"edge-1"', '" "'))
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert "bridge.instance: missing, and this host has no name to default to" in problems_of(
        without)


def _identities(text: str, environ: dict[str, str], hostname: str = "mkb-2") -> Any:
    import tomllib

    return config.parse(tomllib.loads(text), environ=environ, hostname=hostname)


def test_identities_render_the_host_name_and_environment_for_replicas() -> None:
    """N replicas of one config (a StatefulSet's ConfigMap) get distinct, stable sessions."""
    text = GOOD.replace('instance = "edge-1"', 'instance = "{hostname}.${ZONE}"').replace(
        'client_id = "mkb-1"', 'client_id = "bridge-{hostname}"')
    for host in ("mkb-0", "mkb-2"):
        loaded = _identities(text, {"ZONE": "eu1"}, host)
        assert loaded.bridge.instance == f"{host}.eu1"
        assert loaded.brokers[0].client_id == f"bridge-{host}"
        assert loaded.brokers[0].for_lane("fast").client_id == f"bridge-{host}-fast"
    pod = GOOD.replace('client_id = "mkb-1"', 'client_id = "${POD_NAME}"')
    assert _identities(pod, {"POD_NAME": "mkb-7"}).brokers[0].client_id == "mkb-7"
    # The version hashes the file, not the rendering: every replica runs one map version.
    assert _identities(text, {"ZONE": "a"}, "x").version == \
        _identities(text, {"ZONE": "b"}, "y").version


def test_identities_that_render_badly_are_refused_with_the_key_path() -> None:
    import tomllib

    def problems(text: str, environ: dict[str, str], hostname: str = "mkb-2") -> list[str]:
        with pytest.raises(ConfigError) as caught:
            config.parse(tomllib.loads(text), environ=environ, hostname=hostname)
        return caught.value.problems

    unknown = GOOD.replace('client_id = "mkb-1"', 'client_id = "mkb-{host}"')
    assert problems(unknown, {}) == ["brokers[0].client_id: unknown placeholder {host}: only "
                                     "{hostname} and ${NAME} (an environment variable) are "
                                     "replaced"]
    long_host = GOOD.replace('client_id = "mkb-1"', 'client_id = "mkb-{hostname}"')
    [problem] = problems(long_host, {}, "h" * 70)
    assert problem.startswith(f"brokers[0].client_id: renders as 'mkb-{'h' * 70}': must be "
                              "1-64 characters")
    unset = GOOD.replace('instance = "edge-1"', 'instance = "${ZONE}"')
    [problem] = problems(unset, {})
    assert problem.startswith("bridge.instance: ${ZONE} is not set in the environment")
    empty = GOOD.replace('client_id = "mkb-1"', 'client_id = "${POD_NAME}"')
    assert problems(empty, {"POD_NAME": ""}) == [
        "brokers[0].client_id: must be 1-64 characters of [0-9A-Za-z._-] (a stable "
        "persistent-session id)"]


def test_presence_prefix_is_a_plain_topic_or_off() -> None:
    import tomllib

    def broker(extra: str) -> Any:
        return config.parse(tomllib.loads(GOOD.replace('client_id = "mkb-1"',
                                                       f'client_id = "mkb-1"\n{extra}')))

    assert broker("").brokers[0].presence_topic == "mqtt-kafka-bridge/sessions/mkb-1"
    assert broker('presence_prefix = "site/a"').brokers[0].for_lane("fat").presence_topic == \
        "site/a/mkb-1-fat"
    assert broker('presence_prefix = ""').brokers[0].presence_topic is None
    for bad in ("a/+", "a/#", "$SYS/x", "/a", "a/"):
        found = problems_of(GOOD.replace('client_id = "mkb-1"',
                                         f'client_id = "mkb-1"\npresence_prefix = "{bad}"'))
        assert [p.split(":")[0] for p in found] == ["brokers[0].presence_prefix"], bad


def test_check_config_shows_the_rendered_session_ids(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD.replace('client_id = "mkb-1"', 'client_id = "mkb-${MEMBER}"\n'
                                 'share_group = "g"') + '[[routes]]\nfilter = "devices/'
                    '{device_id}/alerts"\nkafka_topic = "iot.alerts"\nlane = "fast"\n')
    done = subprocess.run([sys.executable, "-m", "bridge", "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"MEMBER": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "  127.0.0.1:1883: session mkb-3-fast (fast), mkb-3 (bulk), share group g" in \
        done.stdout.splitlines()
    assert "  instance: edge-1" in done.stdout.splitlines()


def test_file_transfer_respond_is_off_by_default_and_a_boolean() -> None:
    import tomllib

    base = GOOD.replace("[dead_letter]", '[s3]\nbucket = "iot-payloads"\n[file_transfer]\n'
                        'kafka_topic = "iot.files"\nRESPOND\n[dead_letter]')
    loaded = config.parse(tomllib.loads(base.replace("RESPOND", "")))
    assert loaded.file_transfer is not None and loaded.file_transfer.respond is False
    loaded = config.parse(tomllib.loads(base.replace("RESPOND", "respond = true")))
    assert loaded.file_transfer is not None and loaded.file_transfer.respond is True
    assert any(p.startswith("file_transfer.respond: ")
               for p in problems_of(base.replace("RESPOND", 'respond = "yes"')))


def test_a_lane_suffix_that_makes_the_session_id_too_long_is_refused() -> None:
    long_id = "m" * 62  # 64 with "-x" would fit; "-fast" does not
    text = GOOD.replace('client_id = "mkb-1"', f'client_id = "{long_id}"') + \
        '[[routes]]\nfilter = "devices/{device_id}/alerts"\nkafka_topic = "a"\nlane = "fast"\n'
    assert problems_of(text) == [f"brokers[0].client_id: the fast lane's session id "
                                 f"'{long_id}-fast' is longer than 64 characters: shorten "
                                 "the client_id"]
