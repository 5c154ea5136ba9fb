"""The http family's kernel parsers (bpf/http_parse.h) against user space's, on random input.

The kernel decides, per exchange, where a head's header block ends (for body sizes) and which
bytes of the path it hashes (the key user space maps to a route), and recognises methods and
status lines. Counted in the kernel, an exchange never reaches user space, so the two sides must
agree byte for byte: a SEC("syscall") harness (http_parse_harness.bpf.c) runs the very C code
through BPF_PROG_TEST_RUN, and hypothesis feeds it heads, including stale bytes past a head's
length (the kernel reuses its buffers). With numeric segments templated (path_hash's
`numeric`), paths that differ only in their numbers must hash the same, and then the route
templater must give them one route.

Needs: BPF_PROG_TYPE_SYSCALL with BPF_PROG_TEST_RUN and bpf_loop (Linux 5.17+), clang.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probewire.aggregate.http_heads import content_length, request_paths
from probewire.l7.exchanges import METHODS
from probewire.l7.protocols.http1 import HEAD_LEN, METHOD_LEN, header_lengths
from probewire.runtime.bpf import BpfObject, Program
from support.bpf_build import compile_bpf

pytestmark = pytest.mark.bpf

HARNESS = Path(__file__).with_name("http_parse_harness.bpf.c")
PATH_MAX = 128
CHUNKED = (1 << 64) - 1  # RESP_END_CHUNKED
IO = np.dtype([
    ("head", np.uint8, (HEAD_LEN,)), ("len", np.uint32), ("method_in", np.uint32),
    ("status_in", np.uint16), ("head_request", np.uint16), ("numeric", np.uint32),
    ("header_end", np.int32), ("method", np.uint32), ("status", np.uint32),
    ("resp_header_end", np.int32), ("path_hash", np.uint64), ("resp_end_at", np.uint64),
])
# The module-scoped harness is shared by every example on purpose.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def parse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    out = compile_bpf(HARNESS, tmp_path_factory.mktemp("harness") / "http_parse_harness.bpf.o")
    obj = BpfObject(out)
    obj.load()
    try:
        yield obj.programs["parse"]
    finally:
        obj.close()


def run(prog: Program, buffer: bytes, length: int, method: int, status: int = 200,
        head_request: bool = False, numeric: bool = False) -> np.void:
    io = np.zeros(1, IO)
    io["head"][0] = np.frombuffer(buffer.ljust(HEAD_LEN, b"\0")[:HEAD_LEN], np.uint8)
    io["len"], io["method_in"], io["numeric"] = length, method, numeric
    io["status_in"], io["head_request"] = status, head_request
    rc, out = prog.test_run(io.tobytes())
    assert rc == 0
    return np.frombuffer(out, IO)[0]


M64 = (1 << 64) - 1


def mix64(h: int) -> int:
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & M64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & M64
    return h ^ (h >> 31)


STOPS = b" \r\n?"
NUMERIC_MARK = 0x3F3F3F3F3F3F3F3F
NUMERIC_MAX = 24
NUMBER = re.compile(rb"-?[0-9]+")


def numeric_len(buf: bytes, pos: int, end: int) -> int:
    """The length of the segment at pos when it is a number (-?[0-9]+) shorter than
    NUMERIC_MAX bytes, ending at a '/' or where the path stops; else 0."""
    t = pos
    while t < end and buf[t] not in STOPS + b"/":
        t += 1
    if t - pos >= NUMERIC_MAX:
        return 0
    return t - pos if NUMBER.fullmatch(buf[pos:t]) else 0


def path_hash(buf: bytes, length: int, method: int, numeric: bool = False) -> int:
    """The kernel's path hash (bpf/http_parse.h path_word), step by step: the path's bytes in
    8-byte little-endian words, each mixed in, the last one cut where the path stops (and
    mixed in even when that leaves nothing of it); then the path's length. With numeric, a
    word is also cut just after a '/' that a digit or '-' follows (or that is its last
    byte), and a segment that is a number is mixed in as one marker (counted as one byte)."""
    start = int(METHOD_LEN[method]) + 1
    end = min(int(length), start + PATH_MAX, HEAD_LEN)
    h, n, pos, seg_start = 0x9E3779B97F4A7C15, 0, start, True
    while True:
        if seg_start and numeric:
            seg_start = False
            k = numeric_len(buf, pos, end)
            if k:
                h, n, pos = mix64(h ^ NUMERIC_MARK), n + 1, pos + k
                continue
        if pos >= end or pos > HEAD_LEN - 8:
            break
        word = buf[pos:pos + 8]
        cuts = [j for j, c in enumerate(word) if c in STOPS] + [end - pos]
        stop = min(cuts)
        slash = [j for j, c in enumerate(word) if c == ord("/") and (
            j == 7 or word[j + 1] in b"0123456789-")] if numeric else []
        if slash and slash[0] < stop:
            j = slash[0] + 1
            h, n = mix64(h ^ int.from_bytes(word[:j], "little")), n + j
            pos, seg_start = pos + j, True
            continue
        if stop < 8:
            h, n = mix64(h ^ int.from_bytes(word[:stop], "little")), n + stop
            break
        h, n, pos = mix64(h ^ int.from_bytes(word, "little")), n + 8, pos + 8
    return mix64(h ^ n) or 1


def kernel_path(head: bytes, length: int, method: int) -> bytes:
    """The bytes the kernel hashes, by its own rule (checked against request_paths below)."""
    start = METHOD_LEN[method] + 1
    out = bytearray()
    for c in head[start:min(length, start + PATH_MAX, HEAD_LEN)]:
        if c in b" \r\n?":
            break
        out.append(c)
    return bytes(out)


def expected_method(b: bytes) -> int:
    for code, name in enumerate(METHODS[1:], start=1):
        word = name.encode() + b" "
        if b.startswith(word) and len(b) > len(word):
            nxt = b[len(word)]
            if (nxt > 0x20) if name == "CONNECT" else (nxt in b"/*h"):
                return code
    return 0


def expected_status(b: bytes) -> int:
    if (len(b) >= 12 and b[:7] == b"HTTP/1." and b[7:8] in (b"0", b"1") and b[8:9] == b" "
            and b[9:12].isdigit() and b[9:10] != b"0"):
        return int(b[9:12])
    return 0


def kernel_bounds(buf: bytes, length: int, status: int, head_request: bool) -> tuple[int, int]:
    """(header end, response end) by the kernel's rule: the first Content-Length line among
    those starting within the first 238 bytes (the scan reads 18 bytes of a line), no
    Transfer-Encoding line, and a value of optional blanks, digits, then CR or blanks."""
    n = min(length, HEAD_LEN)
    end, cl_at, te = -1, -1, False
    for pos in range(n):
        if buf[pos] != 0x0A:
            continue
        if pos >= 3 and buf[pos - 3:pos + 1] == b"\r\n\r\n":
            end = pos + 1
            break
        ls = pos + 1
        if ls > HEAD_LEN - 18 or ls + 15 > n:
            continue
        if buf[ls:ls + 15].lower() == b"content-length:":
            cl_at = cl_at if cl_at >= 0 else ls + 15
        elif ls + 18 <= n and buf[ls:ls + 18].lower() == b"transfer-encoding:":
            te = True
    if end < 0:
        return -1, 0
    if head_request or status in (204, 304):
        return end, end
    if te:
        return end, CHUNKED
    if cl_at < 0:
        return end, 0
    value = buf[cl_at:end]
    digits = value.lstrip(b" \t")
    number = digits[:len(digits) - len(digits.lstrip(b"0123456789"))]
    rest = digits[len(number):]
    if not number or len(number) > 18 or not rest.lstrip(b" \t").startswith(b"\r"):
        return end, 0
    return end, end + int(number)


HTTPISH = st.sampled_from([b"\r\n", b"\r\n\r\n", b"\r", b"\n", b" ", b"?", b"GET ", b"POST ",
                           b"HTTP/1.1 200 OK", b"/a/b", b"Host: x", b"\r\n\r", b"\n\r\n",
                           b"\r\nContent-Length: ", b"\r\ncontent-LENGTH:", b"12", b"0", b"\t",
                           b"\r\nTransfer-Encoding: chunked", b"\r\nContent-Length:7\r\n",
                           b"/", b"/12", b"/-7", b"-", b"/0/", b"4096", b"12345678901234567890",
                           b"/u", b"x1"])
CHUNKS = st.one_of(HTTPISH, st.binary(min_size=1, max_size=12))


@st.composite
def heads(draw: st.DrawFn) -> tuple[bytes, int]:
    """(256-byte buffer, head length): a head made of HTTP-ish pieces, then stale bytes."""
    head = b"".join(draw(st.lists(CHUNKS, max_size=40)))[:HEAD_LEN]
    length = draw(st.integers(0, len(head)))
    stale = b"".join(draw(st.lists(CHUNKS, max_size=40)))
    return (head[:length] + stale)[:HEAD_LEN].ljust(HEAD_LEN, b"\r"), length


@settings(max_examples=600, deadline=None, suppress_health_check=FIXTURE_OK)
@given(case=heads(), method=st.integers(1, len(METHODS) - 1), numeric=st.booleans())
def test_header_end_and_path_hash_match_user_space(parse: Program, case: tuple[bytes, int],
                                                    method: int, numeric: bool) -> None:
    buffer, length = case
    got = run(parse, buffer, length, method, numeric=numeric)
    row = np.frombuffer(buffer, np.uint8)[None, :]
    assert int(got["header_end"]) == int(header_lengths(row, np.array([length]))[0])
    path = kernel_path(buffer, length, method)
    # The kernel hashes exactly the bytes user space cuts out and templates.
    user = request_paths(row, np.array([length]), np.array([METHOD_LEN[method]]), PATH_MAX)[0]
    assert user.tobytes()[: len(path)] == path and not user[len(path):].any()
    assert int(got["path_hash"]) == path_hash(buffer, length, method, numeric)


@settings(max_examples=400, deadline=None, suppress_health_check=FIXTURE_OK)
@given(case=heads())
def test_method_and_status_lines_are_recognised_as_specified(parse: Program,
                                                             case: tuple[bytes, int]) -> None:
    buffer, length = case
    got = run(parse, buffer, length, 1)
    assert int(got["method"]) == expected_method(buffer)
    assert int(got["status"]) == expected_status(buffer)


@pytest.mark.parametrize("head", [
    b"GET /static/index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /api/upload?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 10\r\n\r\n0123456789",
    b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 230,  # no end of headers within 256 bytes
])
def test_real_heads(parse: Program, head: bytes) -> None:
    got = run(parse, head + b"\r\n\r\n" * 8, len(head), 1)
    row = np.frombuffer(head.ljust(HEAD_LEN, b"\0")[:HEAD_LEN], np.uint8)[None, :]
    assert int(got["header_end"]) == int(header_lengths(row, np.array([min(len(head), 256)]))[0])


@settings(max_examples=600, deadline=None, suppress_health_check=FIXTURE_OK)
@given(case=heads(), status=st.sampled_from([200, 204, 304, 404]), head_request=st.booleans())
def test_response_end_follows_content_length_like_user_space(
        parse: Program, case: tuple[bytes, int], status: int, head_request: bool) -> None:
    buffer, length = case
    got = run(parse, buffer, length, 1, status, head_request)
    end, end_at = kernel_bounds(buffer, length, status, head_request)
    assert (int(got["resp_header_end"]), int(got["resp_end_at"])) == (end, end_at)
    # Where the kernel knows the body's length, user space's parser reads the same one.
    head = buffer[:min(length, HEAD_LEN)]
    has_body = not head_request and status not in (204, 304)
    if end >= 0 and end_at not in (0, CHUNKED) and has_body \
            and head.lower().count(b"\ncontent-length:") == 1:
        assert content_length(head[:end]) == end_at - end


# Paths made of segments: names, numbers (the {id} the kernel hashes as one), near-numbers.
SEGMENTS = st.one_of(
    st.sampled_from(["api", "users", "v2", "u1", "-", "x-1", "1x", "", "a" * 9, "{id}", "%20",
                     "orders.json", "-0", "00"]),
    st.integers(-10**22, 10**22).map(str),
    st.text("0123456789-/abz.", max_size=12))


def numbers_replaced(path: str, draw: st.DrawFn) -> str:
    """The path with each number segment of fewer than NUMERIC_MAX bytes replaced by another."""
    out = []
    for seg in path.split("/"):
        if NUMBER.fullmatch(seg.encode()) and len(seg) < NUMERIC_MAX:
            seg = str(draw(st.integers(-10**22, 10**22)))
            seg = seg if len(seg) < NUMERIC_MAX else "7"
        out.append(seg)
    return "/".join(out)


@st.composite
def same_route_paths(draw: st.DrawFn) -> tuple[str, str, str]:
    path = "/" + "/".join(draw(st.lists(SEGMENTS, min_size=0, max_size=12)))
    return path, numbers_replaced(path, draw), draw(st.sampled_from([" HTTP/1.1\r\n", "?q=1 ",
                                                                    "", "\r\n"]))


def request(path: str, tail: str) -> tuple[bytes, int]:
    head = f"GET {path}{tail}".encode()[:HEAD_LEN]
    return head.ljust(HEAD_LEN, b"\r"), len(head)


@settings(max_examples=500, deadline=None, suppress_health_check=FIXTURE_OK)
@given(case=same_route_paths())
def test_numeric_segments_hash_as_one_and_only_within_a_route(
        parse: Program, case: tuple[str, str, str]) -> None:
    """With numeric on, paths that differ only in their numbers hash the same (and the
    templater gives them one route, which is what makes that exact); a path's hash is still
    the model's, and paths of other routes do not share it."""
    from probewire.aggregate.routes import RouteTemplater

    one, other, tail = case
    templater = RouteTemplater()
    assert templater.numbers_are_ids
    (b1, n1), (b2, n2) = request(one, tail), request(other, tail)
    h1 = int(run(parse, b1, n1, 1, numeric=True)["path_hash"])
    h2 = int(run(parse, b2, n2, 1, numeric=True)["path_hash"])
    assert h1 == path_hash(b1, n1, 1, True) and h2 == path_hash(b2, n2, 1, True)
    cut1 = request_paths(np.frombuffer(b1, np.uint8)[None, :], np.array([n1]),
                         np.array([3]), PATH_MAX)[0].tobytes().rstrip(b"\0")
    cut2 = request_paths(np.frombuffer(b2, np.uint8)[None, :], np.array([n2]),
                         np.array([3]), PATH_MAX)[0].tobytes().rstrip(b"\0")
    if len(f"GET {one}".encode()) <= PATH_MAX and len(f"GET {other}".encode()) <= PATH_MAX:
        assert h1 == h2
    if h1 == h2:
        assert templater.template(cut1) == templater.template(cut2)
    else:
        # Hashes tell paths apart that differ in more than their numbers.
        assert cut1 != cut2


@pytest.mark.parametrize(("one", "other"), [
    ("/api/users/123", "/api/users/456"),
    ("/api/users/7/orders/12", "/api/users/123456789012345/orders/-3"),
    ("/1", "/2"),
    ("/api/users/1", "/api/users/4096"),
])
def test_ids_hash_the_same(parse: Program, one: str, other: str) -> None:
    (b1, n1), (b2, n2) = request(one, " HTTP/1.1\r\n"), request(other, " HTTP/1.1\r\n")
    assert run(parse, b1, n1, 1, numeric=True)["path_hash"] == \
        run(parse, b2, n2, 1, numeric=True)["path_hash"]
    assert run(parse, b1, n1, 1)["path_hash"] != run(parse, b2, n2, 1)["path_hash"]


@pytest.mark.parametrize(("one", "other"), [
    ("/api/users/123", "/api/users/me"), ("/api/users/12", "/api/users/12x"),
    ("/a/-", "/a/-1"), ("/a/1/b", "/a/1/c"), ("/a/1x/b", "/a/2x/b"),
    # Same route, hashed apart (that only costs a route named twice): an empty segment, a
    # number past NUMERIC_MAX.
    ("/a/1", "/a//1"), ("/a/" + "1" * 24, "/a/" + "2" * 24),
])
def test_paths_hash_apart_unless_only_numbers_differ(parse: Program, one: str, other: str) -> None:
    (b1, n1), (b2, n2) = request(one, " HTTP/1.1\r\n"), request(other, " HTTP/1.1\r\n")
    assert run(parse, b1, n1, 1, numeric=True)["path_hash"] != \
        run(parse, b2, n2, 1, numeric=True)["path_hash"]
