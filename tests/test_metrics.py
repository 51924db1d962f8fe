"""The ledger's bookkeeping and the metric names, without servers."""

from __future__ import annotations

import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import http_listen
from bridge.devkit.localstack import free_port
from bridge.http import MAX_CLIENTS, Status, StatusServer
from bridge.metrics import COUNTERS, GAUGES, PREFIX, Metrics, mark_dead_lettered


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_receipt_ends_bridged_or_dead_lettered_once() -> None:
    metrics, acks = Metrics(), []
    good = metrics.receive("b1", "bulk", lambda: acks.append("good"))
    bad = metrics.receive("b1", "bulk", lambda: acks.append("bad"))
    qos0 = metrics.receive("b2", "fast", None)
    lane = metrics.ledger.lanes["bulk"]
    assert lane.in_flight == 2 and lane.oldest_age() >= 0
    mark_dead_lettered(bad, "bad_payload")
    mark_dead_lettered(bad, "record_too_large")  # the last code is the one that went
    bad()
    assert lane.in_flight == 1 and lane.open[0] is good  # the oldest still waits
    good()
    good()  # a second call counts nothing and acks nothing
    qos0()
    got = samples(metrics)
    assert got[(PREFIX + "received_messages_total", (("broker", "b1"), ("lane", "bulk")))] == 2
    assert got[(PREFIX + "received_messages_total", (("broker", "b2"), ("lane", "fast")))] == 1
    assert got[(PREFIX + "bridged_messages_total", (("lane", "bulk"),))] == 1
    assert got[(PREFIX + "bridged_messages_total", (("lane", "fast"),))] == 1
    assert got[(PREFIX + "dead_lettered_messages_total", (("code", "record_too_large"),))] == 1
    assert got[(PREFIX + "in_flight_messages", (("lane", "bulk"),))] == 0
    assert got[(PREFIX + "oldest_unacked_age_seconds", (("lane", "bulk"),))] == 0
    assert got[(PREFIX + "delivery_latency_seconds_count", (("lane", "bulk"),))] == 2
    assert got[(PREFIX + "delivery_latency_seconds_bucket",
                (("lane", "bulk"), ("le", "+Inf")))] == 2
    assert acks == ["bad", "good"]
    assert not lane.open  # settled receipts are not kept


def test_the_oldest_unsettled_message_sets_the_age() -> None:
    metrics = Metrics()
    first = metrics.receive("b", "fat", None)
    time.sleep(0.05)
    second = metrics.receive("b", "fat", None)
    lane = metrics.ledger.lanes["fat"]
    second()
    assert lane.oldest_age() >= 0.05  # the first still waits, and it came first
    first()
    assert lane.oldest_age() == 0


def test_the_contract_names_are_exposed() -> None:
    metrics = Metrics()
    metrics.receive("b", "bulk", None)()
    metrics.inc("mqtt_sessions_lost", broker="b")
    metrics.set("mqtt_connected", 1, broker="b", lane="bulk")
    metrics.map_info.info({"map_version": "abc"})
    names = {name for name, _ in samples(metrics)}
    for name in ("received_messages_total", "bridged_messages_total", "in_flight_messages",
                 "oldest_unacked_age_seconds", "delivery_latency_seconds_bucket",
                 "mqtt_connected", "mqtt_sessions_lost_total", "map_info"):
        assert PREFIX + name in names, name
    assert samples(metrics)[(PREFIX + "map_info", (("map_version", "abc"),))] == 1
    assert set(COUNTERS).isdisjoint(GAUGES)


def test_an_unknown_counter_is_a_bug_not_a_silent_new_series() -> None:
    with pytest.raises(KeyError):
        Metrics().inc("recieved")


def test_the_stats_line_sums_over_labels_and_leaves_out_zeros() -> None:
    metrics = Metrics()
    metrics.inc("kafka_retries", 2, lane="bulk")
    metrics.inc("kafka_retries", 1, lane="fast")
    receipt = metrics.receive("b", "bulk", None)
    mark_dead_lettered(receipt, "no_route")
    receipt()
    snap = metrics.snapshot()
    assert snap["kafka_retries"] == 3 and snap["received_messages"] == 1
    assert "bridged_messages" not in snap and "mqtt_reconnects" not in snap
    assert metrics.by_label("dead_lettered_messages", "code") == {"no_route": 1}


@pytest.mark.parametrize(("value", "problem"), [
    ("127.0.0.1", "needs a port"),
    ("9108", "must name a host"),
    ("127.0.0.1:0", "port must be between 1 and 65535"),
    ("localhost:9108/metrics", "HOST:PORT"),
    ("127.0.0.1:99999", "Port out of range"),
])
def test_http_listen_is_checked(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        http_listen(value)
    assert http_listen("[::1]:9108").listen == "[::1]:9108"


def _server() -> StatusServer:
    server = StatusServer(http_listen(f"127.0.0.1:{free_port()}"), Metrics(), Status())
    server.start()
    return server


def test_a_taken_port_is_a_config_error_with_the_key() -> None:
    from bridge.errors import ConfigError

    server = _server()
    try:
        clash = StatusServer(server.config, Metrics(), Status())
        with pytest.raises(ConfigError, match=r"http\.listen: cannot listen on"):
            clash.start()
    finally:
        server.close()


def test_the_endpoint_refuses_oversized_heads_and_past_its_client_limit() -> None:
    server = _server()
    try:
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431")
        idle = [socket.create_connection(server.address) for _ in range(MAX_CLIENTS)]
        time.sleep(0.3)
        try:
            with socket.create_connection(server.address, timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                assert s.recv(100) in (b"",)  # closed unanswered
        except ConnectionResetError:
            pass
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.close()


def test_healthz_follows_the_heartbeat() -> None:
    server = _server()
    try:
        def health() -> bytes:
            with socket.create_connection(server.address, timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                return s.recv(200)
        assert health().startswith(b"HTTP/1.1 200")
        server.status.beat = time.monotonic() - 60
        assert health().startswith(b"HTTP/1.1 503")
    finally:
        server.close()
