"""Results back to devices: the outcome of a file transfer's fin, as one MQTT message.

With `[file_transfer] respond = true`, once a fin's outcome is durable in Kafka (the
reference envelope, or its dead letter) the device is told (docs/file-transfer.md):

    {"file_id": "...", "result": "ok" | CODE, "reason": "...",
     "reference": "s3://...", "size": N, "sha256": "..."}      (the last three on ok)

on the fin's MQTT 5 Response Topic, with its Correlation Data, when that topic is one of the
device's own result topics (`PREFIX/{file_id}/result`); otherwise on the transfer's own
result topic. Answering is best-effort and never waits: one QoS 1 PUBLISH on a connected
session, its PUBACK counted when it comes, nothing queued or retried.
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol

import structlog

from bridge.message import Message
from bridge.metrics import Metrics
from bridge.pipeline import LOG_TOPIC_MAX
from bridge.transfer import FILE_ID, StoredFile

log = structlog.get_logger("bridge.results")
RESULT_LEVEL = "result"  # PREFIX/{file_id}/result: the bridge's answers, never transfer input
# The user property every answer carries: how a bridge tells its own (or another replica's)
# answers, which it hears as it subscribes to the prefix, from a device writing there.
ANSWER_MARK = ("mqtt-kafka-bridge", "file-result")
_OK_REASON = "the file is assembled, verified and stored; its reference is in Kafka"


class Publish(Protocol):
    """`Daemon.publish`: a QoS 1 PUBLISH on a connected session of `broker`."""

    def __call__(self, broker: str, topic: str, payload: bytes, *, content_type: str | None,
                 correlation_data: bytes | None, user_properties: list[tuple[str, str]]
                 ) -> asyncio.Future[int | None] | None: ...


class Results:
    """Answers the fins of one file-transfer config. `depth` is the number of topic levels
    up to and including the `{file_id}` level of the prefix's filter."""

    def __init__(self, depth: int, publish: Publish, metrics: Metrics) -> None:
        self.depth, self.publish, self.metrics = depth, publish, metrics

    def ok(self, fin: Message, file_id: str, stored: StoredFile) -> None:
        self._answer(fin, {"file_id": file_id, "result": "ok", "reason": _OK_REASON,
                           "reference": stored.reference, "size": stored.size,
                           "sha256": stored.sha256})

    def failed(self, fin: Message, file_id: str, code: str, reason: str) -> None:
        self._answer(fin, {"file_id": file_id, "result": code, "reason": reason})

    def topic(self, fin: Message) -> str:
        """Where the answer to `fin` goes: its Response Topic when that is a result topic of
        the same device, else the transfer's own result topic. A refused one is counted."""
        levels = fin.topic.split("/")
        own = "/".join([*levels[:self.depth], RESULT_LEVEL])
        asked = fin.properties.response_topic if fin.properties else None
        if asked is None or asked == own:
            return own
        wanted = asked.split("/")
        if len(wanted) == self.depth + 1 and wanted[:self.depth - 1] == \
                levels[:self.depth - 1] and FILE_ID.fullmatch(wanted[self.depth - 1]) and \
                wanted[self.depth] == RESULT_LEVEL:
            return asked
        self.metrics.inc("file_result_topics_refused")
        log.warning("file_result_topic_refused", topic=fin.topic[:LOG_TOPIC_MAX],
                    response_topic=asked[:LOG_TOPIC_MAX], answered_on=own[:LOG_TOPIC_MAX],
                    why="a response topic must be one of the device's own result topics, "
                        "PREFIX/{file_id}/result")
        return own

    def _answer(self, fin: Message, result: dict[str, object]) -> None:
        topic = self.topic(fin)
        correlation = fin.properties.correlation_data if fin.properties else None
        sent = self.publish(fin.broker, topic, json.dumps(result).encode(),
                            content_type="application/json", correlation_data=correlation,
                            user_properties=[ANSWER_MARK])
        if sent is None:
            self._unsent(topic, result, "not_connected", "no session to the fin's broker is "
                         "connected, or the broker's Receive Maximum of the bridge's own "
                         "messages await their PUBACK, or the answer is larger than the "
                         "broker's Maximum Packet Size (mqtt_publishes_too_large)")
            return
        sent.add_done_callback(lambda answer: self._acked(answer, topic, result))

    def _acked(self, answer: asyncio.Future[int | None], topic: str,
               result: dict[str, object]) -> None:
        code = None if answer.cancelled() else answer.result()
        if code is None:
            self._unsent(topic, result, "lost", "the connection was lost before the PUBACK")
        elif code >= 0x80:
            self._unsent(topic, result, "refused", f"the broker refused it (PUBACK reason "
                         f"0x{code:02x}; its ACL must let the bridge write result topics)")
        else:
            self.metrics.inc("file_results", outcome="sent")
            log.debug("file_result_sent", topic=topic[:LOG_TOPIC_MAX], result=result["result"])

    def _unsent(self, topic: str, result: dict[str, object], outcome: str, why: str) -> None:
        self.metrics.inc("file_results", outcome=outcome)
        log.warning("file_result_unsent", topic=topic[:LOG_TOPIC_MAX],
                    file_id=result["file_id"], result=result["result"], why=why)
