"""verify at scale: how fast it checks, and in how much memory, a log of a million lines.

    .venv/bin/python bench/verify_scale.py [--devices 1000 --messages 1000] [--kafka]

Without --kafka it times the arithmetic alone in this process: the log parsed from a file,
then every record decoded from its envelope bytes (as read from Kafka) and checked, then the
report with its percentiles; peak RSS is the process's VmHWM. With --kafka it starts the
local stack, writes the records into a 3-partition Tansu topic and times the real
`mqtt-kafka-bridge verify` command (its own peak RSS, from the kernel), with --idle 60: Tansu
keeping its data in moto pauses for seconds under load, and verify's default --idle of 10 s
would end the read early (reporting what it had not read yet as lost). Prints figures; it is
not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import envelope
from bridge.devkit.verify import Checker, Record
from bridge.devkit.verify_io import read_log
from bridge.message import Message

RUN = "r-bench"
LINEAGE = envelope.Lineage("bench", "telemetry", "v1")


def write_log(path: Path, devices: int, messages: int) -> None:
    sent = time.time_ns()
    with path.open("w") as out:
        for seq in range(messages):
            for n in range(devices):
                device = f"dev-{n:05}"
                out.write(json.dumps({
                    "run": RUN, "device_id": device, "seq": seq,
                    "topic": f"devices/{device}/telemetry", "qos": 1, "sent_ns": sent,
                    "outcome": "acked", "acked_ns": sent + 1_000_000}) + "\n")


def values(devices: int, messages: int) -> Iterator[bytes]:
    """Envelopes as the bridge writes them: 200 B simulate payloads."""
    for seq in range(messages):
        for n in range(devices):
            device = f"dev-{n:05}"
            sent = time.time_ns()
            body = json.dumps({"device_id": device, "seq": seq, "sent_ns": sent, "run": RUN,
                               "pad": "x" * 90}).encode()
            yield envelope.encode(Message("bench", f"devices/{device}/telemetry", body, 1, False,
                                          False, sent // 1_000_000 + 2), device, LINEAGE)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(devices: int, messages: int, workdir: Path) -> None:
    """The records are made on the fly (so they do not sit in memory); making them alone is
    timed first and taken off the check's time."""
    log_path = workdir / "sim.log"
    write_log(log_path, devices, messages)
    start = time.perf_counter()
    for _ in values(devices, messages):
        pass
    making = time.perf_counter() - start
    base = peak_rss_mib()
    start = time.perf_counter()
    log = read_log(log_path)
    parsed = time.perf_counter()
    checker = Checker(log)
    stamp = time.time_ns() // 1_000_000
    for offset, value in enumerate(values(devices, messages)):
        checker.add(Record("bench", offset % 3, offset, stamp + offset % 50,
                           envelope.decode(value)))
    checked = time.perf_counter() - making
    report = checker.report()
    done = time.perf_counter() - making
    n = devices * messages
    print(f"{n} lines, {n} records: parse {parsed - start:.1f} s ({n / (parsed - start):,.0f} "
          f"lines/s), decode + check {checked - parsed:.1f} s "
          f"({n / (checked - parsed):,.0f} records/s), report {done - checked:.2f} s; "
          f"lost {report.lost}, found {report.found}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB ({base:.0f} MiB before verify began)")


VERIFY = """import resource, sys
from bridge.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
raise SystemExit(code)
"""


def against_kafka(devices: int, messages: int, workdir: Path) -> None:
    """The command's own peak RSS is its getrusage (the stack's servers are children of this
    process too, so RUSAGE_CHILDREN would be theirs). A bare read of the topic, decoding
    nothing, shows how much of the time is Kafka's."""
    from confluent_kafka import Producer

    from bridge.devkit.localstack import LocalStack
    from bridge.devkit.verify_io import _consumer

    with LocalStack(workdir / "stack") as stack:
        stack.create_topics(["bench.verify"])
        producer = Producer({"bootstrap.servers": stack.bootstrap, "linger.ms": 50})
        for n, value in enumerate(values(devices, messages)):
            while True:
                try:
                    producer.produce("bench.verify", value, key=str(n).encode())
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(300)
        del producer  # before the stack stops: its reconnect noise is no figure
        write_log(workdir / "sim.log", devices, messages)
        consumer, count = _consumer(stack.bootstrap, ["bench.verify"]), 0
        start = time.perf_counter()
        while count < devices * messages:
            count += len(consumer.consume(1000, 1.0))
        bare = time.perf_counter() - start
        consumer.close()
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", VERIFY, "verify", "--bootstrap",
                               stack.bootstrap, "--log", str(workdir / "sim.log"), "--topic",
                               "bench.verify", "--json", "--idle", "60"],
                              capture_output=True, text=True,
                              env=os.environ)
        seconds = time.perf_counter() - start
    out = json.loads(done.stdout)
    rss = int(done.stderr.strip().splitlines()[-1]) / 1024
    records = out["records"]
    print(f"bare read of {count} records from Tansu: {bare:.1f} s ({count / bare:,.0f} "
          f"records/s)")
    print(f"verify of {records} records in Kafka: {seconds:.1f} s including start-up, the log "
          f"and the ~1 s settle ({records / seconds:,.0f} records/s), exit {done.returncode}, "
          f"lost {out['lost']}, peak RSS {rss:.0f} MiB")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--devices", type=int, default=1000)
    args.add_argument("--messages", type=int, default=1000, help="per device")
    args.add_argument("--kafka", action="store_true", help="through Tansu and the command")
    options = args.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        run = against_kafka if options.kafka else in_process
        run(options.devices, options.messages, Path(workdir))


if __name__ == "__main__":
    main()
