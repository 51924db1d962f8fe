"""structlog set-up: JSON lines under systemd or in pipes, readable lines on a terminal.

librdkafka's own log lines come through here too (`KafkaLog`), so the stream stays one
event per line, and the ones it repeats while Kafka is unreachable come at most once per
window.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable

import structlog

kafka_log = structlog.get_logger("bridge.kafka.librdkafka")


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """One event per line; `auto` picks console on a tty and JSON otherwise."""
    pretty = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


_VARIABLE = re.compile(r"0x[0-9a-fA-F]+|[0-9]+")  # counts, ports, addresses, durations
_THREAD = re.compile(r"\[thrd:([^\]]*)\]:\s*")


class RateLimit:
    """At most one line per `window` seconds for each kind of line; the next one let through
    says how many were held back. Shared by every client: each lane's producer repeats the
    same connection failure."""

    def __init__(self, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self._clock = window, clock
        self._lines: dict[tuple[str, str], tuple[float, int]] = {}  # kind: (said at, held)
        self._lock = threading.Lock()  # librdkafka logs from whichever thread polls

    def admit(self, facility: str, message: str) -> int | None:
        """None to hold this line back, else how many like it were held back before it."""
        kind = (facility, _VARIABLE.sub("N", message))
        now = self._clock()
        with self._lock:
            said, held = self._lines.get(kind, (None, 0))
            if said is not None and now - said < self.window:
                self._lines[kind] = (said, held + 1)
                return None
            if len(self._lines) > 1000:  # kinds are few; a flood of new ones must not grow it
                self._lines.clear()
            self._lines[kind] = (now, 0)
            return held


LIBRDKAFKA = RateLimit()


class KafkaLog:
    """A confluent-kafka client's `logger`: each librdkafka line becomes one `kafka_log`
    event (level, facility, client, lane, librdkafka's thread and message), rate-limited.

    With a logger set, confluent-kafka queues librdkafka's lines and serves them from
    `poll()`, so they are logged on the event loop, between delivery reports. It calls
    `log(level, "%s [%s] %s", facility, client name, message)` with the level already
    mapped from syslog's to Python's.

    librdkafka writes debug lines only when its `debug` property asks for them: with
    `debug`, they are logged at info (`librdkafka_level: "debug"`), all of them, as the
    bridge logs nothing below info."""

    def __init__(self, lane: str | None = None, limit: RateLimit = LIBRDKAFKA,
                 debug: bool = False) -> None:
        self.lane, self._limit, self._debug = lane, limit, debug

    def log(self, level: int, msg: str, *args: object) -> None:
        try:
            self._log(level, msg, args)
        except Exception:  # an exception here would surface from poll() as the client's
            kafka_log.exception("kafka_log_failed", lane=self.lane)

    def _log(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        facility, client, text = _parts(msg, args)
        debug = level <= logging.DEBUG
        if debug and not self._debug:
            return
        held = 0 if debug else self._limit.admit(facility, text)
        if held is None:
            return
        fields: dict[str, object] = {"facility": facility, "client": client}
        if self.lane is not None:
            fields["lane"] = self.lane
        if debug:
            level, fields["librdkafka_level"] = logging.INFO, "debug"
        if held:
            fields["suppressed"] = held
        found = _THREAD.match(text)
        if found:
            fields["thread"], text = found.group(1), text[found.end():]
        kafka_log.log(level, "kafka_log", message=text.strip(), **fields)


def _parts(msg: str, args: tuple[object, ...]) -> tuple[str, str, str]:
    """Facility, client name and text of what confluent-kafka hands the logger."""
    if msg == "%s [%s] %s" and len(args) == 3:
        facility, client, text = (str(a) for a in args)
        return facility, client, text
    return "", "", msg % args if args else msg
