"""The daemon's lifecycle: start-up, the main loop, and a shutdown that loses nothing.

One object owns every task and thread. SIGTERM/SIGINT: stop reading, wait (up to
`bridge.shutdown_timeout`) for outstanding delivery reports, send the acks they earned,
DISCONNECT. Whatever was not acked stays with the broker, which redelivers it. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable

import structlog

from bridge.config import Config
from bridge.kafka import KafkaSink
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.mqtt import BrokerSession, Inflight
from bridge.pipeline import Pipeline

log = structlog.get_logger("bridge.daemon")


class Daemon:
    """Runs one config: a session per broker, one pipeline, one Kafka sink."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._signals = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.sink = KafkaSink(self.config.producer_config(), loop, self.metrics)
        self.pipeline = Pipeline(self.config, self.sink, self.metrics)
        self.sessions = [
            BrokerSession(broker, self.pipeline.router.subscriptions(), self._handle, self.metrics)
            for broker in self.config.brokers
        ]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.sink.start()
        tasks = [asyncio.create_task(s.run(), name=f"mqtt {s.name}") for s in self.sessions]
        stats = asyncio.create_task(self._log_stats())
        log.info("bridge_started", instance=self.config.bridge.instance,
                 brokers=[s.name for s in self.sessions], map_version=self.config.version,
                 subscriptions=self.pipeline.router.subscriptions())
        try:
            await self._check_topics()
            await self._stop.wait()
        finally:
            await self._shutdown(tasks)
            stats.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _check_topics(self) -> None:
        """Say at start-up which Kafka topics are missing, rather than at the first record."""
        loop = asyncio.get_running_loop()
        missing = await loop.run_in_executor(None, self.sink.missing_topics,
                                             self.config.fixed_topics())
        if missing:
            log.error("kafka_topics_missing", topics=missing,
                      why="records for them go to the dead-letter topic (or wait, if it is "
                          "the dead-letter topic) until they are created")

    def _handle(self, message: Message, inflight: Inflight | None) -> Awaitable[None] | None:
        """Source -> pipeline -> sink; returns an awaitable only when Kafka pushes back."""
        delivery = self.pipeline.prepare(message, inflight)
        if self.sink.try_send(delivery):
            return None
        return self.sink.send(delivery)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("bridge_forced_exit", signal=sig.name,
                        why="second signal; unacked messages stay with the broker")
            os._exit(128 + sig)
        log.info("bridge_stopping", signal=sig.name)
        self._stop.set()

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        for session in self.sessions:
            session.stop_reading()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        drained = await self.sink.drain(self.config.bridge.shutdown_timeout)
        for session in self.sessions:
            await session.close()
        self.sink.close()
        log.info("bridge_stopped", drained=drained, left_unacked=self.sink.pending,
                 **self.metrics.snapshot())

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.bridge.stats_interval)
            log.info("bridge_stats", pending=self.sink.pending, **self.metrics.snapshot())
