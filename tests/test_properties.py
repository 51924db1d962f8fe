"""Properties of the pure stages over arbitrary input: routing, authentication, envelopes and
the dry-run pipeline, without servers. Every message must end settled, so a stage gives its
result or raises `Rejected` with a documented code; any other exception is a bug the
daemon's guard would have to turn into `internal_error`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import random
import tomllib
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any, TypeVar

import msgpack
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from bridge import auth, config, envelope, properties
from bridge.auth import AUTH_MODES, STATUSES, Device, Registry
from bridge.errors import Rejected
from bridge.kafka import Delivery
from bridge.message import Message, Properties
from bridge.metrics import Metrics
from bridge.pipeline import Job, Pipeline
from bridge.routing import DEVICE_ID, RouteFilter, Router, kafka_topic_problem
from tests.test_codes_documented import MISSING_FROM_DOCS, documented_codes
from tests.test_config import GOOD

T = TypeVar("T")
HEADER = GOOD.split("[[routes]]")[0]  # bridge, broker, kafka and dead-letter sections

# Text an MQTT packet can carry (its strings are UTF-8: no lone surrogates), and any text.
SAFE = st.characters(exclude_categories=["Cs"])
ANY_TEXT = st.text(max_size=60)


def encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def seeded(low: int, high: int) -> st.SearchStrategy[bytes]:
    """Random bytes of a drawn size from a drawn seed: drawing 100 KB from hypothesis byte by
    byte would cost more than the property."""
    return st.tuples(st.integers(low, high), st.integers(0, 2**32)).map(
        lambda t: random.Random(t[1]).randbytes(t[0]))


def sized_bytes(most: int) -> st.SearchStrategy[bytes]:
    """Bytes up to `most`: small ones drawn byte by byte (so they shrink), large ones seeded."""
    return st.one_of(st.binary(max_size=300), seeded(0, most))


def often(usual: st.SearchStrategy[T], rare: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`usual` three times in four (`one_of(usual, rare)` would weigh each branch of a
    `rare` that is a one_of itself like `usual`)."""
    return st.integers(0, 3).flatmap(lambda i: rare if i == 3 else usual)


# ------------------------------------------------------------------ routing

ROUTES_TOML = HEADER + """
[[routes]]
name = "telemetry"
filter = "devices/{device_id}/telemetry"
kafka_topic = "iot.telemetry"
[[routes]]
name = "status"
filter = "sites/{site}/devices/{device_id}/status"
kafka_topic = "iot.{site}.status"
[[routes]]
name = "fleet"
filter = "fleet/+/{device_id}/#"
kafka_topic = "iot.fleet"
[[routes]]
name = "commands"
filter = "{device_id}/cmd/{verb}"
kafka_topic = "cmd.{verb}.{device_id}"
[[routes]]
name = "rest"
filter = "devices/{device_id}/#"
kafka_topic = "{device_id}"
"""
ROUTER = Router(config.parse(tomllib.loads(ROUTES_TOML)).routes)
ROUTING_CODES = {"no_route", "no_device_id", "invalid_device_id", "invalid_topic"}

LEVELS = st.one_of(
    st.sampled_from(["devices", "telemetry", "sites", "status", "fleet", "cmd", "+", "#",
                     "$SYS", "", ".", "..", "d1", "dev-7", "a b", "a\x00b", "ü", "x.y"]),
    st.text(SAFE, max_size=12),
    st.text(st.sampled_from("aZ9._-"), min_size=1, max_size=140),  # device ids, some too long
    st.integers(200, 3000).map(lambda n: "x" * n),  # very long levels
)
TOPICS = st.one_of(st.lists(LEVELS, min_size=1, max_size=7).map("/".join),
                   st.text(SAFE, max_size=200))


@st.composite
def topic_for(draw: st.DrawFn, f: RouteFilter,
              fill: dict[str, st.SearchStrategy[str]] | None = None) -> str:
    """A topic the filter matches: each placeholder (and `+`) filled from `fill` by name,
    else with any level; a final `#` adds a few levels."""
    fill = fill or {}
    parts = [lv if lv is not None else draw(fill.get(name or "+", LEVELS))
             for lv, name in zip(f.levels, f.names, strict=True)]
    if f.multi:
        parts += draw(st.lists(LEVELS, max_size=3))
    return "/".join(parts)


ROUTED_TOPICS = st.sampled_from([r.filter for r in ROUTER.routes]).flatmap(topic_for)


@settings(max_examples=200, deadline=None)
@given(topic=often(ROUTED_TOPICS, TOPICS))
def test_a_topic_routes_to_a_safe_device_and_a_legal_kafka_topic_or_is_refused(
        topic: str) -> None:
    try:
        found = ROUTER.match(topic)
    except Rejected as refused:
        event(refused.code)
        assert refused.code in ROUTING_CODES, refused
        assert (refused.code == "no_route") is (not ROUTER.takes(topic))
        return
    event(f"routed by {found.route.name}")
    assert DEVICE_ID.fullmatch(found.device_id)
    assert kafka_topic_problem(found.kafka_topic) is None
    first = next(r for r in ROUTER.routes if r.filter.match(topic) is not None)
    assert found.route is first, "the first matching route wins"
    assert found.bindings["device_id"] == found.device_id


def mqtt_matches(subscription: str, topic: str) -> bool:
    """MQTT 5 section 4.7, as a broker applies it: `+` takes one level, a final `#` takes
    the rest and its parent level, and a filter starting with a wildcard never matches a
    topic starting with `$`."""
    if topic.startswith("$") and subscription[:1] in ("+", "#"):
        return False
    want, have = subscription.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return len(have) >= i
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(have) == len(want)


def test_the_reference_matcher_follows_the_spec_examples() -> None:
    """MQTT 5 section 4.7.1's own examples, so the reference is not the thing under test."""
    assert all(mqtt_matches("sport/tennis/player1/#", t) for t in (
        "sport/tennis/player1", "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon"))
    assert mqtt_matches("sport/#", "sport") and mqtt_matches("#", "a/b")
    assert mqtt_matches("sport/tennis/+", "sport/tennis/player1")
    assert not mqtt_matches("sport/tennis/+", "sport/tennis/player1/ranking")
    assert mqtt_matches("sport/+", "sport/") and not mqtt_matches("sport/+", "sport")
    assert mqtt_matches("+/+", "/finance") and mqtt_matches("/+", "/finance")
    assert not mqtt_matches("+", "/finance")
    assert not mqtt_matches("#", "$SYS/x") and not mqtt_matches("+/monitor/Clients",
                                                                 "$SYS/monitor/Clients")
    assert mqtt_matches("$SYS/#", "$SYS/x")


LITERAL = st.text(st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="/+#{}"),
                  max_size=6)


@st.composite
def filters(draw: st.DrawFn) -> RouteFilter:
    """Route filters: literal and `+` levels, `{device_id}` and maybe `{site}` anywhere, maybe
    a final `#`."""
    levels = draw(st.lists(st.one_of(st.just("+"), LITERAL), max_size=4))
    for name in ["{device_id}"] + (["{site}"] if draw(st.booleans()) else []):
        levels.insert(draw(st.integers(0, len(levels))), name)
    if draw(st.booleans()):
        levels.append("#")
    pattern = "/".join(levels)
    assume(not pattern.startswith("$"))
    return RouteFilter.parse(pattern)


@st.composite
def filter_and_topic(draw: st.DrawFn) -> tuple[RouteFilter, str]:
    """A filter, and a topic made from it (a level changed, dropped or added now and then)
    or drawn at random, so matches and near misses are both common."""
    f = draw(filters())
    if draw(st.integers(0, 4)) == 0:
        return f, draw(TOPICS)
    parts = draw(topic_for(f)).split("/")
    edit = draw(st.sampled_from(["none", "none", "change", "drop", "add"]))
    if edit == "change" and parts:
        parts[draw(st.integers(0, len(parts) - 1))] = draw(LEVELS)
    elif edit == "drop" and parts:
        parts.pop(draw(st.integers(0, len(parts) - 1)))
    elif edit == "add":
        parts.insert(draw(st.integers(0, len(parts))), draw(LEVELS))
    return f, "/".join(parts)


@settings(max_examples=150, deadline=None)
@given(case=filter_and_topic())
def test_a_route_filter_matches_exactly_what_its_subscription_matches(
        case: tuple[RouteFilter, str]) -> None:
    """What the broker sends for the subscription is what the filter takes, and each
    placeholder binds its own level. Topics starting with `$` are left out: the broker never
    sends them to a wildcard-first subscription, and `RouteFilter.parse` refuses a literal
    `$` first level, so no route ever sees one."""
    f, topic = case
    assume(not (topic.startswith("$") and f.subscription[:1] in ("+", "#")))
    bound = f.match(topic)
    event("matches" if bound is not None else "does not match")
    assert (bound is not None) is mqtt_matches(f.subscription, topic)
    if bound is not None:
        parts = topic.split("/")
        assert bound == {name: parts[i] for i, name in enumerate(f.names) if name}


# ------------------------------------------------------------------ authentication

KEYS = st.binary(max_size=100)
HUGE_HEX = st.integers(0, 200_000).map(lambda n: "ab" * n)
SIGNATURES = st.one_of(st.text(max_size=80), st.text("0123456789abcdefABCDEF ", max_size=130),
                       HUGE_HEX)
PROPERTIES = st.lists(st.tuples(st.one_of(st.just("signature"), st.just("Signature"),
                                          st.text(max_size=12)), SIGNATURES), max_size=5)
TOPIC_TEXT = st.text(SAFE, max_size=60).map(lambda t: "devices/" + t)


@settings(max_examples=100, deadline=None)
@given(mode=st.one_of(st.sampled_from(AUTH_MODES), st.text(max_size=10)),
       devices=st.dictionaries(
           st.text(max_size=8),
           st.builds(Device, st.one_of(st.sampled_from(STATUSES), st.text(max_size=8)),
                     st.one_of(st.none(), KEYS)), max_size=4),
       pick=st.one_of(st.integers(0, 3), st.text(max_size=10)))
def test_the_registry_admits_or_refuses_with_a_code(mode: str, devices: dict[str, Device],
                                                    pick: int | str) -> None:
    known = sorted(devices)
    device_id = known[pick % len(known)] if isinstance(pick, int) and known else str(pick)
    registry = Registry(MappingProxyType(devices))
    device = devices.get(device_id)
    try:
        admitted = registry.admit(mode, device_id)
    except Rejected as refused:
        assert refused.device_id == device_id
        expected = "unknown_device" if device is None else \
            "revoked_device" if device.status != "active" else "bad_signature"
        assert refused.code == expected and mode != "none"
        assert expected != "bad_signature" or (mode == "hmac" and device is not None
                                               and device.hmac_key is None)
        return
    assert admitted is (None if mode == "none" else device)


@settings(max_examples=150, deadline=None)
@given(key=KEYS, device_id=ANY_TEXT, topic=TOPIC_TEXT, payload=st.binary(max_size=300),
       properties=PROPERTIES)
def test_verify_only_ever_refuses_and_passes_only_the_one_right_signature(
        key: bytes, device_id: str, topic: str, payload: bytes,
        properties: list[tuple[str, str]]) -> None:
    signatures = [value for name, value in properties if name == "signature"]
    try:
        auth.verify(key, device_id, topic, payload, tuple(properties))
    except Rejected as refused:
        assert refused.device_id == device_id
        assert refused.code == ("missing_signature" if not signatures else "bad_signature")
        return
    expected = hmac.new(key, topic.encode() + b"\x00" + payload, hashlib.sha256).digest()
    assert len(signatures) == 1 and bytes.fromhex(signatures[0]) == expected


@settings(max_examples=100, deadline=None)
@given(key=KEYS, topic=TOPIC_TEXT, payload=st.binary(max_size=300),
       others=st.lists(st.tuples(st.text(max_size=12).filter(lambda n: n != "signature"),
                                 st.text(max_size=40)), max_size=4),
       where=st.integers(0, 4), upper=st.booleans())
def test_a_correctly_signed_message_passes(key: bytes, topic: str, payload: bytes,
                                           others: list[tuple[str, str]], where: int,
                                           upper: bool) -> None:
    signature = auth.sign(key, topic, payload)
    others.insert(where, ("signature", signature.upper() if upper else signature))
    auth.verify(key, "d1", topic, payload, tuple(others))


@settings(max_examples=100, deadline=None)
@given(key=KEYS, topic=TOPIC_TEXT, payload=st.binary(max_size=300), data=st.data())
def test_any_single_byte_change_to_topic_or_payload_fails_the_signature(
        key: bytes, topic: str, payload: bytes, data: st.DataObject) -> None:
    signature = (("signature", auth.sign(key, topic, payload)),)
    if payload and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(payload) - 1))
        changed = bytearray(payload)
        changed[at] ^= data.draw(st.integers(1, 255))
        topic_after, payload_after = topic, bytes(changed)
    else:  # an ASCII byte becomes another ASCII byte, so the topic stays text
        raw = bytearray(topic.encode())
        at = data.draw(st.sampled_from([i for i, b in enumerate(raw) if b < 0x80]))
        raw[at] = data.draw(st.integers(0, 0x7F).filter(lambda b: b != raw[at]))
        topic_after, payload_after = raw.decode(), payload
    try:
        auth.verify(key, "d1", topic_after, payload_after, signature)
    except Rejected as refused:
        assert refused.code == "bad_signature"
    else:
        raise AssertionError("a changed message passed its original signature")


# ------------------------------------------------------------------ envelopes

LINEAGES = st.builds(envelope.Lineage, st.text(SAFE, max_size=20), st.text(SAFE, max_size=20),
                     st.text(SAFE, max_size=12))
MILLIS = st.integers(0, 2**63 - 1)
FLAGS = st.tuples(st.integers(0, 2), st.booleans(), st.booleans())


# What an MQTT 5 PUBLISH can carry besides its payload, within the protocol's ranges.
USER_PROPERTIES = st.lists(st.tuples(st.text(SAFE, max_size=12), st.text(SAFE, max_size=20)),
                           max_size=4).map(tuple)
MQTT_PROPERTIES = st.none() | st.builds(
    Properties, content_type=st.none() | st.text(SAFE, max_size=30),
    payload_format_indicator=st.integers(0, 1),
    message_expiry_interval=st.none() | st.integers(0, 2**32 - 1),
    response_topic=st.none() | st.text(SAFE, max_size=30),
    correlation_data=st.none() | st.binary(max_size=30))


def messages(text: st.SearchStrategy[str] | None = None,
             payloads: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[Message]:
    """Messages MQTT can carry (or with `text` for topic and broker), bodies up to 100 KB."""
    text = st.text(SAFE, max_size=200) if text is None else text
    payloads = sized_bytes(100_000) if payloads is None else payloads
    return st.builds(Message, broker=text, topic=text, payload=payloads,
                     qos=st.integers(0, 2), retain=st.booleans(), dup=st.booleans(),
                     arrival_millis=MILLIS, user_properties=USER_PROPERTIES,
                     properties=MQTT_PROPERTIES)



@settings(max_examples=100, deadline=None)
@given(topic=st.text(SAFE, max_size=300), broker=st.text(SAFE, max_size=30),
       device_id=st.text(SAFE, max_size=30), lineage=LINEAGES,
       content_type=st.text(SAFE, max_size=30),
       sent=st.lists(st.tuples(FLAGS, sized_bytes(100_000), MILLIS), min_size=1, max_size=4))
def test_a_template_encodes_exactly_what_encode_does(
        topic: str, broker: str, device_id: str, lineage: envelope.Lineage, content_type: str,
        sent: list[tuple[tuple[int, bool, bool], bytes, int]]) -> None:
    """One template serves every message of its topic, whatever their flags and times."""
    template = envelope.Template(topic, broker, device_id, lineage, content_type)
    for (qos, retain, dup), payload, millis in sent:
        message = Message(broker, topic, payload, qos, retain, dup, millis)
        assert envelope.decode(template.encode(message)) == \
            envelope.decode(envelope.encode(message, device_id, lineage, content_type))


def backslashed(text: str, codec: str = "utf-8") -> str:
    return text.encode(codec, "backslashreplace").decode(codec)


@settings(max_examples=100, deadline=None)
@given(message=messages(ANY_TEXT, sized_bytes(20_000)), device_id=ANY_TEXT,
       lineage=st.builds(envelope.Lineage, ANY_TEXT, ANY_TEXT, ANY_TEXT),
       code=st.one_of(st.sampled_from(sorted(documented_codes())), ANY_TEXT),
       reason=st.text(max_size=300), body_max=st.integers(0, 25_000),
       reference=st.none() | ANY_TEXT, sha256=st.none() | ANY_TEXT,
       size=st.none() | st.integers(0, 2**63 - 1))
def test_a_dead_letter_record_always_encodes_and_keeps_what_it_must(
        message: Message, device_id: str, lineage: envelope.Lineage, code: str, reason: str,
        body_max: int, reference: str | None, sha256: str | None, size: int | None) -> None:
    """Whatever the text (lone surrogates anywhere), the record decodes with its code, the
    payload's size and sha256, and the body inline or its reference. Text msgpack cannot
    take gives the minimal record, in ASCII."""
    record = envelope.decode(envelope.encode_dead_letter(
        message, device_id, lineage, code, reason, body_max, reference, sha256, size))
    whole = len(message.payload) if size is None else size
    digest = sha256 or hashlib.sha256(message.payload).hexdigest()
    texts = [message.topic, message.broker, device_id, *dataclasses.astuple(lineage), code,
             digest, reference or ""]
    full = all(map(encodable, texts))
    plain: Callable[[str], str] = (lambda t: t) if full else \
        (lambda t: backslashed(t, "ascii"))
    assert record["error"]["code"] == plain(code)
    if full:
        assert record["error"]["reason"] == backslashed(reason)
    else:
        assert record["error"]["reason"].startswith(plain(backslashed(reason)) +
                                                    " (record simplified: ")
    assert (record["size"], record["sha256"]) == (whole, plain(digest))
    assert record["mqtt"]["topic"] == plain(message.topic)
    assert record["arrival_time_millis"] == message.arrival_millis
    if reference is not None:
        assert "body" not in record and "truncated" not in record
        assert record["reference"] == plain(reference)
    else:
        assert record["body"] == message.payload[:body_max]
        assert record.get("truncated", False) is (whole > body_max)
    if full:
        assert record["device_id"] == device_id
        assert record["bridge"] == dataclasses.asdict(lineage)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
                    | st.floats(allow_nan=False) | st.text(SAFE, max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(SAFE, max_size=8), inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(message=messages(), device_id=st.text(SAFE, max_size=30), lineage=LINEAGES,
       content_type=st.text(SAFE, max_size=30), reference=st.text(SAFE, max_size=80),
       size=st.integers(0, 2**63 - 1), sha256=st.text(SAFE, max_size=64),
       file=st.none() | st.fixed_dictionaries({"id": st.text(SAFE, max_size=20),
                                               "name": st.text(SAFE, max_size=40),
                                               "user_data": JSON}))
def test_a_reference_envelope_round_trips(
        message: Message, device_id: str, lineage: envelope.Lineage, content_type: str,
        reference: str, size: int, sha256: str, file: dict[str, Any] | None) -> None:
    record = envelope.decode(envelope.encode_reference(
        message, device_id, lineage, content_type, reference, size, sha256, file))
    assert "body" not in record
    assert (record["reference"], record["size"], record["sha256"]) == (reference, size, sha256)
    assert (record["device_id"], record["content_type"]) == (device_id, content_type)
    assert record["mqtt"]["topic"] == message.topic
    assert record.get("file") == file


@settings(max_examples=100, deadline=None)
@given(message=messages(), device_id=st.text(SAFE, max_size=30), lineage=LINEAGES,
       content_type=st.text(SAFE, max_size=30), keep=st.integers(0, 110_000))
def test_a_truncated_envelope_round_trips(message: Message, device_id: str,
                                          lineage: envelope.Lineage, content_type: str,
                                          keep: int) -> None:
    record = envelope.decode(envelope.encode_truncated(message, device_id, lineage,
                                                       content_type, keep))
    payload = message.payload
    assert record["body"] == payload[:keep] and record["truncated"] is True
    assert (record["size"], record["sha256"]) == (len(payload),
                                                  hashlib.sha256(payload).hexdigest())
    assert (record["device_id"], record["content_type"]) == (device_id, content_type)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=10).filter(encodable) | st.binary(max_size=10)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4).filter(encodable) | st.integers(0, 9), inner,
                      max_size=4),
    max_leaves=10)


@st.composite
def envelope_like(draw: st.DrawFn) -> bytes:
    """Bytes near an envelope: a packed value, maybe a map with `v`, then cut or changed."""
    value = draw(MSGPACK_VALUES)
    if draw(st.booleans()):
        value = {"v": draw(MSGPACK_VALUES), "body": value}
    packed = bytearray(msgpack.packb(value))
    if packed and draw(st.booleans()):
        packed[draw(st.integers(0, len(packed) - 1))] = draw(st.integers(0, 255))
    return bytes(packed[:draw(st.integers(0, len(packed)))] if draw(st.booleans()) else packed)


@settings(max_examples=150, deadline=None)
@given(value=st.binary(max_size=300) | envelope_like())
def test_decode_refuses_with_value_error_only(value: bytes) -> None:
    try:
        decoded = envelope.decode(value)
    except ValueError:
        return
    assert isinstance(decoded, dict) and isinstance(decoded["v"], int)


# ------------------------------------------------------------------ the dry-run pipeline

KEY = bytes(range(32))
REGISTRY = Registry(MappingProxyType({
    "d1": Device("active", KEY), "d2": Device("revoked", KEY), "d3": Device("disabled"),
    "d4": Device("active")}))
PIPELINE_TOML = HEADER + """
[lanes.bulk]
"message.max.bytes" = 131072
[[routes]]
name = "json"
filter = "devices/{device_id}/json"
kafka_topic = "iot.json"
format = "json"
key = "device_id"
[[routes]]
name = "msgpack"
filter = "devices/{device_id}/msgpack"
kafka_topic = "iot.msgpack"
format = "msgpack"
format_max_bytes = 40000
[[routes]]
name = "signed"
filter = "devices/{device_id}/signed"
kafka_topic = "iot.signed"
format = "json"
[[routes]]
name = "raw"
filter = "devices/{device_id}/raw/#"
kafka_topic = "iot.raw"
truncate_bytes = 100
key = "time_bucket"
[[routes]]
name = "sites"
filter = "sites/{site}/{device_id}"
kafka_topic = "iot.{site}.status"
key = "hash_bucket"
"""
AUTH = {"msgpack": "registry", "signed": "hmac", "sites": "hmac"}


def pipeline_config() -> config.Config:
    """PIPELINE_TOML with auth on three routes (a registry file is replaced by REGISTRY)."""
    parsed = config.parse(tomllib.loads(PIPELINE_TOML))
    routes = tuple(dataclasses.replace(r, auth=AUTH.get(r.name, "none")) for r in parsed.routes)
    return dataclasses.replace(parsed, registry=REGISTRY, routes=routes)


CONFIG = pipeline_config()
ROUTER_OF_PIPELINE = Router(CONFIG.routes)
# Kafka's codes cannot come from a dry run; internal_error would be a crash.
PIPELINE_CODES = (documented_codes() | MISSING_FROM_DOCS) - {"internal_error"}


class DryRun:
    """The runner of a dry run's pipeline (bridge/cli.py's _DryRun): CPU work on a thread;
    it never produces."""

    def dispatch(self, outcome: object) -> None:
        raise AssertionError("a dry run never produces")

    def in_thread(self, work: Callable[[], T]) -> Awaitable[T]:
        return asyncio.to_thread(work)


def dry_pipeline() -> Pipeline:
    return Pipeline(CONFIG, "bulk", Metrics(), runner=DryRun())


async def _run(job: Job) -> Delivery | Job | None:
    return await job.run()


def settled(outcome: Delivery | Job) -> Delivery:
    """The Delivery a prepared message ends in, running its jobs as the lane would."""
    while isinstance(outcome, Job):
        event("a job")
        result = asyncio.run(_run(outcome))
        assert result is not None, "a pipeline job ends in a Delivery"
        outcome = result
    assert isinstance(outcome, Delivery)
    return outcome


# Valid payloads, small and past the inline-check limit (checked in a job): 16 KiB and more.
VALID = {
    "json": st.one_of(JSON.map(lambda v: json.dumps(v).encode()),
                      st.integers(8_000, 60_000).map(lambda n: b"[" + b"1," * n + b"2]")),
    "msgpack": st.one_of(MSGPACK_VALUES.map(msgpack.packb),
                         st.integers(2_000, 30_000).map(lambda n: msgpack.packb(list(range(n))))),
}
# Anything: valid in either format, the same cut short, junk up to past the dead-letter
# body limit (hashed in a job).
PAYLOADS = st.one_of(VALID["json"], VALID["msgpack"], VALID["json"].map(lambda b: b[:-1]),
                     st.binary(max_size=300), seeded(16_000, 140_000))


DEVICES = often(st.sampled_from(sorted(REGISTRY.devices)),
                st.sampled_from(["stranger", "", "a b", "x" * 129]) | LEVELS)
SITES = often(st.sampled_from(["berlin", "b-2"]), LEVELS)


@st.composite
def pipeline_messages(draw: st.DrawFn) -> Message:
    """Mostly a topic of one of the routes from a known device, a payload of the route's
    format and the right signature; else anything."""
    route = draw(st.sampled_from(CONFIG.routes))
    topic = draw(often(topic_for(route.filter, {"device_id": DEVICES, "site": SITES}),
                       TOPICS))
    payload = draw(often(VALID.get(route.format, PAYLOADS), PAYLOADS))
    key = draw(often(st.just(KEY), st.just(b"wrong")))
    right = (("signature", auth.sign(key, topic, payload)),)
    properties = draw(st.sampled_from([(), right, right, right, right * 2])
                      | st.lists(st.tuples(st.sampled_from(["signature", "x"]), SIGNATURES),
                                 max_size=2).map(tuple))
    return Message("b", topic, payload, draw(st.integers(0, 2)), False, False,
                   draw(st.integers(0, 2**62)), properties)


def expected_refusal(message: Message) -> str | None:
    """The code the routing, property-limit and auth stages give this message, before its
    format check (a huge `signature` on a route that does not check it is a user property
    past the route's limits: `properties_too_large`)."""
    try:
        route, device_id, _, _ = ROUTER_OF_PIPELINE.match(message.topic)
        device = REGISTRY.admit(route.auth, device_id)
        properties.weight(message, route.properties, device_id, route.auth == "hmac")
        if device is not None and route.auth == "hmac":
            assert device.hmac_key is not None
            auth.verify(device.hmac_key, device_id, message.topic, message.payload,
                        message.user_properties)
    except Rejected as refused:
        return refused.code
    return None


def past_the_record_limit(message: Message) -> bool:
    """Whether the message, admitted, would be bridged inline (no truncation) with its
    payload and MQTT properties past the lane's message.max.bytes: `record_too_large`."""
    route, device_id, _, _ = ROUTER_OF_PIPELINE.match(message.topic)
    size = len(message.payload)
    if route.truncate_bytes is not None and size > route.truncate_bytes:
        return False
    extra = properties.weight(message, route.properties, device_id, route.auth == "hmac") \
        if message.user_properties or message.properties is not None else 0
    return size + extra > CONFIG.record_max("bulk")


def ack() -> None:
    """An on_durable the test can recognise."""


def signed(topic: str, payload: bytes) -> Message:
    return Message("b", topic, payload, 1, False, False, 1, (("signature",
                                                              auth.sign(KEY, topic, payload)),))


LONG_JSON = b"[" + b"1," * 20_000 + b"2]"  # past INLINE_CHECK_MAX: checked in a job


@settings(max_examples=150, deadline=None)
@given(message=pipeline_messages())
@example(signed("devices/d1/signed", LONG_JSON))  # checked in a job, then bridged
@example(signed("devices/d1/signed", LONG_JSON[:-1]))  # refused in a job
@example(signed("sites/berlin/d1", b"x" * 100_000))  # bridged with a template topic
@example(Message("b", "devices/d1/json", b"null", 0, False, False, 0,  # a route that does
                 (("signature", "ab" * 40_000),)))  # not check it: past its property limit
@example(signed("devices/d1/msgpack", msgpack.packb(b"x" * 50_000)))  # payload_too_large
@example(signed("devices/d1/json", b"\xff" * 100_000))  # a dead letter hashed in a job
@example(Message("b", "devices/d1/json", b"[" + b"1," * 60_000 + b"2]", 1, False, False, 0,
                 (("signature", "ab" * 6_000),)))  # valid, but with its property past the
#                                                    lane's message.max.bytes: record_too_large
def test_the_pipeline_settles_every_message_on_its_route_or_as_a_dead_letter(
        message: Message) -> None:
    pipe = dry_pipeline()
    delivery = settled(pipe.prepare(message, ack))
    assert delivery.on_durable is ack, "the ack rides on the outcome"
    again = settled(pipe.prepare(message, ack))  # a cached plan gives the same record
    assert (again.topic, again.key, again.value) == (delivery.topic, delivery.key,
                                                     delivery.value)
    record = envelope.decode(delivery.value)
    payload, refusal = message.payload, expected_refusal(message)
    if delivery.topic == CONFIG.dead_letter_topic:
        code = record["error"]["code"]
        event(f"dead letter: {code}")
        assert code in PIPELINE_CODES
        assert refusal is None or code == refusal
        assert refusal is not None or code in {"bad_payload", "payload_too_large"} or (
            code == "record_too_large" and past_the_record_limit(message))
        assert (record["size"], record["sha256"]) == (len(payload),
                                                      hashlib.sha256(payload).hexdigest())
        assert payload.startswith(record["body"])
        assert record.get("truncated", False) is (len(record["body"]) < len(payload))
        return
    assert refusal is None and not past_the_record_limit(message)
    route, device_id, _, kafka_topic = ROUTER_OF_PIPELINE.match(message.topic)
    event(f"bridged by {route.name}")
    assert (delivery.topic, record["device_id"]) == (kafka_topic, device_id)
    assert delivery.key == route.key.key(device_id, message.arrival_millis)
    keep = route.truncate_bytes
    if keep is not None and len(payload) > keep:
        assert record["body"] == payload[:keep] and record["truncated"] is True
    else:
        assert record["body"] == payload and "truncated" not in record
