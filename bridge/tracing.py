"""The bridge's own span per bridged message (`[tracing] spans = true`), with the
OpenTelemetry API: a PRODUCER span named per the messaging semantic conventions
(`send {kafka topic}`), child of the device's `traceparent` when it sent one, ended when
Kafka reported the record durable. The record's `traceparent` header then carries the
bridge span's context, so a consumer's span is the bridge's child.

Which SDK and exporter record the spans is the operator's choice; with the API alone they
are no-ops and the device's context passes through unchanged. Only the pipeline of a
config that turns spans on imports this module, so the API costs nothing otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bridge.metrics import mark_dead_lettered
from bridge.properties import TRACEPARENT, TRACESTATE

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracer:
    """Starts the span of one record and hands back its trace headers."""

    def __init__(self, instance: str, provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("mqtt-kafka-bridge", tracer_provider=provider)
        self._instance = instance

    def send(self, kafka_topic: str, key: bytes | None, body_size: int, mqtt_topic: str,
             traceparent: str | None, tracestate: str | None,
             on_durable: Callable[[], None] | None
             ) -> tuple[list[tuple[str, bytes]], Ending]:
        """The record's trace headers and the ack callback that ends the span first."""
        carrier = {TRACEPARENT: traceparent} if traceparent is not None else {}
        if traceparent is not None and tracestate is not None:
            carrier[TRACESTATE] = tracestate
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": kafka_topic,
            "messaging.message.body.size": body_size,
            "messaging.client.id": self._instance,
            "mqtt.topic": mqtt_topic,
        }
        if key is not None:
            attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
        span = self._tracer.start_span(f"send {kafka_topic}", _PROPAGATOR.extract(carrier),
                                       SpanKind.PRODUCER, attributes)
        out: dict[str, str] = {}
        _PROPAGATOR.inject(out, trace.set_span_in_context(span))
        return [(name, value.encode()) for name, value in out.items()], Ending(span, on_durable)


class Ending:
    """A message's ack callback that ends its span first: an outcome that became a dead
    letter (Kafka refused the record) marks the span an error with the code."""

    __slots__ = ("ended", "inner", "span")

    def __init__(self, span: Span, inner: Callable[[], None] | None) -> None:
        self.span, self.inner = span, inner
        self.ended = False

    def __call__(self) -> None:
        if not self.ended:
            self.ended = True
            self.span.end()
        if self.inner is not None:
            self.inner()

    def refused(self, code: str) -> None:
        self.span.set_attribute("error.type", code)
        self.span.set_status(StatusCode.ERROR, code)
        mark_dead_lettered(self.inner, code)

    @property
    def done(self) -> bool:
        """Settled already (what the settlement guard asks an ack callback)."""
        return bool(getattr(self.inner, "done", False))
