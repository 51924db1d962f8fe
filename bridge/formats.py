"""Payload formats a route may require. Adding one is adding one entry to FORMATS.

A check gets the payload and, when it is not valid, raises ValueError with a short reason
("... at byte N", or "in bytes N-M" inside a json token longer than _EXACT; at most
_REASON_MAX characters), and nothing else whatever the input; the message then goes to the
dead-letter topic with code `bad_payload`. `raw` checks nothing.
What is valid does not depend on the payload's size:

- json: RFC 8259 text in UTF-8: no BOM, no NaN or Infinity, nothing after the value but
  whitespace, any nesting depth; any escape the grammar allows (a lone surrogate too, as
  json.loads). Integers longer than sys.get_int_max_str_digits() digits (4300 by default)
  are refused, as json.loads refuses them: CPython's guard against quadratic conversion.
- msgpack: exactly one msgpack object, keys of any type (arrays and maps too), str in UTF-8,
  ext types as msgpack-python decodes them (codes 0 to 127, and -1, the timestamp: 4, 8 or
  12 bytes with nanoseconds below 10**9), no trailing bytes.

Each checked format has two entry points, with the same verdict and reason:

- `check(payload)`, on the event loop, for payloads up to INLINE_CHECK_MAX: a fast path
  (json.loads, msgpack.unpackb: ~4 us and ~1.5 us for 200 bytes) that builds the value, so
  costs memory and time in proportion to the payload; whatever it raises, the streaming
  validator decides. Larger payloads skip the fast path, so the memory bound below holds
  whoever calls it, but they should go to `check_streaming` on a worker thread.
- `check_streaming(payload)`: the streaming validator alone. Memory is O(nesting depth) (a
  byte per open level for json; 8 bytes per open msgpack container that has items left
  after the one being read), plus a read buffer of _CHUNK bytes, plus for json the longest
  string or number, which yajl holds and ijson decodes whole (msgpack reads a str, bin or
  ext longer than _CHUNK in pieces). Time is linear in the payload: a few MB/s at worst
  (bench/formats.py). No C call parses more than _CHUNK bytes (or the rest of a
  longer json token) or one msgpack value (or a run of one-byte values up to _CHUNK), and
  about every _SHARE_SECONDS the validator offers the GIL, so the event loop keeps turning.
"""

from __future__ import annotations

import codecs
import collections
import decimal
import io
import json
import re
import sys
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import ijson
import msgpack

# Payloads up to this size are checked on the event loop: the fast path, and when it refuses
# the streaming validator, cost at most a few ms there (bench/formats.py: at 64 KiB a refused
# msgpack payload took 20-30 ms). Larger ones go to the lane's worker thread.
INLINE_CHECK_MAX = 16 * 1024
_CHUNK = 16 * 1024  # bytes per parser call (more only to finish a longer json token)
_SHARE_SECONDS = 0.001  # a streaming validator offers the GIL about this often
_SHARE_EVERY = 4 * 1024  # msgpack bytes between looks at the clock: ~1 ms of the worst case
_EXACT = 256  # naming the byte of an error costs up to this squared per token
_REASON_MAX = 200


class Format(NamedTuple):
    content_type: str  # recorded in every envelope of the route
    check: Callable[[bytes], None] | None  # fast for small payloads; any size
    check_streaming: Callable[[bytes], None] | None  # bounded memory, for a worker thread


def _gil_sharer(share: bool) -> Callable[[], None]:
    """A function to call often that, about once per _SHARE_SECONDS, lets a thread waiting
    for the GIL (the event loop's) have it now rather than after the 5 ms switch interval,
    which each wakeup of the loop would otherwise wait. time.sleep(0) lets the waiter in
    (it takes ~60 us); os.sched_yield() does not."""
    due = time.perf_counter() + _SHARE_SECONDS

    def share_gil() -> None:
        nonlocal due
        if time.perf_counter() >= due:
            time.sleep(0)
            due = time.perf_counter() + _SHARE_SECONDS
    return share_gil if share else _keep_gil


def _keep_gil() -> None:
    pass


def _refused(reason: str) -> ValueError:
    if len(reason) > _REASON_MAX:
        reason = reason[:_REASON_MAX - 3] + "..."
    return ValueError(reason)


def _inline(fast: Callable[[bytes], object],
            streaming: Callable[[bytes, bool], None]) -> Callable[[bytes], None]:
    """A check that tries the fast parser on small payloads and leaves every refusal
    (RecursionError, unhashable keys, ...) to the streaming validator, which is the
    definition: so the verdict never depends on which path ran."""
    def check(payload: bytes) -> None:
        if len(payload) <= INLINE_CHECK_MAX:
            try:
                fast(payload)
            except Exception:  # any refusal: the streaming validator decides
                pass
            else:
                return
        streaming(payload, False)  # on the event loop, offering the GIL only makes it wait
    return check


# JSON: ijson's C parser (yajl) is the definition, fed the payload a piece at a time.

_yajl2_c = ijson.get_backend("yajl2_c")  # not IJSON_BACKEND's choice: its quirks are known
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # never raw in JSON; yajl: \v \f space
_LOW_SURROGATE = re.compile(rb"\\u[dD][c-fC-F]")  # yajl turns a lone one into invalid UTF-8
_NO_TRAPS = decimal.Context(traps=[])  # 1e99999999999999999999 is JSON: Decimal('NaN')
_OVERFLOWS = {"parse error: integer overflow", "parse error: numeric (floating point) overflow"}


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _json_fast(payload: bytes) -> object:
    return _DECODER.decode(payload.decode("utf-8"))  # str: json.loads would take UTF-16


def check_json_streaming(payload: bytes, share_gil: bool = True) -> None:
    """The JSON validator. yajl's doubles and 64-bit integers are the fast way to take
    numbers; only if one overflows them does the text go again with Decimal and int, which
    take every number. Where a piece is refused, the text goes again with pieces of a byte
    from there, only to say at which byte."""
    decimals, share = False, _gil_sharer(share_gil)
    error = _json_error(payload, decimals, share)
    if error is not None and error[2] in _OVERFLOWS:
        decimals = True
        error = _json_error(payload, decimals, share)
    if error is not None and error[1] > 1:
        error = _json_error(payload, decimals, share, refine=error[0]) or error
    if error is not None:
        where, length, why = error
        span = f"at byte {where}" if length <= 1 else f"in bytes {where}-{where + length - 1}"
        raise _refused(f"{why} {span}")


def _json_error(payload: bytes, decimals: bool, share_gil: Callable[[], None],
                refine: int = -1) -> tuple[int, int, str] | None:
    """Where the payload stops being JSON: (offset, length of the piece the parser refused,
    why), or None. `pending` counts the bytes sent since the last event: yajl's
    unfinished token, if any."""
    events: collections.deque[object] = collections.deque(maxlen=1)  # the last one only
    parser = _yajl2_c.basic_parse_coro(types.SimpleNamespace(send=events.append),
                                       use_float=not decimals)
    view, size, start, pending, last = memoryview(payload), len(payload), 0, 0, None
    with decimal.localcontext(_NO_TRAPS):
        while start < size:
            piece, stop, control = _json_piece(payload, view, start,
                                               _piece_size(start, pending, refine))
            try:
                if piece:
                    parser.send(piece)
            except Exception as exc:
                return start, stop - start, _json_reason(exc)
            if control:
                return stop, 0, f"control character {payload[stop]:#04x}"
            share_gil()
            newest = events[-1] if events else None
            pending = 0 if newest is not last else pending + stop - start
            start, last = stop, newest
        why = _json_end(parser)
    return None if why is None else (size, 0, why)


def _json_end(parser: Any) -> str | None:
    """Why the text cannot end here, or None. yajl takes a string left open at the end
    (`"ab`, `["ab`, `{}"ab`) for the end of the text. So first a space, as yajl's own end
    does, which ends a pending number and breaks a pending escape; then `"x`, which fails
    only if a string is open: the quote closes it and `x` or the string is refused. Else
    the quote opens a string that yajl ignores just the same (were yajl fixed, tests fail)."""
    try:
        parser.send(b" ")
    except Exception as exc:
        return _json_reason(exc)
    try:
        parser.send(b'"x')
    except Exception:
        return "unterminated string"
    try:
        parser.close()
    except Exception as exc:
        return _json_reason(exc)
    return None


def _piece_size(start: int, pending: int, refine: int) -> int:
    """_CHUNK bytes, or from `refine` on (never past it) one byte, while yajl holds fewer
    than _EXACT of an unfinished token. yajl reads such a token again from its start with
    each piece, so past that, pieces grow with the token to keep the time linear."""
    if 0 <= refine <= start:
        return 1 if pending < _EXACT else pending
    size = max(_CHUNK, pending)
    return min(size, refine - start) if start < refine else size


def _json_piece(payload: bytes, view: memoryview, start: int,
                want: int) -> tuple[bytes | memoryview, int, bool]:
    """The next piece for yajl, of about `want` bytes without copying, as (piece, where it
    stops, whether a control character stops it). Control characters, which RFC 8259 text
    never holds raw, end the text. A low-surrogate escape the piece would cut is taken in
    whole, and those in it become \\u00xx: the same grammar, and no invalid UTF-8 from yajl."""
    stop = min(start + want, len(payload))
    split = _LOW_SURROGATE.search(payload, max(start, stop - 3), stop + 3)
    if split is not None and split.start() < stop:
        stop = split.end()
    control = _CONTROL.search(payload, start, stop)
    if control is not None:
        stop = control.start()
    piece: bytes | memoryview = view[start:stop]
    if _LOW_SURROGATE.search(payload, start, stop) is not None:
        piece = _LOW_SURROGATE.sub(rb"\\u00", piece)
    return piece, stop, control is not None


def _json_reason(exc: Exception) -> str:
    """One line from what ijson raised."""
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8 in a string"
    if isinstance(exc, SystemError) and isinstance(exc.__cause__, ValueError):
        # How ijson's C parser reports CPython refusing to convert an over-long integer.
        return f"integer longer than {sys.get_int_max_str_digits()} digits"
    message = exc.args[0] if exc.args else ""
    if isinstance(message, bytes):  # yajl's message quotes the invalid bytes
        message = message.decode("utf-8", "replace")
    return _first_line(str(message), exc)


# msgpack: a walk over msgpack.Unpacker with an explicit stack, so any depth and key type.

_SCALAR, _ARRAY, _MAP = 0, 1, 2  # items per entry
_KINDS = bytes(
    _ARRAY if 0x90 <= kind <= 0x9F or kind in (0xDC, 0xDD)
    else _MAP if 0x80 <= kind <= 0x8F or kind in (0xDE, 0xDF) else _SCALAR
    for kind in range(256))
# Values of one byte: fixints, nil, bools, empty containers. A run of them is read at once.
_ONE_BYTE = bytes(kind <= 0x80 or kind >= 0xE0 or kind in (0x90, 0xA0, 0xC0, 0xC2, 0xC3)
                  for kind in range(256))
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x80\x90\xa0\xc0\xc2\xc3\xe0-\xff]+")
# The bytes of the length of str 8/16/32, bin 8/16/32 and ext 8/16/32 (else 0).
_LENGTH_BYTES = bytes({0xC4: 1, 0xC5: 2, 0xC6: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4,
                       0xD9: 1, 0xDA: 2, 0xDB: 4}.get(kind, 0) for kind in range(256))


def _msgpack_fast(payload: bytes) -> object:
    return msgpack.unpackb(payload, strict_map_key=False)


def check_msgpack_streaming(payload: bytes, share_gil: bool = True) -> None:
    """The msgpack validator: containers by their headers, scalars unpacked (so str is
    decoded and ext -1 checked), and nothing after the one object."""
    unpacker = msgpack.Unpacker(io.BytesIO(payload), read_size=_CHUNK, raw=False,
                                max_buffer_size=max(len(payload), _CHUNK),
                                strict_map_key=False)
    _msgpack_walk(payload, unpacker, _gil_sharer(share_gil))
    end = unpacker.tell()
    if end != len(payload):
        raise _refused(f"trailing data at byte {end}")


def _msgpack_walk(payload: bytes, unpacker: msgpack.Unpacker,
                  share_gil: Callable[[], None]) -> None:
    """Read one object. `stack` holds the items left in each open container but the
    innermost (`left`); a container with none left is dropped before its last item is read,
    so a chain of one-item containers costs nothing. Runs of one-byte values, which need no
    decoding, are matched in C and read in one call: 50 times faster than one by one."""
    tell, unpack, read = unpacker.tell, unpacker.unpack, unpacker.read_bytes
    headers = (unpack, unpacker.read_array_header, unpacker.read_map_header)
    last = len(payload) - 1
    stack: list[int] = []
    left, at, share_at = 1, 0, _SHARE_EVERY
    try:
        while True:
            while left:
                left -= 1
                at = tell()
                if at >= share_at:
                    share_at = at + _SHARE_EVERY
                    share_gil()
                kind = payload[at]
                if left and at < last and _ONE_BYTE[kind] and _ONE_BYTE[payload[at + 1]]:
                    run = _ONE_BYTE_RUN.match(payload, at, at + min(left + 1, _CHUNK))
                    assert run is not None
                    read(run.end() - at)
                    left -= run.end() - at - 1
                    continue
                per = _KINDS[kind]
                if per == _SCALAR:
                    if not (_LENGTH_BYTES[kind] and _read_long(payload, at, read, share_gil)):
                        unpack()
                    continue
                count = headers[per]() * per
                if count:
                    if left:
                        stack.append(left)
                    left = count
            if not stack:
                return
            left = stack.pop()
    except Exception as exc:
        raise _refused(f"{_msgpack_reason(exc, payload, at)} at byte {at}") from None


def _read_long(payload: bytes, at: int, read: Callable[[int], bytes],
               share_gil: Callable[[], None]) -> bool:
    """Read a str, bin or ext longer than _CHUNK in pieces, decoding a str's as they come,
    so it costs a piece of memory rather than the value twice over (the unpacker's buffer
    and the object); False, having read nothing, for a shorter one."""
    kind = payload[at]
    width, ext = _LENGTH_BYTES[kind], 0xC7 <= kind <= 0xC9
    data = at + 1 + width + ext  # an ext's type byte follows its length
    if data > len(payload):
        return False  # its header cut short: unpack() says so
    length = int.from_bytes(payload[at + 1:at + 1 + width], "big")
    if length <= _CHUNK:
        return False
    if data + length > len(payload):
        raise msgpack.OutOfData
    if ext and payload[data - 1] == 0xFF:  # a timestamp: 4, 8 or 12 bytes, unpacked
        if length in (4, 8, 12):
            return False
        raise ValueError(f"invalid timestamp data (length {length})")
    if ext and payload[data - 1] >= 0x80:  # as msgpack-python's ExtType refuses them
        raise ValueError("code must be 0~127")
    utf8 = codecs.getincrementaldecoder("utf-8")() if kind >= 0xD9 else None
    read(data - at)
    for start in range(data, data + length, _CHUNK):
        piece = read(min(_CHUNK, data + length - start))
        if utf8 is not None:
            utf8.decode(piece)
        share_gil()
    if utf8 is not None:
        utf8.decode(b"", True)
    return True


def _msgpack_reason(exc: Exception, payload: bytes, at: int) -> str:
    if isinstance(exc, IndexError):
        return "expected a value"
    if isinstance(exc, msgpack.OutOfData):
        return "truncated value"
    if isinstance(exc, msgpack.FormatError):
        return f"invalid type byte {payload[at]:#04x}"
    if isinstance(exc, UnicodeDecodeError):
        return "str not valid UTF-8"
    return _first_line(str(exc), exc)


def _first_line(message: str, exc: Exception) -> str:
    return message.split("\n", 1)[0].rstrip(". ") or type(exc).__name__


FORMATS: dict[str, Format] = {
    "raw": Format("application/octet-stream", None, None),
    "json": Format("application/json", _inline(_json_fast, check_json_streaming),
                   check_json_streaming),
    "msgpack": Format("application/msgpack", _inline(_msgpack_fast, check_msgpack_streaming),
                      check_msgpack_streaming),
}
