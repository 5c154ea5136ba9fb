"""pid -> process -> container/systemd unit -> service name.

Kernel records carry a pid (the tgid); labels must carry a bounded, stable service name instead.
Everything here reads /proc, which can vanish under us at any moment: a process that exits
mid-read is reported as gone (``None``), never as an exception.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client.core import Metric

from probewire.config import Config, ServiceRule
from probewire.enrich.identity import LabelExpander, resource_attributes, service_key
from probewire.enrich.kubernetes import PodIdentity
from probewire.enrich.workload import Workload, WorkloadResolver

__all__ = [
    "UNKNOWN_SERVICE",
    "ProcessInfo",
    "ServiceResolver",
    "container_id_from_cgroup",
    "interpreter_target",
    "kubernetes_service_name",
    "pod_uid_from_cgroup",
    "read_process",
    "service_name",
    "systemd_unit_from_cgroup",
]

UNKNOWN_SERVICE = "unknown"

# A container runtime names the cgroup of a container after its 64-hex id: cgroupfs drivers use
# the bare id as a directory (/docker/<id>, /kubepods/burstable/pod<uid>/<id>), systemd drivers
# wrap it in a scope (docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope). "crio-conmon-"/"libpod-conmon-" scopes hold the monitor process, not the
# container, so the prefix list deliberately stops at the runtime name.
_CONTAINER_COMPONENT = re.compile(
    r"^(?:(?:docker|cri-containerd|containerd|crio|libpod)-)?([0-9a-f]{64})(?:\.scope)?$"
)
_POD_COMPONENT = re.compile(
    r"^(?:kubepods-(?:besteffort-|burstable-|guaranteed-)?)?pod"
    r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$"
)
# Units that say who started a process, not what it is: a user's systemd manager, and the names
# systemd-run makes up for transient units (run-u123.service, run-r<hex>.service).
_GENERIC_UNIT = re.compile(r"^(?:user@\d+|user-runtime-dir@\d+|run-[ur][0-9a-f]+)\.service$")
_DELETED_SUFFIX = " (deleted)"
_EXEC_RETRIES = 5
_EXEC_RETRY_S = 0.001


# slots: the resolver caches up to 65536 of these; a __dict__ each cost ~130 bytes more.
@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What /proc says about one process at one moment."""

    pid: int
    ppid: int
    comm: str
    exe: str  # "" when unreadable (kernel thread, or another user's process without root)
    cmdline: tuple[str, ...]
    cgroup: str  # cgroup v2 path relative to the cgroup root, e.g. /system.slice/nginx.service
    container_id: str | None
    systemd_unit: str | None
    start_time_ticks: int  # field 22 of /proc/PID/stat: tells a reused pid from the original


def _components(cgroup_path: str) -> list[str]:
    return [part for part in cgroup_path.split("/") if part]


def container_id_from_cgroup(cgroup_path: str) -> str | None:
    """The innermost container id in a cgroup path, or None outside containers."""
    # Innermost wins: with kind or docker-in-docker the outer scope is the node container.
    for part in reversed(_components(cgroup_path)):
        match = _CONTAINER_COMPONENT.match(part)
        if match:
            return match.group(1)
    return None


def pod_uid_from_cgroup(cgroup_path: str) -> str | None:
    """The Kubernetes pod uid in a kubepods cgroup path (dashes restored), or None."""
    for part in reversed(_components(cgroup_path)):
        match = _POD_COMPONENT.match(part)
        if match:
            # The systemd cgroup driver escapes "-" in the uid as "_".
            return match.group(1).replace("_", "-")
    return None


def systemd_unit_from_cgroup(cgroup_path: str) -> str | None:
    """The most specific ``*.service`` unit in a cgroup path, ignoring generic ones."""
    parts = _components(cgroup_path)
    # A .service above a container scope is the runtime's or the host's unit, not the
    # container's; only units nested inside the container (systemd in a container) count.
    for index in range(len(parts) - 1, -1, -1):
        if _CONTAINER_COMPONENT.match(parts[index]):
            parts = parts[index + 1 :]
            break
    for part in reversed(parts):
        if part.endswith(".service") and len(part) > len(".service"):
            if _GENERIC_UNIT.match(part):
                continue
            return part
    return None


def _read_stat(stat_path: Path) -> tuple[str, int, int] | None:
    """(comm, ppid, start_time_ticks) from /proc/PID/stat, or None if gone or unparsable."""
    try:
        raw = stat_path.read_bytes()
    except OSError:  # ENOENT/ESRCH: exited; anything else: not ours to explain here
        return None
    # comm sits in parentheses and may itself contain spaces and ")"; the kernel never puts
    # ")" after it, so the last ")" ends it.
    open_at = raw.find(b"(")
    close_at = raw.rfind(b")")
    if open_at < 0 or close_at < open_at:
        return None
    comm = raw[open_at + 1 : close_at].decode("utf-8", errors="replace")
    fields = raw[close_at + 1 :].split()
    # fields[0] is field 3 (state), so field N of proc(5) is fields[N - 3].
    try:
        return comm, int(fields[4 - 3]), int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def _cgroup_v2_path(text: str) -> str:
    v1_systemd = ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            v1_systemd = path
    # Hosts still on cgroup v1 have no "0::" line; the name=systemd hierarchy carries the
    # same unit/container layout, so it is the best stand-in.
    return v1_systemd


def read_process(pid: int, proc: Path = Path("/proc")) -> ProcessInfo | None:
    """Read one process from ``proc``; None if it does not exist (or exited while we read)."""
    if pid <= 0:
        return None
    base = proc / str(pid)
    first = _read_stat(base / "stat")
    if first is None:
        return None
    comm, ppid, start_time_ticks = first
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        # ENOENT: kernel thread or zombie (a vanished process is caught by the second stat);
        # EACCES: another user's process without CAP_SYS_PTRACE.
        exe = ""
    exe = exe.removesuffix(_DELETED_SUFFIX)  # a binary replaced by an upgrade keeps its name
    try:
        cmdline_raw = (base / "cmdline").read_bytes()
        # exec(2) switches comm and exe before it lays out the new argv, so a process caught
        # mid-exec has an exe but no cmdline yet; the window is microseconds, so wait it out
        # rather than name (and cache) e.g. "python3" for what is about to be "http.server".
        for _ in range(_EXEC_RETRIES):
            if cmdline_raw or not exe:
                break
            time.sleep(_EXEC_RETRY_S)
            cmdline_raw = (base / "cmdline").read_bytes()
        cgroup_text = (base / "cgroup").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        cmdline_raw, cgroup_text = b"", ""

    # The pid may have exited and been reused while we read; the second stat must agree.
    second = _read_stat(base / "stat")
    if second is None or second[2] != start_time_ticks:
        return None

    args = cmdline_raw.split(b"\0")
    if args and args[-1] == b"":
        args.pop()
    cmdline = tuple(arg.decode("utf-8", errors="replace") for arg in args)
    cgroup = _cgroup_v2_path(cgroup_text)
    return ProcessInfo(
        pid=pid,
        ppid=ppid,
        comm=second[0] or comm,  # an exec between the reads renames; the later comm is current
        exe=exe,
        cmdline=cmdline,
        cgroup=cgroup,
        container_id=container_id_from_cgroup(cgroup),
        systemd_unit=systemd_unit_from_cgroup(cgroup),
        start_time_ticks=start_time_ticks,
    )


# --- naming ------------------------------------------------------------------------------------

_PYTHON = re.compile(r"^(?:python|pypy)[0-9.]*[dmu]?$")
_NODE = re.compile(r"^(?:node|nodejs)$")
_JAVA = re.compile(r"^java$")
_RUBY = re.compile(r"^ruby[0-9.]*$")
_PERL = re.compile(r"^perl[0-9.]*$")
_PHP = re.compile(r"^php[0-9.]*$")
_SHELL = re.compile(r"^(?:bash|sh|dash|zsh|ksh)$")

# Interpreter options that consume the next argument; without them "-X dev app.py" would name
# the service "dev".
_PYTHON_ARG_OPTS = frozenset({"-W", "-X", "-Q", "--check-hash-based-pycs"})
_NODE_ARG_OPTS = frozenset(
    {"-r", "--require", "--import", "--loader", "--experimental-loader", "--conditions", "-C"}
)
_NODE_INLINE_OPTS = frozenset({"-e", "--eval", "-p", "--print", "-i", "--interactive"})
_JAVA_ARG_OPTS = frozenset(
    {
        "-cp",
        "-classpath",
        "--class-path",
        "-p",
        "--module-path",
        "--upgrade-module-path",
        "--add-modules",
        "--add-opens",
        "--add-exports",
        "--add-reads",
        "--patch-module",
        "--limit-modules",
        "--enable-native-access",
    }
)
_RUBY_ARG_OPTS = frozenset({"-I", "-r", "-C", "-E", "-x"})
_PHP_ARG_OPTS = frozenset({"-c", "-d", "-z", "-t"})
_SHELL_ARG_OPTS = frozenset({"-o", "+o", "-O", "+O"})
_JAR_VERSION = re.compile(r"-\d+(?:\.\d+)*(?:[-.][A-Za-z0-9]+)*$")


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _script_name(path: str, suffixes: tuple[str, ...], generic_stems: frozenset[str]) -> str | None:
    """``/srv/app.py`` -> ``app``; ``/srv/shop/__main__.py`` -> ``shop`` (the stem says nothing)."""
    clean = path.rstrip("/")
    base = _basename(clean)
    for suffix in suffixes:
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    if base in generic_stems:
        parent = _basename(clean[: -len(_basename(clean))]) if "/" in clean else ""
        return parent or base
    return base or None


def _first_positional(args: Sequence[str], arg_opts: frozenset[str]) -> int | None:
    """Index of the first non-option argument, skipping options and their arguments."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            return index + 1 if index + 1 < len(args) else None
        if arg in arg_opts:
            index += 2
            continue
        if arg.startswith("-") and arg != "-":
            index += 1
            continue
        return index
    return None


def _python_target(args: Sequence[str]) -> str | None:
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-m":
            return args[index + 1] if index + 1 < len(args) else None
        if arg.startswith("-m") and not arg.startswith("--"):
            return arg[2:] or None  # "-mhttp.server"
        if arg == "-c" or (arg.startswith("-c") and not arg.startswith("--")):
            return None  # inline code: nothing to name it after
        if arg in _PYTHON_ARG_OPTS:
            index += 2
            continue
        if arg.startswith("-") and arg != "-":
            # Bundled short flags such as "-Bu" are self-contained; "-Wd" carries its value.
            index += 1
            continue
        if arg == "-":
            return None
        return _script_name(arg, (".pyz", ".pyw", ".py"), frozenset({"__main__"}))
    return None


def _node_target(args: Sequence[str]) -> str | None:
    if any(arg in _NODE_INLINE_OPTS for arg in args):
        return None
    index = _first_positional(args, _NODE_ARG_OPTS)
    if index is None or args[index] == "-":
        return None
    return _script_name(args[index], (".mjs", ".cjs", ".js", ".ts"), frozenset({"index"}))


def _java_target(args: Sequence[str]) -> str | None:
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-jar":
            if index + 1 >= len(args):
                return None
            jar = _script_name(args[index + 1], (".jar", ".war"), frozenset())
            # orders-1.4.2.jar and orders-1.4.3.jar are one service across a deploy.
            return _JAR_VERSION.sub("", jar) if jar else None
        if arg in ("-m", "--module"):
            if index + 1 >= len(args):
                return None
            return args[index + 1].split("/", 1)[0] or None
        if arg in _JAVA_ARG_OPTS:
            index += 2
            continue
        if arg.startswith(("-", "@")):
            index += 1
            continue
        return arg.rsplit(".", 1)[-1] or None  # main class: com.example.OrdersApp -> OrdersApp
    return None


def _generic_target(
    args: Sequence[str],
    arg_opts: frozenset[str],
    inline_opts: frozenset[str],
    suffixes: tuple[str, ...],
) -> str | None:
    for arg in args:
        if arg in inline_opts:
            return None
        if not arg.startswith(("-", "+")):
            break
    index = _first_positional(args, arg_opts)
    if index is None or args[index] == "-":
        return None
    return _script_name(args[index], suffixes, frozenset())


def interpreter_target(cmdline: Sequence[str], exe: str = "") -> str | None:
    """The script or module an interpreter runs, or None if this is not an interpreter.

    ``python3 -m http.server`` -> ``http.server``; ``python3 /x/app.py`` -> ``app``;
    ``java -jar /x/orders.jar`` -> ``orders``; ``node /srv/api/index.js`` -> ``api``.
    """
    if not cmdline:
        return None
    names = {_basename(cmdline[0]), _basename(exe)}
    args = cmdline[1:]
    if any(_PYTHON.match(name) for name in names):
        return _python_target(args)
    if any(_NODE.match(name) for name in names):
        return _node_target(args)
    if any(_JAVA.match(name) for name in names):
        return _java_target(args)
    if any(_RUBY.match(name) for name in names):
        return _generic_target(args, _RUBY_ARG_OPTS, frozenset({"-e"}), (".rb",))
    if any(_PERL.match(name) for name in names):
        return _generic_target(args, frozenset({"-I", "-M"}), frozenset({"-e", "-E"}), (".pl",))
    if any(_PHP.match(name) for name in names):
        if "-f" in args[:-1]:
            return _script_name(args[args.index("-f") + 1], (".php",), frozenset({"index"}))
        return _generic_target(args, _PHP_ARG_OPTS, frozenset({"-r", "-S"}), (".php",))
    if any(_SHELL.match(name) for name in names):
        return _generic_target(args, _SHELL_ARG_OPTS, frozenset({"-c"}), (".sh", ".bash"))
    return None


@dataclass(frozen=True)
class _CompiledRule:
    name: str
    exe: str | None
    comm: str | None
    cmdline: re.Pattern[str] | None
    cgroup: re.Pattern[str] | None
    port: int | None = None

    @classmethod
    def of(cls, rule: ServiceRule) -> _CompiledRule:
        return cls(
            name=rule.name,
            exe=rule.exe,
            comm=rule.comm,
            cmdline=re.compile(rule.cmdline) if rule.cmdline is not None else None,
            cgroup=re.compile(rule.cgroup) if rule.cgroup is not None else None,
            port=rule.port,
        )

    def matches(self, info: ProcessInfo, port: int | None = None) -> bool:
        # A port rule names only what happens on that port; a pid alone never matches it.
        if self.port is not None and self.port != port:
            return False
        if self.exe is not None and not (info.exe and fnmatch.fnmatchcase(info.exe, self.exe)):
            return False
        if self.comm is not None and info.comm != self.comm:
            return False
        if self.cmdline is not None and not self.cmdline.search(" ".join(info.cmdline)):
            return False
        return self.cgroup is None or bool(self.cgroup.search(info.cgroup))


# The kernel keeps a command's first 15 bytes as its comm.
_COMM_LEN = 15


def _program_name(info: ProcessInfo) -> str:
    """The executable's name, or the name it was started under when that is another: a
    multi-call binary started through a symlink (Debian's redis-server is a link to
    redis-check-rdb, busybox's applets) is named as it was called. exec(2) sets comm from the
    path it was given, so a comm that is not the start of the executable's name, and that the
    command line starts with, is the called name."""
    exe = _basename(info.exe)
    comm = info.comm
    if not exe or not comm or exe.startswith(comm):
        return exe
    called = _basename(info.cmdline[0]).split(" ")[0] if info.cmdline else ""
    if not called.startswith(comm):
        return exe  # comm renamed by the program itself (prctl): keep the executable's name
    return comm if len(comm) < _COMM_LEN else called


def _rule_name(info: ProcessInfo, rules: Sequence[_CompiledRule]) -> str | None:
    for rule in rules:
        if rule.matches(info):
            return rule.name
    return None


def _process_name(info: ProcessInfo) -> str:
    """Today's rules: systemd unit, interpreter script, exe, comm, ``unknown``."""
    candidates = (
        info.systemd_unit.removesuffix(".service") if info.systemd_unit else None,
        interpreter_target(info.cmdline, info.exe),
        _program_name(info),
        info.comm,
    )
    # A blank name (exe "/", a comm of spaces) would make an empty label; fall through instead.
    return next((name for name in candidates if name and name.strip()), UNKNOWN_SERVICE)


def _name(info: ProcessInfo, rules: Sequence[_CompiledRule]) -> str:
    return _rule_name(info, rules) or _process_name(info)


def kubernetes_service_name(pod: PodIdentity | None, container_name: str = "") -> str | None:
    """The default name of a container's service: the pod's ``app.kubernetes.io/name`` label,
    else its workload, else the container name; None when there is none of them."""
    if pod is not None:
        label = pod.labels.get("app.kubernetes.io/name")
        if label:
            return label
        if pod.workload_name:
            return pod.workload_name
        if pod.container:
            return pod.container
    return container_name or None


def _key(info: ProcessInfo, rules: Sequence[_CompiledRule], workload: Workload | None,
         pod_label: bool) -> str:
    """The service key of a process (enrich/identity.py): config rules, then the Kubernetes
    or container name, then today's rules; with the pod's namespace and workload."""
    pod = workload.pod if workload is not None else None
    name = (_rule_name(info, rules)
            or (kubernetes_service_name(pod, workload.container.name) if workload else None)
            or _process_name(info))
    if pod is None:
        return name
    return service_key(name, pod.namespace, pod.workload_kind, pod.workload_name,
                       pod.pod if pod_label else "")


def service_name(info: ProcessInfo, rules: Sequence[ServiceRule] = ()) -> str:
    """Name a process: config rules, systemd unit, interpreter script, exe (as called), comm,
    ``unknown``."""
    return _name(info, [_CompiledRule.of(rule) for rule in rules])


@dataclass(slots=True)
class _Entry:
    info: ProcessInfo
    name: str
    checked_at: float = 0.0  # time.monotonic() of the last /proc revalidation


# A cached name is revalidated against /proc at most this often: the hot path asks for the
# same few pids hundreds of times a second, and exec renames arrive as forget() from events.
REVALIDATE_S = 1.0


class ServiceResolver:
    """Cached pid -> service name, safe for one writer and concurrent scrape readers.

    A cached entry is revalidated on every lookup with one read of /proc/PID/stat: a different
    start time means the pid was reused, a different comm means the process exec'd. A process
    that has exited keeps its last name until :meth:`forget`, because its final events are
    still in flight when it is gone from /proc.
    """

    def __init__(
        self,
        rules: Sequence[ServiceRule] = (),
        proc: Path = Path("/proc"),
        max_entries: int = 65536,
        revalidate_s: float = REVALIDATE_S,
        workloads: WorkloadResolver | None = None,
        pod_label: bool = False,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._rules = tuple(_CompiledRule.of(rule) for rule in rules)
        self.workloads = workloads
        self.pod_label = pod_label
        self._rules_changed = False
        if workloads is not None:
            workloads.listeners.append(self.refresh)
        self.expander = LabelExpander(self.peer_key)
        self._proc = proc
        self._max_entries = max_entries
        self._revalidate_s = revalidate_s
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Moves whenever a cached name may have changed: a pid named anew (first lookup, pid
        reuse, exec), remembered, forgotten or evicted. See :meth:`name_until`."""
        return self._generation

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def _lookup(self, pid: int) -> _Entry | None:
        if pid <= 0:
            return None
        with self._lock:
            cached = self._cache.get(pid)
        if cached is not None:
            now = time.monotonic()
            if now - cached.checked_at < self._revalidate_s:
                with self._lock:
                    if pid in self._cache:
                        self._cache.move_to_end(pid)
                return cached
            current = _read_stat(self._proc / str(pid) / "stat")
            if current is None:
                return cached  # exited: the last known identity is still the right one
            if current[2] == cached.info.start_time_ticks and current[0] == cached.info.comm:
                cached.checked_at = now
                with self._lock:
                    if pid in self._cache:
                        self._cache.move_to_end(pid)
                return cached
        # Read /proc outside the lock so a slow read never stalls a concurrent scrape.
        info = read_process(pid, self._proc)
        if info is None:
            return None
        entry = _Entry(info=info, name=self._key(info), checked_at=time.monotonic())
        self._store(pid, entry)
        return entry

    def _store(self, pid: int, entry: _Entry) -> None:
        """Cache `entry` as the newest, evicting the oldest past max_entries."""
        with self._lock:
            self._cache[pid] = entry
            self._cache.move_to_end(pid)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
            self._generation += 1

    def name_for(self, pid: int) -> str:
        """The service name of ``pid`` (a tgid); ``unknown`` for pid 0 or a vanished process."""
        entry = self._lookup(pid)
        return entry.name if entry is not None else UNKNOWN_SERVICE

    def info_for(self, pid: int) -> ProcessInfo | None:
        """The process behind ``pid``, the last known one if it has exited, else None."""
        entry = self._lookup(pid)
        return entry.info if entry is not None else None

    def remember(self, info: ProcessInfo) -> str:
        """Name a process from what an event carried, for one already gone from /proc."""
        entry = _Entry(info=info, name=self._key(info))
        self._store(info.pid, entry)
        return entry.name

    def inherit(self, pid: int, ppid: int, start_time_ticks: int) -> None:
        """A fork: the child runs its parent's image, so it has the parent's name until it
        execs. Named now, while the parent is in /proc: a forked worker that never execs (a
        PostgreSQL backend) may be gone by the time its last events are handled."""
        parent = self._lookup(ppid)
        if parent is None or pid <= 0:
            return
        info = replace(parent.info, pid=pid, ppid=ppid,
                       start_time_ticks=start_time_ticks)
        # Never checked: a lookup while the child lives asks /proc (it may have exec'd).
        entry = _Entry(info=info, name=parent.name, checked_at=0.0)
        self._store(pid, entry)

    def forget(self, pid: int) -> None:
        """Drop ``pid`` from the cache; call on process exit (and exec, to rename at once)."""
        with self._lock:
            if self._cache.pop(pid, None) is not None:
                self._generation += 1

    def name_for_port(self, pid: int, port: int) -> str:
        """Name the server side of a connection on local `port`: port rules first."""
        info = self.info_for(pid)
        for rule in self._rules:
            if rule.port == port and (
                (rule.exe, rule.comm, rule.cmdline, rule.cgroup) == (None,) * 4
                or (info is not None and rule.matches(info, port))
            ):
                if info is None:
                    return rule.name
                workload = self._workload(info)
                pod = workload.pod if workload is not None else None
                return rule.name if pod is None else service_key(
                    rule.name, pod.namespace, pod.workload_kind, pod.workload_name,
                    pod.pod if self.pod_label else "")
        return self.name_for(pid)

    def name_until(self, pid: int, port: int = 0) -> tuple[str, float]:
        """``name_for_port(pid, port)`` (``name_for(pid)`` for port 0), and the time.monotonic()
        until which asking again gives the same answer without reading /proc, provided
        :attr:`generation` has not moved meanwhile; 0.0 when the answer is not cached (an
        unknown pid is looked for in /proc on every call).

        Lets a batch consumer keep names per (pid, port) and ask only when one may be stale.
        """
        name = self.name_for_port(pid, port) if port else self.name_for(pid)
        with self._lock:
            entry = self._cache.get(pid)
        return name, (entry.checked_at + self._revalidate_s if entry is not None else 0.0)

    def names_for(self, pids: Iterable[int]) -> dict[int, str]:
        """Service names for many pids (each looked up once)."""
        return {pid: self.name_for(pid) for pid in dict.fromkeys(pids)}

    # --- containers and Kubernetes (issue 17) ------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> ServiceResolver:
        """The agent's resolver: rules, and container/Kubernetes identity as configured."""
        workloads = WorkloadResolver(config.containers, config.kubernetes)
        return cls(config.services.rules, workloads=workloads,
                   pod_label=config.kubernetes.pod_label)

    def _workload(self, info: ProcessInfo) -> Workload | None:
        if self.workloads is None or not info.cgroup:
            return None
        return self.workloads.for_cgroup(info.cgroup)

    def _key(self, info: ProcessInfo) -> str:
        return _key(info, self._rules, self._workload(info), self.pod_label)

    def start(self) -> None:
        """Start the Kubernetes watches (if configured); names learnt later rename processes."""
        if self.workloads is not None:
            self.workloads.start()

    def close(self) -> None:
        if self.workloads is not None:
            self.workloads.stop()

    def reconfigure(self, config: Config) -> None:
        """New rules and naming settings: every cached process is named again."""
        self._rules = tuple(_CompiledRule.of(rule) for rule in config.services.rules)
        self.pod_label = config.kubernetes.pod_label
        if self.workloads is not None:
            self.workloads.reconfigure(config.containers)
        self._rules_changed = True
        try:
            self.refresh()
        finally:
            self._rules_changed = False

    def refresh(self) -> None:
        """Name every cached process again (pods changed, rules changed); families that keep
        names see :attr:`generation` move when any name changed."""
        with self._lock:
            entries = list(self._cache.values())
        changed = False
        for entry in entries:
            if entry.info.container_id is None and not self._rules_changed:
                continue
            key = self._key(entry.info)
            if key != entry.name:
                entry.name = key
                changed = True
        if changed:
            with self._lock:
                self._generation += 1

    def workload_of(self, pid: int) -> Workload | None:
        info = self.info_for(pid)
        return self._workload(info) if info is not None else None

    def resource_attributes(self, pid: int, key: str) -> dict[str, str]:
        """OTLP resource attributes of a span's process: its service key's, plus the pod,
        container and (from the API) pod uid."""
        attrs = resource_attributes(key)
        workload = self.workload_of(pid)
        if workload is not None:
            if workload.container.name:
                attrs["container.name"] = workload.container.name
            attrs["container.id"] = workload.container.id
            if workload.container.runtime:
                attrs["container.runtime"] = workload.container.runtime
            pod = workload.pod
            if pod is not None:
                attrs["k8s.pod.name"] = pod.pod
                if pod.uid:
                    attrs["k8s.pod.uid"] = pod.uid
                if pod.container:
                    attrs["k8s.container.name"] = pod.container
                if self.workloads is not None and self.workloads.kube is not None:
                    attrs["k8s.node.name"] = self.workloads.kube.node_name
        return attrs

    def peer_key(self, ip: str) -> str | None:
        """The service key of the pod or Service at a peer address, when known."""
        if self.workloads is None:
            return None
        meta = self.workloads.pod_by_ip(ip)
        if meta is not None:
            pod = meta.identity()
            name = kubernetes_service_name(pod) or meta.name
            return service_key(name, pod.namespace, pod.workload_kind, pod.workload_name,
                               pod.pod if self.pod_label else "")
        svc = self.workloads.service_by_ip(ip)
        if svc is not None:
            namespace, name = svc
            return service_key(name, namespace)
        return None

    def expand(self, families: Iterable[Metric]) -> Iterator[Metric]:
        """Families with service keys expanded into labels (export/prometheus.py calls this)."""
        return self.expander.families(families)
