"""systemd's service notification protocol (sd_notify(3)): readiness, status, watchdog.

Under `Type=notify` systemd passes a datagram socket in `$NOTIFY_SOCKET` (a path, or an
abstract name written with a leading `@`) and, with `WatchdogSec=`, the watchdog period in
`$WATCHDOG_USEC` (for the process `$WATCHDOG_PID`, when set). Each notification is one
datagram of `NAME=value` lines. Outside systemd every call is a no-op.

Written here rather than taken from PyPI: `sdnotify` (last release 2017) and
`systemd-watchdog` send on a blocking socket and raise or swallow send errors, neither
knows `STOPPING=1`/`RELOADING=1` with `MONOTONIC_USEC=`, and `systemd-python` is a C
extension that needs libsystemd's headers to build. The event loop calls this, so a send
must never block and never raise: the socket is non-blocking, and the first failure is
logged once, later ones silently (a full socket buffer drops that one message; the next
is tried all the same).
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger("bridge.systemd")


class Notifier:
    """Sends notifications to the service manager; every method is a no-op when disabled."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        """`address` as systemd writes it in $NOTIFY_SOCKET; `watchdog_usec` the period the
        service must ping within, or None when systemd runs no watchdog for this process."""
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._socket: socket.socket | None = None
        self._said = False  # a failure was logged
        if address and self._address is None:
            self._fail(address, "unsupported address: expected a path or an @abstract name")

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier systemd set up for this process, or a no-op one."""
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        return cls(address, int(usec) if usec.isdigit() and ours else None)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog()` calls (half systemd's period, as sd_watchdog_enabled
        advises), or None when there is no watchdog for this process."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1e6

    def ready(self) -> None:
        """Start-up finished (or a reload did): systemd marks the unit active."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """A one-line summary for `systemctl status`; line breaks become spaces."""
        self._send("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> None:
        """A drain has begun."""
        self._send("STOPPING=1")

    def reloading(self) -> None:
        """A reload has begun; send `ready()` when it is done. MONOTONIC_USEC is what
        systemd 253 and later expect beside RELOADING=1; older ones ignore it."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now}")

    def watchdog(self) -> None:
        """The event loop still turns: systemd restarts the unit when these stop coming."""
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            self._fail(self._address, exc.strerror or str(exc))

    def _fail(self, address: str, error: str) -> None:
        """Said once: a line per watchdog ping would flood the journal."""
        if not self._said:
            self._said = True
            log.warning("systemd_notify_failed", socket=address.replace("\0", "@"),
                        error=error, why="later failures are not logged")


def _socket_address(address: str) -> str | None:
    """The address to send to: a path, or an abstract name (leading NUL for `@`)."""
    if address.startswith("/"):
        return address
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]
    return None
