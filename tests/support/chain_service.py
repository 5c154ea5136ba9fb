"""A service of a call chain: answers GET with 200, after calling DOWNSTREAM (a URL) once per
request when set. `python chain_service.py HOST PORT [DOWNSTREAM]`; prints "ready"."""

from __future__ import annotations

import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    downstream = sys.argv[3] if len(sys.argv) > 3 else None

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            status = 200
            if downstream is not None:
                try:
                    with urllib.request.urlopen(downstream + self.path, timeout=10) as resp:
                        resp.read()
                except OSError:
                    status = 502
            body = b"ok\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
