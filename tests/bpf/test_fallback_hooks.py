"""Every probe's fallback hook (tp/ tracepoints, for kernels without tp_btf) works on this kernel
and gives the same exact counts, with kernel fields read through bpf_rdonly_cast or, as on
kernels before 6.2, bpf_probe_read_kernel. Needs: tp/ tracepoints (tracefs).
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from agentlib import free_port, running_agent, scrape, total, wait_for
from test_tcp import REPLY, REQUEST_BYTES, _run_connections

from probewire.probes import REGISTRY
from probewire.probes.base import Probe

pytestmark = pytest.mark.bpf

# Hooks with a choice (tp_btf preferred, tp fallback); the l7 syscall hooks are tp/ only.
ALL_TP = {h.name: "tp" for p in REGISTRY.values() for h in p.hooks if len(h.programs) > 1}


@pytest.mark.parametrize("kfuncs", [True, False], ids=["kfuncs", "probe_reads"])
def test_forced_tp_fallbacks_attach_and_count_exactly(kfuncs: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Without kfuncs too: an older kernel has neither tp_btf nor bpf_rdonly_cast.
    monkeypatch.setattr(Probe, "kfuncs", kfuncs)
    with running_agent(forced_hooks=ALL_TP) as (agent, listen):
        status = agent.status()
        assert all(s.attached and s.section.startswith("tp/") for s in status)
        forced = [s for s in status if s.hook in ALL_TP]
        assert {s.hook for s in forced} == set(ALL_TP)
        assert all("not the forced hook type tp" in s.fallback_reason for s in forced)

        port, closed_port = free_port(), free_port()
        _run_connections(port, 5, server_closes_first=True)
        with pytest.raises(ConnectionRefusedError), socket.socket() as c:
            c.connect(("127.0.0.1", closed_port))
        for code in (0, 5):
            subprocess.run(["/bin/sh", "-c", f"exit {code}"], check=False)
        p = str(port)
        wait_for(lambda: total(scrape(listen), "probewire_tcp_connections_closed_total",
                               server_port=p) >= 10)
        s = scrape(listen)
        assert total(s, "probewire_tcp_connections_opened_total", server_port=p) == 10
        assert total(s, "probewire_tcp_connections_closed_total", server_port=p) == 10
        assert total(s, "probewire_tcp_bytes_sent_total", server_port=p) == 5 * (
            REQUEST_BYTES + len(REPLY))
        assert total(s, "probewire_tcp_resets_total", server_port=str(closed_port)) == 2
        # The saturation family's tp/ programs keep per-thread state by thread id; its exact
        # counts under forced tp/ are in test_saturation.py ([tp] cases).
        assert total(s, "probewire_process_cpu_seconds_total", service_name="pytest") > 0
        assert total(s, "probewire_sched_runqueue_latency_seconds_count",
                     service_name="pytest") > 0
        probe = agent.probes["process"]
        wait_for(lambda: len([e for e in probe.events("exit") if e.ppid == os.getpid()]) >= 2)
        exits = [e for e in probe.events("exit") if e.ppid == os.getpid() and e.comm == "sh"]
        assert [e.exit_code for e in exits] == [0, 5]
