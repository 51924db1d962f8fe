"""The command line: run, check-config, route, s3-setup, retire, adopt, dev, simulate,
verify, tail, init-site.

A mistake or a failure of the outside world (a server that does not answer, a file that
does not open) is one line on stderr that says what to do, and exit 2 (bridge/explain.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bridge import config as config_module
from bridge import envelope, sitefiles
from bridge.errors import ConfigError, Rejected
from bridge.explain import Mistake, explain

T = TypeVar("T")


PROG = "mqtt-kafka-bridge"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C while a command starts up or waits
        return 130
    except Exception as exc:
        line = explain(exc, args)  # a mistake or an adapter's failure: one line, no traceback
        if line is None:
            raise
        print(f"{PROG} {args.command}: {line}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    """Every command and option; each option's help says its default."""
    top = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Help, description="At-least-once MQTT to Kafka. "
        f"'{PROG} COMMAND --help' tells a command's options.")
    top.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                     help="print the installed version and exit")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=what, description=what, formatter_class=_Help)

    def config(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", required=True, metavar="FILE",
                             help="the TOML config file")

    config(command("run", "run the bridge daemon"))

    check = command("check-config", "validate a config file: exit 0, or print every problem")
    check.add_argument("file", help="the TOML config file")

    route = command("route", "dry run: what the bridge would do with a message on TOPIC")
    config(route)
    route.add_argument("--payload-file", metavar="FILE", help="the message's payload, for its "
                       "format check and signature (default: an empty payload)")
    route.add_argument("--signature", metavar="HEX", help="the message's signature user "
                       "property, hex (default: none)")
    route.add_argument("topic", help="the MQTT topic the message arrives on")

    config(command("s3-setup", "apply the S3 bucket lifecycle rules of [s3]"))

    retire = command("retire", "scale in: tell a running bridge (SIGUSR1) to end its "
                     "sessions once it has bridged what its brokers queued, and wait until it "
                     "exits")
    retire.add_argument("--pid", type=_positive(int), help="the process id of "
                        "`mqtt-kafka-bridge run` (systemd: systemctl show -p MainPID --value "
                        "mqtt-kafka-bridge; its container: 1) (default: the one bridge daemon "
                        "running on this host)")
    retire.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                        help="stop waiting after this long and exit 1; the bridge goes on "
                        "retiring (default: no limit)")
    retire.add_argument("--if-scaled-down", action="store_true",
                        help="Kubernetes preStop: retire only when this pod's ordinal is at or "
                        "above its StatefulSet's replicas (a scale-down); else exit 0 at once, "
                        "and the SIGTERM that follows is a restart that keeps the session")

    adopt = command("adopt", "take over the sessions of a bridge that will never come back: "
                    "bridge what its brokers queued for it into Kafka, then end them")
    config(adopt)
    adopt.add_argument("--client-id", required=True, metavar="ID", help="the gone bridge's "
                       "client_id as its config rendered it (check-config shows it); every "
                       "lane's session (ID, ID-fast, ID-fat) is adopted on each broker")
    adopt.add_argument("--force", action="store_true", help="take the sessions over even "
                       "when their presence says connected, or cannot tell")
    adopt.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                       help="stop after this long, leaving what is still queued in the "
                       "sessions, and exit 1 (default: no limit)")

    dev = command("dev", "run the bridge on a local Mosquitto, Kafka (Tansu) and S3 (moto), "
                  "with a simulated fleet")
    dev.add_argument("--config", metavar="FILE", help="the config to run; its broker, Kafka "
                     "and S3 addresses are pointed at the local stack (default: the shipped "
                     "examples/bridge.toml)")
    dev.add_argument("--workdir", default=".dev", metavar="DIR",
                     help="where the local servers keep their data and logs")
    dev.add_argument("--rate", type=_positive(float), default=5.0,
                     help="simulated telemetry messages per second")
    dev.add_argument("--progress-after", type=_positive(float), default=60.0, metavar="SECONDS",
                     help="print a progress line after this long without output")

    sim = command("simulate", "a device fleet publishing traced telemetry (one MQTT "
                  "connection per device, one process), or one file upload")
    sim.add_argument("--url", default="mqtt://127.0.0.1:1883", help="the MQTT broker")
    sim.add_argument("--devices", type=_positive(int), default=100, help="devices in the fleet")
    sim.add_argument("--messages", type=_positive(int), help="messages per device "
                     "(default: 10, unless --duration)")
    sim.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                     help="publish for this long instead of --messages (default: off)")
    sim.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="MQTT QoS")
    sim.add_argument("--size", type=_positive(int, zero=True), default=200,
                     help="payload bytes (at least the traced JSON's own size)")
    sim.add_argument("--rate", type=_positive(float), help="messages per second in all "
                     "(default: as fast as the broker takes them)")
    sim.add_argument("--herd", action="store_true",
                     help="every device connects at once and publishes a burst; dropped "
                     "devices reconnect with jittered backoff")
    sim.add_argument("--prefix", default="devices",
                     help="topic prefix: PREFIX/DEVICE_ID/telemetry")
    sim.add_argument("--log", metavar="FILE", help="append one JSON line per publish's outcome "
                     "(acked, refused, unknown, sent) for `verify` (default: no log)")
    sim.add_argument("--file", help="upload this file over MQTT file transfer instead "
                     "(default: no file, telemetry)")
    sim.add_argument("--device-id", default="dev-00000", help="the uploading device (--file)")
    sim.add_argument("--segment-bytes", type=_positive(int), default=256 * 1024,
                     help="bytes per segment (--file)")
    sim.add_argument("--wait-result", type=_positive(float), metavar="SECONDS",
                     help="wait this long for the bridge's result of the upload and print it "
                     "([file_transfer] respond; --file; default: do not wait)")

    _verify_options(command("verify", "check Kafka against a simulate --log: lost (exit 1 "
                            "unless 0), duplicates, unexpected, latency percentiles"))

    tail = command("tail", "print a Kafka topic as decoded envelopes (JSON lines)")
    tail.add_argument("--bootstrap", default="127.0.0.1:9092", metavar="HOST:PORT",
                      help="a Kafka broker")
    tail.add_argument("--follow", "-f", action="store_true",
                      help="keep waiting for new records (else stop after 5 s without one)")
    tail.add_argument("topic", help="the Kafka topic")

    init = command("init-site", "write the systemd unit, the example config and registry and "
                   "the Mosquitto configs into DIR, for an operator to install")
    init.add_argument("dir", metavar="DIR", help="where to write them (created if missing)")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")
    return top


def _verify_options(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="a Kafka broker")
    verify.add_argument("--log", required=True, metavar="FILE", help="the JSON lines "
                        "`simulate --log` wrote (several runs may share it)")
    verify.add_argument("--topic", required=True, action="append", metavar="T",
                        help="a Kafka topic to read; repeat for more (the dead-letter topic "
                        "too, so dead letters count as settled)")
    s3 = verify.add_mutually_exclusive_group()
    s3.add_argument("--s3-endpoint", metavar="URL", help="follow reference envelopes into the "
                    "S3 at URL (default: references are not followed)")
    s3.add_argument("--follow-references", action="store_true",
                    help="follow reference envelopes into S3 at boto3's usual endpoint "
                    "(AWS)")
    verify.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    verify.add_argument("--idle", type=_positive(float), default=30.0, metavar="SECONDS",
                        help="while acked publishes are missing, stop after this long "
                        "without a record (a false 'lost' costs more than a wait)")
    verify.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                        help="stop after this long in all (default: no limit)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, "(default: off)" for a flag; options
    without a default value say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.required or \
                action.default in (None, argparse.SUPPRESS):
            return text
        return text + (" (default: off)" if action.default is False else
                       " (default: %(default)s)")


def version() -> str:
    """The installed distribution's version (a checkout that was never installed has none)."""
    try:
        return importlib.metadata.version(PROG)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


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
    return _opens(path, option, "rb", "read")


def _appendable(path: str, option: str) -> Path:
    """The file an option names, once it is known to open for appending."""
    return _opens(path, option, "a", "write")


def _opens(path: str, option: str, mode: str, verb: str) -> Path:
    try:
        with open(path, mode):
            return Path(path)
    except OSError as exc:
        raise Mistake(f"cannot {verb} {option} {path}: {exc.strerror or exc}") from None


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
    # SIGUSR1's default action ends the process: a `retire` during start-up, before the
    # daemon's loop takes the signal over, would exit without ending any session (and
    # `retire` would say it had). Noted instead, and acted on once the daemon runs.
    early: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, _frame: early.append(signum))
    config = _load(args.config)
    if config is None:
        return 2
    from bridge import logs
    from bridge.daemon import Daemon

    logs.configure(config.bridge.log_format)
    daemon = Daemon(config, loader=lambda: config_module.load(args.config))
    daemon.retire_requested = lambda: bool(early)
    try:
        asyncio.run(daemon.run())
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
    print(f"  instance: {config.bridge.instance}")
    for broker in config.brokers:  # as rendered here: {hostname}, ${NAME}
        sessions = ", ".join(f"{broker.for_lane(lane).client_id} ({lane})"
                             for lane in config.session_lanes())
        group = f", share group {broker.share_group}" if broker.share_group else ""
        print(f"  {broker.name}: session {sessions}{group}")
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
    if config.sparkplug is not None:
        said = _sparkplug_dry_run(config, config.sparkplug, message)
        if said is not None:
            return said
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


def _sparkplug_dry_run(config: config_module.Config,
                       settings: config_module.SparkplugConfig, message: Any) -> int | None:
    """What `[sparkplug]` would make of the message, through the daemon's own stage (with
    fresh host state, so DATA says it comes before any birth); None if it is not its."""
    from bridge.kafka import Delivery
    from bridge.metrics import Metrics
    from bridge.pipeline import Pipeline
    from bridge.sparkplug_host import Sparkplug

    pipeline = Pipeline(config, settings.lane, Metrics(), runner=_DryRun())
    stage = Sparkplug(config, settings, pipeline, Metrics(), lambda *_a, **_k: None)
    if not stage.takes(message.topic):
        return None
    delivery = stage.prepare(message, None)
    assert isinstance(delivery, Delivery)  # the stage decides on the loop: never a Job
    decoded = envelope.decode(delivery.value)
    if delivery.topic == config.dead_letter_topic:
        error = decoded["error"]
        print(f"dead letter:  {error['code']}: {error['reason']}\nkafka_topic:  {delivery.topic}")
        return 1
    found, node = decoded["sparkplug"], (delivery.key or b"").decode()
    print(f"sparkplug:    {found['message_type']} of {node} ({settings.lane} lane), "
          f"{len(found['metrics'])} metric(s)"
          + (f"; issues {', '.join(found['issues'])} (fresh host state)"
             if found["issues"] else "")
          + f"\nkafka_topic:  {delivery.topic}\nresult:       bridged")
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


def _retire(args: argparse.Namespace) -> int:
    """SIGUSR1 to the daemon, then wait for it to exit: it does once every session ended."""
    if args.if_scaled_down:
        from bridge import kubernetes

        decision = kubernetes.scale_down()
        print(f"{'retiring' if decision.retire else 'not retiring'}: {decision.why}")
        if not decision.retire:
            return 0
    if args.pid is None:
        args.pid = _the_bridge_process()
    _bridge_process(args.pid)
    try:
        os.kill(args.pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise Mistake(f"--pid {args.pid}: no such process (it exited?)") from None
    except PermissionError:
        raise Mistake(f"--pid {args.pid}: not allowed to signal it: run retire as the "
                      "bridge's user, or root") from None
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while _alive(args.pid):
        if deadline is not None and time.monotonic() > deadline:
            print(f"{PROG} retire: PID {args.pid} still retiring after {args.timeout:g} s "
                  "(a large queue, or a broker it cannot reach: its log says)", file=sys.stderr)
            return 1
        time.sleep(0.2)
    # Not our child: its exit status is not ours to read. A retire ends with exit 0 and
    # `bridge_retired` in its log; anything else (a SIGTERM meanwhile, a crash) left the
    # sessions to the broker, where `adopt` can still drain them.
    print(f"PID {args.pid} exited: its log says bridge_retired if every session was ended")
    return 0


def _the_bridge_process() -> int:
    """The PID of the one bridge daemon on this host, or a Mistake that says to choose."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = _argv(int(entry.name))
        except OSError:
            continue
        if int(entry.name) != os.getpid() and _is_daemon(argv):
            found.append(int(entry.name))
    if len(found) != 1:
        some = f"{len(found)} bridge daemons run here ({', '.join(map(str, sorted(found)))})" \
            if found else "no bridge daemon runs here"
        raise Mistake(f"{some}: give the one to retire with --pid")
    return found[0]


def _argv(pid: int) -> list[str]:
    """The command line of process `pid`, from /proc (OSError when it cannot be read)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def _is_daemon(argv: list[str]) -> bool:
    """`mqtt-kafka-bridge run --config ...`, or `python -m bridge run --config ...`: the
    command is the word after the program (not any word: `adopt --client-id run` is none),
    and argparse takes `--config=FILE` too."""
    for index, word in enumerate(argv[:3]):
        if word.endswith(PROG) or word == "bridge":
            return argv[index + 1:index + 2] == ["run"]
    return False


def _bridge_process(pid: int) -> None:
    """Refuse a PID that is not a bridge daemon: SIGUSR1 ends most other programs."""
    if not Path("/proc/self/cmdline").exists():
        return  # no /proc to look in: trust the operator
    try:
        argv = _argv(pid)
    except FileNotFoundError:
        raise Mistake(f"--pid {pid}: no such process") from None
    except OSError:
        return  # another user's process: os.kill says whether it may be signalled
    if not _is_daemon(argv):
        shown = " ".join(argv).strip()[:80]
        raise Mistake(f"--pid {pid} is not a bridge daemon ({shown}): give the PID of "
                      f"`{PROG} run`")


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; a zombie (exited, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _adopt(args: argparse.Namespace) -> int:
    """Connect as a gone member's sessions, bridge their queues, end them (`retire`)."""
    config = _load(args.config)
    if config is None:
        return 2
    if not config_module.CLIENT_ID.fullmatch(args.client_id):
        raise Mistake(f"--client-id {args.client_id!r}: must be 1-64 characters of "
                      "[0-9A-Za-z._-]")
    config = dataclasses.replace(config, http=None, brokers=tuple(  # no port of a running bridge
        dataclasses.replace(b, client_id=args.client_id) for b in config.brokers))
    if config.sparkplug is not None:  # draining a gone member is no Sparkplug host's birth
        config = dataclasses.replace(config, sparkplug=dataclasses.replace(config.sparkplug,
                                                                           host_id=""))
    if not args.force:
        for index, broker in enumerate(config.brokers):
            _refuse_if_connected(args, index, broker, config.session_lanes())
    from bridge import logs
    from bridge.daemon import Daemon

    logs.configure(config.bridge.log_format)
    daemon = Daemon(config, retire=True)
    asyncio.run(_within(daemon, args.timeout))
    if not daemon.retired:
        late = f" within --timeout {args.timeout:g} s" if args.timeout else ""
        print(f"{PROG} adopt: stopped before the sessions ended{late}: what they still queue "
              "stays with the broker; run adopt again", file=sys.stderr)
        return 1
    done = daemon.metrics.snapshot()
    sessions = [f"{s.config.client_id}@{s.name}" + ("" if s.session_present else " (none)")
                for s in daemon.sessions.values()]
    print(f"adopted {', '.join(sessions)}: {done.get('received_messages', 0)} message(s) "
          f"received, {done.get('bridged_messages', 0)} bridged, "
          f"{done.get('dead_lettered_messages', 0)} dead-lettered; the sessions are ended")
    return 0


async def _within(daemon: Any, timeout: float | None) -> None:
    """Run the daemon; past `timeout` stop it as SIGTERM would (the sessions stay)."""
    if timeout is not None:
        asyncio.get_running_loop().call_later(timeout, daemon.stop)
    await daemon.run()


def _refuse_if_connected(args: argparse.Namespace, index: int,
                         broker: config_module.BrokerConfig, lanes: list[str]) -> None:
    """A Mistake unless the presence of each of the member's sessions on `broker` says it
    is offline: adopting a live session would fight its owner for it."""
    from bridge import mqtt
    from bridge.errors import MqttError

    where = f"brokers[{index}] ({broker.name})"
    if not broker.presence_prefix:
        raise Mistake(f"{where} has presence_prefix = \"\": adopt cannot tell whether "
                      f"{args.client_id} is connected; --force takes it over anyway")
    ids = [broker.for_lane(lane).client_id for lane in lanes]
    try:
        found = asyncio.run(mqtt.read_presence(broker, ids))
    except (OSError, MqttError) as exc:
        raise Mistake(f"cannot read presence from {where}: {exc or type(exc).__name__}: is "
                      "the broker running? check its url and credentials") from None
    for client_id, presence in found.items():
        if presence is not None and presence.get("state") == "online":
            raise Mistake(f"{client_id} is connected to {broker.name} right now (instance "
                          f"{presence.get('instance')}, host {presence.get('host')}, pid "
                          f"{presence.get('pid')}): retire that bridge instead, or --force to "
                          "take its session over")
    if all(presence is None for presence in found.values()):
        raise Mistake(f"{where} holds no presence for {args.client_id}: cannot tell whether "
                      f"it is connected (a mistyped id? check-config on its config shows it; "
                      f"or an ACL that hides {broker.presence_prefix}/#); --force takes it "
                      "over anyway")


def _dev(args: argparse.Namespace) -> int:
    from bridge.devkit import dev, localstack

    config = args.config or str(sitefiles.path("examples/bridge.toml"))
    if _load(config, dev.check_config) is None:  # before anything starts
        return 2
    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise Mistake(f"--workdir {args.workdir} is not a directory: name a new or empty one")
    localstack.check_installed()
    return dev.run_dev(config, args.workdir, args.rate, args.progress_after)


def _simulate(args: argparse.Namespace) -> int:
    try:
        config_module.mqtt_endpoint(args.url)
    except ValueError as exc:
        raise Mistake(f"--url {args.url}: {exc}") from None
    if args.duration is not None and args.messages is not None:
        raise Mistake("--duration and --messages exclude each other: give one")
    if args.file:
        _readable(args.file, "--file")  # before connecting
    if args.log:
        _appendable(args.log, "--log")
    return _fleet(args)


def _fleet(args: argparse.Namespace) -> int:
    """Reach the broker once (not once per device), then run the fleet or the upload."""
    from bridge.devkit import fleet, simulate
    from bridge.errors import MqttError

    spec = fleet.FleetSpec(
        args.url, devices=args.devices, size=args.size, qos=args.qos, rate=args.rate,
        messages=None if args.duration else args.messages or 10, duration=args.duration,
        herd=args.herd, prefix=args.prefix, log=Path(args.log) if args.log else None)
    try:
        fleet.raise_fd_limit(args.devices + 64)
        asyncio.run(fleet.probe(spec))
    except ValueError as exc:
        raise Mistake(f"--devices {args.devices}: {exc}") from None
    except MqttError as exc:
        raise Mistake(f"the broker at {args.url} refused: {exc}") from None
    if args.file:
        upload = simulate.upload(spec, args.device_id, Path(args.file), args.segment_bytes,
                                 wait_result=args.wait_result)
        print(f"uploaded {upload.size} bytes as {upload.file_id} in {upload.segments} "
              f"segments, {upload.seconds:.1f} s, sha256 {upload.sha256}")
        if args.wait_result is not None:
            print("result: " + (json.dumps(upload.result) if upload.result is not None else
                                f"none within {args.wait_result:g} s"))
        return 0
    planned = args.devices * spec.messages if spec.messages else None
    progress = fleet.Progress(planned)
    try:
        report = fleet.run(dataclasses.replace(spec, progress=progress), check=False)
    finally:
        progress.close()
    print(report.summary() + (" (interrupted)" if report.interrupted else ""))
    return 130 if report.interrupted else 0


def _verify(args: argparse.Namespace) -> int:
    """Exit 0 when every acked publish of the log is in Kafka, 1 when one is missing."""
    import json

    from bridge.devkit import verify, verify_io

    path = _readable(args.log, "--log")
    try:
        log = verify_io.read_log(path)
    except verify.LogError as exc:
        raise Mistake(f"--log {path} {exc}: is it a simulate --log file?") from None
    if not log.runs and not log.files:
        raise Mistake(f"--log {path} holds no publishes: run simulate --log {path} first")
    report = verify_io.run(args.bootstrap, log, list(dict.fromkeys(args.topic)),
                           args.s3_endpoint, args.follow_references, args.idle, args.timeout,
                           progress=sys.stderr.isatty())
    print(json.dumps(report.to_json()) if args.json else verify_io.render(report))
    return 0 if report.ok else 1


def _tail(args: argparse.Namespace) -> int:
    from bridge.devkit.tail import tail

    try:
        return tail(args.bootstrap, args.topic, args.follow)
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or piped into `head`
        return 0


def _init_site(args: argparse.Namespace) -> int:
    """Copy the files an operator installs out of the package, never over one without
    --force, and say what to do with them."""
    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        raise Mistake(f"{target} is not a directory: name a new or existing one")
    sources = {name: sitefiles.path(name) for name in sitefiles.OPERATOR_FILES}
    there = [name for name in sources if (target / name).exists()]
    if there and not args.force:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise Mistake(f"{target / there[0]} exists{more}: --force overwrites")
    for name, source in sources.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / name)
    unit = target / "systemd/mqtt-kafka-bridge.service"
    program, config = _exec_start(unit.read_text())
    here = sitefiles.program()
    differs = "" if program == here else f"; this install is {here}: edit the unit to match"
    print(f"wrote {len(sources)} files to {target} (from {sitefiles.root()}):\n"
          f"  {'  '.join(sources)}\n"
          "next:\n"
          f"  1. copy {target / 'examples'}/*.toml to {Path(config).parent}/, edit them, then: "
          f"{here} check-config {config}\n"
          f"  2. install -m 644 {unit} /etc/systemd/system/ && systemctl enable --now "
          f"mqtt-kafka-bridge\n"
          f"     (the unit runs {program}{differs})\n"
          f"  3. the broker: {target / 'mosquitto/README.md'}")
    return 0


def _exec_start(unit: str) -> tuple[str, str]:
    """The program and the --config file of a unit's ExecStart line."""
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            words = line.removeprefix("ExecStart=").split()
            config = words[words.index("--config") + 1] if "--config" in words[:-1] else "?"
            return words[0] if words else "?", config
    return "?", "?"


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run, "check-config": _check, "route": _route, "s3-setup": _s3_setup,
    "retire": _retire, "adopt": _adopt, "dev": _dev,
    "simulate": _simulate, "verify": _verify, "tail": _tail, "init-site": _init_site}
