"""Sparkplug B: the topic namespace, payload decoding, and the state a host application keeps.

Pure: no I/O here (`bridge/sparkplug_host.py` wires it to the daemon). Topics are
`spBv1.0/{group_id}/{message_type}/{edge_node_id}[/{device_id}]`; payloads are Eclipse
Tahu's protobuf (`bridge/sparkplug_pb.py`). `HostState` is what a Sparkplug host
application keeps per edge node: the alias -> name and datatype tables of its births, its
`bdSeq` and the `seq` it expects next. It is bounded (nodes, aliases per node, bytes), and
says what it evicted.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from bridge.errors import Rejected
from bridge.sparkplug_pb import DATA_TYPES, Payload

NAMESPACE = "spBv1.0"
NODE_TYPES = ("NBIRTH", "NDEATH", "NDATA", "NCMD")
DEVICE_TYPES = ("DBIRTH", "DDEATH", "DDATA", "DCMD")
MESSAGE_TYPES = NODE_TYPES + DEVICE_TYPES
BD_SEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
_BOOLEAN = 11
_ENTRY_BYTES = 160  # what one node, device, alias or datatype costs besides its name, estimated
_SIGNED = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64: width of the two's complement
_BOOLEANS_MAX = 1 << 20  # elements of one BooleanArray the bridge decodes (8 MiB of list)
_ARRAYS = {22: "b", 23: "h", 24: "i", 25: "q", 26: "B", 27: "H", 28: "I", 29: "Q",
           30: "f", 31: "d", 34: "q"}  # packed little-endian (Sparkplug 3.0, 6.4.17)
_BOOLEAN_ARRAY, _STRING_ARRAY = 32, 33
_NESTED = ("dataset_value", "template_value", "extension_value")
# Bytes of nested values (DataSets, Templates, extensions) one message decodes into maps:
# that runs in Python, ~3 us per element, on the event loop every lane shares (~0.2 s here).
NESTED_MAX = 64 * 1024


class Topic(NamedTuple):
    group: str
    message_type: str
    edge_node: str
    device: str | None

    @classmethod
    def parse(cls, topic: str) -> Topic:
        levels = topic.split("/")
        if len(levels) not in (4, 5) or levels[0] != NAMESPACE:
            raise Rejected("bad_sparkplug_topic", "expected spBv1.0/{group_id}/"
                                 "{message_type}/{edge_node_id}[/{device_id}]")
        message_type = levels[2]
        wanted = 5 if message_type in DEVICE_TYPES else 4
        if message_type not in MESSAGE_TYPES or len(levels) != wanted:
            raise Rejected("bad_sparkplug_topic", f"{message_type[:20]!r} with "
                                 f"{len(levels)} levels is no Sparkplug B message type")
        if not all(levels):
            raise Rejected("bad_sparkplug_topic", "an empty topic level")
        return cls(levels[1], message_type, levels[3], levels[4] if wanted == 5 else None)

    def key(self, per_device: bool) -> str:
        node = f"{self.group}/{self.edge_node}"
        return f"{node}/{self.device}" if per_device and self.device is not None else node


@dataclass(slots=True)
class Metric:
    """One metric as decoded; the host state fills in `name` and `datatype` from a birth."""

    name: str | None
    alias: int | None
    timestamp: int | None
    datatype: int | None
    is_null: bool
    is_historical: bool
    is_transient: bool
    pb: Any = field(repr=False)

    def record(self, nested_max: int = NESTED_MAX) -> dict[str, Any]:
        """The metric as the envelope carries it; a value that does not decode (or a nested
        value larger than `nested_max` bytes) is None with `value_error` saying why (the
        rest of the message stays good)."""
        out: dict[str, Any] = {
            "name": self.name, "alias": self.alias, "timestamp": self.timestamp,
            "datatype": DATA_TYPES.get(self.datatype) if self.datatype is not None else None,
            "value": None, "is_null": self.is_null, "is_historical": self.is_historical,
            "is_transient": self.is_transient}
        try:
            out["value"] = _value(self.pb, self.datatype, self.is_null, nested_max)
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            out["value_error"] = str(exc)[:200]
        return out

    def nested_size(self) -> int:
        """Bytes of the metric's nested value (a DataSet, Template or extension), else 0."""
        kind = self.pb.WhichOneof("value")
        return int(getattr(self.pb, kind).ByteSize()) if kind in _NESTED else 0


class Decoded(NamedTuple):
    timestamp: int | None
    seq: int | None
    metrics: list[Metric]
    bd_seq: int | None


def decode(payload: bytes, max_metrics: int) -> Decoded:
    """Parse a Sparkplug B payload, or raise Rejected (its dead-letter code)."""
    try:
        pb = Payload.FromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Rejected("bad_sparkplug_payload", f"not a Sparkplug B payload: "
                             f"{str(exc)[:200] or type(exc).__name__}") from exc
    if len(pb.metrics) > max_metrics:
        raise Rejected("sparkplug_too_many_metrics", f"{len(pb.metrics)} metrics, more "
                             f"than max_metrics = {max_metrics}")
    metrics = [Metric(m.name if m.HasField("name") else None,
                      m.alias if m.HasField("alias") else None,
                      m.timestamp if m.HasField("timestamp") else None,
                      m.datatype if m.HasField("datatype") else None,
                      m.is_null, m.is_historical, m.is_transient, m) for m in pb.metrics]
    if any(not isinstance(m.name, str | None) for m in metrics):
        raise Rejected("bad_sparkplug_payload", "a metric name is not UTF-8 text")
    bd_seq = next((m.pb.long_value for m in metrics if m.name == BD_SEQ
                   and m.pb.WhichOneof("value") == "long_value"), None)
    return Decoded(pb.timestamp if pb.HasField("timestamp") else None,
                   pb.seq if pb.HasField("seq") else None, metrics, bd_seq)


def records(metrics: list[Metric]) -> list[dict[str, Any]]:
    """The metrics as the envelope carries them, decoding at most NESTED_MAX bytes of nested
    values in all: past that, theirs are None with `value_error` (the raw body keeps them)."""
    left, out = NESTED_MAX, []
    for metric in metrics:
        out.append(metric.record(left))
        if "value_error" not in out[-1]:
            left -= metric.nested_size()
    return out


def rebirth_request(now_millis: int) -> bytes:
    """An NCMD payload asking an edge node to publish its births again."""
    pb = Payload(timestamp=now_millis)
    metric = pb.metrics.add()
    metric.name, metric.timestamp, metric.datatype = REBIRTH, now_millis, _BOOLEAN
    metric.boolean_value = True
    data: bytes = pb.SerializeToString()
    return data


def _value(pb: Any, datatype: int | None, is_null: bool, nested_max: int) -> Any:
    kind = pb.WhichOneof("value")
    if is_null or kind is None:
        return None
    raw = getattr(pb, kind)
    if kind in _NESTED and raw.ByteSize() > nested_max:
        raise ValueError(f"{raw.ByteSize()} bytes of nested values, past the {NESTED_MAX} one "
                         "message decodes: the raw body has them")
    if kind == "string_value" and not isinstance(raw, str):
        raise ValueError("a string value that is not UTF-8 text")
    if kind in ("int_value", "long_value") and datatype in _SIGNED:
        bits = _SIGNED[datatype]
        raw &= (1 << bits) - 1
        return raw - (1 << bits) if raw >> (bits - 1) else raw
    if kind in ("dataset_value", "template_value", "extension_value"):
        return json_format.MessageToDict(raw, preserving_proto_field_name=True)
    if kind == "bytes_value" and datatype is not None:
        return _array(raw, datatype)
    return raw


def _array(raw: bytes, datatype: int) -> Any:
    if datatype in _ARRAYS:
        code = _ARRAYS[datatype]
        size = struct.calcsize(code)
        if len(raw) % size:
            raise ValueError(f"{len(raw)} bytes is no {DATA_TYPES[datatype]}")
        return list(struct.unpack(f"<{len(raw) // size}{code}", raw))
    if datatype == _STRING_ARRAY:
        if raw and not raw.endswith(b"\0"):
            raise ValueError("a StringArray ends with a NUL")
        return [s.decode() for s in raw[:-1].split(b"\0")] if raw else []
    if datatype == _BOOLEAN_ARRAY:
        if len(raw) < 4:
            raise ValueError("a BooleanArray starts with its count (4 bytes)")
        count = int.from_bytes(raw[:4], "little")
        bits = raw[4:]
        if count > 8 * len(bits):
            raise ValueError(f"a BooleanArray of {count} needs {(count + 7) // 8} bytes")
        if count > _BOOLEANS_MAX:  # 8 per byte: the one array that grows past its payload
            raise ValueError(f"a BooleanArray of {count}: more than {_BOOLEANS_MAX} is "
                             "more than any Kafka record takes")
        return [bool(bits[i // 8] >> (7 - i % 8) & 1) for i in range(count)]
    return raw


@dataclass(frozen=True, slots=True)
class Limits:
    max_nodes: int = 10_000
    max_aliases_per_node: int = 10_000
    max_state_bytes: int = 64 * 2**20
    rebirth_interval: float = 5.0  # seconds between rebirth requests to one node


@dataclass(slots=True)
class Node:
    """What the host knows of one edge node since its NBIRTH."""

    bd_seq: int | None
    expected_seq: int | None
    aliases: dict[int, tuple[str, str]] = field(default_factory=dict)  # -> (device, name)
    datatypes: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, name)
    devices: set[str] = field(default_factory=set)  # born and not dead
    cost: int = 0  # estimated bytes of the node's names and tables
    full: bool = False  # a birth had more than the tables take: unknown aliases are expected


class Verdict(NamedTuple):
    """What one message meant to the host state."""

    issues: tuple[str, ...]  # why names may be missing or the message is out of turn
    online: bool | None  # births: True, current deaths: False, else None
    rebirth: str | None  # ask the node for a rebirth now, for this reason
    evicted: tuple[tuple[str, str], ...]  # nodes dropped to stay within the limits


# Issues that a rebirth repairs.
_REPAIRABLE = ("no_birth", "seq_gap", "unknown_alias", "unknown_device")


class HostState:
    """Per (group, edge node): the alias tables, bdSeq and expected seq; bounded."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.nodes: OrderedDict[tuple[str, str], Node] = OrderedDict()  # least recent first
        self.bytes = 0
        # when each node was last asked for a rebirth, by the hash of its key: nodes that
        # never sent a birth are asked too, so their names must not be kept
        self._asked: OrderedDict[int, float] = OrderedDict()

    def observe(self, topic: Topic, decoded: Decoded, now: float) -> Verdict:
        """Update the state with one message and fill in its metrics' names and datatypes."""
        key = (topic.group, topic.edge_node)
        kind = topic.message_type
        if kind in ("NCMD", "DCMD"):  # another host's (or our own) command: no state
            return Verdict((), None, None, ())
        issues: list[str] = []
        online: bool | None = None
        evicted: list[tuple[str, str]] = []
        if kind == "NBIRTH":
            self._drop(key)
            node = Node(decoded.bd_seq, _next(decoded.seq))
            self.nodes[key] = node
            self._charge(node, _node_cost(key))
            self._learn(node, "", decoded.metrics, issues)
            online = True
            evicted = self._shrink(keep=key)
        elif kind == "NDEATH":
            node_or_none = self.nodes.get(key)
            if node_or_none is not None and None not in (node_or_none.bd_seq, decoded.bd_seq) \
                    and node_or_none.bd_seq != decoded.bd_seq:
                issues.append("stale_death")
            else:
                self._drop(key)
                online = False
            return Verdict(tuple(issues), online, None, ())
        else:
            node_or_none = self.nodes.get(key)
            if node_or_none is None:
                issues.append("no_birth")
            else:
                node = node_or_none
                self.nodes.move_to_end(key)
                self._check_seq(node, decoded.seq, issues)
                device = topic.device or ""
                if kind == "DBIRTH":
                    self._forget_device(node, device)
                    node.devices.add(device)
                    self._charge(node, _ENTRY_BYTES + len(device))
                    self._learn(node, device, decoded.metrics, issues)
                    online = True
                    evicted = self._shrink(keep=key)
                elif kind == "DDEATH":
                    self._forget_device(node, device)
                    online = False
                else:
                    if topic.device is not None and device not in node.devices:
                        issues.append("unknown_device")
                    self._fill(node, device, decoded.metrics, issues)
        if "no_birth" in issues:
            for metric in decoded.metrics:
                if metric.name is None:
                    issues.append("unknown_alias")
                    break
        return Verdict(tuple(dict.fromkeys(issues)), online, self._rebirth(key, issues, now),
                       tuple(evicted))

    def _check_seq(self, node: Node, seq: int | None, issues: list[str]) -> None:
        if seq is not None and node.expected_seq is not None and seq != node.expected_seq:
            issues.append("seq_gap")
        node.expected_seq = _next(seq) if seq is not None else node.expected_seq

    def _learn(self, node: Node, device: str, metrics: list[Metric], issues: list[str]) -> None:
        for metric in metrics:
            if metric.name is None:
                issues.append("unknown_alias")  # a birth names every metric
                continue
            if max(len(node.aliases), len(node.datatypes)) >= self.limits.max_aliases_per_node:
                node.full = True
                issues.append("tables_full")
                break
            cost = _ENTRY_BYTES + len(metric.name)
            entry = (device, metric.name)
            if metric.datatype is not None:  # a repeat replaces its entry: charged once
                if entry not in node.datatypes:
                    self._charge(node, cost)
                node.datatypes[entry] = metric.datatype
            if metric.alias is not None:
                replaced = node.aliases.get(metric.alias)
                if replaced is not None:
                    self._charge(node, -_ENTRY_BYTES - len(replaced[1]))
                node.aliases[metric.alias] = entry
                self._charge(node, cost)

    def _fill(self, node: Node, device: str, metrics: list[Metric], issues: list[str]) -> None:
        for metric in metrics:
            if metric.name is None and metric.alias is not None:
                known = node.aliases.get(metric.alias)
                if known is not None and known[0] == device:
                    metric.name = known[1]
                else:
                    issues.append("tables_full" if node.full else "unknown_alias")
            if metric.datatype is None and metric.name is not None:
                metric.datatype = node.datatypes.get((device, metric.name))

    def _charge(self, node: Node, cost: int) -> None:
        node.cost += cost
        self.bytes += cost

    def _forget_device(self, node: Node, device: str) -> None:
        if device in node.devices:
            node.devices.discard(device)
            self._charge(node, -_ENTRY_BYTES - len(device))
        for alias in [a for a, (d, _) in node.aliases.items() if d == device]:
            self._charge(node, -_ENTRY_BYTES - len(node.aliases.pop(alias)[1]))
        for name in [k for k in node.datatypes if k[0] == device]:
            del node.datatypes[name]
            self._charge(node, -_ENTRY_BYTES - len(name[1]))

    def _drop(self, key: tuple[str, str]) -> None:
        node = self.nodes.pop(key, None)
        if node is not None:
            self.bytes -= node.cost

    def _shrink(self, keep: tuple[str, str]) -> list[tuple[str, str]]:
        """Evict the least recently heard nodes past the limits (never `keep`, unless it
        alone is over the byte budget: then its tables go and it is told `tables_full`)."""
        evicted = []
        while len(self.nodes) > self.limits.max_nodes or self.bytes > self.limits.max_state_bytes:
            oldest = next(iter(self.nodes))
            if oldest == keep:
                if len(self.nodes) == 1:
                    node = self.nodes[keep]
                    self._charge(node, _node_cost(keep) - node.cost)
                    node.aliases, node.datatypes, node.devices, node.full = {}, {}, set(), True
                    break
                self.nodes.move_to_end(keep)
                continue
            self._drop(oldest)
            evicted.append(oldest)
        return evicted

    def _rebirth(self, key: tuple[str, str], issues: list[str], now: float) -> str | None:
        reason = next((issue for issue in _REPAIRABLE if issue in issues), None)
        if reason is None:
            return None
        slot = hash(key)
        asked = self._asked.get(slot)
        if asked is not None and now - asked < self.limits.rebirth_interval:
            return None
        self._asked[slot] = now
        self._asked.move_to_end(slot)
        while len(self._asked) > self.limits.max_nodes:
            self._asked.popitem(last=False)
        return reason


def _node_cost(key: tuple[str, str]) -> int:
    """What a node costs before its tables: its group and edge node names are the device's
    choice, up to 64 KB."""
    return _ENTRY_BYTES + len(key[0]) + len(key[1])


def _next(seq: int | None) -> int | None:
    return None if seq is None else (seq + 1) % 256
