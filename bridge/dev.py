"""`mqtt-kafka-bridge dev`: the bridge on a local Mosquitto, Tansu and moto S3, for newcomers.

The example config is used as it is, except for the three addresses, which point at the
local stack's ports. A simulated fleet publishes a trickle of telemetry, one message without
a device id so the dead-letter topic has something to show, and uploads a 3 MiB file over
MQTT file transfer, which lands in S3 with a reference envelope in Kafka.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from bridge import config as config_module
from bridge import logs, simulate
from bridge.daemon import Daemon
from bridge.device import sized_file, upload_file
from bridge.localstack import LocalStack, s3_environment


def local_config(path: Path, mqtt_url: str, bootstrap: str,
                 s3_endpoint: str) -> config_module.Config:
    """The config at `path`, pointed at the local stack's addresses."""
    data, raw = config_module.read_toml(path)
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


def check_config(path: str) -> config_module.Config:
    """The config as `dev` will run it, checked before anything starts (the local stack's
    addresses are not known yet: stand-ins take their place)."""
    return local_config(Path(path), "mqtt://127.0.0.1:1883", "127.0.0.1:9092",
                        "http://127.0.0.1:9000")


def run_dev(config_path: str, workdir: str, rate: float) -> int:
    path, work = Path(config_path), Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs.configure("console")
    for name, value in s3_environment().items():  # the local S3 takes any credentials
        os.environ.setdefault(name, value)
    with LocalStack(work) as stack:
        def load() -> config_module.Config:
            return local_config(path, stack.mqtt_url, stack.bootstrap, stack.s3_endpoint)

        config = load()
        topics = config.fixed_topics()
        stack.create_topics(topics)
        if config.s3:
            stack.create_bucket(config.s3.bucket)
        files = "" if config.file_transfer is None else (
            f"  .venv/bin/mqtt-kafka-bridge tail --bootstrap {stack.bootstrap} "
            f"{config.file_transfer.kafka_topic}      (a 3 MiB upload, by reference)\n")
        print(f"""
mqtt-kafka-bridge dev: local stack in {work}
  MQTT   {stack.mqtt_url}
  Kafka  {stack.bootstrap}   topics: {", ".join(topics)}
  S3     {stack.s3_endpoint}
Watch envelopes arrive (in another terminal):
  .venv/bin/mqtt-kafka-bridge tail --bootstrap {stack.bootstrap} -f {config.routes[0].kafka_topic}
  .venv/bin/mqtt-kafka-bridge tail --bootstrap {stack.bootstrap} {config.dead_letter_topic}
{files}Publish more:
  .venv/bin/mqtt-kafka-bridge simulate --url {stack.mqtt_url} --devices 100 --messages 100
  .venv/bin/mqtt-kafka-bridge simulate --url {stack.mqtt_url} --file SOME_FILE
Ctrl-C stops the bridge and everything dev started.
""", flush=True)
        stop, ready = threading.Event(), threading.Event()
        sample = None
        if config.file_transfer is not None:  # a file upload lands as a reference envelope
            sample = sized_file(work / "sample.bin", 3 * 2**20)
        fleet = threading.Thread(target=_fleet, args=(stack.mqtt_url, stop, ready, rate, sample),
                                 daemon=True)
        fleet.start()
        try:
            asyncio.run(Daemon(config, loader=load, on_ready=ready.set).run())
        finally:
            stop.set()
            fleet.join(5)
    return 0


def _fleet(url: str, stop: threading.Event, ready: threading.Event, rate: float,
           sample: Path | None) -> None:
    """Publishes once the bridge has subscribed: on a first run there is no session yet
    to hold what is published before."""
    while not ready.wait(0.5):
        if stop.is_set():
            return
    client = simulate.device_client(url, "sim-dev-misfit")
    client.publish("devices//telemetry", b"a message without a device id", qos=1)
    if sample is not None:
        upload = upload_file(client, "dev-00000", "sample-1", sample)
        print(f"dev: uploaded {sample.name} ({upload.size} bytes, sha256 {upload.sha256[:16]}..)"
              f" over MQTT file transfer", flush=True)
    client.disconnect()
    client.loop_stop()
    simulate.trickle(url, stop, rate)
