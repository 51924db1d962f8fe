"""mqtts:// on a real Mosquitto: a CA file, a client certificate and a password file, all
from the bridge's config.

The broker (mosquitto/tls.conf) requires a client certificate signed by the test CA *and* a
username/password. A throwaway PKI is generated with the openssl command line per module.
Refusals (wrong password, a server the bridge must not trust) must cost a logged
`mqtt_disconnected` and a retry: never a crash, never a message bridged.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import ssl
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.devkit import simulate
from bridge.devkit.localstack import HOST, MOSQUITTO_DIR, Service, free_port
from tests.conftest import ROOT, Bridge, Case, distinct

pytestmark = pytest.mark.integration

USERNAME = "bridge"


# --- a throwaway PKI -----------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("openssl command line not found")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_leaf(d: Path, name: str, ca: str, usage: str, san: str | None = None) -> None:
    """A key and a certificate signed by `ca`: usage serverAuth or clientAuth."""
    ext = d / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
             f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash",
             "authorityKeyIdentifier=keyid"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca signs server (IP:127.0.0.1), client and wrong-host (IP:127.0.0.2); rogue-ca signs
    impostor (IP:127.0.0.1): a server the bridge has no reason to trust."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "server", "ca", "serverAuth", f"IP:{HOST}")
    make_leaf(d, "client", "ca", "clientAuth")
    make_leaf(d, "wrong-host", "ca", "serverAuth", "IP:127.0.0.2")
    make_leaf(d, "impostor", "rogue-ca", "serverAuth", f"IP:{HOST}")
    return d


# --- Mosquitto with TLS and passwords -----------------------------------------------------

class TlsBroker:
    def __init__(self, service: Service, secret: str, log_path: Path) -> None:
        self.service, self.secret, self.log_path = service, secret, log_path

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def url(self) -> str:
        return f"mqtts://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def tls_mosquitto(workdir: Path, pki: Path, server: str = "server") -> TlsBroker:
    """Mosquitto rendered from mosquitto/tls.conf (like localstack.mosquitto_service renders
    local.conf): it presents `server`.crt, trusts client certificates from ca.crt and
    accepts user `bridge` with a fresh random password."""
    binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    passwd = shutil.which("mosquitto_passwd", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None or passwd is None:
        pytest.skip("mosquitto / mosquitto_passwd not found: apt-get install mosquitto")
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "mosquitto-data"
    data.mkdir(exist_ok=True)
    secret = secrets.token_urlsafe(16)
    password_file = workdir / "passwd"
    subprocess.run([passwd, "-b", "-c", str(password_file), USERNAME, secret], check=True,
                   capture_output=True)
    port, log_path, conf = free_port(), workdir / "mosquitto.log", workdir / "mosquitto.conf"
    user = pwd.getpwuid(os.getuid()).pw_name  # as root it would otherwise drop to "mosquitto"
    conf.write_text(string.Template((MOSQUITTO_DIR / "tls.conf").read_text()).substitute(
        port=port, persistence_dir=data, log_file=log_path, user=user,
        cafile=pki / "ca.crt", certfile=pki / f"{server}.crt", keyfile=pki / f"{server}.key",
        password_file=password_file))
    service = Service(f"mosquitto-tls-{server}", [binary, "-c", str(conf)], port, log_path)
    return TlsBroker(service, secret, log_path)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[TlsBroker]:
    b = tls_mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), pki)
    b.service.start()
    try:
        yield b
    finally:
        b.service.stop()


def device(broker: TlsBroker, pki: Path, client_id: str, *, cert: bool = True,
           password: str | None = None, timeout: float = 10) -> paho.Client:
    """A paho MQTT 5 client over TLS, connected, its loop running; raises if refused."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    client.tls_set(ca_certs=str(pki / "ca.crt"),
                   certfile=str(pki / "client.crt") if cert else None,
                   keyfile=str(pki / "client.key") if cert else None)
    client.username_pw_set(USERNAME, broker.secret if password is None else password)
    result: list[Any] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result.append(reason)
        done.set()

    client.on_connect = on_connect
    client.connect(HOST, broker.port, keepalive=30)
    client.loop_start()
    if not done.wait(timeout) or result[0].is_failure:
        client.loop_stop()
        client.disconnect()
        raise ConnectionError(f"{client_id} refused by {broker.url}: {result or 'no CONNACK'}")
    return client


def publish(broker: TlsBroker, pki: Path, client_id: str,
            messages: list[tuple[str, bytes]]) -> None:
    client = device(broker, pki, client_id)
    try:
        simulate.publish_all(client, messages, qos=1)
    finally:
        client.disconnect()
        client.loop_stop()


# --- the bridge ----------------------------------------------------------------------------

def tls_config(case: Case, broker: TlsBroker, pki: Path, password: str, *,
               client_cert: bool = True, reconnect: str = "reconnect_max = 2",
               name: str = "bridge-tls.toml") -> Path:
    """Like Case.config, with the mqtts url, CA, client certificate and password file."""
    password_file = case.tmp / "mqtt-password"
    password_file.write_text(password + "\n")  # as an editor saves it: the newline is not in it
    password_file.chmod(0o600)
    cert = (f'cert_file = "{pki / "client.crt"}"\nkey_file = "{pki / "client.key"}"'
            if client_cert else "")
    path = case.tmp / name
    path.write_text(f"""
[bridge]
instance = "test-{case.client_id}"
shutdown_timeout = 30
log_format = "json"
stats_interval = 1

[[brokers]]
url = "{broker.url}"
client_id = "{case.client_id}"
keepalive = 10
{reconnect}
ca_file = "{pki / "ca.crt"}"
{cert}
username = "{USERNAME}"
password_file = "{password_file}"

[kafka]
"bootstrap.servers" = "{case.stack.bootstrap}"

[dead_letter]
kafka_topic = "{case.dead_letter}"

[[routes]]
name = "telemetry"
filter = "{case.prefix}/{{device_id}}/telemetry"
kafka_topic = "{case.topic}"
""")
    return path


def launch(case: Case, config: Path) -> Bridge:
    """Start the bridge without waiting for mqtt_connected (which must not come)."""
    bridge = case.bridge(config, start=False)
    with bridge.log.open("ab") as log:
        bridge.proc = subprocess.Popen([sys.executable, "-m", "bridge", "run", "--config",
                                        str(config)], stdout=log, stderr=subprocess.STDOUT,
                                       cwd=ROOT)
    return bridge


def named(bridge: Bridge, event: str) -> list[dict[str, Any]]:
    return [e for e in bridge.events() if e.get("event") == event]


def wait_refusals(bridge: Bridge, count: int = 3, timeout: float = 30) -> list[dict[str, Any]]:
    """Wait for `count` mqtt_disconnected events; the bridge must stay up all along."""
    deadline = time.monotonic() + timeout
    while True:
        assert bridge.proc is not None and bridge.proc.poll() is None, \
            f"bridge exited:\n{bridge.log.read_text()[-3000:]}"
        refusals = named(bridge, "mqtt_disconnected")
        if len(refusals) >= count:
            return refusals
        assert time.monotonic() < deadline, \
            f"{len(refusals)} mqtt_disconnected in {timeout} s:\n{bridge.log.read_text()[-3000:]}"
        time.sleep(0.1)


def assert_refused_quietly(bridge: Bridge, case: Case, broker: TlsBroker,
                           refusals: list[dict[str, Any]]) -> None:
    """Still running, never connected, nothing crashed, nothing in Kafka."""
    assert bridge.proc is not None and bridge.proc.poll() is None
    assert not named(bridge, "mqtt_connected")
    assert not named(bridge, "mqtt_session_crashed")
    assert not [e for e in bridge.events() if e.get("level") in {"error", "critical"}]
    assert {e["broker"] for e in refusals} == {f"{HOST}:{broker.port}"}
    assert case.read(expect=None) == []
    assert case.read(case.dead_letter, expect=None) == []


def telemetry(case: Case, device_id: str, seqs: range) -> list[tuple[str, bytes]]:
    topic = f"{case.prefix}/{device_id}/telemetry"
    return [(topic, simulate.payload(device_id, seq, 100)) for seq in seqs]


# --- tests ---------------------------------------------------------------------------------

def test_bridges_over_mqtts_with_ca_client_certificate_and_password_file(
        case: Case, broker: TlsBroker, pki: Path) -> None:
    bridge = case.bridge(tls_config(case, broker, pki, broker.secret))
    publish(broker, pki, f"{case.client_id}-dev", telemetry(case, "dev-1", range(5)))

    got = case.read(expect=5)
    assert distinct(got) == {("dev-1", seq) for seq in range(5)}
    for _key, env in got:
        assert env["device_id"] == "dev-1"
        assert env["mqtt"]["broker"] == f"{HOST}:{broker.port}"
        assert env["mqtt"]["qos"] == 1
    # Mosquitto saw the bridge log in as `bridge` over this TLS-only listener.
    assert f"as {case.client_id} (p5, c0, k10, u'{USERNAME}')" in broker.log()
    assert not named(bridge, "mqtt_disconnected")
    assert broker.secret not in bridge.log.read_text()  # the password never reaches the log


def test_the_broker_requires_a_client_certificate(broker: TlsBroker, pki: Path) -> None:
    """So the bridge connecting above proves it presented the certificate from its config."""
    with pytest.raises((ConnectionError, OSError, ssl.SSLError)):
        client = device(broker, pki, f"no-cert-{secrets.token_hex(4)}", cert=False, timeout=5)
        client.disconnect()
        client.loop_stop()
    with pytest.raises(ConnectionError):
        device(broker, pki, f"bad-pw-{secrets.token_hex(4)}", password="wrong", timeout=5)


def test_wrong_password_is_refused_retried_and_a_fixed_file_is_read_on_retry(
        case: Case, broker: TlsBroker, pki: Path) -> None:
    config = tls_config(case, broker, pki, "not-the-password",
                        reconnect="reconnect_min = 0.1\nreconnect_max = 0.5")
    bridge = launch(case, config)
    refusals = wait_refusals(bridge)
    for e in refusals:
        assert e["error"].startswith("connection refused: "), e
        assert "NOT_AUTHORIZED" in e["error"] or "BAD_USERNAME_OR_PASSWORD" in e["error"], e
    # Devices keep publishing while the bridge is locked out.
    publish(broker, pki, f"{case.client_id}-dev", telemetry(case, "dev-1", range(3)))
    time.sleep(1)
    assert_refused_quietly(bridge, case, broker, named(bridge, "mqtt_disconnected"))
    assert "not-the-password" not in bridge.log.read_text()

    # The password file is read on each attempt: fixing it lets the next retry in, no restart.
    (case.tmp / "mqtt-password").write_text(broker.secret + "\n")
    bridge.wait_for("mqtt_subscribed", timeout=30)
    assert bridge.proc is not None and bridge.proc.poll() is None
    publish(broker, pki, f"{case.client_id}-dev", telemetry(case, "dev-1", range(3, 5)))
    got = case.read(expect=2)
    # Only what was published after the bridge got in: the earlier session never existed.
    assert distinct(got) == {("dev-1", 3), ("dev-1", 4)}


@pytest.mark.parametrize(("server", "why"), [
    ("impostor", "unable to get local issuer certificate"),  # signed by a CA not in ca_file
    ("wrong-host", "IP address mismatch"),  # our CA, but issued for 127.0.0.2
])
def test_untrusted_server_certificate_is_refused_and_retried(
        case: Case, pki: Path, tmp_path: Path, server: str, why: str) -> None:
    """The impostor would accept the bridge (it trusts our client CA and knows the password):
    only the bridge's own check of the server certificate keeps it out."""
    impostor = tls_mosquitto(tmp_path / "impostor", pki, server)
    impostor.service.start()
    try:
        bridge = launch(case, tls_config(case, impostor, pki, impostor.secret,
                                         reconnect="reconnect_min = 0.1\nreconnect_max = 0.5"))
        refusals = wait_refusals(bridge)
        for e in refusals:
            assert "CERTIFICATE_VERIFY_FAILED" in e["error"] and why in e["error"], e
        assert_refused_quietly(bridge, case, impostor, refusals)
        # The handshake failed before CONNECT: the impostor never saw the client id or password.
        assert f"as {case.client_id}" not in impostor.log()
        bridge.stop()
    finally:
        impostor.service.stop()


def test_refused_client_certificate_is_retried(
        case: Case, broker: TlsBroker, pki: Path) -> None:
    """Without cert_file/key_file this broker hangs up on the bridge: logged, retried."""
    bridge = launch(case, tls_config(case, broker, pki, broker.secret, client_cert=False,
                                     reconnect="reconnect_min = 0.1\nreconnect_max = 0.5"))
    refusals = wait_refusals(bridge)
    assert_refused_quietly(bridge, case, broker, refusals)
    assert f"as {case.client_id}" not in broker.log()
