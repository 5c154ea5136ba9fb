"""saturation family: how long work waits for a CPU, a disk or an accept(), and who runs out of
memory; the fourth golden signal next to the HTTP RED metrics.

Kernel side: bpf/saturation.bpf.c counts into kernel maps keyed by process (sched), process x
device x operation (block) and network namespace x listening port (listen queues); this module
reads them at scrape time and folds processes into services. OOM kills are rare and come as
ring records (the victim is gone by the next scrape). Each signal has its own config switch
(`probes.saturation.*`); a switched-off signal's hooks are not attached.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from probewire.aggregate.histogram import Log2Buckets
from probewire.config import SaturationConfig
from probewire.errors import ProbewireError
from probewire.probes.base import Hook, Probe, ProbeContext
from probewire.probes.tcp import listening_sockets
from probewire.runtime import _libbpf
from probewire.runtime.bpf import BpfObject, possible_cpus
from probewire.runtime.features import (
    FEATURE_SINCE,
    SATURATION_OPTIONAL,
    HookSupport,
    hook_type_of,
    kernel_enumerators,
    probe_kernel_features,
)

log = logging.getLogger(__name__)

LOG2_SLOTS = 32
US = 1e-6
NS = 1e-9
KERNEL_SERVICE = "kernel"  # owner of kernel threads' work (SAT_KERNEL_TGID in saturation.h)
OOM_PATH_DEPTH = 8
OOM_NAME_LEN = 72
RECENT_OOM_KILLS = 256
# Kernel memory the per-CPU stats maps may take at most; entries are scaled down on big machines.
PERCPU_MAP_BUDGET_BYTES = 32 << 20
OOM_RING_BYTES = 1 << 16
# SO_NETNS_COOKIE (Linux 5.14): the cookie the kernel side keys network namespaces by.
SO_NETNS_COOKIE = 71

SCHED_STATS = np.dtype(
    [("cpu_ns", np.uint64), ("runq_ns", np.uint64), ("runq_waits", np.uint64),
     ("io_ns", np.uint64), ("blocked_ns", np.uint64),
     ("runq_us_slots", np.uint64, (LOG2_SLOTS,))]
)
SCHED_TASK = np.dtype(
    [("queued_ns", np.uint64), ("slept_ns", np.uint64), ("last_sum_exec_ns", np.uint64),
     ("pending_runq_ns", np.uint64), ("pending_io_ns", np.uint64),
     ("pending_blocked_ns", np.uint64), ("pending_runq", np.uint8), ("slept_io", np.uint8),
     ("has_sum", np.uint8), ("_pad", np.uint8, (5,))]
)
BLOCK_REQ_KEY = np.dtype(
    [("id", np.uint64), ("dev", np.uint32), ("op", np.uint8), ("_pad", np.uint8, (3,))]
)
BLOCK_REQ = np.dtype(
    [("issue_ns", np.uint64), ("tgid", np.uint32), ("bytes", np.uint32), ("op", np.uint8),
     ("_pad", np.uint8, (7,))]
)
BLOCK_KEY = np.dtype(
    [("tgid", np.uint32), ("dev", np.uint32), ("op", np.uint8), ("_pad", np.uint8, (7,))]
)
BLOCK_STATS = np.dtype(
    [("ios", np.uint64), ("bytes", np.uint64), ("ns_sum", np.uint64),
     ("us_slots", np.uint64, (LOG2_SLOTS,))]
)
LISTEN_KEY = np.dtype([("netns", np.uint64), ("port", np.uint16), ("_pad", np.uint8, (6,))])
LISTEN_OWNER = np.dtype([("tgid", np.uint32)])
LISTEN_STATS = np.dtype(
    [("overflows", np.uint64), ("drops", np.uint64), ("tgid", np.uint32), ("_pad", np.uint32)]
)
LISTEN_MIB = np.dtype([("overflows", np.uint64), ("drops", np.uint64)])
OOM_EVENT = np.dtype(
    [("kind", np.uint32), ("victim_pid", np.uint32), ("victim_tgid", np.uint32),
     ("trigger_tgid", np.uint32), ("timestamp_ns", np.uint64), ("cgroup_id", np.uint64),
     ("depth", np.uint32), ("_pad", np.uint32), ("comm", "S16"),
     ("path", f"S{OOM_NAME_LEN}", (OOM_PATH_DEPTH,))]
)

_SCHED_SCALARS = ("cpu_ns", "runq_ns", "runq_waits", "io_ns", "blocked_ns")
OPERATIONS = ("read", "write", "flush", "discard", "other")  # BLOCK_OP_* in saturation.h
WAIT_REASONS = ("runqueue", "io", "uninterruptible")

SCHED_LABELS = ("service_name",)
BLOCK_LABELS = ("service_name", "device", "operation")
LISTEN_LABELS = ("service_name", "server_port")
OOM_LABELS = ("service_name", "cgroup")

# Hooks of each signal (the config switch under probes.saturation of the same name).
SIGNAL_HOOKS: dict[str, tuple[str, ...]] = {
    "runqueue": ("sched_switch", "sched_wakeup", "sched_wakeup_new"),
    "cpu": ("sched_switch",),
    "block": ("block_rq_insert", "block_rq_issue", "block_rq_complete"),
    "listen": ("consume_skb", "kfree_skb", "inet_sock_set_state"),
    "oom": ("mark_victim",),
}


# Programs with a twin (<name>_bounded) for kernels without bpf_loop (5.17) or
# bpf_map_lookup_percpu_elem (5.19): the listen baselines by a bounded loop, in a hash by CPU.
BOUNDED_TWINS = frozenset({"consume_skb_btf", "consume_skb_tp", "kfree_skb_btf", "kfree_skb_tp",
                           "listen_state_btf", "listen_state_tp"})
# Run once on each CPU after load in the bounded variant: records the CPU's per-CPU offset.
RECORD_CPU_OFFSET = "record_cpu_offset"
# Namespaces the bounded variant keeps baselines for (a mark and one entry per CPU each).
BOUNDED_NAMESPACES = 1024
# Hooks whose programs read the current task (the issuer of a block request, the OOM killer's
# task), by probe reads where the kernel lacks bpf_get_current_task_btf.
CURRENT_TASK_HOOKS = frozenset({"block_rq_issue", "block_rq_complete", "mark_victim"})


def kernel_dev(dev: int) -> tuple[int, int]:
    """The kernel's dev_t (MKDEV: major << 20 | minor) -> (major, minor)."""
    return dev >> 20, dev & ((1 << 20) - 1)


def device_name(dev: int, sys_dev_block: Path = Path("/sys/dev/block")) -> str:
    """`loop3`, `sda`, `nvme0n1` for a kernel dev_t; `major:minor` if sysfs does not say."""
    major, minor = kernel_dev(dev)
    try:
        uevent = (sys_dev_block / f"{major}:{minor}" / "uevent").read_text()
    except OSError:
        return f"{major}:{minor}"
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return line[len("DEVNAME="):] or f"{major}:{minor}"
    return f"{major}:{minor}"


def cgroup_path(components: Iterable[bytes], depth: int) -> str:
    """The OOM record's leaf-first path components -> "/a/b/c" ("/" for the whole machine); a
    path deeper than the record holds starts with "…"."""
    names = [c.split(b"\0", 1)[0].decode(errors="replace") for c in components][:depth]
    if not names:
        return "/"
    prefix = "…" if depth >= OOM_PATH_DEPTH and names[-1] else ""
    return prefix + "/" + "/".join(reversed(names))


def netns_cookie() -> int:
    """The cookie of this process's network namespace (what the kernel side keys by); before
    5.14 (no SO_NETNS_COOKIE, see netns_key in saturation.bpf.c) its inode number."""
    try:
        with socket.socket() as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        return os.stat("/proc/self/ns/net").st_ino
    return int.from_bytes(raw, "little")


def kallsyms_range(symbol: str, kallsyms: Path = Path("/proc/kallsyms")) -> tuple[int, int]:
    """[start, end) of a kernel function: its address and the next higher symbol's. (0, 0) if
    it is absent or hidden (kptr_restrict shows zeros to a reader without CAP_SYSLOG)."""
    start = 0
    try:
        with kallsyms.open() as f:
            addresses = []
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                address = int(parts[0], 16)
                addresses.append(address)
                if parts[2] == symbol:
                    start = address
    except (OSError, ValueError):
        return 0, 0
    if not start:
        return 0, 0
    end = min((a for a in addresses if a > start), default=0)
    return (start, end) if end else (0, 0)


@dataclass(frozen=True)
class OomKill:
    """A decoded OOM record, as the JSON API shows it."""

    timestamp_ns: int
    pid: int
    comm: str
    service_name: str
    cgroup: str  # the memory cgroup that hit its limit; "/" for a machine-wide OOM
    cgroup_id: int
    trigger_pid: int


class _Folded:
    """Kernel entries -> totals per label set that never go down.

    Kernel keys come and go (LRU eviction, exited processes): each key keeps the labels of its
    first sight, and a key gone from the map adds its last totals to its label set's retired
    part.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._labels_of: dict[bytes, tuple[str, ...]] = {}
        self._last: dict[bytes, np.ndarray] = {}
        self._retired: dict[tuple[str, ...], np.ndarray] = {}

    def update(self, keys: np.ndarray, totals: np.ndarray,
               label: Callable[[np.void], tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
        seen: dict[bytes, np.ndarray] = {}
        for i in range(len(keys)):
            raw = keys[i].tobytes()
            seen[raw] = totals[i]
            if raw not in self._labels_of:
                self._labels_of[raw] = label(keys[i])
        for raw in set(self._last) - set(seen):
            labels = self._labels_of.pop(raw)
            retired = self._retired.setdefault(labels, np.zeros(self.width))
            retired += self._last[raw]
        self._last = seen
        out: dict[tuple[str, ...], np.ndarray] = {
            labels: retired.copy() for labels, retired in self._retired.items()
        }
        for raw, row in seen.items():
            labels = self._labels_of[raw]
            if labels in out:
                out[labels] += row
            else:
                out[labels] = row.astype(np.float64)
        return out


@dataclass
class SaturationTotals:
    """One reading of every signal, by label set (the tuples of *_LABELS)."""

    # service -> [cpu_ns, runq_ns, runq_waits, io_ns, blocked_ns, slots...]
    sched: dict[tuple[str, ...], np.ndarray]
    # (service, device, operation) -> [ios, bytes, ns_sum, slots...]
    block: dict[tuple[str, ...], np.ndarray]
    # (service, port) -> [overflows, drops]
    listen: dict[tuple[str, ...], np.ndarray]
    # (service, cgroup) -> kills
    oom: dict[tuple[str, str], int]


# The listen signal's counters in struct linux_mib, found by name (see read_mib).
LISTEN_MIB_FIELDS = ("LINUX_MIB_LISTENOVERFLOWS", "LINUX_MIB_LISTENDROPS")


class SaturationProbe(Probe):
    name = "saturation"
    object_name = "saturation"
    hooks = (
        Hook("sched_switch", ("sched_switch_btf", "sched_switch_tp")),
        Hook("sched_wakeup", ("sched_wakeup_btf", "sched_wakeup_tp")),
        Hook("sched_wakeup_new", ("sched_wakeup_new_btf", "sched_wakeup_new_tp")),
        Hook("block_rq_insert", ("block_rq_insert_btf", "block_rq_insert_tp")),
        Hook("block_rq_issue", ("block_rq_issue_btf", "block_rq_issue_tp")),
        Hook("block_rq_complete", ("block_rq_complete_btf", "block_rq_complete_tp")),
        Hook("consume_skb", ("consume_skb_btf", "consume_skb_tp")),
        Hook("kfree_skb", ("kfree_skb_btf", "kfree_skb_tp")),
        Hook("inet_sock_set_state", ("listen_state_btf", "listen_state_tp")),
        Hook("mark_victim", ("mark_victim_btf", "mark_victim_tp")),
    )
    structs: ClassVar[dict[str, np.dtype]] = {
        "sched_stats": SCHED_STATS,
        "sched_task": SCHED_TASK,
        "block_req_key": BLOCK_REQ_KEY,
        "block_req": BLOCK_REQ,
        "block_key": BLOCK_KEY,
        "block_stats": BLOCK_STATS,
        "listen_key": LISTEN_KEY,
        "listen_owner": LISTEN_OWNER,
        "listen_stats": LISTEN_STATS,
        "listen_mib": LISTEN_MIB,
        "oom_event": OOM_EVENT,
    }
    extra_rings: ClassVar[dict[str, np.dtype]] = {"oom_events": OOM_EVENT}
    # Tiny and verifiable everywhere; run (by test runs) only in the bounded variant.
    helper_programs = (RECORD_CPU_OFFSET,)

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.settings: SaturationConfig = ctx.config.probes.saturation
        on = {hook for signal, hooks in SIGNAL_HOOKS.items()
              if getattr(self.settings, signal) for hook in hooks}
        self._hooks = tuple(h for h in self.hooks if h.name in on)
        self._lock = threading.Lock()
        self._sched = _Folded(5 + LOG2_SLOTS)
        self._block = _Folded(3 + LOG2_SLOTS)
        self._listen = _Folded(2)
        self._oom: Counter[tuple[str, str]] = Counter()
        self.recent_oom_kills: deque[OomKill] = deque(maxlen=RECENT_OOM_KILLS)
        self._devices: dict[int, str] = {}
        self._buckets = Log2Buckets(LOG2_SLOTS, US)
        self._features: dict[str, HookSupport] | None = None

    # --- variants: what this kernel offers, and the stand-ins where it lacks something -------
    def kernel_features(self) -> dict[str, HookSupport]:
        """SATURATION_OPTIONAL on this kernel, probed once (at the first hook choice)."""
        if self._features is None:
            self._features = probe_kernel_features(SATURATION_OPTIONAL)
        return self._features

    def _lacking(self, *names: str) -> str:
        missing = [f"{n} ({FEATURE_SINCE[n]}+)" for n in names
                   if not self.kernel_features()[n].available]
        return "this kernel lacks " + " and ".join(missing) if missing else ""

    def bounded_reason(self) -> str:
        """Why the listen signal runs its bounded-loop variant here, or "" (bpf_loop's)."""
        lacking = self._lacking("bpf_loop", "percpu_lookup")
        return f"bounded-loop variant ({lacking})" if lacking else ""

    def active_hooks(self) -> tuple[Hook, ...]:
        if not self.settings.listen or not self.bounded_reason():
            return self._hooks
        return tuple(Hook(h.name, tuple(f"{p}_bounded" if p in BOUNDED_TWINS else p
                                        for p in h.programs)) for h in self._hooks)

    def program_note(self, program: str) -> str:
        hook = next((h.name for h in self.active_hooks() if program in h.programs), "")
        notes = []
        if program.endswith("_bounded"):
            notes.append(self.bounded_reason())
        if hook in CURRENT_TASK_HOOKS and (lacking := self._lacking("current_task_btf")):
            notes.append(f"current task by probe reads ({lacking})")
        if (hook in SIGNAL_HOOKS["runqueue"] and not program.endswith("_tp")
                and (lacking := self._lacking("task_storage"))):
            notes.append(f"thread state in a hash by thread id ({lacking})")
        return "; ".join(notes)

    # --- load ---------------------------------------------------------------------------------
    def _all_tp_btf(self, obj: BpfObject, hooks: Iterable[str]) -> bool:
        chosen = [p for h in self._hooks if h.name in hooks for p in h.programs
                  if obj.programs[p].autoload]
        return all(hook_type_of(obj.programs[p].section) == "tp_btf" for p in chosen)

    def before_load(self, obj: BpfObject) -> None:
        features = self.kernel_features()
        task_storage = (self._all_tp_btf(obj, SIGNAL_HOOKS["runqueue"])
                        and features["task_storage"].available)
        bounded = bool(self.settings.listen and self.bounded_reason())
        syn_code = kallsyms_range("tcp_rcv_state_process") if self.settings.listen else (0, 0)
        if self.settings.listen and not syn_code[0]:
            log.warning("tcp_rcv_state_process not in /proc/kallsyms: listen overflows of SYNs "
                        "are attributed at the listener's next dropped handshake ACK")
        # Index 0 (LINUX_MIB_NUM) is never counted: without the kernel's word, nothing is.
        mib = kernel_enumerators(LISTEN_MIB_FIELDS) if self.settings.listen else {}
        if self.settings.listen and len(mib) < len(LISTEN_MIB_FIELDS):
            log.warning("%s not in the kernel's BTF: listen queue overflows and drops are not "
                        "counted", " and ".join(sorted(set(LISTEN_MIB_FIELDS) - set(mib))))
        obj.set_rodata(
            mib_listen_overflows=mib.get("LINUX_MIB_LISTENOVERFLOWS", 0),
            mib_listen_drops=mib.get("LINUX_MIB_LISTENDROPS", 0),
            sched_cpu_on=int(self.settings.cpu),
            sched_runq_on=int(self.settings.runqueue),
            use_task_storage=int(task_storage),
            block_key_by_rq=int(self._all_tp_btf(obj, SIGNAL_HOOKS["block"])),
            tcp_rcv_state_process_start=syn_code[0],
            tcp_rcv_state_process_end=syn_code[1],
            nr_cpus=possible_cpus(),
            have_current_task_btf=int(features["current_task_btf"].available),
        )
        if task_storage:
            obj.maps["sched_threads"].set_max_entries(1)
        if not features["task_storage"].available:
            # Its type does not exist here (the verifier never sees its dead uses). Preallocated
            # (flags 0, not task storage's BPF_F_NO_PREALLOC): before 6.1 the verifier WARNs,
            # tainting the kernel, when a tracing program references a hash allocated at run time.
            obj.maps["sched_tasks"].set_type(_libbpf.BPF_MAP_TYPE_HASH, map_flags=0)
            obj.maps["sched_tasks"].set_max_entries(1)
        self._size_listen_baselines(obj, bounded)
        # Per-CPU values cost value size x CPUs per entry, preallocated (LRU).
        for name, dtype in (("sched_stats", SCHED_STATS), ("block_stats", BLOCK_STATS)):
            m = obj.maps[name]
            fit = PERCPU_MAP_BUDGET_BYTES // (dtype.itemsize * possible_cpus())
            m.set_max_entries(max(256, min(m.max_entries, fit)))
        obj.maps["oom_events"].set_max_entries(OOM_RING_BYTES)

    def _size_listen_baselines(self, obj: BpfObject, bounded: bool) -> None:
        """Only the variant's own baseline map takes memory."""
        if bounded:
            obj.maps["listen_base_cpus"].set_max_entries(
                BOUNDED_NAMESPACES * (possible_cpus() + 1))
            obj.maps["listen_base"].set_max_entries(1)
        else:
            obj.maps["listen_base_cpus"].set_max_entries(1)

    def _record_cpu_offsets(self, obj: BpfObject) -> None:
        """The bounded variant reads other CPUs' counters at offsets each CPU records for
        itself: a test run of record_cpu_offset on every CPU. An offline CPU's baseline is
        taken at its first listen event instead (that event goes unattributed)."""
        prog = obj.programs[RECORD_CPU_OFFSET]
        for cpu in range(possible_cpus()):
            try:
                prog.test_run(bytes(8), cpu=cpu)
            except ProbewireError as exc:
                log.debug("per-CPU offset of CPU %d not recorded: %s", cpu, exc)

    def after_load(self, obj: BpfObject) -> None:
        if not self.settings.listen:
            return
        if self.bounded_reason():
            self._record_cpu_offsets(obj)
        try:
            cookie = netns_cookie()
        except OSError:
            log.debug("no SO_NETNS_COOKIE: listeners that predate the agent stay unnamed")
            return
        owners = obj.maps["listen_owners"]
        for port, tgid in listening_sockets().items():
            key = np.zeros(1, LISTEN_KEY)
            key["netns"], key["port"] = cookie, port
            value = np.zeros(1, LISTEN_OWNER)
            value["tgid"] = tgid
            owners.update(key.tobytes(), value.tobytes())
        # A listen() of our own makes the kernel side read this namespace's counters now, so
        # the first overflow after start-up is attributed too.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)

    # --- OOM records --------------------------------------------------------------------------
    def on_ring(self, map_name: str, records: np.ndarray) -> None:
        kills = []
        for rec in records:
            tgid = int(rec["victim_tgid"])
            comm = bytes(rec["comm"]).split(b"\0", 1)[0].decode(errors="replace")
            service = self.ctx.services.name_for(tgid)
            if service == "unknown":
                service = comm or "unknown"  # already gone from /proc, and never seen before
            kills.append(OomKill(
                timestamp_ns=int(rec["timestamp_ns"]), pid=tgid, comm=comm,
                service_name=service, cgroup=cgroup_path(rec["path"], int(rec["depth"])),
                cgroup_id=int(rec["cgroup_id"]), trigger_pid=int(rec["trigger_tgid"]),
            ))
        with self._lock:
            for k in kills:
                self._oom[(k.service_name, k.cgroup)] += 1
            self.recent_oom_kills.extend(kills)

    # --- scrape -------------------------------------------------------------------------------
    def _service(self, tgid: int) -> str:
        return KERNEL_SERVICE if tgid == 0 else self.ctx.services.name_for(tgid)

    def _device(self, dev: int) -> str:
        name = self._devices.get(dev)
        if name is None:
            name = self._devices[dev] = device_name(dev)
        return name

    def totals(self) -> SaturationTotals:
        """Every signal's totals now, by label set (what collect() exports)."""
        sched: dict[tuple[str, ...], np.ndarray] = {}
        block: dict[tuple[str, ...], np.ndarray] = {}
        listen: dict[tuple[str, ...], np.ndarray] = {}
        with self._lock:
            if self.settings.runqueue or self.settings.cpu:
                keys, values = self.map("sched_stats").read_all(np.dtype(np.uint32), SCHED_STATS)
                rows = np.column_stack(
                    [values[f].sum(axis=1) for f in _SCHED_SCALARS]
                    + [values["runq_us_slots"].sum(axis=1)]
                ) if len(keys) else np.zeros((0, 5 + LOG2_SLOTS))
                sched = self._sched.update(keys, rows, lambda k: (self._service(int(k)),))
            if self.settings.block:
                keys, values = self.map("block_stats").read_all(BLOCK_KEY, BLOCK_STATS)
                rows = np.column_stack(
                    [values[f].sum(axis=1) for f in ("ios", "bytes", "ns_sum")]
                    + [values["us_slots"].sum(axis=1)]
                ) if len(keys) else np.zeros((0, 3 + LOG2_SLOTS))
                block = self._block.update(keys, rows, lambda k: (
                    self._service(int(k["tgid"])), self._device(int(k["dev"])),
                    OPERATIONS[min(int(k["op"]), len(OPERATIONS) - 1)]))
            if self.settings.listen:
                keys, values = self.map("listen_stats").read_all(LISTEN_KEY, LISTEN_STATS)
                rows = np.column_stack([values["overflows"], values["drops"]]).astype(
                    np.float64) if len(keys) else np.zeros((0, 2))
                tgids = dict(zip((k.tobytes() for k in keys), values["tgid"].tolist(),
                                 strict=True))
                listen = self._listen.update(keys, rows, lambda k: (
                    self._service_of_listener(tgids.get(k.tobytes(), 0)), str(int(k["port"]))))
            oom = dict(self._oom)
        return SaturationTotals(sched, block, listen, oom)

    def _service_of_listener(self, tgid: int) -> str:
        return self.ctx.services.name_for(tgid) if tgid else "unknown"

    def collect(self) -> Iterable[Metric]:
        t = self.totals()
        yield from self._sched_metrics(t)
        if self.settings.block:
            yield from self._block_metrics(t)
        if self.settings.listen:
            overflows = CounterMetricFamily(
                "probewire_tcp_listen_overflows",
                "SYNs and handshake ACKs a listener dropped because its accept queue was full "
                "(the kernel's ListenOverflows, attributed to the listening service and port).",
                labels=list(LISTEN_LABELS))
            drops = CounterMetricFamily(
                "probewire_tcp_listen_drops",
                "SYNs and handshake ACKs a listener dropped for any reason, overflows included "
                "(the kernel's ListenDrops, attributed).",
                labels=list(LISTEN_LABELS))
            for labels, row in sorted(t.listen.items()):
                overflows.add_metric(list(labels), float(row[0]))
                drops.add_metric(list(labels), float(row[1]))
            yield overflows
            yield drops
        if self.settings.oom:
            kills = CounterMetricFamily(
                "probewire_oom_kills",
                "Processes the OOM killer killed, by the victim's service and the memory cgroup "
                "that hit its limit (\"/\" for the whole machine).",
                labels=list(OOM_LABELS))
            for (service, cgroup), n in sorted(t.oom.items()):
                kills.add_metric([service, cgroup], float(n))
            yield kills

    def _sched_metrics(self, t: SaturationTotals) -> Iterable[Metric]:
        if self.settings.cpu:
            cpu = CounterMetricFamily(
                "probewire_process_cpu_seconds",
                "CPU time of a service's processes (the kernel's own sum_exec_runtime, taken at "
                "each context switch).", labels=list(SCHED_LABELS))
            for labels, row in sorted(t.sched.items()):
                cpu.add_metric(list(labels), row[0] * NS)
            yield cpu
        if self.settings.runqueue:
            runq = HistogramMetricFamily(
                "probewire_sched_runqueue_latency_seconds",
                "Time a service's threads were runnable but waited for a CPU, from wake-up (or "
                "preemption) to running.", labels=list(SCHED_LABELS))
            waits = CounterMetricFamily(
                "probewire_sched_wait_seconds",
                "Off-CPU time by reason: runqueue (runnable, waiting for a CPU), io (in "
                "uninterruptible sleep waiting for I/O), uninterruptible (other uninterruptible "
                "sleep: locks, page faults).", labels=[*SCHED_LABELS, "reason"])
            for labels, row in sorted(t.sched.items()):
                if row[2] > 0:
                    runq.add_metric(list(labels), self._buckets.cumulative(row[5:]), row[1] * NS)
                for reason, value in zip(WAIT_REASONS, (row[1], row[3], row[4]), strict=True):
                    waits.add_metric([*labels, reason], value * NS)
            yield runq
            yield waits

    def _block_metrics(self, t: SaturationTotals) -> Iterable[Metric]:
        duration = HistogramMetricFamily(
            "probewire_block_io_duration_seconds",
            "Block requests from issue to the device until completion, by the issuing service "
            "(\"kernel\" for writeback and other kernel threads), device and operation.",
            labels=list(BLOCK_LABELS))
        nbytes = CounterMetricFamily(
            "probewire_block_io_bytes",
            "Bytes of completed block requests.", labels=list(BLOCK_LABELS))
        for labels, row in sorted(t.block.items()):
            duration.add_metric(list(labels), self._buckets.cumulative(row[3:]), row[2] * NS)
            nbytes.add_metric(list(labels), float(row[1]))
        yield duration
        yield nbytes

    def oom_kills(self) -> list[OomKill]:
        with self._lock:
            return list(self.recent_oom_kills)

