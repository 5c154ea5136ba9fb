"""The agent's HTTP endpoint: /metrics (Prometheus), /api/* (JSON, see /api/openapi.json),
/healthz, and the web UI (/ and /ui/*) on the same listen address."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import mimetypes
import os
import socket
import socketserver
import ssl
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
from probewire.config import ServeConfig
from probewire.errors import ConfigError
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


# --- serving beyond loopback: TLS, basic auth, bearer tokens (as Prometheus exporters' web
# config does); /healthz stays open for kubelet's probes. -------------------------------------
HANDSHAKE_TIMEOUT_S = 10.0
OPEN_PATHS = frozenset({"/healthz"})


def tls_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            ctx.load_verify_locations(client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"serve.tls: cannot load {cert_file} / {key_file}"
            f"{' / ' + client_ca_file if client_ca_file else ''}: {exc}; give readable PEM "
            "files (the key must match the certificate)") from None
    return ctx


class _Secret:
    """A file's stripped contents, read again when the file changes (a rotated Secret)."""

    def __init__(self, path: str, field: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._value = b""
        if not self.value():
            raise ConfigError(f"{field}: {path} is missing or empty; put the secret in it")

    def value(self) -> bytes:
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                with open(self.path, "rb") as f:
                    self._value = f.read().strip()
                self._stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            pass  # keep the last one read
        return self._value


class Guard:
    """Decides whether a request may see a path (auth) and which API parts are served."""

    def __init__(self, serve: ServeConfig) -> None:
        self.serve = serve
        self.basic_user = serve.basic_auth.username.encode() if serve.basic_auth else b""
        self.basic_password = (_Secret(serve.basic_auth.password_file,
                                       "serve.basic_auth.password_file")
                               if serve.basic_auth else None)
        self.token = (_Secret(serve.bearer_token_file, "serve.bearer_token_file")
                      if serve.bearer_token_file else None)

    @property
    def required(self) -> bool:
        return self.basic_password is not None or self.token is not None

    def allows(self, path: str, authorization: str) -> bool:
        if not self.required or path in OPEN_PATHS:
            return True
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            return hmac.compare_digest(credentials.strip().encode(), self.token.value())
        if scheme.lower() == "basic" and self.basic_password is not None:
            try:
                user, _, password = base64.b64decode(credentials.strip(), validate=True
                                                     ).partition(b":")
            except ValueError:
                return False
            return (hmac.compare_digest(user, self.basic_user)
                    & hmac.compare_digest(password, self.basic_password.value()))
        return False

    def challenge(self) -> str:
        return 'Basic realm="probewire"' if self.basic_password is not None else "Bearer"

    def switched_off(self, path: str) -> str | None:
        """The config key that switched this API path off, or None."""
        apis = self.serve.apis
        if not apis.events and path.startswith("/api/events"):
            return "serve.apis.events"
        if not apis.security and path.startswith("/api/security"):
            return "serve.apis.security"
        return None


class AgentServer:
    def __init__(self, agent: Agent, registry: CollectorRegistry, host: str, port: int,
                 sample_interval_s: float = SAMPLE_INTERVAL_S,
                 serve: ServeConfig | None = None) -> None:
        self.agent = agent
        self.registry = registry
        self.history = History(sample_interval_s)
        self.api = Api(agent, registry, self.history)
        self.sampler = Sampler(self.history, self.api.snapshot)
        # Bounded memory: the user-space structures' sizes next to the maps' on /metrics, and
        # the guard that shrinks them near the memory limit (serve/structures.py).
        self.bounds = Bounds()
        register_agent_structures(self.bounds, agent, self.history)
        self.memory_guard = guard_for(agent, self.bounds)
        registry.register(BoundsCollector(self.bounds, self.memory_guard))
        handler = self._handler_class()
        # An IPv6 listen address (config gives it without brackets) needs an AF_INET6 socket.
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self.guard = Guard(serve or ServeConfig())
        tls = serve.tls if serve is not None else None
        context = tls_context(tls.cert_file, tls.key_file, tls.client_ca_file) if tls else None
        self.httpd = server_class((host, port), handler)
        self.httpd.daemon_threads = True
        if context is not None:
            # The handshake is done by the request's own thread (Handler.setup), so a slow
            # or silent client never holds up accept().
            self.httpd.socket = context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.tls = context is not None
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

            def setup(self) -> None:
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.settimeout(HANDSHAKE_TIMEOUT_S)
                    try:
                        self.request.do_handshake()
                    except (OSError, ssl.SSLError) as exc:
                        log.debug("TLS handshake failed: %s", exc)
                    self.request.settimeout(None)
                super().setup()

            def _refused(self, path: str) -> bool:
                guard = server.guard
                if not guard.allows(path, self.headers.get("Authorization", "")):
                    body = b"unauthorized; send the credentials configured in serve.*\n"
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", guard.challenge())
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return True
                key = guard.switched_off(path)
                if key is not None:
                    self._json(404, {"error": f"{path} is switched off by {key}: false"})
                    return True
                return False

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
                if self._refused(path):
                    return
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
        self.memory_guard.start()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="probewire-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.sampler.stop()
        self.memory_guard.stop()
        # shutdown() waits for serve_forever, which never ran if start() was not reached.
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
