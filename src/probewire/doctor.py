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
    table = Table(title="probewire doctor")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("detail", overflow="fold")
    # Hook types a kernel lacks are facts, not failures (so is a kernel that cannot enforce
    # kill rules: they still alert); the rest must pass.
    ok = True
    for name, passed, detail in rows:
        table.add_row(name, "yes" if passed else "no", detail)
        if not passed and not name.startswith("hook ") and name != "security kill action":
            ok = False
    console.print(table)
    return ok
