"""sd_notify against a real AF_UNIX datagram socket, as systemd listens on: path and abstract."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridge.systemd import Notifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A socket bound where systemd's would be, and its $NOTIFY_SOCKET text (a path)."""
    with tempfile.TemporaryDirectory(prefix="mkb-") as folder:  # paths must stay < 108 bytes
        path = str(Path(folder) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2)
            yield sock, path


def received(sock: socket.socket) -> str:
    return sock.recv(65536).decode()


def test_each_notification_is_one_datagram_on_a_path_socket(
        listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier.from_environment()
    assert notifier.enabled
    notifier.ready()
    assert received(sock) == "READY=1"
    notifier.status("2/2 sessions connected\nKafka ok\r\n")
    assert received(sock) == "STATUS=2/2 sessions connected Kafka ok"
    notifier.stopping()
    assert received(sock) == "STOPPING=1"
    notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    reloading, monotonic = received(sock).split("\n")
    assert reloading == "RELOADING=1"
    name, _, usec = monotonic.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_an_abstract_socket_is_written_with_a_leading_at(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mkb-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier.from_environment()
        notifier.ready()
        notifier.watchdog()
        assert [received(sock), received(sock)] == ["READY=1", "WATCHDOG=1"]


def test_without_systemd_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capture_logs() as logs:
        notifier.ready()
        notifier.status("x")
        notifier.stopping()
        notifier.reloading()
        notifier.watchdog()
    assert logs == []


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "1", None),  # systemd meant another process of the unit
    ("0", None, None),
    ("soon", None, None),
    (None, None, None),
])
def test_watchdog_interval_is_half_the_period_for_this_process(
        usec: str | None, pid: str | None, interval: float | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert Notifier.from_environment().watchdog_interval == interval


def test_a_send_that_fails_never_raises_and_is_logged_once(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with capture_logs() as logs:
        for _ in range(3):
            notifier.ready()
            notifier.watchdog()
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]
    assert logs[0]["socket"] == str(tmp_path / "gone")


def test_a_full_socket_never_blocks_and_later_sends_still_go(
        listener: tuple[socket.socket, str]) -> None:
    """Nobody reads the socket (a wedged service manager): the queue fills, the sends that
    do not fit are dropped at once, and the next one after a read arrives."""
    sock, path = listener
    notifier = Notifier(path)
    started = time.monotonic()
    with capture_logs() as logs:
        for _ in range(5000):
            notifier.watchdog()
    assert time.monotonic() - started < 2
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]
    sock.setblocking(False)
    drained = 0
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            break
        drained += 1
    assert 0 < drained < 5000
    notifier.ready()
    assert sock.recv(65536) == b"READY=1"


def test_an_address_of_another_family_disables_it_and_says_so() -> None:
    with capture_logs() as logs:
        notifier = Notifier("vsock:2:1234")
        notifier.ready()
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]
