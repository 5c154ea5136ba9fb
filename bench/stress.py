"""What the soak and the fault matrix share: nginx answering on many ports (one service each),
a load generator of short connections with distinct paths, agent configs, cgroups to starve or
limit the agent, and the counts that say whether every loss was counted.

Everything runs on 127.0.0.1, bounded in count and time, and is stopped (cgroups removed) in a
`finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import AgentProc, free_port, spawn, stop_process, total, wait_port

NGINX = "/usr/sbin/nginx"

# One server, many ports: services are named by port rules (svc-00 ... svc-19).
MULTI_NGINX_CONF = """
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log crit;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 5;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        {listens}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass
class Nginx:
    ports: list[int]
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def multi_port_nginx(count: int) -> Iterator[Nginx]:
    ports = [free_port() for _ in range(count)]
    with tempfile.TemporaryDirectory(prefix="pw-stress-nginx-") as tmp:
        prefix = Path(tmp)
        prefix.chmod(0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(MULTI_NGINX_CONF.format(
            prefix=prefix,
            listens="\n        ".join(f"listen 127.0.0.1:{p} backlog=4096;" for p in ports)))
        proc = spawn([NGINX, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            for p in ports:
                wait_port(p)
            yield Nginx(ports, proc)
        finally:
            stop_process(proc)


def service_name(i: int) -> str:
    return f"svc-{i:02d}"


def agent_config(ports: list[int], extra: str = "") -> str:
    """Trace only our ports (the filter map: other processes' traffic is not ours to count),
    name each port's server side as its own service."""
    rules = "\n".join(f"    - {{name: {service_name(i)}, port: {p}}}" for i, p in enumerate(ports))
    return (f"filter: {{ports: [{', '.join(map(str, ports))}]}}\n"
            f"services:\n  rules:\n{rules}\n{extra}")


# The load: `total` connections, one request each (Connection: close), over the ports in turn,
# `concurrency` in flight, at most `rate` new ones a second (0: as fast as it goes). Paths are
# distinct per request and take the id shapes users file issues about, with one request in ten
# on a few stable routes. mode "garbage" sends random bytes instead of a request.
LOAD = r'''
import asyncio, hashlib, json, os, random, sys, time
ports = [int(p) for p in sys.argv[1].split(",")]
total, concurrency, rate, seed = (int(a) for a in sys.argv[2:6])
mode = sys.argv[6]
rnd = random.Random(seed)
STABLE = ["/api/health", "/api/items", "/api/cart", "/login", "/search", "/static/app.js",
          "/api/v2/orders", "/metrics-ui", "/api/users/me", "/about"]

def letters(i):
    out = ""
    while True:
        out += "abcdefghijklmnopqrstuvwxyz"[i % 26]
        i //= 26
        if not i:
            return out

def path(i):
    if i % 10 == 0:
        return STABLE[(i // 10) % len(STABLE)]
    h = hashlib.sha1(b"%d-%d" % (seed, i)).hexdigest()
    shape = i % 6
    if shape == 0:
        return f"/r/{h[:6]}/z{i % 1000}"
    if shape == 1:
        return f"/orders/ord_{i}a{i % 10}/items"
    if shape == 2:
        return f"/u/{letters(i)}/posts"
    if shape == 3:
        return f"/img/{h[:32]}.png"
    if shape == 4:
        return f"/events/2024-{1 + i % 12:02d}-{1 + i % 28:02d}T10:{i % 60:02d}:00Z/{h[:8]}"
    return f"/users/u{i}@example.com/prefs"

ok = errors = 0
async def one(i, sem):
    global ok, errors
    try:
        r, w = await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
        if mode == "garbage":
            w.write(rnd.randbytes(rnd.randint(1, 4096)))
        else:
            w.write(f"GET {path(i)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        data = await asyncio.wait_for(r.read(), 10)
        w.close()
        if mode == "garbage" or data.startswith(b"HTTP/1.1 200"):
            ok += 1
        else:
            errors += 1
    except Exception:
        errors += 1
    finally:
        sem.release()

async def main():
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()
    tasks = set()
    for i in range(total):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        t = asyncio.ensure_future(one(i, sem))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.sleep(0.01)
    print(json.dumps({"sent": total, "ok": ok, "errors": errors,
                      "seconds": time.monotonic() - t0}), flush=True)

asyncio.run(main())
'''


@dataclass
class LoadResult:
    sent: int
    ok: int
    errors: int
    seconds: float


def start_load(ports: list[int], connections: int, concurrency: int = 32, rate: int = 0,
               seed: int = 1, mode: str = "paths") -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-c", LOAD, ",".join(map(str, ports)), str(connections),
                  str(concurrency), str(rate), str(seed), mode],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_load(proc: subprocess.Popen[bytes], timeout_s: float) -> LoadResult:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        stop_process(proc)
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"load generator printed nothing: {err.decode()[-2000:]}")
    d = json.loads(lines[-1])
    return LoadResult(int(d["sent"]), int(d["ok"]), int(d["errors"]), float(d["seconds"]))


def run_load(ports: list[int], connections: int, timeout_s: float, **kw: int | str
             ) -> LoadResult:
    return finish_load(start_load(ports, connections, **kw), timeout_s)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# counts


@dataclass(frozen=True)
class Counts:
    """What the agent says about our services' server side, and every drop it counted."""

    recorded: float  # server exchanges of our services (http_server_request_duration count)
    dropped: float  # http records the kernel dropped (a full ring), any service
    handler_errors: float  # batches whose handler raised (records lost, counted)
    # Every HTTP exchange the family saw, either side (probewire_http_exchanges_total): with the
    # filter on our ports, a request is two, the load generator's and nginx's.
    exchanges: float = 0.0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.recorded - other.recorded, self.dropped - other.dropped,
                      self.handler_errors - other.handler_errors,
                      self.exchanges - other.exchanges)


def counts(agent: AgentProc, services: int) -> Counts:
    s = agent.scrape()
    recorded = sum(total(s, "http_server_request_duration_seconds_count",
                         service_name=service_name(i)) for i in range(services))
    return Counts(recorded, total(s, "probewire_events_dropped_total", probe="l7"),
                  total(s, "probewire_ring_handler_errors_total"),
                  total(s, "probewire_http_exchanges_total"))


def settle(agent: AgentProc, services: int, timeout_s: float = 30.0) -> Counts:
    """Counts once two readings a second apart agree (the ring drained, kernel maps merged)."""
    last = counts(agent, services)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = counts(agent, services)
        if now == last:
            return now
        last = now
    return last


def uncounted(sent_ok: int, delta: Counts, both_sides: bool = True) -> float:
    """Exchanges that were answered but neither recorded nor counted as lost (0 when every
    loss was counted), or recorded twice.

    Two identities, both must hold: our services' server exchanges are at most the requests
    answered, all of them when nothing was dropped; and the exchanges of both sides plus the
    records dropped are exactly two per answered request (the filter keeps the family to our
    ports, so every drop is ours). A record lost in a failed handler batch is counted, but not
    by exchange: a handler error excuses every missing exchange of the run."""
    if delta.handler_errors > 0:
        return max(delta.recorded - sent_ok, 0.0)
    server = abs(sent_ok - delta.recorded) if delta.dropped == 0 else max(
        delta.recorded - sent_ok, 0.0)
    if not both_sides:  # other traffic on our ports too (e.g. garbage): the first identity only
        return server
    both = abs(2 * sent_ok - delta.exchanges - delta.dropped)
    return max(server, both)


# ---------------------------------------------------------------------------------------------
# cgroups (v1 controllers here; the agent's own memory cgroup is the parent, so what it uses
# stays accounted where it was)


def _own_v1(controller: str) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    raise RuntimeError(f"no cgroup v1 {controller} controller mounted")


@contextlib.contextmanager
def v1_cgroup(controller: str, settings: dict[str, str]) -> Iterator[Path]:
    """A child cgroup of ours under a v1 controller, with settings; removed afterwards (its
    processes moved back to the parent first)."""
    parent = _own_v1(controller)
    path = parent / f"pw-stress-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        for name, value in settings.items():
            (path / name).write_text(value)
        yield path
    finally:
        for _ in range(50):
            pids = (path / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    (parent / "cgroup.procs").write_text(pid)
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def move_to(cgroup: Path, pid: int) -> None:
    (cgroup / "cgroup.procs").write_text(str(pid))


@contextlib.contextmanager
def spawned_inside(cgroup: Path) -> Iterator[None]:
    """Processes this one spawns meanwhile start in `cgroup` (this process moves there and
    back: cgroup v1 no longer moves charges along, so a process must start where it is to be
    accounted)."""
    home = cgroup.parent
    move_to(cgroup, os.getpid())
    try:
        yield
    finally:
        move_to(home, os.getpid())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def userspace_entries(agent: AgentProc) -> dict[str, float]:
    s = agent.scrape()
    return {dict(labels)["structure"]: v for (name, labels), v in s.items()
            if name == "probewire_userspace_entries"}


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0
