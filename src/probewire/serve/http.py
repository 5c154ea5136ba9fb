"""The agent's HTTP endpoint: /metrics (Prometheus), /api/* (JSON), /healthz."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from probewire.agent import Agent
from probewire.probes.process import ProcessProbe

log = logging.getLogger(__name__)


class AgentServer:
    def __init__(self, agent: Agent, registry: CollectorRegistry, host: str, port: int) -> None:
        self.agent = agent
        self.registry = registry
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def api(self, path: str, query: dict[str, list[str]]) -> Any:
        if path == "/api/probes":
            return {
                "startup_seconds": self.agent.startup_s,
                "hook_types": {k: dataclasses.asdict(v) for k, v in self.agent.support.items()},
                "probes": [
                    {**dataclasses.asdict(s), "avg_ns": s.avg_ns} for s in self.agent.status()
                ],
            }
        if path == "/api/events":
            probe = self.agent.probes.get("process")
            if not isinstance(probe, ProcessProbe):
                return {"events": []}
            kind = query.get("kind", [None])[0]
            limit = int(query.get("limit", ["2048"])[0])
            return {"events": [dataclasses.asdict(e) for e in probe.events(kind, limit)]}
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif url.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif url.path.startswith("/api/"):
                    try:
                        data = server.api(url.path, parse_qs(url.query))
                    except ValueError as exc:
                        self._send(400, json.dumps({"error": str(exc)}).encode(),
                                   "application/json")
                        return
                    if data is None:
                        self._send(404, b'{"error": "no such endpoint"}', "application/json")
                    else:
                        self._send(200, json.dumps(data).encode(), "application/json")
                else:
                    self._send(404, b"not found; try /metrics or /api/probes\n", "text/plain")

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="probewire-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        # shutdown() waits for serve_forever, which never ran if start() was not reached.
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
