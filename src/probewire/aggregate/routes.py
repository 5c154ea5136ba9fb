"""Request targets -> bounded ``http_route`` label values.

A raw path is unbounded (ids, tokens, hashes), so it must never become a label value as-is.
:class:`RouteTemplater` maps it to a route in this order:

1. Query and fragment are dropped; ``*`` (``OPTIONS *``) stays ``*``; absolute-form
   (``http://host/p``) uses its path; any other target not starting with ``/`` (e.g. CONNECT's
   ``host:port``) is read as if it did. Bytes that are not UTF-8 decode to U+FFFD.
2. Empty segments are dropped (``//a/`` -> ``/a``), so an empty path is ``/``.
3. The first configured pattern that matches wins and is returned verbatim.
4. Otherwise each segment is classified (:func:`classify_segment`): numbers -> ``{id}``, a UUID
   -> ``{uuid}``, hex -> ``{hash}``, a date or timestamp -> ``{date}``, an email address ->
   ``{email}``, a long token-like string (base64url, slugs with numbers) -> ``{token}``, a short
   token mixing letters and digits the way ids do (``ord_123a4``, ``z123``, ``INV-2024-0001``)
   -> ``{id}``, a file name with a generated stem (``<hash>.png``) -> ``{name}.png``; anything
   else stays.
5. A route is cut to at most :data:`MAX_SEGMENTS` segments and ``max_path_len`` characters, the
   cut marked by a last segment ``{*rest}``.

The result is a fixed point: templating a route gives the same route back. That holds because
heuristics only rewrite brace-free segments, literals in patterns may not contain braces, and a
``{name}`` placeholder does not match a ``{*...}`` segment (so a cut route never matches a
pattern its full path did not match).

6. With a :class:`RouteLearner` and a service name (``template(path, service)``), the route then
   goes through what that service's traffic taught: a path position (under the same templated
   prefix) that showed more than ``max_distinct`` distinct values becomes a parameter. Routes a
   configured pattern produced are never changed. See :class:`RouteLearner` for the rules that
   keep learned routes stable.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_SEGMENTS",
    "PARAM",
    "REST_MARKER",
    "LearnedTemplate",
    "RouteLearner",
    "RouteTemplater",
    "classify_segment",
    "validate_route_pattern",
]

# Counts the marker too, so a cut route (15 segments + marker) is not cut again when re-templated.
MAX_SEGMENTS = 16
REST_MARKER = "{*rest}"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PLACEHOLDER_RE = re.compile(rf"\{{({_NAME})\}}")
_WILDCARD_RE = re.compile(rf"\{{\*({_NAME})\}}")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/]*")
# Numbers, with a sign: ids, offsets, epoch times.
_DIGITS_RE = re.compile(r"-?[0-9]+")
_UUID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)
_HEX_RE = re.compile(r"[0-9a-fA-F]{16,}")
# Shorter hex (short git shas, object ids, colour codes) only with a digit and a letter in it,
# in one case: "deadbeef", "facade" and "added" are words.
_SHORT_HEX_RE = re.compile(r"(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{6,15}"
                           r"|(?=[0-9A-F]*[0-9])(?=[0-9A-F]*[A-F])[0-9A-F]{6,15}")
# ISO 8601 dates and timestamps (colons may arrive percent-encoded), day-first dates, months.
_COLON = r"(?::|%3[Aa])"
_DATE_RE = re.compile(
    rf"[0-9]{{4}}-[0-9]{{2}}(?:-[0-9]{{2}}(?:[Tt ][0-9]{{2}}{_COLON}[0-9]{{2}}"
    rf"(?:{_COLON}[0-9]{{2}}(?:\.[0-9]+)?)?(?:[Zz]|(?:[+-]|%2[Bb])[0-9]{{2}}{_COLON}?[0-9]{{2}})?)?)?"
    r"|[0-9]{2}[-.][0-9]{2}[-.][0-9]{4}"
)
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+(?:@|%40)[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
                       r"\.[A-Za-z]{2,}")
# A file extension: short, alphanumeric, with a letter ("1.2.3" is a version, not a file).
_EXTENSION_RE = re.compile(r"(?=[0-9]*[A-Za-z])[A-Za-z0-9]{1,8}")
# URL-safe base64 plus the characters session ids and slugs use; no braces (see module doc).
_TOKEN_CHARS_RE = re.compile(r"[A-Za-z0-9._~+=\-]{16,}")
_ID_CHARS_RE = re.compile(r"[A-Za-z0-9_~\-]+")
_LETTERS_BETWEEN_DIGITS_RE = re.compile(r"[0-9][A-Za-z]+[0-9]")
_BASE64URL_RE = re.compile(r"[A-Za-z0-9_\-]{22,}={0,2}")
_DIGIT_RUN_RE = re.compile(r"[0-9]+")
_HAS_DIGIT_RE = re.compile(r"[0-9]")
_HAS_LETTER_RE = re.compile(r"[A-Za-z]")
_HAS_UPPER_RE = re.compile(r"[A-Z]")
_HAS_LOWER_RE = re.compile(r"[a-z]")


def _is_token(segment: str) -> bool:
    if _TOKEN_CHARS_RE.fullmatch(segment):
        has_digit = _HAS_DIGIT_RE.search(segment) is not None
        # 20+ chars mixing letters and digits: ids and slugs with numbers; 16+ chars mixing
        # upper, lower and digits: random base64.
        if len(segment) >= 20 and has_digit and _HAS_LETTER_RE.search(segment):
            return True
        if has_digit and _HAS_UPPER_RE.search(segment) and _HAS_LOWER_RE.search(segment):
            return True
    # base64url without digits: 22+ chars (a 128-bit value) mixing cases with - or _.
    return bool(_BASE64URL_RE.fullmatch(segment) and ("-" in segment or "_" in segment)
                and _HAS_UPPER_RE.search(segment) and _HAS_LOWER_RE.search(segment))


def _is_mixed_id(segment: str) -> bool:
    """Short tokens mixing letters and digits the way generated ids do.

    Digits in two or more runs with letters between them (``ord_123a4``, ``AB12CD34``) or 6+
    digits in all (``INV-2024-0001``), or one run of 5+ digits (``u12345``), or of 3+ digits
    after at most two letters (``z123``). Names that carry a number (``v2``, ``oauth2``,
    ``ipv6``, ``sha256``, ``iso8601``, ``x86_64``) stay: the learner collapses such a position
    only if it really holds many values.
    """
    if not _ID_CHARS_RE.fullmatch(segment) or not _HAS_LETTER_RE.search(segment):
        return False
    runs = _DIGIT_RUN_RE.findall(segment)
    digits = sum(map(len, runs))
    if len(runs) >= 2:
        return digits >= 6 or (digits >= 3 and _LETTERS_BETWEEN_DIGITS_RE.search(segment)
                               is not None)
    if len(runs) == 1:
        letters = sum(c.isalpha() for c in segment)
        return digits >= 5 or (digits >= 3 and letters <= 2)
    return False


def _classify_stem(segment: str) -> str | None:
    """The placeholder a whole value stands for, or None if it reads as a name."""
    if _DIGITS_RE.fullmatch(segment):
        return "{id}"
    if _UUID_RE.fullmatch(segment):
        return "{uuid}"
    if _HEX_RE.fullmatch(segment) or _SHORT_HEX_RE.fullmatch(segment):
        return "{hash}"
    if _DATE_RE.fullmatch(segment):
        return "{date}"
    if _EMAIL_RE.fullmatch(segment):
        return "{email}"
    return None


def _generated(value: str) -> bool:
    return _classify_stem(value) is not None or _is_token(value) or _is_mixed_id(value)


def _file_name(segment: str) -> str | None:
    """A file name with a generated stem or a content hash inside, templated: ``<hash>.png``
    -> ``{name}.png``, ``main.4f3c2a1b.js`` -> ``main.{hash}.js``; None for anything else."""
    parts = segment.split(".")
    if len(parts) < 2 or not all(parts) or not _EXTENSION_RE.fullmatch(parts[-1]):
        return None
    out = ["{name}" if _generated(parts[0]) else parts[0]]
    for part in parts[1:-1]:
        content_hash = len(part) >= 8 and (_HEX_RE.fullmatch(part) or _SHORT_HEX_RE.fullmatch(part))
        out.append("{hash}" if content_hash else part)
    out.append(parts[-1])
    named = ".".join(out)
    return named if named != segment else None


def classify_segment(segment: str) -> str:
    """One path segment -> itself, or the placeholder its shape says it is (module doc, 4.).

    Segments holding a brace are never rewritten: that keeps templating a fixed point.
    """
    if "{" in segment or "}" in segment:
        return segment
    placeholder = _classify_stem(segment)
    if placeholder is not None:
        return placeholder
    named = _file_name(segment)
    if named is not None:
        return named
    if _is_token(segment):
        return "{token}"
    if _is_mixed_id(segment):
        return "{id}"
    return segment


_classify = classify_segment


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
    the same few paths repeat at high rates. The default is 8,192 (about 2 MB): a cache of
    65,536 distinct paths held 15 MB under path churn, and the record path keeps its own
    path -> route memo in front of this one. Safe to share between threads.

    With a ``learner`` (see :class:`RouteLearner`), ``template(path, service)`` also applies
    what ``service``'s traffic taught; the heuristic answer stays what is cached here, so the
    cache never holds a learned answer that a later collapse would make stale.
    """

    def __init__(
        self, patterns: Sequence[str] = (), max_path_len: int = 256, cache_size: int = 8192,
        learner: RouteLearner | None = None,
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
        self.learner = learner
        if learner is not None:
            learner.protected = learner.protected | self._pattern_routes
        self.evictions = 0

    @property
    def patterns(self) -> tuple[str, ...]:
        """The route patterns, normalised, in order of preference."""
        return tuple(p.route for p in self._patterns)

    @property
    def numbers_are_ids(self) -> bool:
        """Every segment that is a number (-?[0-9]+) templates to ``{id}`` whatever its
        digits: no configured pattern has one as a literal segment. The kernel then hashes
        such segments as one (bpf/l7/http_parse.h path_hash), so a route of ids is named
        once, not once per id."""
        return not any(f is not None and _DIGITS_RE.fullmatch(f)
                       for p in self._patterns for f in p.fixed)

    @property
    def cached_paths(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def cache_size(self) -> int:
        return self._cache_size

    @property
    def generation(self) -> int:
        """Moves whenever ``template(path, service)`` may answer differently for a path it
        answered before (a learned collapse); 0 forever without a learner."""
        return self.learner.generation if self.learner is not None else 0

    def clear_cache(self) -> int:
        """Drop the cached answers (memory pressure); returns how many there were."""
        with self._lock:
            n = len(self._cache)
            self._cache.clear()
            return n

    def learned(self) -> dict[str, Any]:
        """What the learner holds, for /api/routes and `probewire routes` (JSON-ready)."""
        learner = self.learner
        if learner is None:
            return {"enabled": False, "generation": 0, "services": {}}
        services = {}
        for name, stats in learner.summary().items():
            services[name] = {**stats, "templates": [
                {"template": t.template, "distinct_values": t.distinct_values,
                 "kept": list(t.kept), "reason": t.reason, "collapsed_at": t.collapsed_at}
                for t in learner.templates(name)]}
        return {"enabled": True, "generation": learner.generation, "services": services,
                "untracked": learner.untracked}

    def template(self, path: bytes | str, service: str | None = None) -> str:
        """The route of a request target; with a service and a learner, as learned for it."""
        route = self._heuristic(path)
        if service is None or self.learner is None:
            return route
        return self.learner.learn(service, route)

    def _heuristic(self, path: bytes | str) -> str:
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
                    self.evictions += 1
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


# --- learning ---------------------------------------------------------------------------------

PARAM = "{param}"
_PURE_PLACEHOLDER_RE = re.compile(rf"\{{\*?{_NAME}\}}")


@dataclass(frozen=True, slots=True)
class LearnedTemplate:
    """One position a service's traffic turned into a parameter."""

    template: str  # the prefix with the parameter, e.g. /users/{param}
    distinct_values: int  # distinct values seen there when it collapsed
    kept: tuple[str, ...]  # values that stay literal (established before the collapse)
    reason: str  # "values" (more than max_distinct) or "memory" (the service's node cap)
    collapsed_at: float  # unix time


class _Node:
    """A templated path prefix: the values seen at the next position."""

    __slots__ = ("children", "collapse", "hits", "literals")

    def __init__(self) -> None:
        self.children: dict[str, _Node] | None = None
        self.literals = 0  # children that are values (not placeholders), before a collapse
        self.hits = 0  # learn() calls that went through this node
        self.collapse: _Collapse | None = None


@dataclass(slots=True)
class _Collapse:
    kept: frozenset[str]
    forms: dict[str, str]  # file extension -> "{name}.ext" form, at most _MAX_FORMS
    distinct: int
    reason: str
    at: float


@dataclass(slots=True)
class _Trie:
    root: _Node
    nodes: int = 1
    last_used: float = 0.0


_MAX_FORMS = 4


class RouteLearner:
    """Per service, learns which path positions hold parameters, from bounded state.

    Input is a route the heuristics produced (``RouteTemplater.template``). Walking it segment
    by segment from the service's root, each node (a templated prefix) records the distinct
    values seen at the next position, as child nodes: the record is a capped set, exact up to
    ``max_distinct`` values, which is all the decision needs (a sketch that estimates beyond
    the cap would only say "more"). When a value would be the ``max_distinct + 1``-th, the
    position collapses: from then on every value there maps to ``{param}`` (a file name
    ``x.png`` to ``{name}.png``, for at most four extensions), except the values already
    established (seen under at least ``keep_hits`` distinct paths; at most ``keep_max`` of
    them), which stay literal, as a web framework's static routes win over its parametric
    ones (``/users/me`` beside ``/users/{id}``). The collapsed values' subtrees are dropped
    and the position learns afresh below ``{param}``.

    Stability: a learned decision only ever turns a literal into a parameter, never back, and
    never changes which values were kept, so a route changes form at most once per segment,
    always towards fewer series; :attr:`generation` moves whenever it happens (a cache of
    answers must then be dropped). Placeholders the heuristics wrote (``{id}``...) pass
    through, and routes a configured pattern produced (``protected``) are returned as they
    are: configured patterns always win.

    Bounds: each service keeps at most ``max_nodes_per_service`` value nodes; a value that
    would need a node beyond it collapses its position instead (reason ``memory``). At most
    ``max_services`` services learn; the routes of others pass through unchanged (counted in
    :attr:`untracked`). :meth:`forget_idle` drops the state of services idle longer than a
    TTL (their routes then start learning afresh, and generation moves).
    """

    def __init__(self, max_distinct: int = 64, max_nodes_per_service: int = 2048,
                 max_services: int = 64, keep_hits: int = 4, keep_max: int = 8,
                 protected: frozenset[str] = frozenset(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, value, low in (("max_distinct", max_distinct, 2),
                                 ("max_nodes_per_service", max_nodes_per_service, 16),
                                 ("max_services", max_services, 1), ("keep_hits", keep_hits, 1),
                                 ("keep_max", keep_max, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.max_distinct = max_distinct
        self.max_nodes_per_service = max_nodes_per_service
        self.max_services = max_services
        self.keep_hits = keep_hits
        self.keep_max = keep_max
        self.protected = protected
        self._clock = clock
        self._tries: dict[str, _Trie] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self.collapses = 0
        self.untracked = 0  # learn() calls for services beyond max_services
        self.forgotten = 0  # services dropped by forget_idle / shrink

    @property
    def generation(self) -> int:
        """Moves whenever a learned decision changes what some route maps to."""
        return self._generation

    @property
    def nodes(self) -> int:
        with self._lock:
            return sum(t.nodes for t in self._tries.values())

    @property
    def max_nodes(self) -> int:
        """The documented bound of :attr:`nodes` (form and placeholder children of collapsed
        positions aside: at most ``_MAX_FORMS + 1`` plus the heuristics' few per position)."""
        return self.max_nodes_per_service * self.max_services

    def services(self) -> list[str]:
        with self._lock:
            return sorted(self._tries)

    def learn(self, service: str, route: str) -> str:
        """The route as ``service``'s traffic so far has taught (and learn from it)."""
        if route in self.protected or not route.startswith("/"):
            return route
        segments = [s for s in route.split("/") if s]
        with self._lock:
            trie = self._tries.get(service)
            if trie is None:
                if len(self._tries) >= self.max_services:
                    self.untracked += 1
                    return route
                trie = self._tries[service] = _Trie(_Node())
            trie.last_used = self._clock()
            node = trie.root
            node.hits += 1
            out = []
            for segment in segments:
                key = self._key(trie, node, segment)
                out.append(key)
                children = node.children
                if children is None:
                    children = node.children = {}
                child = children.get(key)
                if child is None:
                    child = children[key] = _Node()
                    trie.nodes += 1
                    if node.collapse is None and not _PURE_PLACEHOLDER_RE.fullmatch(key):
                        node.literals += 1
                child.hits += 1
                node = child
            return "/" + "/".join(out)

    def _key(self, trie: _Trie, node: _Node, segment: str) -> str:
        """The child `segment` goes to under `node`; collapses `node` when it must."""
        if _PURE_PLACEHOLDER_RE.fullmatch(segment):
            return segment
        if node.collapse is None:
            if node.children is not None and segment in node.children:
                return segment
            if node.literals >= self.max_distinct:
                self._collapse(trie, node, "values")
            elif trie.nodes >= self.max_nodes_per_service:
                self._collapse(trie, node, "memory")
            else:
                return segment
        collapse = node.collapse
        assert collapse is not None
        if segment in collapse.kept:
            return segment
        return _form(collapse, segment)

    def _collapse(self, trie: _Trie, node: _Node, reason: str, incoming: int = 1) -> None:
        """Make `node`'s position a parameter; `incoming` values arrive with the decision."""
        children = node.children or {}
        values = [(v, c) for v, c in children.items() if not _PURE_PLACEHOLDER_RE.fullmatch(v)]
        established = sorted((c.hits, v) for v, c in values if c.hits >= self.keep_hits)
        kept = frozenset(v for _, v in (established[-self.keep_max:] if self.keep_max else []))
        for value, child in values:
            if value not in kept:
                trie.nodes -= _size(child)
                del children[value]
        node.collapse = _Collapse(kept, {}, len(values) + incoming, reason, time.time())
        node.literals = len(kept)
        self.collapses += 1
        self._generation += 1

    def templates(self, service: str) -> list[LearnedTemplate]:
        """The positions ``service``'s traffic turned into parameters, by prefix."""
        with self._lock:
            trie = self._tries.get(service)
            if trie is None:
                return []
            out: list[LearnedTemplate] = []
            stack: list[tuple[str, _Node]] = [("", trie.root)]
            while stack:
                prefix, node = stack.pop()
                if node.collapse is not None:
                    c = node.collapse
                    forms = sorted({PARAM, *c.forms.values()})
                    for form in forms:
                        out.append(LearnedTemplate(f"{prefix}/{form}", c.distinct,
                                                   tuple(sorted(c.kept)), c.reason, c.at))
                for value, child in (node.children or {}).items():
                    if child.children:
                        stack.append((f"{prefix}/{value}", child))
            return sorted(out, key=lambda t: t.template)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per service: value nodes held and positions collapsed."""
        with self._lock:  # learn() changes the tries on the reader thread
            return {name: {"nodes": t.nodes, "collapsed": _collapsed(t.root)}
                    for name, t in sorted(self._tries.items())}

    def touch(self, services: Iterable[str]) -> None:
        """Mark services as in use (a caller that memoises ``learn``'s answers calls this for
        the services it answered from memory, so :meth:`forget_idle` keeps them)."""
        now = self._clock()
        with self._lock:
            for service in services:
                trie = self._tries.get(service)
                if trie is not None:
                    trie.last_used = now

    def forget_idle(self, idle_before: float) -> int:
        """Drop the state of services not seen since `idle_before` (the learner's clock)."""
        with self._lock:
            idle = [s for s, t in self._tries.items() if t.last_used < idle_before]
            for service in idle:
                del self._tries[service]
            if idle:
                self.forgotten += len(idle)
                self._generation += 1
            return len(idle)

    def shrink(self) -> int:
        """Under memory pressure: collapse the widest positions of every service (more
        parameters, never fewer, so routes stay stable) until each holds at most half its
        nodes. Returns the nodes freed."""
        freed = 0
        with self._lock:
            for trie in self._tries.values():
                target = trie.nodes // 2
                while trie.nodes > max(target, 1):
                    widest = _widest(trie.root)
                    if widest is None:
                        break
                    before = trie.nodes
                    self._collapse(trie, widest, "memory", incoming=0)
                    freed += before - trie.nodes
                    if trie.nodes >= before:
                        break
        return freed


def _form(collapse: _Collapse, value: str) -> str:
    """What a non-kept value maps to at a collapsed position."""
    dot = value.rfind(".")
    if dot > 0:
        extension = value[dot + 1:]
        form = collapse.forms.get(extension)
        if form is not None:
            return form
        if _EXTENSION_RE.fullmatch(extension) and len(collapse.forms) < _MAX_FORMS:
            form = collapse.forms[extension] = "{name}." + extension
            return form
    return PARAM


def _size(node: _Node) -> int:
    total, stack = 0, [node]
    while stack:
        n = stack.pop()
        total += 1
        if n.children:
            stack.extend(n.children.values())
    return total


def _collapsed(root: _Node) -> int:
    total, stack = 0, [root]
    while stack:
        n = stack.pop()
        total += n.collapse is not None
        if n.children:
            stack.extend(n.children.values())
    return total


def _widest(root: _Node) -> _Node | None:
    """The uncollapsed node with the most value children (None if none has any)."""
    best: _Node | None = None
    stack = [root]
    while stack:
        n = stack.pop()
        if n.collapse is None and n.literals and (best is None or n.literals > best.literals):
            best = n
        if n.children:
            stack.extend(n.children.values())
    return best
