"""The process tree: every live process with its ancestry, from fork/exec/exit records and a
/proc seed taken at start-up (so processes older than the agent have parents).

A node is one process (pid + start time); exec updates its image in place. The tree keeps the
lineage a process was born into: when a parent exits, the kernel reparents its children to a
subreaper, but an alert must still show the shell that started them, so an exited process stays
(as a "ghost") while any of its children are in the tree, and goes with the last of them.

Memory is bounded by ``max_nodes`` (security.max_processes): past it, the least recently seen
node is evicted; its children keep a stub in its place, so their ancestry ends there (shown as
truncated) instead of pinning a chain of exited processes. A node costs about 600 bytes with
its strings (argv up to 256 bytes), so the default 16384 is at most ~10 MB.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from probewire.security.kernel import SEC_EXE_DELETED, SEC_EXE_MEMFD, SEC_IN_CONTAINER

__all__ = ["Node", "ProcessTree", "read_proc_node"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // CLK_TCK
# Ancestry shown and searched: deeper lineages are cut here.
MAX_ANCESTRY = 32
_DELETED = " (deleted)"
_NSPID = re.compile(r"^NSpid:\s+(.*)$", re.M)
_UID = re.compile(r"^Uid:\s+(\d+)\s+(\d+)", re.M)


@dataclass(slots=True, eq=False)
class Node:
    pid: int
    start_ticks: int  # the process's start in clock ticks since boot (/proc/PID/stat field 22)
    parent: Node | None = None
    exe: str = ""  # the image's path as the kernel resolved it ("memfd:x" for a memfd)
    filename: str = ""  # the path given to execve
    comm: str = ""
    argv: tuple[str, ...] = ()  # redacted
    uid: int = -1
    euid: int = -1
    cgroup_id: int = 0
    service: str = ""  # resolved on demand
    clauses: int | None = None  # kernel clause bits of its exec; None: not known (seeded)
    flags: int = 0  # SEC_* evidence of its exec
    listener_depth: int = 0
    listener: bool = False  # the kernel saw it listening (as a child's listening ancestor)
    exec_ns: int = 0  # monotonic time of its last exec, 0 if none seen
    seeded: bool = False  # from /proc, not from an exec record
    exited: bool = False
    ghost: bool = False  # exited, kept while it has children in the tree
    evicted: bool = False  # a stub: pushed out by the cap, or released
    children: int = 0  # nodes whose parent this is
    depth: int = 0  # ancestors above it (an upper bound once chains are cut)
    alerted: set[str] | None = None  # rules already alerted for this image


def same_start(node: Node, start_ticks: int) -> bool:
    """One process, or a pid reused? Within a tick: a fork record from the task_newtask
    fallback carries the boot clock at the fork, not the child's exact start."""
    return abs(node.start_ticks - start_ticks) <= 1


def ticks(start_ns: int) -> int:
    """Kernel start_boottime (ns) -> /proc's start time (clock ticks), as the kernel does it."""
    return start_ns // NS_PER_TICK


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def read_proc_node(pid: int, proc: Path = Path("/proc"),
                   redact: Callable[[tuple[str, ...]], tuple[str, ...]] = tuple) -> tuple[
                       Node, int] | None:
    """(node, ppid) for a live process from /proc, or None if it is gone or a kernel thread."""
    base = proc / str(pid)
    stat = _read(base / "stat")
    if stat is None:
        return None
    close = stat.rfind(b")")
    fields = stat[close + 2:].split()
    try:
        ppid, start = int(fields[1]), int(fields[19])
        kthread = int(fields[6]) & 0x00200000  # PF_KTHREAD in field 9 (flags)
    except (IndexError, ValueError):
        return None
    if kthread:
        return None
    comm = stat[stat.find(b"(") + 1: close].decode(errors="replace")
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        exe = ""
    flags = 0
    if exe.endswith(_DELETED):
        exe = exe.removesuffix(_DELETED)
        flags |= SEC_EXE_DELETED
    if exe.startswith("/memfd:"):
        exe = exe[1:]
        flags |= SEC_EXE_MEMFD | SEC_EXE_DELETED
    raw = _read(base / "cmdline") or b""
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    status = (_read(base / "status") or b"").decode(errors="replace")
    uid = euid = -1
    m = _UID.search(status)
    if m:
        uid, euid = int(m.group(1)), int(m.group(2))
    m = _NSPID.search(status)
    if m and len(m.group(1).split()) > 1:
        flags |= SEC_IN_CONTAINER
    node = Node(pid, start, exe=exe, filename=argv[0] if argv else exe, comm=comm,
                argv=redact(argv), uid=uid, euid=euid, flags=flags, seeded=True)
    return node, ppid


class ProcessTree:
    """pid -> Node with parent links; one writer (the ring reader thread), readers under the
    caller's lock."""

    def __init__(self, max_nodes: int = 16384) -> None:
        self.max_nodes = max_nodes
        self._by_pid: OrderedDict[int, Node] = OrderedDict()  # least recently seen first
        self.ghosts = 0  # exited nodes kept for their children
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_pid)

    def get(self, pid: int) -> Node | None:
        return self._by_pid.get(pid)

    def nodes(self) -> Iterator[Node]:
        return iter(list(self._by_pid.values()))

    # --- changes ----------------------------------------------------------------------------
    def _link(self, node: Node, parent: Node | None) -> None:
        node.parent = parent
        if parent is None:
            node.depth = 0
            return
        parent.children += 1
        node.depth = parent.depth + 1
        if node.depth > 2 * MAX_ANCESTRY:
            # A lineage of exited processes (a daemon that re-forks itself forever) would
            # otherwise grow without bound: keep the nearest MAX_ANCESTRY generations.
            cut = node
            for _ in range(MAX_ANCESTRY):
                if cut.parent is None:
                    break
                cut = cut.parent
            self._unlink(cut)
            node.depth = MAX_ANCESTRY

    def _unlink(self, node: Node) -> None:
        parent, node.parent = node.parent, None
        if parent is None:
            return
        parent.children -= 1
        if parent.children <= 0 and (parent.ghost or parent.evicted):
            self._release(parent)

    def _release(self, node: Node) -> None:
        """A node nothing needs any more leaves the tree; its parent is told."""
        if node.ghost:
            node.ghost = False
            self.ghosts -= 1
        node.evicted = True
        self._unlink(node)

    def _add(self, node: Node, parent: Node | None) -> Node:
        old = self._by_pid.pop(node.pid, None)
        if old is not None:
            self._retire(old)
        self._link(node, parent)
        self._by_pid[node.pid] = node
        while len(self._by_pid) > self.max_nodes:
            _, victim = self._by_pid.popitem(last=False)
            self._evict(victim)
        return node

    def _retire(self, node: Node) -> None:
        """A pid's holder is gone (it exited, or its pid was reused under us)."""
        node.exited = True
        if node.children > 0:
            node.ghost = True
            self.ghosts += 1
        else:
            self._release(node)

    def _evict(self, node: Node) -> None:
        """Over the cap: the node becomes a stub its children's ancestry ends at."""
        self.evicted += 1
        node.evicted = True
        node.argv = ()
        node.alerted = None
        if node.children <= 0:
            self._release(node)
        else:
            self._unlink(node)

    def _touch(self, node: Node) -> None:
        self._by_pid.move_to_end(node.pid)

    def fork(self, pid: int, ppid: int, start_ticks: int, *, uid: int = -1, euid: int = -1,
             cgroup_id: int = 0) -> Node:
        """A new process: it runs its parent's image until it execs."""
        existing = self._by_pid.get(pid)
        if existing is not None and same_start(existing, start_ticks):
            self._touch(existing)
            return existing  # seeded from /proc after the fork was recorded
        parent = self._by_pid.get(ppid)
        node = Node(pid, start_ticks, uid=uid, euid=euid, cgroup_id=cgroup_id)
        if parent is not None:
            node.exe, node.filename, node.comm = parent.exe, parent.filename, parent.comm
            node.argv, node.service = parent.argv, parent.service
            node.clauses, node.flags = parent.clauses, parent.flags
            self._touch(parent)
        return self._add(node, parent)

    def exec(self, pid: int, ppid: int, start_ticks: int, **image: object) -> Node:
        """The process `pid` now runs a new image: its node, for the caller to set the image
        on (or `image`: the Node fields to set)."""
        node = self._by_pid.get(pid)
        if node is None or not same_start(node, start_ticks):
            node = self._add(Node(pid, start_ticks), self._by_pid.get(ppid))
        elif node.parent is None and ppid in self._by_pid and ppid != pid:
            self._link(node, self._by_pid[ppid])
        for name, value in image.items():
            setattr(node, name, value)
        node.start_ticks = start_ticks  # exact from the exec'ing task
        node.seeded = False
        node.alerted = None
        self._touch(node)
        return node

    def exit(self, pid: int, start_ticks: int) -> None:
        node = self._by_pid.get(pid)
        if node is None or not same_start(node, start_ticks):
            return
        del self._by_pid[pid]
        self._retire(node)

    def seed(self, nodes: dict[int, tuple[Node, int]]) -> None:
        """Processes read from /proc at start-up ({pid: (node, ppid)}), parents first."""
        done: set[int] = set()

        def add(pid: int, depth: int = 0) -> None:
            if pid in done or pid not in nodes:
                return
            done.add(pid)
            node, ppid = nodes[pid]
            if depth < MAX_ANCESTRY and ppid in nodes:
                add(ppid, depth + 1)
            current = self._by_pid.get(pid)
            if current is not None and same_start(current, node.start_ticks):
                return  # already known from a record
            self._add(node, self._by_pid.get(ppid))

        for pid in sorted(nodes):
            add(pid)

    def set_parent(self, node: Node, parent: Node) -> None:
        """Link a node that has no parent yet (its parent was found late, in /proc)."""
        if node.parent is None and parent is not node:
            self._link(node, parent)

    def adopt(self, node: Node, ppid: int) -> Node:
        """A process found in /proc on demand (its records were dropped or predate us)."""
        current = self._by_pid.get(node.pid)
        if current is not None and same_start(current, node.start_ticks):
            return current
        return self._add(node, self._by_pid.get(ppid))

    # --- questions --------------------------------------------------------------------------
    def ancestry(self, node: Node, limit: int = MAX_ANCESTRY) -> list[Node]:
        """Ancestors, the parent first, up to `limit` (stubs of evicted nodes end it)."""
        out: list[Node] = []
        p = node.parent
        while p is not None and len(out) < limit:
            out.append(p)
            if p.evicted:
                break
            p = p.parent
        return out

    def stats(self) -> dict[str, int]:
        return {"processes": len(self._by_pid), "exited_kept": self.ghosts,
                "evicted": self.evicted, "max_processes": self.max_nodes}
