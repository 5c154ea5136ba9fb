"""Parsing the raw first bytes of HTTP/1.x requests and responses captured by the kernel.

A head is whatever the kernel copied: at most a fixed number of bytes, often cut mid-line, and
sometimes not HTTP at all (TLS, HTTP/2, another protocol on the port). Every function here
returns ``None`` (or ``False``) for input it cannot read and never raises on arbitrary bytes.
Lines end in CRLF; a bare LF is accepted where RFC 9112 section 2.2 allows a recipient to.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "METHODS",
    "content_length",
    "header_length",
    "is_chunked",
    "nth_request",
    "parse_request_line",
    "parse_status_line",
    "request_paths",
]

METHODS: tuple[str, ...] = (
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "HEAD",
    "PATCH",
    "OPTIONS",
    "CONNECT",
    "TRACE",
)
_METHODS_BYTES = frozenset(m.encode() for m in METHODS)
_MAX_METHOD_LEN = max(len(m) for m in METHODS)
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
# Request lines also come from HTTP/2 streams, which the http probe writes as
# "METHOD :path HTTP/2" heads (as spans and tests write them).
_REQUEST_VERSIONS = (*_VERSIONS, b"HTTP/2")
_HEADER_END = b"\r\n\r\n"
# 10**18 bytes is beyond any real body and keeps int() on hostile digit strings cheap.
_MAX_LENGTH_DIGITS = 18


def _line_end(head: bytes, start: int = 0) -> tuple[int, int] | None:
    """(end of the line's content, start of the next line), or None if the line is cut off."""
    lf = head.find(b"\n", start)
    if lf < 0:
        return None
    end = lf - 1 if lf > start and head[lf - 1] == 0x0D else lf
    return end, lf + 1


def _is_target(target: bytes) -> bool:
    # Visible ASCII and obs-text only: a control byte means this is not a request line.
    return bool(target) and all(b > 0x20 and b != 0x7F for b in target)


def parse_request_line(head: bytes) -> tuple[str, bytes] | None:
    """``b"GET /x?y=1 HTTP/1.1\\r\\n..."`` -> ``("GET", b"/x?y=1")``, None if not a request.

    A head cut before the line ends is accepted when what is there is ``METHOD SP target``
    followed by a prefix of `` HTTP/1.x``; the target then ends where the head does.
    """
    sp = head.find(b" ", 0, _MAX_METHOD_LEN + 1)
    if sp < 0 or head[:sp] not in _METHODS_BYTES:
        return None
    line_end = _line_end(head, sp)
    # A head cut right after the CR of CRLF still ends its line there.
    line = head.removesuffix(b"\r") if line_end is None else head[: line_end[0]]
    target_end = line.find(b" ", sp + 1)
    if target_end < 0:
        if line_end is not None:
            return None  # HTTP/0.9 "GET /x" with no version: not something we report
        target_end = len(line)
    target = line[sp + 1 : target_end]
    if not _is_target(target):
        return None
    version = line[target_end + 1 :]
    if line_end is None:
        if target_end < len(line) and not any(v.startswith(version)
                                              for v in _REQUEST_VERSIONS):
            return None
    elif version not in _REQUEST_VERSIONS:
        return None
    return head[:sp].decode("ascii"), target


def parse_status_line(head: bytes) -> int | None:
    """``b"HTTP/1.1 404 Not Found\\r\\n"`` -> 404; None unless a status 100..599 is readable."""
    if head[:8] not in _VERSIONS or head[8:9] != b" ":
        return None
    code = head[9:12]
    if len(code) != 3 or not all(0x30 <= b <= 0x39 for b in code):
        return None
    # The code must be followed by SP or the line end, or be the last bytes captured.
    if head[12:13] not in (b"", b" ", b"\r", b"\n"):
        return None
    status = int(code)
    return status if 100 <= status <= 599 else None


def header_length(head: bytes) -> int | None:
    """Bytes up to and including the first ``\\r\\n\\r\\n``, None if it is not in ``head``."""
    end = head.find(_HEADER_END)
    return None if end < 0 else end + len(_HEADER_END)


def _header_values(head: bytes, name: bytes) -> list[bytes]:
    """Values of header ``name`` (lower case) among the complete lines of the first block."""
    first = _line_end(head)
    if first is None:
        return []
    block_end = header_length(head)
    block = head[first[1] : len(head) if block_end is None else block_end]
    values = []
    # A line without its LF may be cut mid-value ("Content-Length: 12" of 1234), so drop it.
    for line in block.split(b"\n")[:-1]:
        colon = line.find(b":")
        if colon > 0 and line[:colon].lower() == name:
            values.append(line[colon + 1 :].strip(b" \t\r"))
    return values


def content_length(head: bytes) -> int | None:
    """The Content-Length of the first header block; None if absent, garbled or conflicting."""
    lengths: set[int] = set()
    for value in _header_values(head, b"content-length"):
        # RFC 9110 section 8.6 lets a recipient accept a list of identical values ("5, 5").
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item or len(item) > _MAX_LENGTH_DIGITS or not item.isdigit():
                return None
            lengths.add(int(item))
    return lengths.pop() if len(lengths) == 1 else None


def is_chunked(head: bytes) -> bool:
    """Whether the first header block's Transfer-Encoding ends in ``chunked``."""
    codings = [
        item.strip(b" \t").lower()
        for value in _header_values(head, b"transfer-encoding")
        for item in value.split(b",")
    ]
    codings = [c for c in codings if c]
    return bool(codings) and codings[-1] == b"chunked"


def nth_request(head: bytes, n: int) -> tuple[str, bytes] | None:
    """The request line of the ``n``-th (0-based) of several pipelined requests in ``head``.

    Requests are delimited by their header end plus their Content-Length body. None if that
    request (its headers and body) is not wholly within ``head``, if any request up to it has a
    chunked body (its length is unknown without parsing chunks), or if a length is garbled.
    """
    if n < 0:
        return None
    start = 0
    index = 0
    while True:
        # RFC 9112 section 2.2: a server should ignore empty lines before a request line.
        while head.startswith(b"\r\n", start):
            start += 2
        request = head[start:]
        headers_len = header_length(request)
        if headers_len is None:
            return None
        headers = request[:headers_len]
        if is_chunked(headers):
            return None
        body_len = 0
        if _header_values(headers, b"content-length"):
            length = content_length(headers)
            if length is None:
                return None
            body_len = length
        if headers_len + body_len > len(request):
            return None
        if index == n:
            return parse_request_line(headers)
        # Each step consumes at least the 4-byte header end, so this loop ends for any n.
        start += headers_len + body_len
        index += 1


def request_paths(
    heads: npt.NDArray[np.uint8],
    head_lens: npt.NDArray[np.integer],
    method_lens: npt.NDArray[np.integer],
    max_path: int = 128,
) -> npt.NDArray[np.uint8]:
    """The path of each request head, as ``(n, max_path)`` zero-padded bytes.

    Row i's path starts after ``method_lens[i]`` plus the space and ends at the first space,
    CR, LF, ``?``, or ``head_lens[i]`` (lengths are clipped to the row). Zero padding lets
    ``np.unique(paths, axis=0)`` group a batch so each distinct path is templated once.
    """
    if heads.ndim != 2:
        raise ValueError(f"heads must be a 2-D (n, head_size) uint8 array, got shape {heads.shape}")
    if max_path < 0:
        raise ValueError(f"max_path must be >= 0, got {max_path}")
    rows, width = heads.shape
    out = np.zeros((rows, max_path), dtype=np.uint8)
    if rows == 0 or width == 0 or max_path == 0:
        return out
    starts = np.clip(np.asarray(method_lens, dtype=np.int64) + 1, 0, width)
    ends = np.clip(np.asarray(head_lens, dtype=np.int64), 0, width)
    columns = starts[:, None] + np.arange(max_path, dtype=np.int64)[None, :]
    window = np.take_along_axis(
        np.asarray(heads, dtype=np.uint8), np.minimum(columns, width - 1), axis=1
    )
    stop = (
        (columns >= ends[:, None])
        | (window == ord(" "))
        | (window == ord("\r"))
        | (window == ord("\n"))
        | (window == ord("?"))
    )
    keep = ~np.logical_or.accumulate(stop, axis=1)
    out[keep] = window[keep]
    return out
