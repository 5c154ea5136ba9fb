"""The feature probe (runtime/features.py) agrees with bpftool's own probe of the running kernel,
on this host and on every kernel of the matrix (scripts/kernels): the agent's choices rest on it.

Needs: root, bpftool (scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable

import pytest

from probewire.runtime.features import (
    KERNEL_FEATURES,
    kernel_enumerators,
    probe_kernel_features,
)

pytestmark = pytest.mark.bpf

# bpftool's names for what KERNEL_FEATURES tries (helpers as offered to tracepoint programs).
BPFTOOL_MAPS = {"ringbuf": "have_ringbuf_map_type", "task_storage": "have_task_storage_map_type"}
BPFTOOL_HELPERS = {"bpf_loop": "bpf_loop", "task_pt_regs": "bpf_task_pt_regs",
                   "current_task_btf": "bpf_get_current_task_btf",
                   "attach_cookie": "bpf_get_attach_cookie",
                   "percpu_lookup": "bpf_map_lookup_percpu_elem"}


def test_kernel_features_match_bpftool_feature_probe_and_kernel_btf() -> None:
    probe = json.loads(subprocess.run(
        ["bpftool", "-j", "feature", "probe", "kernel"], capture_output=True, text=True,
        check=True, timeout=900).stdout)
    ours = probe_kernel_features()
    assert set(ours) == set(KERNEL_FEATURES)
    assert set(BPFTOOL_MAPS) | set(BPFTOOL_HELPERS) | {"bpf_rdonly_cast"} == set(ours)
    for name, key in BPFTOOL_MAPS.items():
        assert ours[name].available == probe["map_types"][key], (name, ours[name])
    helpers = set(probe["helpers"]["tracepoint_available_helpers"])
    for name, helper in BPFTOOL_HELPERS.items():
        assert ours[name].available == (helper in helpers), (name, ours[name])
    btf = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert ours["bpf_rdonly_cast"].available == ("FUNC 'bpf_rdonly_cast'" in btf)
    for name, s in ours.items():
        assert s.available == (s.reason == ""), (name, s)


def test_families_this_kernel_cannot_run_are_switched_off_by_name_and_the_rest_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without bpf_loop (before 5.17; Debian 5.10 in the matrix) loses no family
    that has a bounded-loop variant: l7 loads l7_bounded and saturation its *_bounded
    programs, each named in status; tcp and process run and count. On this kernel the probe's
    answer for bpf_loop is replaced; the matrix's 5.10 guest takes the same path for real."""
    import socket

    from agentlib import free_port, running_agent, scrape, total, wait_for

    from probewire import agent as agent_module
    from probewire.probes import l7, saturation
    from probewire.runtime.features import FAMILY_NEEDS, HookSupport

    def without_bpf_loop(names: Iterable[str] | None = None) -> dict[str, HookSupport]:
        found = probe_kernel_features(names)
        if "bpf_loop" in found:
            found["bpf_loop"] = HookSupport("bpf_loop", False, "the kernel refuses it")
        return found

    monkeypatch.setattr(agent_module, "probe_kernel_features", without_bpf_loop)
    monkeypatch.setattr(saturation, "probe_kernel_features", without_bpf_loop)
    monkeypatch.setattr(l7, "probe_kernel_features", without_bpf_loop)
    with running_agent() as (agent, listen):
        # custom is off by default (no probes.custom); the others are on.
        off = {name for name, needs in FAMILY_NEEDS.items() if "bpf_loop" in needs}
        assert set(agent.disabled) == off == set(), agent.disabled
        assert agent.probes["l7"].object_name == l7.BOUNDED_OBJECT
        status = agent.status()
        for s in status:
            if s.probe == "l7":
                # (5.10 lacks the other three of L7_OPTIONAL too, named after bpf_loop)
                assert s.fallback_reason.startswith(
                    "bounded-loop variant l7_bounded (this kernel lacks bpf_loop (5.17+)"), s
        assert {s.probe for s in status} >= {"tcp", "process", "l7", "saturation"}
        listen_hooks = saturation.SIGNAL_HOOKS["listen"]
        for s in status:
            if s.probe == "saturation" and s.hook in listen_hooks:
                assert s.program and s.program.endswith("_bounded"), s
                # 5.10 also lacks bpf_map_lookup_percpu_elem (5.19), named after bpf_loop.
                assert s.fallback_reason.startswith(
                    "bounded-loop variant (this kernel lacks bpf_loop (5.17+)"), s
        for s in status:
            if s.probe in agent.disabled:
                assert (s.attached, s.program) == (False, None), s
                assert s.fallback_reason == f"family off: {agent.disabled[s.probe]}", s
            else:
                assert s.attached, s
        port = free_port()
        with pytest.raises(ConnectionRefusedError), socket.socket() as c:
            c.connect(("127.0.0.1", port))
        wait_for(lambda: total(scrape(listen), "probewire_tcp_resets_total",
                               server_port=str(port), reset="received") >= 1)
        samples = scrape(listen)
        assert total(samples, "probewire_tcp_resets_total", server_port=str(port),
                     reset="received") == 1
        hooks = {h.name for h in agent.probes["l7"].active_hooks()}
        assert sum(1 for s in status if s.probe == "l7") == len(hooks)


def test_this_kernel_switches_off_exactly_the_families_whose_features_it_lacks() -> None:
    """The real path, on whichever kernel runs this (all on on 6.18; l7, saturation and
    custom's needs unmet on the matrix's 5.10)."""
    from agentlib import running_agent

    from probewire.runtime.features import FAMILY_NEEDS, missing_features

    features = probe_kernel_features()
    with running_agent() as (agent, _listen):
        enabled = set(agent.running) | set(agent.disabled)
        expected = {name for name in enabled if name in FAMILY_NEEDS
                    and missing_features(name, features)}
        assert {n for n, r in agent.disabled.items() if r.startswith("this kernel lacks")} == (
            expected), agent.disabled
        for name in expected:
            assert agent.disabled[name] == missing_features(name, features)


def test_kernel_enumerators_match_bpftool_dump_of_the_kernel_btf() -> None:
    """What the saturation family reads struct linux_mib by: the counters' positions moved
    between kernels (19 and 20 on 6.1, 23 and 24 on 6.18) and their enum is anonymous."""
    names = ["LINUX_MIB_LISTENOVERFLOWS", "LINUX_MIB_LISTENDROPS", "LINUX_MIB_SYNCOOKIESSENT",
             "BPF_MAP_TYPE_RINGBUF", "PROBEWIRE_NO_SUCH_ENUMERATOR"]
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True, timeout=300).stdout
    want = {m[1]: int(m[2]) for m in re.finditer(r"'(\w+)' val=(-?\d+)", dump)
            if m[1] in names}
    assert set(want) == set(names) - {"PROBEWIRE_NO_SUCH_ENUMERATOR"}
    assert kernel_enumerators(names) == want


def test_doctor_names_the_stand_ins_a_kernel_without_bpf_loop_gets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor's family row says which variant runs and why (on 5.10 for real; here the
    probe's answers for saturation's optional features are replaced)."""
    from probewire import doctor
    from probewire.probes import saturation
    from probewire.runtime.features import SATURATION_OPTIONAL, HookSupport

    def lacking(names: Iterable[str] | None = None) -> dict[str, HookSupport]:
        return {n: HookSupport(n, False, "the kernel refuses it")
                for n in (names if names is not None else SATURATION_OPTIONAL)}

    monkeypatch.setattr(saturation, "probe_kernel_features", lacking)
    rows = {name: (ok, detail) for name, ok, detail in doctor._family_rows("127.0.0.1:1")}
    ok, detail = rows["family saturation"]
    assert ok, detail
    assert detail.startswith("on (loaded just now): tp_btf"), detail
    for note in ("bounded-loop variant (this kernel lacks bpf_loop (5.17+) and percpu_lookup "
                 "(5.19+))", "current task by probe reads (this kernel lacks current_task_btf "
                 "(5.11+))", "thread state in a hash by thread id (this kernel lacks "
                 "task_storage (5.11+))"):
        assert f"; {note}" in detail, detail
    assert "this kernel lacks" not in rows["family tcp"][1]
