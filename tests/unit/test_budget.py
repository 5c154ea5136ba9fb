"""Label budgets: bounded series with per-service overflow series."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.aggregate.budget import LabelBudget, expire_idle

NAMES = ("service", "method", "http_route", "status")


def test_series_beyond_the_budget_fold_into_other_keeping_service_method_status() -> None:
    budget = LabelBudget(2, {"http_route": "other"})
    assert budget.admit(("api", "GET", "/a", "200"), NAMES) == ("api", "GET", "/a", "200")
    assert budget.admit(("api", "GET", "/b", "200"), NAMES) == ("api", "GET", "/b", "200")
    assert budget.admit(("api", "GET", "/c", "500"), NAMES) == ("api", "GET", "other", "500")
    assert budget.admit(("web", "POST", "/d", "200"), NAMES) == ("web", "POST", "other", "200")
    assert budget.admit(("api", "GET", "/a", "200"), NAMES) == ("api", "GET", "/a", "200")
    assert budget.active_series == 4
    assert budget.overflows == 2


def test_a_series_equal_to_an_overflow_series_is_not_an_overflow() -> None:
    budget = LabelBudget(1, {"http_route": "other"})
    budget.admit(("api", "GET", "/a", "200"), NAMES)
    budget.admit(("api", "GET", "/b", "200"), NAMES)
    assert budget.admit(("api", "GET", "other", "200"), NAMES) == ("api", "GET", "other", "200")
    assert budget.overflows == 1
    assert budget.active_series == 2


def test_an_admitted_series_that_looks_like_overflow_is_counted_once() -> None:
    budget = LabelBudget(1, {"http_route": "other"})
    budget.admit(("api", "GET", "other", "200"), NAMES)
    assert budget.admit(("api", "GET", "/b", "200"), NAMES) == ("api", "GET", "other", "200")
    assert budget.active_series == 1


def test_label_names_are_part_of_the_series_identity() -> None:
    budget = LabelBudget(1, {"http_route": "other"})
    budget.admit(("api", "/a"), ("service", "http_route"))
    assert budget.admit(("api", "/a"), ("peer", "http_route")) == ("api", "other")


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, {"http_route": "other"}), "max_series"), ((10, {}), "overflow_label_values")],
)
def test_bad_budgets_are_rejected(args: tuple[int, dict[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabelBudget(*args)


def test_mismatched_or_unfoldable_labels_are_rejected() -> None:
    budget = LabelBudget(1, {"http_route": "other"})
    with pytest.raises(ValueError, match="2 label values for 1 label names"):
        budget.admit(("a", "b"), ("service",))
    budget.admit(("a",), ("service",))
    with pytest.raises(ValueError, match="none of the label names"):
        budget.admit(("b",), ("service",))


series_st = st.lists(
    st.tuples(
        st.sampled_from(["api", "web", "db"]),
        st.sampled_from(["GET", "POST"]),
        # "other" itself is left to the example tests: it folds into itself, so a rejection
        # would not be visible in the result.
        st.sampled_from(["/a", "/b", "/c", "/d", "/e", "/f", "/g"]),
        st.sampled_from(["200", "404", "500"]),
    ),
    max_size=200,
)


@given(series=series_st, max_series=st.integers(min_value=1, max_value=20))
def test_budget_bounds_series_keeps_admitted_stable_and_counts_rejections(
    series: list[tuple[str, str, str, str]], max_series: int
) -> None:
    budget = LabelBudget(max_series, {"http_route": "other"})
    first_result: dict[tuple[str, ...], tuple[str, ...]] = {}
    rejected = 0
    for labels in series:
        result = budget.admit(labels, NAMES)
        if result == labels:
            first_result.setdefault(labels, result)
        else:
            rejected += 1
            assert result == (labels[0], labels[1], "other", labels[3])
        if labels in first_result:
            assert result == first_result[labels]  # once admitted, always itself
    distinct_overflow = {(s, m, c) for s, m, _, c in series}
    overflow_series = {
        (s, m, "other", c) for s, m, r, c in series if (s, m, r, c) not in first_result
    }
    assert len(first_result) <= max_series
    assert len(overflow_series) <= len(distinct_overflow)
    assert budget.active_series == len(first_result) + len(overflow_series)
    assert budget.active_series <= max_series + len(distinct_overflow)
    assert budget.overflows == rejected


def test_concurrent_admits_respect_the_budget() -> None:
    budget = LabelBudget(50, {"http_route": "other"})

    def work(worker: int) -> None:
        for i in range(500):
            budget.admit(("api", "GET", f"/{worker}/{i}", "200"), NAMES)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.active_series == 51
    assert budget.overflows == 4 * 500 - 50


def test_count_overflows_replays_admits_of_folded_label_sets() -> None:
    budget = LabelBudget(1, {"http_route": "other"})
    budget.admit(("api", "GET", "/a", "200"), NAMES)
    folded = budget.admit(("api", "GET", "/b", "200"), NAMES)
    assert folded == ("api", "GET", "other", "200")
    budget.count_overflows(3)  # as three more admits of ("api", "GET", "/b", "200") would
    assert budget.overflows == 4
    assert budget.active_series == 2


# --- per-service shares, release, TTL ----------------------------------------------------------

SERVER = ("service_name", "http_request_method", "http_route", "http_response_status_code")


def test_one_services_flood_leaves_another_services_routes_intact() -> None:
    budget = LabelBudget(100, {"http_route": "other"}, max_series_per_service=20)
    for i in range(10_000):
        budget.admit(("noisy", "GET", f"/flood/{i}", "200"), SERVER)
    quiet = [("quiet", "GET", f"/r{i}", "200") for i in range(20)]
    assert [budget.admit(labels, SERVER) for labels in quiet] == quiet
    assert budget.admit(("quiet", "GET", "/r20", "200"), SERVER) == ("quiet", "GET", "other",
                                                                      "200")
    assert budget.per_service() == {"noisy": (20, 10_000 - 20), "quiet": (20, 1)}


@given(floods=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]),
                                 st.integers(min_value=0, max_value=500)), max_size=300),
       share=st.integers(min_value=1, max_value=30))
def test_no_service_holds_more_than_its_share_and_others_keep_theirs(
    floods: list[tuple[str, int]], share: int
) -> None:
    # Room for the four flooding services' shares and the fresh one's.
    budget = LabelBudget(5 * share, {"http_route": "other"}, max_series_per_service=share)
    for service, route in floods:
        budget.admit((service, "GET", f"/{route}", "200"), SERVER)
    held = budget.per_service()
    assert all(n <= share for n, _ in held.values())
    # Whatever the others did, a fresh service still gets its whole share.
    fresh = [("fresh", "GET", f"/{i}", "200") for i in range(share)]
    assert [budget.admit(labels, SERVER) for labels in fresh] == fresh


def test_released_label_sets_give_their_room_back_and_move_the_generation() -> None:
    budget = LabelBudget(2, {"http_route": "other"})
    budget.admit(("api", "GET", "/a", "200"), SERVER)
    budget.admit(("api", "GET", "/b", "200"), SERVER)
    assert budget.admit(("api", "GET", "/c", "200"), SERVER)[2] == "other"
    generation = budget.generation
    assert budget.release(("api", "GET", "/a", "200"), SERVER)
    assert not budget.release(("api", "GET", "/a", "200"), SERVER)
    assert budget.generation == generation + 1 and budget.released == 1
    assert budget.admit(("api", "GET", "/c", "200"), SERVER) == ("api", "GET", "/c", "200")


def test_expire_idle_drops_label_sets_idle_in_every_series_and_reuses_rows() -> None:
    from probewire.aggregate.series import CounterSeries, HistogramSeries

    now = [0.0]
    duration, sizes = HistogramSeries([0.1, 1.0]), CounterSeries()
    for s in (duration, sizes):
        s.clock = lambda: now[0]
    budget = LabelBudget(2, {"http_route": "other"})
    idle, live, late = (("api", "GET", r, "200") for r in ("/idle", "/live", "/late"))
    for labels in (idle, live):
        budget.admit(labels, SERVER)
    duration.observe(idle, np.array([0.05]))
    duration.observe(live, np.array([0.05]))
    now[0] = 10.0
    sizes.add(live)  # written in one of the two series: live
    assert budget.admit(late, SERVER)[2] == "other"
    now[0] = 20.0
    dropped = expire_idle(budget, SERVER, [duration, sizes], before=5.0)
    assert dropped == [idle]
    assert set(duration.counts) == {live} and budget.active_series == 2  # live + the overflow
    # The room is admitted again and the freed row is reused, starting from zero.
    assert budget.admit(late, SERVER) == late
    duration.observe(late, np.array([2.0]))
    assert duration.counts[late].tolist() == [0, 0, 1]
    snap = duration.snapshot().counts
    assert {k: v.tolist() for k, v in snap.items()} == {
        k: v.tolist() for k, v in duration.counts.items()}


def test_a_series_seen_again_after_expiry_restarts_from_zero() -> None:
    from probewire.aggregate.series import CounterSeries

    now = [0.0]
    counter = CounterSeries()
    counter.clock = lambda: now[0]
    budget = LabelBudget(10, {"http_route": "other"})
    labels = budget.admit(("api", "GET", "/a", "200"), SERVER)
    counter.add(labels, 5.0)
    now[0] = 100.0
    assert expire_idle(budget, SERVER, [counter], before=50.0) == [labels]
    assert counter.values == {}
    counter.add(budget.admit(labels, SERVER))
    assert counter.values == {labels: 1.0}  # a counter reset, as rate() expects
