"""The wire side of Cloud Hypervisor v37's HTTP API client (ch-remote's api_client).

One request per connection: the request is written exactly as ch-remote
writes it (ch-reference §4.6) and the response is read as ch-remote reads it:
up to the end of the headers, then ``Content-Length`` bytes of body when that
header is present. A response without ``Content-Length`` has no body (None),
which ``read_response`` keeps apart from an empty one (``b""``).

Errors are ``WireError`` whose text is ch-remote's (``Error writing to or
reading from HTTP socket: ...``), with Rust's spelling of OS errors
(``Connection refused (os error 111)``).
"""

from __future__ import annotations

import os

from vmkit._record import record

# `socket` (with its enums) and `unicodedata` load where used: `vmkit.vmm`
# imports this module, and a `vmkit --api-socket` VMM boots before it serves.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence

__all__ = [
    "STATUS_NAMES",
    "RawResponse",
    "WireError",
    "io_error_text",
    "parse_byte_size",
    "parse_rust_uint",
    "read_response",
    "request_bytes",
    "rust_debug_str",
    "send_request",
    "status_name",
]

#: ch-remote's StatusCode names (its Debug form); every other code is ``Unknown``.
STATUS_NAMES: dict[int, str] = {
    100: "Continue",
    200: "Ok",
    204: "NoContent",
    400: "BadRequest",
    404: "NotFound",
    500: "InternalServerError",
    501: "NotImplemented",
}

_U64_MAX = (1 << 64) - 1


class WireError(Exception):
    """A request could not be sent or its response not read; ``str()`` is ch-remote's text."""


def _socket_error(error: OSError) -> str:
    return f"Error writing to or reading from HTTP socket: {io_error_text(error)}"


def status_name(code: int) -> str:
    """ch-remote's name for an HTTP status code (``InternalServerError``, ``Unknown``, ...)."""
    return STATUS_NAMES.get(code, "Unknown")


def io_error_text(error: OSError) -> str:
    """An OS error as Rust's ``std::io::Error`` displays it: ``<strerror> (os error <n>)``."""
    if error.errno:
        return f"{os.strerror(error.errno)} (os error {error.errno})"
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


def parse_rust_uint(text: str, bits: int) -> int:
    """Parses ``text`` as Rust's ``u<bits>::from_str`` does.

    Raises ValueError with the ``ParseIntError`` text (``invalid digit found in
    string``, ``cannot parse integer from empty string``, ``number too large to
    fit in target type``).
    """
    if text == "":
        raise ValueError("cannot parse integer from empty string")
    digits = text[1:] if text[0] == "+" and len(text) > 1 else text
    if not all("0" <= c <= "9" for c in digits):
        raise ValueError("invalid digit found in string")
    value = int(digits)
    if value >= 1 << bits:
        raise ValueError("number too large to fit in target type")
    return value


_RUST_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


def rust_debug_str(text: str) -> str:
    """``text`` as Rust's ``{:?}`` prints a ``String``: quoted, with escapes."""
    import unicodedata

    out = ['"']
    for ch in text:
        if ch in _RUST_ESCAPES:
            out.append(_RUST_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") or (
            ch.isspace() and ch != " "
        ):
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def parse_byte_size(text: str) -> int:
    """A ByteSized value (ch-reference §1.5): ``1024``, ``4K``, ``2M``, ``1G``.

    The shift comes from the last character (uppercase K, M or G), then every
    trailing K/M/G is stripped and the rest parsed as a u64. Where v37 would
    wrap silently, vmkit refuses the value. Raises ValueError whose text is
    ch-remote's Debug form of the error: ``InvalidValue("<rest>")``.
    """
    trimmed = text.strip()
    shift = {"K": 10, "M": 20, "G": 30}.get(trimmed[-1:], 0)
    rest = trimmed.rstrip("KMG")
    try:
        value = parse_rust_uint(rest, 64)
    except ValueError:
        raise ValueError(f"InvalidValue({rust_debug_str(rest)})") from None
    if value << shift > _U64_MAX:
        raise ValueError(f"InvalidValue({rust_debug_str(trimmed)})")
    return value << shift


def request_bytes(method: str, path: str, body: bytes | None) -> tuple[bytes, bytes]:
    """The request ch-remote writes, in its two parts.

    The first part (request line, ``Host``, ``Accept``) is the one that
    carries file descriptors; the second is ``Content-Length`` when there is
    a body, the blank line and the body. ``path`` is relative to ``/api/v1/``.
    """
    head = f"{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n".encode()
    rest = b""
    if body is not None:
        rest += f"Content-Length: {len(body)}\r\n".encode()
    rest += b"\r\n"
    if body is not None:
        rest += body
    return head, rest


def send_request(
    sock: socket.socket,
    method: str,
    path: str,
    body: bytes | None = None,
    fds: Sequence[int] = (),
) -> None:
    """Writes one request; ``fds`` travel with its first bytes (SCM_RIGHTS)."""
    head, rest = request_bytes(method, path, body)
    try:
        if fds:
            import array
            import socket

            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)))]
            try:
                sent = sock.sendmsg([head], ancillary)
            except OSError as e:
                if isinstance(e, TimeoutError):
                    raise
                raise WireError(f"Error sending file descriptors: {io_error_text(e)}") from None
            head = head[sent:]
        sock.sendall(head + rest)
    except OSError as e:
        raise WireError(_socket_error(e)) from None


@record(frozen=True)
class RawResponse:
    """A response as ch-remote sees it.

    ``body`` is None when there was no ``Content-Length`` header.
    ``headers`` keep their order and spelling; ``raw`` is every byte read.
    """

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    raw: bytes

    @property
    def ok(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status <= 299

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


def _headers(head: bytes) -> list[tuple[str, str]]:
    result = []
    for line in head.decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            result.append((name, value.strip()))
    return result


def read_response(sock: socket.socket) -> RawResponse:
    """Reads one response: headers, then ``Content-Length`` bytes of body if given."""
    buf = b""
    body_offset: int | None = None
    content_length: int | None = None
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if body_offset is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                body_offset = end + 4
                for name, value in _headers(buf[:end]):
                    if name.lower() == "content-length":
                        try:
                            content_length = parse_rust_uint(value.strip(), 64)
                        except ValueError as e:
                            raise WireError(
                                f"Error parsing HTTP Content-Length field: {e}"
                            ) from None
                        break
                if content_length is None:
                    break
            if content_length is not None and len(buf) >= body_offset + content_length:
                break
    except OSError as e:
        raise WireError(_socket_error(e)) from None
    start = buf.find(b"HTTP/1.1")
    if start < 0:
        raise WireError("HTTP output is missing protocol statement")
    line_end = buf.find(b"\r", start)
    status_line = buf[start + len(b"HTTP/1.1 ") : line_end if line_end >= 0 else len(buf)]
    code_text, _, reason = status_line.decode(errors="replace").strip().partition(" ")
    try:
        status = parse_rust_uint(code_text, 64)
    except ValueError as e:
        raise WireError(f"Error parsing HTTP status code: {e}") from None
    head_end = body_offset - 4 if body_offset is not None else len(buf)
    body = None
    if body_offset is not None and content_length is not None:
        body = buf[body_offset : body_offset + content_length]
    return RawResponse(
        status=status,
        reason=reason.strip(),
        headers=tuple(_headers(buf[start:head_end])),
        body=body,
        raw=buf,
    )
