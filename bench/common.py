"""What every benchmark of the suite shares: the local stack, sessions and their preload, the
bridge as a child process, RSS sampling, reading Kafka back, and median/min/max.

Each benchmark module (bench/drain.py, latency.py, memory.py, scaleout.py, large_files.py)
keeps only what it measures; `bench/suite.py` runs them and prints one table. Nothing here is
a pass/fail check: figures are collected and reported, whatever they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as paho
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bridge.devkit.localstack import LocalStack, kafka_service, s3_environment
from bridge.kafka import QUIET

ROOT = Path(__file__).resolve().parent.parent  # callers put it on sys.path

def exit_on_sigterm() -> None:
    """SIGTERM unwinds like ^C, so every stack and bridge a benchmark started is stopped by
    its context manager instead of being left running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# ---------------------------------------------------------------- figures: median/min/max


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one figure over its runs: the suite never reports a lone run
    as if it were the figure (the machine is shared and noisy)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "runs": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; the max for q = 100. The
    same rule verify's table uses, so a p99 here and there mean the same thing."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(min(rank, len(ordered))) - 1]


def cdf(values: Sequence[float], points: int = 1001) -> list[float]:
    """The distribution in `points` evenly spaced quantiles (0 to 100%, nearest rank): what
    a CDF chart needs, at a fixed size whatever the number of values."""
    ordered = sorted(values)
    if not ordered:
        return []
    n = len(ordered)
    return [ordered[min(n - 1, max(0, -(-n * i // (points - 1)) - 1))] for i in range(points)]


def cell(figure: dict[str, float], fmt: str = "{:,.0f}") -> str:
    """One table cell: `median (min-max)`, or `median` alone for a single run."""
    if not figure.get("runs"):
        return "n/a"
    median = fmt.format(figure["median"])
    if figure["runs"] == 1:
        return median
    return f"{median} ({fmt.format(figure['min'])}-{fmt.format(figure['max'])})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table (also valid Markdown), columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def crossing(samples: Sequence[tuple[float, float]], level: float) -> float:
    """The time a rising progress curve [(t, done), ...] first reaches `level`, linearly
    interpolated between the two samples around it; nan if it never does."""
    previous: tuple[float, float] | None = None
    for t, done in samples:
        if done >= level:
            if previous is None or done == previous[1]:
                return t
            t0, d0 = previous
            return t0 + (t - t0) * (level - d0) / (done - d0)
        previous = (t, done)
    return float("nan")


def steady_rate(samples: Sequence[tuple[float, float]], total: float,
                low: float = 0.1, high: float = 0.9) -> float:
    """Items per second between `low` and `high` of the drain: start-up and the tail left
    out, so what remains is the pace the pipeline holds."""
    t_low, t_high = crossing(samples, total * low), crossing(samples, total * high)
    return total * (high - low) / (t_high - t_low) if t_high > t_low else float("nan")


# ---------------------------------------------------------------- memory of a process


def parse_status(text: str) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) from the text of /proc/PID/status."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(rest.split()[0])
    return out


def status(pid: int) -> dict[str, int]:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of a process, from /proc: librdkafka
    names its threads rdk:main, rdk:broker<id>, rdk:bootstrap..."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class RssSampler:
    """Samples a process every `interval` s on a thread: VmRSS as (wall time, MiB), the
    kernel's own peak VmHWM (which a sample can miss), and with `threads` the CPU seconds
    of each thread name, as (wall time, {name: s}), to see which thread burns CPU when."""

    def __init__(self, pid: int, interval: float = 0.05, threads: bool = False) -> None:
        self.pid, self.interval, self.threads = pid, interval, threads
        self.samples: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self.hwm_mib = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                vm = status(self.pid)
                now = time.time()
                if self.threads:
                    self.cpu.append((now, thread_cpu(self.pid)))
            except (FileNotFoundError, ProcessLookupError):
                return
            self.samples.append((now, vm.get("VmRSS", 0) / 1024))
            self.hwm_mib = max(self.hwm_mib, vm.get("VmHWM", 0) / 1024)
            self._done.wait(self.interval)

    @property
    def peak_mib(self) -> float:
        return max([self.hwm_mib, *(m for _, m in self.samples)])

    def at(self, when: float) -> float:
        """RSS of the sample nearest the wall time `when`."""
        if not self.samples:
            return float("nan")
        return min(self.samples, key=lambda s: abs(s[0] - when))[1]


def parse_cpu_stat(text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all cores from the text of /proc/stat's `cpu` line:
    total sums user, nice, system, idle, iowait, irq, softirq and steal (guest is inside
    user); busy is total minus idle and iowait, so steal (a core the hypervisor gave to
    someone else) counts as busy: it was not ours to use."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(f) for f in fields[1:9]]
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    raise ValueError("no cpu line in /proc/stat")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a whole process, its exited threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Every `interval` s on a thread: the CPU seconds of each kind of process (the sum
    over its pids, e.g. {"bridges": [..], "tansu": [pid]}) and the machine's busy and total
    ticks from /proc/stat, as (wall time, {kind: s}, (busy, total)). A process that has
    exited keeps its last reading, so a kind's sum never goes back."""

    def __init__(self, kinds: dict[str, Sequence[int]], interval: float = 0.1) -> None:
        self.kinds, self.interval = {k: list(v) for k, v in kinds.items()}, interval
        self.samples: list[tuple[float, dict[str, float], tuple[int, int]]] = []
        self._last: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        stat = parse_cpu_stat(Path("/proc/stat").read_text())
        now = time.time()
        out: dict[str, float] = {}
        for kind, pids in self.kinds.items():
            for pid in pids:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    self._last[pid] = process_cpu(pid)
                out[kind] = out.get(kind, 0.0) + self._last.get(pid, 0.0)
        self.samples.append((now, out, stat))

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()


def cpu_window(samples: Sequence[tuple[float, dict[str, float], tuple[int, int]]],
               start: float, end: float, tick: float = 100.0) -> dict[str, Any] | None:
    """What a CpuSampler saw between the first sample at or after `start` and the last at or
    before `end`: the wall times, each kind's CPU seconds, the machine's busy CPU seconds
    (`tick` ticks a second) and busy share of all cores, and `rest`, the busy CPU of the
    machine not in any kind (other work on a shared machine). None if under two samples."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return None
    (t0, first, stat0), (t1, last, stat1) = inside[0], inside[-1]
    cpu = {k: round(v - first.get(k, 0.0), 3) for k, v in last.items()}
    busy, total = stat1[0] - stat0[0], stat1[1] - stat0[1]
    busy_s = busy / tick
    return {"start": t0, "end": t1, "cpu_s": cpu, "busy_s": round(busy_s, 3),
            "busy_share": busy / total if total else float("nan"),
            "rest_s": round(max(0.0, busy_s - sum(cpu.values())), 3)}


# ---------------------------------------------------------------- the local stack


@contextlib.contextmanager
def stack(work: Path, storage: str = "memory") -> Iterator[LocalStack]:
    """Mosquitto, moto S3 and Tansu. `memory`: Tansu keeps records in memory (the figures
    then measure the bridge, not moto's S3 server behind Tansu); `s3`: the tests' stack."""
    with LocalStack(work) as local:
        if storage == "memory":
            local.kafka.stop()
            local.kafka = kafka_service(work, port=local.kafka.port)
            local.kafka.start()
        yield local


def mqtt_port(local: LocalStack) -> int:
    return local.mqtt.port


def open_session(port: int, client_id: str, topic_filter: str,
                 share_group: str | None = None) -> None:
    """Create a persistent MQTT 5 session subscribed at QoS 1 (to `$share/GROUP/filter` with
    a group), then leave it offline: what is published next queues for it in Mosquitto."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    props = paho.Properties(paho.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    target = f"$share/{share_group}/{topic_filter}" if share_group else topic_filter
    client.subscribe(target, qos=1)
    if not subscribed.wait(10):
        raise RuntimeError(f"no SUBACK for {client_id}")
    client.disconnect()
    client.loop_stop()


def payload(device_id: str, seq: int, size: int, run: str) -> bytes:
    """The simulator's payload (notes/issue10-spec.md): device_id, seq, sent_ns, run, and
    `pad` to reach `size` bytes exactly, so every record can be traced to its publish."""
    base = {"device_id": device_id, "seq": seq, "sent_ns": time.time_ns(), "run": run}
    body = json.dumps(base, separators=(",", ":")).encode()
    room = size - len(body) - len(',"pad":""')
    if room < 0:
        return body
    base["pad"] = "x" * room
    return json.dumps(base, separators=(",", ":")).encode()


def preload(port: int, prefix: str, devices: int, per_device: int, size: int, run: str,
            work: Path, parallel: int = 4) -> float:
    """Publish devices x per_device QoS 1 messages on `PREFIX/dev-N/telemetry` with
    `mosquitto_pub -l` (C, ~2x paho's rate here), `parallel` devices at a time. Returns the
    publish rate; only to say how long the preload took, it is not a figure."""
    files = []
    for d in range(devices):
        path = work / f"preload-{run}-{d}.txt"
        with path.open("wb") as f:
            for seq in range(per_device):
                f.write(payload(f"dev-{d:05d}", seq, size, run) + b"\n")
        files.append(path)
    start = time.monotonic()
    running: list[subprocess.Popen[bytes]] = []
    for d, path in enumerate(files):
        if len(running) >= parallel:
            _wait_ok(running.pop(0))
        with path.open("rb") as f:
            running.append(subprocess.Popen(
                ["mosquitto_pub", "-p", str(port), "-V", "5", "-q", "1", "-M", "100", "-l",
                 "-i", f"preload-{run}-{d}", "-t", f"{prefix}/dev-{d:05d}/telemetry"], stdin=f))
    for proc in running:
        _wait_ok(proc)
    seconds = time.monotonic() - start
    for path in files:
        path.unlink()
    return devices * per_device / seconds


def _wait_ok(proc: subprocess.Popen[bytes]) -> None:
    if proc.wait(1800) != 0:
        raise RuntimeError(f"{proc.args} exited with {proc.returncode}")


# ---------------------------------------------------------------- the bridge, as a process


def write_config(path: Path, local: LocalStack, client_id: str, routes: Sequence[dict[str, str]],
                 *, share_group: str | None = None, receive_max: int = 1000,
                 kafka: dict[str, str] | None = None, lanes: dict[str, dict[str, str]] | None
                 = None, extra: str = "") -> Path:
    """A bridge config for the local stack: the routes given, JSON logs, stats every second
    (bridge_stats lines carry the counters the anomalies are read from)."""
    def props(table_: dict[str, str]) -> str:
        return "".join(f'"{k}" = "{v}"\n' for k, v in table_.items())

    share = f'share_group = "{share_group}"\n' if share_group else ""
    text = (f'[bridge]\ninstance = "{client_id}"\nlog_format = "json"\nstats_interval = 1\n'
            f'[[brokers]]\nurl = "{local.mqtt_url}"\nclient_id = "{client_id}"\n'
            f"receive_max = {receive_max}\n{share}"
            f'[kafka]\n"bootstrap.servers" = "{local.bootstrap}"\n{props(kafka or {})}')
    for lane, properties in (lanes or {}).items():
        text += f"[lanes.{lane}]\n{props(properties)}"
    text += '[dead_letter]\nkafka_topic = "bench.deadletter"\n' + extra
    for route in routes:
        text += "[[routes]]\n" + "".join(f'{k} = "{v}"\n' for k, v in route.items())
    path.write_text(text)
    return path


@dataclass
class Bridge:
    """`python -m bridge run` as a child process, so its RSS and CPU are its own; its JSON
    log goes to `log` (the bridge_stats lines are its counters)."""

    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # wall time of the spawn
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Bridge:
        env = {**os.environ, **s3_environment(), "PYTHONPATH": str(ROOT), **self.env}
        self.started = time.time()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        """The last bridge_stats line this process wrote: its counters, by short name."""
        last: dict[str, Any] = {}
        for line in self.lines():
            if line.get("event") == "bridge_stats":
                last = line
        return last

    def lines(self) -> Iterator[dict[str, Any]]:
        """The JSON log lines (each bridge of the suite has a log of its own)."""
        for raw in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                yield json.loads(raw)

    def wait_acked(self, count: int, timeout: float) -> bool:
        """Until the bridge's stats say it acked `count` messages (once a second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.stats().get("mqtt_acks_sent", 0)) >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the bridge exited with {self.proc.returncode}: {self.log}")
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        """SIGTERM: it settles what is in flight and disconnects."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- Kafka, read back


class Record:
    """What the analysis needs of one record: its Kafka timestamp (ms), the payload, the
    lineage. The payload's ids (run, device_id, seq, sent_ns) are parsed only when asked:
    reading a million records back must not cost a JSON parse each."""

    __slots__ = ("_ids", "arrival_ms", "body", "dup", "instance", "offset", "partition",
                 "timestamp_ms")

    def __init__(self, timestamp_ms: int, body: bytes, arrival_ms: int = 0, dup: bool = False,
                 instance: str = "", partition: int = 0, offset: int = 0) -> None:
        self.timestamp_ms, self.body, self.arrival_ms, self.dup = timestamp_ms, body, \
            arrival_ms, dup
        self.instance, self.partition, self.offset = instance, partition, offset
        self._ids: tuple[str, str, int, int] | None = None

    @property
    def ids(self) -> tuple[str, str, int, int]:
        """(run, device_id, seq, sent_ns) from the simulator's JSON payload."""
        if self._ids is None:
            try:
                p = json.loads(self.body)
            except ValueError:
                p = {}
            self._ids = (str(p.get("run", "")), str(p.get("device_id", "")),
                         int(p.get("seq", -1)), int(p.get("sent_ns", 0)))
        return self._ids

    @property
    def run(self) -> str:
        return self.ids[0]

    @property
    def device_id(self) -> str:
        return self.ids[1]

    @property
    def seq(self) -> int:
        return self.ids[2]

    @property
    def sent_ns(self) -> int:
        return self.ids[3]


def read_records(bootstrap: str, topic: str, idle: float = 3.0,
                 expected: int | None = None) -> list[Record]:
    """Every record of `topic`, from the start of each partition (assign, not a group: see
    DESIGN.md on Tansu), until `idle` s bring nothing (1 s once `expected` are in)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-read",
                         "enable.auto.commit": False, "fetch.max.bytes": 52428800},
                        logger=QUIET)
    out: list[Record] = []
    try:
        info = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
        last = time.monotonic()
        while time.monotonic() - last < (1.0 if expected and len(out) >= expected else idle):
            for message in consumer.consume(10000, 0.3):
                if message.error():
                    continue
                last = time.monotonic()
                out.append(_record(message))
    finally:
        consumer.close()
    return out


def _record(message: Any) -> Record:
    env = msgpack.unpackb(message.value())  # an envelope (bridge.envelope), checks skipped
    return Record(message.timestamp()[1], env.get("body", b""),
                  env.get("arrival_time_millis", 0), env.get("mqtt", {}).get("dup", False),
                  env.get("bridge", {}).get("instance", ""), message.partition(),
                  message.offset())


def progress(records: Sequence[Record]) -> list[tuple[float, float]]:
    """The drain as a curve [(wall time s, records so far)], from the Kafka timestamps
    (set by librdkafka when the bridge produced each record)."""
    stamps = sorted(r.timestamp_ms for r in records)
    return [(ms / 1000, i + 1) for i, ms in enumerate(stamps)]


def duplicates(records: Sequence[Record]) -> list[list[Record]]:
    """Groups of records that carry the same payload: each group one message delivered more
    than once (the payload holds run, device_id, seq and sent_ns, so two publishes never
    share one; a publisher's own retransmission does, and counts)."""
    groups: dict[bytes, list[Record]] = {}
    for r in records:
        groups.setdefault(r.body, []).append(r)
    return [g for g in groups.values() if len(g) > 1]


def machine() -> dict[str, str]:
    """What RESULTS.md says the figures were measured on."""
    import platform

    import confluent_kafka

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in
                   Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    mem = f"{mem_kib / 2**20:.1f} GiB"
    client = confluent_kafka.version()
    client = client if isinstance(client, str) else client[0]
    from bridge.devkit.localstack import tansu_binary

    tansu = subprocess.run([str(tansu_binary()), "--version"], capture_output=True,
                           text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                            capture_output=True, text=True).stdout.strip()
    mosquitto = subprocess.run(["mosquitto_sub", "--help"], capture_output=True,
                               text=True).stdout.splitlines()[1:2]
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "librdkafka": confluent_kafka.libversion()[0],
            "confluent_kafka": client, "tansu": tansu,
            "mosquitto": mosquitto[0] if mosquitto else "", "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
