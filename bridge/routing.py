"""Topic maps: route filters with `{name}` placeholders, and the Kafka key each route uses.

A filter such as `devices/{device_id}/telemetry` is subscribed as `devices/+/telemetry` and
binds the placeholder to the topic level it matched. The first route that matches wins (per
lane: each lane routes its own); `RouteFilter.covers` finds routes that could never win.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from bridge.errors import Rejected

if TYPE_CHECKING:
    from bridge.config import Route

# Used with fullmatch: `$` would let a final newline by.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Device ids end up in Kafka keys, headers, S3 object names and Mosquitto usernames: letters,
# digits and `._-` only (never `/`, `+`, `#`, `:`, `@` or a space), at most 128, and not `.`
# or `..`.
DEVICE_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]{1,128}")

# What each key strategy gives consumers, see README "Keys".
KEY_STRATEGIES = ("arrival_millis", "device_id", "time_bucket", "hash_bucket", "none")


class FilterError(ValueError):
    """A route filter that cannot be subscribed or matched."""


@dataclass(frozen=True, slots=True)
class RouteFilter:
    """One parsed route filter: literal levels, named one-level placeholders, a final `#`."""

    pattern: str
    levels: tuple[str | None, ...]  # a literal level, or None where a placeholder/+ binds
    names: tuple[str | None, ...]  # the placeholder name per level (None for literals and +)
    multi: bool  # ends with '#'

    @classmethod
    def parse(cls, pattern: str) -> RouteFilter:
        if not pattern or pattern.startswith("$"):
            raise FilterError("must be a non-empty MQTT topic filter not starting with '$'")
        if _CONTROL.search(pattern) or len(pattern.encode()) > 65535:
            raise FilterError("must be at most 65535 bytes without control characters: the "
                              "broker refuses such a SUBSCRIBE")
        parts = pattern.split("/")
        multi = parts[-1] == "#"
        if multi:
            parts = parts[:-1]
        levels: list[str | None] = []
        names: list[str | None] = []
        for part in parts:
            placeholder = _PLACEHOLDER.fullmatch(part)
            if placeholder:
                if placeholder[1] in names:
                    raise FilterError(f"placeholder {part} appears twice")
                levels.append(None)
                names.append(placeholder[1])
            elif part == "+":
                levels.append(None)
                names.append(None)
            elif any(c in part for c in "+#{}"):
                raise FilterError(f"level {part!r}: '+', '#' and '{{name}}' must fill a whole "
                                  "level, and '#' may only come last")
            else:
                levels.append(part)
                names.append(None)
        if "device_id" not in names:
            raise FilterError("needs a {device_id} placeholder: envelopes name their device")
        return cls(pattern, tuple(levels), tuple(names), multi)

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n)

    @property
    def subscription(self) -> str:
        """The MQTT filter the bridge subscribes to for this route."""
        levels = ["+" if lv is None else lv for lv in self.levels]
        return "/".join([*levels, "#"] if self.multi else levels)

    def covers(self, other: RouteFilter) -> bool:
        """True if this filter matches every topic `other` matches: placed before it in a
        lane, where the first matching route wins, it leaves `other` nothing. A `+` or a
        placeholder covers any level, a literal only itself; a final `#` covers any rest
        (the level it stands on included, as in MQTT)."""
        if self.multi:
            if len(other.levels) < len(self.levels):
                return False
        elif other.multi or len(other.levels) != len(self.levels):
            return False
        return all(mine is None or mine == theirs
                   for mine, theirs in zip(self.levels, other.levels, strict=False))

    def match(self, topic: str) -> dict[str, str] | None:
        """The placeholder bindings if `topic` matches, else None."""
        parts = topic.split("/")
        count = len(self.levels)
        if len(parts) < count or (not self.multi and len(parts) != count):
            return None
        bound: dict[str, str] = {}
        for part, literal, name in zip(parts, self.levels, self.names, strict=False):
            if literal is not None:
                if part != literal:
                    return None
            elif name:
                bound[name] = part
        return bound


def kafka_topic_problem(name: str) -> str | None:
    """Why `name` is not a legal Kafka topic name, or None."""
    if _KAFKA_TOPIC.fullmatch(name) and name not in {".", ".."}:
        return None
    return f"{name!r} is not a valid Kafka topic name (1-249 of [A-Za-z0-9._-])"


def template_problem(template: str) -> str | None:
    """Why a topic template can never give a legal topic: its literal parts are checked with
    each placeholder standing for one legal character."""
    return kafka_topic_problem(_TEMPLATE_FIELD.sub("x", template))


def template_fields(template: str) -> list[str]:
    """The `{name}` placeholders a Kafka topic template uses."""
    return _TEMPLATE_FIELD.findall(template)


def render_topic(template: str, bindings: dict[str, str], device_id: str = "") -> str:
    """The Kafka topic for one message; Rejected when the result breaks Kafka's rules, so a
    strange topic level never becomes a surprising topic."""
    if "{" not in template:
        return template
    topic = _TEMPLATE_FIELD.sub(lambda m: bindings[m[1]], template)
    problem = kafka_topic_problem(topic)
    if problem:
        raise Rejected("invalid_topic", f"topic template {template!r} gives {problem}",
                       device_id)
    return topic


class Match(NamedTuple):
    route: Route
    device_id: str
    bindings: dict[str, str]
    kafka_topic: str


class Router:
    """The first route whose filter matches a topic, what it binds, and where it goes."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def match(self, topic: str) -> Match:
        for route in self.routes:
            bound = route.filter.match(topic)
            if bound is not None:
                device_id = checked_device_id(bound["device_id"])
                return Match(route, device_id, bound,
                             render_topic(route.kafka_topic, bound, device_id))
        raise Rejected("no_route", f"no route matches topic {topic!r}")

    def takes(self, topic: str) -> bool:
        """True if some route's filter matches the topic (whatever its device id)."""
        return any(route.filter.match(topic) is not None for route in self.routes)

    def subscriptions(self) -> list[str]:
        """The distinct MQTT filters to subscribe, in route order."""
        return list(dict.fromkeys(r.filter.subscription for r in self.routes))


def checked_device_id(device_id: str) -> str:
    """A device id safe to use in keys, headers and object names, or Rejected."""
    if not device_id:
        raise Rejected("no_device_id", "the {device_id} topic level is empty")
    if DEVICE_ID.fullmatch(device_id) is None:
        raise Rejected("invalid_device_id", "a device id is 1-128 letters, digits, '.', '_' "
                       f"or '-' (and not '.' or '..'), got {device_id[:160]!r}")
    return device_id


@dataclass(frozen=True, slots=True)
class KeySpec:
    """How a route keys its records, i.e. which records share a partition.

    - arrival_millis: the arrival time; a herd spreads over every partition, no order.
    - device_id: one device per key; its messages keep their order.
    - time_bucket: device id and the start of its `window`-second window
      (`dev-1@1700000040`); a consumer aggregating per device and window finds the whole
      group in one partition, and no key grows hot for longer than one window.
    - hash_bucket: the device id hashed into `buckets` groups (`"0"` .. `"N-1"`), stable
      across restarts and bridges; bounded groups for consumers that claim buckets.
    - none: no key; the producer's partitioner spreads records.
    """

    strategy: str = "arrival_millis"
    window: int = 60
    buckets: int = 16

    def per_device(self) -> bool:
        """True when the key depends on the device alone, so it can be computed once."""
        return self.strategy in {"device_id", "hash_bucket", "none"}

    def key(self, device_id: str, arrival_millis: int) -> bytes | None:
        strategy = self.strategy
        if strategy == "arrival_millis":
            return str(arrival_millis).encode()
        if strategy == "device_id":
            return device_id.encode()
        if strategy == "time_bucket":
            start = arrival_millis // 1000 // self.window * self.window
            return f"{device_id}@{start}".encode()
        if strategy == "hash_bucket":
            digest = hashlib.sha256(device_id.encode()).digest()
            return str(int.from_bytes(digest[:8], "big") % self.buckets).encode()
        return None

