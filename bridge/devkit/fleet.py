"""The engine of `simulate`: many MQTT 5 device connections on one asyncio event loop.

Each device is its own connection (client id = device id, as a real device's would be, so
broker ACLs on `%c` and session takeover behave as in the field), run by the small
publisher state machine of `bridge.devkit.publisher` on asyncio streams and the `mqtt5`
codec the bridge already uses. This module schedules them: connects (all at once for a
herd, else 64 at a time, then everyone starts together), the fleet-wide --rate, reconnects
with backoff and full jitter, the tally and the log.

Why not paho or aiomqtt: paho runs one network thread per client (`loop_start`) and does
heavy per-client Python work; aiomqtt wraps the same paho client on the loop and keeps that
cost. Measured on the 2-core dev machine against the local Mosquitto, a herd of 1,000
devices x 20 QoS 1 messages: paho with a thread per device 23.5 s, 20.7 s CPU, 83 MB RSS,
and some devices missed the 10 s connect timeout; this fleet 2.2 s, 1.6 s CPU, 48 MB RSS,
no errors.

Every publish gets exactly one outcome (`acked`, `refused`, `unknown`, `sent`) in the
`--log` file (docs in /README.md, "simulate"). A publish whose connection drops before its
ack is `unknown` and is not sent again: the device goes on with its next seq after it
reconnects, so a seq always names one payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import secrets
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bridge.devkit.publisher import Connection, Publish, connect, keep_alive
from bridge.errors import MqttError

_PAD_KEY = ', "pad": ""'
_CONNECTING = 64  # concurrent connects outside a herd: no SYN backlog overflow


def new_run_id() -> str:
    """One id per simulate invocation: the run's records are told from all others."""
    return f"r{int(time.time())}-{secrets.token_hex(2)}"


def payload(run: str, device_id: str, seq: int, sent_ns: int, size: int) -> bytes:
    """The traced payload: exactly `size` bytes when that exceeds the minimal JSON."""
    body = json.dumps({"device_id": device_id, "seq": seq, "sent_ns": sent_ns, "run": run})
    room = size - len(body)
    if room >= len(_PAD_KEY):
        body = f'{body[:-1]}, "pad": "{"x" * (room - len(_PAD_KEY))}"}}'
    elif room > 0:
        body += " " * room  # too little room for the pad key: JSON allows trailing spaces
    return body.encode()


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: a herd's reconnects spread instead of
    arriving together again."""
    return rng.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


def due(index: int, rate: float) -> float:
    """Seconds after the start at which the fleet's `index`-th message is due."""
    return index / rate


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What one run does; `messages` is per device, `rate` the fleet's total msg/s."""

    url: str
    devices: int = 100
    messages: int | None = 10
    duration: float | None = None
    rate: float | None = None
    size: int = 200
    qos: int = 1
    prefix: str = "devices"
    herd: bool = False
    log: Path | None = None
    run_id: str = field(default_factory=new_run_id)
    id_prefix: str = "dev-"
    first_device: int = 0
    username: str | None = None
    password: bytes | None = None
    ssl_context: ssl.SSLContext | None = None
    keepalive: int = 30
    connect_timeout: float = 10.0
    settle_timeout: float = 30.0  # at the end, how long to wait for the acks in flight
    reconnect_attempts: int = 10  # a device gives up after this many failures in a row
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    progress: Callable[[Tally], None] | None = None  # called about twice a second

    def device_ids(self) -> list[str]:
        return [f"{self.id_prefix}{i:05d}"
                for i in range(self.first_device, self.first_device + self.devices)]


@dataclass
class Tally:
    """The run's counts so far; `in_flight` is published but not yet settled."""

    published: int = 0
    acked: int = 0
    refused: int = 0
    unknown: int = 0
    sent: int = 0
    errors: int = 0  # connects that failed and connections that dropped
    connects: int = 0
    gave_up: int = 0  # devices that stopped after `reconnect_attempts` failures
    started: float = field(default_factory=time.monotonic)

    @property
    def in_flight(self) -> int:
        return self.published - self.acked - self.refused - self.unknown - self.sent

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class FleetReport:
    run: str
    published: int
    acked: int
    refused: int
    unknown: int
    sent: int
    errors: int
    connects: int
    gave_up: int
    seconds: float  # from the first publish due (a herd: from the start) to the end
    log: Path | None
    connect_seconds: float | None = None  # until every device's first connect was over
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"published {self.published}, acked {self.acked}, refused {self.refused}, "
                f"unknown {self.unknown}, sent {self.sent} in {self.seconds:.1f} s "
                f"({self.rate:.0f} msg/s)")

def log_line(run: str, publish: Publish, outcome: str, at_ns: int | None = None,
             reason_code: int | None = None) -> str:
    """One JSON line of the simulate log (the contract in README, "simulate")."""
    line: dict[str, Any] = {"run": run, "device_id": publish.device_id, "seq": publish.seq,
                            "topic": publish.topic, "qos": publish.qos,
                            "sent_ns": publish.sent_ns, "outcome": outcome}
    if outcome == "acked":
        line["acked_ns"] = at_ns
    if reason_code is not None:
        line["reason_code"] = reason_code
    return json.dumps(line) + "\n"


class Outcomes:
    """Settles each publish once: counts it and appends its line to the log."""

    def __init__(self, run: str, tally: Tally, log: IO[str] | None) -> None:
        self.run, self.tally, self.log = run, tally, log

    def settle(self, publish: Publish, outcome: str, reason_code: int | None = None) -> None:
        setattr(self.tally, outcome, getattr(self.tally, outcome) + 1)
        if self.log is not None:
            at = time.time_ns() if outcome == "acked" else None
            self.log.write(log_line(self.run, publish, outcome, at, reason_code))

async def probe(spec: FleetSpec) -> None:
    """Connect once and DISCONNECT: an unreachable or refusing broker fails here, once,
    rather than as a thousand devices' errors."""
    connection = await connect(spec, f"sim-check-{spec.run_id}", Outcomes(spec.run_id, Tally(),
                                                                          None))
    await connection.disconnect(0)


class Pacer:
    """The fleet's shared schedule: with a rate, the k-th publish waits until due(k)."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self.issued = rate, 0
        self.start = asyncio.get_running_loop().time()

    async def wait(self) -> None:
        if self.rate is None:
            return
        index, self.issued = self.issued, self.issued + 1
        delay = self.start + due(index, self.rate) - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


class Device:
    """One simulated device: connects (again, with backoff, after a drop or a refusal),
    publishes its seqs in order, and settles each one."""

    def __init__(self, device_id: str, fleet: Fleet) -> None:
        self.id, self.fleet, self.seq = device_id, fleet, 0
        self.topic = f"{fleet.spec.prefix}/{device_id}/telemetry"
        self.connection: Connection | None = None
        self.arrived = False  # its first connect is over, done or failed

    def arrive(self) -> None:
        if not self.arrived:
            self.arrived = True
            self.fleet.arrive()

    def more(self) -> bool:
        spec = self.fleet.spec
        if self.fleet.deadline is not None:
            return asyncio.get_running_loop().time() < self.fleet.deadline
        return spec.messages is None or self.seq < spec.messages

    async def run(self) -> None:
        failures = 0
        while self.more():
            try:
                await self._session()
                return
            except (OSError, MqttError, TimeoutError, ValueError):
                self.arrive()
                self.fleet.tally.errors += 1
                failures = 0 if self.connection is not None else failures + 1
            finally:
                if self.connection is not None:
                    self.connection.lose()
                    self.connection = None
            if failures >= self.fleet.spec.reconnect_attempts:
                self.fleet.tally.gave_up += 1
                return
            await asyncio.sleep(backoff(failures, self.fleet.spec.backoff_base,
                                        self.fleet.spec.backoff_cap, self.fleet.rng))

    async def _session(self) -> None:
        async with self.fleet.connecting:
            self.connection = await connect(self.fleet.spec, self.id, self.fleet.outcomes)
        self.fleet.tally.connects += 1
        self.arrive()
        connection = self.connection
        tasks = [asyncio.create_task(self._publish_all(connection)),
                 asyncio.create_task(connection.read_loop())]
        if self.fleet.spec.keepalive:
            tasks.append(asyncio.create_task(keep_alive(connection, self.fleet.spec.keepalive)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not connection.closed:  # closed here is our own DISCONNECT: a clean end
                for task in done:
                    task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each one's end is seen

    async def _publish_all(self, connection: Connection) -> None:
        spec, fleet = self.fleet.spec, self.fleet
        await fleet.online.wait()
        while self.more():
            await connection.reserve()
            await fleet.pacer.wait()
            if not self.more():
                break
            sent_ns = time.time_ns()
            publish = Publish(self.id, self.seq, self.topic, spec.qos, sent_ns)
            self.seq += 1
            fleet.tally.published += 1
            await connection.publish(publish, payload(spec.run_id, self.id, publish.seq,
                                                      sent_ns, spec.size))
        await connection.disconnect(spec.settle_timeout)

class Fleet:
    """One run: owns the devices' tasks, the tally and the log, and settles every publish
    still in flight as `unknown` however the run ends (Ctrl-C included)."""

    def __init__(self, spec: FleetSpec, log: IO[str] | None) -> None:
        self.spec, self.tally = spec, Tally()
        self.outcomes = Outcomes(spec.run_id, self.tally, log)
        self.rng = random.Random()
        self.deadline: float | None = None
        self.devices = [Device(d, self) for d in spec.device_ids()]
        self.connecting = asyncio.Semaphore(len(self.devices) if spec.herd else _CONNECTING)
        self.online = asyncio.Event()  # publishing may start
        self.connect_seconds: float | None = None  # until every device's first connect ended
        self._arrived = 0

    def arrive(self) -> None:
        """One more device's first connect is over. Outside a herd the fleet publishes once
        all are: else the first devices' traffic starves the others' connects (measured:
        1,000 devices took the whole 10 s run to connect) and --rate/--duration would
        measure the ramp."""
        self._arrived += 1
        if self._arrived == len(self.devices):
            self.connect_seconds = time.monotonic() - self._begun
            if not self.spec.herd:
                self._start()

    def _start(self) -> None:
        """The clock of --rate and --duration (and of the report's seconds) starts now."""
        self.pacer.start = asyncio.get_running_loop().time()
        self.tally.started = time.monotonic()
        if self.spec.duration is not None:
            self.deadline = self.pacer.start + self.spec.duration
        self.online.set()

    async def run(self) -> None:
        self.pacer = Pacer(self.spec.rate)
        self._begun = time.monotonic()
        if self.spec.herd:
            self._start()
        progress = asyncio.create_task(self._progress()) if self.spec.progress else None
        try:
            await asyncio.gather(*(d.run() for d in self.devices))
        finally:
            if progress is not None:
                progress.cancel()
            for device in self.devices:
                if device.connection is not None:
                    device.connection.lose()
            if self.spec.progress is not None:
                self.spec.progress(self.tally)

    async def _progress(self) -> None:
        assert self.spec.progress is not None
        while True:
            await asyncio.sleep(0.5)
            self.spec.progress(self.tally)
            if self.outcomes.log is not None:
                self.outcomes.log.flush()

    def report(self, interrupted: bool = False) -> FleetReport:
        t = self.tally
        return FleetReport(self.spec.run_id, t.published, t.acked, t.refused, t.unknown, t.sent,
                           t.errors, t.connects, t.gave_up, t.seconds, self.spec.log,
                           self.connect_seconds, interrupted)


def raise_fd_limit(needed: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (one socket per device); ValueError
    when even that is too low for `needed` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ValueError(f"{needed} descriptors needed, the hard limit is {soft}: raise it "
                         "(ulimit -Hn, LimitNOFILE=) or run fewer devices")
    return soft


async def run_async(spec: FleetSpec, check: bool = True) -> FleetReport:
    """The fleet as a coroutine; `check` first probes the broker once (raising OSError or
    MqttError), so an unreachable broker is one error, not one per device."""
    raise_fd_limit(spec.devices + 64)
    if check:
        await probe(spec)
    with _open_log(spec.log) as log:
        fleet = Fleet(spec, log)
        try:
            await fleet.run()
        except asyncio.CancelledError:
            return fleet.report(interrupted=True)
        return fleet.report()


def run(spec: FleetSpec, check: bool = True) -> FleetReport:
    """Run the fleet to the end (or Ctrl-C): the log is complete and flushed on return."""
    holder: list[FleetReport] = []

    async def main() -> None:
        holder.append(await run_async(spec, check))

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        if not holder:
            raise
    return holder[0]


def _open_log(path: Path | None) -> contextlib.AbstractContextManager[IO[str] | None]:
    """The log, appended to (several runs may share one), or nothing."""
    return path.open("a", encoding="utf-8") if path is not None else \
        contextlib.nullcontext()


class Progress:
    """A tqdm line on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, planned: int | None, stream: IO[str] = sys.stdout,
                 every: float = 5.0) -> None:
        self.stream, self.every, self.last = stream, every, 0.0
        self.bar: Any = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=planned, unit="msg", file=stream, dynamic_ncols=True)

    def __call__(self, t: Tally) -> None:
        if self.bar is not None:
            self.bar.set_postfix(acked=t.acked, in_flight=t.in_flight, errors=t.errors,
                                 refresh=False)
            self.bar.update(t.published - self.bar.n)
        elif t.seconds - self.last >= self.every:
            self.last = t.seconds
            print(f"{t.seconds:.0f} s: published {t.published} "
                  f"({t.published / t.seconds:.0f} msg/s), acked {t.acked}, "
                  f"in flight {t.in_flight}, errors {t.errors}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
