"""The UI's quantiles and history: Prometheus' histogram_quantile, windowed rates, bounded rings."""

from __future__ import annotations

import math

import pytest

from probewire.serve.history import RATE_WINDOW_S, History
from probewire.serve.snapshot import Histogram, Snapshot, quantile

INF = math.inf


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # 10 in (0, 0.1], 10 in (0.1, 0.2]: the median is the top of the first bucket.
    cum = [(0.1, 10.0), (0.2, 20.0), (INF, 20.0)]
    assert quantile(0.5, cum) == pytest.approx(0.1)
    assert quantile(0.75, cum) == pytest.approx(0.15)
    assert quantile(0.99, [(0.1, 0.0), (INF, 5.0)]) == 0.1  # +Inf bucket: highest finite bound
    assert quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    assert quantile(0.5, []) is None


def snap(t: float, served: dict[tuple[str, str], float]) -> Snapshot:
    server = {
        (svc, "GET", status, "/x"): Histogram({0.01: n, INF: n}, n, n * 0.005)
        for (svc, status), n in served.items()
    }
    return Snapshot(t, server, {}, {}, {}, [])


def test_rates_are_over_the_window_and_start_from_the_agents_zero() -> None:
    h = History(interval_s=5.0, started_at=1000.0)
    win = h.window(snap(1010.0, {("a", "200"): 50}))
    assert win.rate(("svc", "a")) == pytest.approx(5.0)  # 50 requests since start, 10 s
    for i in range(1, 30):
        h.add(snap(1000.0 + 5 * i, {("a", "200"): 10.0 * i, ("a", "500"): float(i)}))
    now = 1000.0 + 5 * 30
    win = h.window(snap(now, {("a", "200"): 300.0, ("a", "500"): 30.0}))
    # The base is the newest sample at least a window old: t=1085 (i=17), 65 s back.
    assert RATE_WINDOW_S <= win.seconds <= RATE_WINDOW_S + 5.0
    assert win.seconds == 65.0
    assert win.rate(("svc", "a")) == pytest.approx((330 - 11 * 17) / 65)
    assert win.rate(("svc_err", "a")) == pytest.approx((30 - 17) / 65)
    assert win.service_quantile("a", 0.5) == pytest.approx(0.005)


def test_history_points_are_per_interval_and_bounded() -> None:
    h = History(interval_s=5.0, started_at=0.0)
    for i in range(1, h.points + 50):
        h.add(snap(5.0 * i, {("a", "200"): 10.0 * i, ("a", "500"): 5.0 * i}))
    series = h.series("a")
    assert series is not None
    assert len(series["time"]) == h.points == 180
    assert series["time"][-1] == 5.0 * (h.points + 49)
    assert series["rate"][-1] == pytest.approx(3.0)  # 15 requests per 5 s
    assert series["error_ratio"][-1] == pytest.approx(1 / 3)
    assert h.series("nobody") is None


def test_a_service_that_appears_after_the_window_start_counts_from_zero() -> None:
    h = History(interval_s=5.0, started_at=0.0)
    for i in range(1, 20):
        served = {("a", "200"): 10.0 * i}
        if i >= 15:  # b shows up at t=75, after the window's base sample
            served[("b", "200")] = 4.0 * (i - 14)
        h.add(snap(5.0 * i, served))
    win = h.window(snap(100.0, {("a", "200"): 200.0, ("b", "200"): 24.0, ("c", "500"): 3.0}))
    assert win.seconds == 65.0  # base: t=35
    assert win.rate(("svc", "a")) == pytest.approx((200 - 70) / 65)
    assert win.rate(("svc", "b")) == pytest.approx(24 / 65)
    assert win.rate(("svc_err", "c")) == pytest.approx(3 / 65)  # never sampled at all
    assert win.rate(("svc", "nobody")) == 0.0


def test_columns_of_keys_that_went_away_are_dropped_at_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import probewire.serve.history as history

    monkeypatch.setattr(history, "MAX_COLUMNS", 40)
    h = History(interval_s=5.0, started_at=0.0)
    # Each sample: a service nobody saw before (series churn), and one that stays.
    for i in range(1, 100):
        h.add(snap(5.0 * i, {(f"gone{i}", "200"): 1.0, ("stays", "200"): 10.0 * i}))
        assert h.column_count <= 40
    assert h.dropped_columns > 0
    win = h.window(snap(5.0 * 100, {("stays", "200"): 1000.0}))
    assert win.rate(("svc", "stays")) == pytest.approx(2.0)  # rates of kept keys stay right


def test_services_without_points_for_the_whole_history_are_dropped() -> None:
    h = History(interval_s=5.0, started_at=0.0)
    h.add(snap(5.0, {("old", "200"): 1.0}))
    for i in range(2, h.points + 3):
        h.add(snap(5.0 * i, {("new", "200"): float(i)}))
    assert h.services() == ["new"] and h.expired_services == 1


def test_shrink_keeps_rates_right() -> None:
    h = History(interval_s=5.0, started_at=0.0)
    for i in range(1, 20):
        h.add(snap(5.0 * i, {("a", "200"): 10.0 * i}))
    before = h.window(snap(100.0, {("a", "200"): 200.0})).rate(("svc", "a"))
    assert h.shrink() > 0 and h.sample_count == 2
    assert h.window(snap(100.0, {("a", "200"): 200.0})).rate(("svc", "a")) == before
