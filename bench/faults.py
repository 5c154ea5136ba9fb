"""The fault matrix: the agent under each fault, every row stating what was lost and whether
every loss was counted (the row's figure is the losses nobody counted; its target is 0).

- OTLP collector down, and slow: every exchange becomes a span exported, failed, dropped
  (the exporter fell behind) or unsampled: probewire_otlp_spans_total adds up to the http
  records; the metrics stay exact meanwhile.
- 50 concurrent scrapers on /metrics and the API under load: no failed scrape, counts exact.
- The agent starved to 10% of a core (cgroup v1 cpu quota) under load with every exchange a
  ring record: the ring fills, drops are counted, the workload never waits (every request
  answered).
- A ring storm: a 16 KiB ring, every exchange a record, 64 connections at once: recorded +
  dropped == answered.
- Process churn: execs of one binary, each exiting at once: every exec counted (or dropped and
  counted), the service and process caches within their bounds.
- Garbage bytes on traced ports beside real requests: no handler error, the real requests
  counted exactly, RSS before and after.
- The agent's memory limited by a cgroup (v1 memory.limit_in_bytes) under distinct-path
  churn: the memory guard shrinks caches, counted; the agent is not OOM-killed.

`run(quick)` sizes them for the table; `scenario(name, small=True)` is what the test suite
runs (tests/bpf/test_fault_matrix.py), asserting the same zero with no timing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import AgentProc, get, running_agent, total
from bench.report import Row
from bench.stress import (
    Counts,
    agent_config,
    counts,
    finish_load,
    move_to,
    multi_port_nginx,
    rss_mb,
    run_load,
    service_name,
    settle,
    spawned_inside,
    start_load,
    uncounted,
    userspace_entries,
    v1_cgroup,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.otlp_receiver import otlp_receiver


@dataclass
class Outcome:
    """One fault: what was lost, and how much of it nobody counted."""

    name: str
    uncounted: float
    lost: str  # what was lost, in words with the counts
    details: dict[str, float] = field(default_factory=dict)

    def row(self) -> Row:
        r = Row(f"fault: {self.name}: losses not counted", "count",
                target="0 (every loss counted)", goal=("==", 0.0), judge="all", note=self.lost)
        r.add(self.uncounted)
        return r


# ---------------------------------------------------------------------------------------------
# OTLP


def _span_results(agent: AgentProc) -> dict[str, float]:
    s = agent.scrape()
    return {r: total(s, "probewire_otlp_spans_total", result=r)
            for r in ("success", "failure", "dropped", "unsampled", "export_call")}


def _http_records(agent: AgentProc) -> float:
    return total(agent.scrape(), "probewire_events_total", probe="l7")


def _otlp(name: str, endpoint: str, requests: int, services: int = 2) -> Outcome:
    extra = ("export:\n  otlp: {enabled: true, protocol: http/protobuf, "
             f"endpoint: '{endpoint}', timeout_s: 1, interval_s: 1, link_wait_ms: 0, "
             "max_queue_spans: 512}\n")
    with multi_port_nginx(services) as ng, running_agent(agent_config(ng.ports, extra)) as agent:
        before, records0 = counts(agent, services), _http_records(agent)
        spans0 = _span_results(agent)
        load = run_load(ng.ports, requests, timeout_s=120, concurrency=16)
        delta = settle(agent, services) - before
        # Every record becomes one span outcome once the exporter has had its go at it.
        deadline = time.monotonic() + 60
        while True:
            records = _http_records(agent) - records0
            spans = {k: v - spans0[k] for k, v in _span_results(agent).items()}
            if sum(spans.values()) >= records or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    missing = records - sum(spans.values())
    metric_loss = uncounted(load.ok, delta)
    return Outcome(
        name, max(missing, 0.0) + metric_loss + max(-missing, 0.0),
        f"{records:,.0f} exchanges (client and server side of {load.ok:,} requests) → spans "
        f"exported {spans['success']:,.0f}, failed {spans['failure']:,.0f}, dropped "
        f"{spans['dropped']:,.0f}, unsampled {spans['unsampled']:,.0f}; metrics recorded "
        f"{delta.recorded:,.0f} of {load.ok:,} answered, dropped {delta.dropped:,.0f}",
        {"records": records, **spans, "answered": load.ok, "recorded": delta.recorded})


def collector_down(small: bool) -> Outcome:
    with socket_closed_port() as port:
        return _otlp("OTLP collector down", f"http://127.0.0.1:{port}",
                     300 if small else 20_000)


def collector_slow(small: bool) -> Outcome:
    with otlp_receiver("http/protobuf", delay_s=0.5) as rx:
        return _otlp("OTLP collector slow (0.5 s per export)", rx.endpoint,
                     300 if small else 20_000)


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, then closed: refused while we hold none)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


# ---------------------------------------------------------------------------------------------
# scrapers


def scrapers(small: bool) -> Outcome:
    threads_n, requests = (50, 2_000) if small else (50, 30_000)
    services = 4
    with multi_port_nginx(services) as ng, running_agent(agent_config(ng.ports)) as agent:
        before = counts(agent, services)
        load = start_load(ng.ports, requests, concurrency=16)
        stop = threading.Event()
        done, failed = [0], [0]
        lock = threading.Lock()
        paths = ["/metrics", "/api/services", "/api/agent", "/api/graph"]

        kinds: dict[str, int] = {}

        def scrape(i: int) -> None:
            while not stop.is_set():
                try:
                    get(f"http://{agent.listen}{paths[i % len(paths)]}", timeout_s=60)
                    kind = ""
                except urllib.error.HTTPError as exc:
                    kind = f"HTTP {exc.code}"
                except (urllib.error.URLError, OSError) as exc:
                    kind = type(getattr(exc, "reason", exc)).__name__
                with lock:
                    done[0] += not kind
                    failed[0] += bool(kind)
                    if kind:
                        kinds[kind] = kinds.get(kind, 0) + 1

        threads = [threading.Thread(target=scrape, args=(i,), daemon=True)
                   for i in range(threads_n)]
        for t in threads:
            t.start()
        try:
            result = finish_load(load, timeout_s=300)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        delta = settle(agent, services) - before
    return Outcome(
        f"{threads_n} concurrent scrapers on /metrics and the API",
        uncounted(result.ok, delta) + failed[0],
        f"{done[0]:,} scrapes answered, {failed[0]} failed "
        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or 'none'}); "
        f"recorded {delta.recorded:,.0f} of {result.ok:,} answered, dropped {delta.dropped:,.0f}",
        {"scrapes": done[0], "failed": failed[0], "recorded": delta.recorded})


# ---------------------------------------------------------------------------------------------
# ring: starved agent, storm

RECORDS = "probes: {l7: {kernel_aggregation: false}}\n"


def _ring_fault(name: str, requests: int, ring_bytes: int, starve: bool) -> Outcome:
    services = 4
    extra = RECORDS + f"ring: {{size_bytes: {ring_bytes}}}\n"
    with multi_port_nginx(services) as ng, running_agent(agent_config(ng.ports, extra)) as agent:
        before = counts(agent, services)
        quota = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "10000"}
        with v1_cgroup("cpu", quota) if starve else contextlib.nullcontext() as cg:
            if cg is not None:
                move_to(cg, agent.pid)
            result = run_load(ng.ports, requests, timeout_s=600, concurrency=64)
        # Back in its own cgroup (the context moved it): it drains what the ring kept.
        delta = settle(agent, services, timeout_s=120) - before
    blocked = result.sent - result.ok
    return Outcome(
        name, uncounted(result.ok, delta) + blocked,
        f"{result.sent:,} requests, {result.ok:,} answered in {result.seconds:.1f} s "
        f"({blocked} not answered: the workload waited on nobody); ring drops counted "
        f"{delta.dropped:,.0f}, recorded {delta.recorded:,.0f}",
        {"recorded": delta.recorded, "dropped": delta.dropped, "answered": result.ok})


def starved(small: bool) -> Outcome:
    return _ring_fault("agent starved to 10% of a core (cpu quota), every exchange a record",
                       3_000 if small else 60_000, 64 * 1024, starve=True)


def ring_storm(small: bool) -> Outcome:
    return _ring_fault("ring storm (16 KiB ring, 64 connections at once)",
                       3_000 if small else 60_000, 16 * 1024, starve=False)


# ---------------------------------------------------------------------------------------------
# process churn

CHURN = r'''
import os, sys
binary, n = sys.argv[1], int(sys.argv[2])
running = 0
for _ in range(n):
    os.posix_spawn(binary, [binary], {})
    running += 1
    if running >= 64:
        os.wait()
        running -= 1
while running:
    os.wait()
    running -= 1
'''


def process_churn(small: bool) -> Outcome:
    n = 2_000 if small else 100_000
    with tempfile.TemporaryDirectory(prefix="pw-churn-") as tmp:
        binary = Path(tmp) / "pwchurn"
        shutil.copy("/bin/true", binary)
        with running_agent("{}\n") as agent:
            def read() -> tuple[float, float]:
                s = agent.scrape()
                return (total(s, "probewire_process_execs_total", service_name="pwchurn"),
                        total(s, "probewire_events_dropped_total", probe="process"))

            execs0, drops0 = read()
            rss0 = rss_mb(agent.pid)
            peaks: dict[str, float] = {}
            proc = subprocess.Popen([sys.executable, "-c", CHURN, str(binary), str(n)])
            while proc.poll() is None:
                time.sleep(0.5)
                for k, v in userspace_entries(agent).items():
                    peaks[k] = max(peaks.get(k, 0.0), v)
            proc.wait()
            deadline = time.monotonic() + 30
            last = read()
            while time.monotonic() < deadline:
                time.sleep(1.0)
                now = read()
                if now == last:
                    break
                last = now
            execs, drops = last[0] - execs0, last[1] - drops0
            rss1 = rss_mb(agent.pid)
            bounds = _bounds(agent)
    over = [k for k, v in peaks.items() if bounds.get(k) is not None and v > bounds[k]]
    missing = n - execs
    lost_uncounted = max(missing - drops, 0.0) if missing > 0 else -missing
    return Outcome(
        f"{n:,} processes exec/exit",
        lost_uncounted + len(over),
        f"execs counted {execs:,.0f} of {n:,}, process records dropped {drops:,.0f} (host-"
        f"wide); caches at most: "
        + ", ".join(f"{k} {int(v):,}/{int(bounds[k]):,}" for k, v in sorted(peaks.items())
                    if bounds.get(k) is not None)
        + f"{' (over: ' + ', '.join(over) + ')' if over else ''}; RSS {rss0:.1f} → "
          f"{rss1:.1f} MB",
        {"execs": execs, "dropped": drops, "rss_before": rss0, "rss_after": rss1,
         "over_bound": float(len(over))})


def _bounds(agent: AgentProc) -> dict[str, float]:
    s = agent.scrape()
    return {dict(labels)["structure"]: v for (name, labels), v in s.items()
            if name == "probewire_userspace_max_entries"}


# ---------------------------------------------------------------------------------------------
# garbage


def garbage(small: bool) -> Outcome:
    junk, real = (2_000, 1_000) if small else (100_000, 20_000)
    services = 2
    with multi_port_nginx(services) as ng, running_agent(agent_config(ng.ports)) as agent:
        def ok_counts() -> Counts:
            s = agent.scrape()
            recorded = sum(total(s, "http_server_request_duration_seconds_count",
                                 service_name=service_name(i), http_response_status_code="200")
                           for i in range(services))
            c = counts(agent, services)
            return Counts(recorded, c.dropped, c.handler_errors)

        before = ok_counts()
        rss0 = rss_mb(agent.pid)
        bad = start_load(ng.ports, junk, concurrency=32, mode="garbage", seed=7)
        good = run_load(ng.ports, real, timeout_s=600, concurrency=8, seed=8)
        finish_load(bad, timeout_s=600)
        settle(agent, services)
        delta = ok_counts() - before
        rss1 = rss_mb(agent.pid)
        alive = agent.proc.poll() is None
    return Outcome(
        "garbage bytes on traced ports beside real requests",
        uncounted(good.ok, delta, both_sides=False) + delta.handler_errors + (not alive),
        f"{junk:,} connections of random bytes; real requests recorded {delta.recorded:,.0f} "
        f"of {good.ok:,}, dropped {delta.dropped:,.0f}; handler errors "
        f"{delta.handler_errors:,.0f}; RSS {rss0:.1f} → {rss1:.1f} MB",
        {"recorded": delta.recorded, "answered": good.ok, "rss_before": rss0,
         "rss_after": rss1, "handler_errors": delta.handler_errors})


# ---------------------------------------------------------------------------------------------
# memory limit


def memory_limited(small: bool) -> Outcome:
    requests = 20_000 if small else 300_000
    services = 20
    with multi_port_nginx(services) as ng, v1_cgroup("memory", {}) as cg:
        with spawned_inside(cg):
            starting = running_agent(agent_config(ng.ports), timeout_s=60)
            agent = starting.__enter__()
        try:
            # The limit leaves 30 MB above what the started agent uses (page cache included).
            usage_mb = int((cg / "memory.usage_in_bytes").read_text()) / 2**20
            limit_mb = int(usage_mb + 30)
            (cg / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
            try:
                before = counts(agent, services)
            except OSError:  # killed already (URLError is an OSError)
                before = Counts(0, 0, 0)
            load = start_load(ng.ports, requests, concurrency=32)
            while load.poll() is None and agent.proc.poll() is None:
                time.sleep(0.5)
            result = finish_load(load, timeout_s=60)
            alive = agent.proc.poll() is None
            if alive:
                try:
                    delta = settle(agent, services) - before
                    s = agent.scrape()
                    shrinks = total(s, "probewire_memory_shrinks_total")
                    shrunk = total(s, "probewire_userspace_shrunk_entries_total")
                except OSError as exc:
                    # Killed while being read (CI: RemoteDisconnected on a scrape, and the
                    # kernel log had an OOM kill of probewire in this cgroup): report the
                    # death and the kill, read below, not the scrape's error.
                    try:
                        agent.proc.wait(timeout=5)  # its sockets close before it is reaped
                    except subprocess.TimeoutExpired:
                        raise exc from None
                    alive = False
            # After the last scrape: a kill during the scrapes counts too.
            oom_kills = _oom_kills(cg)
            peak_mb = int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20
            if not alive:
                # Dead: what it said before it died is in its log.
                warnings = [ln for ln in agent.log_path.read_text().splitlines()
                            if "probewire.runtime.memory" in ln]
                delta, shrinks, shrunk = Counts(0, 0, 0), float(len(warnings)), 0.0
        finally:
            starting.__exit__(None, None, None)
    return Outcome(
        f"memory limited by cgroup (agent's usage at start + 30 MB = {limit_mb} MB)",
        (uncounted(result.ok, delta) if alive else float(result.ok)) + oom_kills,
        f"{'alive' if alive else 'KILLED'}, OOM kills {oom_kills}, peak {peak_mb:.0f} MB of "
        f"{limit_mb}; guard shrinks {shrinks:.0f} dropping {shrunk:,.0f} entries; recorded "
        f"{delta.recorded:,.0f} of {result.ok:,} answered, dropped {delta.dropped:,.0f}",
        {"alive": float(alive), "oom_kills": float(oom_kills), "shrinks": shrinks,
         "recorded": delta.recorded, "answered": result.ok})


def _oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


SCENARIOS: dict[str, Callable[[bool], Outcome]] = {
    "collector_down": collector_down,
    "collector_slow": collector_slow,
    "scrapers": scrapers,
    "starved": starved,
    "ring_storm": ring_storm,
    "process_churn": process_churn,
    "garbage": garbage,
    "memory_limited": memory_limited,
}


def scenario(name: str, small: bool = True) -> Outcome:
    return SCENARIOS[name](small)


def run(quick: bool) -> list[Row]:
    only = [n for n in os.environ.get("BENCH_FAULTS", "").split(",") if n]
    rows = []
    for name, fn in SCENARIOS.items():
        if only and name not in only:
            continue
        try:
            rows.append(fn(quick).row())
        except Exception as exc:  # one broken row must not lose the others
            rows.append(Row(f"fault: {name}", "", status="error",
                            note=f"{type(exc).__name__}: {str(exc)[:200]}"))
    return rows
