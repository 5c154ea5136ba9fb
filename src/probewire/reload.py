"""Live reconfiguration: the config file watched (ConfigMap updates included), SIGHUP, and the
in-kernel filter kept in step with Kubernetes selectors.

A reload reads the file again with the same environment and flags as at start-up
(:func:`probewire.config.resolve_config`). An invalid file changes nothing: the running
configuration stays, the error goes to the log, to
``probewire_config_reloads_total{result="failure"}`` and to ``/api/agent``. A valid one is
handed to :meth:`Agent.reconfigure`, which applies what can change while running (filters,
service rules, routes, budgets, sampling, log level) by rewriting BPF maps in place; keys that
need new kernel objects or sockets (``listen``, ``probes.*.enabled``, ``ring.*``, ...) are
reported as waiting for a restart.

ConfigMap volumes are updated by kubelet's atomic writer: the mounted file is a symlink into a
``..data`` directory that is swapped for a new one, so the file's inode changes without any
write to it. The watcher therefore compares what ``stat()`` says about the path (following
symlinks): device, inode, size, mtime. Polling every half second costs one stat and meets the
"applied within 2 s" target; inotify would need a watch per directory of the symlink chain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from probewire.config import Config, ContainersConfig, FilterConfig, resolve_config
from probewire.enrich.service import ServiceResolver
from probewire.enrich.workload import matches_selectors
from probewire.errors import ProbewireError
from probewire.runtime.filter import Filter, cgroup2_root

if TYPE_CHECKING:
    from probewire.agent import Agent

__all__ = ["ConfigWatcher", "LiveFilter", "ReloadStatus", "Reloader", "restart_needed"]

log = logging.getLogger(__name__)

POLL_S = 0.5
# Top-level keys (and sub-keys) a running agent cannot take over: they shape kernel objects,
# sockets or threads made at start-up.
RESTART_KEYS = ("listen", "bpf_stats", "ring", "probes.tcp.enabled", "probes.process.enabled",
                "probes.l7.enabled", "probes.l7.protocols", "probes.l7.kernel_aggregation",
                "probes.l7.kernel_keys", "probes.l7.trace_agent", "probes.l7.series_ttl_s",
                "probes.l7.max_series_per_service", "probes.http.route_learning",
                "probes.saturation", "probes.custom", "security", "memory",
                "export.otlp.enabled",
                "export.otlp.endpoint", "export.otlp.protocol", "export.otlp.headers",
                "export.otlp.traces", "export.otlp.metrics", "export.otlp.traces_endpoint",
                "export.otlp.metrics_endpoint", "export.otlp.traces_protocol",
                "export.otlp.metrics_protocol", "export.otlp.insecure", "kubernetes.api",
                "kubernetes.api_url", "kubernetes.node_name", "kubernetes.cluster_peers",
                "serve")


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def restart_needed(old: Config, new: Config) -> list[str]:
    """Dotted keys whose change only takes effect after a restart."""
    return [key for key in RESTART_KEYS if _get(old, key) != _get(new, key)]


class LiveFilter:
    """The in-kernel filter, kept in step with the config and, for Kubernetes selectors, with
    the containers on this host (cgroup tree scanned every containers.scan_interval_s, and at
    once when this node's pods change)."""

    def __init__(self, kernel_filter: Filter, services: ServiceResolver,
                 cgroup_root: Path | None = None) -> None:
        self.filter = kernel_filter
        self.services = services
        self.cgroup_root = cgroup_root or cgroup2_root()
        self.config = FilterConfig()
        self.scan_interval_s = 2.0
        self.matched: dict[str, int] = {}  # container cgroup path -> cgroup id
        self.scans = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if services.workloads is not None:
            services.workloads.listeners.append(self._wake.set)
        self._warned = False

    def apply(self, config: FilterConfig, containers: ContainersConfig | None = None) -> None:
        with self._lock:
            self.config = config
            if containers is not None:
                self.scan_interval_s = containers.scan_interval_s
            self._write()
        if config.kubernetes and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="probewire-k8s-filter",
                                            daemon=True)
            self._thread.start()
        elif not config.kubernetes and self._thread is not None:
            self.stop()

    def _scan(self) -> dict[str, int]:
        """Cgroup ids of every matching container (its own cgroup and the ones below it)."""
        found: dict[str, int] = {}
        if not (self.cgroup_root / "cgroup.procs").exists() and not self._warned:
            self._warned = True
            log.warning("filter.k8s_*: no cgroup v2 hierarchy at %s, so no container can match "
                        "and nothing is traced; mount cgroupfs into the agent (the DaemonSet "
                        "mounts the host's /sys/fs/cgroup)", self.cgroup_root)
        workloads = self.services.workloads
        if workloads is None:
            return found
        for rel, workload in workloads.containers(self.cgroup_root):
            if not matches_selectors(workload.pod, self.config):
                continue
            top = self.cgroup_root / rel.lstrip("/")
            for dirpath, _dirs, _files in os.walk(top):
                try:
                    found[dirpath] = os.stat(dirpath).st_ino
                except OSError:
                    continue
        self.scans += 1
        return found

    def _write(self) -> None:
        f = self.config
        if f.kubernetes:
            self.matched = self._scan()
        self.filter.apply(list(f.pids), list(f.cgroups), list(f.ports),
                          sorted(set(self.matched.values())) if f.kubernetes else None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.scan_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    if not self.config.kubernetes:
                        continue
                    before = set(self.matched.values())
                    found = self._scan()
                    if set(found.values()) != before:
                        self.matched = found
                        f = self.config
                        self.filter.apply(list(f.pids), list(f.cgroups), list(f.ports),
                                          sorted(set(found.values())))
            except Exception:
                log.exception("updating the Kubernetes filter failed")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


@dataclass
class ReloadStatus:
    """What /api/agent shows about reloads."""

    source: str = ""
    successes: int = 0
    failures: int = 0
    last_result: str = ""
    last_error: str = ""
    last_at: float = 0.0
    restart_needed: list[str] = field(default_factory=list)
    applied_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "reloads": {"success": self.successes,
                                                   "failure": self.failures},
                "last_result": self.last_result, "last_error": self.last_error,
                "last_reload_at": self.last_at, "applied_at": self.applied_at,
                "restart_needed": list(self.restart_needed)}


class Reloader(Collector):
    """Reads the config again and hands it to the agent; a Prometheus collector for
    probewire_config_reloads_total."""

    def __init__(self, agent: Agent, path: Path | None, env: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None,
                 load: Callable[[], Config] | None = None) -> None:
        self.agent = agent
        self.path = path
        self.env = dict(os.environ if env is None else env)
        self.flags = dict(flags or {})
        self._load = load or (lambda: resolve_config(self.path, self.env, self.flags))
        self.status = ReloadStatus(source=str(path) if path else "<no file>",
                                   applied_at=time.time())
        self._lock = threading.Lock()
        agent.reload_status = self.status

    def reload(self, reason: str = "") -> bool:
        """Read, validate and apply; False (and the old config kept) on any error."""
        with self._lock:
            self.status.last_at = time.time()
            try:
                config = self._load()
            except ProbewireError as exc:
                self._failed(str(exc), reason)
                return False
            try:
                pending = self.agent.reconfigure(config)
            except Exception as exc:
                log.exception("applying the new configuration failed")
                self._failed(f"{type(exc).__name__}: {exc}", reason)
                return False
            self.status.successes += 1
            self.status.last_result = "success"
            self.status.last_error = ""
            self.status.applied_at = time.time()
            self.status.restart_needed = pending
            log.info("configuration reloaded%s%s", f" ({reason})" if reason else "",
                     f"; these keys change only after a restart: {', '.join(pending)}"
                     if pending else "")
            return True

    def _failed(self, message: str, reason: str) -> None:
        self.status.failures += 1
        self.status.last_result = "failure"
        self.status.last_error = message
        log.error("configuration reload%s refused, the running configuration stays: %s",
                  f" ({reason})" if reason else "", message)

    def collect(self) -> Iterable[Metric]:
        reloads = CounterMetricFamily(
            "probewire_config_reloads",
            "Configuration reloads (file change or SIGHUP), by result; a failure keeps the "
            "running configuration.", labels=["result"])
        reloads.add_metric(["success"], self.status.successes)
        reloads.add_metric(["failure"], self.status.failures)
        applied = GaugeMetricFamily(
            "probewire_config_last_reload_success_timestamp_seconds",
            "When the running configuration was applied (start-up or the last good reload).")
        applied.add_metric([], self.status.applied_at)
        yield reloads
        yield applied


class ConfigWatcher:
    """Calls `on_change` when the file at `path` (through any symlinks) changes."""

    def __init__(self, path: Path, on_change: Callable[[], Any], poll_s: float = POLL_S) -> None:
        self.path = path
        self.on_change = on_change
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = self._stamp()

    def _stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # mid-swap, or removed: wait for it to come back
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self) -> bool:
        """One poll; True if the file changed (and on_change ran)."""
        stamp = self._stamp()
        if stamp is None or stamp == self._last:
            return False
        self._last = stamp
        self.on_change()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:
                log.exception("config watcher failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="probewire-config-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
