"""The daemon's lifecycle: start-up, the main loop, and a shutdown that loses nothing.

One object owns every task and thread. SIGTERM/SIGINT: stop reading, wait (up to
`bridge.shutdown_timeout`) for outstanding delivery reports, send the acks they earned,
DISCONNECT. Whatever was not acked stays with the broker, which redelivers it: a restart.
A second signal exits at once. SIGHUP reloads the config: checked in full, then applied in
one step. SIGUSR1 retires the bridge (scale-in): every session unsubscribes, bridges what
its broker still queued, and ends with session expiry 0; then the daemon stops and exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import importlib.metadata
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from confluent_kafka import KafkaException

from bridge.config import LANES, Config
from bridge.errors import ConfigError
from bridge.files import FileTransfers
from bridge.http import Status, StatusServer
from bridge.kafka import Delivery, KafkaSink
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.mqtt import BrokerSession, Inflight
from bridge.pipeline import Job, Pipeline
from bridge.s3 import ObjectStore, S3Error
from bridge.settle import Lane
from bridge.sparkplug_host import Sparkplug, host_sessions
from bridge.systemd import Notifier

log = structlog.get_logger("bridge.daemon")
# Config sections a reload cannot change under running sessions: they need a restart.
_RESTART_ONLY = ("bridge", "brokers", "http")
_BEAT = 0.5  # seconds between heartbeats of the event loop (health, readiness, watchdog)
_STATUS_EVERY = 10.0  # seconds between STATUS= lines to systemd
_PROBE_EVERY = 2.0  # seconds between metadata requests of a producer Kafka has not answered
# A producer Kafka has not answered for this long is asked: a hung broker keeps its TCP
# connection open, and librdkafka says "all brokers down" only after its socket timeout.
_ANSWER_FRESH = 10.0
# Seconds start-up holds PUBLISHes for the producers to be primed: librdkafka asks for a
# producer id 0.5 s after a producer is built, then every 0.5 s until a broker is up.
_PRIME_MAX = 2.0
_PRIME_RELOAD_MAX = 10.0  # seconds a reload waits for its new producers to be primed
_GC_YOUNG = 20_000  # allocations between collections of the young generation


class Daemon:
    """Runs one config: per lane a Kafka producer, a pipeline and a session per broker.

    SIGHUP reloads the config through `loader`: validated first, then swapped in whole.
    """

    def __init__(self, config: Config, loader: Callable[[], Config] | None = None,
                 on_ready: Callable[[], None] | None = None, retire: bool = False) -> None:
        """`retire`: end every session at once, having bridged its queue (`adopt`)."""
        self.config, self._loader, self._on_ready = config, loader, on_ready
        self._retire_at_start = retire
        # Set by `run`: whether a SIGUSR1 came before the loop took the signal over.
        self.retire_requested: Callable[[], bool] = lambda: False
        self.retiring: asyncio.Task[None] | None = None
        self.retired = False  # every session ended: the broker forgot them
        self.metrics = Metrics()
        self.status = Status()  # what the HTTP endpoint reads: heartbeat and readiness
        self.http: StatusServer | None = None
        self.ready = asyncio.Event()  # once ready for the first time
        self.notifier = Notifier.from_environment()  # systemd's Type=notify, if it is there
        self._ledgers = self.metrics.ledger.lanes  # the hot path's bookkeeping, per lane
        # Set once every lane's producer is primed (`KafkaSink.primed`): sessions read no
        # PUBLISH before, so the first records do not wait out librdkafka's PID timer.
        self.primed = asyncio.Event()
        self._stop = asyncio.Event()
        self._signals = 0
        self.sinks: dict[str, KafkaSink] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.sessions: dict[tuple[int, str], BrokerSession] = {}  # (broker index, lane)
        self._tasks: dict[tuple[int, str], asyncio.Task[None]] = {}
        # Sessions of lanes a reload removed, until they have handed over what was queued.
        self._leaving: dict[tuple[int, str], tuple[BrokerSession, asyncio.Task[None],
                                                   asyncio.Task[None]]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired_sinks: list[KafkaSink] = []
        self._reloading = False
        # Per lane: its job pool and guard (kept across reloads) and its own S3 client and
        # threads, so one lane's S3 traffic never waits behind another's.
        self.lanes: dict[str, Lane] = {}
        self.objects: dict[str, ObjectStore] = {}
        self.files: FileTransfers | None = None
        self.sparkplug: Sparkplug | None = None
        # Sparkplug host application STATE sessions ([sparkplug] host_id), one per broker.
        self._hosts: dict[BrokerSession, asyncio.Task[None]] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.http is not None:
            self.http = StatusServer(self.config.http, self.metrics, self.status)
            self.http.start()
        self.metrics.build_info.info({"version": _version()})
        self.metrics.map_info.info({"map_version": self.config.version})
        self._apply(self.config, self._new_sinks(self.config))
        sparkplug = self.config.sparkplug
        if sparkplug is not None and sparkplug.host_id:
            for host in host_sessions(self.config, sparkplug, self.metrics):
                self._hosts[host] = asyncio.create_task(host.run(),
                                                        name=f"sparkplug host {host.name}")
        if self._retire_at_start:
            self.retire()
        priming = asyncio.create_task(self._prime())
        # What start-up built (modules, config, clients) lives as long as the process: full
        # garbage collections, 50-80 ms each while bridging, need not walk it every time.
        gc.freeze()
        # Each message allocates a few tracked objects (message, receipt, delivery, ...), all
        # gone within milliseconds: collecting the young generation every 700 allocations
        # (the default) walked them about 30 times a second per 1,000 msg/s for nothing.
        gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        loop.add_signal_handler(signal.SIGUSR1, self.retire)
        if self.retiring is None and self.retire_requested():  # during start-up
            self.retire()
        stats = asyncio.create_task(self._log_stats())
        sweeper = asyncio.create_task(self._sweep_transfers())
        watch = asyncio.create_task(self._watch())
        probe = asyncio.create_task(self._probe_kafka())
        log.info("bridge_started", instance=self.config.bridge.instance,
                 brokers=[b.name for b in self.config.brokers], map_version=self.config.version,
                 lanes=list(self.pipelines),
                 subscriptions={lane: p.router.subscriptions() for lane, p in
                                self.pipelines.items()})
        try:
            await self._check_topics()
            await self._apply_lifecycle()
            await self._stop.wait()
        finally:
            await self._shutdown()
            for task in (stats, sweeper, watch, probe, priming):
                task.cancel()
            if self.http is not None:
                self.http.close()

    def stop(self) -> None:
        self._stop.set()

    def retire(self) -> None:
        """Scale in (SIGUSR1, or `adopt`): every session unsubscribes at once, bridges what
        its broker still queued until it is quiet with every ack sent, and ends with session
        expiry 0, leaving nothing for the broker to hold; then the daemon stops. A SIGTERM
        meanwhile stops it as a restart does: what is still queued stays in the session."""
        if self.retiring is not None:
            log.info("bridge_already_retiring")
            return
        if self._stop.is_set():  # unsubscribing now would lose what is published until
            log.warning("retire_ignored", why="stopping (a restart): the sessions stay "
                        "subscribed, to be resumed")  # the restarted bridge subscribes again
            return
        sessions = list(self.sessions.values())
        for session in sessions:
            session.unsubscribe_all()
        # Lanes a reload removed retire already: the bridge has retired once they are done.
        leaving = [task for _, _, task in self._leaving.values()]
        log.info("bridge_retiring", sessions=[s.config.client_id for s in sessions],
                 leaving=[s.config.client_id for s, _, _ in self._leaving.values()],
                 why="scale-in: draining what the brokers queued, then ending the sessions")
        self.notifier.stopping()
        self.notifier.status("retiring: draining the sessions' queues, then ending them")
        self.retiring = asyncio.create_task(self._retire_all(sessions, leaving))

    async def _retire_all(self, sessions: list[BrokerSession],
                          leaving: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*(session.retire() for session in sessions), *leaving)
        self.retired = True
        log.info("bridge_retired", sessions=[s.config.client_id for s in sessions],
                 present=[s.config.client_id for s in sessions if s.session_present])
        self._stop.set()

    def publish(self, broker: str, topic: str, payload: bytes,
                **properties: Any) -> asyncio.Future[int | None] | None:
        """A message of the bridge's own to `broker` (named as in Message.broker), on one
        of its connected sessions (`BrokerSession.publish`): a future of the PUBACK's
        reason code, or None when no session of that broker is connected."""
        for session in self.sessions.values():
            if session.name == broker and session.connected.is_set():
                return session.publish(topic, payload, **properties)
        return None

    def readiness(self) -> tuple[str, ...]:
        """What the bridge still waits for before it can bridge: every session of every
        lane connected and subscribed, every lane's producer answered by Kafka. Empty when
        ready (/readyz, READY=1)."""
        waiting = [f"mqtt {s.name} ({lane}): "
                   + ("not subscribed" if s.connected.is_set() else "not connected")
                   for (_, lane), s in self.sessions.items() if not s.subscribed.is_set()]
        waiting += [f"kafka ({lane}): no answer from {sink.properties.get('bootstrap.servers')}"
                    for lane, sink in self.sinks.items() if not sink.reachable]
        waiting += [f"kafka ({lane}): no producer id yet"
                    for lane, sink in self.sinks.items()
                    if sink.reachable and not sink.primed.is_set()]
        if self.retiring is not None:
            waiting.append("nothing: retiring (scale-in), it takes no new messages")
        return tuple(waiting)

    async def _prime(self) -> None:
        """Open the sessions' gate once every lane's producer is primed, or after
        `_PRIME_MAX` s: a Kafka that answers by then is one the first records need not
        wait for; one that does not gets what it always got (sessions read, records wait
        in the producer's bounded queue, readiness says what it waits for). The probe loop
        asks Kafka for metadata meanwhile; a reload may replace a sink, so they are looked
        at again now and then. The gate opens whatever happens here: a bug in this wait
        must not keep every session from reading."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PRIME_MAX
        try:
            while loop.time() < deadline:
                waiting = [sink for sink in self.sinks.values() if not sink.primed.is_set()]
                if not waiting:
                    log.info("bridge_primed", lanes=list(self.sinks))
                    break
                await _any_set([sink.primed for sink in waiting],
                               min(_BEAT, deadline - loop.time()))
            else:
                log.warning("kafka_not_primed", lanes=[lane for lane, sink in self.sinks.items()
                                                       if not sink.primed.is_set()],
                            why=f"no producer id or metadata within {_PRIME_MAX:g} s: reading "
                                "anyway, records wait in the producer until Kafka answers")
        except Exception:
            log.exception("bridge_priming_crashed", why="reading without waiting for Kafka")
        finally:
            self.primed.set()

    async def _prime_new(self, sinks: dict[str, KafkaSink]) -> None:
        """A reload's new producers are primed before they take over (the old ones bridge
        meanwhile), for at most `_PRIME_RELOAD_MAX` s: a Kafka that does not answer then
        delays the reload no further (readiness says what it waits for)."""
        fresh = [sink for sink in sinks.values() if sink not in self.sinks.values()]
        loop = asyncio.get_running_loop()
        for sink in fresh:
            sink.start()
        await asyncio.gather(*(loop.run_in_executor(None, sink.probe) for sink in fresh))
        deadline = loop.time() + _PRIME_RELOAD_MAX
        while loop.time() < deadline and not all(s.primed.is_set() for s in fresh):
            await _any_set([s.primed for s in fresh if not s.primed.is_set()],
                           deadline - loop.time())

    async def _watch(self) -> None:
        """The event loop's heartbeat: readiness and health for the HTTP endpoint and for
        systemd (READY=1 once, WATCHDOG=1 every half of WatchdogSec, STATUS= now and then),
        and the gauges only the loop can read. Being a task of the loop, it stops when the
        loop stops turning, and so does the watchdog's ping: systemd restarts the unit."""
        notifier = self.notifier
        ping_every = notifier.watchdog_interval
        beat = _BEAT if ping_every is None else min(_BEAT, ping_every / 2)
        loop = asyncio.get_running_loop()
        said = pinged = loop.time() - _STATUS_EVERY
        counted = self._settled_count(), loop.time()
        while True:
            self.status.beat = time.monotonic()
            if ping_every is not None and loop.time() - pinged >= ping_every:
                notifier.watchdog()
                pinged = loop.time()
            try:
                waiting = self.readiness()
                self.status.waiting_for = waiting
                if not waiting and not self.ready.is_set():
                    self.ready.set()
                    log.info("bridge_ready", map_version=self.config.version)
                    notifier.ready()
                    if self._on_ready is not None:
                        self._on_ready()
                if loop.time() - said >= _STATUS_EVERY:
                    now = self._settled_count(), loop.time()
                    rate = (now[0] - counted[0]) / max(1e-9, now[1] - counted[1])
                    notifier.status(self._status_line(rate, waiting))
                    said, counted = loop.time(), now
                for lane, sink in self.sinks.items():
                    self.metrics.set("kafka_records_pending", sink.pending, lane=lane)
                    self.metrics.set("kafka_reachable", int(sink.reachable), lane=lane)
                for lane, runtime in self.lanes.items():
                    self.metrics.set("lane_jobs", len(runtime.tasks), lane=lane)
            except Exception:  # a bug here must not stop the heartbeat of a working loop
                log.exception("heartbeat_failed")
            await asyncio.sleep(beat)

    def _settled_count(self) -> int:
        return sum(lane.settled_total for lane in self.metrics.ledger.lanes.values())

    def _status_line(self, rate: float, waiting: tuple[str, ...]) -> str:
        """systemctl status's one line: what flows, what waits, what was refused."""
        lanes = self.metrics.ledger.lanes.values()
        in_flight = sum(lane.in_flight for lane in lanes)
        dead = sum(self.metrics.by_label("dead_lettered_messages", "code").values())
        line = f"{rate:.0f} msg/s, {in_flight} in flight, {dead} dead letters"
        if waiting:
            line += f"; waiting for {waiting[0]}" + (f" (+{len(waiting) - 1})"
                                                     if len(waiting) > 1 else "")
        return line

    async def _probe_kafka(self) -> None:
        """Ask Kafka for metadata on behalf of each producer it has not answered lately (no
        delivery report, no metadata for `_ANSWER_FRESH` seconds, or librdkafka said every
        broker is down): what readiness needs while no record flows, and how a hung
        broker is noticed within seconds. A busy producer is never asked."""
        loop = asyncio.get_running_loop()
        while True:
            stale = loop.time() - _ANSWER_FRESH
            for sink in [s for s in self.sinks.values()
                         if not s.reachable or s.answered_at < stale]:
                await loop.run_in_executor(None, sink.probe)
            await asyncio.sleep(_PROBE_EVERY)

    def _new_sinks(self, config: Config) -> dict[str, KafkaSink]:
        """The producers `config` needs: kept where a lane's settings did not change, new
        ones built (not yet started). Nothing is switched yet, so a producer librdkafka
        refuses leaves the running config as it was."""
        loop = asyncio.get_running_loop()
        sinks: dict[str, KafkaSink] = {}
        try:
            for lane in config.producer_lanes():
                sink = self.sinks.get(lane)
                if sink is None or sink.properties != config.producer_config(lane):
                    sink = KafkaSink(config.producer_config(lane), loop, self.metrics, lane)
                sinks[lane] = sink
        except KafkaException as exc:
            for sink in sinks.values():
                if sink not in self.sinks.values():
                    sink.close()
            raise ConfigError([f"lanes.{lane}: librdkafka refused the producer: {exc}"]) \
                from exc
        return sinks

    def _apply(self, config: Config, sinks: dict[str, KafkaSink]) -> None:
        """Switch to `config` in one step on the loop: producers, pipelines, then
        subscriptions. Prepared messages keep the pipeline, and so the map and producer, they
        started with."""
        lanes = config.session_lanes()
        for sink in sinks.values():
            if sink not in self.sinks.values():
                sink.start()
        for lane, old in self.sinks.items():
            if sinks.get(lane) is not old:
                old.successor = sinks.get(lane) or _same_cluster(old, sinks.values())
                self._retired_sinks.append(old)
                self._retire(self._retire_sink(old))
        self.sinks = sinks
        self._lanes_for(config)
        self.pipelines = {}
        for lane in lanes:
            pipeline = Pipeline(config, lane, self.metrics, sinks, self.objects.get(lane))
            pipeline.runner = self.lanes[lane].runner_for(pipeline)
            pipeline.elsewhere = functools.partial(self._elsewhere, lane)
            self.pipelines[lane] = pipeline
        self.files = None
        if config.file_transfer is not None and "fat" in self.objects:
            self.files = FileTransfers(config, config.file_transfer, self.pipelines["fat"],
                                       self.objects["fat"], self.metrics,
                                       self.lanes["fat"].pool, publish=self.publish)
        previous = self.sparkplug
        self.sparkplug = None
        if config.sparkplug is not None:
            self.sparkplug = Sparkplug(config, config.sparkplug,
                                       self.pipelines[config.sparkplug.lane], self.metrics,
                                       self.publish, previous.state if previous else None)
        self.config = config
        for index, broker in enumerate(config.brokers):
            for lane in lanes:
                filters = self.pipelines[lane].router.subscriptions()
                if lane == "fat" and self.files is not None:
                    filters.append(self.files.subscription())
                if self.sparkplug is not None and lane == self.sparkplug.lane:
                    filters += self.sparkplug.subscriptions()
                key = (index, lane)
                if key in self._leaving:  # wanted again before it finished leaving
                    session, task, leaving = self._leaving.pop(key)
                    leaving.cancel()
                    self.sessions[key], self._tasks[key] = session, task
                if key in self.sessions:
                    self.sessions[key].update_subscriptions(filters)
                    continue
                session = BrokerSession(broker.for_lane(lane), filters,
                                        functools.partial(self._handle, lane), self.metrics,
                                        lane, self.primed, config.bridge.instance)
                self.sessions[key] = session
                self._tasks[key] = asyncio.create_task(session.run(),
                                                       name=f"mqtt {session.name} {lane}")
        for key in [k for k in self.sessions if k[1] not in lanes]:
            session, task = self.sessions.pop(key), self._tasks.pop(key)
            leaving = asyncio.create_task(self._retire_session(key, session, task))
            self._leaving[key] = (session, task, leaving)

    def _lanes_for(self, config: Config) -> None:
        """Every lane's runtime (job pool and guard) and, with [s3], its own S3 client."""
        s3 = config.s3
        slots = s3.concurrency if s3 else 8
        max_bytes = s3.max_pending_bytes if s3 else 128 * 2**20
        renew = s3 is not None and (not self.objects or s3 != self.config.s3)
        for lane in LANES:
            runtime = self.lanes.get(lane)
            if runtime is None:
                runtime = self.lanes[lane] = Lane(lane, slots, max_bytes, self.metrics)
            runtime.pool.slots, runtime.pool.max_bytes = slots, max_bytes
            if renew:
                assert s3 is not None
                self.objects[lane] = ObjectStore(s3, workers=s3.concurrency + 4,
                                                 metrics=self.metrics)
        if s3 is None:
            self.objects = {}

    def _retire(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_sink(self, sink: KafkaSink) -> None:
        """A lane's old producer finishes what it has (retries included), then closes and
        hands what jobs of older pipelines still produce to its successor. A lane the reload
        removed has none: its producer stays open, idle, until shutdown."""
        await sink.drain(float("inf"))
        if sink.successor is None:
            log.info("kafka_producer_idle", lane=sink.lane,
                     why="its lane is gone; kept for jobs begun before the reload")
            return
        sink.close()
        self._retired_sinks.remove(sink)
        log.info("kafka_producer_retired", lane=sink.lane)

    async def _retire_session(self, key: tuple[int, str], session: BrokerSession,
                              task: asyncio.Task[None]) -> None:
        await session.retire()
        task.cancel()
        del self._leaving[key]
        log.info("mqtt_session_retired", broker=session.name, client_id=session.config.client_id)

    def _on_reload_signal(self) -> None:
        if self._loader is None:
            log.warning("reload_unsupported", why="this daemon was not started from a file")
        elif self._reloading:
            log.info("reload_already_running")
        elif self.retiring is not None:
            log.warning("reload_ignored", why="retiring: no session subscribes again")
        else:
            self._reloading = True
            self.notifier.reloading()
            task = asyncio.create_task(self._reload())
            task.add_done_callback(self._reloaded)

    def _winding_down(self) -> bool:
        """A retire or a stop began while a reload was loading or priming: applying it now
        would subscribe retiring sessions again, or open sessions nothing retires or
        closes (a stopped daemon's), left on the broker to queue for no one."""
        if self.retiring is None and not self._stop.is_set():
            return False
        self.metrics.inc("reloads", outcome="abandoned")
        log.warning("reload_abandoned", map_version=self.config.version,
                    why="retiring or stopping: the running config stays, nothing subscribes "
                        "again")
        return True

    def _reloaded(self, task: asyncio.Task[None]) -> None:
        """A reload that crashed is said, not left as an unretrieved task exception."""
        self._reloading = False
        if self.ready.is_set() and self.retiring is None and not self._stop.is_set():
            self.notifier.ready()
        if not task.cancelled() and task.exception() is not None:
            self.metrics.inc("reloads", outcome="failed")
            log.error("reload_failed", error=repr(task.exception())[:500],
                      map_version=self.config.version)

    async def _reload(self) -> None:
        """Validate the new config fully (off the loop: a registry can be large), then apply
        it; a bad one is refused with its key paths and the running config stays."""
        assert self._loader is not None
        loop = asyncio.get_running_loop()
        try:
            config = await loop.run_in_executor(None, self._loader)
            if config.version == self.config.version:
                log.info("reload_unchanged", map_version=config.version)
                return
            kept = [name for name in _RESTART_ONLY
                    if getattr(config, name) != getattr(self.config, name)]
            running_host = _host_id(self.config)
            if _host_id(config) != running_host:  # its STATE sessions were made at start
                kept.append("sparkplug.host_id")
            if kept:
                log.warning("reload_needs_restart", sections=kept,
                            why="sessions keep running with these settings until a restart")
                config = dataclasses.replace(config, bridge=self.config.bridge,
                                             brokers=self.config.brokers)
                if config.sparkplug is not None:
                    config = dataclasses.replace(config, sparkplug=dataclasses.replace(
                        config.sparkplug, host_id=running_host))
            if self._winding_down():
                return
            sinks = self._new_sinks(config)
            try:
                await self._prime_new(sinks)
            finally:
                abandoned = self._winding_down()
                if abandoned:  # the fresh producers were started: stop them again
                    for sink in sinks.values():
                        if sink not in self.sinks.values():
                            sink.close()
            if abandoned:
                return
        except ConfigError as exc:
            self.metrics.inc("reloads", outcome="refused")
            log.error("reload_refused", problems=exc.problems, map_version=self.config.version,
                      why="the running config stays")
            return
        previous = self.config.version
        self._apply(config, sinks)
        self.metrics.map_info.info({"map_version": config.version})
        self.metrics.inc("reloads", outcome="applied")
        log.info("reload_applied", map_version=config.version, previous=previous,
                 lanes=list(self.pipelines),
                 subscriptions={lane: p.router.subscriptions() for lane, p in
                                self.pipelines.items()})

    async def _check_topics(self) -> None:
        """Say at start-up which Kafka topics are missing, rather than at the first record."""
        loop = asyncio.get_running_loop()
        sink = next(iter(self.sinks.values()))
        missing = await loop.run_in_executor(None, sink.missing_topics,
                                             self.config.fixed_topics())
        if missing:
            log.error("kafka_topics_missing", topics=missing,
                      why="records for them go to the dead-letter topic (or wait, if it is "
                          "the dead-letter topic) until they are created")

    async def _apply_lifecycle(self) -> None:
        """`[s3] apply_lifecycle`: what `s3-setup` does, at start-up; a failure is logged."""
        s3 = self.config.s3
        objects = next(iter(self.objects.values()), None)
        if s3 is None or not s3.apply_lifecycle or objects is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, objects.apply_lifecycle,
                                       s3.staging_expiry_days, s3.staging_expiry_days)
        except S3Error as exc:
            log.error("s3_lifecycle_failed", error=str(exc),
                      why="staging leftovers will not expire until `s3-setup` succeeds")
            return
        log.info("s3_lifecycle_applied", bucket=s3.bucket, days=s3.staging_expiry_days)

    def _handle(self, lane: str, message: Message,
                inflight: Inflight | None) -> Awaitable[None] | None:
        """Source -> pipeline -> sink, through the lane's guard (`bridge/settle.py`), which
        settles the message whatever a stage raises; returns an awaitable only when Kafka
        or the lane's job pool pushes back."""
        receipt = self._ledgers[lane].receive(message.broker, inflight)
        pipeline = self.pipelines.get(lane)
        if pipeline is None:  # a reload removed the lane; its session is handing over
            pipeline = next(iter(self.pipelines.values()))
        runtime = self.lanes[pipeline.lane]
        files = self.files
        if lane == "fat" and files is not None and files.takes(message.topic):
            return runtime.job(pipeline, message, receipt,
                               lambda: files.handle(message, receipt),
                               files.device_of(message.topic))
        sparkplug = self.sparkplug
        if sparkplug is not None and lane == sparkplug.lane and sparkplug.takes(message.topic):
            return runtime.accept(pipeline, message, receipt, sparkplug.prepare)
        return runtime.accept(pipeline, message, receipt)

    async def _sweep_transfers(self) -> None:
        """Dead-letter file transfers that outlived their expiry, now and then."""
        while True:
            files = self.files
            interval = 60.0 if files is None else min(60.0, files.settings.expiry_seconds / 4)
            await asyncio.sleep(interval)
            if self.files is not None:
                try:
                    expired = await self.files.sweep(time.time_ns() // 1_000_000)
                except Exception:
                    log.exception("file_sweep_failed")
                    continue
                if expired:
                    log.info("file_transfers_expired", count=expired)

    def _elsewhere(self, lane: str, message: Message,
                   on_durable: Callable[[], None] | None) -> Delivery | Job | None:
        """The delivery of another lane whose routes take this topic, if one does."""
        for other, pipeline in self.pipelines.items():
            if other != lane and pipeline.router.takes(message.topic):
                return pipeline.prepare(message, on_durable)
        return None

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("bridge_forced_exit", signal=sig.name,
                        why="second signal; unacked messages stay with the broker")
            os._exit(128 + sig)
        log.info("bridge_stopping", signal=sig.name)
        self.notifier.stopping()
        self.notifier.status("stopping: waiting for Kafka, then acking and disconnecting")
        self._stop.set()

    async def _shutdown(self) -> None:
        sessions = [*self.sessions.values(), *(s for s, _, _ in self._leaving.values())]
        for session in sessions:
            session.stop_reading()
        jobs = [task for runtime in self.lanes.values() for task in runtime.tasks]
        if jobs:  # jobs under way get the same deadline as Kafka
            _, late = await asyncio.wait(jobs, timeout=self.config.bridge.shutdown_timeout)
            for task in late:
                task.cancel()
        tasks = [*self._tasks.values(), *self._retiring,
                 *([self.retiring] if self.retiring is not None else []),
                 *(t for _, run, leaving in self._leaving.values() for t in (run, leaving))]
        for session in sessions:
            session.stop_reading()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sinks = [*self.sinks.values(), *self._retired_sinks]
        drained = all(await asyncio.gather(*(
            sink.drain(self.config.bridge.shutdown_timeout) for sink in sinks)))
        for session in sessions:
            await session.close()
        for host, task in self._hosts.items():  # its will says offline
            host.stop_reading()
            await host.close()
            task.cancel()
        for sink in sinks:
            sink.close()
        for runtime in self.lanes.values():
            runtime.close()
        log.info("bridge_stopped", drained=drained,
                 left_unacked=sum(sink.pending for sink in sinks), **self.metrics.snapshot())

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.bridge.stats_interval)
            caches = [p.plan_cache() for p in self.pipelines.values()]
            sinks = [*self.sinks.values(), *self._retired_sinks]
            log.info("bridge_stats", pending=sum(s.pending for s in sinks),
                     plans=sum(n for n, _ in caches), plan_bytes=sum(b for _, b in caches),
                     dead_letters=self.metrics.by_label("dead_lettered_messages", "code"),
                     **self.metrics.snapshot())


def _version() -> str:
    try:
        return importlib.metadata.version("mqtt-kafka-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _any_set(events: list[asyncio.Event], timeout: float) -> None:
    """Wait until one of `events` is set, or `timeout` seconds."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _same_cluster(old: KafkaSink, sinks: Iterable[KafkaSink]) -> KafkaSink | None:
    """For a lane a reload removed: a new producer writing to the same cluster, which can
    take what jobs begun before the reload still produce."""
    servers = old.properties.get("bootstrap.servers")
    return next((s for s in sinks if s.properties.get("bootstrap.servers") == servers), None)


def _host_id(config: Config) -> str:
    """The Sparkplug host id a config announces ("" for none)."""
    return config.sparkplug.host_id if config.sparkplug is not None else ""
