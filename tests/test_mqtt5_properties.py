"""MQTT 5 properties into Kafka, without servers: user properties as headers, the W3C trace
context, the envelope's `mqtt` keys, the limits, the config keys and the bridge's spans."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bridge import config, envelope, properties
from bridge.errors import Rejected
from bridge.kafka import Delivery
from bridge.message import Message, Properties
from bridge.metrics import Metrics, Receipt
from bridge.pipeline import Pipeline
from bridge.properties import Limits, copy, valid_traceparent
from bridge.tracing import Ending, Tracer
from tests.test_config import GOOD, problems_of
from tests.test_properties import DryRun, settled

TRACE_ID, SPAN_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
HEX = "0123456789abcdef"
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


# ------------------------------------------------------------------ traceparent

@pytest.mark.parametrize("value", [
    TRACEPARENT,
    f"00-{TRACE_ID}-{SPAN_ID}-00",
    f"01-{TRACE_ID}-{SPAN_ID}-01",  # a later version: its first four fields are read
    f"01-{TRACE_ID}-{SPAN_ID}-01-what-comes-next",
])
def test_valid_traceparents(value: str) -> None:
    assert valid_traceparent(value)


@pytest.mark.parametrize("value", [
    "",
    TRACEPARENT.upper(),  # lowercase hex only
    f"00-{'0' * 32}-{SPAN_ID}-01",  # an all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # an all-zero parent id
    f"ff-{TRACE_ID}-{SPAN_ID}-01",  # version ff is invalid
    f"00-{TRACE_ID}-{SPAN_ID}-01-x",  # version 00 has exactly four fields
    f"01-{TRACE_ID}-{SPAN_ID}-01x",
    TRACEPARENT[:-1],
    f"00-{TRACE_ID[:-1]}g-{SPAN_ID}-01",
    f"00_{TRACE_ID}_{SPAN_ID}_01",
    f" {TRACEPARENT}",
])
def test_invalid_traceparents(value: str) -> None:
    assert not valid_traceparent(value)


ids = st.tuples(st.text(HEX, min_size=2, max_size=2).filter(lambda v: v != "ff"),
                st.text(HEX, min_size=32, max_size=32).filter(lambda v: v.strip("0")),
                st.text(HEX, min_size=16, max_size=16).filter(lambda v: v.strip("0")),
                st.text(HEX, min_size=2, max_size=2))


@given(ids, st.integers(0, 54))
def test_a_traceparent_is_valid_and_any_uppercase_letter_breaks_it(
        parts: tuple[str, str, str, str], where: int) -> None:
    value = "-".join(parts)
    assert valid_traceparent(value)
    if value[where].isalpha():
        assert not valid_traceparent(value[:where] + value[where].upper() + value[where + 1:])


@given(st.text(max_size=80))
def test_any_text_is_judged_without_raising(value: str) -> None:
    assert valid_traceparent(value) in (True, False)


# ------------------------------------------------------------------ headers

def test_user_properties_become_headers_in_order_with_repeats() -> None:
    got = copy((("site", "berlin"), ("tag", "a"), ("tag", "b"), ("ünï", "çödé")), Limits())
    assert got.user == [("mqtt.user.site", b"berlin"), ("mqtt.user.tag", b"a"),
                        ("mqtt.user.tag", b"b"), ("mqtt.user.ünï", "çödé".encode())]
    assert got.trace == [] and not got.invalid_traceparent
    assert got.size == sum(len(n.encode()) + len(v) for n, v in got.user)


def test_the_trace_context_is_copied_under_its_own_names_whatever_the_prefix() -> None:
    sent = (("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2"),
            ("x", "y"))
    for prefix in ("mqtt.user.", "p.", None):
        got = copy(sent, Limits(prefix=prefix))
        assert got.trace == [("traceparent", TRACEPARENT.encode()), ("tracestate", b"a=1,b=2")]
        assert got.user == ([] if prefix is None else [(prefix + n, v.encode()) for n, v in sent])


def test_an_invalid_traceparent_stays_under_the_prefix_only_and_is_flagged() -> None:
    for sent in ((("traceparent", TRACEPARENT.upper()), ("tracestate", "a=1")),
                 (("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT))):
        got = copy(sent, Limits())
        assert got.trace == [] and got.invalid_traceparent
        assert [n for n, _ in got.user] == [f"mqtt.user.{n}" for n, _ in sent]
    assert copy((("traceparent", "nope"),), Limits(prefix=None)).user == []


def test_the_signature_stays_out_on_hmac_routes_only() -> None:
    sent = (("signature", "ab" * 32), ("site", "b"))
    assert [n for n, _ in copy(sent, Limits(), drop_signature=True).user] == ["mqtt.user.site"]
    assert [n for n, _ in copy(sent, Limits()).user] == ["mqtt.user.signature",
                                                         "mqtt.user.site"]


def test_too_many_or_too_large_properties_are_refused_with_a_code() -> None:
    with pytest.raises(Rejected) as many:
        copy(tuple(("k", "v") for _ in range(1001)), Limits(), "d1")
    assert many.value.code == "properties_too_large" and many.value.device_id == "d1"
    assert "1001 user properties" in many.value.reason
    with pytest.raises(Rejected) as large:
        copy((("k", "v" * 70_000),), Limits())
    assert large.value.code == "properties_too_large"
    with pytest.raises(Rejected):  # the trace context counts when copying is off
        copy((("traceparent", TRACEPARENT), ("tracestate", "s" * 10_000)),
             Limits(prefix=None, max_bytes=5_000))
    # a tracestate longer than W3C allows is not propagated (nor counted)
    assert copy((("traceparent", TRACEPARENT), ("tracestate", "s" * 70_000)),
                Limits(prefix=None)).trace == [("traceparent", TRACEPARENT.encode())]
    # off: any number of properties that are not copied
    assert copy(tuple(("k", "v") for _ in range(5000)), Limits(prefix=None)).size == 0


@given(st.lists(st.tuples(TEXT, TEXT), max_size=30), st.sampled_from(["mqtt.user.", "u_"]))
def test_headers_are_the_properties_prefixed_or_a_refusal(
        sent: list[tuple[str, str]], prefix: str) -> None:
    limits = Limits(prefix, max_count=20, max_bytes=300)
    try:
        got = copy(tuple(sent), limits)
    except Rejected as refused:
        assert refused.code == "properties_too_large"
        assert len(sent) > 20 or sum(len((prefix + n).encode()) + len(v.encode())
                                     for n, v in sent) > 300
        return
    assert got.user == [(prefix + n, v.encode()) for n, v in sent]
    assert got.size <= 300


def test_lone_surrogates_do_not_crash_a_copy() -> None:
    got = copy((("k\ud800", "v\udcff"),), Limits())
    assert got.user == [("mqtt.user.k\\ud800", b"v\\udcff")]


# ------------------------------------------------------------------ envelope keys

def test_the_mqtt_map_gets_only_the_properties_present() -> None:
    assert properties.mqtt_fields(Properties(content_type="text/plain")) == {
        "content_type": "text/plain"}
    assert properties.mqtt_fields(Properties(None, 1, 0, "reply/here", b"\x00\x01")) == {
        "payload_format_indicator": 1, "message_expiry_interval": 0,
        "response_topic": "reply/here", "correlation_data": b"\x00\x01"}


# ------------------------------------------------------------------ config

def test_route_keys_have_defaults_and_are_checked() -> None:
    loaded = config.parse(tomllib.loads(GOOD))
    assert loaded.routes[0].properties == Limits("mqtt.user.", 1000, 65536)
    assert not loaded.tracing_spans
    custom = config.parse(tomllib.loads(GOOD + 'user_properties = "up."\n'
                                        "user_properties_max_count = 10\n"
                                        "user_properties_max_bytes = 4096\n"
                                        "[tracing]\nspans = true\n"))
    assert custom.routes[0].properties == Limits("up.", 10, 4096)
    assert custom.tracing_spans
    off = config.parse(tomllib.loads(GOOD + "user_properties = false\n"))
    assert off.routes[0].properties.prefix is None


@pytest.mark.parametrize(("value", "reason"), [
    ("true", "header name prefix"),
    ('""', "1 to 64"),
    ('"a b"', "1 to 64"),
    ('"mqtt."', "forge the bridge's header 'mqtt.topic'"),
    ('"t"', "'traceparent'"),
    ('"dev"', "'device_id'"),
    ("1", "must be a string or true or false, got int"),
])
def test_a_prefix_that_could_forge_a_bridge_header_is_refused(value: str, reason: str) -> None:
    problems = problems_of(GOOD + f"user_properties = {value}\n")
    assert len(problems) == 1 and problems[0].startswith("routes[0].user_properties: ")
    assert reason in problems[0]


def test_caps_and_the_tracing_table_are_checked() -> None:
    assert problems_of(GOOD + "user_properties_max_count = -1\n")[0].startswith(
        "routes[0].user_properties_max_count: ")
    assert problems_of(GOOD + "[tracing]\nspans = 1\nsample = 2\n") == [
        "tracing.spans: must be true or false, got int", "tracing.sample: unknown key"]


# ------------------------------------------------------------------ the pipeline

def pipeline(extra: str = "", route: str = "") -> Pipeline:
    text = GOOD.replace("[dead_letter]", f"{extra}\n[dead_letter]") + route
    return Pipeline(config.parse(tomllib.loads(text)), "bulk", Metrics(), runner=DryRun())


def message(user: tuple[tuple[str, str], ...] = (), props: Properties | None = None,
            payload: bytes = b"21.5") -> Message:
    return Message("b1", "devices/d1/telemetry", payload, 1, False, False, 1700000000000,
                   user, props)


LINEAGE = [("mqtt.topic", b"devices/d1/telemetry"), ("device_id", b"d1"),
           ("mqtt.broker", b"b1"), ("bridge.instance", b"edge-1")]


def test_a_message_with_properties_gets_headers_and_mqtt_keys() -> None:
    sent = message((("site", "berlin"), ("tag", "a"), ("tag", "b"),
                    ("traceparent", TRACEPARENT)),
                   Properties("application/json", 1, 30, "devices/d1/reply", b"req-7"))
    got = settled(pipeline().prepare(sent, None))
    assert got.topic == "iot.telemetry"
    assert got.headers == [*LINEAGE, ("traceparent", TRACEPARENT.encode()),
                           ("mqtt.user.site", b"berlin"), ("mqtt.user.tag", b"a"),
                           ("mqtt.user.tag", b"b"),
                           ("mqtt.user.traceparent", TRACEPARENT.encode())]
    env = envelope.decode(got.value)
    assert env["content_type"] == "application/octet-stream"  # the route's, not the device's
    assert env["mqtt"] == {"topic": "devices/d1/telemetry", "qos": 1, "broker": "b1",
                           "retain": False, "dup": False, "content_type": "application/json",
                           "payload_format_indicator": 1, "message_expiry_interval": 30,
                           "response_topic": "devices/d1/reply", "correlation_data": b"req-7"}


def test_a_message_without_properties_keeps_the_plans_headers_and_template() -> None:
    lane = pipeline()
    first = settled(lane.prepare(message(), None))
    again = settled(lane.prepare(message(), None))  # the fast path, from the cached plan
    assert again.headers is first.headers and again.headers == LINEAGE
    assert envelope.decode(again.value) == envelope.decode(
        envelope.encode(message(), "d1", envelope.Lineage("edge-1", "route-0",
                                                          lane.config.version)))
    # and a message with properties on that topic still gets its own
    with_props = settled(lane.prepare(message((("a", "1"),)), None))
    assert with_props.headers == [*LINEAGE, ("mqtt.user.a", b"1")]


def test_user_properties_off_copies_the_trace_context_alone() -> None:
    sent = message((("site", "berlin"), ("traceparent", TRACEPARENT), ("tracestate", "v=1")))
    got = settled(pipeline(route="user_properties = false\n").prepare(sent, None))
    assert got.headers == [*LINEAGE, ("traceparent", TRACEPARENT.encode()),
                           ("tracestate", b"v=1")]


def test_an_invalid_traceparent_is_counted_never_a_dead_letter() -> None:
    lane = pipeline()
    got = settled(lane.prepare(message((("traceparent", "00-bad"),)), None))
    assert got.topic == "iot.telemetry"
    assert got.headers == [*LINEAGE, ("mqtt.user.traceparent", b"00-bad")]
    assert b"invalid_traceparents_total 1.0" in lane.metrics.exposition()


def test_thousands_of_properties_are_a_dead_letter_with_the_reason() -> None:
    sent = message((*((f"k{i}", "v") for i in range(5000)), ("traceparent", TRACEPARENT)))
    receipt = Receipt(None, None)
    got = settled(pipeline().prepare(sent, receipt))
    assert got.topic == "iot.deadletter" and receipt.code == "properties_too_large"
    assert envelope.decode(got.value)["error"]["code"] == "properties_too_large"
    # the dead letter keeps the trace context, not the thousands of properties
    assert got.headers == [*LINEAGE, ("error.code", b"properties_too_large"),
                           ("traceparent", TRACEPARENT.encode())]


def test_properties_count_against_the_record_size() -> None:
    lane = pipeline('"message.max.bytes" = 20000',
                    "user_properties_max_bytes = 1000000\nuser_properties_max_count = 100000\n")
    sent = message(tuple((f"k{i}", "v" * 100) for i in range(150)), payload=b"x" * 10_000)
    got = settled(lane.prepare(sent, None))
    assert got.topic == "iot.deadletter"
    refused = envelope.decode(got.value)["error"]
    assert refused["code"] == "record_too_large" and "bytes of MQTT properties" in \
        refused["reason"]
    assert settled(lane.prepare(sent._replace(user_properties=()), None)).topic == \
        "iot.telemetry"


def test_properties_count_in_bytes_not_characters() -> None:
    """A content type of 4-byte characters is four times its length in the record."""
    lane = pipeline('"message.max.bytes" = 20000')
    sent = message(props=Properties(content_type="\U0001f600" * 3_000), payload=b"x" * 9_000)
    got = settled(lane.prepare(sent, None))
    assert got.topic == "iot.deadletter"
    assert envelope.decode(got.value)["error"]["code"] == "record_too_large"


def test_a_dead_letter_sent_again_smaller_leaves_the_properties_out() -> None:
    lane = pipeline()
    sent = message((("a", "1"),), Properties(response_topic="r" * 60_000,
                                             correlation_data=b"c" * 60_000))
    full = lane.dead_letter(sent, "d1", lane.no_route_lineage, Rejected("record_too_large", "x"),
                            None)
    assert envelope.decode(full.value)["mqtt"]["response_topic"] == "r" * 60_000
    shrunk = lane.dead_letter(sent, "d1", lane.no_route_lineage,
                              Rejected("record_too_large", "x"), None, shrunk=True)
    assert "response_topic" not in envelope.decode(shrunk.value)["mqtt"]
    assert len(shrunk.value) < 1000


def test_a_dead_letter_never_carries_a_trace_context_past_the_w3c_bounds() -> None:
    """A tracestate is the device's text: a dead letter's headers must not carry megabytes
    of it, or Kafka refuses that record too, even sent again smaller, and the message
    is retried forever behind every later ack."""
    lane = pipeline()
    huge = tuple(("tracestate", "k=" + "v" * 60_000) for _ in range(40))
    sent = message((("traceparent", TRACEPARENT), *huge))
    got = settled(lane.prepare(sent, None))
    assert envelope.decode(got.value)["error"]["code"] == "properties_too_large"
    assert got.headers == [*LINEAGE, ("error.code", b"properties_too_large"),
                           ("traceparent", TRACEPARENT.encode())]
    shrunk = lane.dead_letter(sent, "d1", lane.no_route_lineage,
                              Rejected("record_too_large", "x"), None, shrunk=True)
    assert sum(len(n) + len(v or b"") for n, v in shrunk.headers) < 1000


def test_a_dead_letter_sent_again_smaller_carries_nothing_optional() -> None:
    """Kafka refused a dead letter as too large: its last attempt has no body inline, no
    MQTT properties and no trace headers, only lineage and the error code."""
    lane = pipeline()
    sent = message((("traceparent", TRACEPARENT), ("tracestate", "k=v")))._replace(
        properties=Properties(content_type="text/plain", response_topic="r" * 60_000))
    shrunk = lane.dead_letter(sent, "d1", lane.no_route_lineage,
                              Rejected("record_too_large", "x"), None, shrunk=True)
    assert shrunk.headers == [*envelope.headers(sent, "d1", lane.no_route_lineage),
                              ("error.code", b"record_too_large")]
    record = envelope.decode(shrunk.value)
    assert record["body"] == b"" and "response_topic" not in record["mqtt"]


# ------------------------------------------------------------------ spans

@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK with an in-memory exporter as the global provider (it can be set once)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


def test_a_span_per_message_child_of_the_devices_trace(spans: InMemorySpanExporter) -> None:
    spans.clear()
    receipt = Receipt(None, None)
    headers, ending = Tracer("edge-1").send("iot.telemetry", b"1700", 4, "devices/d1/t",
                                            TRACEPARENT, "v=1", receipt)
    assert spans.get_finished_spans() == ()  # open until Kafka has the record
    ending()
    assert receipt.done
    (span,) = spans.get_finished_spans()
    context = span.get_span_context()
    assert span.name == "send iot.telemetry" and span.kind is SpanKind.PRODUCER
    assert span.parent is not None and span.parent.span_id == int(SPAN_ID, 16)
    assert context is not None and context.trace_id == int(TRACE_ID, 16)
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka", "messaging.operation.type": "send",
        "messaging.operation.name": "send", "messaging.destination.name": "iot.telemetry",
        "messaging.message.body.size": 4, "messaging.client.id": "edge-1",
        "mqtt.topic": "devices/d1/t", "messaging.kafka.message.key": "1700"}
    assert headers == [("traceparent", f"00-{TRACE_ID}-{context.span_id:016x}-01".encode()),
                       ("tracestate", b"v=1")]


def test_a_refused_record_marks_its_span_an_error(spans: InMemorySpanExporter) -> None:
    spans.clear()
    receipt = Receipt(None, None)
    _, ending = Tracer("edge-1").send("iot.t", None, 0, "t", None, None, receipt)
    ending.refused("record_too_large")
    ending()
    ending()  # a second call ends nothing twice
    (span,) = spans.get_finished_spans()
    assert span.parent is None  # no traceparent: a root span
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "record_too_large"
    assert receipt.code == "record_too_large"


def test_spans_on_give_every_record_the_bridges_context(spans: InMemorySpanExporter) -> None:
    spans.clear()
    lane = pipeline("[tracing]\nspans = true")
    for sent in (message(), message((("traceparent", TRACEPARENT), ("a", "1")))):
        for _ in range(2):  # the second from the cached plan: no fast path with spans on
            got = settled(lane.prepare(sent, Receipt(None, None)))
            assert isinstance(got, Delivery) and isinstance(got.on_durable, Ending)
            got.on_durable()
            span = spans.get_finished_spans()[-1]
            context = span.get_span_context()
            assert context is not None
            names = [name for name, _ in got.headers]
            assert names[:5] == [*(n for n, _ in LINEAGE), "traceparent"]
            sent_on = dict(got.headers)["traceparent"]
            assert isinstance(sent_on, bytes)
            assert sent_on[:52] == f"00-{context.trace_id:032x}-{context.span_id:016x}".encode()
    assert len(spans.get_finished_spans()) == 4


def test_spans_off_import_no_opentelemetry() -> None:
    """The daemon's modules never import OpenTelemetry unless a config turns spans on."""
    import subprocess
    import sys

    code = ("import sys, tomllib; from bridge import daemon, pipeline, config; "
            "from bridge.metrics import Metrics; from tests.test_config import GOOD; "
            "pipeline.Pipeline(config.parse(tomllib.loads(GOOD)), 'bulk', Metrics()); "
            "print(any(m.startswith('opentelemetry') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_with_the_api_alone_the_devices_context_passes_through() -> None:
    """No SDK: the span is a no-op that carries the device's context, so the record's
    traceparent is the device's own, and a message without one gets none."""
    tracer = Tracer("edge-1", trace.NoOpTracerProvider())
    headers, ending = tracer.send("iot.t", None, 1, "t", TRACEPARENT, "v=1", None)
    assert headers == [("traceparent", TRACEPARENT.encode()), ("tracestate", b"v=1")]
    ending()  # QoS 0: no ack to call, and nothing raises
    assert tracer.send("iot.t", None, 1, "t", None, None, None)[0] == []
