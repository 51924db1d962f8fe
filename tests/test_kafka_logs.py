"""librdkafka's own log lines reach the log stream as structlog events, rate-limited."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
from confluent_kafka import Producer
from structlog.testing import capture_logs

from bridge.logs import KafkaLog, RateLimit
from tests.conftest import Case

FAIL = ("[thrd:127.0.0.1:{port}/bootstrap]: 127.0.0.1:{port}/bootstrap: Connect to "
        "ipv4#127.0.0.1:{port} failed: Connection refused (after {ms}ms in state CONNECT)")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def say(logger: KafkaLog, level: int, facility: str, text: str,
        client: str = "rdkafka#producer-1") -> None:
    """What confluent-kafka's log_cb calls."""
    logger.log(level, "%s [%s] %s", facility, client, text)


def test_each_line_is_one_event_with_its_level_facility_client_and_lane() -> None:
    logger = KafkaLog("fast", RateLimit())
    with capture_logs() as logs:
        say(logger, logging.ERROR, "FAIL", FAIL.format(port=9092, ms=0))
        say(logger, logging.WARNING, "CONFWARN", "[thrd:app]: Configuration property x is odd")
        say(logger, logging.INFO, "GETPID", "Producer id 1000")
    assert logs[0] == {
        "event": "kafka_log", "log_level": "error", "facility": "FAIL",
        "client": "rdkafka#producer-1", "lane": "fast", "thread": "127.0.0.1:9092/bootstrap",
        "message": "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: "
                   "Connection refused (after 0ms in state CONNECT)"}
    assert [(e["log_level"], e["facility"], e["message"]) for e in logs[1:]] == [
        ("warning", "CONFWARN", "Configuration property x is odd"),
        ("info", "GETPID", "Producer id 1000")]


def test_a_repeated_line_comes_once_per_window_and_says_how_many_were_held() -> None:
    clock = Clock()
    limit = RateLimit(10, clock)
    bulk, fast = KafkaLog("bulk", limit), KafkaLog("fast", limit)
    with capture_logs() as logs:
        for i in range(50):  # every 0.1 s from two lanes' producers, durations varying
            say(bulk if i % 2 else fast, logging.ERROR, "FAIL", FAIL.format(port=9092, ms=i))
            clock.now += 0.1
        say(bulk, logging.ERROR, "FAIL", "another line")
        clock.now += 10
        say(bulk, logging.ERROR, "FAIL", FAIL.format(port=9092, ms=3))
        say(bulk, logging.ERROR, "FAIL", FAIL.format(port=9092, ms=4))
    assert [(e["message"][:12], e.get("suppressed")) for e in logs] == [
        ("127.0.0.1:90", None), ("another line", None), ("127.0.0.1:90", 49)]


def test_debug_lines_only_when_the_debug_property_asks_for_them() -> None:
    with capture_logs() as logs:
        say(KafkaLog("bulk", RateLimit()), logging.DEBUG, "BROKER", "added broker")
        for _ in range(3):
            say(KafkaLog("bulk", RateLimit(), debug=True), logging.DEBUG, "BROKER", "added")
    assert [(e["log_level"], e["librdkafka_level"]) for e in logs] == [("info", "debug")] * 3


def test_a_line_it_cannot_read_never_raises_into_poll() -> None:
    with capture_logs() as logs:
        KafkaLog().log(logging.ERROR, "%s %s", "only one")
    assert [e["event"] for e in logs] == ["kafka_log_failed"]


def test_a_real_producer_serves_its_lines_from_poll_and_prints_none(
        capfd: pytest.CaptureFixture[str]) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{closed_port()}"},
                        logger=KafkaLog("bulk", RateLimit()))
    with capture_logs() as logs:
        time.sleep(1)
        unpolled = list(logs)
        deadline = time.monotonic() + 10
        while not logs and time.monotonic() < deadline:
            producer.poll(0.1)
    del producer
    assert unpolled == []  # queued by librdkafka until the event loop polls
    assert logs[0]["event"] == "kafka_log"
    assert logs[0]["facility"] == "FAIL"
    assert "Connection refused" in logs[0]["message"]
    assert "%3|" not in capfd.readouterr().err


@pytest.mark.integration
def test_kafka_down_gives_json_lines_only_and_few_of_them(case: Case) -> None:
    """Found before: with Kafka down, 361 raw `%3|...|FAIL|rdkafka#producer-1|...` lines
    against 28 JSON lines in 20 s. Now every line is a JSON event, and librdkafka's repeated
    connection failures (one producer per lane, each retrying every ~50 ms) come once per
    10 s."""
    path = case.config(routes=case.two_lanes())
    path.write_text(path.read_text().replace(case.stack.bootstrap, f"127.0.0.1:{closed_port()}"))
    bridge = case.bridge(path)
    time.sleep(12)  # past one window: the second line counts what was held back
    assert bridge.terminate() == 0
    lines = bridge.log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("%")]
    events = [json.loads(line) for line in lines]  # every line parses
    failures = [e for e in events if e["event"] == "kafka_log" and e["facility"] == "FAIL"]
    assert 1 <= len(failures) <= 3, failures
    assert sum(e.get("suppressed", 0) for e in failures) > 20  # what used to be printed
    assert len([e for e in events if e["event"] == "kafka_log"]) <= 10
