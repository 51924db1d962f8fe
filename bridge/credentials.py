"""Secrets in the config: environment references, systemd credentials, files to be read.

Under systemd, secrets reach the bridge two ways (README "Secrets"):

- `LoadCredential=ID:PATH` copies a file the service user may not read into
  `$CREDENTIALS_DIRECTORY`, readable by that user alone; a file-path key names it as
  `"${CREDENTIALS_DIRECTORY}/ID"`.
- `EnvironmentFile=` sets variables; a string in `[kafka]` or `[lanes.NAME]` names one as
  `"${NAME}"`. `$$` is a literal `$`; any other `$` is itself, so a value written in the
  file before references existed keeps its meaning unless it holds `${` or `$$`.

Every file a secret may live in is opened at load, as the user that will run: a file the
service user cannot read is a config error naming its key, never a reconnect loop later.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from collections.abc import Mapping

CREDENTIALS = "CREDENTIALS_DIRECTORY"
SEE = "see README 'Secrets'"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE = re.compile(rf"\$(?:\{{({_NAME})\}}|\{{|\$)")  # ${NAME}, a bad ${, or $$
_CREDENTIAL_PATH = re.compile(rf"\$(?:\{{{CREDENTIALS}\}}|{CREDENTIALS}(?![A-Za-z0-9_]))")
_SHOWN_MIN = 3  # an expanded value shorter than this is not worth hiding in problem texts


class Environment:
    """Expands references against one environment, and remembers what came from it so no
    problem text shows a value that may be a secret."""

    def __init__(self, environ: Mapping[str, str], hostname: str = "") -> None:
        self._environ, self.hostname = environ, hostname
        self._expanded: dict[str, str] = {}  # value: the reference it came from

    def expand(self, text: str) -> str:
        """`text` with each `${NAME}` replaced from the environment and `$$` by `$`; any
        other `$` is itself. ValueError for an unset name, or a `${` that opens no name
        (said without the text, which may be a secret written in the file)."""
        def replace(found: re.Match[str]) -> str:
            name, reference = found.group(1), found.group(0)
            if reference == "$$":
                return "$"
            if name is None:
                raise ValueError(f"the '${{' at character {found.start() + 1} opens no "
                                 "${NAME}: write $${ for a literal ${")
            return self._value(name, reference)
        return _REFERENCE.sub(replace, text)

    @property
    def credentials(self) -> str | None:
        """$CREDENTIALS_DIRECTORY: where systemd put the unit's LoadCredential= files."""
        return self._environ.get(CREDENTIALS)

    def path(self, text: str) -> str:
        """A file-path key: a leading `${CREDENTIALS_DIRECTORY}` is expanded, the rest is
        taken as written."""
        found = _CREDENTIAL_PATH.match(text)
        if found is None:
            return text
        return self._value(CREDENTIALS, found.group(0)) + text[found.end():]

    def scrub(self, problem: str) -> str:
        """A problem text with every value that came from the environment shown as the
        reference that gave it."""
        for value in sorted(self._expanded, key=len, reverse=True):
            problem = problem.replace(value, self._expanded[value])
        return problem

    def _value(self, name: str, reference: str) -> str:
        value = self._environ.get(name)
        if value is None:
            raise ValueError(_unset(name))
        if len(value) >= _SHOWN_MIN and name != CREDENTIALS:  # a folder's name is no secret
            self._expanded.setdefault(value, reference)
        return value


def _unset(name: str) -> str:
    if name == CREDENTIALS:
        return (f"${CREDENTIALS} is not set: run the bridge under systemd with "
                f"LoadCredential= ({SEE}), or give a plain path")
    return (f"${{{name}}} is not set in the environment: set it (under systemd, in the "
            f"unit's EnvironmentFile=, {SEE}), or write $$ for a literal $")


def unreadable(path: str, directory: bool = False, credentials: str | None = None) -> str | None:
    """Why this process cannot read the file at `path`, with what to do; None if it can.
    `directory`: a directory that can be listed will do too (a CA directory). `credentials`
    is $CREDENTIALS_DIRECTORY, to say which LoadCredential= a missing file there needs."""
    try:
        mode = os.stat(path).st_mode
        if directory and stat.S_ISDIR(mode):
            os.listdir(path)
            return None
        if stat.S_ISDIR(mode):
            return f"cannot read {path!r}: Is a directory"
        if not stat.S_ISREG(mode):  # a FIFO would block the open
            return f"cannot read {path!r}: not a regular file"
        with open(path, "rb") as file:
            file.read(1)
    except FileNotFoundError:
        return _missing(path, credentials)
    except PermissionError:
        return (f"cannot read {path!r}: permission denied: the service user ({_user()}) "
                f"cannot read it: hand it over with LoadCredential=, {SEE}")
    except (OSError, ValueError) as exc:  # ValueError: a path with U+0000 in it
        return f"cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}"
    return None


def _missing(path: str, folder: str | None) -> str:
    if folder and os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder):
        name = os.path.basename(path)
        return (f"no credential {name!r} in ${CREDENTIALS} ({folder}): add "
                f"LoadCredential={name}:/etc/mqtt-kafka-bridge/{name} to the unit ({SEE})")
    return f"file {path!r} does not exist: correct the path, or put the file there"


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"
