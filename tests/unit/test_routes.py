"""Request targets -> bounded http_route values."""

from __future__ import annotations

import re
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.aggregate.routes import (
    MAX_SEGMENTS,
    REST_MARKER,
    RouteTemplater,
    validate_route_pattern,
)

PATTERNS = (
    "/users/{id}",
    "/api/{version}/items/{item}",
    "/static/{*rest}",
    # Overlaps the wildcard above: a cut or wildcard route must not flip between the two.
    "/static/{name}/raw",
    "/{tenant}/dashboard",
)

segment_st = st.one_of(
    st.sampled_from(["users", "api", "v1", "items", "static", "raw", "dashboard", "me", "{id}"]),
    st.from_regex(r"[0-9]{1,12}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{16,40}", fullmatch=True),
    st.uuids().map(str),
    st.text(alphabet="abcXYZ019-_.~{}*%", min_size=0, max_size=30),
    st.binary(max_size=8).map(lambda b: b.decode("utf-8", "replace")),
)
path_st = st.lists(segment_st, max_size=24).map(lambda segs: "/" + "/".join(segs))
target_st = st.one_of(
    path_st,
    st.tuples(path_st, st.text(max_size=10)).map(lambda pq: f"{pq[0]}?{pq[1]}"),
    path_st.map(lambda p: "http://example.com:8080" + p),
    st.just("*"),
    st.text(max_size=60),
)
raw_st = st.one_of(st.binary(max_size=400), target_st.map(lambda t: t.encode("utf-8", "replace")))


@pytest.mark.parametrize(
    ("target", "route"),
    [
        (b"", "/"),
        (b"/", "/"),
        (b"*", "*"),
        (b"/orders/12345", "/orders/{id}"),
        (b"/orders/12345?page=2#top", "/orders/{id}"),
        (b"/a//b///c/", "/a/b/c"),
        (b"/files/123e4567-E89B-12d3-A456-426614174000", "/files/{uuid}"),
        (b"/blobs/deadbeefcafebabe0123", "/blobs/{hash}"),
        (b"/blobs/deadbeef", "/blobs/deadbeef"),
        (b"/s/aZ3kQ9xPm2LrT7vB", "/s/{token}"),
        (b"/p/how-to-install-python3-on-linux", "/p/{token}"),
        (b"/reports/2024-01-31", "/reports/{date}"),
        (b"/reports/2024-01-31/42", "/reports/{date}/{id}"),
        (b"/events/2024-01-31T10:00:00Z", "/events/{date}"),
        (b"/events/2024-01-31T10%3A00%3A00.5%2B02%3A00", "/events/{date}"),
        (b"/archive/31.01.2024", "/archive/{date}"),
        (b"/r/3fa9c2/z123", "/r/{hash}/{id}"),
        (b"/orders/ord_123a4/items", "/orders/{id}/items"),
        (b"/invoices/INV-2024-0001", "/invoices/{id}"),
        (b"/users/u12345", "/users/{id}"),
        (b"/users/alice@example.com/prefs", "/users/{email}/prefs"),
        (b"/users/alice%40example.com", "/users/{email}"),
        (b"/img/9f86d081884c7d659a2feaa0c55ad015.png", "/img/{name}.png"),
        (b"/img/abc123def.webp", "/img/{name}.webp"),
        (b"/dl/2024-01-31.tar.gz", "/dl/{name}.tar.gz"),
        (b"/static/main.4f3c2a1b.js", "/static/main.{hash}.js"),
        (b"/t/AbCdEfGhIjKlMnOp_QrStUv", "/t/{token}"),
        (b"/offset/-42", "/offset/{id}"),
        # Names that carry a number, words that are hex, files and versions stay literal.
        (b"/api/v2/oauth2/sha256/x86_64/iso8601", "/api/v2/oauth2/sha256/x86_64/iso8601"),
        (b"/colour/facade/added", "/colour/facade/added"),
        (b"/static/jquery-3.6.0.min.js", "/static/jquery-3.6.0.min.js"),
        (b"/static/logo.png", "/static/logo.png"),
        (b"/pkg/1.2.3", "/pkg/1.2.3"),
        (b"/health", "/health"),
        (b"http://example.com/orders/7?x=1", "/orders/{id}"),
        (b"https://example.com", "/"),
        (b"example.com:443", "/example.com:443"),
        (b"/caf\xff/1", "/caf\ufffd/{id}"),
    ],
)
def test_heuristics_template_variable_segments(target: bytes, route: str) -> None:
    assert RouteTemplater().template(target) == route


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/users/42", "/users/{id}"),
        ("/users/me", "/users/{id}"),
        ("/users/42/posts", "/users/{id}/posts"),
        ("/api/v2/items/abc", "/api/{version}/items/{item}"),
        ("/static/css/site.css", "/static/{*rest}"),
        ("/static", "/static/{*rest}"),
        ("/static/logo/raw", "/static/{*rest}"),
        ("/acme/dashboard", "/{tenant}/dashboard"),
        ("/acme/dashboard/1", "/acme/dashboard/{id}"),
    ],
)
def test_configured_patterns_win_in_order(target: str, route: str) -> None:
    assert RouteTemplater(PATTERNS).template(target) == route


def test_pattern_text_templates_to_itself_even_if_an_earlier_pattern_matches() -> None:
    templater = RouteTemplater(("/static/{*rest}", "/static/{name}", "/{a}/{b}", "/users/{id}"))
    assert templater.template("/static/x") == "/static/{*rest}"
    assert templater.template("/static/{name}") == "/static/{name}"
    assert templater.template("/users/{id}") == "/users/{id}"


def test_more_than_max_segments_are_cut_with_a_rest_marker() -> None:
    route = RouteTemplater().template("/" + "/".join(f"s{i}" for i in range(40)))
    segments = route.split("/")[1:]
    assert len(segments) == MAX_SEGMENTS
    assert segments[:3] == ["s0", "s1", "s2"]
    assert segments[-1] == REST_MARKER


def test_long_paths_are_cut_to_max_path_len_at_a_segment_boundary() -> None:
    templater = RouteTemplater(max_path_len=28)
    assert templater.template("/alpha/beta/gamma/delta/epsilon") == "/alpha/beta/gamma/{*rest}"
    assert templater.template("/" + "x" * 100) == f"/{REST_MARKER}"


def test_cut_route_does_not_match_a_pattern_its_full_path_missed() -> None:
    pattern = "/" + "/".join(["s"] * (MAX_SEGMENTS - 1)) + "/{last}"
    templater = RouteTemplater([pattern])
    route = templater.template("/" + "/".join(["s"] * 20))
    assert route == "/" + "/".join(["s"] * (MAX_SEGMENTS - 1)) + "/" + REST_MARKER
    assert templater.template(route) == route


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("users/{id}", "must start with '/'"),
        ("/users/{id}?x", "'?' or '#'"),
        ("/users/{1d}", "not a valid placeholder"),
        ("/users/u-{id}", "not a valid placeholder"),
        ("/users/{id", "not a valid placeholder"),
        ("/{*rest}/x", "must be the last segment"),
        ("/{id}/{id}", "repeated"),
    ],
)
def test_invalid_patterns_are_rejected_with_the_reason(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_route_pattern(pattern)
    with pytest.raises(ValueError, match=re.escape(message)):
        RouteTemplater([pattern])


def test_valid_patterns_are_normalised() -> None:
    assert validate_route_pattern("/") == "/"
    assert validate_route_pattern("//users//{id}/") == "/users/{id}"
    assert validate_route_pattern("/static/{*rest}") == "/static/{*rest}"


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_path_len"):
        RouteTemplater(max_path_len=4)
    with pytest.raises(ValueError, match="cache_size"):
        RouteTemplater(cache_size=-1)


def test_cache_is_bounded_lru() -> None:
    templater = RouteTemplater(cache_size=3)
    for i in range(10):
        templater.template(f"/p{i}/1")
    assert templater.cached_paths == 3
    assert RouteTemplater(cache_size=0).template("/a/1") == "/a/{id}"


def test_concurrent_templating_agrees_with_a_single_thread() -> None:
    templater = RouteTemplater(PATTERNS, cache_size=64)
    targets = [f"/users/{i}".encode() for i in range(200)] + [b"/x/%d" % i for i in range(200)]
    results: list[list[str]] = []

    def work() -> None:
        results.append([templater.template(t) for t in targets * 5])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [RouteTemplater(PATTERNS, cache_size=0).template(t) for t in targets * 5]
    assert results == [expected] * 4


def _check_route(route: str, max_path_len: int) -> None:
    assert route == "*" or route.startswith("/")
    assert "?" not in route and "#" not in route
    assert not any(re.fullmatch(r"[0-9]+", s) for s in route.split("/"))
    if route != "*":
        assert len(route) <= max_path_len
        assert len(route.split("/")) - 1 <= MAX_SEGMENTS


@given(raw=raw_st, max_path_len=st.integers(min_value=8, max_value=300))
def test_routes_are_bounded_and_idempotent_on_any_bytes(raw: bytes, max_path_len: int) -> None:
    templater = RouteTemplater(max_path_len=max_path_len, cache_size=16)
    route = templater.template(raw)
    _check_route(route, max_path_len)
    assert templater.template(route) == route
    assert templater.template(raw) == route  # cache hit agrees with the miss
    assert RouteTemplater(max_path_len=max_path_len, cache_size=0).template(raw) == route


@given(target=st.one_of(target_st, raw_st))
def test_routes_with_patterns_are_idempotent(target: str | bytes) -> None:
    templater = RouteTemplater(PATTERNS, max_path_len=64)
    route = templater.template(target)
    assert route == "*" or route.startswith("/")
    assert "?" not in route
    assert templater.template(route) == route
    if route not in PATTERNS:
        _check_route(route, 64)


@given(text=st.text(max_size=100))
def test_str_and_utf8_bytes_give_the_same_route(text: str) -> None:
    templater = RouteTemplater()
    assert templater.template(text) == templater.template(text.encode("utf-8", "surrogatepass"))


# The kernel hashes a segment that is a number (-?[0-9]+) as one marker while
# numbers_are_ids (bpf/l7/http_parse.h path_hash): exact only if the digits never matter.
_NUMBER_SEGMENT = re.compile(rb"-?[0-9]+")


@given(raw=raw_st, numbers=st.lists(st.integers(-10**20, 10**20), min_size=1, max_size=20),
       patterns=st.sampled_from([(), ("/users/{id}", "/a/{x}/b", "/files/{*rest}"),
                                 ("/v1/{*rest}",)]))
def test_number_segments_never_change_the_route_while_numbers_are_ids(
        raw: bytes, numbers: list[int], patterns: tuple[str, ...]) -> None:
    templater = RouteTemplater(patterns, cache_size=0)
    assert templater.numbers_are_ids
    parts = raw.split(b"/")
    swapped = b"/".join(str(numbers[i % len(numbers)]).encode()
                        if _NUMBER_SEGMENT.fullmatch(p) else p for i, p in enumerate(parts))
    assert templater.template(swapped) == templater.template(raw)


@pytest.mark.parametrize(("patterns", "expected"), [
    ((), True), (("/users/{id}", "/v2/items"), True), (("/api/v1/x", "/a/-x"), True),
    (("/api/2/users",), False), (("/a/{x}/-1",), False), (("/files/0/{*rest}",), False),
])
def test_numbers_are_ids_unless_a_pattern_names_a_number(patterns: tuple[str, ...],
                                                         expected: bool) -> None:
    templater = RouteTemplater(patterns)
    assert templater.numbers_are_ids is expected
    if not expected:  # the digits decide: /api/2/users is the pattern, /api/3/users is not
        assert templater.template("/api/2/users") != templater.template("/api/3/users") \
            or templater.template("/a/1/-1") != templater.template("/a/1/-2") \
            or templater.template("/files/0/x") != templater.template("/files/1/x")
