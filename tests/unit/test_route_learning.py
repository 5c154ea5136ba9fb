"""Route templates that learn: per service, a position with many distinct values collapses to a
parameter; stable routes stay, configured patterns win, state stays bounded."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probewire.aggregate.routes import PARAM, RouteLearner, RouteTemplater

WORDS = ["users", "orders", "items", "api", "v1", "admin", "login", "search", "posts", "me"]
PLACEHOLDER = re.compile(r"\{\*?[A-Za-z_][A-Za-z0-9_]*\}|\{name\}\.[A-Za-z0-9]+")

word_st = st.sampled_from(WORDS)
# Lower-case names: no digits, so the heuristics leave them to the learner.
name_st = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=10)
static_st = st.lists(word_st, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))


def _is_refinement(before: str, after: str) -> bool:
    """`after` equals `before` with some literal segments turned into placeholders."""
    a, b = before.split("/"), after.split("/")
    if len(a) != len(b):
        return False
    return all(x == y or PLACEHOLDER.fullmatch(y) for x, y in zip(a, b, strict=True))


def test_a_position_with_many_values_collapses_and_established_values_stay() -> None:
    learner = RouteLearner(max_distinct=5, keep_hits=3)
    for _ in range(3):  # /users/me is an established route (three distinct paths below it)
        for sub in ("a", "b", "c"):
            learner.learn("api", f"/users/me/{sub}")
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"]
    answers = [learner.learn("api", f"/users/{n}/posts") for n in names]
    assert answers[:4] == [f"/users/{n}/posts" for n in names[:4]]
    assert answers[4:] == [f"/users/{PARAM}/posts"] * 3
    assert learner.learn("api", "/users/alice/posts") == f"/users/{PARAM}/posts"
    assert learner.learn("api", "/users/me/a") == "/users/me/a"
    [template] = learner.templates("api")
    assert template.template == f"/users/{PARAM}"
    assert template.kept == ("me",) and template.distinct_values == 6
    assert template.reason == "values"


def test_file_names_at_a_collapsed_position_keep_their_extension() -> None:
    learner = RouteLearner(max_distinct=3)
    for stem in ("cat", "dog", "emu", "fox"):
        learner.learn("web", f"/img/{stem}.png")
    assert learner.learn("web", "/img/gnu.png") == "/img/{name}.png"
    assert learner.learn("web", "/img/gnu.css") == "/img/{name}.css"
    assert learner.learn("web", "/img/plain") == f"/img/{PARAM}"


def test_each_service_learns_alone() -> None:
    learner = RouteLearner(max_distinct=3)
    for i in range(10):
        learner.learn("noisy", f"/u/user{chr(97 + i)}x")
    assert learner.learn("noisy", "/u/someone") == f"/u/{PARAM}"
    assert learner.learn("quiet", "/u/someone") == "/u/someone"


def test_services_beyond_the_cap_pass_through_and_are_counted() -> None:
    learner = RouteLearner(max_services=2)
    learner.learn("a", "/x")
    learner.learn("b", "/x")
    assert learner.learn("c", "/x/y") == "/x/y"
    assert learner.untracked == 1 and learner.services() == ["a", "b"]


def test_node_cap_collapses_instead_of_growing() -> None:
    learner = RouteLearner(max_distinct=1000, max_nodes_per_service=50)
    for i in range(2000):
        name = "".join(chr(97 + int(d)) for d in str(i))
        learner.learn("svc", f"/p/{'abcdefghij'[i % 10]}/{name}")
    nodes = learner.summary()["svc"]["nodes"]
    assert nodes <= 50 + 10  # a collapsed position's form children come on top
    assert any(t.reason == "memory" for t in learner.templates("svc"))


def test_forget_idle_drops_services_and_moves_the_generation() -> None:
    now = [0.0]
    learner = RouteLearner(clock=lambda: now[0])
    learner.learn("old", "/a")
    now[0] = 100.0
    learner.learn("new", "/a")
    generation = learner.generation
    assert learner.forget_idle(50.0) == 1
    assert learner.services() == ["new"] and learner.generation == generation + 1


def test_shrink_only_adds_parameters() -> None:
    learner = RouteLearner(max_distinct=1000)
    routes = [f"/a/{n}" for n in ("x", "y", "z", "w", "v", "u")] + ["/b/q"]
    before = [learner.learn("s", r) for r in routes]
    assert learner.shrink() > 0
    after = [learner.learn("s", r) for r in routes]
    assert all(_is_refinement(b, a) for b, a in zip(before, after, strict=True))
    assert after[0] == f"/a/{PARAM}"


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_distinct"):
        RouteLearner(max_distinct=1)


# --- properties ----------------------------------------------------------------------------------

ops_st = st.lists(
    st.one_of(
        static_st.map(lambda r: ("static", r)),
        st.tuples(word_st, name_st).map(lambda wn: ("id", f"/{wn[0]}/{wn[1]}/detail")),
        name_st.map(lambda n: ("leaf", f"/search/{n}")),
    ),
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops_st, max_distinct=st.integers(min_value=2, max_value=12))
def test_learned_routes_never_flip_back_and_generation_tracks_every_change(
    ops: list[tuple[str, str]], max_distinct: int
) -> None:
    learner = RouteLearner(max_distinct=max_distinct, max_nodes_per_service=64)
    last: dict[str, tuple[str, int]] = {}
    for _, route in ops:
        answer = learner.learn("svc", route)
        assert _is_refinement(route, answer)
        seen = last.get(route)
        if seen is not None:
            previous, at_generation = seen
            # Only towards more parameters, and only with the generation moving.
            assert _is_refinement(previous, answer)
            if answer != previous:
                assert learner.generation != at_generation
        last[route] = (answer, learner.generation)
        # Asking again gives the same answer (learning from it does not change it).
        assert learner.learn("svc", route) == answer
    assert learner.summary().get("svc", {"nodes": 0})["nodes"] <= 64 + 12


@settings(max_examples=60, deadline=None)
@given(statics=st.lists(static_st, min_size=1, max_size=8, unique=True),
       ids=st.lists(name_st, min_size=0, max_size=200, unique=True))
def test_stable_routes_stay_and_id_positions_collapse(statics: list[str], ids: list[str]) -> None:
    # Static routes: at most 8 distinct words per position, under max_distinct=10. Ids sit at
    # a position of their own (/orders/<id>), which collapses once it holds more than 10.
    learner = RouteLearner(max_distinct=10)
    answers = set()
    for i, name in enumerate(ids):
        for route in statics:
            assert learner.learn("svc", route) == route
        answers.add(learner.learn("svc", f"/orders/{name}"))
        if i >= 10:
            assert learner.learn("svc", f"/orders/{name}") == f"/orders/{PARAM}"
    for route in statics:
        assert learner.learn("svc", route) == route
    assert len(answers) <= 10 + 1


PATTERNS = ("/users/{id}", "/static/{*rest}", "/orders/{order}/items")


@settings(max_examples=60, deadline=None)
@given(names=st.lists(name_st, min_size=1, max_size=150))
def test_configured_patterns_always_win(names: list[str]) -> None:
    templater = RouteTemplater(PATTERNS, learner=RouteLearner(max_distinct=3))
    for name in names:
        assert templater.template(f"/users/{name}", "svc") == "/users/{id}"
        assert templater.template(f"/static/{name}/x.css", "svc") == "/static/{*rest}"
        assert templater.template(f"/orders/{name}/items", "svc") == "/orders/{order}/items"
        # Not a pattern: learned.
        templater.template(f"/orders/{name}/other", "svc")
    if len(set(names)) > 3:
        assert templater.template("/orders/zzz/other", "svc") == f"/orders/{PARAM}/other"


def test_templater_without_service_keeps_its_heuristic_answer() -> None:
    templater = RouteTemplater(learner=RouteLearner(max_distinct=2))
    for name in ("aa", "bb", "cc", "dd"):
        templater.template(f"/u/{name}", "svc")
    assert templater.template("/u/ee") == "/u/ee"
    assert templater.template("/u/ee", "svc") == f"/u/{PARAM}"
    assert templater.generation == 1
    assert RouteTemplater().generation == 0


def test_a_churn_of_distinct_paths_across_services_ends_in_few_routes_and_bounded_state() -> None:
    # The soak's shapes (bench/stress.py): ids the heuristics know, and plain names only the
    # learner can tell from routes; 20 services, 40,000 distinct paths.
    templater = RouteTemplater(learner=RouteLearner(), cache_size=0)
    routes: dict[str, set[str]] = {}

    def letters(i: int) -> str:
        out = ""
        while True:
            out += "abcdefghijklmnopqrstuvwxyz"[i % 26]
            i //= 26
            if not i:
                return out

    for i in range(40_000):
        shape = i % 6
        path = [f"/r/{i * 7919 % 0xFFFFFF:06x}a/z{i % 1000}", f"/orders/ord_{i}a{i % 10}/items",
                f"/u/{letters(i)}/posts", f"/img/{i * 2654435761 % 2**64:016x}.png",
                f"/events/2024-01-{1 + i % 28:02d}/x", f"/users/u{i}@example.com/prefs"][shape]
        service = f"svc-{i % 20:02d}"
        routes.setdefault(service, set()).add(templater.template(path, service))
    learner = templater.learner
    assert learner is not None
    for service, seen in routes.items():
        # Shapes the heuristics know are one route each; two positions only the learner
        # templates (names, and z<n> with n under three digits) collapse once they pass
        # max_distinct values (those stay as they were first seen).
        assert len(seen) <= 6 + 2 * (learner.max_distinct + 1), (service, sorted(seen)[:10])
        names = {r for r in seen if r.startswith("/u/")}
        if names:
            assert f"/u/{PARAM}/posts" in names and len(names) <= learner.max_distinct + 1
    assert learner.nodes <= learner.max_nodes
