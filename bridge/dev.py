"""`mqtt-kafka-bridge dev`: the bridge on a local Mosquitto, Tansu and moto S3, for newcomers.

The example config is used as it is, except for the three addresses, which point at the
local stack's ports. A simulated fleet publishes a trickle of telemetry, plus one message
without a device id so the dead-letter topic has something to show.
"""

from __future__ import annotations

import asyncio
import threading
import tomllib
from pathlib import Path

from bridge import config as config_module
from bridge import logs, simulate
from bridge.daemon import Daemon
from bridge.errors import ConfigError
from bridge.localstack import LocalStack


def local_config(path: Path, stack: LocalStack) -> config_module.Config:
    """The config at `path`, pointed at the local stack."""
    raw = path.read_bytes()
    data = tomllib.loads(raw.decode())
    for broker in data.get("brokers", []):
        broker.update(url=stack.mqtt_url)
        for key in ("ca_file", "cert_file", "key_file", "username", "password_file"):
            broker.pop(key, None)
    data.setdefault("kafka", {})["bootstrap.servers"] = stack.bootstrap
    if "s3" in data:
        data["s3"]["endpoint_url"] = stack.s3_endpoint
    return config_module.parse(data, source=raw, base=path.parent)


def run_dev(config_path: str, workdir: str, rate: float) -> int:
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs.configure("console")
    with LocalStack(work) as stack:
        try:
            config = local_config(Path(config_path), stack)
        except ConfigError as exc:
            print("\n".join(exc.problems))
            return 2
        topics = config.fixed_topics()
        stack.create_topics(topics)
        if config.s3:
            stack.create_bucket(config.s3.bucket)
        print(f"""
mqtt-kafka-bridge dev: local stack in {work}
  MQTT   {stack.mqtt_url}
  Kafka  {stack.bootstrap}   topics: {", ".join(topics)}
  S3     {stack.s3_endpoint}
Watch envelopes arrive (in another terminal):
  .venv/bin/mqtt-kafka-bridge tail --bootstrap {stack.bootstrap} -f {config.routes[0].kafka_topic}
  .venv/bin/mqtt-kafka-bridge tail --bootstrap {stack.bootstrap} {config.dead_letter_topic}
Publish more:
  .venv/bin/mqtt-kafka-bridge simulate --url {stack.mqtt_url} --devices 100 --messages 100
Ctrl-C stops the bridge and everything dev started.
""", flush=True)
        stop = threading.Event()
        fleet = threading.Thread(target=_fleet, args=(stack.mqtt_url, stop, rate), daemon=True)
        fleet.start()
        try:
            asyncio.run(Daemon(config, loader=lambda: local_config(Path(config_path),
                                                                   stack)).run())
        finally:
            stop.set()
            fleet.join(5)
    return 0


def _fleet(url: str, stop: threading.Event, rate: float) -> None:
    client = simulate.device_client(url, "sim-dev-misfit")
    client.publish("devices//telemetry", b"a message without a device id", qos=1)
    client.disconnect()
    client.loop_stop()
    simulate.trickle(url, stop, rate)
