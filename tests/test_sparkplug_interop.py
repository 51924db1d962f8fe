"""Sparkplug B against a real edge node: pysparkplug 0.6.1's EdgeNode on the local Mosquitto,
the bridge as a host application, Kafka read back with assign().

pysparkplug has no rebirth of its own: its command callback tells the test, which rebirths
the node the one way the library offers (disconnect, connect: NDEATH, then NBIRTH with the
next bdSeq). Alias-only DATA goes through the library's own client and payload classes.
pysparkplug declares paho-mqtt<2; on paho 2 it runs on the VERSION1 callbacks, and the one
method paho 2 removed, `message_retry_set` (a no-op since paho 1.5), is put back here.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import pysparkplug as spb
import pytest

from tests.conftest import Case

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings(
    "ignore:Callback API version 1 is deprecated:DeprecationWarning")]
TEMP, COUNT = 1, 2  # aliases


class Node:
    """A pysparkplug edge node with one device, which notes the rebirths asked of it."""

    def __init__(self, case: Case, name: str = "node1") -> None:
        self.url = urlsplit(case.stack.mqtt_url)
        self.group, self.name = case.prefix, name
        self.rebirths = threading.Event()
        self.client = spb.Client(client_id=f"{case.client_id}-{name}",
                                 client_options=spb.ClientOptions(reconnect_on_failure=False))
        now = spb.get_current_timestamp()
        self.edge = spb.EdgeNode(self.group, name, [
            spb.Metric(now, "temp", spb.DataType.DOUBLE, value=20.0, alias=TEMP)],
            client=self.client, cmd_callback=self._command)
        self.edge.register(spb.Device("dev1", [
            spb.Metric(now, "count", spb.DataType.INT32, value=0, alias=COUNT)]))

    def _command(self, _node: spb.EdgeNode, message: spb.Message) -> None:
        payload: Any = message.payload
        if any(m.name == "Node Control/Rebirth" and m.value for m in payload.metrics):
            self.rebirths.set()

    def connect(self) -> None:
        self.edge.connect(self.url.hostname or "", port=self.url.port or 1883, blocking=False)
        _wait(lambda: self.edge._connected, "the edge node to connect")
        time.sleep(0.3)  # its births go out after `_connected` is set, in paho's thread

    def rebirth(self) -> None:
        self.rebirths.clear()
        self.edge.disconnect()
        time.sleep(0.5)
        self.connect()

    def data_by_alias(self, value: float, skip_seq: int = 0) -> None:
        """NDATA of the temperature by its alias alone, as a node that was born sends it."""
        for _ in range(skip_seq):
            _ = self.edge._seq
        topic = spb.Topic(message_type=spb.MessageType.NDATA, group_id=self.group,
                          edge_node_id=self.name)
        payload = spb.NData(spb.get_current_timestamp(), self.edge._seq, metrics=(
            spb.Metric(spb.get_current_timestamp(), None, spb.DataType.DOUBLE, value=value,
                       alias=TEMP),))
        self.client.publish(spb.Message(topic, payload, spb.QoS.AT_MOST_ONCE, False))

    def drop(self) -> None:
        """The connection breaks: the broker publishes the node's will (its NDEATH)."""
        sock = self.client._client.socket()
        assert sock is not None
        sock.close()


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def sparkplug_records(case: Case, want: Callable[[list[dict[str, Any]]], bool],
                      timeout: float = 60) -> list[dict[str, Any]]:
    """The test topic's Sparkplug records, once `want` is true of them."""
    deadline = time.monotonic() + timeout
    while True:
        got = [env for _key, env in case.read() if "sparkplug" in env]
        if want(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def temps(got: list[dict[str, Any]]) -> list[tuple[str | None, float, bool]]:
    return [(m["name"], m["value"], env["sparkplug"]["stale"]) for env in got
            if env["sparkplug"]["message_type"] == "NDATA" for m in env["sparkplug"]["metrics"]]


@pytest.fixture
def node(case: Case, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    if not hasattr(paho.Client, "message_retry_set"):
        monkeypatch.setattr(paho.Client, "message_retry_set", lambda _self, retry: None,
                            raising=False)
    edge = Node(case)
    yield edge
    edge.client._client.disconnect()


def config(case: Case) -> Any:
    return case.config(extra=f"""
[sparkplug]
kafka_topic = "{case.topic}"
group_id = "{case.prefix}"
rebirth_interval = 1
""")


def test_births_and_alias_only_data_get_their_names(case: Case, node: Node) -> None:
    case.bridge(config(case))
    node.connect()
    node.data_by_alias(21.5)
    got = sparkplug_records(case, lambda g: (("temp", 21.5, False) in temps(g)))
    assert ("temp", 21.5, False) in temps(got), got
    kinds = [env["sparkplug"]["message_type"] for env in got]
    assert kinds[:3] == ["NBIRTH", "DBIRTH", "NDATA"]
    nbirth, dbirth = got[0]["sparkplug"], got[1]["sparkplug"]
    assert nbirth["online"] is True and nbirth["bd_seq"] is not None and nbirth["seq"] == 0
    assert {m["name"]: m["datatype"] for m in nbirth["metrics"]} == {"temp": "Double",
                                                                     "bdSeq": "Int64"}
    assert dbirth["device"] == "dev1" and dbirth["metrics"][0]["value"] == 0
    ndata = got[2]
    assert ndata["sparkplug"]["metrics"][0]["datatype"] == "Double"  # from the birth
    assert ndata["device_id"] == f"{case.prefix}/node1"
    assert ndata["bridge"]["route"] == "sparkplug" and ndata["body"]


def test_a_bridge_restart_asks_for_a_rebirth_and_the_names_come_back(
        case: Case, node: Node) -> None:
    path = config(case)
    bridge = case.bridge(path)
    node.connect()
    node.data_by_alias(1.0)
    sparkplug_records(case, lambda g: ("temp", 1.0, False) in temps(g))
    assert bridge.terminate() == 0
    case.bridge(path)  # it knows no birth now
    node.data_by_alias(2.0)
    assert node.rebirths.wait(20), "the bridge sent no NCMD rebirth"
    got = sparkplug_records(case, lambda g: (None, 2.0, True) in temps(g))
    (stale,) = [env["sparkplug"] for env in got if (None, 2.0, True) in temps([env])]
    assert stale["issues"] == ["no_birth", "unknown_alias"] and stale["rebirth_requested"]
    node.rebirth()
    node.data_by_alias(3.0)
    got = sparkplug_records(case, lambda g: ("temp", 3.0, False) in temps(g))
    assert ("temp", 3.0, False) in temps(got)


def test_a_seq_gap_asks_for_a_rebirth(case: Case, node: Node) -> None:
    case.bridge(config(case))
    node.connect()
    node.data_by_alias(1.0)
    node.data_by_alias(2.0, skip_seq=3)
    assert node.rebirths.wait(20), "the bridge sent no NCMD rebirth"
    got = sparkplug_records(case, lambda g: len(temps(g)) >= 2)
    gap = [env["sparkplug"] for env in got if env["sparkplug"]["issues"] == ["seq_gap"]]
    assert gap and gap[0]["metrics"][0]["name"] == "temp"  # names still filled in
    assert gap[0]["rebirth_requested"] is True


def test_a_lost_connection_is_an_offline_record_and_a_graceful_one_is_stale(
        case: Case, node: Node) -> None:
    """The will carries the birth's bdSeq: offline. pysparkplug 0.6.1's disconnect() sends
    an NDEATH with the bdSeq of the next birth, which the spec's rule calls stale."""
    case.bridge(config(case))
    node.connect()
    node.drop()
    got = sparkplug_records(case, lambda g: any(e["sparkplug"]["message_type"] == "NDEATH"
                                                for e in g))
    (death,) = [env["sparkplug"] for env in got if env["sparkplug"]["message_type"] == "NDEATH"]
    assert death["online"] is False and death["bd_seq"] == got[0]["sparkplug"]["bd_seq"]
    node.connect()
    node.edge.disconnect()
    got = sparkplug_records(case, lambda g: sum(e["sparkplug"]["message_type"] == "NDEATH"
                                                for e in g) >= 2)
    graceful = [env["sparkplug"] for env in got
                if env["sparkplug"]["message_type"] == "NDEATH"][1]
    assert graceful["issues"] == ["stale_death"] and "online" not in graceful


def host_config(case: Case, host: str) -> Any:
    """A [sparkplug] config that announces the bridge as host application `host`."""
    return case.config(extra=f"""
[sparkplug]
kafka_topic = "{case.topic}"
group_id = "{case.prefix}"
host_id = "{host}"
""")


@contextlib.contextmanager
def mqtt_client(case: Case, name: str,
                on_message: Callable[[Any, Any, paho.MQTTMessage], Any] | None = None
                ) -> Iterator[paho.Client]:
    """A plain paho client on the local broker, connected and looping until the end."""
    url = urlsplit(case.stack.mqtt_url)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{case.client_id}-{name}")
    if on_message is not None:
        client.on_message = on_message
    client.connect(url.hostname or "", url.port or 1883)
    client.loop_start()
    try:
        yield client
    finally:
        client.loop_stop()
        client.disconnect()


def test_the_bridge_announces_itself_as_a_host_application(case: Case) -> None:
    """STATE online, retained, on connect; offline (same timestamp) when it stops and when it
    dies: its will. Read with pysparkplug's State payload."""
    host = f"h{case.prefix}"
    path = host_config(case, host)
    states: list[spb.State] = []
    with mqtt_client(case, "r", lambda _c, _u, m: m.payload and states.append(
            spb.State.decode(m.payload))) as reader:  # the clean-up at the end is empty
        try:
            reader.subscribe(f"spBv1.0/STATE/{host}", qos=1)
            bridge = case.bridge(path)
            _wait(lambda: any(s.online for s in states), "STATE online")
            born = next(s for s in states if s.online)
            assert bridge.terminate() == 0
            _wait(lambda: not states[-1].online, "STATE offline after SIGTERM")
            assert states[-1].timestamp == born.timestamp
            bridge = case.bridge(path)
            _wait(lambda: states[-1].online, "STATE online again")
            bridge.kill9()
            _wait(lambda: not states[-1].online, "STATE offline by the will")
        finally:
            reader.publish(f"spBv1.0/STATE/{host}", b"", qos=1,
                           retain=True).wait_for_publish(5)


def test_an_offline_state_on_its_host_id_is_answered_with_its_online_state(
        case: Case) -> None:
    """Sparkplug 3.0, 5.3: an offline STATE delivered on the host's own id while it is
    connected (here written by another client, as the will of a taken-over connection
    would be) is answered at once with the online STATE, its timestamp unchanged."""
    host = f"h{case.prefix}"
    path = host_config(case, host)
    topic = f"spBv1.0/STATE/{host}"
    states: list[spb.State] = []
    with mqtt_client(case, "w", lambda _c, _u, m: b"timestamp" in m.payload and states.append(
            spb.State.decode(m.payload))) as writer:  # the STATEs, not the junk below
        try:
            writer.subscribe(topic, qos=1)
            bridge = case.bridge(path)
            _wait(lambda: any(s.online for s in states), "STATE online")
            born = next(s for s in states if s.online)
            for payload in (b"", b"not json", b'{"online": "no"}', b"[" * 5000):  # no STATE
                writer.publish(topic, payload, qos=1).wait_for_publish(5)
            writer.publish(topic, f'{{"online": false, "timestamp": {born.timestamp}}}',
                           qos=1, retain=True).wait_for_publish(5)
            assert bridge.wait_stat("sparkplug_state_reasserted", 1) == 1
            _wait(lambda: states[-1].online, "STATE online again")
            assert states[-1].timestamp == born.timestamp  # still the will's timestamp
            retained: list[spb.State] = []
            with mqtt_client(case, "f", lambda _c, _u, m: retained.append(
                    spb.State.decode(m.payload))) as fresh:
                fresh.subscribe(topic, qos=1)
                _wait(lambda: retained, "the retained STATE")
            assert retained[0].online  # what an edge node that comes now reads
            time.sleep(1)
            assert bridge.stats()[-1]["sparkplug_state_reasserted"] == 1  # once, nothing else
            assert bridge.terminate() == 0
        finally:
            writer.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)


def test_a_reload_that_changes_the_host_id_says_it_needs_a_restart(case: Case) -> None:
    """The STATE sessions are made at start: a new host_id is refused by the reload (the
    rest of it applies) with reload_needs_restart, and the running host stays online."""
    path = host_config(case, f"a{case.prefix}")
    bridge = case.bridge(path)
    bridge.wait_for("mqtt_announced")
    assert host_config(case, f"b{case.prefix}") == path
    before = bridge.events_count()
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGHUP)
    warned = bridge.wait_for("reload_needs_restart", after=before)
    assert warned["sections"] == ["sparkplug.host_id"]
    bridge.wait_for("reload_applied", after=before)
    retained: dict[str, spb.State] = {}
    with mqtt_client(case, "r", lambda _c, _u, m: m.payload and retained.__setitem__(
            m.topic, spb.State.decode(m.payload))) as reader:
        try:
            reader.subscribe("spBv1.0/STATE/+", qos=1)
            _wait(lambda: f"spBv1.0/STATE/a{case.prefix}" in retained, "the running STATE")
            time.sleep(0.5)
            assert retained[f"spBv1.0/STATE/a{case.prefix}"].online
            assert f"spBv1.0/STATE/b{case.prefix}" not in retained
            assert bridge.terminate() == 0
        finally:
            reader.publish(f"spBv1.0/STATE/a{case.prefix}", b"", qos=1,
                           retain=True).wait_for_publish(5)


def test_a_payload_that_does_not_decode_is_a_dead_letter_with_its_body(case: Case) -> None:
    case.bridge(config(case))
    with mqtt_client(case, "x") as client:
        client.publish(f"spBv1.0/{case.prefix}/NDATA/n1", b"\xff\xfe\xfd", qos=1) \
            .wait_for_publish(5)
    deadline = time.monotonic() + 60
    while not (dead := case.read(case.dead_letter)) and time.monotonic() < deadline:
        time.sleep(0.5)
    (_key, env), = dead
    assert env["error"]["code"] == "bad_sparkplug_payload" and env["body"] == b"\xff\xfe\xfd"
    assert env["device_id"] == f"{case.prefix}/n1"


def test_in_a_share_group_each_member_sees_part_of_a_node(case: Case, node: Node) -> None:
    """Measured, not a recommendation: two members, one node, 40 alias-only NDATA."""
    group = f'share_group = "sg{case.prefix}"'
    first = case.config(extra_broker=group, extra=f"""
[sparkplug]
kafka_topic = "{case.topic}"
group_id = "{case.prefix}"
rebirth_interval = 1
""")
    second = first.with_name("second.toml")
    second.write_text(first.read_text().replace(f'{case.client_id}"', f'{case.client_id}-b"'))
    bridges = [case.bridge(first), case.bridge(second)]
    node.connect()
    for i in range(40):
        node.data_by_alias(float(i))
        time.sleep(0.05)
    got = sparkplug_records(case, lambda g: len(temps(g)) >= 40)
    data = [env for env in got if env["sparkplug"]["message_type"] == "NDATA"]
    assert len(data) == 40  # every message is bridged, once
    stale = [env for env in data if env["sparkplug"]["stale"]]
    by_member = {b: sum(1 for env in data if env["bridge"]["instance"] == b)
                 for b in {env["bridge"]["instance"] for env in data}}
    requests = sum(1 for b in bridges for e in b.events()
                   if e.get("event") == "sparkplug_rebirth_requested")
    print(f"share group: {len(stale)}/40 NDATA stale, per member {sorted(by_member.values())}, "
          f"{requests} rebirth requests in {40 * 0.05:.0f} s")
    assert len(by_member) == 2 and stale and requests >= 2
