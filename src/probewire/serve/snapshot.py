"""One consistent reading of the agent's state for the UI, the JSON API and `probewire top`.

A snapshot is built from the same metric families /metrics renders (one `registry.collect()`),
so every count the API shows equals the Prometheus series of the same moment, and the serve
stage needs nothing from a probe family beyond the metric names in DESIGN.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.registry import CollectorRegistry

Labels = tuple[str, ...]

SERVER = "http_server_request_duration_seconds"
CLIENT = "http_client_request_duration_seconds"
DB_CLIENT = "db_client_operation_duration_seconds"
DB_SERVER = "db_server_operation_duration_seconds"
DNS = "dns_lookup_duration_seconds"
EDGE_TOTAL = "traces_service_graph_request_total"
EDGE_FAILED = "traces_service_graph_request_failed_total"
EDGE_SERVER_SECONDS = "traces_service_graph_request_server_seconds"
EDGE_CLIENT_SECONDS = "traces_service_graph_request_client_seconds"
TCP_COUNTERS = {
    "probewire_tcp_connections_opened_total": "opened",
    "probewire_tcp_connections_closed_total": "closed",
    "probewire_tcp_connections_failed_total": "failed",
    "probewire_tcp_retransmits_total": "retransmits",
    "probewire_tcp_bytes_sent_total": "bytes_sent",
    "probewire_tcp_bytes_received_total": "bytes_received",
}
# Per-family series the API shows elsewhere; the rest of probewire_* is the agent's own.
FAMILY_PREFIXES = ("probewire_tcp_", "probewire_process_", "probewire_http_", "probewire_l7_",
                   "probewire_sched_", "probewire_block_", "probewire_oom_")
TCP_RESETS = "probewire_tcp_resets_total"
TCP_RTT = "probewire_tcp_rtt_seconds"
TCP_LABELS = ("service_name", "direction", "server_address", "server_port")
SERVER_LABELS = ("service_name", "http_request_method", "http_response_status_code", "http_route")
CLIENT_LABELS = (*SERVER_LABELS, "server_address", "server_port")
DB_SERVER_LABELS = ("service_name", "db_system_name", "db_operation_name", "db_collection_name",
                    "db_namespace", "error_type", "db_response_status_code")
DB_CLIENT_LABELS = (*DB_SERVER_LABELS, "server_address", "server_port")
DNS_LABELS = ("service_name", "dns_question_name", "dns_question_type", "error_type")


@dataclass
class Histogram:
    """Cumulative Prometheus-style buckets (upper bound -> count), count and sum in seconds."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    sum: float = 0.0

    def merge(self, other: Histogram) -> None:
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n
        self.count += other.count
        self.sum += other.sum

    def cumulative(self) -> list[tuple[float, float]]:
        return sorted(self.buckets.items())

    def quantile(self, q: float) -> float | None:
        return quantile(q, self.cumulative())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q.

    A rank that lands in the +Inf bucket answers the highest finite bound. None without data.
    """
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    total = cumulative[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, n in cumulative:
        if n >= rank and n > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (n - below)
        if not math.isinf(le):
            lower = le
        below = n
    return lower


@dataclass
class EdgeStats:
    requests: float = 0.0
    failed: float = 0.0
    duration: Histogram = field(default_factory=Histogram)
    connection_type: str = ""  # "database" for calls to databases and caches


@dataclass
class TcpStats:
    counters: dict[str, float] = field(default_factory=dict)
    rtt: Histogram = field(default_factory=Histogram)


@dataclass
class Snapshot:
    taken_at: float
    server: dict[Labels, Histogram]  # SERVER_LABELS
    client: dict[Labels, Histogram]  # CLIENT_LABELS
    edges: dict[tuple[str, str], EdgeStats]
    tcp: dict[Labels, TcpStats]  # TCP_LABELS
    self_samples: list[tuple[str, dict[str, str], float]]
    db_client: dict[Labels, Histogram] = field(default_factory=dict)  # DB_CLIENT_LABELS
    db_server: dict[Labels, Histogram] = field(default_factory=dict)  # DB_SERVER_LABELS
    dns: dict[Labels, Histogram] = field(default_factory=dict)  # DNS_LABELS

    # --- derived views ----------------------------------------------------------------------
    def services(self) -> set[str]:
        names = self.local_services()
        for client, server in self.edges:
            names.update((client, server))
        return names

    def local_services(self) -> set[str]:
        """Services seen as a local process (a server or client the probes attributed)."""
        return ({k[0] for k in self.server} | {k[0] for k in self.client}
                | {k[0] for k in self.db_client} | {k[0] for k in self.db_server}
                | {k[0] for k in self.dns})

    def databases(self) -> dict[str, str]:
        """Services that are databases or caches -> their system (postgresql, redis ...): the
        servers of database edges, and processes serving a database protocol."""
        systems: dict[str, str] = {k[0]: k[1] for k in self.db_server}
        by_endpoint = {f"{k[7]}:{k[8]}": k[1] for k in self.db_client}
        for (_, server), e in self.edges.items():
            if e.connection_type == "database":
                systems.setdefault(server, by_endpoint.get(server, "database"))
        return systems


def _labels(sample_labels: dict[str, str], names: Iterable[str]) -> Labels:
    return tuple(sample_labels.get(n, "") for n in names)


# A service inside Kubernetes is its name and namespace (enrich/identity.py): "cart (shop)" and
# "cart (staging)" are two services here too, never one series overwriting the other.
_NAMESPACED = (("service_name", "k8s_namespace_name"), ("client", "client_k8s_namespace_name"),
               ("server", "server_k8s_namespace_name"))


def _namespaced(sample_labels: dict[str, str]) -> dict[str, str]:
    if not any(ns in sample_labels for _, ns in _NAMESPACED):
        return sample_labels
    out = dict(sample_labels)
    for name, ns in _NAMESPACED:
        if name in out and out.get(ns):
            out[name] = f"{out[name]} ({out[ns]})"
    return out


def _hist_sample(hists: dict[Labels, Histogram], key: Labels, suffix: str, le: str | None,
                 value: float) -> None:
    h = hists.setdefault(key, Histogram())
    if suffix == "_bucket" and le is not None:
        h.buckets[float(le)] = value
    elif suffix == "_count":
        h.count = value
    elif suffix == "_sum":
        h.sum = value


def take(registry: CollectorRegistry) -> Snapshot:
    server: dict[Labels, Histogram] = {}
    client: dict[Labels, Histogram] = {}
    edge_server_s: dict[Labels, Histogram] = {}
    edge_client_s: dict[Labels, Histogram] = {}
    edges: dict[tuple[str, str], EdgeStats] = {}
    tcp: dict[Labels, TcpStats] = {}
    self_samples: list[tuple[str, dict[str, str], float]] = []
    db_client: dict[Labels, Histogram] = {}
    db_server: dict[Labels, Histogram] = {}
    dns: dict[Labels, Histogram] = {}
    hist_families = {
        SERVER: (server, SERVER_LABELS),
        CLIENT: (client, CLIENT_LABELS),
        EDGE_SERVER_SECONDS: (edge_server_s, ("client", "server")),
        EDGE_CLIENT_SECONDS: (edge_client_s, ("client", "server")),
        DB_CLIENT: (db_client, DB_CLIENT_LABELS),
        DB_SERVER: (db_server, DB_SERVER_LABELS),
        DNS: (dns, DNS_LABELS),
    }
    for family in registry.collect():
        for s in family.samples:
            name, labels, value = s.name, _namespaced(s.labels), float(s.value)
            if family.name in hist_families:
                hists, names = hist_families[family.name]
                suffix = name[len(family.name):]
                _hist_sample(hists, _labels(labels, names), suffix, labels.get("le"), value)
            elif name in (EDGE_TOTAL, EDGE_FAILED):
                e = edges.setdefault((labels.get("client", ""), labels.get("server", "")),
                                     EdgeStats())
                if name == EDGE_TOTAL:
                    e.requests += value
                else:
                    e.failed += value
                e.connection_type = labels.get("connection_type", "") or e.connection_type
            elif name in TCP_COUNTERS:
                t = tcp.setdefault(_labels(labels, TCP_LABELS), TcpStats())
                t.counters[TCP_COUNTERS[name]] = value
            elif name == TCP_RESETS:
                t = tcp.setdefault(_labels(labels, TCP_LABELS), TcpStats())
                key = f"resets_{labels.get('reset', '')}"
                t.counters[key] = t.counters.get(key, 0.0) + value
            elif family.name == TCP_RTT:
                t = tcp.setdefault(_labels(labels, TCP_LABELS), TcpStats())
                suffix = name[len(family.name):]
                if suffix == "_bucket":
                    t.rtt.buckets[float(labels["le"])] = value
                elif suffix == "_count":
                    t.rtt.count = value
                elif suffix == "_sum":
                    t.rtt.sum = value
            elif name.startswith("probewire_") and not name.startswith(FAMILY_PREFIXES):
                self_samples.append((name, dict(labels), value))
        # Let this family go before the next one is built (the loop variable would keep it).
        del family
    for pair, e in edges.items():
        # The server's own view of the call when it is traced, else the client's.
        h = edge_server_s.get(pair) or edge_client_s.get(pair)
        if h is not None:
            e.duration = h
    return Snapshot(time.time(), server, client, edges, tcp, self_samples, db_client,
                    db_server, dns)


def is_error_status(status: str) -> bool:
    return status.startswith("5")
