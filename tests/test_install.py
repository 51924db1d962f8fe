"""An operator's install, not the checkout: a wheel built from this tree, installed
non-editable, finds its site files (the unit, the example config and registry, the
Mosquitto configs) where the install put them. Needs pip and setuptools from the package
index (the build runs isolated), no servers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import sitefiles
from tests.conftest import ROOT

SOURCES = ("pyproject.toml", "README.md", "bridge", "systemd", "examples", "mosquitto")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a copy of this tree (pip builds in the source tree: not in ours)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip("wheel", "--no-deps", "--wheel-dir", str(out), str(src))
    [built] = out.glob("mqtt_kafka_bridge-*.whl")
    return built


def pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr


class Install:
    """The wheel installed under `prefix` (as into a venv) or `--target` (a bare folder)."""

    def __init__(self, wheel: Path, root: Path, how: str) -> None:
        self.root, self.share = root, root / "share/mqtt-kafka-bridge"
        ours = sorted(Path(sysconfig.get_path("purelib")).glob("mqtt_kafka_bridge-*"))
        # --ignore-installed: else pip --prefix first uninstalls the running environment's
        # own (editable) install of the same version, which every other test imports.
        pip("install", "--no-deps", "--no-index", "--ignore-installed", f"--{how}", str(root),
            str(wheel))
        assert sorted(Path(sysconfig.get_path("purelib")).glob("mqtt_kafka_bridge-*")) == ours
        self.path = Path(sysconfig.get_path("purelib", vars={"base": str(root)})) \
            if how == "prefix" else root
        self.cwd = root.parent / "elsewhere"  # not the checkout, which python -m would import
        self.cwd.mkdir()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(self.path)}  # the dependencies: this venv's
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              cwd=self.cwd, env=env, timeout=60)


@pytest.fixture(scope="module", params=["prefix", "target"])
def installed(request: pytest.FixtureRequest, wheel: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    yield Install(wheel, tmp_path_factory.mktemp(request.param) / "install", request.param)


def test_the_installed_package_finds_its_site_files_outside_the_checkout(
        installed: Install) -> None:
    done = installed.run("-c", "import bridge, bridge.devkit.localstack as l\n"
                         "import bridge.sitefiles as s\n"
                         "print(bridge.__file__); print(s.path('mosquitto/local.conf'))\n"
                         "print(l.MOSQUITTO_DIR); print(s.checkout())")
    assert done.returncode == 0, done.stderr
    package, local_conf, mosquitto_dir, checkout = done.stdout.splitlines()
    assert Path(package).is_relative_to(installed.path)
    assert Path(local_conf) == installed.share / "mosquitto/local.conf"
    assert Path(mosquitto_dir) == installed.share / "mosquitto"
    assert checkout == "None"


def test_init_site_from_the_installed_package(installed: Install) -> None:
    site = installed.root.parent / "site"
    done = installed.run("-m", "bridge", "init-site", str(site))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 6 files to {site} (from {installed.share}):\n")
    for name in sitefiles.OPERATOR_FILES:
        assert (site / name).read_bytes() == (ROOT / name).read_bytes(), name


def test_dev_from_the_installed_package_checks_the_shipped_example(installed: Install) -> None:
    """Its default config is found and checked (a --workdir that is a file stops it after
    that, before any server starts)."""
    occupied = installed.cwd / "occupied"
    occupied.write_text("")
    done = installed.run("-m", "bridge", "dev", "--workdir", str(occupied))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == (f"mqtt-kafka-bridge dev: --workdir {occupied} is not a directory: "
                           "name a new or empty one\n")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert installed.run("-m", "bridge", "--version").stdout == f"mqtt-kafka-bridge {version}\n"
