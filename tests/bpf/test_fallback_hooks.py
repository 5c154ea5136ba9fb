"""Every probe's fallback hook (tp/ tracepoints, for kernels without tp_btf) works on this kernel
and gives the same exact counts, with kernel fields read through bpf_rdonly_cast or, as on
kernels before 6.2, bpf_probe_read_kernel. Needs: tp/ tracepoints (tracefs). The fentry/fexit
and kprobe programs count exactly where the kernel has those hook types (`make test-kernels`,
and the Debian 5.10 guest of `make test`), and switch their family off by name where not.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from agentlib import free_port, passive_resets_traced, running_agent, scrape, total, wait_for
from test_tcp import REPLY, REQUEST_BYTES, _run_connections

from probewire.probes import REGISTRY
from probewire.probes.base import Probe
from probewire.runtime.bpf import BpfObject
from probewire.runtime.features import hook_type_of, probe_hook_types
from probewire.runtime.objects import object_path

pytestmark = pytest.mark.bpf

# Hooks with a choice (tp_btf preferred, tp fallback); the l7 syscall hooks are tp/ only.
ALL_TP = {h.name: "tp" for p in REGISTRY.values() for h in p.hooks if len(h.programs) > 1}


@pytest.mark.parametrize("kfuncs", [True, False], ids=["kfuncs", "probe_reads"])
def test_forced_tp_fallbacks_attach_and_count_exactly(kfuncs: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Without kfuncs too: an older kernel has neither tp_btf nor bpf_rdonly_cast.
    monkeypatch.setattr(Probe, "kfuncs", kfuncs)
    with running_agent(forced_hooks=ALL_TP) as (agent, listen):
        # Families this kernel refuses (l7 without bpf_loop, before 5.17) are off, named, and
        # tested by their own tests; tcp and process run on every kernel of the matrix.
        assert {"tcp", "process"}.isdisjoint(agent.disabled), agent.disabled
        status = [s for s in agent.status() if s.probe not in agent.disabled]
        assert all(s.attached and s.section.startswith("tp/") for s in status)
        forced = [s for s in status if s.hook in ALL_TP]
        # Every hook with a choice of the families that run here (all on 6.18; on Debian 5.10
        # and 6.1 l7 and saturation are off).
        assert {s.hook for s in forced} == {
            h.name for name in agent.running for h in agent.probes[name].active_hooks()
            if len(h.programs) > 1}
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
        # Received by the client; sent by the kernel for the closed port where it traces that.
        assert total(s, "probewire_tcp_resets_total", server_port=str(closed_port)) == (
            2 if passive_resets_traced() else 1)
        if "saturation" not in agent.disabled:
            # The saturation family's tp/ programs keep per-thread state by thread id; its
            # exact counts under forced tp/ are in test_saturation.py ([tp] cases).
            assert total(s, "probewire_process_cpu_seconds_total", service_name="pytest") > 0
            assert total(s, "probewire_sched_runqueue_latency_seconds_count",
                         service_name="pytest") > 0
        probe = agent.probes["process"]
        wait_for(lambda: len([e for e in probe.events("exit") if e.ppid == os.getpid()]) >= 2)
        exits = [e for e in probe.events("exit") if e.ppid == os.getpid() and e.comm == "sh"]
        assert [e.exit_code for e in exits] == [0, 5]


# --- function hooks: fentry/fexit and kprobe programs that stand in for a BTF tracepoint ------

def _function_hooks(hook_type: str) -> dict[str, str]:
    """Hooks (of every family) with a program of `hook_type`: hook name -> hook_type."""
    out = {}
    for probe in REGISTRY.values():
        with BpfObject(object_path(probe.object_name)) as obj:
            for hook in probe.hooks:
                if any(hook_type_of(obj.programs[p].section) == hook_type for p in hook.programs):
                    out[hook.name] = hook_type
    return out


@pytest.mark.parametrize("hook_type", ["fentry", "kprobe"])
def test_forced_function_hooks_count_exactly_or_switch_their_family_off_by_name(
        hook_type: str) -> None:
    """Forced onto fentry/fexit or kprobe programs, the tcp family counts resets exactly where
    the kernel has the hook type (the matrix's Debian kernels); where it refuses the type (our
    6.18: fentry EPERM, no kprobes) the family is switched off, named with the kernel's reason,
    and the rest of the agent runs."""
    forced = _function_hooks(hook_type)
    assert "tcp_receive_reset" in forced
    support = probe_hook_types([hook_type])[hook_type]
    # l7 and saturation hook inet_sock_set_state too, never through these types: keep them out
    # of the way (custom is off unless probes.custom lists probes).
    others_off = {name: {"enabled": False} for name in ("l7", "saturation")}
    with running_agent({"probes": others_off}, forced_hooks=forced) as (agent, listen):
        status = {(s.probe, s.hook): s for s in agent.status()}
        if not support.available:
            assert set(agent.disabled) == {"tcp"}, agent.disabled
            assert "no usable hook for" in agent.disabled["tcp"]
            assert support.reason in agent.disabled["tcp"]
            assert all(not s.attached and s.fallback_reason.startswith("family off: ")
                       for (probe, _), s in status.items() if probe == "tcp")
            assert all(s.attached for (probe, _), s in status.items() if probe == "process")
            return
        assert not agent.disabled
        for hook in forced:
            s = status["tcp", hook]
            assert s.attached and hook_type_of(s.section) == hook_type, s
        closed_port = free_port()
        with pytest.raises(ConnectionRefusedError), socket.socket() as c:
            c.connect(("127.0.0.1", closed_port))
        port = str(closed_port)
        wait_for(lambda: total(scrape(listen), "probewire_tcp_resets_total", server_port=port,
                               reset="received") >= 1)
        assert total(scrape(listen), "probewire_tcp_resets_total", server_port=port,
                     reset="received") == 1
