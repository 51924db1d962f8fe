"""The arithmetic of `mqtt-kafka-bridge verify`: a simulate log against the records in Kafka.

Pure: it takes parsed log lines and decoded records and returns a `Report`; reading Kafka, S3
and the log file is `bridge.devkit.verify_io`. A benchmark calls `check(lines, records)` (or
`verify_io.run(...)`) and reads `Report.lost` and `Report.topics[T].latency`.

Memory stays modest for logs of millions of lines: the state of one publish is one byte in a
`bytearray` per (run, device), indexed by seq (seqs are 0, 1, 2 ... per device), and
latencies are integer microseconds in `array('q')` (8 bytes a record). Percentiles are exact
nearest-rank values, found by narrowing a histogram instead of sorting a list of Python ints
(which would cost ~36 bytes a value).
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeGuard

OUTCOMES = {"refused": 1, "sent": 2, "unknown": 3, "acked": 4}  # a stronger one wins
_REFUSED, _SENT, _UNKNOWN, _ACKED = 1, 2, 3, 4
_OUTCOME = 0b111
_SEEN, _AGAIN = 0b1000, 0b10000  # seen once, seen more than once
EXAMPLES = 10  # how many lost / unexpected publishes a report names


class LogError(ValueError):
    """A log line that is not what simulate writes; `line` is its number (from 1)."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line}: {why}")
        self.line = line


class Record(NamedTuple):
    """One Kafka record as verify sees it: `envelope` is None when the value is no envelope."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None  # the record's Kafka timestamp, None when the broker gave none
    envelope: dict[str, Any] | None


class Objects(Protocol):
    """Where `reference` envelopes point (S3); None when the object is not there."""

    def payload(self, reference: str, limit: int) -> bytes | None: ...

    def digest(self, reference: str) -> tuple[int, str] | None: ...


class _Stream:
    """The publishes of one device in one run: a byte of state per seq. Seqs far beyond
    what the log holds go to a dict, so a stray huge seq cannot allocate gigabytes."""

    __slots__ = ("dense", "sparse")

    def __init__(self) -> None:
        self.dense = bytearray()
        self.sparse: dict[int, int] = {}

    def get(self, seq: int) -> int:
        if seq < len(self.dense):
            return self.dense[seq]
        return self.sparse.get(seq, 0)

    def set(self, seq: int, state: int) -> None:
        if seq >= len(self.dense) and seq < 2 * len(self.dense) + 4096:
            self.dense.extend(bytes(seq + 1 - len(self.dense)))
            if self.sparse:  # seqs the dense range now covers move into it
                for moved in [s for s in self.sparse if s <= seq]:
                    self.dense[moved] = self.sparse.pop(moved)
        if seq < len(self.dense):
            self.dense[seq] = state
        else:
            self.sparse[seq] = state

    def seqs(self, state: int) -> Iterator[int]:
        at = self.dense.find(state)
        while at >= 0:
            yield at
            at = self.dense.find(state, at + 1)
        yield from sorted(seq for seq, s in self.sparse.items() if s == state)


@dataclass(slots=True)
class _File:
    """One logged file upload: what the log says it was, and what was seen of it."""

    topic: str
    size: int
    sha256: str
    state: int


@dataclass
class Latency:
    """Exact nearest-rank percentiles of one latency, in milliseconds (None: no samples).

    Nearest rank: pN is the smallest sample with at least N% of the samples at or below it,
    so for the samples 1..100, p50 is 50, p99 is 99 and max is 100."""

    count: int
    p50: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, micros: array[int]) -> Latency:
        if not micros:
            return cls(0, None, None, None)
        p50, p99 = percentiles(micros, (50, 99))
        return cls(len(micros), p50 / 1000, p99 / 1000, max(micros) / 1000)


@dataclass
class TopicReport:
    """What one Kafka topic held."""

    records: int = 0
    matched: int = 0  # records of logged publishes (first copies and duplicates)
    extra_copies: int = 0
    unexpected: int = 0
    foreign: int = 0
    dead_lettered: int = 0
    kafka: array[int] = field(default_factory=lambda: array("q"))  # µs: sent -> Kafka ts
    arrival: array[int] = field(default_factory=lambda: array("q"))  # µs: sent -> bridge

    def latency(self) -> dict[str, Latency]:
        return {"kafka": Latency.of(self.kafka), "arrival": Latency.of(self.arrival)}


@dataclass
class Report:
    """The verdict: `lost` must be 0. Counts are of publishes (log lines) unless they say
    records (Kafka records) or copies."""

    acked: int
    found: int
    lost: int
    lost_first: list[dict[str, Any]]
    duplicates: int  # publishes seen more than once
    extra_copies: int  # the records beyond each one's first
    unexpected: int  # records
    unexpected_first: list[dict[str, Any]]
    foreign: int  # records
    unread_references: int  # records whose payload is in S3, not followed
    dead_lettered: dict[str, int]  # publishes settled as dead letters, per error code
    refused: int
    refused_arrived: int
    unknown: int
    unknown_arrived: int
    qos0_sent: int
    qos0_arrived: int
    files_acked: int
    files_found: int
    runs: list[str]
    topics: dict[str, TopicReport]
    stopped: str = "end"

    @property
    def ok(self) -> bool:
        return self.lost == 0

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (its keys are documented in the README)."""
        plain = {k: v for k, v in vars(self).items() if k != "topics"}
        plain["verdict"] = "ok" if self.ok else "lost"
        plain["records"] = sum(t.records for t in self.topics.values())
        plain["topics"] = {name: _topic_json(t) for name, t in self.topics.items()}
        return plain


def _topic_json(topic: TopicReport) -> dict[str, Any]:
    counts = {k: v for k, v in vars(topic).items() if isinstance(v, int)}
    return {**counts, "latency_ms": {k: vars(v) for k, v in topic.latency().items()}}


class Log:
    """The parsed log: every publish's outcome, in compact form."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, _Stream]] = {}
        self.files: dict[tuple[str, str], _File] = {}
        self.file_topics: dict[str, tuple[str, str]] = {}
        self.acked = 0  # acked publishes (telemetry and files), counted once each

    def add(self, number: int, line: Mapping[str, Any]) -> None:
        """Take one parsed line; raises LogError when it is not a simulate log line."""
        named = line.get("outcome")
        outcome = OUTCOMES.get(named) if isinstance(named, str) else None
        if outcome is None:
            raise LogError(number, f"outcome must be one of {', '.join(OUTCOMES)}, got "
                           f"{line.get('outcome')!r}")
        run, device = _text(number, line, "run"), _text(number, line, "device_id")
        kind = line.get("kind", "telemetry")
        if kind == "file":
            self._add_file(number, line, device, outcome)
        elif kind == "telemetry":
            self._add_publish(run, device, _count(number, line, "seq"), outcome)
        else:
            raise LogError(number, f"kind must be telemetry or file, got {kind!r}")

    def _add_publish(self, run: str, device: str, seq: int, outcome: int) -> None:
        stream = self.runs.setdefault(run, {}).setdefault(device, _Stream())
        before = stream.get(seq)
        if outcome > before:
            stream.set(seq, outcome)
            self.acked += outcome == _ACKED

    def _add_file(self, number: int, line: Mapping[str, Any], device: str,
                  outcome: int) -> None:
        key = (device, _text(number, line, "file_id"))
        topic = _text(number, line, "topic")
        size, sha256 = _count(number, line, "size"), _text(number, line, "sha256").lower()
        known = self.files.get(key)
        if known is None or outcome > known.state:
            self.acked += outcome == _ACKED and (known is None or known.state != _ACKED)
            self.files[key] = _File(topic, size, sha256, outcome)
            self.file_topics[topic] = key


def _text(number: int, line: Mapping[str, Any], key: str) -> str:
    value = line.get(key)
    if not isinstance(value, str) or not value:
        raise LogError(number, f"{key} must be a non-empty string, got {value!r}")
    return value


def _count(number: int, line: Mapping[str, Any], key: str) -> int:
    value = line.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LogError(number, f"{key} must be an integer >= 0, got {value!r}")
    return value


def parse_log(lines: Iterable[bytes | str]) -> Log:
    """A `Log` from simulate's JSON lines (blank lines skipped); LogError names a bad one."""
    log = Log()
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LogError(number, f"not JSON ({exc})") from None
        if not isinstance(line, dict):
            raise LogError(number, f"not a JSON object: {type(line).__name__}")
        log.add(number, line)
    return log


class _Payload(NamedTuple):
    run: str
    device_id: str
    seq: int
    sent_ns: int


def simulate_payload(body: bytes) -> _Payload | None:
    """The traced fields of a simulate payload, or None for anything else (foreign)."""
    if not body.startswith(b"{"):
        return None
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(fields, dict):
        return None
    run, device, seq, sent = (fields.get(k) for k in ("run", "device_id", "seq", "sent_ns"))
    if isinstance(run, str) and isinstance(device, str) and _natural(seq) and _natural(sent):
        return _Payload(run, device, seq, sent)
    return None


def _natural(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


PAYLOAD_LIMIT = 64 * 1024 * 1024  # a referenced payload larger than this is no simulate one


class Checker:
    """Takes records one by one against a `Log`; `report()` when done. `all_found` says
    when every acked publish has been seen, so a reader may stop early."""

    def __init__(self, log: Log, objects: Objects | None = None) -> None:
        self.log, self.objects = log, objects
        self.found = 0
        self.topics: dict[str, TopicReport] = {}
        self.dead_lettered: Counter[str] = Counter()
        self.extra_copies = 0
        self.unexpected_first: list[dict[str, Any]] = []
        self.unexpected = self.foreign = self.unread = 0

    @property
    def all_found(self) -> bool:
        return self.found >= self.log.acked

    def topic(self, name: str) -> TopicReport:
        """The topic's row, there even when the topic holds no record."""
        return self.topics.setdefault(name, TopicReport())

    def add(self, record: Record) -> None:
        row = self.topic(record.topic)
        row.records += 1
        env = record.envelope
        if env is None:
            self._foreign(row)
            return
        code = _error_code(env)
        if isinstance(env.get("file"), dict):
            self._file(record, row, env, code)
            return
        if code is not None and self._file_dead_letter(row, env, code):
            return
        body = env.get("body")
        if not isinstance(body, bytes) and isinstance(env.get("reference"), str):
            body = self._referenced(record, row, env)
            if body is None:
                return
        payload = simulate_payload(body) if isinstance(body, bytes) else None
        if payload is None or payload.run not in self.log.runs:
            self._foreign(row)
            return
        self._publish(record, row, env, payload, code)

    def _referenced(self, record: Record, row: TopicReport, env: dict[str, Any]
                    ) -> bytes | None:
        """The payload a `reference` envelope points at; None when it is not read (counted
        as unread, foreign or unexpected here)."""
        reference, size = env["reference"], env.get("size")
        if self.objects is None:
            self.unread += 1
            return None
        if isinstance(size, int) and size > PAYLOAD_LIMIT:
            self._foreign(row)
            return None
        payload = self.objects.payload(reference, PAYLOAD_LIMIT)
        if payload is None:
            self._unexpected(record, row, f"{reference} is not in S3")
        return payload

    def _foreign(self, row: TopicReport) -> None:
        self.foreign += 1
        row.foreign += 1

    def _unexpected(self, record: Record, row: TopicReport, why: str) -> None:
        self.unexpected += 1
        row.unexpected += 1
        if len(self.unexpected_first) < EXAMPLES:
            self.unexpected_first.append({"topic": record.topic, "partition": record.partition,
                                          "offset": record.offset, "why": why})

    def _publish(self, record: Record, row: TopicReport, env: dict[str, Any],
                 payload: _Payload, code: str | None) -> None:
        if env.get("device_id") != payload.device_id and code is None:
            self._unexpected(record, row, f"device_id {env.get('device_id')!r} in the "
                             f"envelope, {payload.device_id!r} in the payload")
            return
        stream = self.log.runs[payload.run].setdefault(payload.device_id, _Stream())
        state = stream.get(payload.seq)
        first = self._seen(stream, payload.seq, state, row)
        if state & _OUTCOME == 0:
            self._unexpected(record, row, f"{payload.device_id} seq {payload.seq} of run "
                             f"{payload.run} is not in the log")
            return
        row.matched += 1
        if code is not None:
            row.dead_lettered += 1
            if first:
                self.dead_lettered[code] += 1
        elif first:
            self._latency(record, row, env, payload.sent_ns)

    def _seen(self, stream: _Stream, seq: int, state: int, row: TopicReport) -> bool:
        """Mark one more copy of a publish; True for its first."""
        if state & _SEEN:
            stream.set(seq, state | _AGAIN)
            self.extra_copies += 1
            row.extra_copies += 1
            return False
        stream.set(seq, state | _SEEN)
        self.found += state & _OUTCOME == _ACKED
        return True

    @staticmethod
    def _latency(record: Record, row: TopicReport, env: dict[str, Any], sent_ns: int) -> None:
        sent_us = sent_ns // 1000
        if record.timestamp_ms is not None:
            row.kafka.append(record.timestamp_ms * 1000 - sent_us)
        arrival = env.get("arrival_time_millis")
        if isinstance(arrival, int):
            row.arrival.append(arrival * 1000 - sent_us)

    def _file(self, record: Record, row: TopicReport, env: dict[str, Any],
              code: str | None) -> None:
        key = (str(env.get("device_id")), str(env["file"].get("id")))
        logged = self.log.files.get(key)
        if logged is None:
            self._foreign(row)
            return
        why = None if code is not None else self._file_mismatch(env, logged)
        if why is not None:
            self._unexpected(record, row, f"file {key[1]} of {key[0]}: {why}")
            return
        self._settle_file(row, logged, code)

    def _file_mismatch(self, env: dict[str, Any], logged: _File) -> str | None:
        """Why a file record is not the logged file, or None when it is."""
        claimed = (env.get("size"), str(env.get("sha256", "")).lower())
        if claimed != (logged.size, logged.sha256):
            return f"size {claimed[0]} sha256 {claimed[1]}, the log says {logged.size} " \
                   f"{logged.sha256}"
        reference = env.get("reference")
        if self.objects is None or not isinstance(reference, str):
            return None
        stored = self.objects.digest(reference)
        if stored is None:
            return f"{reference} is not in S3"
        if stored != (logged.size, logged.sha256):
            return f"{reference} holds size {stored[0]} sha256 {stored[1]}, the log says " \
                   f"{logged.size} {logged.sha256}"
        return None

    def _file_dead_letter(self, row: TopicReport, env: dict[str, Any], code: str) -> bool:
        """A dead letter of a logged file's init, segment or fin settles that file."""
        mqtt = env.get("mqtt")
        topic = mqtt.get("topic") if isinstance(mqtt, dict) else None
        if not isinstance(topic, str):
            return False
        levels = topic.split("/")
        for end in range(len(levels) - 1, 0, -1):
            key = self.log.file_topics.get("/".join(levels[:end]))
            if key is not None:
                self._settle_file(row, self.log.files[key], code)
                return True
        return False

    def _settle_file(self, row: TopicReport, logged: _File, code: str | None) -> None:
        row.matched += 1
        if code is not None:
            row.dead_lettered += 1
        if logged.state & _SEEN:
            logged.state |= _AGAIN
            self.extra_copies += 1
            row.extra_copies += 1
            return
        logged.state |= _SEEN
        self.found += logged.state & _OUTCOME == _ACKED
        if code is not None:
            self.dead_lettered[code] += 1

    def report(self, stopped: str = "end") -> Report:
        tally = self._tally()
        return Report(
            acked=self.log.acked, found=self.found, lost=self.log.acked - self.found,
            lost_first=self._lost_first(), duplicates=tally[_AGAIN],
            extra_copies=self.extra_copies, unexpected=self.unexpected,
            unexpected_first=self.unexpected_first, foreign=self.foreign,
            unread_references=self.unread, dead_lettered=dict(self.dead_lettered),
            refused=tally[_REFUSED], refused_arrived=tally[_REFUSED | _SEEN],
            unknown=tally[_UNKNOWN], unknown_arrived=tally[_UNKNOWN | _SEEN],
            qos0_sent=tally[_SENT], qos0_arrived=tally[_SENT | _SEEN],
            files_acked=sum(f.state & _OUTCOME == _ACKED for f in self.log.files.values()),
            files_found=sum(f.state & (_OUTCOME | _SEEN) == _ACKED | _SEEN
                            for f in self.log.files.values()),
            runs=sorted(self.log.runs), topics=self.topics, stopped=stopped)

    def _tally(self) -> Counter[int]:
        """Publishes per outcome (`outcome`), per outcome seen (`outcome | _SEEN`), and seen
        more than once (`_AGAIN`), over telemetry and files."""
        states: Counter[int] = Counter(f.state for f in self.log.files.values())
        for streams in self.log.runs.values():
            for stream in streams.values():
                states.update(stream.dense)
                states.update(stream.sparse.values())
        tally: Counter[int] = Counter()
        for state, n in states.items():
            outcome = state & _OUTCOME
            tally[outcome] += n if outcome else 0
            tally[outcome | _SEEN] += n if outcome and state & _SEEN else 0
            tally[_AGAIN] += n if state & _AGAIN else 0
        return tally

    def _lost_first(self) -> list[dict[str, Any]]:
        """The first few acked publishes found nowhere, by run, device and seq."""
        out: list[dict[str, Any]] = []
        for run, streams in sorted(self.log.runs.items()):
            for device, stream in sorted(streams.items()):
                for seq in stream.seqs(_ACKED):
                    if len(out) == EXAMPLES:
                        return out
                    out.append({"run": run, "device_id": device, "seq": seq})
        for (device, file_id), logged in sorted(self.log.files.items()):
            if logged.state == _ACKED and len(out) < EXAMPLES:
                out.append({"device_id": device, "file_id": file_id})
        return out


def _error_code(env: dict[str, Any]) -> str | None:
    """The dead-letter code of an envelope with `error`, or None for a data record."""
    error = env.get("error")
    if error is None:
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else "(no code)"


def check(lines: Iterable[bytes | str], records: Iterable[Record],
          objects: Objects | None = None) -> Report:
    """The report of `records` against the log `lines`: the whole arithmetic, no I/O."""
    checker = Checker(parse_log(lines), objects)
    for record in records:
        checker.add(record)
    return checker.report()


_SORT_AT_MOST = 1 << 15  # fewer samples than this are simply sorted
_BUCKETS = 1 << 12


def percentiles(values: array[int] | list[int], ps: Iterable[int]) -> list[int]:
    """Exact nearest-rank percentiles (rank ceil(p/100 * n)) of integer `values`."""
    n = len(values)
    ranks = [max(1, -(-p * n // 100)) - 1 for p in ps]
    found = _select(values, sorted(set(ranks)), min(values), max(values))
    return [found[r] for r in ranks]


def _select(pool: array[int] | list[int], ranks: list[int], lo: int, hi: int
            ) -> dict[int, int]:
    """The values at 0-based `ranks` among `pool` (all within lo..hi): a histogram of 4096
    buckets finds the bucket of each rank, and only that bucket's values are kept for the
    next round, so no copy of all the values is ever sorted."""
    if lo == hi:
        return dict.fromkeys(ranks, lo)
    if len(pool) <= _SORT_AT_MOST:
        ordered = sorted(pool)
        return {r: ordered[r] for r in ranks}
    width = (hi - lo) // _BUCKETS + 1
    counts = Counter((v - lo) // width for v in pool)
    found: dict[int, int] = {}
    below = 0
    for bucket in sorted(counts):
        inside = [r - below for r in ranks if below <= r < below + counts[bucket]]
        if inside:
            start, end = lo + bucket * width, min(hi, lo + (bucket + 1) * width - 1)
            sub = array("q", (v for v in pool if start <= v <= end))
            found.update((r + below, v) for r, v in _select(sub, inside, start, end).items())
        below += counts[bucket]
    return found
