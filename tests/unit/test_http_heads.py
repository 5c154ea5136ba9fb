"""Parsing raw HTTP/1.x heads captured by the kernel: exact results and robustness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.aggregate.http_heads import (
    METHODS,
    content_length,
    header_length,
    is_chunked,
    nth_request,
    parse_request_line,
    parse_status_line,
    request_paths,
)

REQUEST = b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (REQUEST, ("GET", b"/x?y=1")),
        (b"DELETE /users/1 HTTP/1.0\r\n\r\n", ("DELETE", b"/users/1")),
        (b"OPTIONS * HTTP/1.1\r\n", ("OPTIONS", b"*")),
        (b"GET http://h/p HTTP/1.1\r\n", ("GET", b"http://h/p")),
        (b"GET /x HTTP/1.1\nHost: a\n\n", ("GET", b"/x")),  # bare LF
        # Cut by the capture size: anywhere after the first target byte is still a request.
        (b"GET /x HTTP/1.1\r", ("GET", b"/x")),
        (b"GET /x HTTP/1.", ("GET", b"/x")),
        (b"GET /x ", ("GET", b"/x")),
        (b"GET /very/long/pa", ("GET", b"/very/long/pa")),
        (b"GET /x\r", ("GET", b"/x")),
        (b"GET ", None),
        (b"GET", None),
        (b"", None),
        (b"GET /x HTTP/2.0\r\n", None),
        (b"GET /x HTTP/1.1 extra\r\n", None),
        (b"GET /x\r\n", None),  # HTTP/0.9
        (b"GET /x HTTX", None),
        (b"get /x HTTP/1.1\r\n", None),
        (b"FETCH /x HTTP/1.1\r\n", None),
        (b"GET  /x HTTP/1.1\r\n", None),
        (b"GET /\x00x HTTP/1.1\r\n", None),
        (b"HTTP/1.1 200 OK\r\n", None),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", None),  # TLS ClientHello
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None),
    ],
)
def test_parse_request_line(head: bytes, expected: tuple[str, bytes] | None) -> None:
    assert parse_request_line(head) == expected


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 404 Not Found\r\n", 404),
        (b"HTTP/1.0 200 OK\r\n", 200),
        (b"HTTP/1.1 204\r\n\r\n", 204),
        (b"HTTP/1.1 503", 503),
        (b"HTTP/1.1 100 Continue\r\n", 100),
        (b"HTTP/1.1 599 x", 599),
        (b"HTTP/1.1 600 x", None),
        (b"HTTP/1.1 099 x", None),
        (b"HTTP/1.1 40", None),
        (b"HTTP/1.1 4040 x", None),
        (b"HTTP/1.1 20x OK", None),
        (b"HTTP/2 200 OK\r\n", None),
        (b"GET / HTTP/1.1\r\n", None),
        (b"", None),
    ],
)
def test_parse_status_line(head: bytes, status: int | None) -> None:
    assert parse_status_line(head) == status


def test_header_length() -> None:
    assert header_length(REQUEST) == len(REQUEST) - 3
    assert header_length(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert header_length(b"") is None


@pytest.mark.parametrize(
    ("head", "length"),
    [
        (REQUEST, 3),
        (b"HTTP/1.1 200 OK\r\ncontent-LENGTH:  42 \r\n\r\n", 42),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 5),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", 5),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999999\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nHost: a\r\n\r\n", None),
        # Cut mid-value: "12" may be the start of "1234", so it is not trusted.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12", None),
        # Only the first header block counts (the second is the next pipelined message).
        (b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", None),
        # The start line is not a header even if it looks like one.
        (b"Content-Length: 4\r\n\r\n", None),
    ],
)
def test_content_length(head: bytes, length: int | None) -> None:
    assert content_length(head) == length


@pytest.mark.parametrize(
    ("head", "chunked"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False),  # cut mid-line
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", False),
        (b"", False),
    ],
)
def test_is_chunked(head: bytes, chunked: bool) -> None:
    assert is_chunked(head) is chunked


PIPELINED = (
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
    b"POST /b HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
    b"\r\n"  # a stray empty line between requests is allowed
    b"PUT /c?q HTTP/1.1\r\nHost: h\r\n\r\n"
    b"GET /d HTTP/1.1\r\nHost: h"
)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, ("GET", b"/a")),
        (1, ("POST", b"/b")),
        (2, ("PUT", b"/c?q")),
        (3, None),  # headers cut off
        (4, None),
        (-1, None),
        (10**9, None),
    ],
)
def test_nth_request_skips_headers_and_bodies(n: int, expected: tuple[str, bytes] | None) -> None:
    assert nth_request(PIPELINED, n) == expected


def test_nth_request_gives_up_on_chunked_or_short_or_garbled_bodies() -> None:
    chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert nth_request(chunked + b"GET /b HTTP/1.1\r\n\r\n", 1) is None
    assert nth_request(chunked, 0) is None
    short = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"
    assert nth_request(short, 0) is None
    garbled = b"POST /a HTTP/1.1\r\nContent-Length: ten\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    assert nth_request(garbled, 1) is None


def test_methods() -> None:
    assert METHODS == (
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


@given(head=st.binary(max_size=600), n=st.integers())
def test_parsers_never_raise_on_arbitrary_bytes(head: bytes, n: int) -> None:
    parse_request_line(head)
    parse_status_line(head)
    header_length(head)
    content_length(head)
    is_chunked(head)
    nth_request(head, n)


HTTP_PIECES = (
    *(b"GET ", b"POST ", b"/x", b"?", b" ", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r"),
    *(b"Content-Length: 3", b"content-length:0", b"Transfer-Encoding: chunked", b"abc"),
    *(b"HTTP/1.1 200 OK", b"\x00", b"\xff", b":"),
)
http_ish = st.lists(
    st.sampled_from(HTTP_PIECES),
    max_size=40,
).map(b"".join)


@given(head=http_ish, n=st.integers(min_value=-2, max_value=6))
def test_parsers_never_raise_on_http_like_garbage(head: bytes, n: int) -> None:
    request = parse_request_line(head)
    if request is not None:
        assert request[0] in METHODS and request[1]
    status = parse_status_line(head)
    assert status is None or 100 <= status <= 599
    length = content_length(head)
    assert length is None or length >= 0
    is_chunked(head)
    nth = nth_request(head, n)
    if n == 0 and nth is not None:
        assert nth == request


target_st = st.binary(min_size=1, max_size=60).map(
    lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F) or b"/"
)


@st.composite
def head_rows(draw: st.DrawFn) -> tuple[bytes, int, int]:
    width = 96
    if draw(st.booleans()):
        method = draw(st.sampled_from(METHODS)).encode()
        tail = draw(st.sampled_from([b" HTTP/1.1\r\nHost: x\r\n\r\n", b" HTTP/1.", b"\r", b""]))
        row = method + b" " + draw(target_st) + tail
        method_len = len(method)
    else:
        row = draw(st.binary(max_size=width))
        method_len = draw(st.integers(min_value=-5, max_value=width + 5))
    row = row[:width]
    head_len = draw(st.one_of(st.just(len(row)), st.integers(min_value=-5, max_value=width + 5)))
    return row.ljust(width, draw(st.sampled_from([b"\x00", b"\xaa"]))), head_len, method_len


@given(rows=st.lists(head_rows(), max_size=30), max_path=st.integers(min_value=0, max_value=80))
def test_request_paths_match_the_scalar_parser(
    rows: list[tuple[bytes, int, int]], max_path: int
) -> None:
    heads = np.frombuffer(b"".join(r for r, _, _ in rows), dtype=np.uint8).reshape(len(rows), 96)
    head_lens = np.array([h for _, h, _ in rows], dtype=np.int32)
    method_lens = np.array([m for _, _, m in rows], dtype=np.int16)
    paths = request_paths(heads, head_lens, method_lens, max_path=max_path)
    assert paths.shape == (len(rows), max_path) and paths.dtype == np.uint8
    for i, (row, head_len, method_len) in enumerate(rows):
        parsed = parse_request_line(row[: max(head_len, 0)])
        if parsed is None or len(parsed[0]) != method_len:
            continue
        expected = parsed[1].split(b"?")[0][:max_path]
        assert paths[i].tobytes() == expected.ljust(max_path, b"\x00")


def test_request_paths_group_identical_paths() -> None:
    raw = [b"GET /a?x=1 HTTP/1.1\r\n", b"POST /bb HTTP/1.1\r\n", b"GET /a HTTP/1.1\r\n", b""]
    heads = np.zeros((len(raw), 32), dtype=np.uint8)
    for i, r in enumerate(raw):
        heads[i, : len(r)] = np.frombuffer(r, dtype=np.uint8)
    head_lens = np.array([len(r) for r in raw])
    method_lens = np.array([3, 4, 3, 3])
    paths = request_paths(heads, head_lens, method_lens, max_path=8)
    unique, inverse = np.unique(paths, axis=0, return_inverse=True)
    assert [u.tobytes().rstrip(b"\x00") for u in unique] == [b"", b"/a", b"/bb"]
    assert list(inverse.ravel()) == [1, 2, 1, 0]


def test_request_paths_edge_shapes() -> None:
    empty = np.zeros((0, 16), dtype=np.uint8)
    assert request_paths(empty, np.array([]), np.array([])).shape == (0, 128)
    zero_width = np.zeros((2, 0), dtype=np.uint8)
    assert request_paths(zero_width, np.array([0, 0]), np.array([3, 3]), 4).shape == (2, 4)
    with pytest.raises(ValueError, match="2-D"):
        request_paths(np.zeros(4, dtype=np.uint8), np.array([4]), np.array([3]))
