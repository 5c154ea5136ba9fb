"""Label budgets: bounded series with per-service overflow series."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.aggregate.budget import LabelBudget

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
