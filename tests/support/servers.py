"""Real HTTP peers for tests and benchmarks: Debian's nginx and a small Python upstream.

    with python_upstream(port_a) as up, nginx(port_b, upstream_port=port_a) as ng:
        urllib.request.urlopen(f"http://127.0.0.1:{port_b}/static/index.html")

nginx runs as a foreground master with its own prefix directory (config, logs, pid, static
files) so several can run at once; `sendfile on` serves static files with sendfile(2).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STATIC_BODY = b"<html><body>" + b"probewire " * 200 + b"</body></html>\n"

NGINX_CONF = """
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 65;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type text/html;
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096 {listen_opts};
        {tls_conf}
        root {prefix}/www;
        location /static/ {{ }}
        location = /missing {{ return 404; }}
        location = /boom {{ return 500; }}
        location /api/ {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

# A threaded HTTP/1.1 upstream: /api/slow sleeps 100 ms, /api/fail answers 503,
# /api/chunked streams 1 MiB in chunks, anything else answers a short 200.
UPSTREAM = r'''
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/api/slow"):
            time.sleep(0.1)
            return self._send(200, b"slow\n")
        if path.startswith("/api/fail"):
            return self._send(503, b"unavailable\n")
        if path.startswith("/api/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"z" * 65536
            for _ in range(16):
                self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        return self._send(200, b"ok " + path.encode() + b"\n")
    do_HEAD = do_GET
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self._send(201, b"got %d\n" % len(data))

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 128
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    prefix: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log_lines(self) -> int:
        assert self.prefix is not None
        path = self.prefix / "access.log"
        return len(path.read_bytes().splitlines()) if path.exists() else 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def python_script_server(name: str, source: str, port: int | None = None) -> Iterator[Server]:
    """`source` run as the script `<name>.py` with the port as its argument, once it listens.
    A `-m`-less script is named by its file: the service is `name`."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix=f"pw-{name}-") as tmp:
        script = Path(tmp) / f"{name}.py"
        script.write_text(source)
        proc = subprocess.Popen([sys.executable, str(script), str(port)])
        try:
            wait_port(port)
            yield Server(port, proc)
        finally:
            _stop(proc)


@contextlib.contextmanager
def python_upstream(port: int | None = None) -> Iterator[Server]:
    with python_script_server("upstream", UPSTREAM, port) as server:
        yield server


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@contextlib.contextmanager
def nginx(port: int | None = None, upstream_port: int = 9, workers: int = 1,
          access_log: bool = True, tls: bool = False) -> Iterator[Server]:
    """nginx on 127.0.0.1:port; with tls=True it serves HTTPS (HTTP/1.1 and HTTP/2)."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="pw-nginx-") as tmp:
        prefix = Path(tmp)
        prefix.chmod(0o755)  # nginx workers run as www-data and must reach www/
        (prefix / "www" / "static").mkdir(parents=True)
        (prefix / "www" / "static" / "index.html").write_bytes(STATIC_BODY)
        (prefix / "www" / "static" / "big.bin").write_bytes(b"b" * (1 << 20))
        conf = prefix / "nginx.conf"
        tls_conf, listen_opts = "", ""
        if tls:
            cert, key = self_signed_cert(prefix)
            tls_conf = f"ssl_certificate {cert}; ssl_certificate_key {key};"
            listen_opts = "ssl http2"
        conf.write_text(NGINX_CONF.format(
            prefix=prefix, port=port, upstream_port=upstream_port, workers=workers,
            access_log=f"{prefix}/access.log" if access_log else "off",
            tls_conf=tls_conf, listen_opts=listen_opts,
        ))
        proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)],
                                stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            yield Server(port, proc, prefix)
        finally:
            _stop(proc)
