"""User-space cost of HTTP exchange records: L7Probe.on_batch alone, µs per record.

`make bench`'s "records per agent CPU-second" row needs nginx, wrk and the kernel; this one
feeds the real on_batch synthetic HTTP_EXCHANGE records in-process, so a change to the
decode/aggregate path can be measured (and profiled) in seconds. The records look like a small
mesh: a few server processes on their own ports, local clients calling them (both roles, the
kernel's peer_tgid set), remote clients on ephemeral ports, tens of routes with ids in their
paths, a few statuses, some TLS, rare aborted and pipelined exchanges (keep-alive connections,
or --pool 0 for a new connection per request); or, with --mix nginx, what `make bench` sends:
wrk fetching one file from nginx, both sides traced. Services are named by the real
ServiceResolver over a fake /proc tree, so its caching is part of the figure.

Passes are warm by default (the probe has seen the records once: every path templated, every
label set admitted, as in a long run); --cold leaves most of that to the timed pass.

    PYTHONPATH=src python -m bench.userspace [--batches 128,1024] [--mix nginx] [--pool 0]
    PYTHONPATH=src python -m bench.userspace --profile 128   # cProfile of one batch size

`run(quick)` gives the rows `python -m bench` prints, as the other benchmarks' `run` do.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.report import Row, render
from probewire.config import config_from_mapping
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import HTTP_HEAD_LEN as HEAD_LEN
from probewire.l7.constants import HttpFlag, L7Flag, Proto, RecordKind, Role
from probewire.l7.exchanges import ExchangeBatch
from probewire.l7.records import HTTP_EXCHANGE
from probewire.probes.base import ProbeContext
from probewire.probes.l7 import L7Probe

ROLE_SERVER, ROLE_CLIENT = int(Role.SERVER), int(Role.CLIENT)

SERVERS = (("orders", 8080, False), ("users", 8081, False), ("catalog", 8443, True),
           ("gateway", 9000, False))
CLIENTS = ("gateway", "checkout", "loadgen")
SERVER_TGID, CLIENT_TGID = 4100, 4200
# Route shapes: "{i}" is a numeric id, "{u}" a uuid, "{h}" a long hex; the rest is literal.
ROUTE_SHAPES = (
    "/", "/health", "/metrics", "/api/v1/users", "/api/v1/users/{i}", "/api/v1/users/{i}/orders",
    "/api/v1/users/{i}/orders/{i}", "/api/v1/orders", "/api/v1/orders/{u}",
    "/api/v1/orders/{u}/items", "/api/v1/orders/{u}/items/{i}", "/api/v1/catalog",
    "/api/v1/catalog/{i}", "/api/v1/catalog/{i}/reviews", "/api/v1/search",
    "/static/app.js", "/static/app.css", "/static/img/{h}.png", "/login", "/logout",
    "/cart", "/cart/{i}", "/checkout", "/checkout/{u}/confirm", "/api/v2/items/{i}",
    "/api/v2/items/{i}/price", "/api/v2/stock/{i}", "/admin", "/admin/users/{i}",
    "/favicon.ico",
)
METHOD_CODES = {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4}
STATUSES = ((200, 0.82), (201, 0.05), (304, 0.04), (404, 0.05), (500, 0.03), (503, 0.01))


def _write_proc(root: Path, pid: int, name: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    stat = f"{pid} ({name}) S 1 " + " ".join(["0"] * 18) + f" {1000 + pid} 0 0\n"
    (d / "stat").write_text(stat)
    (d / "cmdline").write_bytes(f"/usr/bin/{name}\0".encode())
    (d / "cgroup").write_text(f"0::/system.slice/{name}.service\n")
    os.symlink(f"/usr/bin/{name}", d / "exe")


@contextlib.contextmanager
def fake_proc() -> Iterator[Path]:
    """A /proc tree naming the synthetic pids (servers, then clients)."""
    with tempfile.TemporaryDirectory(prefix="pw-userspace-") as tmp:
        root = Path(tmp)
        for i, (name, _, _) in enumerate(SERVERS):
            _write_proc(root, SERVER_TGID + i, name)
        for i, name in enumerate(CLIENTS):
            _write_proc(root, CLIENT_TGID + i, name)
        yield root


def _path(rng: np.random.Generator, shape: str, ids: int) -> str:
    out = shape
    while "{i}" in out:
        out = out.replace("{i}", str(int(rng.integers(1, ids + 1))), 1)
    while "{u}" in out:
        v = int(rng.integers(0, ids))
        out = out.replace("{u}", f"{v:08x}-0000-4000-8000-{v * 7919:012x}", 1)
    while "{h}" in out:
        out = out.replace("{h}", f"{int(rng.integers(0, ids)) * 2654435761:020x}", 1)
    if rng.random() < 0.1:
        out += f"?page={int(rng.integers(1, 20))}"
    return out


def synthetic_records(n: int, seed: int = 0, ids: int = 500, rare: bool = True,
                      pool: int = 8) -> np.ndarray:
    """n HTTP_EXCHANGE records of the mesh described in the module docstring.

    `ids` bounds the distinct ids in paths (so distinct raw paths per route); `rare` adds the
    slow-path rows (method left to user space, pipelined requests, aborted exchanges); `pool`
    is the keep-alive connections per client and server (0: a new connection per request).
    """
    rng = np.random.default_rng(seed)
    rec = np.zeros(n, HTTP_EXCHANGE)
    rec["kind"], rec["proto"] = RecordKind.HTTP, Proto.HTTP
    rec["family"] = socket.AF_INET
    # Two thirds server side; client rows come from the local clients.
    role = np.where(rng.random(n) < 0.67, ROLE_SERVER, ROLE_CLIENT)
    server = rng.integers(0, len(SERVERS), n)
    client = rng.integers(0, len(CLIENTS), n)
    remote = rng.random(n) < 0.5  # server rows: a remote client rather than a local one
    status_p = np.array([p for _, p in STATUSES])
    status = np.array([s for s, _ in STATUSES])[rng.choice(len(STATUSES), n,
                                                            p=status_p / status_p.sum())]
    methods = list(METHOD_CODES)
    method = rng.choice(len(methods), n, p=[0.8, 0.12, 0.05, 0.03])
    shape = rng.integers(0, len(ROUTE_SHAPES), n)
    duration_ns = rng.lognormal(np.log(4e6), 1.2, n).astype(np.int64)
    start = 10**12 + np.cumsum(rng.integers(1_000, 50_000, n))
    rec["start_ns"] = start
    rec["end_ns"] = start + duration_ns
    rec["role"] = role
    rec["status"] = status
    ports = np.array([p for _, p, _ in SERVERS])
    tls = np.array([t for _, _, t in SERVERS])
    is_server = role == ROLE_SERVER
    rec["tgid"] = np.where(is_server, SERVER_TGID + server, CLIENT_TGID + client)
    if pool:
        # Connection k of a (client, server) pair keeps its port; remote clients likewise.
        who = np.where((role == ROLE_SERVER) & remote, rng.integers(0, 4 * 40, n), client)
        ephemeral = 32768 + (who * 97 + server * 13 + rng.integers(0, pool, n) * 7919) % 28000
    else:
        ephemeral = 32768 + (np.arange(n) * 7919) % 28000
    rec["lport"] = np.where(is_server, ports[server], ephemeral)
    rec["rport"] = np.where(is_server, ephemeral, ports[server])
    # The kernel names a local client's process, but not always (it exited, or connected
    # before the agent started): then its endpoint names it.
    rec["peer_tgid"] = np.where(is_server & ~remote & (rng.random(n) > 0.1),
                                CLIENT_TGID + client, 0)
    rec["laddr"][:, :4] = [127, 0, 0, 1]
    rec["raddr"][:, :4] = [127, 0, 0, 1]
    far = np.flatnonzero(is_server & remote)
    if pool:
        rec["raddr"][far, :4] = np.stack([np.full(len(far), 10), np.zeros(len(far)),
                                          who[far] // 40, 1 + who[far] % 40], axis=1)
    else:
        rec["raddr"][far, :4] = np.stack([np.full(len(far), 10), np.zeros(len(far)),
                                          rng.integers(0, 4, len(far)),
                                          rng.integers(1, 40, len(far))], axis=1)
    rec["laddr"][far, :4] = [10, 0, 9, 1]
    rec["conn_id"] = (rec["tgid"].astype(np.uint64) << np.uint64(32)) ^ ephemeral.astype(np.uint64)
    rec["flags"] = np.where(tls[server], L7Flag.TLS, 0)
    if rare:
        aborted = rng.random(n) < 0.005
        rec["hflags"] = np.where(aborted, HttpFlag.ABORTED, 0)
        rec["status"] = np.where(aborted, 0, rec["status"])
    pipelined = rng.random(n) < 0.002 if rare else np.zeros(n, bool)
    unknown_method = rng.random(n) < 0.002 if rare else np.zeros(n, bool)
    for i in range(n):
        m = methods[int(method[i])]
        name, port, _ = SERVERS[int(server[i])]
        path = _path(rng, ROUTE_SHAPES[int(shape[i])], ids)
        body = int(rng.integers(20, 2000)) if m in ("POST", "PUT") else 0
        one = (f"{m} {path} HTTP/1.1\r\nHost: {name}:{port}\r\nUser-Agent: bench\r\n"
               + (f"Content-Length: {body}\r\n" if body else "") + "\r\n").encode()
        head = one + b"x" * body
        if pipelined[i]:
            head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + head
            rec["pipe_idx"][i] = 1
        head = head[:HEAD_LEN]
        rec["req_head"][i, : len(head)] = np.frombuffer(head, np.uint8)
        rec["req_head_len"][i] = len(head)
        rec["req_bytes"][i] = len(one) + body
        rec["method"][i] = 0 if (unknown_method[i] or pipelined[i]) else METHOD_CODES[m]
        st = int(rec["status"][i])
        resp_body = int(rng.integers(0, 40_000))
        resp = f"HTTP/1.1 {st or 200} OK\r\nContent-Length: {resp_body}\r\n\r\n".encode()
        if st:
            rec["resp_head"][i, : len(resp)] = np.frombuffer(resp, np.uint8)
            rec["resp_head_len"][i] = len(resp)
            rec["resp_first_write"][i] = len(resp)
            rec["resp_bytes"][i] = len(resp) + resp_body
    return rec


NGINX_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 01 Dec 2026 03:40:00 GMT"
                  b"\r\nContent-Type: text/html\r\nContent-Length: 615\r\nLast-Modified: Tue, 24 "
                  b"Nov 2026 10:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"6571f2a0-267\"\r\n"
                  b"Accept-Ranges: bytes\r\n\r\n")


def nginx_records(n: int, seed: int = 0, connections: int = 100) -> np.ndarray:
    """What `make bench` sends through the ring: wrk's keep-alive connections fetching one
    static file from nginx, both sides traced (server and client rows alternate)."""
    rng = np.random.default_rng(seed)
    rec = np.zeros(n, HTTP_EXCHANGE)
    rec["kind"], rec["proto"] = RecordKind.HTTP, Proto.HTTP
    rec["family"], rec["status"], rec["method"] = socket.AF_INET, 200, 1
    server = np.arange(n) % 2 == 0
    rec["role"] = np.where(server, ROLE_SERVER, ROLE_CLIENT)
    rec["tgid"] = np.where(server, SERVER_TGID, CLIENT_TGID)
    port = 32768 + rng.integers(0, connections, n)
    rec["lport"] = np.where(server, 8080, port)
    rec["rport"] = np.where(server, port, 8080)
    rec["peer_tgid"] = np.where(server, CLIENT_TGID, 0)
    rec["laddr"][:, :4] = rec["raddr"][:, :4] = [127, 0, 0, 1]
    start = 10**12 + np.cumsum(rng.integers(10_000, 60_000, n))
    rec["start_ns"], rec["end_ns"] = start, start + rng.lognormal(np.log(2e5), 0.5, n).astype(int)
    head = b"GET /static/index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    rec["req_head"][:, : len(head)] = np.frombuffer(head, np.uint8)
    rec["req_head_len"] = rec["req_bytes"] = len(head)
    resp = NGINX_RESPONSE
    rec["resp_head"][:, : len(resp)] = np.frombuffer(resp, np.uint8)
    rec["resp_head_len"] = rec["resp_first_write"] = len(resp)
    rec["resp_bytes"] = np.where(server, len(resp) + 615, min(len(resp) + 615, 4096))
    return rec


def new_probe(proc: Path, config: dict[str, object] | None = None) -> L7Probe:
    cfg = config_from_mapping(config or {"probes": {"l7": {"kernel_aggregation": False}}})
    return L7Probe(ProbeContext(cfg, ServiceResolver(cfg.services.rules, proc=proc)))


def _null_sink(batch: ExchangeBatch) -> None:
    del batch


def feed(probe: L7Probe, records: np.ndarray, batch: int) -> None:
    for start in range(0, len(records), batch):
        probe.on_batch(records[start:start + batch])


def measure(records: np.ndarray, batch: int, proc: Path, repeats: int = 3,
            sink: bool = False, cold: bool = False) -> float:
    """Best µs per record of on_batch over `repeats` passes, each on a warmed-up probe.

    Warm: the probe has seen these very records once (every path templated, every label set
    admitted: the steady state of a long run). Cold: only the first few batches, so most
    paths and label sets are new to it.
    """
    best = float("inf")
    for _ in range(repeats):
        probe = new_probe(proc)
        if sink:
            probe.sinks.append(_null_sink)
        feed(probe, records[: 4 * batch] if cold else records, batch)
        t0 = time.thread_time_ns()
        feed(probe, records, batch)
        best = min(best, (time.thread_time_ns() - t0) / 1e3 / len(records))
    return best


def run(quick: bool) -> list[Row]:
    """Rows for `python -m bench`: records per CPU-second of on_batch, by mix and batch size."""
    n = 32_768 if quick else 131_072
    rows = []
    with fake_proc() as proc:
        for mix, records in (("nginx under wrk", nginx_records(n)),
                             ("mesh, keep-alive", synthetic_records(n))):
            for batch in (128, 8192):
                us = measure(records, batch, proc, repeats=2 if quick else 3)
                row = Row(f"user space: L7Probe.on_batch, {mix}, {batch} records a batch",
                          "records/s", target="≥ 2,000,000/s (goal 5 M)", goal=(">=", 2e6),
                          note=f"{us:.3f} µs/record; synthetic records in-process "
                               "(bench/userspace.py, warm), best of repeats; on_batch only "
                               "(no ring drain, no OTLP sink)")
                row.add(1e6 / us)
                rows.append(row)
    return rows


def _profile(records: np.ndarray, batch: int, proc: Path, sort: str, cold: bool) -> None:
    import cProfile
    import pstats

    probe = new_probe(proc)
    feed(probe, records[: 4 * batch] if cold else records, batch)
    prof = cProfile.Profile()
    prof.enable()
    feed(probe, records, batch)
    prof.disable()
    pstats.Stats(prof).sort_stats(sort).print_stats(35)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.userspace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="128,512,2048,8192",
                    help="comma-separated batch sizes (default %(default)s)")
    ap.add_argument("--records", type=int, default=65_536, help="records per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ids", type=int, default=500, help="distinct ids in paths")
    ap.add_argument("--pool", type=int, default=8,
                    help="keep-alive connections per client and server (0: one per request)")
    ap.add_argument("--mix", choices=("mesh", "nginx"), default="mesh",
                    help="mesh: the module docstring's; nginx: make bench's nginx under wrk")
    ap.add_argument("--sink", action="store_true", help="also build ExchangeBatch for a sink")
    ap.add_argument("--cold", action="store_true",
                    help="warm up on a few batches only (most paths and label sets new)")
    ap.add_argument("--profile", type=int, metavar="BATCH", help="cProfile one batch size")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key")
    args = ap.parse_args(argv)
    records = (nginx_records(args.records) if args.mix == "nginx"
               else synthetic_records(args.records, ids=args.ids, pool=args.pool))
    with fake_proc() as proc:
        if args.profile:
            _profile(records, args.profile, proc, args.sort, args.cold)
            return 0
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            us = measure(records, batch, proc, args.repeats, sink=args.sink, cold=args.cold)
            row = Row(f"on_batch, {batch} records a batch", "µs/record")
            row.add(us)
            row.note = f"{1e6 / us:,.0f} records per CPU-second"
            rows.append(row)
    mix = ("nginx under wrk" if args.mix == "nginx"
           else f"mesh, {args.pool or 'no'} keep-alive connections per pair")
    print(render(rows, f"## bench.userspace: {args.records} synthetic records ({mix}), "
                       f"best of {args.repeats}{', with a sink' if args.sink else ''}"
                       f"{', cold' if args.cold else ', warm'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
