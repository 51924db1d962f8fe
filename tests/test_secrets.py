"""Secrets: systemd credentials, environment references, and files the service user must read."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import config
from bridge.errors import ConfigError
from bridge.s3 import ObjectStore
from tests.conftest import ROOT
from tests.test_config import GOOD

BROKER = 'client_id = "mkb-1"'
PROPERTY = '"bootstrap.servers" = "127.0.0.1:9092"'


def parse(text: str, environ: dict[str, str], base: Path | None = None) -> config.Config:
    return config.parse(tomllib.loads(text), base=base, environ=environ)


def problems(text: str, environ: dict[str, str], base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ, base)
    return caught.value.problems


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """A credentials directory as systemd lays it out: one file per LoadCredential= id."""
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "mqtt-password").write_text("s3cret-password\n")
    (folder / "devices.toml").write_text('[devices."d1"]\nhmac_key = "' + "ab" * 16 + '"\n')
    return folder


def with_password(reference: str) -> str:
    return GOOD.replace(BROKER, f'{BROKER}\nusername = "bridge"\npassword_file = "{reference}"')


@pytest.mark.parametrize("reference", ["${CREDENTIALS_DIRECTORY}/mqtt-password",
                                       "$CREDENTIALS_DIRECTORY/mqtt-password"])
def test_a_file_key_may_start_with_the_credentials_directory(
        reference: str, credentials: Path) -> None:
    loaded = parse(with_password(reference), {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert loaded.brokers[0].password_file == str(credentials / "mqtt-password")


def test_the_registry_may_come_from_the_credentials_directory(credentials: Path,
                                                             tmp_path: Path) -> None:
    text = GOOD + '[registry]\nfile = "${CREDENTIALS_DIRECTORY}/devices.toml"\n'
    loaded = parse(text, {"CREDENTIALS_DIRECTORY": str(credentials)}, base=tmp_path)
    assert loaded.registry.devices["d1"].hmac_key == bytes.fromhex("ab" * 16)
    assert "ab" * 16 not in repr(loaded) and "\\xab" not in repr(loaded)


def test_without_the_credentials_directory_the_key_is_named_with_what_to_do() -> None:
    found = problems(with_password("${CREDENTIALS_DIRECTORY}/mqtt-password"), {})
    assert found == [
        "brokers[0].password_file: $CREDENTIALS_DIRECTORY is not set: run the bridge under "
        "systemd with LoadCredential= (see README 'Secrets'), or give a plain path"]


def test_a_credential_the_unit_does_not_load_says_which_line_to_add(credentials: Path) -> None:
    text = GOOD.replace(BROKER, BROKER + '\nca_file = "${CREDENTIALS_DIRECTORY}/ca.pem"')
    found = problems(text.replace("mqtt://", "mqtts://"),
                     {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert found == [
        f"brokers[0].ca_file: no credential 'ca.pem' in $CREDENTIALS_DIRECTORY ({credentials}): "
        "add LoadCredential=ca.pem:/etc/mqtt-kafka-bridge/ca.pem to the unit "
        "(see README 'Secrets')"]


def test_kafka_strings_name_environment_variables() -> None:
    text = GOOD.replace(PROPERTY, f'{PROPERTY}\n"sasl.username" = "${{KAFKA_USER}}"\n'
                                  '"sasl.password" = "${KAFKA_SASL_PASSWORD}"\n'
                                  '"client.id" = "edge$$1 costs $5"\n'
                                  '[lanes.bulk]\n"compression.type" = "${CODEC}"')
    loaded = parse(text, {"KAFKA_USER": "bridge", "KAFKA_SASL_PASSWORD": "pa$$word-from-env",
                          "CODEC": "lz4"})
    properties = loaded.producer_config("bulk")
    assert properties["sasl.username"] == "bridge"
    assert properties["sasl.password"] == "pa$$word-from-env"  # a value is never expanded
    assert properties["client.id"] == "edge$1 costs $5"
    assert properties["compression.type"] == "lz4"
    assert "pa$$word-from-env" not in repr(loaded)


def test_an_unset_variable_is_refused_with_its_key_path() -> None:
    text = GOOD.replace(PROPERTY, f'{PROPERTY}\n"sasl.password" = "${{KAFKA_SASL_PASSWORD}}"\n'
                                  '[lanes.fast]\n"client.id" = "x${oops"')
    assert problems(text, {}) == [
        'kafka."sasl.password": ${KAFKA_SASL_PASSWORD} is not set in the environment: set it '
        "(under systemd, in the unit's EnvironmentFile=, see README 'Secrets'), or write $$ "
        "for a literal $",
        "lanes.fast.\"client.id\": the '${' at character 2 opens no ${NAME}: write $${ for a "
        "literal ${"]


def test_a_value_from_the_environment_never_shows_in_a_problem() -> None:
    """librdkafka quotes a value it refuses: the problem shows the reference instead."""
    text = GOOD.replace(PROPERTY, f'{PROPERTY}\n"compression.type" = "${{CODEC}}"')
    found = problems(text, {"CODEC": "hunter2-but-secret"})
    assert found and all("hunter2" not in problem for problem in found)
    assert any(problem.startswith('kafka."compression.type": refused by librdkafka') and
               "${CODEC}" in problem for problem in found), found


def test_librdkafka_file_properties_are_opened_at_load(credentials: Path) -> None:
    text = GOOD.replace(PROPERTY, f'{PROPERTY}\n"ssl.key.location" = '
                                  '"$CREDENTIALS_DIRECTORY/kafka.key"\n'
                                  '"ssl.ca.location" = "${CREDENTIALS_DIRECTORY}"')
    found = problems(text, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert found == [  # the CA directory is fine; librdkafka is not asked about a missing key
        f"kafka.\"ssl.key.location\": no credential 'kafka.key' in $CREDENTIALS_DIRECTORY "
        f"({credentials}): add LoadCredential=kafka.key:/etc/mqtt-kafka-bridge/kafka.key to "
        "the unit (see README 'Secrets')"]


def test_the_s3_client_takes_credentials_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What an EnvironmentFile= with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY gives."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEDGEEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-environment-file")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    store = ObjectStore(config.S3Config(bucket="iot-payloads", region="eu-central-1"))
    frozen = store.client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (
        "AKIAEDGEEXAMPLE", "from-the-environment-file", "session-token")


# The bridge's command line, imported as root, then run as `nobody` (as DynamicUser= would
# run it): only reading the config and its files happens as the service user, so the test
# does not depend on whether `nobody` may enter the checkout and its virtual environment.
AS_NOBODY = """
import os, pwd, sys
from bridge import cli
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def secrets_folder() -> Iterator[Path]:
    """A folder anyone may read, for root's mode-600 secrets and a config that names them."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the bridge as another user")
    folder = Path(tempfile.mkdtemp(prefix="mkb-secrets-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_a_secret_the_service_user_cannot_read_is_a_config_error(secrets_folder: Path) -> None:
    """Found: with DynamicUser=yes the bridge could not read a mode-600 password file and
    reconnected forever with `Permission denied` after check-config said ok."""
    folder = secrets_folder
    for name, text in (("mqtt-password", "secret\n"), ("kafka.key", "secret\n"),
                       ("devices.toml", '[devices."d1"]\n')):
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    path = folder / "bridge.toml"
    path.write_text(with_password(str(folder / "mqtt-password")).replace(
        PROPERTY, f'{PROPERTY}\n"ssl.key.location" = "{folder}/kafka.key"')
        + '[registry]\nfile = "devices.toml"\n')
    path.chmod(0o644)
    nobody = pwd.getpwnam("nobody")
    denied = (f"cannot read '{{}}': permission denied: the service user (nobody, uid "
              f"{nobody.pw_uid}) cannot read it: hand it over with LoadCredential=, see "
              "README 'Secrets'")
    expected = [f"brokers[0].password_file: {denied.format(folder / 'mqtt-password')}",
                f'kafka."ssl.key.location": {denied.format(folder / "kafka.key")}',
                f"registry.file: {denied.format(folder / 'devices.toml')}"]
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, *command], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines()[1:] == [f"  {line}" for line in expected]
    assert config.load(path).brokers[0].password_file  # root reads them: the check is real
