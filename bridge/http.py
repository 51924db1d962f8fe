"""`[http]`: /metrics, /healthz and /readyz, served from a thread of their own.

The endpoint runs its own asyncio loop in a daemon thread, so a slow, stuck or abusive
client can never stall bridging, and /healthz can say when the bridge's event loop has
stopped turning: it answers from the heartbeat the loop leaves in `Status`, which a server
on that same loop could not (it would simply not answer). Each connection gets one request
with a short deadline for its head and its answer; past `MAX_CLIENTS` connections at once,
new ones are closed unanswered. Three GET endpoints do not need a web framework; the text
format itself is prometheus_client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.config import HttpConfig
from bridge.errors import ConfigError
from bridge.metrics import Metrics

log = structlog.get_logger("bridge.http")

HEALTHY_WITHIN = 10.0  # seconds without a heartbeat of the event loop: /healthz says 503
READY_WITHIN = 3.0  # ... and /readyz: a loop that does not turn reads and acks nothing
MAX_CLIENTS = 32
REQUEST_TIMEOUT = 5.0  # seconds for a request head to arrive, and for its answer to leave
MAX_HEAD = 8192
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass
class Status:
    """What the event loop tells the endpoint: written there, read here (each field is
    replaced whole, so a reader sees one state or the next)."""

    beat: float = field(default_factory=time.monotonic)  # the loop's last heartbeat
    waiting_for: tuple[str, ...] = ("start-up",)  # empty: ready


class StatusServer:
    """The HTTP endpoint. `start` binds at once (so a taken port is a start-up error)."""

    def __init__(self, config: HttpConfig, metrics: Metrics, status: Status) -> None:
        self.config, self.metrics, self.status = config, metrics, status
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients = 0
        self.address: tuple[str, int] = (config.host, config.port)

    def start(self) -> None:
        try:
            family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
            sock = socket.create_server((self.config.host, self.config.port), family=family)
        except OSError as exc:
            raise ConfigError([f"http.listen: cannot listen on {self.config.listen}: "
                               f"{exc.strerror or exc}"]) from exc
        self.address = sock.getsockname()[:2]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), daemon=True,
                                        name="http")
        self._thread.start()
        ready.wait(10)
        log.info("http_listening", listen=self.config.listen,
                 endpoints=["/metrics", "/healthz", "/readyz"])

    def close(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # already stopped
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(
            self._serve, sock=sock, limit=MAX_HEAD))
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self._clients += 1
        try:
            await self._answer(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to tell it
        except Exception:  # a bug here must not end the endpoint
            log.exception("http_request_failed")
        finally:
            self._clients -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            await self._send(writer, 431, b"request head too large\n", "text/plain")
            return
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"only GET\n", "text/plain",
                             extra="Allow: GET, HEAD\r\n")
            return
        status, body, kind = self._route(path)
        await self._send(writer, status, body, kind, head_only=method == "HEAD")

    def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            silent = time.monotonic() - self.status.beat
            if silent < HEALTHY_WITHIN:
                return _json(200, {"status": "ok", "loop_beat_age_seconds": round(silent, 3)})
            return _json(503, {"status": "stalled", "loop_beat_age_seconds": round(silent, 1),
                               "why": "the event loop has not turned for "
                                      f"{silent:.0f} s"})
        if path == "/readyz":
            silent = time.monotonic() - self.status.beat
            waiting = list(self.status.waiting_for)
            if silent >= READY_WITHIN:
                waiting.insert(0, f"the event loop (no heartbeat for {silent:.0f} s)")
            elif not waiting:
                return _json(200, {"ready": True})
            return _json(503, {"ready": False, "waiting_for": waiting})
        return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, kind: str,
                    head_only: bool = False, extra: str = "") -> None:
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                f"Cache-Control: no-store\r\n{extra}\r\n").encode()
        writer.write(head if head_only else head + body)
        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)


def _json(status: int, value: object) -> tuple[int, bytes, str]:
    return status, json.dumps(value).encode() + b"\n", "application/json"
