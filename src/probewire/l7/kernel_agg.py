"""Exchanges the kernel counted in maps (l7_aggs), merged into the series rows feed.

A protocol whose exchanges can be keyed by an operation counts them in the kernel once user
space has named the operation: the first exchange of each operation (its hash not yet in
l7_ops) arrives as a record, user space templates it (an HTTP path to its route) and writes
the hash's operation id; later ones are counted per label-ish key, per CPU. Operation ids here
are stable for the agent's life (the kernel holds them), unlike the memo's label ids.

Kernel entries are cumulative: each key's growth since its last reading is merged, so a series
never goes down and no exchange is counted twice. A key whose process cannot be named yet (it
exited before its exec record was read) waits a moment for that record. Keys of processes gone
for a whole reap period are read a last time and deleted (nothing adds to them any more).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from probewire.aggregate.graph import connection_type
from probewire.aggregate.pipeline import ExchangePipeline
from probewire.enrich.net import format_address
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import HttpFlag, L7Flag, Proto, Role
from probewire.l7.exchanges import METHODS
from probewire.l7.records import L7_AGG, L7_AGG_KEY, L7_OP_KEY
from probewire.l7.registry import protocol_by_id
from probewire.runtime.bpf import Map

_AGG_WORDS = L7_AGG.itemsize // 8
# Operation ids handed to the kernel (l7_ops values). Past this many distinct names a new
# operation is registered as "other": the label budget would fold it there anyway.
OP_IDS_MAX = 16384
OVERFLOW = "other"
UNKNOWN = "unknown"
# Keys of processes gone from /proc are read a last time and deleted this often.
REAP_S = 30.0
# A key of a process not named yet waits at most this long for the name ("unknown" after).
NAME_WAIT_S = 2.0


class KernelOps:
    """Stable operation ids for the kernel, per name (an HTTP route)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.ids: dict[str, int] = {}

    def op_id(self, name: str) -> int:
        oid = self.ids.get(name)
        if oid is None:
            if len(self.names) >= OP_IDS_MAX:
                name = OVERFLOW
                oid = self.ids.get(name)
            if oid is None:
                oid = self.ids[name] = len(self.names)
                self.names.append(name)
        return oid

    def name(self, oid: int) -> str:
        return self.names[oid] if oid < len(self.names) else UNKNOWN

    def register(self, ops: Map, proto: int, hashes: np.ndarray, names: list[str]) -> None:
        """Tell the kernel the operation of each hash (distinct hashes, their names)."""
        key = np.zeros(1, dtype=L7_OP_KEY)
        key["proto"] = proto
        for h, name in zip(hashes.tolist(), names, strict=True):
            key["hash"] = h
            ops.update(key.tobytes(), self.op_id(name).to_bytes(4, "little"))


class KernelAggregates:
    def __init__(self, aggs: Map, ops: KernelOps, pipeline: ExchangePipeline,
                 services: ServiceResolver) -> None:
        self.aggs = aggs
        self.ops = ops
        self.pipeline = pipeline
        self.services = services
        self._last: dict[bytes, np.ndarray] = {}
        self._lock = threading.Lock()
        self._reaped_at = time.monotonic()
        self.reap_s = REAP_S
        self._dead_before: set[bytes] = set()
        self._name_wait: dict[bytes, float] = {}
        self._gone = 0
        self.counted = 0  # exchanges counted in the kernel, as of the last sync

    def sync(self) -> None:
        """Add what the kernel counted since the last call to the series."""
        with self._lock:
            keys, values = self.aggs.read_all(L7_AGG_KEY, L7_AGG)
            n = len(keys)
            totals = (values.view(np.uint64).reshape(n, -1, _AGG_WORDS).sum(axis=1)
                      if n else np.zeros((0, _AGG_WORDS), np.uint64))
            raw_keys = [k.tobytes() for k in keys]
            last = self._last
            zero = np.zeros(_AGG_WORDS, np.uint64)
            deltas = totals - np.array([last.get(raw, zero) for raw in raw_keys]
                                       ).reshape(n, _AGG_WORDS)
            now = time.monotonic()
            ready = [i for i in np.flatnonzero(deltas[:, 0] > 0).tolist()
                     if self._nameable(keys[i], raw_keys[i], now)]
            if ready:
                with self.pipeline.lock:
                    self._merge(keys[ready], deltas[ready].view(L7_AGG)[:, 0])
                for i in ready:
                    last[raw_keys[i]] = totals[i]
            if now - self._reaped_at >= self.reap_s:
                self._reaped_at = now
                self._reap(keys, raw_keys, totals)
            self.counted = self._gone + int(sum(int(v[0]) for v in last.values()))

    def _nameable(self, key: np.void, raw: bytes, now: float) -> bool:
        """True when the key's processes have names, or waiting for them is over."""
        tgids = (int(key["tgid"]), int(key["peer_tgid"]))
        if all(t == 0 or self.services.info_for(t) is not None for t in tgids):
            self._name_wait.pop(raw, None)
            return True
        if now - self._name_wait.setdefault(raw, now) < NAME_WAIT_S:
            return False
        del self._name_wait[raw]
        return True  # named "unknown"

    def _reap(self, keys: np.ndarray, raw_keys: list[bytes], totals: np.ndarray) -> None:
        """Delete keys whose process (or, server side, client process) was gone at this reap
        and the one before: an exchange of theirs still in flight has landed by then."""
        pids = np.unique(np.concatenate([keys["tgid"], keys["peer_tgid"]])).tolist()
        gone = {p for p in pids if p and not os.path.exists(f"/proc/{p}")}
        dead = {raw for key, raw in zip(keys, raw_keys, strict=True)
                if int(key["tgid"]) in gone or int(key["peer_tgid"]) in gone}
        last = self._last
        for i, raw in enumerate(raw_keys):
            if raw in dead and raw in self._dead_before and raw in last \
                    and np.array_equal(last[raw], totals[i]):
                self.aggs.delete(raw)
                # Every count of the key is merged already; `counted` keeps them.
                self._gone += int(last.pop(raw)[0])
        self._dead_before = dead

    def _merge(self, keys: np.ndarray, d: np.ndarray) -> None:
        """Kernel counts (growth per key) into the same series the rows feed."""
        red, graph, endpoints = self.pipeline.red, self.pipeline.graph, self.pipeline.endpoints
        for k, v in zip(keys, d, strict=True):
            proto = int(k["proto"])
            if protocol_by_id(proto).kind != "http":
                continue  # (only HTTP counts in the kernel today)
            role, tgid, lport = int(k["role"]), int(k["tgid"]), int(k["lport"])
            service = (self.services.name_for_port(tgid, lport) if role == Role.SERVER
                       else self.services.name_for(tgid))
            status = int(k["status"])
            aborted = bool(int(k["pflags"]) & HttpFlag.ABORTED)
            count = float(v["count"])
            duration = v["duration"].astype(np.int64)
            seconds = float(v["duration_ns"]) / 1e9
            failed = count if (aborted or status >= 500) else 0.0
            peer = format_address(int(k["family"]), k["raddr"])
            method = int(k["method"])
            base = (service, METHODS[method] if method < len(METHODS) else "_OTHER",
                    str(status),
                    self.pipeline.learned_route(service, self.ops.name(int(k["op"]))),
                    "https" if int(k["flags"]) & L7Flag.TLS else "http")
            ctype = connection_type(proto)
            if role == Role.SERVER:
                local = format_address(int(k["family"]), k["laddr"])
                endpoints.local_addresses.add(local)
                endpoints.servers.put((local, lport), service)
                client, is_local = graph.client_name(peer, int(k["peer_tgid"]))
                graph.merge_server(client, service, not is_local, ctype, count, failed,
                                   duration, seconds)
            else:
                graph.merge_client(service, peer, int(k["rport"]), ctype, count, failed,
                                   duration, seconds)
            red.merge_http(role, base, (peer, str(int(k["rport"]))), aborted, count, duration,
                           seconds, v["req_body"].astype(np.int64), float(v["req_body_bytes"]),
                           v["resp_body"].astype(np.int64), float(v["resp_body_bytes"]))


__all__ = ["KernelAggregates", "KernelOps", "Proto"]
