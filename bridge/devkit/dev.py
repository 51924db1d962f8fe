"""`mqtt-kafka-bridge dev`: the bridge on a local Mosquitto, Tansu and moto S3, for newcomers.

The config (by default the shipped example) is used as it is, except for the three
addresses, which point at the local stack's ports. A simulated fleet publishes a trickle of
telemetry, one demo message the bridge must dead-letter (its device id is not valid), and
uploads a 3 MiB file over MQTT file transfer, which lands in S3 with a reference envelope in
Kafka. When nothing has been printed for a while, a short line says how far it got.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from bridge import config as config_module
from bridge import logs, sitefiles
from bridge.daemon import Daemon
from bridge.devkit import simulate
from bridge.devkit.device import sized_file, upload_file
from bridge.devkit.localstack import LocalStack, free_port, s3_environment

DEMO_DEVICE = "demo:dead-letter"  # ':' is no device id character: code invalid_device_id


def local_config(path: Path, mqtt_url: str, bootstrap: str,
                 s3_endpoint: str, http_listen: str | None = None) -> config_module.Config:
    """The config at `path`, pointed at the local stack's addresses (and, with `http_listen`,
    its [http] endpoint there)."""
    data, raw = config_module.read_toml(path)
    if http_listen is not None and isinstance(data.get("http"), dict):
        data["http"]["listen"] = http_listen
    for broker in data.get("brokers", []):
        if isinstance(broker, dict):  # anything else is for parse() to refuse
            broker.update(url=mqtt_url)
            for key in ("ca_file", "cert_file", "key_file", "username", "password_file"):
                broker.pop(key, None)
    if isinstance(data.setdefault("kafka", {}), dict):
        data["kafka"]["bootstrap.servers"] = bootstrap
    if isinstance(data.get("s3"), dict):
        data["s3"]["endpoint_url"] = s3_endpoint
    return config_module.parse(data, source=raw, base=path.parent)


def _free_listen(http: config_module.HttpConfig | None) -> str | None:
    """The config's [http] address if it is free here, else a free port on loopback (a
    second `dev`, or a bridge already running, has the default one)."""
    if http is None:
        return None
    try:
        with socket.create_server((http.host, http.port)):
            return http.listen
    except OSError:
        return f"127.0.0.1:{free_port()}"


def check_config(path: str) -> config_module.Config:
    """The config as `dev` will run it, checked before anything starts (the local stack's
    addresses are not known yet: stand-ins take their place)."""
    return local_config(Path(path), "mqtt://127.0.0.1:1883", "127.0.0.1:9092",
                        "http://127.0.0.1:9000")


def demo_topic(config: config_module.Config) -> str:
    """A topic of the first route, with the demo's invalid device id in its {device_id}: a
    message the bridge receives and must dead-letter, whatever the routes."""
    route = config.routes[0].filter
    levels = [DEMO_DEVICE if name == "device_id" else literal or "demo"
              for literal, name in zip(route.levels, route.names, strict=True)]
    return "/".join([*levels, "demo"] if route.multi else levels)


def counts(daemon: Daemon) -> tuple[int, int]:
    """(bridged, dead-lettered) so far, from the daemon's ledger (README, "Watching it")."""
    metrics = daemon.metrics
    return (int(metrics.value("bridged_messages")),
            int(metrics.value("dead_lettered_messages")))


class Progress:
    """Remembers when `dev` last printed something (its own lines and the bridge's log
    events, but not the periodic `bridge_stats` wall of counters) and, `after` seconds of
    quiet, prints one short line of how far it got."""

    def __init__(self, after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after, self.clock = after, clock
        self.last = clock()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.last = self.clock()

    def log_event(self, _logger: object, _method: str,
                  event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """A structlog processor: notes each event printed."""
        if event.get("event") != "bridge_stats":
            self.last = self.clock()
        return event

    def due(self) -> bool:
        return self.clock() - self.last >= self.after

    async def watch(self, daemon: Daemon) -> None:
        """On the event loop, where the counters are written, so they are read whole."""
        while True:
            await asyncio.sleep(1)
            if self.due():
                bridged, dead = counts(daemon)
                self.say(f"dev: {bridged} messages bridged, {dead} dead-lettered so far "
                         "(Ctrl-C stops)")


def run_dev(config_path: str, workdir: str, rate: float, progress_after: float = 60.0) -> int:
    path, work = Path(config_path), Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs.configure("console")
    progress = Progress(progress_after)
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[progress.log_event, *processors])
    for name, value in s3_environment().items():  # the local S3 takes any credentials
        os.environ.setdefault(name, value)
    progress.say(f"dev: starting Mosquitto, Kafka (Tansu) and S3 (moto) in {work} ...")
    with LocalStack(work) as stack:
        listen = _free_listen(local_config(path, stack.mqtt_url, stack.bootstrap,
                                           stack.s3_endpoint).http)

        def load() -> config_module.Config:
            return local_config(path, stack.mqtt_url, stack.bootstrap, stack.s3_endpoint,
                                listen)

        config = load()
        topics = config.fixed_topics()
        stack.create_topics(topics)
        if config.s3:
            stack.create_bucket(config.s3.bucket)
        progress.say(_banner(stack, config, path, topics, rate))
        stop, ready = threading.Event(), threading.Event()
        sample = None
        if config.file_transfer is not None:  # a file upload lands as a reference envelope
            sample = sized_file(work / "sample.bin", 3 * 2**20)
        fleet = threading.Thread(target=_fleet, daemon=True, args=(
            stack.mqtt_url, stop, ready, rate, sample, demo_topic(config), progress,
            f"{sitefiles.program(relative=True)} tail --bootstrap {stack.bootstrap} "
            f"{config.dead_letter_topic}"))
        fleet.start()
        try:
            asyncio.run(_watched(Daemon(config, loader=load, on_ready=ready.set), progress))
        finally:
            stop.set()
            fleet.join(5)
            gc.collect()  # the daemon's producers, before Tansu stops: no reconnect noise
    return 0


async def _watched(daemon: Daemon, progress: Progress) -> None:
    watch = asyncio.create_task(progress.watch(daemon))
    try:
        await daemon.run()
    finally:
        watch.cancel()


def _banner(stack: LocalStack, config: config_module.Config, path: Path, topics: list[str],
            rate: float) -> str:
    program = sitefiles.program(relative=True)
    tail = f"{program} tail --bootstrap {stack.bootstrap}"
    bucket = f"   bucket {config.s3.bucket}" if config.s3 else ""
    http = "" if config.http is None else (
        f"\n  its metrics    http://{config.http.listen}/metrics   (and /healthz, /readyz)")
    files = "" if config.file_transfer is None else (
        f"  {tail} {config.file_transfer.kafka_topic}      (a 3 MiB upload, by reference)\n")
    return f"""
mqtt-kafka-bridge dev: started, data and logs in {stack.workdir}
  Mosquitto      {stack.mqtt_url}
  Kafka (Tansu)  {stack.bootstrap}   topics {", ".join(topics)}
  S3 (moto)      {stack.s3_endpoint}{bucket}
  the bridge     on {path}, its addresses pointed at these{http}
  a fleet        {rate:g} telemetry messages/s, one demo dead letter{
      ", one file upload" if config.file_transfer else ""}
Watch envelopes arrive (in another terminal):
  {tail} -f {config.routes[0].kafka_topic}
  {tail} {config.dead_letter_topic}
{files}Publish more:
  {program} simulate --url {stack.mqtt_url} --devices 100 --messages 100
  {program} simulate --url {stack.mqtt_url} --file SOME_FILE
Ctrl-C stops the bridge and everything dev started.
"""


def _fleet(url: str, stop: threading.Event, ready: threading.Event, rate: float,
           sample: Path | None, demo: str, progress: Progress, tail_dead: str) -> None:
    """Publishes once the bridge has subscribed: on a first run there is no session yet
    to hold what is published before."""
    while not ready.wait(0.5):
        if stop.is_set():
            return
    client = simulate.device_client(url, "dev-demo")
    client.publish(demo, b"dev's demo dead letter: its device id is not valid", qos=1)
    progress.say(f"dev: published a demo dead letter on {demo} (not a valid device id); "
                 f"see it: {tail_dead}")
    if sample is not None:
        upload = upload_file(client, "dev-00000", "sample-1", sample)
        progress.say(f"dev: uploaded {sample.name} ({upload.size} bytes, sha256 "
                     f"{upload.sha256[:16]}..) over MQTT file transfer")
    client.disconnect()
    client.loop_stop()
    simulate.trickle(url, stop, rate)

