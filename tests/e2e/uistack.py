"""Shared set-up for the UI, API and `top` tests: a real agent (its history sampled every
second) watching nginx -> Python upstream, and a fixed batch of traffic with known counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import scrape, total, wait_for

from probewire.agent import Agent
from probewire.config import config_from_mapping
from probewire.export.prometheus import make_registry
from probewire.serve.http import AgentServer
from support.servers import Server, nginx, python_upstream

SERVER_COUNT = "http_server_request_duration_seconds_count"
EDGE = "traces_service_graph_request_total"
SETTLE_TIMEOUT_S = 30

# path on nginx -> times requested. /api/* is proxied to the upstream.
TRAFFIC = {
    "/static/index.html": 3,
    **{f"/api/items/{i}": 1 for i in range(6)},
    "/api/fail": 2,
    "/missing": 1,
}
# What the agent must count for TRAFFIC (route templating folds /api/items/N).
NGINX_ROUTES = {("GET", "/static/index.html"): 3, ("GET", "/api/items/{id}"): 6,
                ("GET", "/api/fail"): 2, ("GET", "/missing"): 1}
UPSTREAM_ROUTES = {("GET", "/api/items/{id}"): 6, ("GET", "/api/fail"): 2}
NGINX_TOTAL = sum(NGINX_ROUTES.values())
UPSTREAM_TOTAL = sum(UPSTREAM_ROUTES.values())


@dataclass
class Stack:
    agent: Agent
    server: AgentServer
    listen: str
    nginx: Server
    upstream: Server
    traced_pids: list[int]

    @property
    def base(self) -> str:
        return f"http://{self.listen}"


@contextmanager
def observed_stack(sample_interval_s: float = 1.0) -> Iterator[Stack]:
    # The agent's own traffic (API calls, scrapes) stays untraced, so the
    # counts of nginx and the upstream hold still between two readings.
    # Only these servers are traced, from the first moment: other nginx or upstream.py processes
    # on the host (other tests, benchmarks) would add their requests to the same service names.
    # Until the servers run, the filter holds this process alone (whose HTTP is not traced).
    config = config_from_mapping({"probes": {"l7": {"trace_agent": False}},
                                  "filter": {"pids": [os.getpid()]}})
    agent = Agent(config)
    server = AgentServer(agent, make_registry(agent), "127.0.0.1", 0,
                         sample_interval_s=sample_interval_s)
    agent.start()
    server.start()
    host, port = server.address
    try:
        with python_upstream() as up, nginx(upstream_port=up.port) as ng:
            assert agent.filter is not None
            # The master listens before it forks its worker: wait for the worker.
            assert wait_for(lambda: children(ng.process.pid)), "nginx started no worker"
            stack = Stack(agent, server, f"{host}:{port}", ng, up,
                          [os.getpid(), up.process.pid, ng.process.pid,
                           *children(ng.process.pid)])
            agent.filter.apply(stack.traced_pids, [], [])
            yield stack
    finally:
        server.stop()
        agent.stop()


@contextmanager
def tracing_everything(stack: Stack) -> Iterator[None]:
    """Lift the pid filter for a while (e.g. to see a new process's exec)."""
    assert stack.agent.filter is not None
    stack.agent.filter.apply([], [], [])
    try:
        yield
    finally:
        stack.agent.filter.apply(stack.traced_pids, [], [])


def children(pid: int) -> list[int]:
    """A process's children (nginx's workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def drive(stack: Stack, rounds: int = 1) -> None:
    """Send TRAFFIC `rounds` times through nginx and wait until the agent counted all of it.

    The requests come from a child process: the agent runs inside this one, and the far end of
    the agent's own connections is never traced (bpf/l7/self_conns.h), so requests sent from
    here would not count at nginx either."""
    script = (
        "import json, sys, urllib.error, urllib.request\n"
        "url, traffic, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])\n"
        "for _ in range(rounds):\n"
        "    for path, times in traffic.items():\n"
        "        for _ in range(times):\n"
        "            try:\n"
        "                urllib.request.urlopen(url + path, timeout=10).read()\n"
        "            except urllib.error.HTTPError as exc:\n"
        "                exc.read()\n"
    )
    subprocess.run([sys.executable, "-c", script, stack.nginx.url, json.dumps(TRAFFIC),
                    str(rounds)], check=True, timeout=120)

    def settled() -> bool:
        s = scrape(stack.listen)
        return (total(s, SERVER_COUNT, service_name="nginx") >= rounds * NGINX_TOTAL
                and total(s, SERVER_COUNT, service_name="upstream") >= rounds * UPSTREAM_TOTAL
                and total(s, EDGE, client="nginx", server="upstream") >= rounds * UPSTREAM_TOTAL)

    assert wait_for(settled, SETTLE_TIMEOUT_S), "the agent did not count the traffic"
