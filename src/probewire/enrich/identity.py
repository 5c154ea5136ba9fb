"""Service identity as one opaque string key, and its expansion into labels at export.

Every probe family keys its series by a service name string. Inside Kubernetes a service is
more than a name: ``cart`` in namespace ``shop`` and ``cart`` in ``staging`` are two services,
and dashboards group by namespace and workload. Rather than teach every family new label sets,
the resolver hands out a *service key*: the plain name where there is no Kubernetes identity
(so nothing changes on a plain host), else the name, namespace, workload kind and name, and
(with ``kubernetes.pod_label``) the pod, joined by an ASCII unit separator that no name can
contain. Keys are unique per label set, so families keep distinct series for distinct
services without knowing why; the export stage expands them:

- metrics: ``service_name`` becomes service_name + k8s_namespace_name + the workload label by
  kind (k8s_deployment_name, k8s_statefulset_name, k8s_daemonset_name, k8s_job_name,
  k8s_cronjob_name, k8s_replicaset_name) [+ k8s_pod_name]; the service graph's ``client`` and
  ``server`` get the same with a ``client_``/``server_`` prefix (Tempo's dimension naming);
- spans and OTLP resources: service.name, service.namespace, k8s.namespace.name,
  k8s.<kind>.name, k8s.pod.name (semantic conventions).

A peer address in the service graph (``10.1.2.3:8080`` or a remote client ``10.1.2.3``) is
replaced by the key of the pod or Service that owns it when the resolver knows one; label
sets that then coincide are summed, which is exact for counters and histogram samples.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import Metric

__all__ = [
    "SEPARATOR",
    "LabelExpander",
    "ServiceIdentity",
    "display_name",
    "parse_service_key",
    "resource_attributes",
    "service_key",
    "service_labels",
]

SEPARATOR = "\x1f"  # ASCII unit separator: in no pod, namespace, unit, exe or rule name
WORKLOAD_LABELS = {
    "deployment": "k8s_deployment_name",
    "statefulset": "k8s_statefulset_name",
    "daemonset": "k8s_daemonset_name",
    "job": "k8s_job_name",
    "cronjob": "k8s_cronjob_name",
    "replicaset": "k8s_replicaset_name",
}
# Labels whose values are service keys; the value is the label prefix of the expansion.
SERVICE_LABELS = {"service_name": "", "client": "client_", "server": "server_"}
PEER_LABELS = ("client", "server")


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    name: str
    namespace: str = ""
    workload_kind: str = ""
    workload_name: str = ""
    pod: str = ""


def service_key(name: str, namespace: str = "", workload_kind: str = "",
                workload_name: str = "", pod: str = "") -> str:
    """The key of a service; just `name` when it has no Kubernetes identity."""
    name = name.replace(SEPARATOR, " ")
    if not namespace:
        return name
    return SEPARATOR.join((name, namespace, workload_kind, workload_name, pod))


def parse_service_key(key: str) -> ServiceIdentity:
    if SEPARATOR not in key:
        return ServiceIdentity(key)
    parts = (key.split(SEPARATOR) + [""] * 5)[:5]
    return ServiceIdentity(*parts)


def service_labels(key: str, prefix: str = "") -> dict[str, str]:
    """The metric labels of a service key (the name under ``<prefix>service_name``, or under
    the prefix alone for the service graph's client/server)."""
    ident = parse_service_key(key)
    name_label = f"{prefix}service_name" if not prefix else prefix.rstrip("_")
    out = {name_label: ident.name}
    if ident.namespace:
        out[f"{prefix}k8s_namespace_name"] = ident.namespace
    label = WORKLOAD_LABELS.get(ident.workload_kind)
    if label and ident.workload_name:
        out[f"{prefix}{label}"] = ident.workload_name
    if ident.pod:
        out[f"{prefix}k8s_pod_name"] = ident.pod
    return out


def resource_attributes(key: str) -> dict[str, str]:
    """OpenTelemetry resource attributes of a service key."""
    ident = parse_service_key(key)
    out = {"service.name": ident.name}
    if ident.namespace:
        out["service.namespace"] = ident.namespace
        out["k8s.namespace.name"] = ident.namespace
    if ident.workload_kind and ident.workload_name:
        out[f"k8s.{ident.workload_kind}.name"] = ident.workload_name
    if ident.pod:
        out["k8s.pod.name"] = ident.pod
    return out


def display_name(key: str) -> str:
    """How a key reads in the UI, the events feed and logs: ``cart (shop)``."""
    ident = parse_service_key(key)
    if not ident.namespace:
        return ident.name
    pod = f"/{ident.pod}" if ident.pod else ""
    return f"{ident.name} ({ident.namespace}{pod})"


def _peer_address(value: str) -> str | None:
    """The IP of a service-graph peer written as an address (``ip``, ``ip:port``,
    ``[v6]:port``), or None when the value is a service key or a word like ``other``."""
    host = value
    if value.startswith("["):
        host = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        host = value.rsplit(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class LabelExpander:
    """Expands service keys in metric families (see the module docstring).

    `peer_key(ip)` names a peer address (a pod's or Service's key) or returns None.
    """

    def __init__(self, peer_key: Callable[[str], str | None] | None = None) -> None:
        self.peer_key = peer_key
        self._cache: dict[tuple[str, str], Mapping[str, str]] = {}

    def _expand(self, label: str, value: str) -> Mapping[str, str]:
        cached = self._cache.get((label, value))
        if cached is not None:
            return cached
        key = value
        if label in PEER_LABELS and self.peer_key is not None:
            ip = _peer_address(value)
            if ip is not None:
                key = self.peer_key(ip) or value
        out = service_labels(key, SERVICE_LABELS[label])
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[(label, value)] = out
        return out

    def labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        """One sample's labels, keys expanded."""
        if not any(name in SERVICE_LABELS for name in labels):
            return dict(labels)
        out: dict[str, str] = {}
        for name, value in labels.items():
            if name in SERVICE_LABELS and (SEPARATOR in value or name in PEER_LABELS):
                out.update(self._expand(name, value))
            else:
                out[name] = value
        return out

    def families(self, families: Iterable[Metric]) -> Iterator[Metric]:
        """The families with keys expanded; a family untouched when no key needs it."""
        # Peer names change as pods come and go; a scrape's worth of cache is enough.
        self._cache.clear()
        for family in families:
            if not family.samples or not any(
                    name in SERVICE_LABELS and (SEPARATOR in value or name in PEER_LABELS)
                    for s in family.samples for name, value in s.labels.items()):
                yield family
                continue
            merged: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            order: list[tuple[str, tuple[tuple[str, str], ...]]] = []
            exemplars = {}
            for s in family.samples:
                labels = tuple(sorted(self.labels(s.labels).items()))
                k = (s.name, labels)
                if k in merged:
                    # Two addresses (or keys) of one service: counts and buckets add up.
                    merged[k] += s.value
                else:
                    merged[k] = s.value
                    order.append(k)
                    exemplars[k] = s
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for k in order:
                s = exemplars[k]
                out.add_sample(k[0], dict(k[1]), merged[k], s.timestamp, s.exemplar)
            yield out
