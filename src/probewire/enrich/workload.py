"""cgroup path -> container -> pod: the identity sources of enrich/ behind one object.

The container store (runtime state files) always works; the Kubernetes store (API watches)
only where the API server is reachable. Who owns a container is answered from the API first
(exact workload, labels) and from the container's CRI annotations otherwise.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from probewire.config import ContainersConfig, FilterConfig, KubernetesConfig
from probewire.enrich.container import (
    ContainerInfo,
    ContainerRef,
    ContainerStore,
    container_from_cgroup,
    iter_container_cgroups,
)
from probewire.enrich.kubernetes import (
    ApiClient,
    KubeStore,
    PodIdentity,
    PodMeta,
    identity_from_annotations,
    node_name,
)
from probewire.errors import ConfigError

__all__ = ["Workload", "WorkloadResolver", "matches_selectors"]

log = logging.getLogger(__name__)

NOTIFY_S = 0.2


@dataclass(frozen=True, slots=True)
class Workload:
    """A container and, inside Kubernetes, its pod."""

    container: ContainerInfo
    pod: PodIdentity | None


def matches_selectors(pod: PodIdentity | None, selectors: FilterConfig) -> bool:
    """Whether a container's pod passes filter.k8s_namespaces/_workloads/_labels (all that are
    set must match; a container outside Kubernetes matches none)."""
    if pod is None:
        return False
    if selectors.k8s_namespaces and not any(
            fnmatch.fnmatchcase(pod.namespace, p) for p in selectors.k8s_namespaces):
        return False
    if selectors.k8s_workloads:
        full = f"{pod.workload_kind}/{pod.workload_name}"
        if not any(fnmatch.fnmatchcase(full if "/" in p else pod.workload_name, p)
                   for p in selectors.k8s_workloads):
            return False
    return all(pod.labels.get(k) == v for k, v in selectors.k8s_labels.items())


class WorkloadResolver:
    """Thread-safe; `on_change` listeners are called (on a watch thread) when pods change."""

    def __init__(self, containers: ContainersConfig, kubernetes: KubernetesConfig,
                 env: Mapping[str, str] = os.environ) -> None:
        self.store = ContainerStore(dict(containers.state_paths))
        self.kubernetes = kubernetes
        self.env = env
        self.kube: KubeStore | None = None
        self.listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # Pod events come in bursts (a rollout, a relist): listeners (renaming, the filter
        # scan) run once per burst, at most every NOTIFY_S, on their own thread.
        self._pending = threading.Event()
        self._stopping = threading.Event()
        self._notifier: threading.Thread | None = None

    def start(self) -> None:
        """Start the API watches when configured (kubernetes.api) and reachable."""
        cfg = self.kubernetes
        if cfg.api == "off":
            return
        client = ApiClient.in_cluster(cfg.api_url, cfg.token_file, cfg.ca_file, self.env)
        if client is None:
            if cfg.api == "on":
                raise ConfigError(
                    "kubernetes.api: on, but no API server is known; run in a pod (which sets "
                    "KUBERNETES_SERVICE_HOST) or set kubernetes.api_url")
            return
        self._stopping.clear()
        self._notifier = threading.Thread(target=self._notify, name="probewire-k8s-notify",
                                          daemon=True)
        self._notifier.start()
        self.kube = KubeStore(client, node_name(cfg.node_name, self.env), cfg.cluster_peers,
                              on_change=self._pending.set)
        if not self.kube.start(cfg.startup_wait_s):
            log.warning("kubernetes: the API server at %s did not list pods within %.1f s; "
                        "naming from container annotations until it does", client.url,
                        cfg.startup_wait_s)

    def stop(self) -> None:
        if self.kube is not None:
            self.kube.stop()
            self.kube = None
        self._stopping.set()
        self._pending.set()
        if self._notifier is not None:
            self._notifier.join(timeout=5)
            self._notifier = None

    def _notify(self) -> None:
        while True:
            self._pending.wait()
            if self._stopping.is_set():
                return
            self._pending.clear()
            self._changed()
            if self._stopping.wait(NOTIFY_S):
                return

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:
                log.exception("workload listener %r failed", listener)

    def reconfigure(self, containers: ContainersConfig) -> None:
        if dict(containers.state_paths) != self.store.state_paths:
            self.store = ContainerStore(dict(containers.state_paths))
            self._changed()

    # --- lookups -------------------------------------------------------------------------------
    def for_container(self, ref: ContainerRef, cgroup_path: str = "") -> Workload:
        info = self.store.lookup(ref)
        pod = None
        if self.kube is not None:
            meta = self.kube.pod(container_id=ref.id)
            if meta is None and cgroup_path:
                from probewire.enrich.service import pod_uid_from_cgroup

                uid = pod_uid_from_cgroup(cgroup_path)
                meta = self.kube.pod(uid=uid) if uid else None
            if meta is None:
                annotated = identity_from_annotations(info.annotations)
                if annotated is not None and annotated.uid:
                    meta = self.kube.pod(uid=annotated.uid)
            if meta is not None:
                pod = meta.identity(ref.id, info.name)
        if pod is None:
            pod = identity_from_annotations(info.annotations)
        return Workload(info, pod)

    def for_cgroup(self, cgroup_path: str) -> Workload | None:
        """The workload of a cgroup v2 path (or v1 name=systemd path), None outside containers."""
        ref = container_from_cgroup(cgroup_path)
        return self.for_container(ref, cgroup_path) if ref is not None else None

    def pod_by_ip(self, ip: str) -> PodMeta | None:
        return self.kube.pod_by_ip(ip) if self.kube is not None else None

    def service_by_ip(self, ip: str) -> tuple[str, str] | None:
        return self.kube.service_by_ip(ip) if self.kube is not None else None

    def containers(self, root: Path) -> Iterator[tuple[str, Workload]]:
        """Every container cgroup under a cgroup root with its workload."""
        for rel, ref in iter_container_cgroups(root):
            yield rel, self.for_container(ref, rel)
