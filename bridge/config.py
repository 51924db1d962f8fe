"""The TOML config, loaded into one typed model and checked before anything runs.

Every problem is collected with its key path (`brokers[0].url: ...`) so an operator fixes
the whole file in one pass. Unknown keys are errors: a typo must not silently fall back to a
default.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from bridge import kafka as kafka_adapter
from bridge.auth import AUTH_MODES, STATUSES, Device, Registry
from bridge.credentials import Environment, unreadable
from bridge.errors import ConfigError
from bridge.formats import FORMATS
from bridge.properties import DEFAULT_PREFIX, MAX_BYTES, MAX_COUNT, RESERVED, Limits
from bridge.routing import (
    DEVICE_ID,
    KEY_STRATEGIES,
    FilterError,
    KeySpec,
    RouteFilter,
    kafka_topic_problem,
    template_fields,
    template_problem,
)
from bridge.sparkplug import MESSAGE_TYPES

_REQUIRED: Any = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # a TOML key that needs no quotes
_REGION = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")  # what botocore accepts
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")  # {hostname} in an identity
CLIENT_ID = re.compile(r"[0-9A-Za-z._-]{1,64}")  # fullmatch: `$` lets a final newline by
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Owned(NamedTuple):
    """A producer property the at-least-once promise depends on. The bridge sets `value`
    itself (None: the property stays unset); a config may only repeat one of `allowed`."""

    value: Any
    allowed: tuple[Any, ...]
    why: str


_ACKED = "MQTT is acked only after Kafka has the record with acks=all and idempotence"
_CALLBACK = ("the Python client takes a callable here, which a config cannot give, and the "
             "bridge's own callbacks must stay: delivery reports ack MQTT, error_cb replaces "
             "a failed producer")
# confluent-kafka's callback properties (its docs, "Configuration"; logger is the one for
# log_cb), and librdkafka's delivery-report callbacks.
_CALLBACKS = ("error_cb", "throttle_cb", "stats_cb", "oauth_cb", "logger", "log_cb",
              "on_delivery", "on_commit", "dr_cb", "dr_msg_cb")
_OWNED_KAFKA: dict[str, _Owned] = {
    "acks": _Owned("all", ("all", -1), _ACKED),
    "request.required.acks": _Owned(None, ("all", -1), _ACKED),  # librdkafka's name for acks
    "enable.idempotence": _Owned(True, (True,), _ACKED),
    "delivery.report.only.error": _Owned(None, (False,), (
        "MQTT is acked from each successful delivery report: with only errors reported, "
        "nothing would ever be acked")),
    "transactional.id": _Owned(None, (), (
        "the bridge runs no transactions, and a transactional producer refuses every "
        "record sent outside one")),
    "default.topic.config": _Owned(None, (), (
        "takes a table of topic properties that would escape these checks: write them into "
        "this table instead")),
    **{name: _Owned(None, (), _CALLBACK) for name in _CALLBACKS},
}
_BRIDGE_SETS = {name: owned.value for name, owned in _OWNED_KAFKA.items()
                if owned.value is not None}
RECORD_MAX_DEFAULT = 1_000_000  # librdkafka's message.max.bytes
# Producer defaults, lowest first: the bridge's, then each lane's; the user's [kafka] table
# goes over them and [lanes.NAME] over that. Every lane has a bounded local queue
# (invariant 3); fast lingers 2 ms (with 0, librdkafka sends one ProduceRequest per record:
# measured 1.4x the bridge's CPU per record and 2x Kafka's, and a loaded 2-core machine fell
# behind at 2,000 msg/s; README, Lanes), bulk batches (compression is the operator's choice,
# in [lanes.bulk]), fat carries references to S3 objects.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "queue.buffering.max.kbytes": 65536,
    "queue.buffering.max.messages": 100000,
}
LANE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fast": {"linger.ms": 2},
    "bulk": {"linger.ms": 5},
    "fat": {"linger.ms": 5},
}
LANES = tuple(LANE_DEFAULTS)
MQTT_MAX_PACKET_SIZE = 268435455  # the protocol's limit: 256 MiB


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    instance: str  # recorded in every envelope; the host name unless the config names it
    shutdown_timeout: float = 30.0
    log_format: str = "auto"
    stats_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str
    client_id: str
    host: str
    port: int
    tls: bool
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    receive_max: int = 1000
    subscribe_qos: int = 2
    share_group: str | None = None
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    # What the bridge accepts from the broker. A broker drops a larger PUBLISH for this
    # subscriber silently after acking the device, so it must be at least the broker's own
    # limit for devices: the default is MQTT's maximum.
    max_packet_size: int = MQTT_MAX_PACKET_SIZE
    # Where each session says whether it is connected (retained, with a will that says
    # offline), so `adopt` can tell a live member from a gone one; "" turns it off.
    presence_prefix: str = "mqtt-kafka-bridge/sessions"

    @property
    def name(self) -> str:
        """How logs, metrics and envelopes name this broker."""
        return f"{self.host}:{self.port}"

    def for_lane(self, lane: str) -> BrokerConfig:
        """The session of one lane: each lane has its own, so a backed-up lane's unsent acks
        never hold up another's. Bulk keeps the client id; others add `-LANE`."""
        return self if lane == "bulk" else replace(self, client_id=f"{self.client_id}-{lane}")

    @property
    def presence_topic(self) -> str | None:
        """This session's retained presence topic, or None when presence is off."""
        return f"{self.presence_prefix}/{self.client_id}" if self.presence_prefix else None


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    inline_max_bytes: int = 262144  # larger payloads go to S3; Kafka gets a reference
    object_prefix: str = "payloads/"  # claim-check objects: PREFIX{device_id}/{sha256}
    staging_expiry_days: int = 7  # lifecycle: file-transfer staging and unfinished uploads
    apply_lifecycle: bool = False  # also at start-up, not only with `s3-setup`
    concurrency: int = 8  # S3 jobs at once per lane (offloads, segments, assemblies)
    max_pending_bytes: int = 128 * 2**20  # payload bytes one lane's jobs hold at once


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """`[http]`: where /metrics, /healthz and /readyz are served (README, "Watching it")."""

    host: str
    port: int

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def http_listen(value: str) -> HttpConfig:
    """`HOST:PORT` (`[v6]:PORT` for IPv6; `0.0.0.0` for every interface), or ValueError."""
    example = "127.0.0.1:9108"
    if "/" in value or "@" in value:
        raise ValueError(f"must be HOST:PORT, e.g. {example}")
    found = endpoint(f"http://{value}", {"http": 0}, example)
    if found.port == 0:
        raise ValueError(f"needs a port, e.g. {example}")
    return HttpConfig(found.host, found.port)


@dataclass(frozen=True, slots=True)
class FileTransferConfig:
    """File transfer over MQTT (docs/file-transfer.md): reassembled into S3, fat lane."""

    filter: RouteFilter  # `PREFIX/{device_id}/files/{file_id}/#`
    kafka_topic: str
    auth: str = "none"
    max_file_bytes: int = 1 << 30
    max_segment_bytes: int = 1 << 20
    max_transfers_per_device: int = 4
    expiry_seconds: float = 86400.0
    fin_grace_seconds: float = 10.0
    max_segments_per_file: int = 10000
    respond: bool = False  # publish each fin's result to the device (bridge/results.py)


@dataclass(frozen=True, slots=True)
class SparkplugConfig:
    """`[sparkplug]`: Sparkplug B edge nodes (README, "Sparkplug B"); see bridge/sparkplug.py."""

    kafka_topic: str  # may hold {message_type}: nbirth, ndata, ... (lower case)
    group_id: str = "+"  # which groups: one group id, or + for all
    lane: str = "bulk"
    key: str = "edge_node"  # group/edge_node; "device": group/edge_node[/device]
    max_payload_bytes: int = 1 << 20
    max_metrics: int = 10_000
    max_nodes: int = 10_000
    max_aliases_per_node: int = 10_000
    max_state_bytes: int = 64 * 2**20
    rebirth: bool = True  # ask edge nodes for a rebirth (NCMD) when the tables cannot help
    rebirth_interval: float = 5.0
    host_id: str = ""  # announce a Sparkplug 3.0 host application (spBv1.0/STATE/ID); "" off

    def kafka_topics(self) -> list[str]:
        return sorted({self.kafka_topic.replace("{message_type}", t.lower())
                       for t in MESSAGE_TYPES})


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    filter: RouteFilter
    kafka_topic: str
    key: KeySpec = field(default_factory=KeySpec)
    format: str = "raw"
    lane: str = "bulk"
    auth: str = "none"
    inline_max_bytes: int | None = None  # overrides [s3].inline_max_bytes
    truncate_bytes: int | None = None  # keep only this head of each body, flagged `truncated`
    format_max_bytes: int = 2**20  # json/msgpack routes check payloads up to this size
    create_topics: bool = False  # a template may give a topic the cluster does not have yet
    properties: Limits = field(default_factory=Limits)  # user properties copied to headers


@dataclass(frozen=True, slots=True)
class Config:
    bridge: BridgeSettings
    brokers: tuple[BrokerConfig, ...]
    kafka: dict[str, Any] = field(repr=False)  # values may be secrets from the environment
    dead_letter_topic: str
    routes: tuple[Route, ...]
    s3: S3Config | None = None
    lanes: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # [lanes.NAME]
    file_transfer: FileTransferConfig | None = None
    registry: Registry = field(default_factory=Registry)
    version: str = field(default="")
    http: HttpConfig | None = None
    tracing_spans: bool = False  # [tracing] spans: the bridge's own span per message
    sparkplug: SparkplugConfig | None = None

    def fixed_topics(self) -> list[str]:
        """The Kafka topics known before any message: the dead-letter topic and every route
        topic that is not a template."""
        files = {self.file_transfer.kafka_topic} if self.file_transfer else set()
        if self.sparkplug is not None:
            files |= set(self.sparkplug.kafka_topics())
        return sorted({r.kafka_topic for r in self.routes if "{" not in r.kafka_topic}
                      | {self.dead_letter_topic} | files)

    def session_lanes(self) -> list[str]:
        """Lanes that subscribe something, in LANES order: each has a session per broker.
        File transfers ride the fat lane."""
        return [lane for lane in LANES if any(r.lane == lane for r in self.routes)
                or (lane == "fat" and self.file_transfer is not None)
                or (self.sparkplug is not None and self.sparkplug.lane == lane)]

    def producer_lanes(self) -> list[str]:
        """Lanes that produce: those with sessions, and fat wherever S3 references go."""
        return [lane for lane in LANES
                if lane in self.session_lanes() or (lane == "fat" and self.s3 is not None)]

    def producer_config(self, lane: str = "bulk") -> dict[str, Any]:
        """librdkafka properties of one lane: defaults, [kafka], [lanes.NAME], then the ones
        at-least-once needs."""
        return producer_config(self.kafka, self.lanes.get(lane, {}), lane)

    def record_max(self, lane: str) -> int:
        """The largest record the lane's producer sends (message.max.bytes)."""
        return record_max(self.producer_config(lane))


def producer_config(kafka: dict[str, Any], lane_properties: dict[str, Any],
                    lane: str) -> dict[str, Any]:
    return {**PRODUCER_DEFAULTS, **LANE_DEFAULTS[lane], **kafka, **lane_properties,
            **_BRIDGE_SETS}


def record_max(properties: dict[str, Any]) -> int:
    """message.max.bytes of checked producer properties (an integer, or its digits)."""
    return int(str(properties.get("message.max.bytes", RECORD_MAX_DEFAULT)))


class _Table:
    """Reads one TOML table, recording problems under its key path instead of raising."""

    def __init__(self, data: Any, path: str, problems: list[str], quoted: bool = False) -> None:
        self.path, self.problems = path, problems
        self.quoted = quoted  # name every key in quotes, as librdkafka properties are written
        if not isinstance(data, dict):
            self.fail("", "must be a table")
            data = {}
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        if self.quoted or not _BARE_KEY.fullmatch(name):
            name = json.dumps(name, ensure_ascii=False)
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, reason: str) -> None:
        where = self.key(name) if name else self.path
        self.problems.append(f"{where}: {reason}")

    def get(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any = _REQUIRED,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """The value, or the default (None if required) when it is missing, of another type
        or refused by `check`; a check that parses may raise ValueError to say why."""
        self.seen.add(name)
        fallback = None if default is _REQUIRED else default
        if name not in self.data:
            if default is _REQUIRED:
                self.fail(name, "missing")
            return fallback
        value = self.data[name]
        try:
            problem = _type_problem(value, kind) or (check(value) if check else None)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            self.fail(name, problem)
            return fallback
        return value

    def finish(self) -> None:
        for name in sorted(set(self.data) - self.seen):
            self.fail(name, "unknown key")


def _type_problem(value: Any, kind: type | tuple[type, ...]) -> str | None:
    if (isinstance(value, bool) and bool not in _as_tuple(kind)) or not isinstance(value, kind):
        return f"must be {_kind_name(kind)}, got {type(value).__name__}"
    if isinstance(value, int) and not -2**63 <= value < 2**63:  # tomllib reads any size
        return "must fit in 64 bits, as TOML integers do"
    return None


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


def _parses(parse: Callable[[str], object]) -> Callable[[str], str | None]:
    """A check passed by every value `parse` takes; its ValueError says why not."""
    def check(value: str) -> str | None:
        parse(value)
        return None
    return check


def _secret_file(t: _Table, name: str, env: Environment,
                 check: Callable[[str], str | None] | None = None,
                 base: Path | None = None) -> str | None:
    """A file-path key that may name a secret: a leading ${CREDENTIALS_DIRECTORY} is
    expanded, and the file is opened now, as the user that will use it: one it cannot read
    is refused here, with what to do, rather than failing at every connect. A relative
    path is read from `base` when given."""
    value: str | None = t.get(name, str, None)
    if value is None:
        return None
    try:
        path = env.path(value)
    except ValueError as exc:
        t.fail(name, str(exc))
        return value
    where = str(base / path) if base is not None else path
    problem = unreadable(where, credentials=env.credentials) or (check(where) if check else None)
    if problem:
        t.fail(name, problem)
    return path


def _password_size_problem(path: str) -> str | None:
    """MQTT takes at most 65535 bytes of password (each connect reads the file again)."""
    try:
        size = len(Path(path).read_bytes().rstrip(b"\r\n"))
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    return None if size <= 65535 else f"holds {size} bytes; MQTT takes at most 65535"


def _mqtt_text_problem(value: str) -> str | None:
    """An MQTT UTF-8 string the broker accepts: no U+0000 (nor other control characters,
    which are never meant), at most 65535 bytes."""
    if _CONTROL.search(value) or len(value.encode()) > 65535:
        return "must be at most 65535 bytes without control characters"
    return None


class Endpoint(NamedTuple):
    """Where a URL points: its scheme, host (no brackets) and port."""

    scheme: str
    host: str
    port: int


_HOST_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*\.?")


def endpoint(url: str, ports: dict[str, int], example: str, *, path: bool = False) -> Endpoint:
    """Scheme, host and port of a URL, or ValueError saying what is wrong. The scheme's port
    is used only when the URL gives none: port 0 is refused, never replaced."""
    if any(c in url for c in "\t\r\n "):  # urlsplit drops some of them silently
        raise ValueError(f"must not contain spaces or control characters, e.g. {example}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        raise ValueError(f"is not a valid url ({exc}), e.g. {example}") from None
    if parts.scheme not in ports:
        raise ValueError(f"scheme must be {' or '.join(ports)}, got {parts.scheme or 'none'!r}")
    host = parts.hostname
    if not host or not _is_host(host):
        raise ValueError(f"must name a host (a DNS name or an IP address), e.g. {example}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user or password")
    if not path and (parts.path or parts.query or parts.fragment):
        raise ValueError(f"must have no path, query or fragment, e.g. {example}")
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError(f"port must be between 1 and 65535, e.g. {example}")
    return Endpoint(parts.scheme, host, ports[parts.scheme] if port is None else port)


def mqtt_endpoint(url: str) -> Endpoint:
    """A broker's URL: mqtt:// (port 1883 unless given) or mqtts:// (TLS, 8883)."""
    return endpoint(url, {"mqtt": 1883, "mqtts": 8883}, "mqtt://127.0.0.1:1883")


def _is_host(host: str) -> bool:
    """An IP address, or a DNS name whose last label is not a number (`256.1.1.1` is
    neither)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        last = host.rstrip(".").rpartition(".")[2]
        return bool(_HOST_NAME.fullmatch(host)) and not last.isdigit()
    return True


def _s3_endpoint_problem(url: str) -> str | None:
    found = endpoint(url, {"http": 80, "https": 443}, "http://127.0.0.1:9000", path=True)
    return "has '_' in its host name, which botocore refuses" if "_" in found.host else None


def _broker(data: Any, path: str, problems: list[str], env: Environment) -> BrokerConfig | None:
    t = _Table(data, path, problems)
    url = t.get("url", str, check=_parses(mqtt_endpoint))
    client_id = t.get("client_id", str, check=lambda v: _client_id_problem(v, render(v, env)))
    if client_id is not None:
        client_id = render(client_id, env)
    options = {
        "username": t.get("username", str, None, _mqtt_text_problem),
        "password_file": _secret_file(t, "password_file", env, _password_size_problem),
        "ca_file": _secret_file(t, "ca_file", env),
        "cert_file": _secret_file(t, "cert_file", env),
        "key_file": _secret_file(t, "key_file", env),
        "keepalive": t.get("keepalive", int, 30, _between(5, 65535)),
        "session_expiry": t.get("session_expiry", int, 7 * 24 * 3600, _between(1, 2**32 - 1)),
        "receive_max": t.get("receive_max", int, 1000, _between(1, 65535)),
        "subscribe_qos": t.get("subscribe_qos", int, 2, _between(0, 2)),
        "share_group": t.get("share_group", str, None, lambda v: None if re.fullmatch(
            r"[^/+#]+", v) and not _mqtt_text_problem(v) else
            "must be non-empty without '/', '+', '#' or control characters"),
        "reconnect_min": float(t.get("reconnect_min", (int, float), 0.5, _between(0.01, 3600))),
        "reconnect_max": float(t.get("reconnect_max", (int, float), 30.0, _between(0.01, 3600))),
        "max_packet_size": t.get("max_packet_size", int, MQTT_MAX_PACKET_SIZE,
                                 _between(4096, MQTT_MAX_PACKET_SIZE)),
        "presence_prefix": t.get("presence_prefix", str, "mqtt-kafka-bridge/sessions",
                                 _presence_prefix_problem),
    }
    t.finish()
    if options["password_file"] and not options["username"]:
        t.fail("password_file", "requires username")
    if options["reconnect_min"] > options["reconnect_max"]:
        t.fail("reconnect_min", f"must not exceed reconnect_max ({options['reconnect_max']:g})")
    if bool(options["cert_file"]) != bool(options["key_file"]):
        t.fail("cert_file", "cert_file and key_file must be given together")
    if url is None:
        return None
    scheme, host, port = mqtt_endpoint(url)
    tls = scheme == "mqtts"
    if not tls and any(options[k] for k in ("ca_file", "cert_file", "key_file")):
        t.fail("url", "ca_file, cert_file and key_file need an mqtts:// url")
    if tls:
        _check_tls(t, options)
    if client_id is None:
        return None
    return BrokerConfig(url=url, client_id=client_id, host=host, port=port, tls=tls, **options)


def render(text: str, env: Environment) -> str:
    """An identity (`client_id`, `instance`) as this process uses it: `{hostname}` is the
    host's name (a StatefulSet pod's name), `${NAME}` an environment variable (e.g. the pod
    name from the downward API), so N replicas of one config get distinct, stable sessions.
    ValueError names a placeholder it does not know."""
    def replace(found: re.Match[str]) -> str:
        if found.group(1) != "hostname":
            raise ValueError(f"unknown placeholder {found.group(0)}: only {{hostname}} and "
                             "${NAME} (an environment variable) are replaced")
        return env.hostname
    return _PLACEHOLDER.sub(replace, env.expand(text))


def _presence_prefix_problem(prefix: str) -> str | None:
    if not prefix or (re.fullmatch(r"[^+#$/][^+#]*", prefix) and not prefix.endswith("/")
                      and not _mqtt_text_problem(prefix)):
        return None
    return "must be \"\" (off) or a topic without '+', '#', a leading '$' or '/', or a " \
        "trailing '/'"


def _client_id_problem(written: str, rendered: str) -> str | None:
    if CLIENT_ID.fullmatch(rendered):
        return None
    return (f"renders as {rendered!r}: " if rendered and rendered != written else "") + \
        "must be 1-64 characters of [0-9A-Za-z._-] (a stable persistent-session id)"


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted; give the bridge an unencrypted key_file")


def tls_context(ca_file: str | None, cert_file: str | None = None,
                key_file: str | None = None) -> ssl.SSLContext:
    """The TLS context of one broker connection. An encrypted key fails (ValueError) rather
    than prompting for a passphrase on a terminal."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file and key_file:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    return context


def _check_tls(t: _Table, options: dict[str, Any]) -> None:
    """Load the CA and the client key pair now, as each connect will: a bad or mismatched
    file is a config error with its key path, not an endless reconnect loop."""
    files = [options[k] for k in ("ca_file", "cert_file", "key_file") if options[k]]
    if any(unreadable(f) for f in files):
        return  # already reported
    try:
        tls_context(options["ca_file"])
    except (ssl.SSLError, OSError) as exc:
        t.fail("ca_file", f"cannot load CA certificates: {exc}")
        return
    try:
        tls_context(options["ca_file"], options["cert_file"], options["key_file"])
    except (ssl.SSLError, OSError, ValueError) as exc:
        t.fail("key_file", f"cannot use cert_file and key_file: {exc}")


def _route(data: Any, path: str, index: int, problems: list[str]) -> Route | None:
    t = _Table(data, path, problems)
    pattern = t.get("filter", str)
    topic = t.get("kafka_topic", str, check=template_problem)
    key = t.get("key", str, "arrival_millis", lambda v: None if v in KEY_STRATEGIES else
                f"unknown strategy {v!r}, expected one of {', '.join(KEY_STRATEGIES)}")
    window = t.get("key_window", int, 60, _between(1, 86400 * 366))
    buckets = t.get("key_buckets", int, 16, _between(1, 1_000_000))
    for option, strategy in (("key_window", "time_bucket"), ("key_buckets", "hash_bucket")):
        if option in t.data and key != strategy:
            t.fail(option, f"only applies to key = {strategy!r}")
    payload_format = t.get("format", str, "raw", lambda v: None if v in FORMATS else
                           f"unknown format {v!r}, expected one of {', '.join(FORMATS)}")
    name = t.get("name", str, f"route-{index}", _route_name_problem)
    lane = t.get("lane", str, "bulk", lambda v: None if v in LANES else
                 f"unknown lane {v!r}, expected one of {', '.join(LANES)}")
    auth = t.get("auth", str, "none", lambda v: None if v in AUTH_MODES else
                 f"unknown auth {v!r}, expected one of {', '.join(AUTH_MODES)}")
    inline_max = t.get("inline_max_bytes", int, None, _between(0, 64 * 2**20))
    truncate = t.get("truncate_bytes", int, None, _between(0, 64 * 2**20))
    format_max = t.get("format_max_bytes", int, 2**20, _between(1, 256 * 2**20))
    create_topics = t.get("create_topics", bool, False)
    prefix = t.get("user_properties", (str, bool), DEFAULT_PREFIX, _user_properties_problem)
    max_count = t.get("user_properties_max_count", int, MAX_COUNT, _between(0, 1_000_000))
    max_bytes = t.get("user_properties_max_bytes", int, MAX_BYTES, _between(0, 64 * 2**20))
    t.finish()
    if "format_max_bytes" in t.data and payload_format == "raw":
        t.fail("format_max_bytes", "only applies to a checked format (json, msgpack)")
    if "create_topics" in t.data and topic is not None and not template_fields(topic):
        t.fail("create_topics", "only applies to a kafka_topic template with {placeholders}")
    if pattern is None:
        return None
    try:
        route_filter = RouteFilter.parse(pattern)
    except FilterError as exc:
        t.fail("filter", str(exc))
        return None
    unbound = [f for f in template_fields(topic or "") if f not in route_filter.placeholders]
    if unbound:
        t.fail("kafka_topic", f"placeholder {{{unbound[0]}}} is not bound by the filter")
    if topic is None or key is None:
        return None
    return Route(name=name, filter=route_filter, kafka_topic=topic,
                 key=KeySpec(key, window, buckets), format=payload_format, lane=lane,
                 auth=auth, inline_max_bytes=inline_max, truncate_bytes=truncate,
                 format_max_bytes=format_max, create_topics=create_topics,
                 properties=Limits(prefix or None, max_count, max_bytes))


def _user_properties_problem(value: str | bool) -> str | None:
    """A header prefix, or false. A prefix must not let a device's property name forge a
    header the bridge sets itself (`mqtt.` would let `topic` become `mqtt.topic`)."""
    if value is True:
        return "must be a header name prefix (default \"mqtt.user.\") or false"
    if value is False:
        return None
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return "must be 1 to 64 letters, digits, '.', '_' or '-', or false"
    forged = [name for name in RESERVED if name.startswith(value)]
    if forged:
        return f"a property could forge the bridge's header {forged[0]!r}: choose a " \
            "prefix no bridge header starts with, such as \"mqtt.user.\""
    return None


def _route_name_problem(name: str) -> str | None:
    """Envelopes name their route in lineage: it must tell routes apart."""
    if not name.strip():
        return "must not be empty"
    reserved = name == "file_transfer"  # files.ROUTE_NAME
    return "is the route name of file-transfer envelopes" if reserved else None


def _file_transfer(data: Any, problems: list[str]) -> FileTransferConfig | None:
    t = _Table(data, "file_transfer", problems)
    prefix = t.get("prefix", str, "devices/{device_id}/files")
    topic = t.get("kafka_topic", str, check=kafka_topic_problem)
    auth = t.get("auth", str, "none", lambda v: None if v in AUTH_MODES else
                 f"unknown auth {v!r}, expected one of {', '.join(AUTH_MODES)}")
    defaults = FileTransferConfig(RouteFilter.parse("x/{device_id}/#"), "")
    limits = {
        "max_file_bytes": t.get("max_file_bytes", int, defaults.max_file_bytes,
                                _between(0, 5 * 2**40)),
        "max_segment_bytes": t.get("max_segment_bytes", int, defaults.max_segment_bytes,
                                   _between(1, 64 * 2**20)),
        "max_transfers_per_device": t.get("max_transfers_per_device", int,
                                          defaults.max_transfers_per_device, _between(1, 1000)),
        "expiry_seconds": float(t.get("expiry_seconds", (int, float), defaults.expiry_seconds,
                                      _between(1, 366 * 86400))),
        "fin_grace_seconds": float(t.get("fin_grace_seconds", (int, float),
                                         defaults.fin_grace_seconds, _between(0, 600))),
        "max_segments_per_file": t.get("max_segments_per_file", int,
                                       defaults.max_segments_per_file, _between(1, 1_000_000)),
    }
    respond = t.get("respond", bool, False)
    t.finish()
    if prefix is None or topic is None:
        return None
    try:
        route_filter = RouteFilter.parse(f"{prefix.rstrip('/')}/{{file_id}}/#")
    except FilterError as exc:
        t.fail("prefix", str(exc))
        return None
    return FileTransferConfig(route_filter, topic, auth, **limits, respond=respond)


def _sparkplug(data: Any, problems: list[str]) -> SparkplugConfig | None:
    t = _Table(data, "sparkplug", problems)
    d = SparkplugConfig("")
    topic = t.get("kafka_topic", str, check=lambda v: template_problem(v) or (
        None if set(template_fields(v)) <= {"message_type"} else
        "may use {message_type} alone"))
    settings = SparkplugConfig(
        kafka_topic=topic or "",
        group_id=t.get("group_id", str, d.group_id, lambda v: None if v == "+" or (
            v and not set(v) & set("+#/") and _mqtt_text_problem(v) is None)
            else "must be + or one group id (no +, #, /)"),
        lane=t.get("lane", str, d.lane, lambda v: None if v in LANES else
                   f"unknown lane, expected one of {', '.join(LANES)}"),
        key=t.get("key", str, d.key, lambda v: None if v in ("edge_node", "device") else
                  "must be edge_node or device"),
        max_payload_bytes=t.get("max_payload_bytes", int, d.max_payload_bytes,
                                _between(1, 64 * 2**20)),
        max_metrics=t.get("max_metrics", int, d.max_metrics, _between(1, 1_000_000)),
        max_nodes=t.get("max_nodes", int, d.max_nodes, _between(1, 10_000_000)),
        max_aliases_per_node=t.get("max_aliases_per_node", int, d.max_aliases_per_node,
                                   _between(1, 10_000_000)),
        max_state_bytes=t.get("max_state_bytes", int, d.max_state_bytes,
                              _between(2**16, 64 * 2**30)),
        rebirth=t.get("rebirth", bool, d.rebirth),
        rebirth_interval=float(t.get("rebirth_interval", (int, float), d.rebirth_interval,
                                     _between(0.1, 3600))),
        host_id=t.get("host_id", str, d.host_id, lambda v: None if not v or (
            not set(v) & set("+#/") and _mqtt_text_problem(v) is None)
            else "must be a topic level (no +, #, /)"),
    )
    t.finish()
    return settings if topic is not None else None


def _kafka(data: Any, problems: list[str], env: Environment,
           path: str = "kafka") -> dict[str, Any]:
    """librdkafka properties of [kafka] or of one [lanes.NAME] table (path says which). The
    owned ones stay out: the bridge sets what they must be. Strings may name environment
    variables (`${NAME}`)."""
    t = _Table(data, path, problems, quoted=True)
    properties: dict[str, Any] = {}
    for name in list(t.data):
        value = t.get(name, (str, int, float, bool))
        try:
            if isinstance(value, str):
                value = env.expand(env.path(value) if name in _FILE_PROPERTIES else value)
            problem = None if value is None else (
                _property_problem(name, value) or _file_property_problem(name, value, env))
        except ValueError as exc:
            problem = str(exc)
        if problem:
            t.fail(name, problem)
        elif value is not None and name not in _OWNED_KAFKA:
            properties[name] = value
    if path == "kafka" and not {"bootstrap.servers", "metadata.broker.list"} & set(t.data):
        t.fail("bootstrap.servers", "missing")
    return properties


# librdkafka properties naming a file, which may hold a key or a password: opened at load,
# like the brokers' files. ssl.ca.location may name a directory, or be "probe".
_FILE_PROPERTIES = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location",
                    "ssl.keystore.location", "ssl.crl.location", "sasl.kerberos.keytab",
                    "sasl.oauthbearer.assertion.file",
                    "sasl.oauthbearer.assertion.private.key.file",
                    "sasl.oauthbearer.assertion.jwt.template.file")


def _file_property_problem(name: str, value: Any, env: Environment | None = None) -> str | None:
    if name not in _FILE_PROPERTIES or not isinstance(value, str) or (
            name == "ssl.ca.location" and value == "probe"):
        return None
    return unreadable(value, directory=name == "ssl.ca.location",
                      credentials=env.credentials if env else None)


def _property_problem(name: str, value: Any) -> str | None:
    """Why a config may not give a producer property this value, before librdkafka is asked:
    what it would misread, what the bridge owns, and what the bridge reads itself."""
    if "\x00" in name or "\x00" in str(value):
        return "must not contain U+0000: librdkafka would cut the text there"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number: librdkafka takes nan for one"
    owned = _OWNED_KAFKA.get(name)
    if owned is not None:
        return _owned_problem(owned, value)
    check = _PROPERTY_CHECKS.get(name)
    return check(value) if check else None


def _owned_problem(owned: _Owned, value: Any) -> str | None:
    if str(value).lower() in {str(allowed).lower() for allowed in owned.allowed}:
        return None
    if not owned.allowed:
        return f"not allowed: {owned.why}"
    first = owned.allowed[0]
    return f"must be {str(first).lower() if isinstance(first, bool) else repr(first)}: {owned.why}"


def _bootstrap_problem(value: Any) -> str | None:
    """librdkafka takes any text here, then retries it forever: check each [PROTO://]HOST:PORT
    (separated, as librdkafka reads them, by commas or spaces)."""
    servers = re.split(r"[,\s]+", value.strip()) if isinstance(value, str) else []
    if not any(servers):
        return 'must list the brokers, e.g. "kafka-1:9092,kafka-2:9092"'
    for server in filter(None, servers):
        try:
            endpoint(f"kafka://{server.rpartition('://')[2]}", {"kafka": 9092}, "kafka-1:9092")
        except ValueError as exc:
            return f"{server!r} {exc}"
    return None


def _bytes_problem(value: Any) -> str | None:
    if (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"\s*\+?[0-9]{1,18}\s*", value)):
        return None
    return "must be a whole number of bytes: the bridge sizes what it sends by it"


# Values librdkafka would take but the bridge cannot use.
_PROPERTY_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "bootstrap.servers": _bootstrap_problem,
    "metadata.broker.list": _bootstrap_problem,  # librdkafka's name for bootstrap.servers
    "message.max.bytes": _bytes_problem,
}


def _librdkafka_problems(kafka: dict[str, Any], lanes: dict[str, dict[str, Any]]) -> list[str]:
    """Build each lane's producer now, so librdkafka itself refuses unknown names and values
    it cannot take, each under the table that set the property; reported once when several
    lanes share it. Every lane, used or not: a reload may start using it."""
    problems: list[str] = []
    for lane in LANES:
        own = lanes.get(lane, {})
        properties = producer_config(kafka, own, lane)
        if any(_file_property_problem(k, v) for k, v in properties.items()):
            continue  # reported already; librdkafka would fail on the same file, less clearly
        suspects = [name for name in properties if name in own or name in kafka]
        for name, reason in kafka_adapter.refused_properties(properties, suspects):
            table = f"lanes.{lane}" if (name in own if name else bool(own)) else "kafka"
            problem = (f"{table}.{json.dumps(name, ensure_ascii=False)}: refused by librdkafka: "
                       f"{reason}" if name else
                       f"{table}: refused by librdkafka for lane {lane}: {reason}")
            if problem not in problems:
                problems.append(problem)
    return problems


def _lanes(data: Any, problems: list[str], env: Environment) -> dict[str, dict[str, Any]]:
    t = _Table(data, "lanes", problems)
    lanes = {}
    for name in list(t.data):
        if name not in LANES:
            t.seen.add(name)
            t.fail(name, f"unknown lane, expected one of {', '.join(LANES)}")
            continue
        lanes[name] = _kafka(t.get(name, dict, {}), problems, env, f"lanes.{name}")
    t.finish()
    return lanes


def _shadowed_routes(routes: list[Route | None],
                     file_transfer: FileTransferConfig | None) -> list[str]:
    """Routes that can never match: an earlier filter of their lane takes every topic they
    would (the first match wins in a lane; file transfers come first in the fat lane).
    Lanes apart do not meet: each has its own session."""
    problems = []
    for i, route in enumerate(routes):
        if route is None:
            continue
        earlier = [(f"routes[{j}] ({r.name})", r.filter) for j, r in enumerate(routes[:i])
                   if r is not None and r.lane == route.lane]
        if route.lane == "fat" and file_transfer is not None:
            earlier.insert(0, (f"file_transfer ({file_transfer.filter.pattern})",
                               file_transfer.filter))
        cover = next((name for name, f in earlier if f.covers(route.filter)), None)
        if cover is not None:
            problems.append(f"routes[{i}].filter: never matches: {cover} takes every topic it "
                            "would (same lane)")
    return problems


def _shadowed_by_sparkplug(routes: list[Route | None],
                           sparkplug: SparkplugConfig | None) -> list[str]:
    """Routes of the Sparkplug lane that only ever match what [sparkplug] takes first."""
    if sparkplug is None:
        return []
    taken = [RouteFilter.parse(f"spBv1.0/{sparkplug.group_id}/+/{{device_id}}{rest}")
             for rest in ("", "/+")]
    return [f"routes[{i}].filter: never matches: [sparkplug] takes every topic it would "
            "(same lane)" for i, route in enumerate(routes)
            if route is not None and route.lane == sparkplug.lane
            and any(f.covers(route.filter) for f in taken)]


ENVELOPE_ROOM = 65536  # what an envelope adds to an inline body: its fields and a long topic


def _inline_size_problems(routes: list[Route | None], s3: S3Config | None,
                          kafka: dict[str, Any], lanes: dict[str, dict[str, Any]]) -> list[str]:
    """Every body a route keeps inline (up to its truncate_bytes, else its inline_max_bytes,
    else [s3]'s) must fit, with its envelope, in a record of the route's lane: else every
    large one is dead-lettered as too large instead of bridged."""
    def fits(key: str, size: int, lane: str, used_by: str = "") -> str | None:
        limit = record_max(producer_config(kafka, lanes.get(lane, {}), lane))
        if size + ENVELOPE_ROOM <= limit:
            return None
        return (f"{key}: {size} bytes inline do not fit Kafka's message.max.bytes {limit} of "
                f"lane {lane}{used_by} (keep it at most message.max.bytes - {ENVELOPE_ROOM})")

    problems: list[str | None] = []
    by_s3: dict[str, Route] = {}  # lane: the first route [s3].inline_max_bytes bounds there
    for i, route in enumerate(routes):
        if route is None:
            continue
        own = [(key, size) for key, size in (("truncate_bytes", route.truncate_bytes),
                                             ("inline_max_bytes", route.inline_max_bytes))
               if size is not None]
        problems += [fits(f"routes[{i}].{key}", size, route.lane) for key, size in own]
        if not own:
            by_s3.setdefault(route.lane, route)
    if s3 is not None:
        problems += [fits("s3.inline_max_bytes", s3.inline_max_bytes, lane,
                          f", used by route {route.name!r}")
                     for lane, route in by_s3.items()]
    return [problem for problem in problems if problem]


def load_registry(path: str | Path) -> tuple[Registry, bytes]:
    """Read and check a device registry file; its bytes go into the map version.

    ```toml
    [devices."sensor-0001"]
    hmac_key = "9f86d081884c7d659a2feaa0c55ad015"   # hex, 16-64 bytes; for auth = "hmac"
    [devices."sensor-0002"]
    status = "revoked"                              # active (default), disabled or revoked
    ```
    """
    data, raw = read_toml(path)
    problems: list[str] = []
    top = _Table(data, "", problems)
    entries = top.get("devices", dict, {})
    top.finish()
    devices: dict[str, Device] = {}
    for device_id, entry in entries.items():
        t = _Table(entry, f"devices.{device_id}", problems)
        if DEVICE_ID.fullmatch(device_id) is None:
            t.fail("", "not a valid device id (1-128 letters, digits, '.', '_' or '-')")
        status = t.get("status", str, "active", lambda v: None if v in STATUSES else
                       f"unknown status {v!r}, expected one of {', '.join(STATUSES)}")
        key = t.get("hmac_key", str, None, _hex_key_problem)
        t.finish()
        devices[device_id] = Device(status, bytes.fromhex(key) if key and not
                                    _hex_key_problem(key) else None)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return Registry(MappingProxyType(devices), str(path)), raw


def _hex_key_problem(value: str) -> str | None:
    try:
        size = len(bytes.fromhex(value))
    except ValueError:
        return "must be hex"
    return None if 16 <= size <= 64 else f"must be 16-64 bytes (32-128 hex digits), got {size}"


def parse(data: dict[str, Any], source: bytes = b"", base: Path | None = None,
          environ: Mapping[str, str] | None = None, hostname: str | None = None) -> Config:
    """Build the model from parsed TOML, or raise ConfigError with every problem.

    `base` is the config file's folder: a relative registry path is read from there.
    References (`${NAME}`) are expanded from `environ`, by default the process's, and
    `{hostname}` in an identity from `hostname`, by default this host's name.
    """
    env = Environment(os.environ if environ is None else environ,
                      socket.gethostname() if hostname is None else hostname)
    problems: list[str] = []
    top = _Table(data, "", problems)
    b = _Table(top.get("bridge", dict, {}), "bridge", problems)
    bridge = BridgeSettings(
        instance=render(b.get("instance", str, env.hostname,
                              lambda v: None if render(v, env).strip() else "must not be empty"),
                        env),
        shutdown_timeout=float(b.get("shutdown_timeout", (int, float), 30.0, _between(0, 3600))),
        log_format=b.get("log_format", str, "auto", lambda v: None if v in {
            "auto", "json", "console"} else "must be auto, json or console"),
        stats_interval=float(b.get("stats_interval", (int, float), 60.0, _between(1, 86400))),
    )
    b.finish()
    if "instance" not in b.data and not bridge.instance.strip():
        b.fail("instance", "missing, and this host has no name to default to")

    broker_list = top.get("brokers", list, [])
    if "brokers" in data and not broker_list:
        top.fail("brokers", "needs at least one [[brokers]] entry")
    elif "brokers" not in data:
        top.fail("brokers", "missing: add at least one [[brokers]] entry")
    brokers = [_broker(entry, f"brokers[{i}]", problems, env)
               for i, entry in enumerate(broker_list)]

    kafka = _kafka(top.get("kafka", dict, {}), problems, env)
    lanes = _lanes(top.get("lanes", dict, {}), problems, env)
    problems += _librdkafka_problems(kafka, lanes)

    s3 = None
    if "s3" in data:
        s = _Table(top.get("s3", dict, {}), "s3", problems)
        s3 = S3Config(
            bucket=s.get("bucket", str, check=lambda v: None if re.fullmatch(
                r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", v) else "is not a valid S3 bucket name"),
            endpoint_url=s.get("endpoint_url", str, None, _s3_endpoint_problem),
            region=s.get("region", str, None, lambda v: None if _REGION.fullmatch(v) else
                         "is not a region name (letters, digits and '-', e.g. eu-central-1)"),
            inline_max_bytes=s.get("inline_max_bytes", int, 262144, _between(0, 64 * 2**20)),
            object_prefix=s.get("object_prefix", str, "payloads/", lambda v: None if (
                v.endswith("/") and not v.startswith(("/", "staging/", "files/",
                                                      "dead-letter/")))
                else "must end with '/' and not be staging/, files/ or dead-letter/"),
            staging_expiry_days=s.get("staging_expiry_days", int, 7, _between(1, 3650)),
            apply_lifecycle=s.get("apply_lifecycle", bool, False),
            concurrency=s.get("concurrency", int, 8, _between(1, 256)),
            max_pending_bytes=s.get("max_pending_bytes", int, 128 * 2**20,
                                    _between(2**20, 64 * 2**30)),
        )
        s.finish()

    http = None
    if "http" in data:
        h = _Table(top.get("http", dict, {}), "http", problems)
        listen = h.get("listen", str, check=_parses(http_listen))
        h.finish()
        if listen is not None and not any(p.startswith("http.") for p in problems):
            http = http_listen(listen)

    d = _Table(top.get("dead_letter", dict, {}), "dead_letter", problems)
    dead_letter_topic = d.get("kafka_topic", str, check=kafka_topic_problem)
    d.finish()

    route_list = top.get("routes", list, [])
    if not route_list and "sparkplug" not in data:
        top.fail("routes", "missing: add at least one [[routes]] entry")
    routes = [_route(entry, f"routes[{i}]", i, problems) for i, entry in enumerate(route_list)]
    names = [r.name for r in routes if r]
    for i, route in enumerate(routes):
        if route and names.count(route.name) > 1 and names.index(route.name) != i:
            problems.append(f"routes[{i}].name: {route.name!r} is used twice")

    # One session per (broker, client id): two sharing one would take it over in turns.
    lanes_used = [lane for lane in LANES if any(r and r.lane == lane for r in routes)
                  or (lane == "fat" and "file_transfer" in data)
                  or (isinstance(data.get("sparkplug"), dict)
                      and data["sparkplug"].get("lane", "bulk") == lane)]
    seen: dict[tuple[str, int, str], int] = {}
    for i, broker in enumerate(brokers):
        for lane, session in [(lane, broker.for_lane(lane)) for lane in lanes_used] \
                if broker else []:
            if not CLIENT_ID.fullmatch(session.client_id):  # a lane's suffix made it too long
                problems.append(f"brokers[{i}].client_id: the {lane} lane's "
                                f"session id {session.client_id!r} is longer than 64 "
                                "characters: shorten the client_id")
                break
            first = seen.setdefault((session.host, session.port, session.client_id), i)
            if first != i:
                problems.append(f"brokers[{i}].client_id: {session.client_id!r} is used twice "
                                f"for {session.host}:{session.port}")
                break

    file_transfer = None
    if "file_transfer" in data:
        file_transfer = _file_transfer(top.get("file_transfer", dict, {}), problems)
        if s3 is None:
            problems.append("file_transfer: needs an [s3] bucket to assemble files in")
    problems += _shadowed_routes(routes, file_transfer)
    sparkplug = None
    if "sparkplug" in data:
        sparkplug = _sparkplug(top.get("sparkplug", dict, {}), problems)
        problems += _shadowed_by_sparkplug(routes, sparkplug)
    if s3 is None:
        problems += [f"routes[{i}].{key}: needs an [s3] bucket" for i, r in enumerate(routes)
                     if r for key in ("inline_max_bytes",) if r.inline_max_bytes is not None]
    problems += _inline_size_problems(routes, s3, kafka, lanes)

    tracing_spans = False
    if "tracing" in data:
        tr = _Table(top.get("tracing", dict, {}), "tracing", problems)
        tracing_spans = tr.get("spans", bool, False)
        tr.finish()
        if tracing_spans and importlib.util.find_spec("opentelemetry") is None:
            tr.fail("spans", "needs the OpenTelemetry API: pip install "
                    "'mqtt-kafka-bridge[tracing]' (and an SDK and exporter of your choice)")

    registry, registry_bytes = Registry(), b""
    r = _Table(top.get("registry", dict, {}), "registry", problems)
    before = len(problems)
    registry_file = _secret_file(r, "file", env, base=base)  # it holds the devices' hmac keys
    r.finish()
    if registry_file is not None:
        registry_path = Path(registry_file) if base is None else base / registry_file
        try:
            if len(problems) == before:  # else it cannot be read
                registry, registry_bytes = load_registry(registry_path)
        except ConfigError as exc:
            problems += [f"registry.file: {problem}" for problem in exc.problems]
    else:
        problems += [f"routes[{i}].auth: {route.auth!r} needs a device registry: add "
                     '[registry] file = "devices.toml"'
                     for i, route in enumerate(routes) if route and route.auth != "none"]
        if file_transfer is not None and file_transfer.auth != "none":
            problems.append(f"file_transfer.auth: {file_transfer.auth!r} needs a device "
                            'registry: add [registry] file = "devices.toml"')
    top.finish()

    if problems:
        raise ConfigError([env.scrub(problem) for problem in problems])
    return Config(
        bridge=bridge,
        brokers=tuple(x for x in brokers if x),
        kafka=kafka,
        dead_letter_topic=dead_letter_topic,
        routes=tuple(r for r in routes if r),
        s3=s3,
        lanes=lanes,
        file_transfer=file_transfer,
        registry=registry,
        version=hashlib.sha256(source + registry_bytes).hexdigest()[:12],
        http=http,
        tracing_spans=tracing_spans,
        sparkplug=sparkplug,
    )


def load(path: str | Path) -> Config:
    """Read and check a config file and its registry. The map version, recorded in lineage,
    is a hash of both files' contents."""
    data, raw = read_toml(path)
    return parse(data, source=raw, base=Path(path).parent)


def read_toml(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """A TOML file's data and bytes, or ConfigError saying why not: whatever the file holds
    (a directory, a device, nesting deep enough to exhaust the parser's recursion, an
    integer too long to convert), reading it never raises anything else."""
    file = Path(path)
    try:
        if file.exists() and not file.is_file():
            raise ConfigError([f"{path}: cannot read: not a regular file"])
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except ValueError as exc:  # a path with U+0000 in it
        raise ConfigError([f"{str(path)!r}: cannot read: {exc}"]) from exc
    try:
        return tomllib.loads(raw.decode()), raw
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, int() of 4300+ digits
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{path}: not valid TOML: arrays or tables nested too deeply"]) \
            from exc
