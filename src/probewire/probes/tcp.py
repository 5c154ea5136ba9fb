"""tcp family: connection lifecycle, bytes, duration, RTT, retransmits and resets.

Kernel side: bpf/tcp.bpf.c aggregates into the per-CPU `tcp_stats` map (no per-event
records); this module reads it at scrape time and folds owner processes into services.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from probewire.aggregate.histogram import Log2Buckets
from probewire.enrich.net import format_address
from probewire.probes.base import Hook, Probe, ProbeContext
from probewire.runtime.bpf import BpfObject

LOG2_SLOTS = 32
US = 1e-6

TCP_FLOW_KEY = np.dtype(
    [
        ("tgid", np.uint32),
        ("port", np.uint16),
        ("direction", np.uint8),
        ("family", np.uint8),
        ("raddr", np.uint8, (16,)),
    ]
)
_COUNTERS = (
    "opened",
    "closed",
    "failed",
    "retransmits",
    "resets_sent",
    "resets_received",
    "bytes_sent",
    "bytes_received",
    "duration_us_sum",
    "rtt_us_sum",
)
TCP_FLOW_STATS = np.dtype(
    [(name, np.uint64) for name in _COUNTERS]
    + [("duration_us_slots", np.uint64, (LOG2_SLOTS,)), ("rtt_us_slots", np.uint64, (LOG2_SLOTS,))]
)
TCP_CONN = np.dtype(
    [
        ("key", TCP_FLOW_KEY),
        ("start_ns", np.uint64),
        ("base_bytes_acked", np.uint64),
        ("base_bytes_received", np.uint64),
        ("seen_total_retrans", np.uint32),
        ("_pad", np.uint32),
    ]
)
TCP_LISTENER = np.dtype([("tgid", np.uint32), ("_pad", np.uint32), ("cgroup_id", np.uint64)])

DIRECTIONS = {0: "unknown", 1: "client", 2: "server"}
# Labels of every probewire_tcp_* series: bounded by the kernel map (LRU) and by the fold
# below (tgid -> service; the remote address only for the client side).
LABELS = ("service_name", "direction", "server_address", "server_port")


@dataclass
class _Totals:
    counters: np.ndarray  # float64, len(_COUNTERS)
    duration_slots: np.ndarray
    rtt_slots: np.ndarray

    @classmethod
    def zero(cls) -> _Totals:
        return cls(np.zeros(len(_COUNTERS)), np.zeros(LOG2_SLOTS), np.zeros(LOG2_SLOTS))

    def add(self, other: _Totals) -> None:
        self.counters += other.counters
        self.duration_slots += other.duration_slots
        self.rtt_slots += other.rtt_slots


def listening_sockets(proc: Path = Path("/proc")) -> dict[int, int]:
    """Local TCP listening port -> owning tgid, for listeners that predate the agent."""
    inodes: dict[int, int] = {}
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":  # TCP_LISTEN
                inodes[int(parts[9])] = int(parts[1].rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    if not inodes:
        return owners
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    owners.setdefault(inodes[inode], int(pid_dir.name))
    return owners


class TcpProbe(Probe):
    name = "tcp"
    object_name = "tcp"
    hooks = (
        Hook("inet_sock_set_state", ("tcp_state_btf", "tcp_state_tp")),
        # Where the tracepoint sits at a function's entry or return, an fentry/fexit program
        # on that function sees the same events: the fallback where BTF tracepoints are
        # refused, ahead of tp/ (the tracefs record is built per event) and of a kprobe (an
        # int3 or ftrace round trip). Not first: the matrix measured ns per run of
        # tcp_receive_reset under each type (scripts/kernels/report.py), and in emulated
        # guests on a busy machine the order changed from run to run (5.10: fentry 9.5 us <
        # tp_btf 11.2 once, tp_btf 28.0 > fentry 20.4 > tp 12.2 the next); it needs a quiet
        # bare-metal run before fentry goes first.
        # No fexit/__tcp_retransmit_skb: on Debian 6.1 it counted 0 of 237 retransmits (the
        # compiler folds the function into its callers there), on 5.10 all of them.
        Hook("tcp_retransmit_skb", ("tcp_retransmit_btf", "tcp_retransmit_tp")),
        Hook("tcp_retransmit_synack", ("tcp_retransmit_synack_btf",
                                       "tcp_retransmit_synack_fexit", "tcp_retransmit_synack_tp")),
        Hook("tcp_send_reset", ("tcp_send_reset_btf", "tcp_send_reset_tp")),
        Hook("tcp_receive_reset", ("tcp_receive_reset_btf", "tcp_receive_reset_fentry",
                                   "tcp_receive_reset_tp", "tcp_receive_reset_kprobe")),
    )
    structs: ClassVar[dict[str, np.dtype]] = {
        "tcp_flow_key": TCP_FLOW_KEY,
        "tcp_flow_stats": TCP_FLOW_STATS,
        "tcp_conn": TCP_CONN,
        "tcp_listener": TCP_LISTENER,
    }

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        # Kernel keys are LRU-evicted and owners exit: keep each key's labels from first
        # sight and fold vanished keys into `_retired`, so exported counters never go down.
        self._labels_of: dict[bytes, tuple[str, ...]] = {}
        self._last: dict[bytes, _Totals] = {}
        self._retired: dict[tuple[str, ...], _Totals] = {}
        self._duration = Log2Buckets(LOG2_SLOTS, US)
        self._rtt = Log2Buckets(LOG2_SLOTS, US)

    def after_load(self, obj: BpfObject) -> None:
        listeners = obj.maps["tcp_listeners"]
        for port, tgid in listening_sockets().items():
            value = np.zeros(1, TCP_LISTENER)
            value["tgid"] = tgid
            listeners.update(int(port).to_bytes(4, "little"), value.tobytes())

    def _labels(self, key: np.void) -> tuple[str, ...]:
        direction = DIRECTIONS.get(int(key["direction"]), "unknown")
        address = format_address(int(key["family"]), key["raddr"]) if direction == "client" else ""
        return (
            self.ctx.services.name_for(int(key["tgid"])),
            direction,
            address,
            str(int(key["port"])),
        )

    def snapshot(self) -> dict[tuple[str, ...], _Totals]:
        """Totals per label set: live kernel entries plus retired ones."""
        keys, values = self.map("tcp_stats").read_all(TCP_FLOW_KEY, TCP_FLOW_STATS)
        with self._lock:
            seen: dict[bytes, _Totals] = {}
            for i in range(len(keys)):
                raw = keys[i].tobytes()
                per_cpu = values[i]
                seen[raw] = _Totals(
                    np.array([per_cpu[c].sum() for c in _COUNTERS], dtype=np.float64),
                    per_cpu["duration_us_slots"].sum(axis=0).astype(np.float64),
                    per_cpu["rtt_us_slots"].sum(axis=0).astype(np.float64),
                )
                if raw not in self._labels_of:
                    self._labels_of[raw] = self._labels(keys[i])
            for raw in set(self._last) - set(seen):
                labels = self._labels_of.pop(raw)
                self._retired.setdefault(labels, _Totals.zero()).add(self._last[raw])
            self._last = seen
            out: dict[tuple[str, ...], _Totals] = {}
            for labels, retired in self._retired.items():
                out.setdefault(labels, _Totals.zero()).add(retired)
            for raw, totals in seen.items():
                out.setdefault(self._labels_of[raw], _Totals.zero()).add(totals)
            return out

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot()
        labels = list(LABELS)
        families = {
            "opened": CounterMetricFamily(
                "probewire_tcp_connections_opened", "TCP connections established.", labels=labels
            ),
            "closed": CounterMetricFamily(
                "probewire_tcp_connections_closed", "TCP connections closed.", labels=labels
            ),
            "failed": CounterMetricFamily(
                "probewire_tcp_connections_failed",
                "TCP connects that never reached ESTABLISHED (refused, timed out).",
                labels=labels,
            ),
            "retransmits": CounterMetricFamily(
                "probewire_tcp_retransmits", "TCP segments retransmitted.", labels=labels
            ),
            "bytes_sent": CounterMetricFamily(
                "probewire_tcp_bytes_sent",
                "TCP payload bytes sent and acknowledged, counted when the connection closes.",
                labels=labels,
            ),
            "bytes_received": CounterMetricFamily(
                "probewire_tcp_bytes_received",
                "TCP payload bytes received, counted when the connection closes.",
                labels=labels,
            ),
        }
        resets = CounterMetricFamily(
            "probewire_tcp_resets", "TCP resets sent or received.", labels=[*labels, "reset"]
        )
        duration = HistogramMetricFamily(
            "probewire_tcp_connection_duration_seconds",
            "Lifetime of closed TCP connections.",
            labels=labels,
        )
        rtt = HistogramMetricFamily(
            "probewire_tcp_rtt_seconds",
            "Smoothed round-trip time of each closed TCP connection.",
            labels=labels,
        )
        idx = {name: i for i, name in enumerate(_COUNTERS)}
        for label_values, t in sorted(snap.items()):
            lv = list(label_values)
            for name, family in families.items():
                family.add_metric(lv, t.counters[idx[name]])
            resets.add_metric([*lv, "sent"], t.counters[idx["resets_sent"]])
            resets.add_metric([*lv, "received"], t.counters[idx["resets_received"]])
            if t.duration_slots.any():
                duration.add_metric(
                    lv, self._duration.cumulative(t.duration_slots),
                    t.counters[idx["duration_us_sum"]] * US,
                )
            if t.rtt_slots.any():
                rtt.add_metric(
                    lv, self._rtt.cumulative(t.rtt_slots), t.counters[idx["rtt_us_sum"]] * US
                )
        yield from families.values()
        yield resets
        yield duration
        yield rtt
