"""The command line: run, check-config, route, s3-setup, dev, simulate, tail.

A mistake or a failure of the outside world (a server that does not answer, a file that
does not open) is one line on stderr that says what to do, and exit 2 (bridge/explain.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bridge import config as config_module
from bridge import envelope
from bridge.errors import ConfigError, Rejected
from bridge.explain import Mistake, explain

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqtt-kafka-bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the bridge daemon")
    run.add_argument("--config", required=True, help="TOML config file")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")

    route = commands.add_parser("route", help="dry run: which route a topic takes")
    route.add_argument("--config", required=True)
    route.add_argument("--payload-file", help="check this payload's format (and signature)")
    route.add_argument("--signature", help="the message's signature user property (hex)")
    route.add_argument("topic")

    s3_setup = commands.add_parser("s3-setup", help="apply the S3 bucket lifecycle rules")
    s3_setup.add_argument("--config", required=True)

    dev = commands.add_parser("dev", help="run the bridge on a local Mosquitto, Tansu and S3")
    dev.add_argument("--config", default="examples/bridge.toml")
    dev.add_argument("--workdir", default=".dev")
    dev.add_argument("--rate", type=_positive(float), default=5.0,
                     help="simulated messages per second")

    sim = commands.add_parser("simulate", help="a device fleet publishing telemetry")
    sim.add_argument("--url", default="mqtt://127.0.0.1:1883")
    sim.add_argument("--devices", type=_positive(int), default=100)
    sim.add_argument("--messages", type=_positive(int), default=10, help="per device")
    sim.add_argument("--qos", type=int, choices=(0, 1, 2), default=1)
    sim.add_argument("--size", type=_positive(int, zero=True), default=200, help="payload bytes")
    sim.add_argument("--rate", type=_positive(float),
                     help="messages per second in all (default: max)")
    sim.add_argument("--herd", action="store_true",
                     help="every device connects at once as its own client")
    sim.add_argument("--file", help="upload this file over MQTT file transfer instead")
    sim.add_argument("--device-id", default="dev-00000", help="the uploading device (--file)")
    sim.add_argument("--segment-bytes", type=_positive(int), default=256 * 1024,
                     help="with --file")

    tail = commands.add_parser("tail", help="print a Kafka topic as decoded envelopes")
    tail.add_argument("--bootstrap", default="127.0.0.1:9092")
    tail.add_argument("--follow", "-f", action="store_true")
    tail.add_argument("topic")

    args = parser.parse_args(argv)
    handler = {"run": _run, "check-config": _check, "route": _route, "s3-setup": _s3_setup,
               "dev": _dev, "simulate": _simulate, "tail": _tail}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:  # Ctrl-C while a command starts up or waits
        return 130
    except Exception as exc:
        line = explain(exc, args)  # a mistake or an adapter's failure: one line, no traceback
        if line is None:
            raise
        print(f"{parser.prog} {args.command}: {line}", file=sys.stderr)
        return 2


def _positive(kind: Callable[[str], float], zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of `kind` above 0 (or 0 too, with `zero`)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 or (zero and value == 0)):  # nan too
            least = "0 or more" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {least}, got {text}")
        return value
    return parse


def _readable(path: str, option: str) -> Path:
    """The file an option names, once it is known to open."""
    try:
        with open(path, "rb"):
            return Path(path)
    except OSError as exc:
        raise Mistake(f"cannot read {option} {path}: {exc.strerror or exc}") from None


def _load(path: str, load: Callable[[str], config_module.Config] = config_module.load
          ) -> config_module.Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    from bridge import logs
    from bridge.daemon import Daemon

    logs.configure(config.bridge.log_format)
    try:
        asyncio.run(Daemon(config, loader=lambda: config_module.load(args.config)).run())
    except ConfigError as exc:  # what only librdkafka could tell, at start-up
        print(f"{args.config}: cannot start: " + "; ".join(exc.problems), file=sys.stderr)
        return 2
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 2
    print(f"{args.file}: ok ({len(config.brokers)} broker(s), {len(config.routes)} route(s), "
          f"map version {config.version})")
    return 0


def _route(args: argparse.Namespace) -> int:
    """Run one message through the same pipeline the daemon uses, and say what it would do."""
    from bridge import auth
    from bridge.kafka import Delivery
    from bridge.message import Message
    from bridge.metrics import Metrics
    from bridge.pipeline import Job, Pipeline
    from bridge.routing import Router

    config = _load(args.config)
    if config is None:
        return 2
    from bridge import logs

    logs.configure(level=logging.ERROR)  # the pipeline's dead_letter warning is said below
    payload = _readable(args.payload_file, "--payload-file").read_bytes() \
        if args.payload_file else b""
    properties = (("signature", args.signature),) if args.signature else ()
    message = Message("dry-run", args.topic, payload, 1, False, False,
                      time.time_ns() // 1_000_000, properties)
    print(f"topic:        {args.topic}")
    files = config.file_transfer
    if files is not None and files.filter.match(args.topic) is not None:
        print(f"file transfer: {files.filter.pattern} (fat lane, auth {files.auth}); a "
              f"completed file's reference goes to {files.kafka_topic}")
        return 0
    try:
        route, device_id, bindings, _ = Router(config.routes).match(args.topic)
    except Rejected as rejected:
        print(f"dead letter:  {rejected.code}: {rejected.reason}\n"
              f"kafka_topic:  {config.dead_letter_topic}")
        return 1
    outcome = Pipeline(config, route.lane, Metrics(), runner=_DryRun()).prepare(message, None)
    while isinstance(outcome, Job):  # a large payload's format check runs off the fast path
        outcome = asyncio.run(_run_job(outcome))
    delivery = outcome
    assert isinstance(delivery, Delivery)  # no object store in a dry run: nothing offloads
    print(f"route:        {route.name} ({route.filter.pattern})\n"
          f"bindings:     {bindings}\n"
          f"device_id:    {device_id}\n"
          f"lane:         {route.lane}\n"
          f"key:          {route.key.strategy} -> "
          f"{route.key.key(device_id, message.arrival_millis)!r}\n"
          f"format:       {route.format}{'' if args.payload_file else ' (no --payload-file)'}")
    device = config.registry.devices.get(device_id)
    auth_line = route.auth
    if route.auth == "hmac" and device is not None and device.hmac_key is not None:
        expected = auth.sign(device.hmac_key, args.topic, payload)
        auth_line += f" (signature for this payload: {expected})"
    print(f"auth:         {auth_line}")
    if delivery.topic == config.dead_letter_topic:
        error = envelope.decode(delivery.value)["error"]
        print(f"dead letter:  {error['code']}: {error['reason']}\nkafka_topic:  {delivery.topic}")
        return 1
    inline_max = route.inline_max_bytes if route.inline_max_bytes is not None else \
        config.s3.inline_max_bytes if config.s3 else None
    if route.truncate_bytes is not None and len(payload) > route.truncate_bytes:
        print(f"payload:      {len(payload)} bytes, truncated to {route.truncate_bytes}")
    elif inline_max is not None and len(payload) > inline_max:
        print(f"payload:      {len(payload)} bytes > inline_max_bytes {inline_max}: stored in "
              "S3, a reference envelope on the fat lane")
    print(f"kafka_topic:  {delivery.topic}\nresult:       bridged")
    return 0


class _DryRun:
    """The runner of a dry run's pipeline: CPU work on a thread; it never produces."""

    def dispatch(self, outcome: object) -> None:
        raise AssertionError("a dry run never produces")

    def in_thread(self, work: Callable[[], T]) -> Awaitable[T]:
        return asyncio.to_thread(work)


async def _run_job(job: Any) -> Any:
    return await job.run()


def _s3_setup(args: argparse.Namespace) -> int:
    """Expire file-transfer staging data and abort unfinished multipart uploads."""
    from bridge.s3 import ObjectStore

    config = _load(args.config)
    if config is None:
        return 2
    if config.s3 is None:
        print(f"{args.config}: no [s3] section: nothing to set up", file=sys.stderr)
        return 2
    days = config.s3.staging_expiry_days
    rules = ObjectStore(config.s3).apply_lifecycle(days, days)["Rules"]
    print(f"s3://{config.s3.bucket}: lifecycle rules")
    for rule in rules:
        print(f"  {rule.get('ID', '?')}: {rule}")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from bridge import dev, localstack

    if _load(args.config, dev.check_config) is None:  # before anything starts
        return 2
    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise Mistake(f"--workdir {args.workdir} is not a directory: name a new or empty one")
    localstack.check_installed()
    return dev.run_dev(args.config, args.workdir, args.rate)


def _simulate(args: argparse.Namespace) -> int:
    try:
        config_module.mqtt_endpoint(args.url)
    except ValueError as exc:
        raise Mistake(f"--url {args.url}: {exc}") from None
    if args.file:
        _readable(args.file, "--file")  # before connecting
    return _fleet(args)


def _fleet(args: argparse.Namespace) -> int:
    """Reach the broker once (a herd's devices each connect in a thread of their own), then
    run the fleet or the upload `args` asks for."""
    from bridge import simulate

    probe = simulate.device_client(args.url, f"sim-check-{time.time_ns()}")
    probe.disconnect()
    probe.loop_stop()
    if args.file:
        from bridge.device import upload_file

        client = simulate.device_client(args.url, args.device_id)
        try:
            upload = upload_file(client, args.device_id, f"f{time.time_ns()}", Path(args.file),
                                 segment_bytes=args.segment_bytes)
        finally:
            client.disconnect()
            client.loop_stop()
        print(f"uploaded {upload.size} bytes as {upload.file_id} in {upload.segments} "
              f"segments, {upload.seconds:.1f} s, sha256 {upload.sha256}")
        return 0
    if args.herd:
        result = simulate.herd(args.url, args.devices, args.messages, args.qos, args.size)
    else:
        result = simulate.telemetry(args.url, args.devices, args.messages, args.qos, args.size,
                                    args.rate)
    print(f"published {result.published} messages in {result.seconds:.1f} s "
          f"({result.rate:.0f} msg/s)")
    return 0


def _tail(args: argparse.Namespace) -> int:
    from bridge.tail import tail

    try:
        return tail(args.bootstrap, args.topic, args.follow)
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or piped into `head`
        return 0
