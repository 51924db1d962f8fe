"""Which topic a fin's result goes to, and what it says: bridge/results.py without a broker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bridge.message import Message, Properties
from bridge.metrics import Metrics
from bridge.results import ANSWER_MARK, Results

# prefix = "sites/{site}/{device_id}/up": the {file_id} level is the 5th
FIN = "sites/s1/cam-1/up/clip-1/fin/10"
OWN = "sites/s1/cam-1/up/clip-1/result"


class Sent:
    def __init__(self, answer: int | None = 0, connected: bool = True) -> None:
        self.calls: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        self.answer, self.connected = answer, connected
        self.futures: list[asyncio.Future[int | None]] = []

    def __call__(self, broker: str, topic: str, payload: bytes, *, content_type: str | None,
                 correlation_data: bytes | None, user_properties: list[tuple[str, str]]
                 ) -> asyncio.Future[int | None] | None:
        self.calls.append((broker, topic, json.loads(payload), {
            "content_type": content_type, "correlation_data": correlation_data,
            "user_properties": user_properties}))
        if not self.connected:
            return None
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        future.set_result(self.answer)
        self.futures.append(future)
        return future


def fin(response_topic: str | None = None, correlation: bytes | None = None) -> Message:
    properties = None if response_topic is None and correlation is None else \
        Properties(response_topic=response_topic, correlation_data=correlation)
    return Message("edge", FIN, b"", 1, False, False, 0, (), properties)


def results(sent: Sent) -> tuple[Results, Metrics]:
    metrics = Metrics()
    return Results(5, sent, metrics), metrics


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"mqtt_kafka_bridge_{name}_total", labels)
    return value or 0.0


@pytest.mark.parametrize(("asked", "used"), [
    (None, OWN),
    (OWN, OWN),
    ("sites/s1/cam-1/up/inbox/result", "sites/s1/cam-1/up/inbox/result"),
    ("sites/s1/cam-2/up/clip-1/result", OWN),  # another device's
    ("sites/s2/cam-1/up/clip-1/result", OWN),  # another site's
    ("mqtt-kafka-bridge/sessions/mkb-1", OWN),  # the bridge's presence
    ("sites/s1/cam-1/telemetry", OWN),
    ("sites/s1/cam-1/up/clip-1/fin/3", OWN),  # transfer input
    ("sites/s1/cam-1/up/+/result", OWN),
    ("sites/s1/cam-1/up/clip-1/result/x", OWN),
    ("sites/s1/cam-1/up/" + "x" * 129 + "/result", OWN),  # not a file id
])
def test_a_response_topic_is_used_only_when_it_is_a_result_topic_of_the_device(
        asked: str | None, used: str) -> None:
    sent = Sent()
    answer, metrics = results(sent)
    assert answer.topic(fin(asked)) == used
    refused = asked is not None and used != asked
    assert counter(metrics, "file_result_topics_refused") == float(refused)


def test_a_failure_carries_the_code_and_the_correlation_data_as_sent() -> None:
    async def go() -> tuple[Sent, Metrics]:
        sent = Sent()
        answer, metrics = results(sent)
        answer.failed(fin("elsewhere/x", b"\x00id"), "clip-1", "missing_segments", "a gap")
        await asyncio.sleep(0)
        return sent, metrics

    sent, metrics = asyncio.run(go())
    assert sent.calls == [("edge", OWN, {"file_id": "clip-1", "result": "missing_segments",
                                         "reason": "a gap"},
                           {"content_type": "application/json",
                            "correlation_data": b"\x00id",
                            "user_properties": [ANSWER_MARK]})]
    assert counter(metrics, "file_results", outcome="sent") == 1


@pytest.mark.parametrize(("sent", "outcome"), [
    (Sent(answer=0x87), "refused"), (Sent(answer=None), "lost"),
    (Sent(connected=False), "not_connected"), (Sent(answer=0x10), "sent"),
])
def test_every_fate_of_an_answer_is_counted(sent: Sent, outcome: str) -> None:
    async def go() -> Metrics:
        answer, metrics = results(sent)
        answer.failed(fin(), "clip-1", "checksum_mismatch", "bad")
        await asyncio.sleep(0)
        return metrics

    assert counter(asyncio.run(go()), "file_results", outcome=outcome) == 1
