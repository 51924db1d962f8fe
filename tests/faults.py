"""The real bridge with a fault injected at every stage, for tests of the settlement guard.

`python -m tests.faults run --config FILE` runs the daemon after wrapping each stage so that
it raises `RuntimeError("injected fault in STAGE")` for the messages of device `fault-STAGE`
(or, for stages that only see the payload, a payload holding `fault-STAGE`). Everything else
is the product's own code on the real servers: the test shows that whatever a stage raises,
the message ends as an `internal_error` dead letter and its lane keeps flowing.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from bridge import cli, envelope, formats, pipeline, routing
from bridge.auth import Registry
from bridge.files import FileTransfers
from bridge.kafka import KafkaSink
from bridge.transfer import TransferStore

Marker = Callable[..., bool]  # given the stage's arguments: is this the message to fail?


def _device(index: int) -> Callable[[str], Marker]:
    """A marker reading the device id at one argument position."""
    return lambda stage: lambda *args, **_: args[index] == f"fault-{stage}"


def _topic(stage: str) -> Marker:
    return lambda *args, **_: f"/fault-{stage}/" in str(args[1])


def _message_topic(stage: str) -> Marker:
    return lambda *args, **_: f"/fault-{stage}/" in args[1].topic


def _payload(stage: str) -> Marker:
    return lambda *args, **_: f"fault-{stage}".encode() in args[0]


def _plan_device(stage: str) -> Marker:
    return lambda *args, **_: args[2].device_id == f"fault-{stage}"


def _record_device(stage: str) -> Callable[[Any], bool]:
    """A data record (not a dead letter) of the device."""
    def marked(delivery: Any) -> bool:
        headers = dict(delivery.headers)
        return headers.get("device_id") == f"fault-{stage}".encode() and \
            "error.code" not in headers
    return marked


# stage -> (owner, attribute, marker factory)
STAGES: dict[str, tuple[Any, str, Callable[[str], Marker]]] = {
    "route": (routing.Router, "match", _topic),
    "auth": (Registry, "admit", _device(2)),
    "envelope": (envelope.Template, "encode", _message_topic),
    "offload": (pipeline.Pipeline, "_offload", _plan_device),
    "init": (TransferStore, "init", _device(1)),
    "segment": (TransferStore, "segment", _device(1)),
    "finish": (TransferStore, "finish", _device(1)),
    "reference": (FileTransfers, "_reference", _device(2)),
}


def _raising(stage: str, original: Callable[..., Any], marked: Marker) -> Callable[..., Any]:
    error = f"injected fault in {stage}"
    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            if marked(*args, **kwargs):
                raise RuntimeError(error)
            return await original(*args, **kwargs)
        return async_wrapper

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if marked(*args, **kwargs):
            raise RuntimeError(error)
        return original(*args, **kwargs)
    return wrapper


def install() -> None:
    for stage, (owner, name, marker) in STAGES.items():
        setattr(owner, name, _raising(stage, getattr(owner, name), marker(stage)))
    # Payload formats: the check and the streaming check of every checked format.
    for name, fmt in list(formats.FORMATS.items()):
        if fmt.check is not None:
            formats.FORMATS[name] = fmt._replace(
                check=_raising("format", fmt.check, _payload("format")),
                check_streaming=_raising("format", fmt.check_streaming, _payload("format"))
                if fmt.check_streaming is not None else None)
    # Dead-letter encoding: the full record fails, the minimal one must still go out.
    envelope._fields = _raising("deadletter", envelope._fields, _device(1)("deadletter"))
    _fail_producing()
    _stall_the_loop()


def _stall_the_loop() -> None:
    """`.../fault-stall/...`: routing blocks the event loop for 12 s, as a bug could."""
    original = routing.Router.match

    @functools.wraps(original)
    def match(self: routing.Router, topic: str) -> Any:
        if "/fault-stall/" in topic:
            time.sleep(12)
        return original(self, topic)

    routing.Router.match = match  # type: ignore[method-assign]


def _fail_producing() -> None:
    """`fault-produce`: producing the record raises something no one expects.
    `fault-toolarge`: Kafka refuses the record as too large, as a broker with a smaller
    max.message.bytes would."""
    original = KafkaSink.try_send
    produce, too_large = _record_device("produce"), _record_device("toolarge")

    @functools.wraps(original)
    def try_send(self: KafkaSink, delivery: Any) -> bool:
        if produce(delivery):
            raise RuntimeError("injected fault in produce")
        if too_large(delivery):
            self._reject_or_retry(delivery, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE,
                                                       "injected: record too large"))
            return True
        return original(self, delivery)

    KafkaSink.try_send = try_send  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.exit(cli.main(sys.argv[1:]))
