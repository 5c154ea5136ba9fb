"""process probe with real execs: exact exec/exit events; a tiny ring flooded drops and counts.

Needs: tp_btf (or tp) sched/sched_process_exec and sched/sched_process_exit, ring buffers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from agentlib import running_agent, scrape, total, wait_for

from probewire.config import config_from_mapping
from probewire.enrich.service import ServiceResolver
from probewire.probes.base import ProbeContext, start_probe
from probewire.probes.process import PROCESS_EXEC, PROCESS_EXIT, ProcessProbe
from probewire.runtime.features import probe_hook_types
from probewire.runtime.filter import Filter
from probewire.runtime.ring import Ring
from probewire.security.kernel import PROCESS_FORK
from support.cgroups import scratch_cgroup

pytestmark = pytest.mark.bpf

SH = "/bin/sh"


def loop(n: int, command: str) -> str:
    """A shell loop of n commands that execs nothing else (test and arithmetic are builtins)."""
    return f"i=0; while [ $i -lt {n} ]; do {command} i=$((i+1)); done"


def run_in_cgroup(cgroup: Path, script: str) -> None:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    subprocess.run([SH, "-c", script], preexec_fn=enter, check=True, timeout=120)


def test_n_execs_give_n_exec_and_exit_events_with_filename_and_codes(agent) -> None:
    a, _ = agent
    probe = a.probes["process"]
    assert isinstance(probe, ProcessProbe)
    me = os.getpid()
    codes = [0, 1, 2, 7, 42, 255, 3, 0]
    for code in codes:
        subprocess.run([SH, "-c", f"exit {code}"], check=False)

    def mine(kind: str) -> list:
        return [e for e in probe.events(kind) if e.ppid == me and e.comm == "sh"]

    wait_for(lambda: len(mine("exit")) >= len(codes))
    execs, exits = mine("exec"), mine("exit")
    assert len(execs) == len(codes)
    assert len(exits) == len(codes)
    assert [e.argv for e in execs] == [(SH, "-c", f"exit {code}") for code in codes]
    assert {e.filename for e in execs} == {SH}
    assert [e.exit_code for e in exits] == codes
    assert [e.pid for e in execs] == [e.pid for e in exits]


def test_killed_process_exit_reports_the_signal(agent) -> None:
    a, _ = agent
    probe = a.probes["process"]
    assert isinstance(probe, ProcessProbe)
    proc = subprocess.Popen(["sleep", "30"])
    proc.kill()
    proc.wait()
    wait_for(lambda: any(e.pid == proc.pid for e in probe.events("exit")))
    (ev,) = [e for e in probe.events("exit") if e.pid == proc.pid]
    assert ev.exit_signal == 9 and ev.exit_code == -1


def test_execs_are_counted_per_service_in_metrics(agent) -> None:
    _, listen = agent
    before = total(scrape(listen), "probewire_process_execs_total", service_name="true")
    for _ in range(5):
        subprocess.run(["true"], check=True)
    wait_for(lambda: total(scrape(listen), "probewire_process_execs_total",
                           service_name="true") >= before + 5)
    assert total(scrape(listen), "probewire_process_execs_total", service_name="true") \
        == before + 5


def test_tiny_ring_flooded_without_reader_drops_and_counts_every_record() -> None:
    """4 KiB ring (12 records), 200 execs while nobody drains: records + drops == produced."""
    n = 200
    config = config_from_mapping({})
    probe = ProcessProbe(ProbeContext(config, ServiceResolver(())))
    running = start_probe(probe, probe_hook_types(), {}, ring_size_bytes=4096)
    ring = None
    try:
        with scratch_cgroup() as cg:
            f = Filter({m: running.obj.maps[m] for m in
                        ("filter_config", "filter_pids", "filter_cgroups", "filter_ports")})
            f.apply(cgroups=[str(cg)])
            ring = Ring(running.obj.maps["events"], probe.record_dtype, "process")
            run_in_cgroup(cg, loop(n, "/bin/true;"))
            records = ring.drain()
            dropped = running.dropped()
        # The shell's own exec and exit are in the cgroup too; each /bin/true is also a fork
        # record (security is on by default: the process tree). The shell's own fork ran in
        # the test process, outside the cgroup.
        produced = 2 * (n + 1) + n
        assert len(records) + dropped == produced
        assert dropped > 0
        assert len(records) > 0
        assert set(np.unique(records["kind"]).tolist()) <= {PROCESS_EXEC, PROCESS_EXIT,
                                                            PROCESS_FORK}
    finally:
        if ring is not None:
            ring.close()
        running.stop()


def test_agent_with_tiny_ring_under_exec_flood_stays_up_and_accounts_for_all() -> None:
    n = 1500
    with scratch_cgroup() as cg, running_agent({
        "ring": {"size_bytes": 4096},
        "probes": {"tcp": {"enabled": False}},
        "filter": {"cgroups": [str(cg)]},
    }) as (a, listen):
        run_in_cgroup(cg, loop(n, "/bin/true &") + "; wait")
        produced = 2 * (n + 1) + n  # exec and exit of each process, a fork of each true

        def accounted() -> float:
            s = scrape(listen)
            return total(s, "probewire_events_total", probe="process") + total(
                s, "probewire_events_dropped_total", probe="process")

        wait_for(lambda: accounted() >= produced)
        s = scrape(listen)
        assert accounted() == produced
        assert a.reader.errors == 0
        assert total(s, "probewire_probe_attached", probe="process") == len(ProcessProbe.hooks)
