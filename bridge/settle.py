"""Every received message is settled, by construction.

A message leaves the bridge in one of two ways: its outcome becomes durable (its envelope in
Kafka, a file segment in S3) and it is acked, or it is dead-lettered with a code and acked
once that record is durable. `Lane.accept` is the one door every message comes through, and
whatever a stage raises, synchronously or in a job, becomes an `internal_error` dead letter
naming the exception. No code path can leave an `Inflight` unsettled, which matters beyond
the one message: acks leave a session in receive order, so one unsettled message would hold
back every ack behind it until the receive window filled and the lane stopped for every
device, and a restart would only redeliver it.

Work off the fast path (S3, large format checks, topic lookups) runs as jobs in the lane's
own `JobPool`, so one lane's S3 traffic never waits behind another's. When the pool is full
the lane's source stops reading: backpressure to the broker (invariant 3). A job that waits
for something other than its own work (a lock, the fin grace, a Kafka delivery report) gives
its slot back meanwhile (`JobPool.idle`), so waiting never holds a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from bridge.errors import Rejected, describe
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.pipeline import LOG_TOPIC_MAX, Job, Pipeline

T = TypeVar("T")
log = structlog.get_logger("bridge.settle")
_TRACE_EVERY = 10.0  # seconds between tracebacks of one exception class: devices can repeat


class JobPool:
    """Slots for one lane's jobs, bounded in count and in payload bytes held.

    A job larger than `max_bytes` still runs, alone, so any size can pass. Slots are handed
    over first come, first served.
    """

    def __init__(self, slots: int, max_bytes: int) -> None:
        self.slots, self.max_bytes = slots, max_bytes
        self.busy = 0  # slots taken
        self.held = 0  # payload bytes of the jobs admitted
        self._waiting: deque[tuple[asyncio.Future[None], int]] = deque()

    def try_take(self, size: int) -> bool:
        """Take a slot now, if one is free and no one waits before us."""
        if self._waiting or not self._fits(size):
            return False
        self.busy += 1
        self.held += size
        return True

    async def take(self, size: int) -> None:
        """Wait for a slot; cancelled, it takes none."""
        if self.try_take(size):
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((turn, size))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give(size)  # handed over just as we were cancelled: pass it on
            else:
                self._waiting.remove((turn, size))
            raise

    def give(self, size: int) -> None:
        """Give back a slot (and its bytes); the first waiter that fits gets it."""
        self.busy -= 1
        self.held -= size
        self._hand_over()

    @contextlib.asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """Give the slot back while waiting on something else; the bytes stay counted,
        since the job still holds its payload. Coming back never waits (the pool may run
        over its count for a moment), so a job can wait on another job without deadlock."""
        self.busy -= 1
        self._hand_over()
        try:
            yield
        finally:
            self.busy += 1

    @contextlib.asynccontextmanager
    async def slot(self, size: int = 0) -> AsyncIterator[None]:
        """Hold a slot for work that was not admitted as a job (the transfer sweeper)."""
        await self.take(size)
        try:
            yield
        finally:
            self.give(size)

    def _fits(self, size: int) -> bool:
        return self.busy < self.slots and (self.held + size <= self.max_bytes or self.busy == 0)

    def _hand_over(self) -> None:
        while self._waiting:
            turn, size = self._waiting[0]
            if turn.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            if not self._fits(size):
                return
            self._waiting.popleft()
            self.busy += 1
            self.held += size
            turn.set_result(None)


class Lane:
    """One lane's runtime: its job pool, a worker thread for CPU work, and the guard that
    settles every message."""

    def __init__(self, name: str, slots: int, max_bytes: int, metrics: Metrics) -> None:
        self.name, self.metrics = name, metrics
        self.pool = JobPool(slots, max_bytes)
        self.tasks: set[asyncio.Task[None]] = set()
        self._threads = ThreadPoolExecutor(2, thread_name_prefix=f"lane-{name}")
        self._traced: dict[type[BaseException], float] = {}

    def accept(self, pipeline: Pipeline, message: Message,
               inflight: Callable[[], None] | None,
               prepare: Callable[[Message, Callable[[], None] | None], Delivery | Job]
               | None = None) -> Awaitable[None] | None:
        """Take one message from the source; returns an awaitable only when the lane pushes
        back (Kafka's queue or the job pool is full): the source waits before reading on.
        `prepare`: a section's own stage in place of the pipeline's routes (Sparkplug)."""
        try:
            outcome = (prepare or pipeline.prepare)(message, inflight)
        except Exception as exc:
            outcome = self._crashed(pipeline, message, inflight, exc)
        if type(outcome) is Delivery:  # the common case, one call shorter
            return self._send(pipeline, outcome)
        return self.start(pipeline, outcome)

    def start(self, pipeline: Pipeline, outcome: Delivery | Job) -> Awaitable[None] | None:
        """Send a Delivery, or run a Job in the pool."""
        if isinstance(outcome, Delivery):
            return self._send(pipeline, outcome)
        size = len(outcome.message.payload)
        if self.pool.try_take(size):
            self._spawn(self._settle(pipeline, outcome, size))
            return None
        return self._pushed_back(self._start_when_free(pipeline, outcome, size))

    def job(self, pipeline: Pipeline, message: Message, inflight: Callable[[], None] | None,
            work: Callable[[], Awaitable[None]], device_id: str = "") -> Awaitable[None] | None:
        """Run a stage that settles the message itself (file transfer) as a pooled job,
        under the same guard."""
        async def run() -> None:
            await work()
        return self.start(pipeline, Job(message, inflight, run, device_id))

    # -- the Runner a pipeline calls back --------------------------------------------------

    def dispatch(self, pipeline: Pipeline, outcome: Delivery | Job) -> None:
        """Start an outcome from a callback that cannot wait (Kafka refused a record): its
        job runs without a slot, since its message already holds its place in the lane."""
        if isinstance(outcome, Delivery):
            assert outcome.sink is not None
            outcome.sink.submit(outcome)
        else:
            self._spawn(self._settle(pipeline, outcome, None))

    def in_thread(self, work: Callable[[], T]) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._threads, work)

    def runner_for(self, pipeline: Pipeline) -> _PipelineRunner:
        return _PipelineRunner(self, pipeline)

    # -- the guard -------------------------------------------------------------------------

    def _send(self, pipeline: Pipeline, delivery: Delivery) -> Awaitable[None] | None:
        sink = delivery.sink
        assert sink is not None  # the daemon's pipelines all have one
        try:
            if sink.try_send(delivery):
                return None
        except Exception as exc:
            return self._resend_as_dead_letter(pipeline, delivery, exc)
        return self._pushed_back(self._send_when_room(pipeline, delivery))

    def _pushed_back(self, work: Awaitable[None]) -> Awaitable[None]:
        """A message that must wait for room runs its wait as the lane's own task; the
        source waits on it but cannot cancel it. A session whose connection drops (or
        that retires) meanwhile stops waiting, and the message still settles: its
        outcome becomes durable, and the ack, owed on a closed connection, is dropped
        (the broker redelivers)."""
        return asyncio.shield(self._spawn(work))

    async def _send_when_room(self, pipeline: Pipeline, delivery: Delivery) -> None:
        """Kafka's local queue is full: wait for room, under the same guard."""
        assert delivery.sink is not None
        try:
            await delivery.sink.send(delivery)
        except Exception as exc:
            waiting = self._resend_as_dead_letter(pipeline, delivery, exc)
            if waiting is not None:
                await waiting

    def _resend_as_dead_letter(self, pipeline: Pipeline, delivery: Delivery,
                               exc: Exception) -> Awaitable[None] | None:
        """Producing raised: the dead letter goes instead; if even that cannot be produced,
        say so loudly (two independent bugs), since only then is a message left unsettled."""
        origin = delivery.origin
        message = origin.message if origin is not None else None
        if message is None or delivery.topic == pipeline.dead_letter_topic:
            self.metrics.inc("unsettled_messages")
            log.critical("message_unsettled", topic=delivery.topic, error=_text(exc),
                         why="producing its dead letter failed too; it stays unacked")
            return None
        return self.start(pipeline, self._crashed(pipeline, message, delivery.on_durable, exc))

    async def _start_when_free(self, pipeline: Pipeline, job: Job, size: int) -> None:
        await self.pool.take(size)
        self._spawn(self._settle(pipeline, job, size))

    async def _settle(self, pipeline: Pipeline, job: Job, size: int | None) -> None:
        """Run a job to its Delivery and send it; the slot is given back once the job's
        payload is let go."""
        try:
            outcome = await self._run(pipeline, job)
            del job  # only the Delivery travels on: an offloaded body is not held meanwhile
            if outcome is not None:
                waiting = self._send(pipeline, outcome)
                if waiting is not None:
                    await waiting
        finally:
            if size is not None:
                self.pool.give(size)

    async def _run(self, pipeline: Pipeline, job: Job) -> Delivery | None:
        """A job's Delivery (None: it settled its message itself). Whatever it raises is
        dead-lettered, and if the dead letter's own job raises too, that one goes inline,
        without S3."""
        outcome: Delivery | Job | None = job
        crashed = False
        while isinstance(outcome, Job):
            current = outcome
            try:
                outcome = await current.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _settled(current.on_durable):
                    self._log_crash(current.message, exc, settled=True)
                    return None
                outcome = self._crashed(pipeline, current.message, current.on_durable, exc,
                                        inline=crashed, device_id=current.device_id)
                crashed = True
        return outcome

    def _crashed(self, pipeline: Pipeline, message: Message,
                 on_durable: Callable[[], None] | None, exc: BaseException,
                 inline: bool = False, device_id: str = "") -> Delivery | Job:
        self._log_crash(message, exc)
        if inline:  # the dead letter's own job crashed: no S3 this time
            return pipeline.dead_letter(message, device_id, pipeline.no_route_lineage,
                                        Rejected.internal(exc, device_id), on_durable)
        return pipeline.crashed(message, on_durable, exc, device_id)

    def _log_crash(self, message: Message, exc: BaseException, settled: bool = False) -> None:
        """One log line per crash; a traceback per exception class every few seconds, so a
        device repeating a poison message cannot flood the log."""
        self.metrics.inc("internal_errors")
        now = asyncio.get_running_loop().time()
        fields: dict[str, Any] = {"lane": self.name, "topic": message.topic[:LOG_TOPIC_MAX],
                                  "error": _text(exc)}
        if settled:
            fields["why"] = "its outcome was already durable; acked as it is"
        if now - self._traced.get(type(exc), -_TRACE_EVERY) >= _TRACE_EVERY:
            self._traced[type(exc)] = now
            log.error("internal_error", exc_info=exc, **fields)
        else:
            log.error("internal_error", **fields)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the guard itself failed
            self.metrics.inc("unsettled_messages")
            log.critical("message_unsettled", error=_text(task.exception()))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


class _PipelineRunner:
    """A Lane bound to one pipeline: what that pipeline's callbacks dispatch through."""

    def __init__(self, lane: Lane, pipeline: Pipeline) -> None:
        self.lane, self.pipeline = lane, pipeline

    def dispatch(self, outcome: Delivery | Job) -> None:
        self.lane.dispatch(self.pipeline, outcome)

    def in_thread(self, work: Callable[[], T]) -> Awaitable[T]:
        return self.lane.in_thread(work)


def _text(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {describe(exc)}"[:500] if exc is not None else ""


def _settled(on_durable: Callable[[], None] | None) -> bool:
    """True once the message was acked (an Inflight that is done)."""
    return bool(getattr(on_durable, "done", False))
