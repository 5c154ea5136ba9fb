"""The security engine: a consumer the process family owns. It keeps the process tree from the
family's records, judges execs and watched connections against the rules, and sends each alert
to the metric, the API/UI, the log, JSON lines and OTLP logs.

It runs on the ring reader thread, after the family has decoded a batch; the API reads its
state under its lock. One alert per rule and process image: a process that matches a rule at
exec and again when it connects is reported once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probewire.config import Config
from probewire.enrich.service import UNKNOWN_SERVICE, ServiceResolver, container_id_from_cgroup
from probewire.runtime.filter import cgroup2_root
from probewire.security import kernel
from probewire.security.alerts import AlertSink, JsonLinesSink
from probewire.security.kernel import (
    AF_INET,
    PROCESS_CONNECT,
    PROCESS_EXEC,
    PROCESS_EXIT,
    PROCESS_FORK,
    SEC_EXE_DELETED,
    SEC_EXE_MEMFD,
    SEC_EXE_TRUNCATED,
    SEC_IN_CONTAINER,
    SEC_KILL_FAILED,
    SEC_KILLED,
    SEC_STDIN_TCP,
    SEC_STDOUT_TCP,
)
from probewire.security.redact import Redactor
from probewire.security.rules import Clause, Connection, RuleSet
from probewire.security.tree import (
    MAX_ANCESTRY,
    NS_PER_TICK,
    Node,
    ProcessTree,
    read_proc_node,
)

if TYPE_CHECKING:
    from probewire.probes.process import ProcessEvent
    from probewire.runtime.bpf import BpfObject

__all__ = ["SecurityEngine"]

log = logging.getLogger(__name__)

SEVERITY_NUMBER = {"info": 9, "low": 10, "medium": 13, "high": 17, "critical": 21}  # OTLP
# Ancestors shown in an alert (nearest first).
ALERT_ANCESTRY = 16
# cgroup directories remembered for naming the container of an exited process.
MAX_CGROUP_DIRS = 65536


def _user(uid: int, cache: dict[int, str]) -> str:
    if uid < 0:
        return ""
    if uid not in cache:
        try:
            cache[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            cache[uid] = str(uid)
    return cache[uid]


class SecurityEngine:
    def __init__(self, config: Config, services: ServiceResolver, redact: Redactor,
                 proc: Path = Path("/proc")) -> None:
        sec = config.security
        self.config = config
        self.services = services
        self.redact = redact
        self.proc = proc
        self.rules = RuleSet(sec.effective_rules())
        self.tree = ProcessTree(sec.max_processes)
        self.obj: BpfObject | None = None
        self.alerts: deque[dict[str, Any]] = deque(maxlen=sec.max_alerts)
        self.alert_counts: Counter[tuple[str, str, str]] = Counter()
        self.kill_failures: Counter[str] = Counter()
        self.alerts_total = 0
        self.sinks: list[AlertSink] = []
        self.listeners_seeded = 0
        self.seeded = threading.Event()  # set when the /proc seed is done
        self._stopping = threading.Event()
        self._seeder: threading.Thread | None = None
        self._users: dict[int, str] = {}
        self._cgroups: dict[int, str] = {}  # cgroup v2 id -> path under the cgroup2 root
        self._cgroups_walked_at = 0.0
        self._lock = threading.Lock()
        # Tests and tools that want each alert, or each exec as the tree has it, as it happens
        # (on the reader thread, under the engine's lock: they must be quick).
        self.on_alert: list[Callable[[dict[str, Any]], None]] = []
        self.on_exec: list[Callable[[Node], None]] = []

    # --- life cycle --------------------------------------------------------------------------
    def start(self, obj: BpfObject) -> None:
        """The object is loaded and attached: fill its maps, open the outputs, and seed the
        listeners and the tree from /proc on a thread of their own (reading every process's
        fds and status takes ~0.5 ms a process, too long for start-up; records that arrive
        meanwhile build the tree as usual, and the seed skips what they already added)."""
        kernel.check_enums(obj)
        self.obj = obj
        self.rules.kernel_tables().write(obj)
        self._seeder = threading.Thread(target=self._seed, name="probewire-security-seed",
                                        daemon=True)
        self._seeder.start()
        sec = self.config.security
        if sec.alert_log:
            self.sinks.append(JsonLinesSink(sec.alert_log))
        otlp = self.config.export.otlp
        if otlp.enabled and sec.otlp_logs:
            from probewire.export.otlp_logs import OtlpAlertLogs

            self.sinks.append(OtlpAlertLogs(otlp))
        log.info("security: %d rules (%d clauses, %d decided in the kernel at exec)",
                 len(self.rules.rules), len(self.rules.clauses),
                 sum(1 for c in self.rules.clauses if c.kernel))

    def _seed(self) -> None:
        t0 = time.monotonic()
        try:
            obj = self.obj
            if obj is not None:
                self.listeners_seeded = kernel.seed_listeners(
                    obj, kernel.listening_holders(self.proc))
            self.seed_tree()
        except Exception:  # e.g. the agent stopped meanwhile and its maps are closed
            if self.obj is not None:
                log.exception("security: seeding from /proc failed")
            return
        finally:
            self.seeded.set()
        log.info("security: seeded %d processes and %d listeners from /proc in %.3f s",
                 len(self.tree), self.listeners_seeded, time.monotonic() - t0)

    def seed_tree(self) -> None:
        found: dict[int, tuple[Node, int]] = {}
        for entry in self.proc.iterdir():
            if self._stopping.is_set():
                return
            if entry.name.isdigit():
                got = read_proc_node(int(entry.name), self.proc, self.redact)
                if got is not None:
                    found[got[0].pid] = got
        with self._lock:
            self.tree.seed(found)

    def stop(self) -> None:
        self._stopping.set()
        if self._seeder is not None:
            self._seeder.join(30)
            self._seeder = None
        for sink in self.sinks:
            sink.close()
        self.sinks.clear()
        self.obj = None

    # --- the batch ---------------------------------------------------------------------------
    def on_batch(self, records: np.ndarray, decoded: Sequence[ProcessEvent | None]) -> None:
        """`decoded[i]` is the family's ProcessEvent of records[i] (exec and exit ones)."""
        # Columns as lists once per batch: a numpy row and its fields cost ~1 µs a record.
        kinds = records["kind"].tolist()
        pids = records["pid"].tolist()
        ppids = records["ppid"].tolist()
        start_ticks = (records["start_ns"] // np.uint64(NS_PER_TICK)).tolist()
        uids = records["uid"].tolist()
        euids = records["euid"].tolist()
        cgroups = records["cgroup_id"].tolist()
        clauses = records["clauses"].tolist()
        flags = records["sec_flags"].tolist()
        depths = records["listener_depth"].tolist()
        alerts: list[dict[str, Any]] = []
        with self._lock:
            for i, kind in enumerate(kinds):
                if kind == PROCESS_FORK:
                    self.tree.fork(pids[i], ppids[i], start_ticks[i], uid=uids[i],
                                   euid=euids[i], cgroup_id=cgroups[i])
                elif kind == PROCESS_EXEC:
                    ev = decoded[i]
                    if ev is not None:
                        node = self.tree.exec(pids[i], ppids[i], start_ticks[i])
                        node.exe, node.filename, node.comm = ev.exe, ev.filename, ev.comm
                        node.argv, node.uid, node.euid = ev.argv, uids[i], euids[i]
                        node.cgroup_id, node.service = cgroups[i], ev.service_name
                        node.clauses, node.flags = clauses[i], flags[i]
                        node.listener_depth, node.exec_ns = depths[i], ev.timestamp_ns
                        alerts += self._on_exec(node, ev)
                elif kind == PROCESS_EXIT:
                    self.tree.exit(pids[i], start_ticks[i])
                elif kind == PROCESS_CONNECT:
                    alerts += self._on_connect(records[i])
        for alert in alerts:
            self._publish(alert)

    def _on_exec(self, node: Node, ev: ProcessEvent) -> list[dict[str, Any]]:
        """`node` holds the new image (the tree has it under its parent)."""
        flags = node.flags
        if node.parent is None and ev.ppid > 1:
            self._adopt_parent(node, ev.ppid)
        for observer in self.on_exec:
            observer(node)
        if flags & SEC_KILL_FAILED:
            log.error("security: a kill rule matched pid %d (%s) but the kernel refused "
                      "bpf_send_signal; see `probewire doctor`", ev.pid, node.exe)
        bits = node.clauses or 0
        if not bits:
            return []
        ancestry = self.tree.ancestry(node)
        depth = node.listener_depth
        if 0 < depth <= len(ancestry):
            # The kernel's word, at exec: by the time the alert is built the server may
            # be gone from the listener map already.
            ancestry[depth - 1].listener = True
        out = []
        for clause in self.rules.exec_clauses:
            if bits & clause.mask and clause.rule.id not in (node.alerted or ()):
                alert = self._judge(clause, node, ancestry, None)
                if alert is not None:
                    out.append(alert)
        return out

    def _on_connect(self, rec: np.void) -> list[dict[str, Any]]:
        raw = bytes(rec["daddr"])
        address = ipaddress.ip_address(raw[:4] if int(rec["family"]) == AF_INET else raw)
        conn = Connection(int(rec["pid"]), address, int(rec["dport"]))
        clauses = [c for c in self.rules.connect_clauses if c.connection_matches(conn)]
        if not clauses:
            return []
        node = self.tree.get(conn.pid)
        if node is None:
            node = self._adopt(conn.pid)
            if node is None:
                return []
        out = []
        chain = [node, *self.tree.ancestry(node)]
        for clause in clauses:
            # The process that connects, or the nearest ancestor the rule is about.
            for depth, subject in enumerate(chain):
                if subject.evicted or clause.rule.id in (subject.alerted or ()):
                    continue
                alert = self._judge(clause, subject, chain[depth + 1:], conn)
                if alert is not None:
                    out.append(alert)
                    break
        return out

    def _judge(self, clause: Clause, node: Node, ancestry: Sequence[Node],
               conn: Connection | None) -> dict[str, Any] | None:
        if node.clauses is None:  # seeded: the kernel never saw its exec
            if not clause.kernel_criteria_hold(node, ancestry, self.is_listener):
                return None
        elif not node.clauses & clause.mask:
            return None
        if not clause.user_criteria_hold(node, ancestry, self.service_of):
            return None
        rule = clause.rule
        if self.rules.excepted(rule.id, node, ancestry, self.is_listener, self.service_of,
                               conn):
            return None
        if node.alerted is None:
            node.alerted = set()
        node.alerted.add(rule.id)
        return self._alert(clause, node, ancestry, conn)

    def _adopt(self, pid: int) -> Node | None:
        got = read_proc_node(pid, self.proc, self.redact)
        if got is None:
            return None
        node = self.tree.adopt(*got)
        if node.parent is None and got[1] > 1:
            self._adopt_parent(node, got[1])
        return node

    def _adopt_parent(self, node: Node, ppid: int) -> None:
        """A parent the tree lost (its fork record was dropped, or it was evicted): from /proc,
        while it is still there."""
        parent = self._adopt(ppid)
        if parent is not None:
            self.tree.set_parent(node, parent)

    # --- lookups the rules use ---------------------------------------------------------------
    def is_listener(self, pid: int) -> bool:
        return self.obj is not None and kernel.is_listener(self.obj, pid)

    def service_of(self, node: Node) -> str:
        if not node.service or node.service == UNKNOWN_SERVICE:
            name = self.services.name_for(node.pid) if not node.exited else UNKNOWN_SERVICE
            if name == UNKNOWN_SERVICE and node.exe:
                name = node.exe.rsplit("/", 1)[-1] or UNKNOWN_SERVICE
            node.service = name
        return node.service

    def responsible_service(self, node: Node, ancestry: Sequence[Node]) -> str:
        """The service an alert belongs to: the nearest network server among the process and
        its ancestors (a shell's alert belongs to the server that spawned it), else the
        process's own."""
        for n in (node, *ancestry[:MAX_ANCESTRY]):
            if n.listener or (not n.evicted and not n.exited and n.pid > 1
                              and self.is_listener(n.pid)):
                return self.service_of(n)
        return self.service_of(node)

    # --- alerts ------------------------------------------------------------------------------
    def cgroup_path(self, cgroup_id: int) -> str | None:
        """A cgroup v2 id (what the kernel records) -> its path, for processes gone from /proc
        by the time their alert is built (a short-lived `dpkg` in a container). The id is the
        cgroup directory's inode: walk the hierarchy at most once a second on a miss."""
        if cgroup_id <= 1:
            return None
        if cgroup_id not in self._cgroups and time.monotonic() - self._cgroups_walked_at > 1:
            self._cgroups_walked_at = time.monotonic()
            root = cgroup2_root()
            for path, _, _ in os.walk(root):
                try:
                    self._cgroups[os.stat(path).st_ino] = "/" + os.path.relpath(path, root)
                except OSError:
                    continue
                if len(self._cgroups) > MAX_CGROUP_DIRS:
                    break
        return self._cgroups.get(cgroup_id)

    def _process(self, node: Node) -> dict[str, Any]:
        info = self.services.info_for(node.pid) if not node.exited else None
        container = info.container_id if info is not None else None
        if container is None and node.flags & SEC_IN_CONTAINER:
            path = self.cgroup_path(node.cgroup_id)
            container = container_id_from_cgroup(path) if path else None
        return {
            "pid": node.pid, "exe": node.exe, "filename": node.filename, "comm": node.comm,
            "argv": list(node.argv), "uid": node.uid, "euid": node.euid,
            "user": _user(node.euid if node.euid >= 0 else node.uid, self._users),
            "service_name": self.service_of(node),
            "container_id": container,
            "start_ticks": node.start_ticks, "exited": node.exited,
        }

    def _alert(self, clause: Clause, node: Node, ancestry: Sequence[Node],
               conn: Connection | None) -> dict[str, Any]:
        rule = clause.rule
        flags = node.flags
        killed = bool(flags & SEC_KILLED) and rule.action == "kill" and conn is None
        evidence: dict[str, Any] = {
            "stdin_tcp": bool(flags & SEC_STDIN_TCP), "stdout_tcp": bool(flags & SEC_STDOUT_TCP),
            "exe_memfd": bool(flags & SEC_EXE_MEMFD), "exe_deleted": bool(flags & SEC_EXE_DELETED),
            "in_container": bool(flags & SEC_IN_CONTAINER),
            "exe_truncated": bool(flags & SEC_EXE_TRUNCATED),
            "listener_depth": node.listener_depth or None,
            "kernel_criteria": sorted(clause.kernel),
        }
        if conn is not None:
            evidence["connection"] = {"pid": conn.pid, "address": str(conn.address),
                                      "port": conn.port}
        process = self._process(node)
        return {
            "time": time.time(),
            "timestamp_ns": node.exec_ns if conn is None else time.monotonic_ns(),
            "rule": rule.id,
            "severity": rule.severity,
            "description": rule.description,
            "action": "killed" if killed else "alert",
            "service_name": self.responsible_service(node, ancestry),
            "process": process,
            "container_id": process["container_id"],
            "in_container": bool(flags & SEC_IN_CONTAINER),
            "ancestry": [self._process(a) if not a.evicted else
                         {"pid": a.pid, "evicted": True} for a in ancestry[:ALERT_ANCESTRY]],
            "ancestry_truncated": len(ancestry) > ALERT_ANCESTRY or bool(
                ancestry and ancestry[-1].evicted),
            "evidence": evidence,
        }

    def _publish(self, alert: dict[str, Any]) -> None:
        with self._lock:
            self.alerts_total += 1
            alert["id"] = self.alerts_total
            self.alerts.append(alert)
            key = (alert["rule"], alert["severity"], alert["service_name"])
            self.alert_counts[key] += 1
        proc = alert["process"]
        chain = " <- ".join(f"{a.get('comm') or '?'}({a['pid']})" for a in alert["ancestry"][:6])
        log.warning("security %s [%s] %s: pid %d %s %r service=%s ancestry: %s",
                    "KILLED" if alert["action"] == "killed" else "alert", alert["severity"],
                    alert["rule"], proc["pid"], proc["exe"] or proc["filename"],
                    " ".join(proc["argv"]), alert["service_name"], chain or "-")
        for sink in self.sinks:
            sink.emit(alert)
        for callback in list(self.on_alert):
            try:
                callback(alert)
            except Exception:
                log.exception("security alert callback failed")

    # --- reads (API, metrics) ----------------------------------------------------------------
    def recent(self, since_id: int = 0, limit: int | None = None,
               rule: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            out = [a for a in self.alerts
                   if a["id"] > since_id and (rule is None or a["rule"] == rule)]
        return out[-limit:] if limit else out

    def kills(self) -> dict[str, int]:
        if self.obj is None:
            return {}
        per_clause = kernel.kills_per_clause(self.obj)
        out: dict[str, int] = {}
        for c in self.rules.clauses:
            if c.rule.action == "kill":
                out[c.rule.id] = out.get(c.rule.id, 0) + int(per_clause[c.bit])
        return out

    def ancestry_of(self, pid: int) -> dict[str, Any] | None:
        with self._lock:
            node = self.tree.get(pid)
            if node is None:
                return None
            ancestry = self.tree.ancestry(node)
            return {"process": self._process(node),
                    "ancestry": [self._process(a) if not a.evicted else
                                 {"pid": a.pid, "evicted": True} for a in ancestry]}

    def rule_rows(self) -> list[dict[str, Any]]:
        kills = self.kills()
        with self._lock:
            per_rule: Counter[str] = Counter()
            for (rule, _sev, _svc), n in self.alert_counts.items():
                per_rule[rule] += n
        return [{**row, "alerts": per_rule.get(str(row["id"]), 0),
                 "kills": kills.get(str(row["id"]), 0)} for row in self.rules.describe()]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tree = self.tree.stats()
        return {**tree, "alerts": self.alerts_total, "listeners_seeded": self.listeners_seeded,
                "outputs": [{"name": s.name, "dropped": s.dropped} for s in self.sinks]}

    def collect(self) -> Iterable[Metric]:
        alerts = CounterMetricFamily(
            "probewire_security_alerts",
            "Security alerts by rule, severity and the service they belong to.",
            labels=["rule", "severity", "service_name"],
        )
        with self._lock:
            counts = sorted(self.alert_counts.items())
            tree = self.tree.stats()
        for (rule, severity, service), n in counts:
            alerts.add_metric([rule, severity, service], n)
        yield alerts
        kills = CounterMetricFamily(
            "probewire_security_kills",
            "Execs a kill rule stopped with SIGKILL from the kernel.", labels=["rule"])
        for rule, n in sorted(self.kills().items()):
            kills.add_metric([rule], n)
        yield kills
        dropped = CounterMetricFamily(
            "probewire_security_alerts_dropped",
            "Alerts an output (jsonl, otlp) could not take because its queue was full.",
            labels=["output"])
        for sink in self.sinks:
            dropped.add_metric([sink.name], sink.dropped)
        yield dropped
        processes = GaugeMetricFamily(
            "probewire_security_processes",
            "Processes in the security process tree (exited ones kept for their children "
            "included).")
        processes.add_metric([], tree["processes"] + tree["exited_kept"])
        yield processes
