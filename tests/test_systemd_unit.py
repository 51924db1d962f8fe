"""The shipped unit: systemd's own checker finds no problem in it, and it says what it must."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "mqtt-kafka-bridge.service"
BINARY = "/opt/mqtt-kafka-bridge/bin/mqtt-kafka-bridge"


def verify(text: str, folder: Path) -> list[str]:
    """What `systemd-analyze verify` says of a unit with this text (no output: no problem).
    The binary paths point at an executable that exists here, as the checker requires."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    executable = shutil.which("true")
    assert executable is not None
    unit = folder / UNIT.name
    unit.write_text(text.replace(BINARY, executable))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    output = (done.stdout + done.stderr).splitlines()
    return output if output or done.returncode == 0 else [f"exit {done.returncode}"]


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            found.setdefault(name, []).append(value)
    return found


def test_systemd_analyze_verify_reports_no_problems(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == []


def test_the_commented_credentials_verify_when_uncommented(tmp_path: Path) -> None:
    text = UNIT.read_text().replace("#LoadCredential=", "LoadCredential=")
    assert "LoadCredential" in settings(text)
    assert verify(text, tmp_path) == []


def test_the_checker_is_heard(tmp_path: Path) -> None:
    """A unit with a typo is reported: an empty answer above means something."""
    found = verify(UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs="), tmp_path)
    assert any("WatchdogSecs" in line for line in found), found


def test_the_unit_is_a_notify_service_with_a_watchdog_and_its_secrets() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert "AF_UNIX" in unit["RestrictAddressFamilies"][0].split()  # the notify socket
    assert unit["EnvironmentFile"] == ["-/etc/mqtt-kafka-bridge/environment"]
    assert unit["ExecStartPre"] == [f"{BINARY} check-config /etc/mqtt-kafka-bridge/bridge.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # A retired bridge (SIGUSR1: sessions ended, exit 0) must not come back as a new member.
    assert unit["Restart"] == ["always"] and unit["RestartPreventExitStatus"] == ["0"]
    assert "#LoadCredential=mqtt-password:/etc/mqtt-kafka-bridge/mqtt-password" in \
        UNIT.read_text().splitlines()
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "DynamicUser", "UMask"):
        assert hardening in unit
