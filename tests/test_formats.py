"""Payload formats: what each accepts, and the reason it gives for what it refuses."""

from __future__ import annotations

import msgpack
import pytest

from bridge.formats import FORMATS


@pytest.mark.parametrize(("name", "payload"), [
    ("raw", b"\xff\x00anything"), ("json", b'{"t": 21.5}'), ("json", b"[1, 2]"),
    ("msgpack", msgpack.packb({"t": 21.5})),
])
def test_good_payloads_pass(name: str, payload: bytes) -> None:
    check = FORMATS[name].check
    assert check is None or check(payload) is not None or payload == b"null"


@pytest.mark.parametrize(("name", "payload"), [
    ("json", b"{not json"), ("json", b"\xff\xfe"), ("json", b""),
    ("msgpack", b"\xc1"), ("msgpack", b"\x92\x01"), ("msgpack", msgpack.packb(1) + b"\x01"),
])
def test_bad_payloads_raise_value_error(name: str, payload: bytes) -> None:
    check = FORMATS[name].check
    assert check is not None
    with pytest.raises(ValueError):
        check(payload)


def test_content_types() -> None:
    assert {n: f.content_type for n, f in FORMATS.items()} == {
        "raw": "application/octet-stream", "json": "application/json",
        "msgpack": "application/msgpack"}
