"""The bridge's error vocabulary.

    BridgeError
    ├── ConfigError          a config file is refused; carries every problem with its key path
    ├── MqttError            an MQTT session failed; the session reconnects with backoff
    │   └── MalformedPacket  the broker sent bytes that do not decode; disconnect and reconnect
    └── Rejected             one message cannot be bridged; it goes to the dead-letter topic

`Rejected.code` is the machine-readable reason written into the dead-letter record. Anything
else a stage raises while handling a message is a bug, not a verdict on the message: it
becomes `Rejected.internal(exc)` (code `internal_error`), so the message is still settled.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A config that must not run. `problems` are `key.path: reason` lines, all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class MqttError(BridgeError):
    """The MQTT session to one broker failed; retryable by reconnecting."""


class MalformedPacket(MqttError):
    """Bytes from the broker that are not a valid MQTT 5 packet, or break the protocol.

    `reason` is the DISCONNECT reason code the bridge sends before it closes.
    """

    reason: int = 0x81  # Malformed Packet


class Rejected(BridgeError):
    """One message cannot be bridged. It is dead-lettered with `code` and `reason`, then acked."""

    def __init__(self, code: str, reason: str, device_id: str = "") -> None:
        self.code = code
        self.reason = reason
        self.device_id = device_id  # when known: the dead-letter record names the device
        super().__init__(f"{code}: {reason}")

    @classmethod
    def internal(cls, exc: BaseException, device_id: str = "") -> Rejected:
        """The verdict for a message a stage crashed on: the exception's class and message,
        cut to a size a dead-letter record can always carry."""
        text = f"{type(exc).__name__}: {describe(exc)}"
        if len(text) > REASON_MAX:
            text = text[:REASON_MAX] + "..."
        return cls("internal_error", text, device_id)


REASON_MAX = 1000  # characters of a dead-letter reason; exception texts can embed payloads


def describe(exc: BaseException) -> str:
    """An exception's text, even when its __str__ itself raises."""
    try:
        return str(exc)
    except Exception:
        return "(its message cannot be printed)"
