"""Every BPF program and link on the host (BPF_PROG_GET_NEXT_ID and friends).

`probewire doctor` and the tests use it to prove the agent leaves nothing attached.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from probewire.runtime._libbpf import lib
from probewire.runtime.bpf import obj_info

# struct bpf_prog_info: type @0, id @4, name[16] @64; struct bpf_link_info: type @0,
# id @4, prog_id @8 (include/uapi/linux/bpf.h, stable ABI).
_PROG_INFO_LEN = 80
_LINK_INFO_LEN = 16


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int


def _ids(next_id_fn: str) -> list[int]:
    ids = []
    current = ctypes.c_uint32(0)
    nxt = ctypes.c_uint32(0)
    while getattr(lib(), next_id_fn)(current.value, ctypes.byref(nxt)) == 0:
        ids.append(nxt.value)
        current.value = nxt.value
    return ids


def programs() -> list[ProgInfo]:
    out = []
    for prog_id in _ids("bpf_prog_get_next_id"):
        fd = lib().bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            continue  # freed in between
        try:
            raw = obj_info(fd, _PROG_INFO_LEN)
        finally:
            os.close(fd)
        if raw:
            name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
            out.append(ProgInfo(prog_id, int.from_bytes(raw[0:4], "little"), name))
    return out


def links() -> list[LinkInfo]:
    out = []
    for link_id in _ids("bpf_link_get_next_id"):
        fd = lib().bpf_link_get_fd_by_id(link_id)
        if fd < 0:
            continue
        try:
            raw = obj_info(fd, _LINK_INFO_LEN)
        finally:
            os.close(fd)
        if raw:
            out.append(LinkInfo(link_id, int.from_bytes(raw[0:4], "little"),
                                int.from_bytes(raw[8:12], "little")))
    return out


def agent_program_names() -> set[str]:
    """Names (as the kernel truncates them, 15 chars) of every program probewire ships."""
    from probewire.probes import REGISTRY
    from probewire.runtime.bpf import BpfObject
    from probewire.runtime.features import HOOK_TYPES
    from probewire.runtime.objects import object_path

    names = {n[:15] for n in HOOK_TYPES.values()}
    for probe in REGISTRY.values():
        with BpfObject(object_path(probe.object_name)) as obj:
            names.update(n[:15] for n in obj.programs)
    return names


def ours() -> list[ProgInfo]:
    names = agent_program_names()
    return [p for p in programs() if p.name in names]


def holders(prog_ids: set[int], proc: Path = Path("/proc")) -> dict[int, set[int]]:
    """prog id -> pids holding a program or link fd on it (from /proc/PID/fdinfo)."""
    found: dict[int, set[int]] = {i: set() for i in prog_ids}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            infos = list((pid_dir / "fdinfo").iterdir())
        except OSError:
            continue
        for info in infos:
            try:
                text = info.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    prog_id = int(line.split()[1])
                    if prog_id in found:
                        found[prog_id].add(int(pid_dir.name))
    return found
