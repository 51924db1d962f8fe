"""Payload formats a route may require. Adding one is adding one function to FORMATS.

A check gets the payload and raises ValueError with a reason when it does not parse; the
message then goes to the dead-letter topic with code `bad_payload`. `raw` checks nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

import msgpack

INLINE_CHECK_MAX = 64 * 1024  # larger payloads are checked off the event loop


class Format(NamedTuple):
    content_type: str  # recorded in every envelope of the route
    check: Callable[[bytes], object] | None
    check_streaming: Callable[[bytes], object] | None = None


def _msgpack(payload: bytes) -> object:
    try:
        return msgpack.unpackb(payload)
    except (msgpack.UnpackException, ValueError) as exc:  # ExtraData is a ValueError
        raise ValueError(str(exc)) from exc


FORMATS: dict[str, Format] = {
    "raw": Format("application/octet-stream", None),
    "json": Format("application/json", json.loads, json.loads),
    "msgpack": Format("application/msgpack", _msgpack, _msgpack),
}
