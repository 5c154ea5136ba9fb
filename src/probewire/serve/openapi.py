"""OpenAPI 3 description of the agent's JSON API, served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

BOOL = {"type": "boolean"}
NUM = {"type": "number"}
STR = {"type": "string"}
INT = {"type": "integer"}
SECONDS_OR_NULL = {"type": "number", "nullable": True,
                   "description": "Seconds; null without requests to measure."}


def _obj(props: dict[str, Any], required: list[str] | None = None,
         extra: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = _json(_ref("Error"), "Bad request")
NOT_FOUND = _json(_ref("Error"), "Not found")

SATURATION_ROW = _obj({
    "service_name": STR,
    "cpu_seconds": {**NUM, "description": "CPU seconds since the agent started"},
    "cpu_cores": {**NUM, "description": "CPU seconds per second over the window"},
    "runqueue_p99_seconds": {**SECONDS_OR_NULL,
                             "description": "99th percentile wait for a CPU over the window"},
    "disk_p99_seconds": {**SECONDS_OR_NULL,
                         "description": "99th percentile block read/write latency over the window"},
    "listen_overflows": {**NUM, "description": "Listen-queue overflows since the agent started"},
    "listen_overflows_window": NUM,
    "oom_kills": {**NUM, "description": "OOM kills since the agent started"},
    "oom_kills_window": NUM,
    "saturated_by": {"type": "array", "items": STR,
                     "description": "Thresholds crossed over the window; empty: not saturated"},
})

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": STR}),
    "SaturationRow": SATURATION_ROW,
    "ServiceSummary": _obj({
        "name": STR,
        "kind": {"type": "string", "enum": ["service", "client", "external", "database"],
                 "description": "service: serves HTTP here; client: a local process that only "
                                "calls; external: a peer address outside this host; "
                                "database: a database or cache (on this host or not)"},
        "requests": {**NUM, "description": "Requests (HTTP, or database operations) served "
                                           "since the agent started"},
        "errors": {**NUM, "description": "Of those, failed ones (5xx status, database "
                                         "errors)"},
        "error_ratio": NUM,
        "rate": {**NUM, "description": "Requests per second over the rate window"},
        "error_rate": NUM,
        "p50_seconds": {**SECONDS_OR_NULL, "description": "Median duration over the window"},
        "p99_seconds": {**SECONDS_OR_NULL, "description": "99th percentile over the window"},
        "routes": INT,
        "outgoing_requests": {**NUM, "description": "Requests this service made to others"},
        "db_system": {**STR, "description": "For a database or cache: its system "
                                            "(postgresql, mysql, redis, memcached); else empty"},
    }),
    "DbCall": _obj({
        "db_system": STR, "server_address": STR, "server_port": STR, "operation": STR,
        "collection": STR, "namespace": STR, "requests": NUM, "errors": NUM,
        "error_ratio": NUM, "error_types": {"type": "object", "additionalProperties": NUM},
        "p50_seconds": SECONDS_OR_NULL, "p99_seconds": SECONDS_OR_NULL,
    }),
    "DbOperation": _obj({
        "db_system": STR, "operation": STR, "collection": STR, "namespace": STR,
        "requests": NUM, "errors": NUM, "error_ratio": NUM,
        "error_types": {"type": "object", "additionalProperties": NUM},
        "p50_seconds": SECONDS_OR_NULL, "p99_seconds": SECONDS_OR_NULL,
    }),
    "DnsLookup": _obj({
        "question_name": STR, "question_type": STR, "requests": NUM, "errors": NUM,
        "error_ratio": NUM, "error_types": {"type": "object", "additionalProperties": NUM},
        "p50_seconds": SECONDS_OR_NULL, "p99_seconds": SECONDS_OR_NULL,
    }),
    "Route": _obj({
        "method": STR, "route": STR, "requests": NUM, "errors": NUM, "error_ratio": NUM,
        "rate": NUM,
        "statuses": {"type": "object", "additionalProperties": NUM,
                     "description": "Requests per response status code"},
        "p50_seconds": {**SECONDS_OR_NULL, "description": "Since the agent started"},
        "p99_seconds": {**SECONDS_OR_NULL, "description": "Since the agent started"},
    }),
    "Edge": _obj({
        "client": STR, "server": STR,
        "connection_type": {"type": "string", "enum": ["", "database"]},
        "requests": NUM, "failed": NUM, "error_ratio": NUM,
        "rate": NUM, "p50_seconds": SECONDS_OR_NULL, "p99_seconds": SECONDS_OR_NULL,
    }),
    "ClientCall": _obj({
        "server_address": STR, "server_port": STR, "method": STR, "route": STR,
        "requests": NUM, "errors": NUM, "p99_seconds": SECONDS_OR_NULL,
    }),
    "TcpPeer": _obj({
        "service_name": STR,
        "direction": {"type": "string", "enum": ["client", "server", "unknown"]},
        "server_address": STR, "server_port": STR,
        "opened": NUM, "closed": NUM, "failed": NUM, "active": NUM, "retransmits": NUM,
        "resets_sent": NUM, "resets_received": NUM, "bytes_sent": NUM, "bytes_received": NUM,
        "rtt_count": NUM, "rtt_avg_seconds": SECONDS_OR_NULL, "rtt_p99_seconds": SECONDS_OR_NULL,
    }),
    "ProcessEvent": _obj({
        "kind": {"type": "string", "enum": ["exec", "exit"]},
        "pid": INT, "ppid": INT, "uid": INT,
        "timestamp_ns": {**INT, "description": "CLOCK_MONOTONIC nanoseconds"},
        "cgroup_id": INT, "comm": STR, "service_name": STR, "filename": STR,
        "argv": {"type": "array", "items": STR,
                 "description": "Secrets redacted (security.redact)"},
        "exe": {**STR, "description": "exec: the image's path as the kernel resolved it "
                                      "(empty with security off)"},
        "exit_code": {"type": "integer", "nullable": True},
        "exit_signal": {"type": "integer", "nullable": True},
        "lifetime_s": {"type": "number", "nullable": True},
    }),
    "LearnedRoute": _obj({
        "template": {**STR, "description": "The prefix with the learned parameter, e.g. "
                                           "/users/{param}"},
        "distinct_values": {**INT, "description": "Distinct values seen there when it "
                                                  "collapsed"},
        "kept": {"type": "array", "items": STR,
                 "description": "Values that stay literal (established before the collapse)"},
        "reason": {"type": "string", "enum": ["values", "memory"]},
        "collapsed_at": {**NUM, "description": "Unix time"},
    }),
    "ProbeHook": _obj({
        "probe": STR, "hook": STR, "program": {"type": "string", "nullable": True},
        "section": STR, "attached": {"type": "boolean"}, "fallback_reason": STR,
        "run_time_ns": INT, "run_cnt": INT, "avg_ns": NUM,
    }),
}

WINDOW = {"type": "number", "description": "Seconds the rates are measured over"}


def _get(summary: str, ok: dict[str, Any], params: list[dict[str, Any]] | None = None,
         errors: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **(errors or {})}}
    if params:
        op["parameters"] = params
    return {"get": op}


# --- security (docs/security.md) -------------------------------------------------------------
NULL_STR = {"type": "string", "nullable": True}
_PROCESS_PROPS: dict[str, Any] = {
    "pid": INT, "exe": {**STR, "description": "The image's path as the kernel resolved it"},
    "filename": {**STR, "description": "The path given to execve"}, "comm": STR,
    "argv": {"type": "array", "items": STR, "description": "Secrets redacted"},
    "uid": INT, "euid": INT, "user": STR, "service_name": STR,
    "container_id": NULL_STR, "start_ticks": INT,
    "exited": {**BOOL, "description": "Exited, kept in the tree for its children"},
}
SCHEMAS.update({
    "SecurityProcess": _obj(_PROCESS_PROPS),
    "SecurityAncestor": {"oneOf": [
        _ref("SecurityProcess"),
        _obj({"pid": INT, "evicted": {"type": "boolean", "enum": [True]}}, extra=False),
    ], "description": "An ancestor; past the tree's cap only its pid is left"},
    "SecurityAlert": _obj({
        "id": {**INT, "description": "Increasing; page with since_id"},
        "time": {**NUM, "description": "Unix seconds"},
        "timestamp_ns": {**INT, "description": "CLOCK_MONOTONIC nanoseconds of the event"},
        "rule": STR,
        "severity": {"type": "string", "enum": ["critical", "high", "medium", "low", "info"]},
        "description": STR,
        "action": {"type": "string", "enum": ["alert", "killed"]},
        "service_name": {**STR, "description": "The nearest network server among the process "
                                               "and its ancestors, else the process's own"},
        "process": _ref("SecurityProcess"),
        "container_id": NULL_STR,
        "in_container": BOOL,
        "ancestry": {"type": "array", "items": _ref("SecurityAncestor"),
                     "description": "The parent first"},
        "ancestry_truncated": BOOL,
        "evidence": {"type": "object", "description": "What the kernel found at exec, and the "
                                                      "connection for connects_to rules"},
    }),
    "SecurityRule": _obj({
        "id": STR, "severity": STR, "description": STR,
        "action": {"type": "string", "enum": ["alert", "kill"]},
        "match": {"type": "array", "items": {"type": "object"},
                  "description": "Alternatives: any one matches; criteria within one all must"},
        "except": {"type": "array", "items": {"type": "object"}},
        "kernel_criteria": {"type": "array", "items": STR,
                            "description": "Criteria the kernel decides at exec"},
        "alerts": INT, "kills": INT,
    }),
})


def security_paths() -> dict[str, Any]:
    return {
        "/api/security/alerts": _get(
            "Recent security alerts, oldest first", _json(_obj({
                "enabled": BOOL,
                "alerts": {"type": "array", "items": _ref("SecurityAlert")},
                "total": {**INT, "description": "Alerts since the agent started"},
                "stats": {"type": "object", "description": "Process tree size and outputs"},
            }), "Alerts"),
            [{"name": "since_id", "in": "query", "required": False,
              "description": "Only alerts with a larger id",
              "schema": {"type": "integer", "minimum": 0, "maximum": 9223372036854775807}},
             {"name": "limit", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
             {"name": "rule", "in": "query", "required": False, "schema": STR}],
            {"400": ERROR},
        ),
        "/api/security/rules": _get("The rules in force, with alert and kill counts", _json(_obj({
            "enabled": BOOL, "rules": {"type": "array", "items": _ref("SecurityRule")},
        }), "Rules")),
        "/api/processes/{pid}": _get(
            "A live process and its ancestry from the process tree",
            _json(_obj({"process": _ref("SecurityProcess"),
                        "ancestry": {"type": "array", "items": _ref("SecurityAncestor")}}),
                  "The process"),
            [{"name": "pid", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": 4294967295}}],
            {"400": ERROR, "404": NOT_FOUND},
        ),
    }


def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "probewire agent API",
            "version": version,
            "description": "What the agent observes on this host. Counts equal the /metrics "
                           "series of the same moment; rates are over the last minute (or "
                           "since the agent started, if sooner).",
        },
        "paths": {
            "/api/services": _get("Services sorted by request rate", _json(_obj({
                "taken_at": NUM, "window_seconds": WINDOW,
                "services": {"type": "array", "items": _ref("ServiceSummary")},
            }), "Services")),
            "/api/services/{name}": _get(
                "One service: RED summary, routes, outgoing and incoming calls",
                _json({"allOf": [_ref("ServiceSummary"), _obj({
                    "taken_at": NUM, "window_seconds": WINDOW,
                    "route_list": {"type": "array", "items": _ref("Route")},
                    "outgoing": {"type": "array", "items": _ref("Edge")},
                    "incoming": {"type": "array", "items": _ref("Edge")},
                    "client_calls": {"type": "array", "items": _ref("ClientCall")},
                    "db_calls": {"type": "array", "items": _ref("DbCall")},
                    "db_operations": {"type": "array", "items": _ref("DbOperation")},
                    "dns_lookups": {"type": "array", "items": _ref("DnsLookup")},
                    "saturation": {"allOf": [_ref("SaturationRow")], "nullable": True,
                                   "description": "null without saturation data"},
                    "learned_routes": {"type": "array", "items": _ref("LearnedRoute")},
                })]}, "The service"),
                [{"name": "name", "in": "path", "required": True, "schema": STR}],
                {"404": NOT_FOUND},
            ),
            "/api/graph": _get("Service map: nodes and call edges", _json(_obj({
                "taken_at": NUM, "window_seconds": WINDOW,
                "nodes": {"type": "array", "items": _obj({
                    "id": STR,
                    "kind": {"type": "string",
                             "enum": ["service", "client", "external", "database"]},
                    "db_system": STR, "requests": NUM, "rate": NUM,
                    "saturated_by": {"type": "array", "items": STR},
                })},
                "edges": {"type": "array", "items": _ref("Edge")},
            }), "Graph")),
            "/api/tcp": _get("TCP health per service and peer", _json(_obj({
                "taken_at": NUM, "peers": {"type": "array", "items": _ref("TcpPeer")},
            }), "TCP peers")),
            "/api/events": _get(
                "Recent process execs and exits, oldest first",
                _json(_obj({"events": {"type": "array", "items": _ref("ProcessEvent")}}),
                      "Events"),
                [
                    {"name": "kind", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": ["exec", "exit"]}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 2048}},
                    {"name": "since_ns", "in": "query", "required": False,
                     "description": "Only events with a later timestamp_ns",
                     "schema": {"type": "integer", "minimum": 0,
                                "maximum": 9223372036854775807}},
                ],
                {"400": ERROR},
            ),
            "/api/probes": _get("Probes, hooks chosen, fallbacks and kernel cost", _json(_obj({
                "startup_seconds": NUM,
                "hook_types": {"type": "object", "additionalProperties": {"type": "object"}},
                "probes": {"type": "array", "items": _ref("ProbeHook")},
                "tls": _obj({
                    "libraries": {"type": "array", "items": STR},
                    "failed": {"type": "object", "additionalProperties": STR},
                    "links": INT,
                    "processes": {"type": "array", "items": _obj({
                        "pid": INT, "comm": STR, "library": STR, "covered": BOOL,
                        "reason": STR})},
                }),
                "coverage": {"type": "object", "description": "Per family that reports it "
                             "(l7: per protocol, connections classified, exchanges parsed, "
                             "parse failures and lost connections with reasons)",
                             "additionalProperties": {"type": "object"}},
                "custom": {"type": "array", "items": _obj({
                    "probe": STR, "where": STR, "pid": INT, "comm": STR, "state": STR,
                    "file": STR, "shared": BOOL, "reason": STR})},
            }), "Probes")),
            "/api/agent": _get("The agent itself: uptime, events and drops per probe", _json(_obj({
                "version": STR, "pid": INT, "listen": STR, "started_at": NUM,
                "uptime_seconds": NUM, "startup_seconds": NUM,
                "history": _obj({"interval_seconds": NUM, "window_seconds": NUM,
                                 "services": INT, "services_not_kept": INT}),
                "probes": {"type": "array", "items": _obj({
                    "probe": STR, "events": NUM, "dropped": NUM})},
                "self_metrics": {"type": "array", "items": _obj({
                    "name": STR,
                    "labels": {"type": "object", "additionalProperties": STR},
                    "value": NUM,
                })},
                # Live reconfiguration (null when the agent was not started by `run`) and the
                # Kubernetes watches (null without API access).
                "config": {"nullable": True, **_obj({
                    "source": STR, "reloads": _obj({"success": INT, "failure": INT}),
                    "last_result": STR, "last_error": STR, "last_reload_at": NUM,
                    "applied_at": NUM, "restart_needed": {"type": "array", "items": STR}})},
                "kubernetes": {"nullable": True, **_obj({
                    "node_pods": INT, "cluster_pods": INT, "services": INT, "api_url": STR,
                    "node": STR, "watches": {"type": "array", "items": _obj({
                        "name": STR, "synced": BOOL, "lists": INT, "watches": INT,
                        "events": INT, "errors": INT, "resource_version": STR,
                        "last_error": STR})}})},
            }), "Agent")),
            "/api/history": _get(
                "RED points of one service over the last 15 minutes (without `service`: the "
                "services that have history)",
                _json(_obj({
                    "interval_seconds": NUM,
                    "services": {"type": "array", "items": STR},
                    "service": STR,
                    **{col: {"type": "array", "items": {"type": "number", "nullable": True}}
                       for col in ("time", "rate", "error_ratio", "p50_seconds",
                                   "p99_seconds")},
                }, required=["interval_seconds"]), "History"),
                [{"name": "service", "in": "query", "required": False, "schema": STR}],
                {"404": NOT_FOUND},
            ),
            "/api/saturation": _get(
                "Saturation per service (run queue, CPU, disk, listen queues, OOM kills) and "
                "recent OOM kills",
                _json(_obj({
                    "window_seconds": WINDOW,
                    "services": {"type": "array", "items": _ref("SaturationRow")},
                    "oom_kills": {"type": "array", "items": _obj({
                        "timestamp_ns": INT, "pid": INT, "comm": STR, "service_name": STR,
                        "cgroup": STR, "cgroup_id": INT, "trigger_pid": INT})},
                }), "Saturation")),
            "/api/routes": _get(
                "Route templates each service's traffic taught (positions that became "
                "parameters)",
                _json(_obj({
                    "enabled": BOOL,
                    "generation": {**INT, "description": "Moves whenever a learned decision "
                                                         "changes a route"},
                    "untracked": INT,
                    "services": {"type": "object", "additionalProperties": _obj({
                        "nodes": {**INT, "description": "Learned path values held"},
                        "collapsed": {**INT, "description": "Positions that became "
                                                            "parameters"},
                        "templates": {"type": "array", "items": _ref("LearnedRoute")},
                    })},
                }, required=["enabled", "generation", "services"]), "Learned routes"),
                [{"name": "service", "in": "query", "required": False, "schema": STR}],
            ),
            "/api/openapi.json": _get("This document", _json({"type": "object"}, "OpenAPI")),
            **security_paths(),
        },
        "components": {"schemas": SCHEMAS},
    }
