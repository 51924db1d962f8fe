"""Scaling out and back in on real servers: three bridge processes in one share group, one
config, identities from the environment; a member retired mid-stream, one lost for good and
adopted, a file transfer spread over the members, and a restart that keeps its session.
Accounting is `verify`'s: every publish the broker acked is in Kafka (lost 0)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge import mqtt
from bridge.config import BrokerConfig
from bridge.devkit import verify_io
from bridge.devkit.localstack import HOST, s3_environment
from tests.conftest import ROOT, Bridge, Case
from tests.test_large_payloads import Files
from tests.test_prove import finished, simulate

pytestmark = pytest.mark.integration

GROUP = 'share_group = "members"'


def member_config(case: Case, extra: str = "", name: str = "member.toml") -> Path:
    """One config for every member, as a StatefulSet's ConfigMap: the session id and the
    instance come from the environment (`${MEMBER}`), so each process has its own."""
    path = case.config(extra_broker=GROUP, extra=extra, name=name)
    text = path.read_text().replace(f'client_id = "{case.client_id}"',
                                    f'client_id = "{case.client_id}-${{MEMBER}}"')
    path.write_text(text.replace(f'instance = "test-{case.client_id}"',
                                 'instance = "member-${MEMBER}"'))
    return path


def members(case: Case, config: Path, count: int) -> list[Bridge]:
    return [case.bridge(config, env={"MEMBER": str(i)}) for i in range(count)]


def command(*args: str, member: str = "adopter",
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **s3_environment(), "MEMBER": member})


def verify(case: Case, log: Path, *topics: str, idle: float = 8) -> verify_io.Report:
    return verify_io.run(case.stack.bootstrap, log, list(topics) or [case.topic,
                                                                      case.dead_letter],
                         idle=idle, timeout=180)


def session_held(case: Case, client_id: str) -> bool:
    """Whether the broker holds a session for `client_id`. Asking ends it (expiry 0): only
    for a session that must be gone."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0
    answered = threading.Event()
    present: list[bool] = []

    def on_connect(_c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        present.append(bool(flags.session_present))
        answered.set()

    client.on_connect = on_connect
    client.connect(HOST, case.stack.mqtt.port, clean_start=False,
                   properties=properties)
    client.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return present[0]


def presence(case: Case, client_id: str) -> dict[str, object] | None:
    broker = BrokerConfig(url=case.stack.mqtt_url, client_id="probe", host=HOST,
                          port=case.stack.mqtt.port, tls=False)
    return asyncio.run(mqtt.read_presence(broker, [client_id]))[client_id]


def state(case: Case, client_id: str) -> object:
    """What the presence of `client_id` says: online, offline, or None (nothing retained)."""
    found = presence(case, client_id)
    return None if found is None else found.get("state")


def events(bridge: Bridge) -> list[str]:
    return [e.get("event", "") for e in bridge.events()]


def test_retiring_one_of_three_mid_stream_loses_nothing_and_ends_its_session(
        case: Case, tmp_path: Path) -> None:
    config = member_config(case)
    bridges = members(case, config, 3)
    leaving = bridges[2]
    online = presence(case, f"{case.client_id}-2")
    assert online is not None and online["state"] == "online"
    assert online["instance"] == "member-2"
    log = tmp_path / "sim.log"
    fleet = simulate(case, log, "--devices", "30", "--duration", "14", "--rate", "300")
    leaving.wait_stat("bridged_messages", 100, timeout=60)
    assert leaving.proc is not None
    retired = command("retire", "--pid", str(leaving.proc.pid), "--timeout", "120")
    assert retired.returncode == 0, retired.stderr
    assert leaving.proc.wait(10) == 0  # retire saw it exit (a zombie until reaped here)
    assert fleet.poll() is None, "the fleet stopped before the member left"
    kept = [b.wait_stat("bridged_messages", 1) for b in bridges[:2]]
    finished(fleet)

    report = verify(case, log)
    assert report.acked > 3000
    assert report.lost == 0, report.lost_first
    # The other two took the stream over; the retired one bridged its share first.
    assert all(b.wait_stat("bridged_messages", k + 100) for b, k in zip(bridges[:2], kept,
                                                                          strict=True))
    said = events(leaving)
    assert said.index("bridge_retiring") < said.index("mqtt_session_ended") < \
        said.index("bridge_retired")
    assert presence(case, f"{case.client_id}-2") is None  # it left nothing retained
    assert not session_held(case, f"{case.client_id}-2")  # nor a session to queue into


def test_a_member_lost_for_good_strands_its_share_until_adopted(case: Case,
                                                                tmp_path: Path) -> None:
    config = member_config(case)
    bridges = members(case, config, 3)
    live = command("adopt", "--config", str(config), "--client-id", f"{case.client_id}-0")
    assert live.returncode == 2
    assert f"{case.client_id}-0 is connected to" in live.stderr and "--force" in live.stderr
    assert "Traceback" not in live.stderr

    log = tmp_path / "sim.log"
    fleet = simulate(case, log, "--devices", "30", "--duration", "10", "--rate", "300")
    bridges[2].wait_stat("bridged_messages", 100, timeout=60)
    bridges[2].kill9()  # the host is gone: its session stays, and the group still feeds it
    finished(fleet)
    assert state(case, f"{case.client_id}-2") == "offline"  # its will

    stranded = verify(case, log)
    print(f"\nstranded without adopt: {stranded.lost} of {stranded.acked} acked publishes "
          f"({stranded.lost / stranded.acked:.0%}), one member of three killed")
    assert stranded.lost > stranded.acked / 10  # about a third of what came after the kill

    adopted = command("adopt", "--config", str(config), "--client-id", f"{case.client_id}-2")
    assert adopted.returncode == 0, adopted.stderr[-3000:]
    assert f"adopted {case.client_id}-2@" in adopted.stdout
    report = verify(case, log)
    assert report.lost == 0, report.lost_first
    assert report.acked == stranded.acked
    assert not session_held(case, f"{case.client_id}-2")
    assert presence(case, f"{case.client_id}-2") is None


def test_a_transfer_spread_over_three_members_completes_while_one_retires(
        case: Case) -> None:
    files = Files(case)
    config = member_config(case, extra=files.extra)
    bridges = members(case, config, 3)
    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(2 * 2**20 // 32))
    # Every segment, no fin yet: the share group spreads them over the three members.
    files.upload("cam-9", "spread-1", data, segment_bytes=8 * 1024, fin=False)
    leaving = bridges[1]
    leaving.wait_stat("file_segments", 1, timeout=60)
    assert leaving.proc is not None
    retire = subprocess.Popen([sys.executable, "-m", "bridge", "retire", "--pid",
                               str(leaving.proc.pid)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    leaving.wait_for("bridge_retiring")
    # While it retires, the device sends them all again (a device that lost its acks would)
    # and the fin, which any member may take.
    sent = files.upload("cam-9", "spread-1", data, segment_bytes=8 * 1024)
    out, _ = retire.communicate(timeout=120)
    assert retire.returncode == 0, out
    [reference] = files.references(1)
    assert files.object_sha256(reference["reference"]) == sent.sha256
    assert all(b.wait_stat("file_segments", 1) > 0 for b in bridges)  # every member took part
    assert "bridge_retired" in events(leaving)
    assert files.keys("staging/") == []


def test_a_sigterm_restart_resumes_its_session_and_retires_nothing(case: Case,
                                                                   tmp_path: Path) -> None:
    config = member_config(case)
    bridges = members(case, config, 2)
    assert bridges[1].terminate() == 0
    assert state(case, f"{case.client_id}-1") == "offline"
    log = tmp_path / "sim.log"
    finished(simulate(case, log, "--devices", "10", "--messages", "40"))
    before = events(bridges[1])
    assert "bridge_retiring" not in before and "mqtt_session_ended" not in before

    start = time.monotonic()
    back = case.bridge(config, env={"MEMBER": "1"})
    resumed = [e for e in back.events() if e.get("event") == "mqtt_connected"][-1]
    assert resumed["session_present"] is True
    assert back.wait_stat("bridged_messages", 1, timeout=60) > 0  # its share, kept queued
    report = verify(case, log)
    assert report.lost == 0 and report.acked == 400, report.lost_first
    assert state(case, f"{case.client_id}-1") == "online"
    assert time.monotonic() - start < 120


def test_an_adopt_cut_short_leaves_the_session_for_the_next_one(case: Case,
                                                                tmp_path: Path) -> None:
    """Kafka does not answer: adopt cannot make the queue durable, so --timeout stops it the
    way SIGTERM stops a bridge, the session and its queue stay, and a later adopt drains it."""
    config = member_config(case)
    [member] = members(case, config, 1)
    member.kill9()
    log = tmp_path / "sim.log"
    finished(simulate(case, log, "--devices", "5", "--messages", "20"))
    case.stack.kafka.pause()
    try:
        cut = command("adopt", "--config", str(config), "--client-id", f"{case.client_id}-0",
                      "--timeout", "8")
    finally:
        case.stack.kafka.resume()
    assert cut.returncode == 1, cut.stderr[-2000:]
    assert "stopped before the sessions ended within --timeout 8 s" in cut.stderr
    assert state(case, f"{case.client_id}-0") == "offline"  # still there, still adoptable
    adopted = command("adopt", "--config", str(config), "--client-id", f"{case.client_id}-0")
    assert adopted.returncode == 0, adopted.stderr[-2000:]
    report = verify(case, log)
    assert report.acked == 100 and report.lost == 0, report.lost_first


def test_adopt_announces_no_sparkplug_host(case: Case) -> None:
    """A Sparkplug host application's STATE says which host edge nodes may rely on: draining
    a gone member's queue must not announce (then retract) one."""
    host = f"adopt-{case.prefix}"
    config = case.config(extra=f'[sparkplug]\nkafka_topic = "{case.topic}"\nhost_id = "{host}"\n')
    adopted = command("adopt", "--config", str(config), "--client-id", f"{case.client_id}-x",
                      "--force")
    assert adopted.returncode == 0, adopted.stderr[-2000:]
    assert f"adopted {case.client_id}-x@" in adopted.stdout and "(none)" in adopted.stdout
    broker = BrokerConfig(url=case.stack.mqtt_url, client_id="probe", host=HOST,
                          port=case.stack.mqtt.port, tls=False, presence_prefix="spBv1.0/STATE")
    assert asyncio.run(mqtt.read_presence(broker, [host]))[host] is None
