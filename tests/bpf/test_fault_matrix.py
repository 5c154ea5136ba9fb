"""The fault matrix and the soak, short: the same scenarios as `python -m bench --only
faults,soak` (bench/faults.py, bench/soak.py), each with the real agent (`probewire run`),
real nginx, real load, real cgroups, at a size that takes seconds. Every test asserts only
that every loss was counted (and what must hold besides: requests answered, caches within
their bounds); the figures are the bench's business."""

from __future__ import annotations

import pytest
from bench import faults
from bench.soak import soak

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]


def test_collector_down_every_exchange_is_a_failed_or_dropped_span() -> None:
    out = faults.scenario("collector_down")
    assert out.uncounted == 0, out.lost
    assert out.details["success"] == 0 and out.details["records"] > 0


def test_collector_slow_every_exchange_is_a_span_outcome() -> None:
    out = faults.scenario("collector_slow")
    assert out.uncounted == 0, out.lost


def test_fifty_scrapers_under_load_all_answered_counts_exact() -> None:
    out = faults.scenario("scrapers")
    assert out.uncounted == 0, out.lost
    assert out.details["scrapes"] > 0


def test_agent_starved_by_cpu_quota_drops_are_counted_and_the_workload_never_waits() -> None:
    out = faults.scenario("starved")
    assert out.uncounted == 0, out.lost


def test_ring_storm_recorded_plus_dropped_is_exactly_what_was_answered() -> None:
    out = faults.scenario("ring_storm")
    assert out.uncounted == 0, out.lost


def test_process_churn_every_exec_counted_caches_within_bounds() -> None:
    out = faults.scenario("process_churn")
    assert out.uncounted == 0, out.lost
    assert out.details["over_bound"] == 0


def test_garbage_on_traced_ports_parsers_hold_real_requests_exact() -> None:
    out = faults.scenario("garbage")
    assert out.uncounted == 0, out.lost
    assert out.details["handler_errors"] == 0


def test_memory_limited_agent_degrades_instead_of_being_oom_killed() -> None:
    out = faults.scenario("memory_limited")
    assert out.details["alive"] == 1 and out.details["oom_kills"] == 0, out.lost
    assert out.uncounted == 0, out.lost


def test_short_soak_counts_every_request() -> None:
    rows = soak(minutes=0.25, connections=3_000)
    exact = rows[-1]
    assert exact.values == [0.0], exact.note
