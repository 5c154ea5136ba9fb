"""The upstream service of bench/realistic.py: a WSGI app (gunicorn behind nginx) doing about
0.5 ms of CPU work per request, with a few routes and response sizes.

    gunicorn --preload -k gthread bench.realistic_app:app

The work is a pure-Python loop whose length is calibrated once at import (in gunicorn's master
with --preload, so every worker spins the same count) against thread CPU time, not wall time:
on a busy machine preemption stretches wall time but not the CPU a request costs.
REALISTIC_WORK_US sets the target (default 500). Each answer carries `X-Work-Ns`, the thread
CPU time its loop took, so the benchmark reports the work it actually got.

Routes (all GET answer JSON):
    /api/users/<id>           ~0.3 KB; ids above 1000 answer 404
    /api/orders?page=<n>      ~4 KB (20 orders)
    /api/catalog/<category>   ~32 KB
    POST /api/cart            reads its body, answers 201 with a small JSON
    anything else             404
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

WORK_NS = int(os.environ.get("REALISTIC_WORK_US", "500")) * 1000
USERS = 1000
# Long enough per trial that the thread clock's resolution does not matter.
_TRIAL_NS = 2_000_000
_TRIALS = 7


def spin(iterations: int) -> int:
    """The CPU work: integer arithmetic in the interpreter, like application code."""
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def _cpu_ns(iterations: int) -> int:
    t0 = time.thread_time_ns()
    spin(iterations)
    return time.thread_time_ns() - t0


def calibrate(target_ns: int) -> int:
    """Iterations of spin() that cost target_ns of thread CPU time (the fastest of a few trials:
    interference only ever adds time)."""
    n = 1000
    while _cpu_ns(n) < _TRIAL_NS:
        n *= 2
    best_ns = min(_cpu_ns(n) for _ in range(_TRIALS))
    return max(1, round(n * target_ns / best_ns))


ITERATIONS = calibrate(WORK_NS)
CATALOG_ITEMS = [{"sku": f"SKU-{i:06d}", "name": f"item {i}", "price_cents": 100 + i * 7,
                  "tags": ["a", "b", "c"], "stock": i % 17} for i in range(300)]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _user(uid: int) -> dict[str, Any]:
    return {"id": uid, "name": f"user {uid}", "email": f"user{uid}@example.com",
            "created": "2024-01-01T00:00:00Z", "roles": ["customer"], "address": {
                "street": f"{uid} Main Street", "city": "Springfield", "zip": f"{uid:05d}"}}


def _orders(page: int) -> list[dict[str, Any]]:
    return [{"id": page * 20 + i, "user": (page * 20 + i) % USERS, "total_cents": 1999 + i,
             "status": "shipped", "items": [{"sku": f"SKU-{i:06d}", "qty": 1 + i % 3}],
             "note": "x" * 80} for i in range(20)]


def _route(method: str, path: str, query: str, body: bytes) -> tuple[str, Any]:
    parts = path.strip("/").split("/")
    if method == "POST" and path == "/api/cart":
        return "201 Created", {"ok": True, "received_bytes": len(body)}
    if method != "GET" or len(parts) < 2 or parts[0] != "api":
        return "404 Not Found", {"error": "no such route"}
    if parts[1] == "users" and len(parts) == 3 and parts[2].isdigit():
        uid = int(parts[2])
        if uid > USERS:
            return "404 Not Found", {"error": f"no user {uid}"}
        return "200 OK", _user(uid)
    if parts[1] == "orders" and len(parts) == 2:
        page = int(parse_qs(query).get("page", ["0"])[0] or 0)
        return "200 OK", {"page": page, "orders": _orders(page)}
    if parts[1] == "catalog" and len(parts) == 3:
        return "200 OK", {"category": parts[2], "items": CATALOG_ITEMS}
    return "404 Not Found", {"error": "no such route"}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    t0 = time.thread_time_ns()
    spin(ITERATIONS)
    work_ns = time.thread_time_ns() - t0
    status, doc = _route(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"),
                         environ.get("QUERY_STRING", ""), body)
    data = json.dumps(doc).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), ("X-Work-Ns", str(work_ns))])
    return [data]
