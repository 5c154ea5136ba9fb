"""The agent's HTTP endpoint: /metrics (Prometheus), /api/* (JSON, see /api/openapi.json),
/healthz, and the web UI (/ and /ui/*) on the same listen address."""

from __future__ import annotations

import json
import logging
import mimetypes
import socket
import socketserver
import threading
import zlib
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client.registry import CollectorRegistry

from probewire.agent import Agent
from probewire.aggregate.bounds import Bounds
from probewire.export.prometheus import CONTENT_TYPE_LATEST, render_text
from probewire.serve.api import Api, ApiError
from probewire.serve.history import SAMPLE_INTERVAL_S, History, Sampler
from probewire.serve.structures import BoundsCollector, guard_for, register_agent_structures

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The charting library is fetched from the npm registry at build time (scripts/vendor-ui.sh).
VENDOR_HINT = b"/* uPlot is missing: run `make build` (scripts/vendor-ui.sh) to vendor it */\n"


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header lists gzip with a weight above 0."""
    for item in accept_encoding.lower().split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if coding != "gzip":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def gzip_chunks(chunks: Iterable[bytes]) -> list[bytes]:
    """Compress chunks as they come, so only the compressed page is ever held whole. Level 1:
    metrics text still shrinks 20-40x, for a few percent of the render time."""
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: the gzip container
    out = [c for c in map(z.compress, chunks) if c]
    out.append(z.flush())
    return out


def static_file(name: str) -> Path | None:
    """A file under static/, never outside it."""
    path = (STATIC_DIR / name).resolve()
    if STATIC_DIR not in path.parents or not path.is_file():
        return None
    return path


class _HTTPServer(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn() for a server_name nothing here uses: a
        # reverse DNS lookup at start-up (slow where DNS is broken), and 0.5 MB of IDNA codec
        # tables kept for the life of the agent.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class AgentServer:
    def __init__(self, agent: Agent, registry: CollectorRegistry, host: str, port: int,
                 sample_interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.agent = agent
        self.registry = registry
        self.history = History(sample_interval_s)
        self.api = Api(agent, registry, self.history)
        self.sampler = Sampler(self.history, self.api.snapshot)
        # Bounded memory: the user-space structures' sizes next to the maps' on /metrics, and
        # the guard that shrinks them near the memory limit (serve/structures.py).
        self.bounds = Bounds()
        register_agent_structures(self.bounds, agent, self.history)
        self.guard = guard_for(agent, self.bounds)
        registry.register(BoundsCollector(self.bounds, self.guard))
        handler = self._handler_class()
        # An IPv6 listen address (config gives it without brackets) needs an AF_INET6 socket.
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self.httpd = server_class((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

            def _send(self, code: int, body: bytes | list[bytes], content_type: str,
                      cache: str = "no-store", encoding: str | None = None) -> None:
                chunks = [body] if isinstance(body, bytes) else body
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                if encoding:
                    self.send_header("Content-Encoding", encoding)
                self.send_header("Content-Length", str(sum(len(c) for c in chunks)))
                self.send_header("Cache-Control", cache)
                self.end_headers()
                self.wfile.writelines(chunks)

            def _json(self, code: int, data: Any) -> None:
                self._send(code, json.dumps(data).encode(), "application/json")

            def do_GET(self) -> None:
                url = urlparse(self.path)
                path = url.path
                if path == "/metrics":
                    # Rendered whole before the first byte is sent: a family collects under its
                    # probe's lock, which a slow scraper must not hold. The chunks are never
                    # joined, so the page is in memory once (compressed, for Prometheus).
                    chunks = render_text(server.registry.collect())
                    if accepts_gzip(self.headers.get("Accept-Encoding", "")):
                        self._send(200, gzip_chunks(chunks), CONTENT_TYPE_LATEST,
                                   encoding="gzip")
                    else:
                        self._send(200, list(chunks), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path.startswith("/api/"):
                    try:
                        data = server.api.handle(path, parse_qs(url.query))
                    except ApiError as exc:
                        self._json(exc.status, {"error": str(exc)})
                    except Exception as exc:
                        log.exception("GET %s failed", self.path)
                        self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
                    else:
                        self._json(200, data)
                elif path in ("/", "/index.html"):
                    self._static("index.html")
                elif path.startswith("/ui/"):
                    self._static(path[len("/ui/"):])
                else:
                    self._send(404, b"not found; try / (UI), /metrics or /api/openapi.json\n",
                               "text/plain")

            def _static(self, name: str) -> None:
                file = static_file(name)
                if file is None:
                    if name.startswith("vendor/") and name.endswith(".js"):
                        self._send(200, VENDOR_HINT, "text/javascript")
                    else:
                        self._send(404, b"not found\n", "text/plain")
                    return
                ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if ctype.startswith("text/") or ctype.endswith("javascript"):
                    ctype += "; charset=utf-8"
                self._send(200, file.read_bytes(), ctype, cache="no-cache")

        return Handler

    def start(self) -> None:
        self.sampler.start()
        self.guard.start()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="probewire-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.sampler.stop()
        self.guard.stop()
        # shutdown() waits for serve_forever, which never ran if start() was not reached.
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
