"""The Sparkplug B host state and decoding, alone: seq wrap, alias tables, bdSeq, bounds."""

from __future__ import annotations

import asyncio
import gc
import struct
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from typing import Any

import pysparkplug as spb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import config, envelope
from bridge.errors import ConfigError, Rejected
from bridge.kafka import Delivery
from bridge.message import Message
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline
from bridge.sparkplug import (
    REBIRTH,
    Decoded,
    HostState,
    Limits,
    Metric,
    Topic,
    decode,
    rebirth_request,
    records,
)
from bridge.sparkplug_host import REBIRTHS_UNANSWERED_MAX, OwnState, Sparkplug
from bridge.sparkplug_pb import Payload
from tests.test_config import GOOD

NODE = Topic("g", "NBIRTH", "e", None)


def topic(kind: str, device: str | None = None, edge: str = "e") -> Topic:
    return Topic("g", kind, edge, device)


def metric(name: str | None = None, alias: int | None = None, datatype: int | None = 10,
           **value: Any) -> Metric:
    pb = Payload.Metric()
    for field, raw in value.items():
        setattr(pb, field, raw)
    return Metric(name, alias, None, datatype, False, False, False, pb)


def birth(bd_seq: int = 0, seq: int = 0, aliases: int = 2) -> Decoded:
    metrics = [metric(f"m{i}", i, 10) for i in range(aliases)]
    return Decoded(1, seq, [*metrics, metric("bdSeq", None, 4)], bd_seq)


def data(seq: int, *aliases: int) -> Decoded:
    return Decoded(2, seq, [metric(None, a, None) for a in aliases], None)


def test_data_carrying_only_aliases_gets_its_names_and_datatypes() -> None:
    state = HostState(Limits())
    assert state.observe(NODE, birth(), 0).online is True
    decoded = data(1, 1, 0)
    verdict = state.observe(topic("NDATA"), decoded, 0)
    assert verdict.issues == () and verdict.rebirth is None
    assert [(m.name, m.datatype) for m in decoded.metrics] == [("m1", 10), ("m0", 10)]


def test_data_before_any_birth_is_stale_and_asks_for_a_rebirth_once_per_interval() -> None:
    state = HostState(Limits(rebirth_interval=5))
    first = state.observe(topic("NDATA"), data(7, 1), 100.0)
    assert first.rebirth == "no_birth" and set(first.issues) == {"no_birth", "unknown_alias"}
    assert state.observe(topic("NDATA"), data(8, 1), 104.0).rebirth is None
    assert state.observe(topic("NDATA"), data(9, 1), 105.0).rebirth == "no_birth"


def test_an_unknown_alias_asks_for_a_rebirth_and_leaves_the_name_empty() -> None:
    state = HostState(Limits())
    state.observe(NODE, birth(), 0)
    decoded = data(1, 99)
    verdict = state.observe(topic("NDATA"), decoded, 0)
    assert verdict.rebirth == "unknown_alias" and decoded.metrics[0].name is None


@given(st.integers(0, 255), st.integers(1, 600))
def test_seq_runs_0_to_255_and_wraps_without_a_gap(start: int, count: int) -> None:
    state = HostState(Limits())
    state.observe(NODE, birth(seq=start), 0)
    for i in range(1, count + 1):
        verdict = state.observe(topic("NDATA"), data((start + i) % 256, 0), 0)
        assert verdict.issues == ()


@given(st.integers(0, 255), st.integers(2, 255))
def test_a_seq_gap_asks_for_a_rebirth_and_resyncs(start: int, skip: int) -> None:
    state = HostState(Limits())
    state.observe(NODE, birth(seq=start), 0)
    gap = state.observe(topic("NDATA"), data((start + skip) % 256, 0), 0)
    assert gap.rebirth == "seq_gap" and gap.issues == ("seq_gap",)
    assert state.observe(topic("NDATA"), data((start + skip + 1) % 256, 0), 99).issues == ()


def test_a_death_of_the_current_birth_clears_the_tables() -> None:
    state = HostState(Limits())
    state.observe(NODE, birth(bd_seq=3), 0)
    death = state.observe(topic("NDEATH"), Decoded(None, None, [], 3), 0)
    assert death.online is False and death.issues == ()
    assert state.nodes == {} and state.bytes == 0
    assert state.observe(topic("NDATA"), data(1, 0), 10).rebirth == "no_birth"


def test_a_death_of_an_older_birth_is_stale_and_changes_nothing() -> None:
    state = HostState(Limits())
    state.observe(NODE, birth(bd_seq=4), 0)
    death = state.observe(topic("NDEATH"), Decoded(None, None, [], 3), 0)
    assert death.online is None and death.issues == ("stale_death",)
    assert state.observe(topic("NDATA"), data(1, 0), 0).issues == ()


def test_devices_have_their_own_births_and_deaths() -> None:
    state = HostState(Limits())
    state.observe(NODE, birth(aliases=1), 0)
    dbirth = Decoded(1, 1, [metric("temp", 50, 9)], None)
    assert state.observe(topic("DBIRTH", "d1"), dbirth, 0).online is True
    decoded = data(2, 50)
    assert state.observe(topic("DDATA", "d1"), decoded, 0).issues == ()
    assert decoded.metrics[0].name == "temp"
    assert state.observe(topic("DDEATH", "d1"), Decoded(3, 3, [], None), 0).online is False
    after = state.observe(topic("DDATA", "d1"), data(4, 50), 10)
    assert set(after.issues) == {"unknown_device", "unknown_alias"}
    # a node-level alias is not a device's
    assert state.observe(topic("NDATA"), data(5, 50), 20).issues == ("unknown_alias",)


def test_nodes_past_max_nodes_are_evicted_least_recent_first() -> None:
    state = HostState(Limits(max_nodes=2))
    state.observe(topic("NBIRTH", edge="a"), birth(), 0)
    state.observe(topic("NBIRTH", edge="b"), birth(), 0)
    state.observe(topic("NDATA", edge="a"), data(1, 0), 0)  # a is now the most recent
    verdict = state.observe(topic("NBIRTH", edge="c"), birth(), 0)
    assert verdict.evicted == (("g", "b"),)
    assert list(state.nodes) == [("g", "a"), ("g", "c")]


def test_the_byte_budget_evicts_and_a_node_larger_than_it_keeps_no_tables() -> None:
    state = HostState(Limits(max_state_bytes=2000))
    state.observe(topic("NBIRTH", edge="a"), birth(aliases=3), 0)
    verdict = state.observe(topic("NBIRTH", edge="b"), birth(aliases=4), 0)
    assert verdict.evicted == (("g", "a"),) and state.bytes <= 2000
    big = state.observe(topic("NBIRTH", edge="c"), birth(aliases=50), 0)
    assert state.bytes <= 2000 and ("g", "c") in state.nodes and big.evicted == (("g", "b"),)
    stale = state.observe(topic("NDATA", edge="c"), data(1, 3), 0)
    assert stale.issues == ("tables_full",) and stale.rebirth is None  # no rebirth loop


def test_aliases_per_node_are_capped_and_the_rest_are_not_asked_for_again() -> None:
    state = HostState(Limits(max_aliases_per_node=3))
    verdict = state.observe(NODE, birth(aliases=10), 0)
    assert "tables_full" in verdict.issues
    assert state.observe(topic("NDATA"), data(1, 2), 0).issues == ()
    assert state.observe(topic("NDATA"), data(2, 9), 0).rebirth is None


def test_commands_change_no_state() -> None:
    state = HostState(Limits())
    assert state.observe(topic("NCMD"), Decoded(1, None, [], None), 0).issues == ()
    assert state.nodes == {}


@given(st.lists(st.tuples(st.sampled_from(["NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA"]),
                          st.sampled_from("abcdefgh"), st.integers(0, 255),
                          st.integers(0, 40)), max_size=80))
def test_the_state_stays_within_its_bounds_whatever_arrives(
        events: list[tuple[str, str, int, int]]) -> None:
    limits = Limits(max_nodes=3, max_aliases_per_node=20, max_state_bytes=3000)
    state = HostState(limits)
    for kind, edge, seq, aliases in events:
        device = "d" if kind.startswith("D") else None
        decoded = birth(seq % 4, seq, aliases) if kind.endswith("BIRTH") else \
            Decoded(None, seq, [], seq % 4) if kind == "NDEATH" else data(seq, aliases)
        state.observe(topic(kind, device, edge), decoded, 0)
        assert len(state.nodes) <= limits.max_nodes
        assert state.bytes == sum(n.cost for n in state.nodes.values()) <= 3000 + 2000
        assert all(len(n.aliases) <= 20 for n in state.nodes.values())


def retained_by(work: Callable[[], object]) -> int:
    """Bytes that `work` allocated and that are still held when it is done."""
    gc.collect()
    tracemalloc.start()
    try:
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kinds", [("NDATA",), ("NBIRTH",), ("DBIRTH",)])
def test_names_a_device_chooses_stay_within_max_state_bytes(kinds: tuple[str, ...]) -> None:
    """Node and device names are topic levels of up to 64 KB: every copy the state keeps
    of them (nodes, devices born, rebirth requests asked) counts against its budget."""
    budget = 1 << 20
    state = HostState(Limits(max_state_bytes=budget))
    state.observe(NODE, birth(), 0)

    def flood() -> None:
        for i in range(400):
            name = f"{i}-" + "x" * 50_000
            if kinds == ("DBIRTH",):  # one node, ever more devices
                state.observe(topic("DBIRTH", name), Decoded(1, None, [], None), 0)
            elif kinds == ("NBIRTH",):
                state.observe(topic("NBIRTH", edge=name), birth(aliases=0), 0)
            else:  # no birth: each asks for a rebirth
                assert state.observe(topic("NDATA", edge=name), data(1), 0).rebirth
    held = retained_by(flood)  # 400 names are 20 MB
    assert held < 2 * budget
    assert state.bytes <= budget


def test_a_birth_repeating_an_alias_or_name_costs_what_it_keeps() -> None:
    """A birth that names one metric a thousand times keeps one entry: charging each
    repeat would let one node's births push every other node out of the budget."""
    state = HostState(Limits(max_state_bytes=100_000))
    state.observe(topic("NBIRTH", edge="other"), birth(), 0)
    state.observe(NODE, birth(), 0)
    repeats = Decoded(1, None, [metric("m", 0, 10) for _ in range(1000)], None)
    for _ in range(50):
        state.observe(topic("DBIRTH", "d"), repeats, 0)
    node = state.nodes[("g", "e")]
    assert len(node.aliases) == 2 and len(node.datatypes) == 4  # alias 0 is now d's
    assert state.bytes < 5_000 and ("g", "other") in state.nodes


# -- decoding -------------------------------------------------------------------------------


def test_decodes_what_pysparkplug_encodes() -> None:
    metrics = (spb.Metric(timestamp=5, name="temp", datatype=spb.DataType.DOUBLE, value=21.5,
                          alias=1),
               spb.Metric(timestamp=5, name="count", datatype=spb.DataType.INT16, value=-3,
                          alias=2),
               spb.Metric(timestamp=5, name="bdSeq", datatype=spb.DataType.INT64, value=7),
               spb.Metric(timestamp=5, name="off", datatype=spb.DataType.BOOLEAN, value=None,
                          is_null=True))
    raw = spb.NBirth(timestamp=9, seq=0, metrics=metrics).encode(include_dtypes=True)
    decoded = decode(raw, 100)
    assert (decoded.timestamp, decoded.seq, decoded.bd_seq) == (9, 0, 7)
    records = [m.record() for m in decoded.metrics]
    assert records[0] == {"name": "temp", "alias": 1, "timestamp": 5, "datatype": "Double",
                          "value": 21.5, "is_null": False, "is_historical": False,
                          "is_transient": False}
    assert records[1]["value"] == -3 and records[1]["datatype"] == "Int16"
    assert records[3]["value"] is None and records[3]["is_null"] is True


@pytest.mark.parametrize(("datatype", "raw", "value"), [
    (24, struct.pack("<3i", -1, 0, 7), [-1, 0, 7]),
    (31, struct.pack("<2d", 1.5, -2.0), [1.5, -2.0]),
    (33, b"a\0bc\0", ["a", "bc"]),
    (32, (3).to_bytes(4, "little") + bytes([0b10100000]), [True, False, True]),
])
def test_arrays_unpack_from_their_bytes(datatype: int, raw: bytes, value: list[Any]) -> None:
    assert metric("a", datatype=datatype, bytes_value=raw).record()["value"] == value


def test_an_array_of_the_wrong_size_keeps_the_message_and_says_why() -> None:
    record = metric("a", datatype=24, bytes_value=b"\1\2\3").record()
    assert record["value"] is None and "Int32Array" in record["value_error"]


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x12\x05abc", bytes(range(40)),
                                     b"\x12\x04\x0a\x02\xff\xfe"])  # a name not UTF-8
def test_bytes_that_are_no_sparkplug_payload_are_refused(payload: bytes) -> None:
    with pytest.raises(Rejected) as refused:
        decode(payload, 100)
    assert refused.value.code == "bad_sparkplug_payload"


def test_a_string_value_that_is_not_utf8_keeps_the_message_and_says_why() -> None:
    raw = b"\x12\x07\x0a\x01a\x7a\x02\xff\xfe"  # name "a", string_value b"\xff\xfe"
    record = decode(raw, 10).metrics[0].record()
    assert record["value"] is None and "UTF-8" in record["value_error"]


def test_too_many_metrics_are_refused() -> None:
    pb = Payload()
    for _ in range(5):
        pb.metrics.add().name = "x"
    with pytest.raises(Rejected) as refused:
        decode(pb.SerializeToString(), 4)
    assert refused.value.code == "sparkplug_too_many_metrics"


@pytest.mark.parametrize("bad", ["spBv1.0/g/NDATA", "spBv1.0/g/DDATA/e", "spBv1.0/g/NDATA/e/d",
                                 "spBv1.0/g/XDATA/e", "spBv1.0//NDATA/e", "spAv1.0/g/NDATA/e"])
def test_topics_outside_the_namespace_shape_are_refused(bad: str) -> None:
    with pytest.raises(Rejected) as refused:
        Topic.parse(bad)
    assert refused.value.code == "bad_sparkplug_topic"


def test_topics_and_keys() -> None:
    assert Topic.parse("spBv1.0/g/DDATA/e/d").key(per_device=False) == "g/e"
    assert Topic.parse("spBv1.0/g/DDATA/e/d").key(per_device=True) == "g/e/d"
    assert Topic.parse("spBv1.0/g/NDATA/e").key(per_device=True) == "g/e"


def test_the_rebirth_request_is_what_pysparkplug_reads_as_one() -> None:
    ncmd = spb.NCmd.decode(rebirth_request(123))
    (only,) = ncmd.metrics
    assert (only.name, only.value, only.datatype) == (REBIRTH, True, spb.DataType.BOOLEAN)


# -- [sparkplug] config ---------------------------------------------------------------------

BASE = GOOD[:GOOD.index("[[routes]]")]  # test_config's good config, without its route


def parsed(section: str) -> config.Config:
    return config.parse(tomllib.loads(BASE + section))


def test_a_sparkplug_section_alone_is_a_config_and_subscribes_on_its_lane() -> None:
    loaded = parsed('[sparkplug]\nkafka_topic = "iot.sparkplug.{message_type}"\n')
    assert loaded.sparkplug is not None and loaded.routes == ()
    assert loaded.session_lanes() == ["bulk"]
    assert "iot.sparkplug.ndata" in loaded.fixed_topics()
    assert "iot.sparkplug.dcmd" in loaded.fixed_topics()
    assert loaded.sparkplug == config.SparkplugConfig("iot.sparkplug.{message_type}")


def test_sparkplug_settings_are_checked_with_their_key_paths() -> None:
    with pytest.raises(ConfigError) as caught:
        parsed("""[sparkplug]
kafka_topic = "iot.{group}"
group_id = "a/b"
lane = "slow"
key = "metric"
max_nodes = 0
host_id = "x#"
colour = "red"
""")
    problems = "\n".join(caught.value.problems)
    for path in ("sparkplug.kafka_topic", "sparkplug.group_id", "sparkplug.lane",
                 "sparkplug.key", "sparkplug.max_nodes", "sparkplug.host_id",
                 "sparkplug.colour: unknown key"):
        assert path in problems


def test_a_route_that_sparkplug_leaves_nothing_is_refused() -> None:
    section = '[sparkplug]\nkafka_topic = "sp"\n'
    route = '[[routes]]\nfilter = "spBv1.0/g/NDATA/{device_id}"\nkafka_topic = "t"\n'
    with pytest.raises(ConfigError, match=r"routes\[0\].filter: never matches: \[sparkplug\]"):
        parsed(section + route)
    assert parsed(section + route + 'lane = "fast"\n').routes  # another lane: its own session


def test_without_routes_or_sparkplug_a_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="routes: missing"):
        parsed("")


def test_a_boolean_array_cannot_grow_the_bridge_eight_times_its_payload() -> None:
    """8 booleans per byte: 1 MiB of payload would be 8M list entries (64 MiB) in memory.
    Past a million the metric carries value_error instead; smaller arrays decode."""
    pb = Payload(timestamp=1, seq=0)
    for count in (64, (1 << 20) + 8):
        m = pb.metrics.add()
        m.name, m.datatype = f"flags{count}", 32  # BooleanArray
        m.bytes_value = count.to_bytes(4, "little") + b"\xff" * ((count + 7) // 8)
    small, large = (metric.record() for metric in decode(pb.SerializeToString(), 10).metrics)
    assert small["value"] == [True] * 64
    assert large["value"] is None and "more than 1048576" in large["value_error"]


def test_nested_values_cost_bounded_work_on_the_event_loop() -> None:
    """DataSets and Templates become maps element by element in Python (~3 µs each): 1 MiB
    of empty DataSet elements took seconds of the event loop every lane shares. One message
    decodes a bounded share of them; the rest say why (the raw body keeps them)."""
    pb = Payload(timestamp=1, seq=0)
    small = pb.metrics.add()
    small.name, small.datatype = "small", 16  # DataSet
    small.dataset_value.num_of_columns = 1
    small.dataset_value.columns.append("c")
    for name in ("rows", "more"):
        m = pb.metrics.add()
        m.name, m.datatype = name, 16
        for _ in range(250_000):
            m.dataset_value.rows.add().elements.add()
    raw = pb.SerializeToString()
    assert len(raw) > 2_000_000
    started = time.perf_counter()
    got = records(decode(raw, 10).metrics)
    assert time.perf_counter() - started < 1.0
    assert got[0]["value"] == {"num_of_columns": "1", "columns": ["c"]}
    assert got[1]["value"] is None and "nested values" in got[1]["value_error"]
    assert got[2]["value"] is None and "nested values" in got[2]["value_error"]


def test_rebirth_requests_waiting_for_their_puback_are_bounded() -> None:
    """Each node is asked once per interval, but a device can name a new node per message:
    every one was a QoS 1 NCMD, unanswered ones without bound, past the broker's Receive
    Maximum (a protocol error that costs the session). Past a few, none is sent until the
    broker answers; the node is asked at its next message after the interval."""
    loaded = parsed('[sparkplug]\nkafka_topic = "sp"\n')
    assert loaded.sparkplug is not None
    sent: list[asyncio.Future[int | None]] = []

    def publish(_broker: str, _topic: str, _payload: bytes) -> asyncio.Future[int | None]:
        sent.append(asyncio.get_running_loop().create_future())
        return sent[-1]

    async def flood() -> list[bool]:
        metrics = Metrics()
        sparkplug = Sparkplug(loaded, loaded.sparkplug, Pipeline(loaded, "bulk", metrics),
                              metrics, publish)
        payload = Payload(seq=0).SerializeToString()
        asked = []
        for i in range(100):
            outcome = sparkplug.prepare(Message("b", f"spBv1.0/g/NDATA/node{i}", payload, 1,
                                                False, False, 1), None)
            assert isinstance(outcome, Delivery)
            asked.append(envelope.decode(outcome.value)["sparkplug"]["rebirth_requested"])
        sent[0].set_result(0)
        await asyncio.sleep(0)
        outcome = sparkplug.prepare(Message("b", "spBv1.0/g/NDATA/late", payload, 1, False,
                                            False, 1), None)
        assert isinstance(outcome, Delivery)
        return [*asked, envelope.decode(outcome.value)["sparkplug"]["rebirth_requested"]]

    asked = asyncio.run(flood())
    assert len(sent) == REBIRTHS_UNANSWERED_MAX + 1
    assert asked == [True] * REBIRTHS_UNANSWERED_MAX + \
        [False] * (100 - REBIRTHS_UNANSWERED_MAX) + [True]


# ------------------------------------------------------------- the host's own STATE topic

class _Session:
    """Stands in for the host session: counts the births published again."""

    def __init__(self) -> None:
        self.again = 0

    def announce_again(self) -> bool:
        self.again += 1
        return True


def _state(payload: bytes, retain: bool = False) -> Message:
    return Message("b", "spBv1.0/STATE/h1", payload, 1, retain, False, 0, (), None)


def test_only_a_live_offline_state_is_answered_and_a_flood_at_most_once_a_second() -> None:
    async def body() -> tuple[int, int, int]:
        metrics = Metrics()
        watch = OwnState("spBv1.0/STATE/h1", metrics, interval=0.2)
        session = _Session()
        watch.session = session  # type: ignore[assignment]
        offline = b'{"online":false,"timestamp":1}'
        for message in [_state(offline, retain=True),  # predates the birth
                        _state(b'{"online":true,"timestamp":1}'), _state(b""),
                        _state(b"[" * 100_000), _state(b"{}"), _state(b'{"online":0}'),
                        Message("b", "spBv1.0/STATE/h2", offline, 1, False, False, 0, ())]:
            watch(message, None)
        quiet = session.again
        for _ in range(100):  # a flood: one now, one when the interval is over
            watch(_state(offline), None)
        at_once = session.again
        await asyncio.sleep(0.4)
        return quiet, at_once, session.again

    assert asyncio.run(body()) == (0, 1, 2)
