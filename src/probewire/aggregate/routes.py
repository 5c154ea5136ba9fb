"""Request targets -> bounded ``http_route`` label values.

A raw path is unbounded (ids, tokens, hashes), so it must never become a label value as-is.
:class:`RouteTemplater` maps it to a route in this order:

1. Query and fragment are dropped; ``*`` (``OPTIONS *``) stays ``*``; absolute-form
   (``http://host/p``) uses its path; any other target not starting with ``/`` (e.g. CONNECT's
   ``host:port``) is read as if it did. Bytes that are not UTF-8 decode to U+FFFD.
2. Empty segments are dropped (``//a/`` -> ``/a``), so an empty path is ``/``.
3. The first configured pattern that matches wins and is returned verbatim.
4. Otherwise each segment is classified: ASCII digits -> ``{id}``, a UUID -> ``{uuid}``, hex of
   16+ chars -> ``{hash}``, a token-like string -> ``{token}``; anything else stays.
5. A route is cut to at most :data:`MAX_SEGMENTS` segments and ``max_path_len`` characters, the
   cut marked by a last segment ``{*rest}``.

The result is a fixed point: templating a route gives the same route back. That holds because
heuristics only rewrite brace-free segments, literals in patterns may not contain braces, and a
``{name}`` placeholder does not match a ``{*...}`` segment (so a cut route never matches a
pattern its full path did not match).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_SEGMENTS",
    "REST_MARKER",
    "RouteTemplater",
    "validate_route_pattern",
]

# Counts the marker too, so a cut route (15 segments + marker) is not cut again when re-templated.
MAX_SEGMENTS = 16
REST_MARKER = "{*rest}"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PLACEHOLDER_RE = re.compile(rf"\{{({_NAME})\}}")
_WILDCARD_RE = re.compile(rf"\{{\*({_NAME})\}}")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/]*")
_DIGITS_RE = re.compile(r"[0-9]+")
_UUID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)
_HEX_RE = re.compile(r"[0-9a-fA-F]{16,}")
# URL-safe base64 plus the characters session ids and slugs use; no braces (see module doc).
_TOKEN_CHARS_RE = re.compile(r"[A-Za-z0-9._~+=\-]{16,}")
_HAS_DIGIT_RE = re.compile(r"[0-9]")
_HAS_LETTER_RE = re.compile(r"[A-Za-z]")
_HAS_UPPER_RE = re.compile(r"[A-Z]")
_HAS_LOWER_RE = re.compile(r"[a-z]")


def _classify(segment: str) -> str:
    if _DIGITS_RE.fullmatch(segment):
        return "{id}"
    if _UUID_RE.fullmatch(segment):
        return "{uuid}"
    if _HEX_RE.fullmatch(segment):
        return "{hash}"
    if _TOKEN_CHARS_RE.fullmatch(segment):
        has_digit = _HAS_DIGIT_RE.search(segment) is not None
        # 20+ chars mixing letters and digits: ids and slugs with numbers; 16+ chars mixing
        # upper, lower and digits: random base64. Dates ("2024-01-31") are too short for either.
        if len(segment) >= 20 and has_digit and _HAS_LETTER_RE.search(segment):
            return "{token}"
        if has_digit and _HAS_UPPER_RE.search(segment) and _HAS_LOWER_RE.search(segment):
            return "{token}"
    return segment


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def validate_route_pattern(pattern: str) -> str:
    """Check a configured route pattern and return it normalised (no empty segments).

    Raises ``ValueError`` naming the problem, for config validation to report.
    """
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/', e.g. '/users/{{id}}'")
    if "?" in pattern or "#" in pattern:
        raise ValueError(
            f"route pattern {pattern!r} must not contain '?' or '#': queries and fragments "
            "are never part of a route"
        )
    segments = _segments(pattern)
    names: set[str] = set()
    for i, segment in enumerate(segments):
        wildcard = _WILDCARD_RE.fullmatch(segment)
        placeholder = _PLACEHOLDER_RE.fullmatch(segment)
        if wildcard and i != len(segments) - 1:
            raise ValueError(
                f"route pattern {pattern!r}: wildcard {segment!r} must be the last segment"
            )
        match = wildcard or placeholder
        if match is None:
            if "{" in segment or "}" in segment:
                raise ValueError(
                    f"route pattern {pattern!r}: segment {segment!r} is not a valid placeholder; "
                    "use a whole segment '{name}' or a last segment '{*name}', with name "
                    f"matching {_NAME}"
                )
            continue
        if match.group(1) in names:
            raise ValueError(f"route pattern {pattern!r}: placeholder {segment!r} is repeated")
        names.add(match.group(1))
    return "/" + "/".join(segments)


@dataclass(frozen=True, slots=True)
class _Pattern:
    route: str
    # None for a placeholder, the literal text otherwise.
    fixed: tuple[str | None, ...]
    wildcard: bool

    @classmethod
    def parse(cls, pattern: str) -> _Pattern:
        route = validate_route_pattern(pattern)
        segments = _segments(route)
        wildcard = bool(segments) and _WILDCARD_RE.fullmatch(segments[-1]) is not None
        if wildcard:
            segments = segments[:-1]
        fixed = tuple(None if _PLACEHOLDER_RE.fullmatch(s) else s for s in segments)
        return cls(route, fixed, wildcard)

    def matches(self, segments: Sequence[str]) -> bool:
        if len(segments) != len(self.fixed) and not (
            self.wildcard and len(segments) >= len(self.fixed)
        ):
            return False
        for want, got in zip(self.fixed, segments, strict=False):
            if want is None:
                if got.startswith("{*"):
                    return False
            elif want != got:
                return False
        return True


class RouteTemplater:
    """Maps request targets to bounded route strings; see the module docstring for the rules.

    Results are cached per raw target (an LRU of ``cache_size`` entries, 0 disables it) because
    the same few paths repeat at high rates. Safe to share between threads.
    """

    def __init__(
        self, patterns: Sequence[str] = (), max_path_len: int = 256, cache_size: int = 65536
    ) -> None:
        if max_path_len < len(REST_MARKER) + 1:
            raise ValueError(
                f"max_path_len must be at least {len(REST_MARKER) + 1} (room for "
                f"'/{REST_MARKER}'), got {max_path_len}"
            )
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 (0 disables the cache), got {cache_size}")
        self._patterns = tuple(_Pattern.parse(p) for p in patterns)
        # A pattern's own text must map to itself even when an earlier pattern also matches it.
        self._pattern_routes = frozenset(p.route for p in self._patterns)
        self._max_path_len = max_path_len
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def patterns(self) -> tuple[str, ...]:
        """The route patterns, normalised, in order of preference."""
        return tuple(p.route for p in self._patterns)

    @property
    def cached_paths(self) -> int:
        with self._lock:
            return len(self._cache)

    def template(self, path: bytes | str) -> str:
        raw = path.encode("utf-8", "surrogatepass") if isinstance(path, str) else bytes(path)
        if self._cache_size:
            with self._lock:
                route = self._cache.get(raw)
                if route is not None:
                    self._cache.move_to_end(raw)
                    return route
        route = self._template(raw)
        if self._cache_size:
            with self._lock:
                self._cache[raw] = route
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return route

    def _template(self, raw: bytes) -> str:
        for sep in (b"?", b"#"):
            raw = raw.split(sep, 1)[0]
        target = raw.decode("utf-8", errors="replace")
        if target == "*":
            return "*"
        absolute = _SCHEME_RE.match(target)
        if absolute:
            target = target[absolute.end() :]
        segments = _segments(target)
        normalised = "/" + "/".join(segments)
        if normalised in self._pattern_routes:
            return normalised
        for pattern in self._patterns:
            if pattern.matches(segments):
                return pattern.route
        return self._bounded([_classify(s) for s in segments])

    def _bounded(self, segments: list[str]) -> str:
        if len(segments) > MAX_SEGMENTS:
            segments = [*segments[: MAX_SEGMENTS - 1], REST_MARKER]
        route = "/" + "/".join(segments)
        if len(route) <= self._max_path_len:
            return route
        kept: list[str] = []
        length = len(REST_MARKER) + 1
        for segment in segments:
            if segment == REST_MARKER or length + len(segment) + 1 > self._max_path_len:
                break
            kept.append(segment)
            length += len(segment) + 1
        return "/" + "/".join([*kept, REST_MARKER])
