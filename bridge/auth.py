"""Device authentication: the second layer, after the broker's ACLs.

MQTT does not tell a subscriber who published a message. The broker's ACLs make sure a
device writes only under its own prefix (`mosquitto/acl`); the bridge then checks what it
receives against a device registry, per route:

- `none`: the topic's `{device_id}` is trusted as is;
- `registry`: the device must be listed and active;
- `hmac`: as `registry`, and the message carries a valid HMAC-SHA256 signature.

The signature is a user property named `signature` (MQTT 5), the lowercase hex HMAC-SHA256,
under the device's key, of the canonical form

    UTF-8 topic bytes, one 0x00 byte, payload bytes

so a signed payload cannot be replayed onto another topic. A message that fails is
dead-lettered with `unknown_device`, `revoked_device`, `missing_signature` or `bad_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from bridge.errors import Rejected

AUTH_MODES = ("none", "registry", "hmac")
STATUSES = ("active", "disabled", "revoked")
SIGNATURE_PROPERTY = "signature"


@dataclass(frozen=True, slots=True)
class Device:
    """One registry entry. Only `active` devices pass; the key is needed by `hmac` routes."""

    status: str = "active"
    hmac_key: bytes | None = field(default=None, repr=False)  # a secret: never in a log line


@dataclass(frozen=True, slots=True)
class Registry:
    """The known devices, as loaded from the registry file named in the config."""

    devices: Mapping[str, Device] = field(default_factory=lambda: MappingProxyType({}))
    path: str = ""

    def admit(self, mode: str, device_id: str) -> Device | None:
        """The device's entry if `mode` admits it (None for `none`), else Rejected."""
        if mode == "none":
            return None
        device = self.devices.get(device_id)
        if device is None:
            raise Rejected("unknown_device", f"device {device_id!r} is not in the registry",
                           device_id)
        if device.status != "active":
            raise Rejected("revoked_device", f"device {device_id!r} is {device.status}",
                           device_id)
        if mode == "hmac" and device.hmac_key is None:
            raise Rejected("bad_signature", f"device {device_id!r} has no hmac_key in the "
                           "registry, so its signatures cannot be checked", device_id)
        return device


def canonical(topic: str, payload: bytes) -> bytes:
    """The bytes a device signs: topic, a 0x00 separator, payload."""
    return topic.encode() + b"\x00" + payload


def sign(key: bytes, topic: str, payload: bytes) -> str:
    """The `signature` user property for one message (device side, and `route`)."""
    return hmac.new(key, canonical(topic, payload), hashlib.sha256).hexdigest()


def verify(key: bytes, device_id: str, topic: str, payload: bytes,
           user_properties: tuple[tuple[str, str], ...]) -> None:
    """Pass, or Rejected with `missing_signature` / `bad_signature`."""
    signatures = [value for name, value in user_properties if name == SIGNATURE_PROPERTY]
    if not signatures:
        raise Rejected("missing_signature",
                       f"no {SIGNATURE_PROPERTY!r} user property on an hmac route", device_id)
    if len(signatures) > 1:
        raise Rejected("bad_signature", f"{len(signatures)} {SIGNATURE_PROPERTY!r} user "
                       "properties; send exactly one", device_id)
    try:
        given = bytes.fromhex(signatures[0])
    except ValueError:
        raise Rejected("bad_signature", "the signature is not hex", device_id) from None
    expected = hmac.new(key, canonical(topic, payload), hashlib.sha256).digest()
    if not hmac.compare_digest(given, expected):
        raise Rejected("bad_signature", "HMAC-SHA256 of topic and payload does not match",
                       device_id)
