"""The site files: the systemd unit, the example config and registry, the Mosquitto configs.

They live once, at the top of the checkout (`systemd/`, `examples/`, `mosquitto/`), where the
README and the tests name them. A wheel installs them as data files under
`<prefix>/share/mqtt-kafka-bridge/` (pyproject.toml, `[tool.setuptools.data-files]`). `path`
finds one in the checkout this package was imported from (`python -m bridge` in a checkout,
an editable install), else where the installed distribution put it: its RECORD names the
place for any scheme (a venv, `--user`, `--prefix`); `pip install --target` writes a RECORD
that points outside the target, so beside the package comes next.
"""

from __future__ import annotations

import functools
import importlib.metadata
import shutil
import sys
from pathlib import Path

DISTRIBUTION = "mqtt-kafka-bridge"
SHARE = ("share", DISTRIBUTION)
# What `init-site` writes: what an operator installs (local.conf and tls.conf are templates
# for `dev` and the tests).
OPERATOR_FILES = ("systemd/mqtt-kafka-bridge.service", "examples/bridge.toml",
                  "examples/devices.toml", "mosquitto/production.conf", "mosquitto/acl",
                  "mosquitto/README.md")

_PACKAGE = Path(__file__).resolve().parent


class SiteFileMissing(Exception):
    """A site file is in neither a checkout nor the installed share dir."""


def path(name: str) -> Path:
    """The site file `name` ("mosquitto/local.conf"), which exists."""
    found = root() / name
    if not found.is_file():
        raise SiteFileMissing(f"{name} is not installed (looked in {root()}): reinstall "
                              f"{DISTRIBUTION}, or run it from its checkout")
    return found


def root() -> Path:
    """Where the site files are: the checkout, else the installed share dir (else where a
    prefix install would have put it, so that a missing file names the place looked in)."""
    return checkout() or _installed() or Path(sys.prefix).joinpath(*SHARE)


def checkout() -> Path | None:
    """The checkout this package runs from, if it does."""
    top = _PACKAGE.parent
    if (top / "pyproject.toml").is_file() and all(
            (top / folder).is_dir() for folder in ("systemd", "examples", "mosquitto")):
        return top
    return None


@functools.cache
def _installed() -> Path | None:
    candidates = [_PACKAGE.parent.joinpath(*SHARE)]  # pip install --target
    recorded = _recorded()
    if recorded is not None:
        candidates.insert(0, recorded)
    return next((c for c in candidates if c.is_dir()), None)


def _recorded() -> Path | None:
    """The share dir that the RECORD of the distribution owning this package names."""
    dists = list(importlib.metadata.distributions(name=DISTRIBUTION))
    ours = [d for d in dists if Path(str(d.locate_file("bridge/__init__.py"))).resolve() ==
            _PACKAGE / "__init__.py"]
    for dist in ours or dists[:1]:
        for file in dist.files or ():
            parts = file.parts
            for i in range(len(parts) - 1):
                if parts[i:i + 2] == SHARE:
                    return Path(str(dist.locate_file(Path(*parts[:i + 2])))).resolve()
    return None


def program(relative: bool = False) -> str:
    """How to run this install's command: its console script beside the interpreter (with
    `relative`, relative to the current directory when under it, as in
    `.venv/bin/mqtt-kafka-bridge`), else the one on PATH, else `python -m bridge`."""
    script = Path(sys.executable).parent / DISTRIBUTION  # unresolved: the venv's bin
    if not script.is_file():
        return shutil.which(DISTRIBUTION) or f"{sys.executable} -m bridge"
    if relative and script.is_relative_to(Path.cwd()):
        return str(script.relative_to(Path.cwd()))
    return str(script)
