"""Bounded-memory bookkeeping: the registry's metrics, the cgroup readings (v1, v2, hybrid) and
the memory guard's shrinking, against real files laid out as the kernel lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from probewire.aggregate.bounds import Bounds
from probewire.aggregate.routes import RouteLearner, RouteTemplater
from probewire.config import Config
from probewire.runtime.memory import CgroupMemory, MemoryGuard
from support.metrics import parse_metrics


def _render(bounds: Bounds, guard: MemoryGuard | None = None) -> dict[object, float]:
    from probewire.export.prometheus import render_text
    from probewire.serve.structures import BoundsCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoundsCollector(bounds, guard))
    return parse_metrics(b"".join(render_text(registry.collect())).decode())


def test_registered_structures_are_exported_with_bound_evictions_and_shrinks() -> None:
    bounds = Bounds()
    cache = {i: i for i in range(10)}

    def shrink() -> int:
        n = len(cache)
        cache.clear()
        return n

    bounds.register("a.cache", bound=64, policy="LRU", size=lambda: len(cache), shrink=shrink,
                    evictions=lambda: 3)
    bounds.register("b.window", bound=None, policy="last 60 s", size=lambda: 7)
    samples = _render(bounds)
    assert samples[("probewire_userspace_entries", (("structure", "a.cache"),))] == 10
    assert samples[("probewire_userspace_max_entries", (("structure", "a.cache"),))] == 64
    assert ("probewire_userspace_max_entries", (("structure", "b.window"),)) not in samples
    assert samples[("probewire_userspace_evictions_total", (("structure", "a.cache"),))] == 3
    assert bounds.shrink() == {"a.cache": 10}
    samples = _render(bounds)
    assert samples[("probewire_userspace_entries", (("structure", "a.cache"),))] == 0
    assert samples[("probewire_userspace_shrunk_entries_total", (("structure", "a.cache"),))] == 10


def test_a_broken_size_reader_hides_only_itself() -> None:
    bounds = Bounds()
    bounds.register("ok", bound=1, policy="-", size=lambda: 1)
    bounds.register("broken", bound=1, policy="-", size=lambda: 1 // 0)
    assert [r.structure for r in bounds.rows()] == ["ok"]


def _proc(tmp: Path, cgroup: str, mountinfo: str, rss_kb: int = 1000) -> Path:
    proc = tmp / "proc" / "self"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "status").write_text(f"Name:\tx\nVmRSS:\t{rss_kb} kB\n")
    return tmp / "proc"


def _write(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)


def test_cgroup_v1_reads_the_lowest_limit_on_the_path_and_the_working_set(tmp_path: Path
                                                                         ) -> None:
    v1 = tmp_path / "memory"
    proc = _proc(tmp_path, "4:memory:/a/b\n0::/\n",
                 f"35 31 0:32 / {v1} rw - cgroup cgroup rw,memory\n"
                 f"41 31 0:38 / {tmp_path / 'unified'} rw - cgroup2 cgroup2 rw\n")
    _write(v1, memory__limit_in_bytes=str(9223372036854771712))
    _write(v1 / "a", memory__limit_in_bytes=str(200 << 20))
    _write(v1 / "a" / "b", memory__limit_in_bytes=str(9223372036854771712),
           memory__usage_in_bytes=str(150 << 20),
           memory__stat=f"cache 1\ntotal_inactive_file {50 << 20}\n")
    (tmp_path / "unified").mkdir()  # hybrid: no memory controller on cgroup2
    reading = CgroupMemory(proc=proc).read()
    assert (reading.usage_bytes, reading.limit_bytes, reading.source) == (
        100 << 20, 200 << 20, "cgroup v1")


def test_cgroup_v2_takes_memory_high_before_max(tmp_path: Path) -> None:
    v2 = tmp_path / "cg"
    proc = _proc(tmp_path, "0::/svc\n", f"41 31 0:38 / {v2} rw - cgroup2 cgroup2 rw\n")
    _write(v2)
    _write(v2 / "svc", memory__current=str(90 << 20), memory__high=str(100 << 20),
           memory__max="max", memory__stat="anon 1\ninactive_file 0\n")
    reading = CgroupMemory(proc=proc).read()
    assert (reading.usage_bytes, reading.limit_bytes, reading.source) == (
        90 << 20, 100 << 20, "cgroup v2")


def test_without_a_cgroup_limit_the_configured_limit_applies_to_rss(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/\n", "", rss_kb=51200)
    assert CgroupMemory(proc=proc).read().limit_bytes is None
    reading = CgroupMemory(proc=proc, limit_mb=64).read()
    assert (reading.usage_bytes, reading.limit_bytes, reading.source) == (
        50 << 20, 64 << 20, "config")


def test_the_guard_shrinks_over_the_threshold_once_per_cooldown_and_counts(tmp_path: Path
                                                                          ) -> None:
    proc = _proc(tmp_path, "0::/\n", "", rss_kb=90 * 1024)
    learner = RouteLearner(max_distinct=10_000)
    templater = RouteTemplater(learner=learner)
    for i in range(500):
        templater.template(f"/u/{'abcdefghij'[i % 10]}x{'klmnopqrst'[i // 10 % 10]}", "svc")
    bounds = Bounds()
    from probewire.serve.structures import register_templater

    register_templater(bounds, templater)
    guard = MemoryGuard(bounds, CgroupMemory(proc=proc, limit_mb=100), shrink_at=0.85,
                        interval_s=1.0)
    assert guard.check(now=100.0)
    assert templater.cached_paths == 0 and guard.shrinks == 1
    assert not guard.check(now=101.0)  # cool-down
    assert guard.check(now=106.0) and guard.shrinks == 2
    samples = _render(bounds, guard)
    assert samples[("probewire_memory_shrinks_total", ())] == 2
    assert samples[("probewire_memory_limit_bytes", (("source", "config"),))] == 100 << 20
    shrunk = samples[("probewire_userspace_shrunk_entries_total",
                      (("structure", "http.route_cache"),))]
    assert shrunk == 100  # the 100 distinct paths cached, dropped once


def test_near_the_limit_the_guard_shrinks_at_every_check_and_checks_more_often(
        tmp_path: Path) -> None:
    # 0.85 of the limit: cool-down; 0.95 and up (two thirds of the way to the limit): none.
    proc = _proc(tmp_path, "0::/\n", "", rss_kb=90 * 1024)
    guard = MemoryGuard(Bounds(), CgroupMemory(proc=proc, limit_mb=100), shrink_at=0.85,
                        interval_s=1.0)
    assert guard.critical_at == pytest.approx(0.95)
    assert guard.check(now=100.0) and not guard.check(now=101.0)
    assert guard.next_wait_s() == 0.25
    _proc(tmp_path, "0::/\n", "", rss_kb=96 * 1024)
    assert guard.check(now=101.5) and guard.check(now=101.75) and guard.shrinks == 3
    _proc(tmp_path, "0::/\n", "", rss_kb=70 * 1024)  # below 0.9 of the threshold
    assert not guard.check(now=102.0) and guard.next_wait_s() == 1.0


def test_the_guard_stays_quiet_below_the_threshold(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/\n", "", rss_kb=10 * 1024)
    guard = MemoryGuard(Bounds(), CgroupMemory(proc=proc, limit_mb=100))
    assert not guard.check(now=0.0) and guard.shrinks == 0


def test_memory_and_route_learning_config_defaults_and_errors() -> None:
    cfg = Config()
    assert cfg.memory.limit_mb == 0 and cfg.memory.shrink_at == 0.85
    assert cfg.probes.l7.series_ttl_s == 0.0
    assert cfg.probes.http.route_learning.max_distinct == 64
    from probewire.config import config_from_mapping
    from probewire.errors import ConfigError

    with pytest.raises(ConfigError, match=r"memory\.shrink_at"):
        config_from_mapping({"memory": {"shrink_at": 1.5}})
    with pytest.raises(ConfigError, match=r"probes\.http\.route_learning\.max_distinct"):
        config_from_mapping({"probes": {"http": {"route_learning": {"max_distinct": 1}}}})
