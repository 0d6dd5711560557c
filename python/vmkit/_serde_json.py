"""Request bodies read as v37 reads them: serde_json deserialising a small struct.

v37 answers a body that is not the JSON an action takes with 400 and
serde_json's error text, ``<what> at line <l> column <c>``. This reader
gives the same texts and positions for the structs the API server reads in
Python (``VmResizeData``, ``VmRemoveDeviceData``, ...), whose fields are all
``u8``, ``u64``, ``bool`` or ``String``, optionally in an ``Option``:

- syntax is checked as serde_json checks it (no NaN, no leading zeros, no
  lone surrogates in ``\\u`` escapes, UTF-8 inside strings, no control
  characters), in document order, with its messages;
- numbers: integers that overflow u64 (or i64, negative) become floats, as
  in serde_json, so a huge integer is ``number out of range`` (never a
  Python int of thousands of digits); fields the struct does not have are
  only checked for syntax, however deeply they nest;
- a struct can also be given as an array of its fields, in order;
- positions count bytes, as serde_json does: an error found on a character
  just looked at (``expected value``) points at it, one found after reading
  a value (``invalid type``) at the value's last byte.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from vmkit._apiwire import rust_debug_str

__all__ = ["JsonError", "read_struct", "rust_float"]

_WHITESPACE = b" \t\n\r"
#: the bytes that end a run of plain string content: a quote, a backslash, a control byte
_STRING_SPECIAL = re.compile(rb'["\\\x00-\x1f]')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
#: bytes after a number's match that make it malformed (left to the byte-wise reader)
_NUMBER_CONTINUES = frozenset(b"0123456789.eE+-")
_DIGITS = b"0123456789"
_HEX = b"0123456789abcdefABCDEF"
_ESCAPES = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_UNSIGNED_MAX = {"u8": 0xFF, "u64": 0xFFFF_FFFF_FFFF_FFFF}
_EXPECTED = {"string": "a string", "bool": "a boolean", "u8": "u8", "u64": "u64"}
_I64_MIN_MAGNITUDE = 1 << 63


class JsonError(ValueError):
    """serde_json's error text, with its position (the 400 body)."""


def rust_float(value: float) -> str:
    """``value`` as Rust's ``Display`` for f64 writes it: no exponent, no trailing ``.0``."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


class _Nested:
    """A map or sequence where a scalar was expected (never read into a value)."""

    def __init__(self, name: str) -> None:
        self.name = name


MAP = _Nested("map")
SEQUENCE = _Nested("sequence")


def unexpected(value: object) -> str:
    """serde's ``Unexpected`` text for a value: ``integer `1```, ``string "x"``, ..."""
    if isinstance(value, _Nested):
        return value.name
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{rust_float(value)}`"
    assert isinstance(value, str)
    return f"string {rust_debug_str(value)}"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0  # bytes consumed

    # -- positions and errors

    def _at(self, consumed: int) -> str:
        before = self.data[:consumed]
        line = before.count(b"\n") + 1
        column = consumed - (before.rfind(b"\n") + 1)
        return f"at line {line} column {column}"

    def error(self, message: str) -> JsonError:
        """An error found after consuming up to here."""
        return JsonError(f"{message} {self._at(self.i)}")

    def peek_error(self, message: str) -> JsonError:
        """An error found on the next byte, looked at but not consumed."""
        return JsonError(f"{message} {self._at(min(self.i + 1, len(self.data)))}")

    # -- bytes

    def peek(self) -> int | None:
        return self.data[self.i] if self.i < len(self.data) else None

    def next(self) -> int | None:
        byte = self.peek()
        if byte is not None:
            self.i += 1
        return byte

    def skip_whitespace(self) -> int | None:
        data, i = self.data, self.i
        while i < len(data) and data[i] in _WHITESPACE:
            i += 1
        self.i = i
        return data[i] if i < len(data) else None

    def ident(self, rest: bytes) -> None:
        """The rest of ``true``, ``false`` or ``null`` after its first byte."""
        for expected in rest:
            byte = self.next()
            if byte is None:
                raise self.error("EOF while parsing a value")
            if byte != expected:
                raise self.error("expected ident")

    # -- strings

    def _segment(self, start: int, end: int) -> str:
        try:
            return self.data[start:end].decode()
        except UnicodeDecodeError:
            raise self.error("invalid unicode code point") from None

    def _hex4(self) -> int:
        value = 0
        for _ in range(4):
            byte = self.next()
            if byte is None:
                raise self.error("EOF while parsing a string")
            if byte not in _HEX:
                raise self.error("invalid escape")
            value = value * 16 + int(chr(byte), 16)
        return value

    def string(self) -> str:
        """A string whose opening quote is consumed."""
        parts: list[str] = []
        start = self.i
        while True:
            special = _STRING_SPECIAL.search(self.data, self.i)  # skip plain bytes at C speed
            self.i = special.start() if special else len(self.data)
            byte = self.next()
            if byte is None:
                raise self.error("EOF while parsing a string")
            if byte == ord('"'):
                parts.append(self._segment(start, self.i - 1))
                return "".join(parts)
            if byte < 0x20:
                raise self.error("control character (\\u0000-\\u001F) found while parsing a string")
            if byte != ord("\\"):
                continue
            parts.append(self._segment(start, self.i - 1))
            escape = self.next()
            if escape is None:
                raise self.error("EOF while parsing a string")
            if escape in _ESCAPES:
                parts.append(_ESCAPES[escape])
            elif escape == ord("u"):
                parts.append(self._unicode_escape())
            else:
                raise self.error("invalid escape")
            start = self.i

    def _unicode_escape(self) -> str:
        code = self._hex4()
        if 0xDC00 <= code <= 0xDFFF:
            raise self.error("lone leading surrogate in hex escape")
        if not 0xD800 <= code <= 0xDBFF:
            return chr(code)
        # a leading surrogate must be followed by the escape of a trailing one
        if self.next() != ord("\\"):
            raise self.error("unexpected end of hex escape")
        if self.next() != ord("u"):
            raise self.error("unexpected end of hex escape")
        low = self._hex4()
        if not 0xDC00 <= low <= 0xDFFF:
            raise self.error("lone leading surrogate in hex escape")
        return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))

    # -- numbers

    def _digits(self) -> None:
        data, i = self.data, self.i
        while i < len(data) and data[i] in _DIGITS:
            i += 1
        self.i = i

    def _need_digit(self) -> None:
        byte = self.peek()
        if byte is None:
            raise self.error("EOF while parsing a value")
        if byte not in _DIGITS:
            raise self.peek_error("invalid number")

    def number(self) -> int | float:
        """A number at the next byte (``-`` or a digit); its value as serde_json has it."""
        start = self.i
        negative = self.peek() == ord("-")
        if negative:
            self.i += 1
        self._need_digit()
        if self.next() == ord("0"):
            following = self.peek()
            if following is not None and following in _DIGITS:
                raise self.peek_error("invalid number")
        else:
            self._digits()
        integral = True
        if self.peek() == ord("."):
            integral = False
            self.i += 1
            self._need_digit()
            self._digits()
        if self.peek() in (ord("e"), ord("E")):
            integral = False
            self.i += 1
            if self.peek() in (ord("+"), ord("-")):
                self.i += 1
            self._need_digit()
            self._digits()
        text = self.data[start : self.i].decode()
        if integral:
            magnitude_text = text.lstrip("-")
            # compare lengths first: never build an int from thousands of digits
            if len(magnitude_text) <= 20:
                magnitude = int(magnitude_text)
                if not negative and magnitude <= _UNSIGNED_MAX["u64"]:
                    return magnitude
                if negative and 0 < magnitude <= _I64_MIN_MAGNITUDE:
                    return -magnitude
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise self.error("number out of range")
        return value

    def skip_number(self) -> None:
        """A number's syntax only (serde_json computes no value for an ignored field)."""
        match = _NUMBER.match(self.data, self.i)
        if match is not None:
            end = match.end()
            if end == len(self.data) or self.data[end] not in _NUMBER_CONTINUES:
                self.i = end  # well-formed: done without looking at each byte
                return
        if self.peek() == ord("-"):
            self.i += 1
        self._need_digit()
        if self.next() == ord("0"):
            following = self.peek()
            if following is not None and following in _DIGITS:
                raise self.peek_error("invalid number")
        else:
            self._digits()
        if self.peek() == ord("."):
            self.i += 1
            self._need_digit()
            self._digits()
        if self.peek() in (ord("e"), ord("E")):
            self.i += 1
            if self.peek() in (ord("+"), ord("-")):
                self.i += 1
            self._need_digit()
            self._digits()

    # -- values

    def skip_value(self) -> None:
        """Any JSON value, checked but not kept; nesting is followed without recursion."""
        stack: list[int] = []  # the open brackets
        while True:
            byte = self.skip_whitespace()
            if byte is None:
                raise self.error("EOF while parsing a value")
            if byte == ord("["):
                self.i += 1
                byte = self.skip_whitespace()
                if byte is None:
                    raise self.error("EOF while parsing a list")
                if byte == ord("]"):
                    self.i += 1
                else:
                    stack.append(ord("["))
                    continue
            elif byte == ord("{"):
                self.i += 1
                byte = self.skip_whitespace()
                if byte == ord("}"):
                    self.i += 1
                else:
                    stack.append(ord("{"))
                    self._key_and_colon(byte)
                    continue
            else:
                self._skip_scalar(byte)
            # after a value: close what ends here, or go on to the next element
            while stack:
                byte = self.skip_whitespace()
                if stack[-1] == ord("["):
                    if byte == ord(","):
                        self.i += 1
                        if self.skip_whitespace() == ord("]"):
                            raise self.peek_error("trailing comma")
                        break
                    if byte == ord("]"):
                        self.i += 1
                        stack.pop()
                        continue
                    if byte is None:
                        raise self.error("EOF while parsing a list")
                    raise self.peek_error("expected `,` or `]`")
                if byte == ord(","):
                    self.i += 1
                    byte = self.skip_whitespace()
                    if byte == ord("}"):
                        raise self.peek_error("trailing comma")
                    self._key_and_colon(byte)
                    break
                if byte == ord("}"):
                    self.i += 1
                    stack.pop()
                    continue
                if byte is None:
                    raise self.error("EOF while parsing an object")
                raise self.peek_error("expected `,` or `}`")
            if not stack:
                return

    def _key_and_colon(self, byte: int | None) -> str:
        """A member's key (``byte`` is the next byte, not consumed) and its colon."""
        if byte is None:
            raise self.error("EOF while parsing an object")
        if byte != ord('"'):
            raise self.peek_error("key must be a string")
        self.i += 1
        key = self.string()
        self._colon()
        return key

    def _colon(self) -> None:
        byte = self.skip_whitespace()
        if byte is None:
            raise self.error("EOF while parsing an object")
        if byte != ord(":"):
            raise self.peek_error("expected `:`")
        self.i += 1

    def _skip_scalar(self, byte: int) -> None:
        if byte == ord('"'):
            self.i += 1
            self.string()
        elif byte == ord("-") or byte in _DIGITS:
            self.skip_number()
        elif byte in (ord("t"), ord("f"), ord("n")):
            self.i += 1
            self.ident({ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}[byte])
        else:
            raise self.peek_error("expected value")

    def scalar(self) -> object:
        """The next value; a map or a sequence is not consumed (serde_json reports those
        where they start) and comes back as ``MAP`` or ``SEQUENCE``."""
        byte = self.skip_whitespace()
        if byte is None:
            raise self.error("EOF while parsing a value")
        if byte == ord('"'):
            self.i += 1
            return self.string()
        if byte == ord("-") or byte in _DIGITS:
            return self.number()
        if byte in (ord("t"), ord("f")):
            self.i += 1
            self.ident(b"rue" if byte == ord("t") else b"alse")
            return byte == ord("t")
        if byte == ord("n"):
            self.i += 1
            self.ident(b"ull")
            return None
        if byte == ord("["):
            return SEQUENCE
        if byte == ord("{"):
            return MAP
        raise self.peek_error("expected value")

    def field(self, kind: str) -> object:
        """A field of ``kind`` (``u8 u64 string bool``, ``?`` for an Option)."""
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        expected = _EXPECTED[kind]
        value = self.scalar()
        if value is None and optional:
            return None
        if kind == "string" and isinstance(value, str):
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind in _UNSIGNED_MAX and isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= _UNSIGNED_MAX[kind]:
                return value
            raise self.error(f"invalid value: {unexpected(value)}, expected {expected}")
        raise self.error(f"invalid type: {unexpected(value)}, expected {expected}")

    def end_of(self, close: int) -> None:
        """What serde_json does after a struct's map or sequence, even after an error:
        steps over white space and the closing bracket."""
        if self.skip_whitespace() == close:
            self.i += 1


def read_struct(body: bytes, struct: str, fields: dict[str, tuple[str, object]]) -> dict[str, Any]:
    """Reads ``body`` as serde_json reads struct ``struct``; raises JsonError.

    ``fields``: name → (kind, default), kind one of ``u8 u64 string bool``
    with ``?`` for an Option; a default of ``...`` means required. Fields the
    struct does not have are skipped, as serde does without
    ``deny_unknown_fields``.
    """
    reader = _Reader(body)
    byte = reader.skip_whitespace()
    result: dict[str, Any] = {}
    if byte == ord("{"):
        reader.i += 1
        try:
            _read_map(reader, struct, fields, result)
        except JsonError as e:
            if " at line " in str(e):
                raise
            reader.end_of(ord("}"))
            raise reader.error(str(e)) from None
    elif byte == ord("["):
        reader.i += 1
        try:
            _read_seq(reader, struct, fields, result)
        except JsonError as e:
            if " at line " in str(e):
                raise
            reader.end_of(ord("]"))
            raise reader.error(str(e)) from None
    else:
        value = reader.scalar()
        raise reader.error(f"invalid type: {unexpected(value)}, expected struct {struct}")
    if reader.skip_whitespace() is not None:
        raise reader.peek_error("trailing characters")
    return result


def _read_map(
    reader: _Reader, struct: str, fields: dict[str, tuple[str, object]], result: dict[str, Any]
) -> None:
    byte = reader.skip_whitespace()
    if byte == ord("}"):
        reader.i += 1
    else:
        while True:
            if byte is None:
                raise reader.error("EOF while parsing an object")
            if byte != ord('"'):
                raise reader.peek_error("key must be a string")
            reader.i += 1
            key = reader.string()
            if key in result:
                raise JsonError(f"duplicate field `{key}`")  # placed by the caller
            reader._colon()
            if key in fields:
                result[key] = reader.field(fields[key][0])
            else:
                reader.skip_value()
            byte = reader.skip_whitespace()
            if byte == ord(","):
                reader.i += 1
                byte = reader.skip_whitespace()
                if byte == ord("}"):
                    raise reader.peek_error("trailing comma")
                continue
            if byte == ord("}"):
                reader.i += 1
                break
            if byte is None:
                raise reader.error("EOF while parsing an object")
            raise reader.peek_error("expected `,` or `}`")
    for name, (kind, default) in fields.items():
        if name in result:
            continue
        if kind.endswith("?"):
            result[name] = None
        elif default is ...:
            raise reader.error(f"missing field `{name}`")
        else:
            result[name] = default


def _read_seq(
    reader: _Reader, struct: str, fields: dict[str, tuple[str, object]], result: dict[str, Any]
) -> None:
    count = len(fields)
    for index, (name, (kind, _default)) in enumerate(fields.items()):
        byte = reader.skip_whitespace()
        if index:
            if byte == ord(","):
                reader.i += 1
                byte = reader.skip_whitespace()
            elif byte is not None and byte != ord("]"):
                raise reader.peek_error("expected `,` or `]`")
        if byte is None:
            raise reader.error("EOF while parsing a list")
        if byte == ord("]"):
            reader.i += 1
            plural = "s" if count != 1 else ""
            raise reader.error(
                f"invalid length {index}, expected struct {struct} with {count} element{plural}"
            )
        result[name] = reader.field(kind)
    byte = reader.skip_whitespace()
    if byte == ord("]"):
        reader.i += 1
        return
    if byte == ord(","):
        reader.i += 1
        if reader.skip_whitespace() == ord("]"):
            raise reader.peek_error("trailing comma")
        raise reader.peek_error("trailing characters")
    if byte is None:
        raise reader.error("EOF while parsing a list")
    raise reader.peek_error("trailing characters")
