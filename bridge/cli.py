"""The command line: run, check-config, route, dev, simulate, tail."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from bridge import config as config_module
from bridge import envelope
from bridge.errors import ConfigError, Rejected


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

    dev = commands.add_parser("dev", help="run the bridge on a local Mosquitto, Tansu and S3")
    dev.add_argument("--config", default="examples/bridge.toml")
    dev.add_argument("--workdir", default=".dev")
    dev.add_argument("--rate", type=float, default=5.0, help="simulated messages per second")

    sim = commands.add_parser("simulate", help="a device fleet publishing telemetry")
    sim.add_argument("--url", default="mqtt://127.0.0.1:1883")
    sim.add_argument("--devices", type=int, default=100)
    sim.add_argument("--messages", type=int, default=10, help="per device")
    sim.add_argument("--qos", type=int, choices=(0, 1, 2), default=1)
    sim.add_argument("--size", type=int, default=200, help="payload bytes")
    sim.add_argument("--rate", type=float, help="messages per second in all (default: max)")
    sim.add_argument("--herd", action="store_true",
                     help="every device connects at once as its own client")

    tail = commands.add_parser("tail", help="print a Kafka topic as decoded envelopes")
    tail.add_argument("--bootstrap", default="127.0.0.1:9092")
    tail.add_argument("--follow", "-f", action="store_true")
    tail.add_argument("topic")

    args = parser.parse_args(argv)
    handler = {"run": _run, "check-config": _check, "route": _route, "dev": _dev,
               "simulate": _simulate, "tail": _tail}[args.command]
    return handler(args)


def _load(path: str) -> config_module.Config | None:
    try:
        return config_module.load(path)
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
    asyncio.run(Daemon(config, loader=lambda: config_module.load(args.config)).run())
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
    from bridge.message import Message
    from bridge.metrics import Metrics
    from bridge.pipeline import Pipeline
    from bridge.routing import Router

    config = _load(args.config)
    if config is None:
        return 2
    from bridge import logs

    logs.configure(level=logging.ERROR)  # the pipeline's dead_letter warning is said below
    payload = b""
    if args.payload_file:
        with open(args.payload_file, "rb") as f:
            payload = f.read()
    properties = (("signature", args.signature),) if args.signature else ()
    message = Message("dry-run", args.topic, payload, 1, False, False,
                      time.time_ns() // 1_000_000, properties)
    print(f"topic:        {args.topic}")
    try:
        route, device_id, bindings, _ = Router(config.routes).match(args.topic)
    except Rejected as rejected:
        print(f"dead letter:  {rejected.code}: {rejected.reason}\n"
              f"kafka_topic:  {config.dead_letter_topic}")
        return 1
    delivery = Pipeline(config, route.lane, None, Metrics()).prepare(message, None)
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
    print(f"kafka_topic:  {delivery.topic}\nresult:       bridged")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from bridge.dev import run_dev

    return run_dev(args.config, args.workdir, args.rate)


def _simulate(args: argparse.Namespace) -> int:
    from bridge import simulate

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
