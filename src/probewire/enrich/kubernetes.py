"""Kubernetes identity: pod, namespace, container and workload of a container.

Two sources, best first:

1. **The API server** (in-cluster service account), when reachable: a list + watch of this
   node's pods (``fieldSelector=spec.nodeName=<node>``) gives labels and owner references, so
   the workload is exact (a ReplicaSet whose name is ``<x>-<pod-template-hash>`` belongs to
   Deployment ``x``). Optionally a second list + watch of every pod and Service in the cluster
   (IPs and names only) names peer addresses anywhere. Watches resume from the last
   ``resourceVersion``; a ``410 Gone`` (the version was compacted away) lists again.
2. **The CRI annotations** that kubelet's runtimes copy into each container's OCI config:
   ``io.kubernetes.pod.name`` / ``.pod.namespace`` / ``.container.name`` (CRI-O, and the
   generic ones), or containerd's ``io.kubernetes.cri.sandbox-name`` / ``sandbox-namespace`` /
   ``container-name``. The workload then comes from the pod name's generated suffixes, a
   heuristic (see :func:`workload_from_pod_name`).

The API client is a few dozen lines over http.client on purpose: an agent needs five fields
of a pod, and the official client builds a full model object per pod and event (the bench
replays 5,000 pods) and imports a thousand model modules into a process that must stay small.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from probewire.errors import ConfigError

__all__ = [
    "WORKLOAD_KINDS",
    "ApiClient",
    "ApiError",
    "KubeStore",
    "PodIdentity",
    "PodMeta",
    "Reflector",
    "identity_from_annotations",
    "pod_from_object",
    "workload_from_owner",
    "workload_from_pod_name",
]

log = logging.getLogger(__name__)

# Workload kinds that get their own metric label (k8s_<kind>_name) and resource attribute.
WORKLOAD_KINDS = ("deployment", "statefulset", "daemonset", "job", "cronjob", "replicaset")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Name generation (k8s.io/apimachinery/pkg/util/rand.SafeEncodeString): consonants and digits
# that cannot spell words. A ReplicaSet is <deployment>-<hash of up to 10 of them>, its pods
# <replicaset>-<5 of them>; a DaemonSet's or Job's pods <name>-<5>; a CronJob's Jobs are
# <cronjob>-<scheduled time in minutes>, a StatefulSet's pods <name>-<ordinal>.
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_CRONJOB_POD = re.compile(rf"^(.+)-\d{{8,}}-{_SAFE}{{5}}$")
_DEPLOYMENT_POD = re.compile(rf"^(.+)-{_SAFE}{{1,10}}-{_SAFE}{{5}}$")
_STATEFULSET_POD = re.compile(r"^(.+)-\d+$")
_DAEMONSET_POD = re.compile(rf"^(.+)-{_SAFE}{{5}}$")
_CRONJOB_JOB = re.compile(r"^(.+)-\d{8,}$")


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Who a container is in Kubernetes terms; workload_kind is one of WORKLOAD_KINDS or ""."""

    namespace: str
    pod: str
    container: str = ""
    uid: str = ""
    workload_kind: str = ""
    workload_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    from_api: bool = False


def workload_from_pod_name(pod: str) -> tuple[str, str]:
    """(kind, name) of the workload that generated a pod's name, or ("", "") for a bare pod.

    A documented heuristic for when the API server is not reachable: ``cart-7d9f8b6c5d-x2x9k``
    is Deployment ``cart``, ``backup-28391040-abcde`` CronJob ``backup``, ``db-0`` StatefulSet
    ``db``, ``fluentd-x2x9k`` DaemonSet ``fluentd`` (a Job's pods look the same and are taken
    for a DaemonSet; with API access owner references decide instead).
    """
    for pattern, kind in ((_CRONJOB_POD, "cronjob"), (_DEPLOYMENT_POD, "deployment"),
                          (_STATEFULSET_POD, "statefulset"), (_DAEMONSET_POD, "daemonset")):
        m = pattern.match(pod)
        if m:
            return kind, m.group(1)
    return "", ""


def workload_from_owner(owner_kind: str, owner_name: str,
                        labels: Mapping[str, str]) -> tuple[str, str]:
    """(kind, name) from a pod's controlling owner reference."""
    kind = owner_kind.lower()
    if kind == "replicaset":
        pod_hash = labels.get("pod-template-hash", "")
        if pod_hash and owner_name.endswith(f"-{pod_hash}"):
            return "deployment", owner_name[: -len(pod_hash) - 1]
        return "replicaset", owner_name
    if kind == "job":
        m = _CRONJOB_JOB.match(owner_name)
        # A CronJob names its Jobs <cronjob>-<minutes since the epoch>; reading the Job's own
        # owner would need one more watch for a name the pattern already gives.
        return ("cronjob", m.group(1)) if m else ("job", owner_name)
    if kind in WORKLOAD_KINDS:
        return kind, owner_name
    return "", ""


def identity_from_annotations(annotations: Mapping[str, str]) -> PodIdentity | None:
    """The pod of a container from its OCI annotations, or None outside Kubernetes."""
    pod = (annotations.get("io.kubernetes.pod.name")
           or annotations.get("io.kubernetes.cri.sandbox-name"))
    namespace = (annotations.get("io.kubernetes.pod.namespace")
                 or annotations.get("io.kubernetes.cri.sandbox-namespace"))
    if not pod or not namespace:
        return None
    container = (annotations.get("io.kubernetes.container.name")
                 or annotations.get("io.kubernetes.cri.container-name") or "")
    uid = (annotations.get("io.kubernetes.pod.uid")
           or annotations.get("io.kubernetes.cri.sandbox-uid") or "")
    kind, name = workload_from_pod_name(pod)
    # Pod labels are not in CRI annotations; a runtime started by hand (podman, docker) may
    # carry the recommended name label as an annotation, which is then as good as one.
    labels = {k: v for k, v in annotations.items() if k.startswith("app.kubernetes.io/")}
    return PodIdentity(namespace, pod, container, uid, kind, name, labels)


@dataclass(frozen=True, slots=True)
class PodMeta:
    """The fields of a pod object the agent keeps (one per pod; 5,000 in the bench)."""

    uid: str
    namespace: str
    name: str
    node: str
    labels: Mapping[str, str]
    workload_kind: str
    workload_name: str
    ips: tuple[str, ...]
    host_network: bool
    containers: Mapping[str, str]  # container id (no runtime:// prefix) -> container name

    def identity(self, container_id: str = "", container: str = "") -> PodIdentity:
        return PodIdentity(self.namespace, self.name,
                           self.containers.get(container_id, container), self.uid,
                           self.workload_kind, self.workload_name, self.labels, from_api=True)


def pod_from_object(obj: Mapping[str, Any]) -> PodMeta | None:
    """PodMeta from a v1 Pod JSON object; None if it is not one."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("uid"):
        return None
    spec: dict[str, Any] = obj["spec"] if isinstance(obj.get("spec"), dict) else {}
    status: dict[str, Any] = obj["status"] if isinstance(obj.get("status"), dict) else {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    kind, name = "", ""
    for owner in meta.get("ownerReferences") or ():
        if isinstance(owner, dict) and owner.get("controller"):
            kind, name = workload_from_owner(str(owner.get("kind", "")),
                                             str(owner.get("name", "")), labels)
            break
    ips = tuple(str(p["ip"]) for p in status.get("podIPs") or ()
                if isinstance(p, dict) and p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (str(status["podIP"]),)
    containers: dict[str, str] = {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for c in status.get(key) or ():
            cid = str(c.get("containerID") or "") if isinstance(c, dict) else ""
            if cid:
                containers[cid.rsplit("://", 1)[-1]] = str(c.get("name", ""))
    return PodMeta(
        uid=str(meta["uid"]), namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")), node=str(spec.get("nodeName", "")),
        labels=labels, workload_kind=kind, workload_name=name, ips=ips,
        host_network=bool(spec.get("hostNetwork")), containers=containers,
    )


_NAME_LABEL = "app.kubernetes.io/name"


def _peer_only(pod: PodMeta) -> PodMeta:
    label = pod.labels.get(_NAME_LABEL)
    return PodMeta(pod.uid, sys.intern(pod.namespace), pod.name, sys.intern(pod.node),
                   {_NAME_LABEL: label} if label else {}, pod.workload_kind,
                   sys.intern(pod.workload_name), pod.ips, pod.host_network, {})


# --- the API client ----------------------------------------------------------------------------

class ApiError(Exception):
    """An API request failed; `status` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """GET and streaming GET against the Kubernetes API with a bearer token.

    The token file is read on every request: projected service-account tokens are rotated
    by kubelet under a running pod.
    """

    def __init__(self, url: str, token_file: str | None = None, ca_file: str | None = None,
                 timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"kubernetes.api_url: {url!r} is not an http(s) URL; write e.g. "
                "https://10.96.0.1:443, or leave it unset inside a pod")
        self.url = url.rstrip("/")
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.token_file = token_file
        self.timeout_s = timeout_s
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_file if ca_file and
                                                   os.path.exists(ca_file) else None)

    @classmethod
    def in_cluster(cls, api_url: str | None, token_file: str, ca_file: str,
                   env: Mapping[str, str] = os.environ) -> ApiClient | None:
        """The client a pod uses (KUBERNETES_SERVICE_HOST/PORT), or for `api_url`; None when
        there is neither (not in a cluster)."""
        if api_url is None:
            host = env.get("KUBERNETES_SERVICE_HOST")
            if not host:
                return None
            port = env.get("KUBERNETES_SERVICE_PORT", "443")
            api_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(api_url, token_file, ca_file)

    def _connection(self, timeout_s: float | None) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout_s,
                                               context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "probewire"}
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    headers["Authorization"] = f"Bearer {f.read().strip()}"
            except OSError:
                pass  # anonymous: the API answers 401/403, reported as such
        return headers

    def _open(self, path: str, query: Mapping[str, str], timeout_s: float | None,
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connection(timeout_s)
        target = f"{self._prefix}{path}?{urlencode(query)}" if query else f"{self._prefix}{path}"
        try:
            conn.request("GET", target, headers=self._headers())
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ApiError(0, f"GET {self.url}{path}: {exc}") from None
        if resp.status != 200:
            body = resp.read(4096).decode("utf-8", "replace")
            conn.close()
            raise ApiError(resp.status, f"GET {self.url}{path}: HTTP {resp.status}: {body}")
        return conn, resp

    def get(self, path: str, query: Mapping[str, str]) -> Any:
        conn, resp = self._open(path, query, self.timeout_s)
        try:
            return json.loads(resp.read())
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise ApiError(0, f"GET {self.url}{path}: bad answer: {exc}") from None
        finally:
            conn.close()

    def stream(self, path: str, query: Mapping[str, str], read_timeout_s: float,
               ) -> Iterator[Any]:
        """The JSON documents of a watch, one per line, until the server ends it."""
        conn, resp = self._open(path, query, read_timeout_s)
        try:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise ApiError(0, f"watch {path}: {exc}") from None
                if not line:
                    return
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise ApiError(0, f"watch {path}: a line is not JSON") from None
        finally:
            conn.close()


# One resource's event: ("ADDED" | "MODIFIED" | "DELETED" | "SYNC", object). SYNC replaces the
# whole set after a (re)list: the objects are every one that exists.
Handler = Callable[[str, list[Mapping[str, Any]]], None]


class Reflector:
    """List, then watch from the list's resourceVersion, forever (client-go's reflector).

    A watch that ends is resumed from the last version seen (BOOKMARK events move it too);
    ``410 Gone`` lists again from scratch; other errors back off and retry.
    """

    def __init__(self, client: ApiClient, path: str, query: Mapping[str, str],
                 handler: Handler, name: str, watch_timeout_s: int = 300,
                 page_size: int = 500) -> None:
        self.client = client
        self.path = path
        self.query = dict(query)
        self.handler = handler
        self.name = name
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self.resource_version = ""
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.errors = 0
        self.last_error = ""
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def list_once(self) -> None:
        items: list[Mapping[str, Any]] = []
        cont = ""
        while True:
            query = {**self.query, "limit": str(self.page_size)}
            if cont:
                query["continue"] = cont
            page = self.client.get(self.path, query)
            items.extend(i for i in page.get("items") or () if isinstance(i, dict))
            meta = page.get("metadata") or {}
            cont = str(meta.get("continue") or "")
            if not cont:
                self.resource_version = str(meta.get("resourceVersion", ""))
                break
        self.lists += 1
        self.handler("SYNC", items)
        self.synced.set()

    def watch_once(self) -> bool:
        """Follow one watch; False when the version is gone and a relist is needed."""
        query = {**self.query, "watch": "1", "allowWatchBookmarks": "true",
                 "resourceVersion": self.resource_version,
                 "timeoutSeconds": str(self.watch_timeout_s)}
        self.watches += 1
        try:
            for event in self.client.stream(self.path, query, self.watch_timeout_s + 30):
                if self._stop.is_set():
                    return True
                kind = event.get("type") if isinstance(event, dict) else None
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(obj, dict):
                    continue
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return False
                    raise ApiError(int(obj.get("code") or 0), str(obj.get("message", "")))
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.resource_version = str(version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.events += 1
                    self.handler(kind, [obj])
        except ApiError as exc:
            if exc.status == 410:
                return False
            raise
        return True

    def run(self) -> None:
        backoff = 0.5
        need_list = not self.resource_version
        while not self._stop.is_set():
            try:
                if need_list:
                    self.list_once()
                    need_list = False
                need_list = not self.watch_once()
                if need_list:
                    log.info("kubernetes %s: resourceVersion %s is gone (410); listing again",
                             self.name, self.resource_version)
                backoff = 0.5
            except ApiError as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("kubernetes %s: %s; retrying in %.1f s", self.name, exc, backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
            except Exception:
                self.errors += 1
                log.exception("kubernetes %s: handler failed", self.name)
                if self._stop.wait(backoff):
                    return

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"probewire-k8s-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # A watch blocked in a read is not interruptible; it is a daemon thread and its
        # socket times out (or the process exits) without us.
        if self._thread is not None:
            self._thread.join(timeout=0.2)


class KubeStore:
    """Pods of this node (by uid and container id), and optionally every pod's and Service's
    address in the cluster, kept current by reflectors. Thread-safe for readers."""

    def __init__(self, client: ApiClient, node_name: str, cluster: bool = True,
                 on_change: Callable[[], None] | None = None) -> None:
        self.client = client
        self.node_name = node_name
        self.on_change = on_change
        self._lock = threading.Lock()
        self._pods: dict[str, PodMeta] = {}  # this node's, by uid
        self._by_container: dict[str, str] = {}  # container id -> pod uid
        self._by_ip: dict[str, PodMeta] = {}
        self._services: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # uid -> ns, name, ips
        self._service_ips: dict[str, tuple[str, str]] = {}
        self._cluster_meta: dict[str, PodMeta] = {}
        self.reflectors = [Reflector(
            client, "/api/v1/pods", {"fieldSelector": f"spec.nodeName={node_name}"},
            self._on_node_pods, "node-pods")]
        if cluster:
            self.reflectors.append(Reflector(client, "/api/v1/pods", {}, self._on_cluster_pods,
                                             "cluster-pods"))
            self.reflectors.append(Reflector(client, "/api/v1/services", {},
                                             self._on_services, "services"))

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, wait_s: float = 5.0) -> bool:
        """Start every watch; wait up to `wait_s` for this node's pods (so processes seen at
        start-up get their workload at once; the cluster-wide lists, only for naming peers,
        arrive when they do). True if they were listed in time."""
        for r in self.reflectors:
            r.start()
        return self.reflectors[0].synced.wait(wait_s)

    def stop(self) -> None:
        for r in self.reflectors:
            r.stop()

    # --- handlers ------------------------------------------------------------------------------
    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _on_node_pods(self, kind: str, objects: list[Mapping[str, Any]]) -> None:
        pods = [p for p in map(pod_from_object, objects) if p is not None]
        with self._lock:
            if kind == "SYNC":
                self._pods = {p.uid: p for p in pods}
                self._by_container = {cid: p.uid for p in pods for cid in p.containers}
            else:
                for p in pods:
                    old = self._pods.pop(p.uid, None)
                    for cid in old.containers if old is not None else ():
                        self._by_container.pop(cid, None)
                    if kind != "DELETED":
                        self._pods[p.uid] = p
                        self._by_container.update(dict.fromkeys(p.containers, p.uid))
        self._changed()

    def _on_cluster_pods(self, kind: str, objects: list[Mapping[str, Any]]) -> None:
        # Kept for naming peers only: the name label and the workload, not every label and
        # container (a cluster holds many more pods than a node).
        pods = [_peer_only(p) for p in map(pod_from_object, objects) if p is not None]
        with self._lock:
            if kind == "SYNC":
                self._cluster_meta = {p.uid: p for p in pods}
                self._by_ip = {ip: p for p in pods if not p.host_network for ip in p.ips}
            else:
                for p in pods:
                    old = self._cluster_meta.pop(p.uid, None)
                    for ip in old.ips if old is not None else ():
                        if self._by_ip.get(ip) is old:
                            del self._by_ip[ip]
                    if kind != "DELETED":
                        self._cluster_meta[p.uid] = p
                        if not p.host_network:
                            self._by_ip.update(dict.fromkeys(p.ips, p))
        # Peers are named at scrape time: nothing cached depends on other nodes' pods.

    def _on_services(self, kind: str, objects: list[Mapping[str, Any]]) -> None:
        with self._lock:
            if kind == "SYNC":
                self._services = {}
            for obj in objects:
                meta = obj.get("metadata") or {}
                spec = obj.get("spec") or {}
                uid = str(meta.get("uid", ""))
                if not uid:
                    continue
                if kind == "DELETED":
                    self._services.pop(uid, None)
                    continue
                ips = tuple(str(ip) for ip in (spec.get("clusterIPs") or
                                               [spec.get("clusterIP")]) if ip and ip != "None")
                self._services[uid] = (str(meta.get("namespace", "")),
                                       str(meta.get("name", "")), ips)
            self._service_ips = {ip: (ns, name) for ns, name, ips in self._services.values()
                                 for ip in ips}
        # Peers are named at scrape time: nothing cached depends on other nodes' pods.

    # --- queries -------------------------------------------------------------------------------
    def pod(self, uid: str = "", container_id: str = "") -> PodMeta | None:
        with self._lock:
            if not uid and container_id:
                uid = self._by_container.get(container_id, "")
            return self._pods.get(uid)

    def pods(self) -> list[PodMeta]:
        with self._lock:
            return list(self._pods.values())

    def pod_by_ip(self, ip: str) -> PodMeta | None:
        with self._lock:
            found = self._by_ip.get(ip)
            if found is None:
                found = next((p for p in self._pods.values() if ip in p.ips
                              and not p.host_network), None)
            return found

    def service_by_ip(self, ip: str) -> tuple[str, str] | None:
        """(namespace, name) of the Service with this cluster IP."""
        with self._lock:
            return self._service_ips.get(ip)

    def status(self) -> dict[str, Any]:
        with self._lock:
            counts = {"node_pods": len(self._pods), "cluster_pods": len(self._cluster_meta),
                      "services": len(self._services)}
        return {**counts, "api_url": self.client.url, "node": self.node_name, "watches": [
            {"name": r.name, "synced": r.synced.is_set(), "lists": r.lists,
             "watches": r.watches, "events": r.events, "errors": r.errors,
             "resource_version": r.resource_version, "last_error": r.last_error}
            for r in self.reflectors]}


def node_name(configured: str | None, env: Mapping[str, str] = os.environ) -> str:
    """This node's name: the config, $NODE_NAME (the DaemonSet sets it from spec.nodeName),
    else the host name."""
    return configured or env.get("NODE_NAME") or socket.gethostname()
