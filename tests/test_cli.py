"""The command line: a user's mistake gets one line on stderr that says what to do, and exit
code 2, never a traceback. These need no servers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_config import GOOD


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refused command."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    return line


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening, so no other
    process can be listening there meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_route_names_a_payload_file_it_cannot_read(good: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    line = one_line(cli("route", "--config", str(good), "--payload-file", str(missing),
                        "devices/d1/telemetry"))
    assert line == (f"mqtt-kafka-bridge route: cannot read --payload-file {missing}: "
                    "No such file or directory")
    line = one_line(cli("route", "--config", str(good), "--payload-file", str(tmp_path),
                        "devices/d1/telemetry"))
    assert line.endswith(f"cannot read --payload-file {tmp_path}: Is a directory")


def test_a_config_path_that_is_no_file_is_refused(tmp_path: Path) -> None:
    for command in (["check-config", str(tmp_path)], ["run", "--config", str(tmp_path)]):
        done = cli(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.splitlines()[1] == f"  {tmp_path}: cannot read: not a regular file"


def test_simulate_refuses_a_bad_url_or_file_before_connecting(tmp_path: Path) -> None:
    line = one_line(cli("simulate", "--url", "mqtt://[::1"))
    assert line.startswith("mqtt-kafka-bridge simulate: --url mqtt://[::1 is not a valid url")
    line = one_line(cli("simulate", "--url", "mqtt://127.0.0.1:0"))
    assert "port must be between 1 and 65535" in line
    line = one_line(cli("simulate", "--file", str(tmp_path / "nope.bin")))
    assert line.endswith(f"cannot read --file {tmp_path / 'nope.bin'}: No such file or directory")


@pytest.mark.parametrize("mode", [[], ["--herd"]])
def test_simulate_says_once_that_the_broker_is_unreachable(refusing_port: int,
                                                          mode: list[str]) -> None:
    url = f"mqtt://127.0.0.1:{refusing_port}"
    line = one_line(cli("simulate", "--url", url, "--devices", "3", *mode))
    assert line.startswith(f"mqtt-kafka-bridge simulate: cannot publish to {url} (is the "
                           "broker up? check --url): ")
    assert "Connection refused" in line


def test_dev_refuses_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    config, work = tmp_path / "bridge.toml", tmp_path / "work"
    config.write_text(GOOD.replace("[dead_letter]", '"linger.msec" = 5\n[dead_letter]'))
    for bad in (config, tmp_path / "missing.toml"):
        done = cli("dev", "--config", str(bad), "--workdir", str(work))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.splitlines()[0] == f"{bad}: 1 problem(s)"
    assert not work.exists()  # no local stack was started
    (tmp_path / "good.toml").write_text(GOOD)
    line = one_line(cli("dev", "--config", str(tmp_path / "good.toml"), "--workdir", str(config)))
    assert line == (f"mqtt-kafka-bridge dev: --workdir {config} is not a directory: name a new "
                    "or empty one")


def test_numbers_out_of_range_are_argparse_errors() -> None:
    done = cli("simulate", "--rate", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith("argument --rate: must be more than 0, got 0")


def test_s3_setup_says_in_one_line_that_s3_is_unreachable(tmp_path: Path,
                                                        refusing_port: int) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD.replace("[dead_letter]", '[s3]\nbucket = "iot-payloads"\n'
                                 f'endpoint_url = "http://127.0.0.1:{refusing_port}"\n'
                                 "[dead_letter]"))
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run([sys.executable, "-m", "bridge", "s3-setup", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("s3-setup failed: get_bucket_lifecycle_configuration: Could not "
                           "connect to the endpoint URL")
