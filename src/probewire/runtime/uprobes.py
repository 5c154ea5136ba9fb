"""The uprobe layer: attach programs to functions and USDT probes of the processes a client
targets, in processes running now and in those that exec later. TLS capture (libssl) and the
custom probes (probes.custom) are its clients.

A client names a target (an executable glob, a service, a comm, pids, or every process), what
to probe (functions or USDT probes, with the program and cookie for each) and optionally which
mapped files to search (libssl). For each target process the layer reads /proc/PID/maps, finds
the first mapped file that has the client's symbols (the executable first, then libraries), and
attaches there.

A uprobe is set on a file (an inode), not on a process. The layer attaches once per inode for
every process mapping it when that costs no one else anything: the file is the target's own
executable (or the client targets every process). Otherwise (a shared library, a comm or
service target, a USDT probe with a semaphore, which makes every process that maps the file
take the probe) it attaches per process, so others never pay. Either way an attachment is shared
by its users (processes) and detached when the last one is gone. The agent's own process is
never a target.

New processes come from the process family's exec events (`on_process_events`); their shared
libraries are mapped after exec by the dynamic loader, so a process is looked at again a few
times in its first seconds, and every process every RESCAN_S (libraries loaded with dlopen).
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from probewire.errors import ProbewireError
from probewire.runtime.bpf import Link, Program, destroy_links
from probewire.runtime.elf import ElfFile, SymbolNotFound, file_id, read_maps

__all__ = ["Client", "ProcessState", "Site", "Target", "UprobeLayer"]

log = logging.getLogger(__name__)

RESCAN_S = 10.0
# After an exec, look again at these delays: the loader maps libraries in the first
# milliseconds, a slow start (a JIT, a big binary paged in) may take a second or two.
EXEC_RETRIES_S = (0.0, 0.02, 0.1, 0.5, 2.0)
ELF_CACHE = 64


class _Services(Protocol):
    def name_for(self, pid: int) -> str: ...


class _ProcessEvent(Protocol):
    kind: str
    pid: int


@dataclass(frozen=True)
class Target:
    """Which processes a client wants: exactly one of these is set."""

    exe: str | None = None  # fnmatch glob on the executable's path
    comm: str | None = None
    service: str | None = None
    pids: frozenset[int] = frozenset()
    every_process: bool = False

    def describe(self) -> str:
        if self.every_process:
            return "every process"
        if self.exe is not None:
            return f"exe {self.exe}"
        if self.comm is not None:
            return f"comm {self.comm}"
        if self.service is not None:
            return f"service {self.service}"
        return f"pids {sorted(self.pids)}"


@dataclass(frozen=True)
class Site:
    """One probe point: a function's entry or return, or a USDT probe."""

    program: Program
    function: str | None = None
    usdt: tuple[str, str] | None = None  # (provider, name)
    returns: bool = False
    cookie: int = 0

    def describe(self) -> str:
        if self.usdt is not None:
            return ":".join(self.usdt)
        return f"{self.function}{' (return)' if self.returns else ''}"


@dataclass
class Client:
    name: str
    target: Target
    sites: tuple[Site, ...]
    go: bool = False  # Go's register ABI: entry after the stack check, returns at each RET
    files: re.Pattern[str] | None = None  # only mapped files whose path matches
    # Files to attach to before any process maps them (TLS: the loader's libssl), for good.
    static_paths: Callable[[], Iterable[str]] = lambda: ()


@dataclass
class ProcessState:
    """What the layer did for one client in one process (`probewire probes` lists these)."""

    client: str
    pid: int
    comm: str
    state: str  # attached, waiting, missing, failed
    file: str = ""  # the file attached to (as the process sees it)
    reason: str = ""  # missing/failed: why
    shared: bool = False  # the attachment is per inode, shared by every process mapping it
    start_ticks: int = 0
    attempts: int = 0
    exe: str = ""  # the executable when looked at: an exec into another binary starts over


@dataclass
class _Attachment:
    client: str
    inode: tuple[int, int]
    pid: int  # -1: every process mapping the inode
    path: str  # the host path attached through
    links: list[Link]
    users: set[int] = field(default_factory=set)
    static: bool = False


@dataclass(frozen=True)
class _Proc:
    pid: int
    comm: str
    exe: str
    start_ticks: int


@dataclass(frozen=True)
class _Plan:
    site: Site
    offset: int  # file offset; unused for USDT
    what: str
    retprobe: bool = False


def _read_proc(pid: int, proc: Path) -> _Proc | None:
    base = proc / str(pid)
    try:
        stat = (base / "stat").read_text()
        comm = (base / "comm").read_text().rstrip("\n")
    except OSError:
        return None
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        exe = ""  # a kernel thread, or gone
    fields = stat[stat.rindex(")") + 2:].split()
    return _Proc(pid, comm, exe.removesuffix(" (deleted)"), int(fields[19]))


class UprobeLayer:
    """Attachments of one probe family's clients; all changes happen on its worker thread
    (or in the caller of `start`/`scan`, before and beside it, under the same lock)."""

    def __init__(self, name: str, services: _Services | None = None,
                 proc: Path = Path("/proc")) -> None:
        self.name = name
        self.services = services
        self.proc = proc
        self.clients: list[Client] = []
        self.errors: Counter[tuple[str, str]] = Counter()  # (client, reason) -> count
        self._attachments: dict[tuple[str, tuple[int, int], int], _Attachment] = {}
        self._states: dict[tuple[str, int], ProcessState] = {}
        # (client, inode) -> (path, why): a shared attach that failed is not retried per process.
        self._failed_files: dict[tuple[str, tuple[int, int]], tuple[str, str]] = {}
        self._elves: OrderedDict[tuple[int, int], ElfFile] = OrderedDict()
        self._self_pid = os.getpid()
        self._self_inodes = self._inodes_of(self._self_pid)
        self._lock = threading.RLock()
        self._wake = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, int]] = []  # (when, pid, attempt)
        self._exits: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_scan = 0.0

    def add(self, client: Client) -> None:
        self.clients.append(client)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Attach to what exists now (synchronously), then follow new processes."""
        with self._lock:
            self._attach_static()
        self.scan()
        self._next_scan = time.monotonic() + RESCAN_S
        self._thread = threading.Thread(target=self._run, name=f"probewire-uprobes-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            links = [link for a in self._attachments.values() for link in a.links]
            self._attachments.clear()
            self._states.clear()
        destroy_links(links)

    def on_process_events(self, events: Sequence[_ProcessEvent]) -> None:
        """Exec and exit events (ProcessProbe.subscribers): queued, handled on the worker."""
        now = time.monotonic()
        with self._wake:
            for ev in events:
                if ev.kind == "exec":
                    heapq.heappush(self._due, (now, ev.pid, 0))
                elif ev.kind == "exit":
                    self._exits.append(ev.pid)
            self._wake.notify()

    def scan(self) -> None:
        """Look at every process once (start-up, and every RESCAN_S)."""
        try:
            pids = [int(p.name) for p in self.proc.iterdir() if p.name.isdigit()]
        except OSError:
            return
        for pid in pids:
            with self._lock:
                self._visit(pid, final=True)
        with self._lock:
            self._sweep()

    # --- what it did -----------------------------------------------------------------------
    def processes(self) -> list[ProcessState]:
        with self._lock:
            return sorted(self._states.values(), key=lambda s: (s.client, s.pid))

    def links(self) -> list[Link]:
        with self._lock:
            return [link for a in self._attachments.values() for link in a.links]

    def attached_files(self, client: str | None = None) -> dict[tuple[int, int], str]:
        """inode -> path, of the files with at least one attachment."""
        with self._lock:
            return {a.inode: a.path for a in self._attachments.values()
                    if client is None or a.client == client}

    def failed_files(self) -> dict[str, str]:
        """path -> why, of files an attach failed on."""
        with self._lock:
            return dict(self._failed_files.values())

    def attachments(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"client": a.client, "path": a.path, "pid": a.pid, "links": len(a.links),
                     "users": sorted(a.users), "static": a.static}
                    for a in self._attachments.values()]

    # --- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                timeout = self._next_scan - time.monotonic()
                if self._due:
                    timeout = min(timeout, self._due[0][0] - time.monotonic())
                if timeout > 0 and not self._exits:
                    self._wake.wait(timeout)
                now = time.monotonic()
                exits, self._exits = self._exits, []
                due = []
                while self._due and self._due[0][0] <= now:
                    due.append(heapq.heappop(self._due))
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    for pid in exits:
                        self._release_pid(pid)
                    for _, pid, attempt in due:
                        final = attempt + 1 >= len(EXEC_RETRIES_S)
                        if self._visit(pid, final=final, attempt=attempt) and not final:
                            with self._wake:
                                heapq.heappush(self._due, (
                                    now + EXEC_RETRIES_S[attempt + 1] - EXEC_RETRIES_S[attempt],
                                    pid, attempt + 1))
                if now >= self._next_scan:
                    self._next_scan = now + RESCAN_S
                    self.scan()
            except Exception:  # a vanished /proc entry or a bad file must not end the worker
                log.exception("uprobe layer %s: handling processes failed", self.name)

    # --- one process -----------------------------------------------------------------------
    def _visit(self, pid: int, *, final: bool, attempt: int = 0) -> bool:
        """Attach every client that targets `pid`. True if a client is still waiting for a
        file or symbol that may come (worth another look)."""
        if pid == self._self_pid:
            return False
        info = _read_proc(pid, self.proc)
        if info is None:
            self._release_pid(pid)
            return False
        again = False
        for client in self.clients:
            key = (client.name, pid)
            state = self._states.get(key)
            if state is not None and (state.start_ticks != info.start_ticks
                                      or state.exe != info.exe):
                self._release(client.name, pid)  # the pid was reused, or exec'd anew
                state = None
            if not self._targets(client, info):
                if state is not None:
                    self._release(client.name, pid)  # exec'd into something else
                continue
            if state is not None and state.state in ("attached", "failed"):
                continue
            if state is not None and state.state == "missing" and not final:
                continue
            again |= self._resolve(client, info, final=final, attempt=attempt)
        return again

    def _targets(self, client: Client, info: _Proc) -> bool:
        t = client.target
        if t.every_process:
            return True
        if t.exe is not None:
            return bool(info.exe) and fnmatch.fnmatchcase(info.exe, t.exe)
        if t.comm is not None:
            return info.comm == t.comm
        if t.service is not None:
            return self.services is not None and self.services.name_for(info.pid) == t.service
        return info.pid in t.pids

    def _resolve(self, client: Client, info: _Proc, *, final: bool, attempt: int) -> bool:
        mapped = read_maps(info.pid, self.proc)
        if info.exe in mapped:  # the executable first: a symbol there wins over a library's
            mapped.remove(info.exe)
            mapped.insert(0, info.exe)
        candidates = [p for p in mapped if client.files is None or client.files.search(p)]
        if not candidates:
            if client.files is None and final:
                self._set(client, info, "missing", reason="the process maps no file")
            return client.files is None or not final
        reasons: list[str] = []
        for path in candidates:
            host = f"{self.proc}/{info.pid}/root{path}"
            inode = file_id(host)
            if inode is None:
                continue
            try:
                elf = self._elf(inode, host)
                plans = self._plan(client, elf)
            except SymbolNotFound as exc:
                reasons.append(str(exc).replace(host, path))
                continue
            self._attach(client, info, path, host, inode, elf, plans)
            return False
        reason = reasons[0] if reasons else "no mapped file could be read"
        if len(reasons) > 1:
            reason += f" (nor in the {len(reasons) - 1} libraries it maps)"
        if client.files is not None and not reasons:
            return not final
        if not final:
            self._set(client, info, "waiting", reason=reason, attempts=attempt + 1)
            return True
        previous = self._states.get((client.name, info.pid))
        self._set(client, info, "missing", reason=reason, attempts=attempt + 1)
        if previous is None or previous.state != "missing":  # once per process, not per rescan
            self.errors[(client.name, "symbol_missing")] += 1
            log.warning("%s: %s in pid %d (%s): %s", self.name, client.name, info.pid,
                        info.comm, reason)
        return False

    def _plan(self, client: Client, elf: ElfFile) -> list[_Plan]:
        plans: list[_Plan] = []
        for site in client.sites:
            if site.usdt is not None:
                elf.find_usdt(*site.usdt)
                plans.append(_Plan(site, 0, site.describe()))
                continue
            assert site.function is not None
            for fn in elf.find_functions(site.function):
                if client.go:
                    go = elf.go_sites(fn)
                    addresses: Iterable[int] = go.returns if site.returns else (go.entry,)
                else:
                    addresses = (fn.address,)
                for address in addresses:
                    delta = address - fn.address
                    what = f"{fn.name}+{delta:#x}" if delta else fn.name
                    # Go's returns are plain uprobes on its RET instructions.
                    plans.append(_Plan(site, elf.file_offset(address), what,
                                       retprobe=site.returns and not client.go))
        return plans

    def _shared(self, client: Client, info: _Proc | None, path: str, inode: tuple[int, int],
                elf: ElfFile) -> bool:
        if client.target.every_process:
            return True
        if inode in self._self_inodes:
            return False  # never make the agent itself take a probe
        semaphores = any(n.semaphore for s in client.sites if s.usdt is not None
                         for n in elf.find_usdt(*s.usdt))
        return (client.target.exe is not None and info is not None and path == info.exe
                and not semaphores)

    def _attach(self, client: Client, info: _Proc, path: str, host: str,
                inode: tuple[int, int], elf: ElfFile, plans: list[_Plan]) -> None:
        shared = self._shared(client, info, path, inode, elf)
        pid = -1 if shared else info.pid
        key = (client.name, inode, pid)
        att = self._attachments.get(key)
        if att is None:
            failed = self._failed_files.get((client.name, inode)) if shared else None
            if failed is not None:
                self._set(client, info, "failed", file=path, reason=failed[1])
                return
            try:
                links = self._links(plans, host, pid)
            except ProbewireError as exc:
                reason = str(exc).replace(host, path)
                if shared:
                    self._failed_files[(client.name, inode)] = (host, reason)
                self._set(client, info, "failed", file=path, reason=reason)
                self.errors[(client.name, "attach_failed")] += 1
                log.warning("%s: %s in pid %d (%s): attach failed: %s", self.name, client.name,
                            info.pid, info.comm, reason)
                return
            att = self._attachments[key] = _Attachment(client.name, inode, pid, host, links)
            log.info("%s: %s attached to %s (%s, %d probes)", self.name, client.name, path,
                     "every process mapping it" if shared else f"pid {info.pid}", len(links))
        att.users.add(info.pid)
        self._set(client, info, "attached", file=path, shared=shared)

    def _links(self, plans: list[_Plan], host: str, pid: int) -> list[Link]:
        links: list[Link] = []
        try:
            for plan in plans:
                site = plan.site
                if site.usdt is not None:
                    links.append(site.program.attach_usdt(host, *site.usdt, pid=pid,
                                                          cookie=site.cookie))
                else:
                    links.append(site.program.attach_uprobe_at(
                        host, plan.offset, retprobe=plan.retprobe, pid=pid, cookie=site.cookie,
                        what=plan.what))
        except ProbewireError:
            destroy_links(links)
            raise
        return links

    def _set(self, client: Client, info: _Proc, state: str, **kw: Any) -> None:
        self._states[(client.name, info.pid)] = ProcessState(
            client.name, info.pid, info.comm, state, start_ticks=info.start_ticks,
            exe=info.exe, **kw)
        if state == "attached" and self.services is not None:
            # Named while alive: a process that exits before the next scrape keeps its name.
            self.services.name_for(info.pid)

    # --- detaching -------------------------------------------------------------------------
    def _release(self, client: str, pid: int) -> None:
        self._states.pop((client, pid), None)
        for key, att in list(self._attachments.items()):
            if att.client == client and pid in att.users:
                att.users.discard(pid)
                if not att.users and not att.static:
                    del self._attachments[key]
                    destroy_links(att.links)
                    log.info("%s: %s detached from %s (no process left)", self.name, client,
                             att.path)

    def _release_pid(self, pid: int) -> None:
        for client in self.clients:
            self._release(client.name, pid)

    def _sweep(self) -> None:
        """Drop users that exited without an exit event reaching us (or reused pids)."""
        users = {(s.client, s.pid): s.start_ticks for s in self._states.values()}
        for (client, pid), ticks in users.items():
            info = _read_proc(pid, self.proc)
            if info is None or info.start_ticks != ticks:
                self._release(client, pid)

    # --- files -----------------------------------------------------------------------------
    def _elf(self, inode: tuple[int, int], host: str) -> ElfFile:
        elf = self._elves.get(inode)
        if elf is None:
            elf = self._elves[inode] = ElfFile(host)
            while len(self._elves) > ELF_CACHE:
                self._elves.popitem(last=False)
        else:
            self._elves.move_to_end(inode)
        return elf

    def _attach_static(self) -> None:
        for client in self.clients:
            for path in client.static_paths():
                inode = file_id(path)
                if inode is None or (client.name, inode, -1) in self._attachments:
                    continue
                try:
                    elf = self._elf(inode, path)
                    plans = self._plan(client, elf)
                    links = self._links(plans, path, -1)
                except ProbewireError as exc:
                    self._failed_files[(client.name, inode)] = (path, str(exc))
                    self.errors[(client.name, "attach_failed")] += 1
                    log.warning("%s: %s unavailable for %s: %s", self.name, client.name, path,
                                exc)
                    continue
                self._attachments[(client.name, inode, -1)] = _Attachment(
                    client.name, inode, -1, path, links, static=True)
                log.info("%s: %s attached to %s", self.name, client.name, path)

    def _inodes_of(self, pid: int) -> set[tuple[int, int]]:
        out = set()
        for path in read_maps(pid, self.proc):
            inode = file_id(path)
            if inode is not None:
                out.add(inode)
        return out
