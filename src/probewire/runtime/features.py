"""What this kernel offers, found by trying it: each hook type is loaded and attached once.

Version numbers lie (distribution backports, disabled configs such as CONFIG_KPROBES=n, or
lockdown making fentry fail with EPERM), so nothing here compares kernel versions.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from probewire.errors import ProbewireError
from probewire.runtime.bpf import BpfObject
from probewire.runtime.objects import object_path

log = logging.getLogger(__name__)

TRACEFS = Path("/sys/kernel/tracing")

# Hook type (the SEC() prefix) -> program in features.bpf.c that exercises it.
HOOK_TYPES: dict[str, str] = {
    "tp": "feature_tp",
    "tp_btf": "feature_tp_btf",
    "raw_tp": "feature_raw_tp",
    "kprobe": "feature_kprobe",
    "fentry": "feature_fentry",
    "uprobe": "feature_uprobe",
}


@dataclass(frozen=True)
class HookSupport:
    hook_type: str
    available: bool
    reason: str  # empty when available; else the error that ruled it out


def hook_type_of(section: str) -> str:
    """`tp_btf/inet_sock_set_state` -> `tp_btf`; `uretprobe//lib:fn` -> `uprobe`."""
    prefix = section.split("/", 1)[0].split(".", 1)[0]
    return {"tracepoint": "tp", "uretprobe": "uprobe", "kretprobe": "kprobe",
            "fexit": "fentry", "raw_tracepoint": "raw_tp"}.get(prefix, prefix)


def libc_path() -> str:
    name = ctypes.util.find_library("c") or "libc.so.6"
    for directory in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64"):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return name


def ensure_tracefs() -> None:
    """Tracepoint attachment needs tracefs; a fresh machine may not have it mounted."""
    if (TRACEFS / "events").is_dir():
        return
    rc = os.system(f"mount -t tracefs nodev {TRACEFS} 2>/dev/null")
    if rc or not (TRACEFS / "events").is_dir():
        log.warning("tracefs is not mounted and mounting failed; fix: mount -t tracefs nodev %s",
                    TRACEFS)


def _try(hook_type: str, program: str) -> HookSupport:
    obj = BpfObject(object_path("features"))
    try:
        for prog in obj.programs.values():
            prog.set_autoload(prog.name == program)
        obj.load()
        prog = obj.programs[program]
        if hook_type == "uprobe":
            link = prog.attach_uprobe(libc_path(), "getppid")
        else:
            link = prog.attach()
        link.destroy()
        return HookSupport(hook_type, True, "")
    except ProbewireError as exc:
        return HookSupport(hook_type, False, str(exc))
    finally:
        obj.close()


def probe_hook_types() -> dict[str, HookSupport]:
    """Try every hook type once; quiet libbpf while doing it (failures are expected)."""
    ensure_tracefs()
    libbpf_log = logging.getLogger("probewire.libbpf")
    saved = libbpf_log.level
    libbpf_log.setLevel(logging.CRITICAL)
    try:
        return {t: _try(t, prog) for t, prog in HOOK_TYPES.items()}
    finally:
        libbpf_log.setLevel(saved)
