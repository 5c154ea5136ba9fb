"""`probewire doctor`: is this host ready, and did an agent leave anything behind?"""

from __future__ import annotations

import os
import resource
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from probewire.errors import ProbewireError

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
BTF = Path("/sys/kernel/btf/vmlinux")
TRACEFS = Path("/sys/kernel/tracing")


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "exited"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:80]


def _agent_running(listen: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# Rows that report what this kernel offers: "no" there is information, not a failed check.
FACTS = ("hook ", "feature ", "family ", "security kill action")


def _kernel_feature_rows() -> list[tuple[str, bool, str]]:
    from probewire.runtime.features import probe_kernel_features

    return [(f"feature {name}", s.available, "works" if s.available else s.reason)
            for name, s in probe_kernel_features().items()]


def _family_rows(listen: str) -> list[tuple[str, bool, str]]:
    """Each probe family: loaded and attached on this kernel, or switched off and why. From
    the agent at `listen` when one answers, else by starting the probes once here."""
    import json

    from probewire.config import config_from_mapping
    from probewire.probes import REGISTRY
    from probewire.runtime.features import FAMILY_NEEDS, missing_features, probe_kernel_features

    try:
        with urllib.request.urlopen(f"http://{listen}/api/probes", timeout=2) as resp:
            status = json.load(resp)["probes"]
        source = "running agent"
    except (OSError, ValueError, KeyError):
        from probewire.agent import Agent

        agent = Agent(config_from_mapping({"bpf_stats": "off"}))
        try:
            agent.start()
        except ProbewireError as exc:
            return [("families", False, f"the agent does not start: {exc}")]
        try:
            status = [{"probe": s.probe, "section": s.section, "attached": s.attached,
                       "fallback_reason": s.fallback_reason} for s in agent.status()]
        finally:
            agent.stop()
        source = "loaded just now"
    rows = []
    for family in dict.fromkeys(s["probe"] for s in status):
        hooks = [s for s in status if s["probe"] == family]
        if all(s["attached"] for s in hooks):
            kinds = sorted({s["section"].split("/", 1)[0] for s in hooks})
            # Stand-ins for features this kernel lacks (saturation's bounded-loop variant),
            # which probes.base.Probe.program_note adds to a hook's reason.
            stand_ins = dict.fromkeys(note for s in hooks
                                      for note in (s["fallback_reason"] or "").split("; ")
                                      if "this kernel lacks" in note)
            rows.append((f"family {family}", True, f"on ({source}): {', '.join(kinds)}"
                         + "".join(f"; {note}" for note in stand_ins)))
        else:
            reasons = dict.fromkeys(s["fallback_reason"] for s in hooks if not s["attached"])
            rows.append((f"family {family}", False,
                         f"off on this kernel ({source}): {'; '.join(reasons)}"))
    # Families the configuration leaves off (custom without probes.custom): whether this
    # kernel could run them, from the features their objects need.
    idle = [name for name in REGISTRY if name not in {s["probe"] for s in status}]
    features = probe_kernel_features({f for n in idle for f in FAMILY_NEEDS.get(n, ())})
    for family in idle:
        lacking = missing_features(family, features)
        rows.append((f"family {family}", not lacking,
                     f"off on this kernel: {lacking}" if lacking else
                     "not enabled in the configuration; this kernel can run it"))
    return rows


def run_checks(console: Console, listen: str) -> bool:
    rows: list[tuple[str, bool, str]] = []
    caps = _effective_caps()
    privileged = os.geteuid() == 0 or (
        caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON)
    ) or bool(caps & (1 << CAP_SYS_ADMIN))
    rows.append(("privileges", bool(privileged),
                 "root" if os.geteuid() == 0 else
                 "ok" if privileged else "run as root or grant CAP_BPF,CAP_PERFMON"))
    rows.append(("BTF", BTF.exists(), str(BTF) if BTF.exists() else
                 "kernel built without CONFIG_DEBUG_INFO_BTF: CO-RE programs cannot load"))
    tracefs = (TRACEFS / "events").is_dir()
    rows.append(("tracefs", tracefs, str(TRACEFS) if tracefs else
                 f"not mounted (the agent mounts it; by hand: mount -t tracefs nodev {TRACEFS})"))
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    memlock = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    rows.append(("memlock", True, f"{memlock} (the agent raises it; kernels >= 5.11 use memcg)"))
    try:
        from probewire.runtime._libbpf import version

        major, minor = version()
        rows.append(("libbpf", (major, minor) >= (1, 0), f"{major}.{minor}"))
    except ProbewireError as exc:
        rows.append(("libbpf", False, str(exc)))
        privileged = False
    if privileged:
        from probewire.runtime import inventory
        from probewire.runtime.features import probe_hook_types

        for hook_type, support in probe_hook_types().items():
            rows.append((f"hook {hook_type}", support.available,
                         "works" if support.available else support.reason))
        rows.extend(_kernel_feature_rows())
        # Ours and loaded is fine while a live process holds it (it goes when that process
        # does); held by no process means pinned or otherwise orphaned: a real leftover.
        loaded = inventory.ours()
        held = inventory.holders({p.id for p in loaded})
        orphans = [p for p in loaded if not held[p.id]]
        owners = sorted({pid for pids in held.values() for pid in pids})
        if orphans:
            detail = ", ".join(f"{p.name} (id {p.id})" for p in orphans)
            rows.append(("leftover programs", False,
                         f"{detail} held by no process (pinned?): find them with "
                         "`bpftool prog show` and remove their pins or links"))
        else:
            in_use = "; ".join(f"pid {pid} ({_cmdline(pid)})" for pid in owners)
            rows.append(("leftover programs", True,
                         f"none; {len(loaded)} in use by {in_use}" if loaded else "none"))
        if _agent_running(listen):
            rows.append(("agent", True, f"answering at {listen}"))
        from probewire.security.enforce import kill_supported

        rows.append(("security kill action", *kill_supported()))
        # After the leftover check: the programs loaded here are freed only after an RCU
        # grace period, and would look like leftovers for a moment.
        rows.extend(_family_rows(listen))
    table = Table(title="probewire doctor")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("detail", overflow="fold")
    # What a kernel lacks (hook types, features, the families they switch off) is a fact,
    # not a failure; so is a kernel that cannot enforce kill rules (they still alert). The
    # rest must pass.
    ok = True
    for name, passed, detail in rows:
        table.add_row(name, "yes" if passed else "no", detail)
        if not passed and not name.startswith(FACTS):
            ok = False
    console.print(table)
    return ok
