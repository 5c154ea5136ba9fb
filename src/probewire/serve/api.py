"""The JSON API behind the web UI and `probewire top` (described by serve/openapi.py).

Every handler reads one Snapshot (the metric families /metrics renders at that moment), so counts
here equal the Prometheus series; rates and service quantiles come from the History window.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from prometheus_client.registry import CollectorRegistry

from probewire import __version__
from probewire.agent import Agent
from probewire.enrich.identity import display_name
from probewire.probes.custom import CustomProbe
from probewire.probes.process import RECENT_EVENTS, ProcessProbe
from probewire.probes.saturation import SaturationProbe
from probewire.security.engine import SecurityEngine
from probewire.serve.history import RATE_WINDOW_S, History, Window
from probewire.serve.openapi import openapi_document
from probewire.serve.saturation import SaturationView
from probewire.serve.snapshot import Histogram, Snapshot, is_error_status, take


def custom_status(agent: Agent) -> list[dict[str, Any]]:
    """Custom probes (probes.custom) per process: attach state, file, and why not."""
    probe = agent.probes.get("custom")
    return probe.status() if isinstance(probe, CustomProbe) else []


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Query = dict[str, list[str]]


def _int_param(query: Query, name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name, [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name}={raw!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"query parameter {name}={value}: expected {lo}..{hi}")
    return value


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def _looks_external(name: str) -> bool:
    host = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class Api:
    def __init__(self, agent: Agent, registry: CollectorRegistry, history: History) -> None:
        self.agent = agent
        self.registry = registry
        self.history = history
        self.routes: dict[str, Callable[[Query], Any]] = {
            "/api/openapi.json": lambda q: openapi_document(__version__),
            "/api/services": self.services,
            "/api/graph": self.graph,
            "/api/tcp": self.tcp,
            "/api/events": self.events,
            "/api/probes": self.probes,
            "/api/agent": self.agent_info,
            "/api/history": self.history_of,
            "/api/saturation": self.saturation,
            # security (docs/security.md)
            "/api/security/alerts": self.security_alerts,
            "/api/security/rules": self.security_rules,
            "/api/routes": self.learned_routes,
        }
        self.saturation_view = SaturationView(agent.started_at or None)

    def snapshot(self) -> Snapshot:
        return take(self.registry)

    def handle(self, path: str, query: Query) -> Any:
        fn = self.routes.get(path)
        if fn is not None:
            return fn(query)
        prefix = "/api/services/"
        if path.startswith(prefix) and len(path) > len(prefix):
            return self.service(unquote(path[len(prefix):]))
        prefix = "/api/processes/"
        if path.startswith(prefix) and len(path) > len(prefix):
            return self.process(unquote(path[len(prefix):]))
        raise ApiError(404, f"no such endpoint: {path}; see /api/openapi.json")

    # --- services --------------------------------------------------------------------------
    def _kind(self, snap: Snapshot, name: str) -> str:
        if name in snap.databases():
            return "database"
        if name in {k[0] for k in snap.server}:
            return "service"
        if snap.local_services() & {name}:
            return "client"
        return "external" if _looks_external(name) else "service"

    def _summary(self, snap: Snapshot, win: Window, name: str) -> dict[str, Any]:
        requests = sum(h.count for k, h in snap.server.items() if k[0] == name)
        errors = sum(h.count for k, h in snap.server.items()
                     if k[0] == name and is_error_status(k[2]))
        served = [(k, h) for k, h in snap.db_server.items() if k[0] == name]
        if served:  # a database or cache on this host: the operations it served
            requests += sum(h.count for _, h in served)
            errors += sum(h.count for k, h in served if k[5])
        elif not requests and name in snap.databases():  # one elsewhere: what clients saw
            seen = [(k, h) for k, h in snap.db_client.items() if f"{k[7]}:{k[8]}" == name]
            requests = sum(h.count for _, h in seen) or sum(
                e.requests for (_c, srv), e in snap.edges.items() if srv == name)
            errors = sum(h.count for k, h in seen if k[5]) or sum(
                e.failed for (_c, srv), e in snap.edges.items() if srv == name)
        routes = {(k[1], k[3]) for k in snap.server if k[0] == name}
        calls = sum(e.requests for (c, _s), e in snap.edges.items() if c == name)
        return {
            "name": name,
            "kind": self._kind(snap, name),
            "requests": requests,
            "errors": errors,
            "error_ratio": _ratio(errors, requests),
            "rate": win.rate(("svc", name)),
            "error_rate": win.rate(("svc_err", name)),
            "p50_seconds": win.service_quantile(name, 0.5),
            "p99_seconds": win.service_quantile(name, 0.99),
            "routes": len(routes),
            "outgoing_requests": calls,
            "db_system": snap.databases().get(name, ""),
        }

    def services(self, query: Query) -> dict[str, Any]:
        snap = self.snapshot()
        win = self.history.window(snap)
        rows = [self._summary(snap, win, n) for n in snap.services()]
        rows.sort(key=lambda r: (-r["rate"], -r["requests"], r["name"]))
        return {"taken_at": snap.taken_at, "window_seconds": win.seconds, "services": rows}

    def service(self, name: str) -> dict[str, Any]:
        snap = self.snapshot()
        if name not in snap.services():
            raise ApiError(404, f"no service named {name!r}; see /api/services")
        win = self.history.window(snap)
        routes: dict[tuple[str, str], dict[str, Any]] = {}
        hists: dict[tuple[str, str], Histogram] = {}
        for (svc, method, status, route), h in snap.server.items():
            if svc != name:
                continue
            r = routes.setdefault((method, route), {
                "method": method, "route": route, "requests": 0.0, "errors": 0.0,
                "statuses": {},
            })
            r["requests"] += h.count
            if is_error_status(status):
                r["errors"] += h.count
            r["statuses"][status] = r["statuses"].get(status, 0.0) + h.count
            hists.setdefault((method, route), Histogram()).merge(h)
        for key, r in routes.items():
            r["error_ratio"] = _ratio(r["errors"], r["requests"])
            r["rate"] = win.rate(("route", name, *key))
            r["p50_seconds"] = hists[key].quantile(0.5)
            r["p99_seconds"] = hists[key].quantile(0.99)
        route_rows = sorted(routes.values(), key=lambda r: (-r["requests"], r["route"]))
        return {
            **self._summary(snap, win, name),
            "taken_at": snap.taken_at,
            "window_seconds": win.seconds,
            "route_list": route_rows,
            "outgoing": [self._edge(c, s, snap, win) for (c, s) in sorted(snap.edges) if c == name],
            "incoming": [self._edge(c, s, snap, win) for (c, s) in sorted(snap.edges) if s == name],
            "client_calls": self._client_calls(snap, name),
            "db_calls": self._db_calls(snap, name),
            "db_operations": self._db_operations(snap, name),
            "dns_lookups": self._dns_lookups(snap, name),
            "saturation": self._saturation_rows()[1].get(name),
            "learned_routes": self._learned().get("services", {}).get(name, {}).get(
                "templates", []),
        }

    @staticmethod
    def _grouped(items: Sequence[tuple[tuple[str, ...], Histogram, bool]],
                 fields: tuple[str, ...]) -> list[dict[str, Any]]:
        """Rows of (key, histogram, failed?) grouped by key: requests, errors, p50/p99."""
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        hists: dict[tuple[str, ...], Histogram] = {}
        for key, h, failed in items:
            r = rows.setdefault(key, {**dict(zip(fields, key, strict=True)),
                                      "requests": 0.0, "errors": 0.0, "error_types": {}})
            r["requests"] += h.count
            if failed:
                r["errors"] += h.count
            hists.setdefault(key, Histogram()).merge(h)
        for key, r in rows.items():
            r["error_ratio"] = _ratio(r["errors"], r["requests"])
            r["p50_seconds"] = hists[key].quantile(0.5)
            r["p99_seconds"] = hists[key].quantile(0.99)
        return sorted(rows.values(), key=lambda r: (-r["requests"], *(str(r[f]) for f in fields)))

    def _db_calls(self, snap: Snapshot, name: str) -> list[dict[str, Any]]:
        """Database and cache operations this service called, per server and operation."""
        fields = ("db_system", "server_address", "server_port", "operation", "collection",
                  "namespace")
        items = [((k[1], k[7], k[8], k[2], k[3], k[4]), h, bool(k[5]))
                 for k, h in snap.db_client.items() if k[0] == name]
        rows = self._grouped(items, fields)
        for r in rows:
            r["error_types"] = {k[5]: h.count for k, h in snap.db_client.items()
                                if k[0] == name and k[5] and (k[1], k[7], k[8], k[2], k[3],
                                                              k[4]) == tuple(r[f] for f in fields)}
        return rows

    def _db_operations(self, snap: Snapshot, name: str) -> list[dict[str, Any]]:
        """Operations a database or cache served: by its process on this host, or, for one
        elsewhere (named address:port), as the clients on this host saw them."""
        fields = ("db_system", "operation", "collection", "namespace")
        items = [((k[1], k[2], k[3], k[4]), h, bool(k[5]))
                 for k, h in snap.db_server.items() if k[0] == name]
        if not items:
            items = [((k[1], k[2], k[3], k[4]), h, bool(k[5]))
                     for k, h in snap.db_client.items() if f"{k[7]}:{k[8]}" == name]
        return self._grouped(items, fields)

    def _dns_lookups(self, snap: Snapshot, name: str) -> list[dict[str, Any]]:
        fields = ("question_name", "question_type")
        items = [((k[1], k[2]), h, bool(k[3])) for k, h in snap.dns.items() if k[0] == name]
        rows = self._grouped(items, fields)
        for r in rows:
            r["error_types"] = {k[3]: h.count for k, h in snap.dns.items()
                                if k[0] == name and k[3] and (k[1], k[2]) ==
                                (r["question_name"], r["question_type"])}
        return rows

    def _client_calls(self, snap: Snapshot, name: str) -> list[dict[str, Any]]:
        calls: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        hists: dict[tuple[str, str, str, str], Histogram] = {}
        for (svc, method, status, route, addr, port), h in snap.client.items():
            if svc != name:
                continue
            key = (addr, port, method, route)
            c = calls.setdefault(key, {"server_address": addr, "server_port": port,
                                       "method": method, "route": route, "requests": 0.0,
                                       "errors": 0.0})
            c["requests"] += h.count
            if is_error_status(status):
                c["errors"] += h.count
            hists.setdefault(key, Histogram()).merge(h)
        for key, c in calls.items():
            c["p99_seconds"] = hists[key].quantile(0.99)
        return sorted(calls.values(), key=lambda c: (-c["requests"], c["route"]))

    # --- graph -----------------------------------------------------------------------------
    def _edge(self, client: str, server: str, snap: Snapshot, win: Window) -> dict[str, Any]:
        e = snap.edges[(client, server)]
        return {
            "client": client,
            "server": server,
            "connection_type": e.connection_type,
            "requests": e.requests,
            "failed": e.failed,
            "error_ratio": _ratio(e.failed, e.requests),
            "rate": win.rate(("edge", client, server)),
            "p50_seconds": e.duration.quantile(0.5),
            "p99_seconds": e.duration.quantile(0.99),
        }

    def graph(self, query: Query) -> dict[str, Any]:
        snap = self.snapshot()
        win = self.history.window(snap)
        nodes: list[dict[str, Any]] = [
            {"id": n, "kind": self._kind(snap, n),
             "db_system": snap.databases().get(n, ""),
             "requests": self._summary(snap, win, n)["requests"],
             "rate": win.rate(("svc", n))}
            for n in sorted(snap.services())
        ]
        edges = [self._edge(c, s, snap, win) for (c, s) in sorted(snap.edges)]
        saturation = self._saturation_rows()[1]
        for node in nodes:
            node["saturated_by"] = saturation.get(str(node["id"]), {}).get("saturated_by", [])
        return {"taken_at": snap.taken_at, "window_seconds": win.seconds, "nodes": nodes,
                "edges": edges}

    # --- tcp -------------------------------------------------------------------------------
    def tcp(self, query: Query) -> dict[str, Any]:
        snap = self.snapshot()
        peers = []
        for (svc, direction, addr, port), t in sorted(snap.tcp.items()):
            c = t.counters
            peers.append({
                "service_name": svc, "direction": direction, "server_address": addr,
                "server_port": port,
                **{k: c.get(k, 0.0) for k in ("opened", "closed", "failed", "retransmits",
                                              "resets_sent", "resets_received", "bytes_sent",
                                              "bytes_received")},
                "active": max(c.get("opened", 0.0) - c.get("closed", 0.0), 0.0),
                "rtt_count": t.rtt.count,
                "rtt_avg_seconds": t.rtt.sum / t.rtt.count if t.rtt.count else None,
                "rtt_p99_seconds": t.rtt.quantile(0.99),
            })
        return {"taken_at": snap.taken_at, "peers": peers}

    # --- events, probes, agent -------------------------------------------------------------
    def events(self, query: Query) -> dict[str, Any]:
        kind = query.get("kind", [None])[-1]
        if kind not in (None, "exec", "exit"):
            raise ApiError(400, f"query parameter kind={kind!r}: expected exec or exit")
        limit = _int_param(query, "limit", RECENT_EVENTS, 1, RECENT_EVENTS)
        since = _int_param(query, "since_ns", 0, 0, 2**63 - 1)
        probe = self.agent.probes.get("process")
        if not isinstance(probe, ProcessProbe):
            return {"events": []}
        events = [e for e in probe.events(kind) if e.timestamp_ns > since][-limit:]
        # A Kubernetes service key reads "cart (shop)" (enrich/identity.py).
        return {"events": [{**dataclasses.asdict(e), "service_name": display_name(e.service_name)}
                           for e in events]}

    def probes(self, query: Query) -> dict[str, Any]:
        return {
            "startup_seconds": self.agent.startup_s,
            "hook_types": {k: dataclasses.asdict(v) for k, v in self.agent.support.items()},
            "probes": [
                {**dataclasses.asdict(s), "avg_ns": s.avg_ns} for s in self.agent.status()
            ],
            "tls": self.agent.tls_status(),
            "coverage": self.agent.coverage(),
            "custom": custom_status(self.agent),
        }

    def agent_info(self, query: Query) -> dict[str, Any]:
        snap = self.snapshot()
        per_probe: dict[str, dict[str, Any]] = {
            name: {"probe": name, "events": 0.0, "dropped": 0.0} for name in self.agent.running
        }
        for name, labels, value in snap.self_samples:
            probe = labels.get("probe")
            if probe in per_probe and name == "probewire_events_total":
                per_probe[probe]["events"] = value
            elif probe in per_probe and name == "probewire_events_dropped_total":
                per_probe[probe]["dropped"] = value
        return {
            "version": __version__,
            "pid": os.getpid(),
            "listen": self.agent.config.listen,
            "started_at": self.agent.started_at,
            "uptime_seconds": time.time() - self.agent.started_at if self.agent.started_at
            else 0.0,
            "startup_seconds": self.agent.startup_s,
            "history": {"interval_seconds": self.history.interval_s,
                        "window_seconds": RATE_WINDOW_S,
                        "services": len(self.history.services()),
                        "services_not_kept": self.history.dropped_services},
            "probes": list(per_probe.values()),
            "self_metrics": [{"name": n, "labels": lbl, "value": v}
                             for n, lbl, v in snap.self_samples],
            # Live reconfiguration and Kubernetes (issue 17).
            "config": (self.agent.reload_status.as_dict()
                       if self.agent.reload_status is not None else None),
            "kubernetes": self._kubernetes(),
        }

    # --- saturation ------------------------------------------------------------------------
    def _saturation_rows(self) -> tuple[float, dict[str, dict[str, Any]]]:
        probe = self.agent.probes.get("saturation")
        return self.saturation_view.rows(probe if isinstance(probe, SaturationProbe) else None)

    def saturation(self, query: Query) -> dict[str, Any]:
        seconds, rows = self._saturation_rows()
        probe = self.agent.probes.get("saturation")
        kills = probe.oom_kills() if isinstance(probe, SaturationProbe) else []
        return {
            "window_seconds": seconds,
            "services": sorted(rows.values(), key=lambda r: (-r["cpu_cores"], r["service_name"])),
            "oom_kills": [dataclasses.asdict(k) for k in kills],
        }
    # --- learned routes ----------------------------------------------------------------------
    def _learned(self) -> dict[str, Any]:
        """What the route learner holds, from the family that offers it (capability
        ``learned_routes()``, aggregate/routes.py RouteTemplater.learned's shape)."""
        for probe in self.agent.probes.values():
            learned = getattr(probe, "learned_routes", None)
            if callable(learned):
                out: dict[str, Any] = learned()
                return out
        return {"enabled": False, "generation": 0, "services": {}}

    def learned_routes(self, query: Query) -> dict[str, Any]:
        learned = self._learned()
        service = query.get("service", [None])[-1]
        if service is not None:
            learned = {**learned, "services": {
                k: v for k, v in learned.get("services", {}).items() if k == service}}
        return learned
    def _kubernetes(self) -> dict[str, Any] | None:
        workloads = self.agent.services.workloads
        if workloads is None or workloads.kube is None:
            return None
        return workloads.kube.status()

    def history_of(self, query: Query) -> dict[str, Any]:
        service = query.get("service", [None])[-1]
        if service is None:
            return {"interval_seconds": self.history.interval_s,
                    "services": self.history.services()}
        series = self.history.series(service)
        if series is None:
            raise ApiError(404, f"no history for service {service!r} (yet); sampled every "
                                f"{self.history.interval_s:g} s")
        return {"service": service, "interval_seconds": self.history.interval_s, **series}

    # --- security ---------------------------------------------------------------------------
    def _security(self) -> SecurityEngine | None:
        probe = self.agent.probes.get("process")
        return probe.security if isinstance(probe, ProcessProbe) else None

    def security_alerts(self, query: Query) -> dict[str, Any]:
        engine = self._security()
        if engine is None:
            return {"enabled": False, "alerts": [], "total": 0, "stats": {}}
        cap = engine.config.security.max_alerts
        limit = _int_param(query, "limit", cap, 1, cap)
        since = _int_param(query, "since_id", 0, 0, 2**63 - 1)
        rule = query.get("rule", [None])[-1]
        return {"enabled": True, "alerts": engine.recent(since, limit, rule),
                "total": engine.alerts_total, "stats": engine.stats()}

    def security_rules(self, query: Query) -> dict[str, Any]:
        engine = self._security()
        if engine is None:
            return {"enabled": False, "rules": []}
        return {"enabled": True, "rules": engine.rule_rows()}

    def process(self, pid_text: str) -> dict[str, Any]:
        if not pid_text.isdigit() or not 0 < int(pid_text) < 2**32:
            raise ApiError(400, f"process {pid_text!r}: expected a pid, an integer > 0")
        engine = self._security()
        if engine is None:
            raise ApiError(404, "the process tree is kept only with security on "
                                "(security.enabled)")
        found = engine.ancestry_of(int(pid_text))
        if found is None:
            raise ApiError(404, f"no live process {pid_text} in the process tree")
        return found
