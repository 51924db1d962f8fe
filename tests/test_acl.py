"""Devices cannot speak for each other: the shipped mosquitto/production.conf and
mosquitto/acl, run on a real Mosquitto.

The config is the file operators install, with only its paths (/etc/mosquitto/,
/var/lib/mosquitto/, /var/log/mosquitto/) moved under a temporary directory, its three
listeners moved to free loopback ports and a `user` line added (as root Mosquitto would
otherwise drop to "mosquitto"). A subscriber logged in as the bridge's user on `devices/#`
sees everything the ACL lets through. "Never delivered" is proven without sleeping: the
forbidden PUBLISH was acknowledged, so the broker had routed it (had it been allowed), before
device B publishes a marker on its own topic; deliveries to one subscriber keep their order,
so what did not arrive before the marker was dropped.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bridge.devkit.localstack import HOST, MOSQUITTO_DIR, Service, free_port, wait_for_port
from tests.test_tls import _openssl, make_ca, make_leaf

pytestmark = pytest.mark.integration

BRIDGE_USER = "mkb-bridge"
# Password-file users: devices A and B, the bridge, and usernames that try to reach into
# other devices' prefixes through the %u substitution of `pattern write devices/%u/#`.
USERS = ("A", "B", BRIDGE_USER, "+", "B#", "#", "A/telemetry")
SUCCESS, NO_SUBSCRIBERS, NOT_AUTHORIZED = 0x00, 0x10, 0x87
TIMEOUT = 10.0


def _binary(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if found is None:
        pytest.skip(f"{name} not found: apt-get install mosquitto")
    return found


# --- the shipped config, on free ports and in a temporary directory ------------------------

@dataclass(frozen=True)
class Broker:
    service: Service
    password_port: int  # 8883: TLS, password
    certificate_port: int  # 8884: TLS, client certificate as identity
    loopback_port: int  # 1883 on 127.0.0.1: plain, password (the bridge on the same host)
    certs: Path
    passwords: dict[str, str]
    log_path: Path

    def log(self, since: int = 0) -> str:
        """The broker's log, from character `since` (a length taken earlier) on."""
        return self.log_path.read_text(errors="replace")[since:]


def render(text: str, root: Path, ports: dict[str, int]) -> str:
    """production.conf as shipped, but for its listeners' ports and its absolute paths."""
    for shipped, port in ports.items():
        text, count = re.subn(rf"^listener {re.escape(shipped)}$", f"listener {port} {HOST}",
                              text, flags=re.MULTILINE)
        assert count == 1, f"production.conf has no line 'listener {shipped}'"
    for prefix in ("/etc/mosquitto/", "/var/lib/mosquitto/", "/var/log/mosquitto/"):
        assert prefix in text, f"production.conf no longer uses {prefix}"
        text = text.replace(prefix, f"{root}{prefix}")
    user = pwd.getpwuid(os.getuid()).pw_name
    return f"{text}\n# Added by tests/test_acl.py: do not drop to user mosquitto.\nuser {user}\n"


def make_pki(certs: Path) -> None:
    """ca signs the server (IP:127.0.0.1) and the client certificates of device C (CN=C),
    of "#" and of "A/telemetry" (file slash.crt); rogue-ca signs one for "rogue", which the
    certificate listener must not trust."""
    make_ca(certs, "ca")
    make_leaf(certs, "server", "ca", "serverAuth", f"IP:{HOST}")
    make_leaf(certs, "C", "ca", "clientAuth")
    make_leaf(certs, "#", "ca", "clientAuth")
    make_ca(certs, "rogue-ca")
    make_leaf(certs, "rogue", "rogue-ca", "clientAuth")
    # make_leaf names files after the CN, which a "/" cannot be: sign this one by hand.
    (certs / "slash.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "slash.key", "-out", "slash.csr", "-subj", "/CN=A\\/telemetry",
             cwd=certs)
    _openssl("x509", "-req", "-in", "slash.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "slash.crt", "-days", "2", "-extfile", "slash.ext",
             cwd=certs)


def make_passwords(path: Path) -> dict[str, str]:
    passwd = _binary("mosquitto_passwd")
    passwords = {user: secrets.token_urlsafe(12) for user in USERS}
    for i, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([passwd, *create, "-b", str(path), user, password], check=True,
                       capture_output=True)
    return passwords


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    binary = _binary("mosquitto")
    root = tmp_path_factory.mktemp("mosquitto-production")
    etc, certs = root / "etc/mosquitto", root / "etc/mosquitto/certs"
    for d in (certs, root / "var/lib/mosquitto", root / "var/log/mosquitto"):
        d.mkdir(parents=True)
    make_pki(certs)
    passwords = make_passwords(etc / "passwd")
    shutil.copy(MOSQUITTO_DIR / "acl", etc / "acl")
    ports = {"8883": free_port(), "8884": free_port(), "1883 127.0.0.1": free_port()}
    conf = root / "mosquitto.conf"
    conf.write_text(render((MOSQUITTO_DIR / "production.conf").read_text(), root, ports))
    log_path = root / "var/log/mosquitto/mosquitto.log"
    service = Service("mosquitto-production", [binary, "-c", str(conf)], ports["8883"], log_path)
    service.start()
    try:
        for port in ports.values():
            wait_for_port(HOST, port, TIMEOUT, name=service.name, log_path=log_path)
        yield Broker(service, ports["8883"], ports["8884"], ports["1883 127.0.0.1"], certs,
                     passwords, log_path)
    finally:
        service.stop()


# --- MQTT 5 clients ------------------------------------------------------------------------

class Client:
    """A connected paho MQTT 5 client that records PUBACK reason codes and what it receives."""

    def __init__(self, paho_client: paho.Client) -> None:
        self.paho = paho_client
        self.received: list[tuple[str, bytes]] = []
        self._acks: dict[int, ReasonCode] = {}
        self._changed = threading.Condition()

    def _wait(self, predicate: Any, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(predicate, TIMEOUT):
                raise TimeoutError(f"no {what} within {TIMEOUT} s")

    def on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self._acks[mid] = reason
            self._changed.notify_all()

    def on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.received.append((message.topic, bytes(message.payload)))
            self._changed.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1 and return the reason code of the broker's PUBACK."""
        mid = self.paho.publish(topic, payload, qos=1, retain=retain).mid
        self._wait(lambda: mid in self._acks, f"PUBACK for {topic}")
        return self._acks.pop(mid).value

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.paho.on_subscribe = lambda *_args: done.set()
        self.paho.subscribe(topic_filter, qos=1)
        assert done.wait(TIMEOUT), f"no SUBACK for {topic_filter}"

    def received_until(self, marker: bytes) -> list[bytes]:
        """Every payload received up to and including `marker`, once it has arrived."""
        self._wait(lambda: any(p == marker for _t, p in self.received), f"marker {marker!r}")
        payloads = [p for _t, p in self.received]
        return payloads[: payloads.index(marker) + 1]


@contextmanager
def connect(port: int, *, username: str | None = None, password: str | None = None,
            tls: bool = True, ca: Path | None = None, cert: Path | None = None,
            client_id: str = "") -> Iterator[Client]:
    """Connected for the `with` block; ConnectionError if refused (CONNACK or hang-up)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or
                    f"test-{secrets.token_hex(4)}", protocol=paho.MQTTv5)
    if tls:
        c.tls_set(ca_certs=str(ca), certfile=str(cert.with_suffix(".crt")) if cert else None,
                  keyfile=str(cert.with_suffix(".key")) if cert else None)
    if username is not None:
        c.username_pw_set(username, password)
    client = Client(c)
    c.on_publish, c.on_message = client.on_publish, client.on_message
    outcome: list[str] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        outcome.append("" if not reason.is_failure else f"CONNACK {reason}")
        if reason.is_failure:
            c.disconnect()  # no reconnect attempts: the loop thread ends at once
        done.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        outcome.append(f"disconnected: {reason}")
        c.disconnect()
        done.set()

    c.on_connect, c.on_disconnect = on_connect, on_disconnect
    try:
        c.connect(HOST, port, keepalive=30)
    except (OSError, ssl.SSLError) as e:
        raise ConnectionError(f"refused before CONNACK: {e!r}") from e
    c.loop_start()
    try:
        if not done.wait(TIMEOUT) or outcome[0]:
            raise ConnectionError(outcome[0] if outcome else "no CONNACK")
        c.on_disconnect = None
        yield client
    finally:
        c.disconnect()
        c.loop_stop()


def device(broker: Broker, username: str, **kwargs: Any) -> AbstractContextManager[Client]:
    """A device logged in with its password on the TLS password listener (8883)."""
    return connect(broker.password_port, username=username,
                   password=broker.passwords[username], ca=broker.certs / "ca.crt", **kwargs)


@pytest.fixture(scope="module")
def bridge_reader(broker: Broker) -> Iterator[Client]:
    """The bridge's user on the loopback listener, subscribed to devices/#."""
    with connect(broker.loopback_port, username=BRIDGE_USER, tls=False,
                 password=broker.passwords[BRIDGE_USER]) as reader:
        reader.subscribe("devices/#")
        yield reader


def token() -> bytes:
    return secrets.token_hex(8).encode()


def assert_never_delivered(broker: Broker, reader: Client, forbidden: bytes) -> None:
    """Device B publishes a marker on its own topic: `forbidden` must not precede it."""
    marker = b"marker-" + token()
    with device(broker, "B") as b:
        assert b.publish("devices/B/telemetry", marker) == SUCCESS
    assert forbidden not in reader.received_until(marker)


# --- tests ---------------------------------------------------------------------------------

def test_a_device_publishes_under_its_own_prefix(broker: Broker, bridge_reader: Client) -> None:
    body = token()
    with device(broker, "A") as a:
        assert a.publish("devices/A/telemetry", body) == SUCCESS
        assert a.publish("devices/A/files/f1/0", body + b"-segment") == SUCCESS
    got = bridge_reader.received_until(body + b"-segment")
    assert body in got


@pytest.mark.parametrize("topic", [
    "devices/B/telemetry",
    "devices/B/files/f1/0",
    "devices/AB/telemetry",  # a prefix of the id is not the id
    "devices/mkb-bridge/telemetry",
])
def test_a_device_cannot_publish_under_another_devices_prefix(
        broker: Broker, bridge_reader: Client, topic: str) -> None:
    body = token()
    with device(broker, "A") as a:
        assert a.publish(topic, body) == NOT_AUTHORIZED
    assert_never_delivered(broker, bridge_reader, body)


@pytest.mark.parametrize(("listener", "username"), [
    ("password", "+"), ("password", "B#"), ("certificate", "#"),
])
def test_usernames_with_plus_or_hash_are_denied_every_pattern(
        broker: Broker, bridge_reader: Client, listener: str, username: str) -> None:
    """Substituted into devices/%u/#, "+" would match every device: Mosquitto refuses all
    pattern checks to a username with + or # (CVE-2017-7650), and logs it. A CN counts the
    same as a password-file user."""
    body, before = token(), len(broker.log())
    with (device(broker, username) if listener == "password" else
          connect(broker.certificate_port, ca=broker.certs / "ca.crt",
                  cert=broker.certs / username)) as evil:
        assert evil.publish("devices/B/telemetry", body) == NOT_AUTHORIZED
    assert_never_delivered(broker, bridge_reader, body)
    assert (f'ACL denying access to client with dangerous username "{username}"'
            in broker.log(before))


def test_a_password_file_line_starting_with_hash_is_a_comment(broker: Broker) -> None:
    """So user "#", though mosquitto_passwd writes it, can never log in."""
    assert "\n#:" in "\n" + (broker.certs.parent / "passwd").read_text()
    with pytest.raises(ConnectionError, match="CONNACK Not authorized"), device(broker, "#"):
        pass


@pytest.mark.parametrize("client_id", ["A+1", "A#1"])
def test_client_ids_with_plus_or_hash_are_denied_every_pattern(
        broker: Broker, bridge_reader: Client, client_id: str) -> None:
    """The same check covers the client id: such a device cannot even use its own prefix."""
    body, before = token(), len(broker.log())
    with device(broker, "A", client_id=client_id) as a:
        assert a.publish("devices/A/telemetry", body) == NOT_AUTHORIZED
    assert_never_delivered(broker, bridge_reader, body)
    assert (f'ACL denying access to client with dangerous client id "{client_id}"'
            in broker.log(before))


@pytest.mark.parametrize("listener", ["password", "certificate"])
def test_a_username_with_a_slash_writes_inside_another_devices_prefix(
        broker: Broker, bridge_reader: Client, listener: str) -> None:
    """Mosquitto 2.0 does not refuse "/" in usernames (only + and #), and no ACL line can:
    user "A/telemetry" gets devices/A/telemetry/#, which matches devices/A/telemetry itself.
    This documents why device ids must never contain "/" (mosquitto/README.md)."""
    body, before = token(), len(broker.log())
    with (device(broker, "A/telemetry") if listener == "password" else
          connect(broker.certificate_port, ca=broker.certs / "ca.crt",
                  cert=broker.certs / "slash")) as impostor:
        assert impostor.publish("devices/A/telemetry", body) == SUCCESS
        assert impostor.publish("devices/B/telemetry", body + b"-b") == NOT_AUTHORIZED
    assert body in bridge_reader.received_until(body)
    assert_never_delivered(broker, bridge_reader, body + b"-b")
    assert "u'A/telemetry'" in broker.log(before)


def test_a_certificate_device_publishes_only_under_its_common_name(
        broker: Broker, bridge_reader: Client) -> None:
    """The CN is the identity: a username and password in CONNECT do not change it."""
    own, other, claimed = token(), token(), token()
    with connect(broker.certificate_port, ca=broker.certs / "ca.crt",
                 cert=broker.certs / "C") as c:
        assert c.publish("devices/C/telemetry", own) == SUCCESS
        assert c.publish("devices/A/telemetry", other) == NOT_AUTHORIZED
    with connect(broker.certificate_port, ca=broker.certs / "ca.crt", cert=broker.certs / "C",
                 username="A", password=broker.passwords["A"]) as c_as_a:
        assert c_as_a.publish("devices/A/telemetry", claimed) == NOT_AUTHORIZED
    assert own in bridge_reader.received_until(own)
    assert_never_delivered(broker, bridge_reader, other)
    assert_never_delivered(broker, bridge_reader, claimed)


@pytest.mark.parametrize(("cert", "why"), [
    (None, "peer did not return a certificate"),
    ("rogue", "certificate verify failed"),
], ids=["no-certificate", "untrusted-ca"])
def test_the_certificate_listener_refuses_a_client_without_a_trusted_certificate(
        broker: Broker, cert: str | None, why: str) -> None:
    """Refused in the TLS handshake, before CONNECT: A's valid password does not help."""
    before = len(broker.log())
    with pytest.raises(ConnectionError), connect(
            broker.certificate_port, ca=broker.certs / "ca.crt",
            cert=broker.certs / cert if cert else None,
            username="A", password=broker.passwords["A"]):
        pass
    assert why in broker.log(before)
    assert "u'A'" not in broker.log(before)


def test_the_bridge_user_reads_everything_and_publishes_nothing(
        broker: Broker, bridge_reader: Client) -> None:
    """Over TLS on 8883 as over the loopback listener; its own name is no device prefix."""
    reads, writes, as_itself = token(), token(), token()
    with device(broker, BRIDGE_USER) as bridge:
        bridge.subscribe("devices/#")
        assert bridge.publish("devices/A/telemetry", writes) == NOT_AUTHORIZED
        assert bridge.publish(f"devices/{BRIDGE_USER}/telemetry", as_itself) == NOT_AUTHORIZED
        with device(broker, "A") as a:
            assert a.publish("devices/A/telemetry", reads) == SUCCESS
        assert reads in bridge.received_until(reads)
    assert_never_delivered(broker, bridge_reader, writes)
    assert_never_delivered(broker, bridge_reader, as_itself)


def test_the_bridge_user_reads_through_a_shared_subscription(broker: Broker) -> None:
    """Scale-out bridges subscribe as $share/GROUP/...: read access follows the topic."""
    body = token()
    with connect(broker.loopback_port, username=BRIDGE_USER, tls=False,
                 password=broker.passwords[BRIDGE_USER]) as bridge:
        bridge.subscribe("$share/mkb/devices/+/telemetry")
        with device(broker, "B") as b:
            assert b.publish("devices/B/telemetry", body) == SUCCESS
        assert body in bridge.received_until(body)


@pytest.mark.parametrize(("listener", "username", "password"), [
    ("password", None, None),
    ("loopback", None, None),
    ("password", "A", "wrong"),
    ("password", "A", "B-password"),
    ("loopback", BRIDGE_USER, "wrong"),
])
def test_anonymous_and_wrong_passwords_are_refused(
        broker: Broker, listener: str, username: str | None, password: str | None) -> None:
    if password == "B-password":
        password = broker.passwords["B"]
    tls = listener == "password"
    port = broker.password_port if tls else broker.loopback_port
    with pytest.raises(ConnectionError, match="CONNACK Not authorized"), connect(
            port, username=username, password=password, tls=tls, ca=broker.certs / "ca.crt"):
        pass


def test_the_bridge_user_keeps_its_presence_and_devices_cannot_touch_it(
        broker: Broker) -> None:
    """`adopt` reads what each bridge session retains under mqtt-kafka-bridge/sessions/;
    a device must not fake a member's presence."""
    online, fake = token(), token()
    topic = f"mqtt-kafka-bridge/sessions/mkb-{secrets.token_hex(4)}"
    with connect(broker.loopback_port, username=BRIDGE_USER, tls=False,
                 password=broker.passwords[BRIDGE_USER]) as bridge:
        # Accepted: 0x10 says no one subscribes yet, and the broker retains it all the same.
        assert bridge.publish(topic, online, retain=True) in (SUCCESS, NO_SUBSCRIBERS)
    with device(broker, "A") as a:
        assert a.publish(topic, fake, retain=True) == NOT_AUTHORIZED
    with connect(broker.loopback_port, username=BRIDGE_USER, tls=False,
                 password=broker.passwords[BRIDGE_USER]) as reader:
        reader.subscribe(topic)
        assert online in reader.received_until(online)  # retained, and not overwritten


def test_the_bridge_answers_file_transfers_and_each_device_reads_only_its_own(
        broker: Broker) -> None:
    """[file_transfer] respond: the bridge writes devices/<id>/files/<file id>/result, and
    only there under devices/; device A reads its own results and never device B's."""
    own, other, strays = token(), token(), [token() for _ in range(3)]
    with connect(broker.loopback_port, username=BRIDGE_USER, tls=False,
                 password=broker.passwords[BRIDGE_USER]) as bridge, device(broker, "A") as a:
        a.subscribe("devices/+/files/+/result")  # wide, in case the broker grants it
        a.subscribe("devices/B/files/f1/result")
        a.subscribe("devices/A/files/f1/#")
        assert bridge.publish("devices/B/files/f1/result", other) in (SUCCESS, NO_SUBSCRIBERS)
        for stray, topic in zip(strays, ("devices/A/files/f1/init", "devices/A/files/f1/fin/3",
                                         f"devices/{BRIDGE_USER}/files/f1/result"),
                                strict=True):
            assert bridge.publish(topic, stray) == NOT_AUTHORIZED
        assert bridge.publish("devices/A/files/f1/result", own) == SUCCESS
        got = a.received_until(own)  # deliveries keep their order: B's came first, or never
        assert other not in got and not set(strays) & set(got)
        with device(broker, "B") as b:
            assert b.publish("devices/A/files/f1/result", token()) == NOT_AUTHORIZED


# --- Sparkplug B (the "Sparkplug B" block of mosquitto/acl) --------------------------------

def _bridge(broker: Broker) -> AbstractContextManager[Client]:
    return connect(broker.loopback_port, username=BRIDGE_USER, tls=False,
                   password=broker.passwords[BRIDGE_USER])


def test_an_edge_node_publishes_its_namespace_and_the_bridge_reads_it(broker: Broker) -> None:
    """Edge node A (its username) births, sends data and deaths, for itself and its
    devices, in any group."""
    body, group = token(), f"g{secrets.token_hex(3)}"
    topics = [f"spBv1.0/{group}/{kind}/A" for kind in ("NBIRTH", "NDATA", "NDEATH")] + \
        [f"spBv1.0/{group}/{kind}/A/d1" for kind in ("DBIRTH", "DDATA", "DDEATH")]
    with _bridge(broker) as bridge:
        bridge.subscribe("spBv1.0/#")
        with device(broker, "A") as a:
            for topic in topics:
                assert a.publish(topic, body + topic.encode()) == SUCCESS
        assert bridge.received_until(body + topics[-1].encode()) == \
            [body + topic.encode() for topic in topics]


@pytest.mark.parametrize("topic", [
    "spBv1.0/g/NDATA/B",  # another node
    "spBv1.0/g/DDATA/B/d1",
    "spBv1.0/g/NDATA/AB",
    "spBv1.0/g/NCMD/A",  # commands are the host's
    "spBv1.0/g/DCMD/A/d1",
    "spBv1.0/STATE/mkb",  # and so is STATE
])
def test_an_edge_node_cannot_publish_as_another_node_or_as_a_host(
        broker: Broker, topic: str) -> None:
    with device(broker, "A") as a:
        assert a.publish(topic, token()) == NOT_AUTHORIZED


def test_the_bridge_sends_ncmd_and_state_and_only_the_named_node_reads_the_command(
        broker: Broker) -> None:
    group, command, state = f"g{secrets.token_hex(3)}", token(), token()
    host = f"mkb-{secrets.token_hex(3)}"
    with device(broker, "A") as a, device(broker, "B") as b:
        a.subscribe(f"spBv1.0/{group}/NCMD/+")
        b.subscribe(f"spBv1.0/{group}/NCMD/+")  # the broker grants B only its own
        with _bridge(broker) as bridge:
            assert bridge.publish(f"spBv1.0/{group}/NCMD/A", command) == SUCCESS
            assert bridge.publish(f"spBv1.0/STATE/{host}", state, retain=True) in (
                SUCCESS, NO_SUBSCRIBERS)
            marker = token()
            assert bridge.publish(f"spBv1.0/{group}/NCMD/B", marker) == SUCCESS
        assert a.received_until(command) == [command]
        assert b.received_until(marker) == [marker]
        a.subscribe(f"spBv1.0/STATE/{host}")
        assert state in a.received_until(state)
    with _bridge(broker) as bridge:
        assert bridge.publish(f"spBv1.0/STATE/{host}", b"", retain=True) in (
            SUCCESS, NO_SUBSCRIBERS)
