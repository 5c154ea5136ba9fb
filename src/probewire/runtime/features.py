"""What this kernel offers, found by trying it: each hook type is loaded and attached once.

Version numbers lie (distribution backports, disabled configs such as CONFIG_KPROBES=n, or
lockdown making fentry fail with EPERM), so nothing here compares kernel versions.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
from collections.abc import Iterable, Mapping
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


# Kernel features beyond hook types, each tried for real: a map of the type is created, or a
# tiny program calling the helper is loaded (libbpf's probes). Name -> (kind, id).
#   ringbuf       BPF_MAP_TYPE_RINGBUF (5.8): every family's records; the floor of the agent
#   task_storage  BPF_MAP_TYPE_TASK_STORAGE (5.11)
#   bpf_loop      helper 181 (5.17): bounded loops verified once, not unrolled
#   task_pt_regs  helper 175 (5.15): a syscall's saved registers at its exit
#   current_task_btf  helper 158 (5.11): the current task as a BTF pointer
#   attach_cookie helper 174 (5.15): the value an attachment carries (custom probes' index)
#   bpf_rdonly_cast   kfunc (6.2): plain loads of kernel fields (common.h KREAD)
#   percpu_lookup helper 195 (5.19): bpf_map_lookup_percpu_elem, another CPU's copy of a value
KERNEL_FEATURES: dict[str, tuple[str, int]] = {
    "ringbuf": ("map", 27),
    "task_storage": ("map", 29),
    "bpf_loop": ("helper", 181),
    "task_pt_regs": ("helper", 175),
    "current_task_btf": ("helper", 158),
    "attach_cookie": ("helper", 174),
    "bpf_rdonly_cast": ("kfunc", 0),
    "percpu_lookup": ("helper", 195),
}
# The first kernel with each feature, for the reason a family is switched off.
FEATURE_SINCE = {"ringbuf": "5.8", "task_storage": "5.11", "bpf_loop": "5.17",
                 "task_pt_regs": "5.15", "current_task_btf": "5.11", "attach_cookie": "5.15",
                 "bpf_rdonly_cast": "6.2", "percpu_lookup": "5.19"}

# Features a family's object calls on every path it can take, so a kernel without one cannot
# load it (the verifier refuses an unknown helper, a map of an unknown type fails creation).
# Optional ones (bpf_rdonly_cast: probe reads instead; saturation's: see
# SATURATION_VARIANTS) are not listed. tests/unit/test_family_needs.py checks this against the
# helpers each object's code calls.
#   custom      each uprobe finds its spec by its attach cookie
FAMILY_NEEDS: dict[str, tuple[str, ...]] = {
    "custom": ("attach_cookie",),
}
# Features the l7 object uses; a kernel that lacks any of them loads l7_bounded instead (the
# same sources built with L7_BOUNDED, bpf/l7/bounded.h):
#   bpf_loop          walks iovecs, HTTP heads and HTTP/2 frames; else bounded loops (shorter
#                     walks for iovecs and frames, what they cut counted as truncated)
#   task_storage      an SSL call's arguments per thread; else a hash by thread id
#   task_pt_regs      a syscall's arguments at its exit; else parked at its enter tracepoint
#   current_task_btf  the fd table by plain loads; else probe reads
L7_OPTIONAL = ("bpf_loop", "task_storage", "task_pt_regs", "current_task_btf")
# Features the saturation family uses where the kernel has them, with a stand-in where not:
#   bpf_loop, percpu_lookup  the walk over CPUs for listen-counter baselines; without either,
#                            the *_bounded programs (a bounded loop, a hash by CPU)
#   current_task_btf         the current task's fields by plain loads; else probe reads
#   task_storage             per-thread sched state; else an LRU hash by thread id
SATURATION_OPTIONAL = ("bpf_loop", "percpu_lookup", "current_task_btf", "task_storage")
_BPF_PROG_TYPE_TRACEPOINT = 5
_BTF_KIND_FUNC = 12


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


def _try_group(types: list[str]) -> dict[str, HookSupport] | str:
    """Load the feature programs of `types` in one object (one parse of the kernel's BTF) and
    attach each on its own; the load error if the object does not load."""
    obj = BpfObject(object_path("features"))
    try:
        wanted = {HOOK_TYPES[t] for t in types}
        for prog in obj.programs.values():
            prog.set_autoload(prog.name in wanted)
        obj.load()
        out = {}
        for t in types:
            prog = obj.programs[HOOK_TYPES[t]]
            try:
                uprobe = t == "uprobe"
                link = prog.attach_uprobe(libc_path(), "getppid") if uprobe else prog.attach()
                link.destroy()
                out[t] = HookSupport(t, True, "")
            except ProbewireError as exc:
                out[t] = HookSupport(t, False, str(exc))
        return out
    except ProbewireError as exc:
        return str(exc)
    finally:
        obj.close()


def _try(hook_type: str) -> HookSupport:
    found = _try_group([hook_type])
    return HookSupport(hook_type, False, found) if isinstance(found, str) else found[hook_type]


def probe_hook_types(types: Iterable[str] | None = None) -> dict[str, HookSupport]:
    """Try each hook type (all, or just `types`); libbpf is quieted: failures are expected."""
    ensure_tracefs()
    wanted = [t for t in HOOK_TYPES if types is None or t in set(types)]
    libbpf_log = logging.getLogger("probewire.libbpf")
    saved = libbpf_log.level
    libbpf_log.setLevel(logging.CRITICAL)
    try:
        # Types that fail at load (fentry under lockdown) would sink a joint load: try them
        # on their own, the rest together.
        alone = [t for t in wanted if t == "fentry"]
        together = [t for t in wanted if t not in alone]
        joint = _try_group(together) if together else {}
        found = {t: _try(t) for t in together} if isinstance(joint, str) else joint
        found.update({t: _try(t) for t in alone})
        return {t: found[t] for t in wanted}
    finally:
        libbpf_log.setLevel(saved)


def _kfunc_exists(name: str) -> tuple[bool, str]:
    """A kfunc is callable when the kernel's BTF declares it: what libbpf resolves a __ksym
    against at load (a weak one it does not find becomes 0 and its branch dead code)."""
    from probewire.runtime._libbpf import lib

    btf = lib().btf__load_vmlinux_btf()
    if not btf:
        return False, "no kernel BTF"
    try:
        found = lib().btf__find_by_name_kind(btf, name.encode(), _BTF_KIND_FUNC) > 0
    finally:
        lib().btf__free(btf)
    return found, "" if found else "not in the kernel's BTF"


def kernel_enumerators(names: Iterable[str]) -> dict[str, int]:
    """The values of enumerators (of any enum, anonymous ones included) in the running
    kernel's BTF; those it lacks are left out. For anonymous enums CO-RE cannot relocate: the
    index of a counter in struct linux_mib moved (LINUX_MIB_LISTENOVERFLOWS is 19 on 6.1, 23
    on 6.18)."""
    from probewire.runtime import _libbpf
    from probewire.runtime._libbpf import lib

    wanted = set(names)
    found: dict[str, int] = {}
    btf = lib().btf__load_vmlinux_btf()
    if not btf:
        return found
    try:
        for type_id in range(1, lib().btf__type_cnt(btf)):
            t = lib().btf__type_by_id(btf, type_id).contents
            if (t.info >> 24) & 0x1F != _libbpf.BTF_KIND_ENUM:
                continue
            vlen = t.info & 0xFFFF
            members = ctypes.cast(ctypes.addressof(t) + ctypes.sizeof(_libbpf.BtfType),
                                  ctypes.POINTER(_libbpf.BtfEnum * vlen)).contents
            for m in members:
                name = lib().btf__name_by_offset(btf, m.name_off).decode()
                if name in wanted:
                    found[name] = int(m.val)
            if len(found) == len(wanted):
                break
    finally:
        lib().btf__free(btf)
    return found


def missing_features(family: str, features: Mapping[str, HookSupport]) -> str:
    """Why this kernel cannot run `family` (the features it lacks and the kernel that brought
    each), or "" when it can."""
    lacking = [f"{name} ({FEATURE_SINCE[name]}+): {features[name].reason}"
               for name in FAMILY_NEEDS.get(family, ()) if not features[name].available]
    return "this kernel lacks " + "; ".join(lacking) if lacking else ""


def probe_kernel_features(names: Iterable[str] | None = None) -> dict[str, HookSupport]:
    """Try each of KERNEL_FEATURES (all, or just `names`) on this kernel (needs CAP_BPF for the
    helper probes)."""
    from probewire.runtime._libbpf import lib, strerror

    wanted = KERNEL_FEATURES if names is None else set(names)
    out = {}
    for name, (kind, ident) in KERNEL_FEATURES.items():
        if name not in wanted:
            continue
        if kind == "kfunc":
            ok, reason = _kfunc_exists(name)
        else:
            rc = (lib().libbpf_probe_bpf_map_type(ident, None) if kind == "map" else
                  lib().libbpf_probe_bpf_helper(_BPF_PROG_TYPE_TRACEPOINT, ident, None))
            ok = rc == 1
            reason = "" if ok else ("the kernel refuses it" if rc == 0 else strerror(abs(rc)))
        out[name] = HookSupport(name, ok, reason)
    return out
