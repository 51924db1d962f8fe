"""Payload formats: what each accepts, the reason it gives for what it refuses, and that the
fast path and the streaming validator agree whatever the input and the chunk size."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Callable
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import formats
from bridge.formats import FORMATS, INLINE_CHECK_MAX

JSON, MSGPACK = FORMATS["json"], FORMATS["msgpack"]


def verdict(check: Callable[[bytes], None] | None, payload: bytes) -> str | None:
    """None when the check accepts, else its reason; anything but ValueError fails."""
    assert check is not None
    try:
        check(payload)
    except ValueError as exc:
        return str(exc)
    return None


def verdicts(name: str, payload: bytes) -> str | None:
    """The one verdict of both entry points (refusals always come from the streaming
    validator, so even the reasons match)."""
    fmt = FORMATS[name]
    inline, streaming = verdict(fmt.check, payload), verdict(fmt.check_streaming, payload)
    assert inline == streaming, (payload[:80], inline, streaming)
    return inline


def test_content_types_and_raw() -> None:
    assert {n: f.content_type for n, f in FORMATS.items()} == {
        "raw": "application/octet-stream", "json": "application/json",
        "msgpack": "application/msgpack"}
    assert FORMATS["raw"].check is None and FORMATS["raw"].check_streaming is None


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError


@pytest.mark.parametrize("payload", [
    b'{"t": 21.5}', b"[1, 2]", b"null", b" 1 \r\n\t", b"-0.0e-0", b'"\\u0000"', b'"\x7f"',
    "\"caf\u00e9 \U0001f600\"".encode(), b'"\\ud83d\\ude00"',
    b'"\\udc00"', b'"\\ud800"', b'["\\ud800x", "\\uDFFF", "\\\\udc00"]',  # the grammar's escapes
    b"1e400", b"[1e99999999999999999999, -1e-400]", b"18446744073709551616",
    b"1" * 4300, b"1" * 5000 + b".5", b'{"a": 1, "a": 2}', DEEP_JSON,
    b'{"a":' * 50_000 + b"[]" + b"}" * 50_000,
], ids=lambda p: repr(p[:24]))
def test_json_accepts(payload: bytes) -> None:
    assert verdicts("json", payload) is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "premature EOF at byte 0"), (b"  ", "premature EOF at byte 2"),
    (b"{not json", "invalid string in json text at byte 2"), (b"[1, 2", "premature EOF at byte 5"),
    (b"NaN", "invalid char in json text at byte 0"), (b"[Infinity]", "at byte 1"),
    (b"-Infinity", "at byte 1"), (b"[1, nan]", "at byte 5"),
    (b"\xef\xbb\xbf{}", "at byte 0"),  # a UTF-8 BOM
    ('{"t": 1}'.encode("utf-16"), "at byte 0"), ('{"t": 1}'.encode("utf-16-le"), "0x00"),
    (b"\x0c1", "control character 0x0c at byte 0"), (b"[1,\x0b2]", "0x0b at byte 3"),
    (b'"a\x01"', "control character 0x01 at byte 2"), (b'"\t"', "at byte 1"),
    (b"1 2", "trailing garbage"), (b"{} x", "trailing garbage at byte 3"), (b"01", "trailing"),
    (b"[1,]", "at byte 3"), (b'{"a":1,}', "at byte 7"), (b"{1:2}", "at byte 2"),
    (b"1.", "decimal point"), (b".5", "at byte 0"), (b"'a'", "at byte 0"),
    (b"/* c */ 1", "comment"), (b'"\\x"', "at byte 2"), (b"tru", "at byte 3"),
    (b'"\xff"', "invalid bytes in UTF8 string at byte 1"),
    (b'"\xed\xa0\x80"', "invalid UTF-8 in a string"),  # an encoded surrogate
    (b'"\xc0\x80"', "invalid UTF-8 in a string"),  # an overlong NUL
    (b"1" * 4301, "integer longer than 4300 digits at byte 4301"),
    (b"[" + b"1," * 40_000 + b"x]", "invalid char in json text at byte 80001"),
    (DEEP_JSON[:-1], "premature EOF at byte 199999"),
], ids=lambda p: repr(p[:24]) if isinstance(p, bytes) else "")
def test_json_refuses(payload: bytes, reason: str) -> None:
    refused = verdicts("json", payload)
    assert refused is not None and reason in refused
    assert len(refused) <= 200 and "\n" not in refused


class Pairs(list[tuple[Any, Any]]):
    """A msgpack map with keys of any type, which a dict cannot hold."""


def pack(value: Any, use_bin_type: bool = True) -> bytes:
    packer = msgpack.Packer(use_bin_type=use_bin_type)

    def go(value: Any) -> bytes:
        if isinstance(value, Pairs):
            return packer.pack_map_header(len(value)) + b"".join(
                go(key) + go(item) for key, item in value)
        if isinstance(value, list):
            return packer.pack_array_header(len(value)) + b"".join(map(go, value))
        return packer.pack(value)
    return go(value)


DEEP_MSGPACK = b"\x92" * 100_000 + b"\xc0" * 100_001  # each level keeps a sibling to come


@pytest.mark.parametrize("payload", [
    msgpack.packb({"t": 21.5}), msgpack.packb(None), msgpack.packb(b"\xff", use_bin_type=True),
    msgpack.packb({1: "int keys", -2: 3}), pack(Pairs([([1, 2], "array key")])),
    pack(Pairs([(Pairs([("k", 1)]), "map key"), (None, 1), (1.5, 2), (b"\x00", 3)])),
    b"\x81\x81\x80\x80\x90",  # {{{}: {}}: []}
    msgpack.packb(msgpack.Timestamp(-2**63, 999_999_999)),
    msgpack.packb(msgpack.Timestamp(1, 0)), msgpack.packb(msgpack.ExtType(5, b"any")),
    b"\xd4\x05\x01", b"\xdd\x00\x00\x00\x03\x80\x80\x80", b"\xde\x00\x01\xa1k\xc0",
    b"\x91" * 100_000 + b"\xc0", DEEP_MSGPACK,
    b"\xdc\x00\x06\x80\x90\xa0\xc0\xc3\xff", b"\xdd\x00\x01\x00\x00" + b"\x7f" * 65536,  # runs
    msgpack.packb(["\u00e9" * 50_000, b"\x00" * 70_000, msgpack.ExtType(3, b"x" * 70_000)]),
    b"\x81\xa1k" * 50_000 + b"\x90",
], ids=lambda p: repr(p[:16]))
def test_msgpack_accepts(payload: bytes) -> None:
    assert verdicts("msgpack", payload) is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "expected a value at byte 0"), (b"\xc1", "invalid type byte 0xc1 at byte 0"),
    (b"\x92\x01", "expected a value at byte 2"), (b"\x92\x01\xc1", "0xc1 at byte 2"),
    (b"\x93\x01\x01", "expected a value at byte 3"),
    (b"\x92\x01\x01\x01", "trailing data at byte 3"),
    (msgpack.packb(1) + b"\x01", "trailing data at byte 1"),
    (msgpack.packb({"a": 1}) + msgpack.packb([]), "trailing data at byte 4"),
    (b"\xa5ab", "truncated value at byte 0"), (b"\xde\x00", "truncated value at byte 0"),
    (b"\xa2\xff\xfe", "str not valid UTF-8 at byte 0"),
    (b"\x81\xa2\xed\xa0\x01", "str not valid UTF-8 at byte 1"),  # keys are checked too
    (b"\xd5\xff\x00\x00", "invalid timestamp data (length 2) at byte 0"),
    (b"\xc7\x0c\xff" + b"\xff" * 4 + b"\x00" * 8, "nanoseconds must be"),
    (b"\xdd\xff\xff\xff\xff" + b"\x80" * 1000, "expected a value at byte 1005"),
    (b"\xdb\xff\xff\xff\xff", "at byte 0"), (DEEP_MSGPACK[:-1], "expected a value at byte"),
    (b"\xd4\x80\x00", "code must be 0~127 at byte 0"),  # reserved ext codes, as unpackb
    (b"\xc9\x00\x01\x00\x00\xfe" + b"\x00" * 65536, "code must be 0~127 at byte 0"),
    (b"\xc9\x00\x01\x00\x00\xff" + b"\x00" * 65536, "invalid timestamp data (length 65536)"),
    (b"\xdb\x00\x01\x00\x00" + b"a" * 65535 + b"\xc3", "str not valid UTF-8 at byte 0"),
    (b"\xdb\x00\x01\x00\x00" + b"a" * 65535, "truncated value at byte 0"),
])
def test_msgpack_refuses(payload: bytes, reason: str) -> None:
    refused = verdicts("msgpack", payload)
    assert refused is not None and reason in refused
    assert len(refused) <= 200 and "\n" not in refused


def test_msgpack_str_needs_utf8_without_bin_type() -> None:
    assert verdicts("msgpack", msgpack.packb(b"\xff", use_bin_type=False)) is not None


@pytest.mark.parametrize("name", ["json", "msgpack"])
def test_large_payloads_skip_the_fast_path(name: str) -> None:
    big = json.dumps(["x" * 100] * 1000).encode() if name == "json" else \
        msgpack.packb(["x" * 100] * 1000)
    assert len(big) > INLINE_CHECK_MAX
    with mock.patch.object(formats, "_DECODER") as decoder, \
            mock.patch.object(formats.msgpack, "unpackb") as unpackb:
        assert verdict(FORMATS[name].check, big) is None
    decoder.decode.assert_not_called()
    unpackb.assert_not_called()


@pytest.mark.parametrize("offset", range(formats._CHUNK - 6, formats._CHUNK + 2))
def test_escapes_across_a_chunk_boundary(offset: int) -> None:
    for escape in (b"\\udc00", b"\\uDFFF", b"\\ud800\\udc00", b"\\n"):
        payload = b'"' + b"a" * (offset - 1) + escape + b'"' + b" " * INLINE_CHECK_MAX
        assert verdict(JSON.check_streaming, payload) is None


def test_numbers_past_double_and_int64_in_a_large_payload() -> None:
    """yajl's doubles and int64s overflow; the retry with Decimal and int takes them."""
    filler = b"[" + b"1.5," * (INLINE_CHECK_MAX // 4)
    assert verdicts("json", filler + b"1e400, 18446744073709551616]") is None
    assert verdicts("json", filler + b"1e400, x]") == \
        f"lexical error: invalid char in json text at byte {len(filler) + 7}"
    refused = verdicts("json", filler + b"1" * 4301 + b"]")
    assert refused is not None and refused.startswith("integer longer than 4300 digits in bytes ")
    assert refused.endswith(f"-{len(filler) + 4301}")  # a long token: the span of the piece


def test_a_long_token_goes_in_growing_pieces() -> None:
    """yajl reads an unfinished token again with each piece: a 4 MiB string in 16 KiB
    pieces would be read 256 times over (4 s at 16 MiB, 60 s for a 16 MiB number)."""
    sends: list[int] = []
    parse = formats._yajl2_c.basic_parse_coro

    def counting(*args: Any, **kwargs: Any) -> Any:
        parser = parse(*args, **kwargs)
        return mock.Mock(send=lambda piece: sends.append(len(piece)) or parser.send(piece),
                         close=parser.close)
    with mock.patch.object(formats._yajl2_c, "basic_parse_coro", counting):
        assert verdict(JSON.check_streaming, b'["' + b"a" * (4 << 20) + b'", 1.5]') is None
        assert verdict(JSON.check_streaming, b"[1." + b"1" * (4 << 20) + b", 1.5]") is None
    assert len(sends) < 40


@pytest.mark.parametrize(("name", "payload"), [
    ("json", b"[" + b"{}," * 100_000 + b"{}]"), ("json", b"[" + b"1.5," * 75_000 + b"1]"),
    ("msgpack", b"\xdd\x00\x04\x00\x00" + b"\x80" * 0x40000),
    ("msgpack", msgpack.packb("\u00e9" * 150_000)), ("msgpack", msgpack.packb(b"b" * 300_000)),
])
def test_streaming_memory_does_not_grow_with_the_payload(name: str, payload: bytes) -> None:
    """300 KB of tiny values, or one str or bin: the Python heap peaks near the read buffer,
    not at the values (json.loads takes 7 MB for the first, unpackb 19 MB for the third)."""
    check = FORMATS[name].check_streaming
    assert check is not None
    tracemalloc.start()
    try:
        check(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 128 * 1024


# Properties: the verdict is one function of the bytes, whichever path and chunk size.

CHUNKS = st.sampled_from([4, 5, 7, 64, formats._CHUNK])


def json_values() -> st.SearchStrategy[Any]:
    text = st.text(st.characters() | st.characters(
        min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]), max_size=8)
    scalars = (st.none() | st.booleans() | st.integers()
               | st.floats(allow_nan=False, allow_infinity=False) | text)
    return st.recursive(scalars, lambda children: st.lists(children, max_size=5)
                        | st.dictionaries(text, children, max_size=5), max_leaves=20)


@st.composite
def json_texts(draw: st.DrawFn) -> bytes:
    value = draw(json_values())
    indent = draw(st.sampled_from([None, 0, 2, "\t"]))
    ascii_only = draw(st.booleans())
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: valid only as an escape
        return json.dumps(value, ensure_ascii=True, indent=indent).encode()


def msgpack_values(any_keys: bool, use_bin_type: bool) -> st.SearchStrategy[Any]:
    blobs = st.binary(max_size=8) if use_bin_type else st.text(max_size=8).map(str.encode)
    scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
               | st.text(max_size=8) | blobs
               | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=17))
               | st.builds(msgpack.Timestamp, st.integers(-2**63, 2**63 - 1),
                           st.integers(0, 999_999_999)))
    keys = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        maps = st.lists(st.tuples(children if any_keys else keys, children), max_size=5)
        return st.lists(children, max_size=5) | (maps.map(Pairs) if any_keys else
                                                 maps.map(dict))
    return st.recursive(scalars, containers, max_leaves=20)


@st.composite
def msgpack_payloads(draw: st.DrawFn) -> bytes:
    use_bin_type, any_keys = draw(st.booleans()), draw(st.booleans())
    value = draw(msgpack_values(any_keys, use_bin_type))
    return pack(value, use_bin_type) if any_keys else \
        msgpack.packb(value, use_bin_type=use_bin_type)


@st.composite
def mutated(draw: st.DrawFn, documents: st.SearchStrategy[bytes]) -> bytes:
    """A valid document with a few bytes cut, replaced or added: near misses."""
    payload = draw(documents)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(payload)))
        cut = draw(st.integers(0, 3))
        payload = payload[:at] + draw(st.binary(max_size=3)) + payload[at + cut:]
    return payload


ANY_BYTES = st.binary(max_size=64) | mutated(json_texts()) | mutated(msgpack_payloads())


def plain_verdict(name: str, payload: bytes) -> bool | None:
    """Whether the plain parsers accept, or None where they cannot judge: json.loads past
    its recursion limit, unpackb on unhashable keys or past its 1024 levels."""
    try:
        if name == "json":
            json.loads(payload.decode("utf-8"), parse_constant=formats._no_constants)
        else:
            msgpack.unpackb(payload, strict_map_key=False)
    except (RecursionError, TypeError, msgpack.StackError):
        return None
    except ValueError:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(ANY_BYTES, CHUNKS)
def test_any_bytes_get_one_verdict_the_plain_parsers_where_they_can_judge(
        payload: bytes, chunk: int) -> None:
    """Only ValueError, the same from both entry points at any chunk size, and the plain
    parsers' verdict where they can judge: so yajl's leniencies (\\v as space, a string
    left open after the value) and msgpack's stack limit do not leak into the definition."""
    with mock.patch.object(formats, "_CHUNK", chunk):
        for name in ("json", "msgpack"):
            plain = plain_verdict(name, payload)
            assert plain is None or plain == (verdicts(name, payload) is None), name


@settings(max_examples=50, deadline=None)
@given(json_texts(), CHUNKS)
def test_json_values_are_accepted(payload: bytes, chunk: int) -> None:
    with mock.patch.object(formats, "_CHUNK", chunk):
        assert verdicts("json", payload) is None


@settings(max_examples=50, deadline=None)
@given(msgpack_payloads(), CHUNKS)
def test_msgpack_values_are_accepted(payload: bytes, chunk: int) -> None:
    with mock.patch.object(formats, "_CHUNK", chunk):
        assert verdicts("msgpack", payload) is None


def deep(name: str, depth: int, seed: int) -> bytes:
    """Arrays and maps nested `depth` levels, some with a sibling after the nested one."""
    levels = random.Random(seed).choices(range(4), k=depth)
    if name == "json":
        opens = [b"[", b'{"k":', b"[1,", b'{"a":1,"k":']
        closes = [b"]", b"}", b"]", b"}"]
        return b"".join(opens[k] for k in levels) + b"null" + b"".join(
            closes[k] for k in reversed(levels))
    opens = [b"\x91", b"\x81\xa1k", b"\x92", b"\x82\xa1a\x01\xa1k"]
    return b"".join(opens[k] for k in levels) + b"\xc0" + b"".join(
        b"\xc0" if k == 2 else b"" for k in reversed(levels))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["json", "msgpack"]), st.integers(10_000, 100_000), st.integers(),
       st.floats(0, 1, exclude_max=True))
def test_deep_nesting(name: str, depth: int, seed: int, cut: float) -> None:
    payload = deep(name, depth, seed)
    assert verdicts(name, payload) is None
    assert verdicts(name, payload[:int(len(payload) * cut)]) is not None
