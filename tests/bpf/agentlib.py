"""Helpers for kernel-facing tests: a real agent, scraping, waiting for counts."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from probewire.agent import Agent
from probewire.config import Config, config_from_mapping
from probewire.export.prometheus import make_registry
from probewire.serve.http import AgentServer
from support.metrics import Samples, parse_metrics, total
from support.servers import free_port

# Re-exported for the test modules, which import them from here.
__all__ = ["Samples", "free_port", "parse_metrics", "passive_resets_traced", "running_agent",
           "scrape", "total", "wait_for"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@contextmanager
def running_agent(
    overrides: dict[str, Any] | None = None, forced_hooks: dict[str, str] | None = None
) -> Iterator[tuple[Agent, str]]:
    """A real agent in this process, serving on an ephemeral loopback port."""
    # The tests' clients run in this process, which is the agent: trace its traffic too.
    base = {"listen": "127.0.0.1:9464", "probes": {"l7": {"trace_agent": True}}}
    config: Config = config_from_mapping(_merge(base, overrides or {}))
    agent = Agent(config, forced_hooks)
    server = AgentServer(agent, make_registry(agent), "127.0.0.1", 0)
    agent.start()
    server.start()
    host, port = server.address
    try:
        yield agent, f"{host}:{port}"
    finally:
        server.stop()
        agent.stop()


def scrape(listen: str) -> Samples:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        return parse_metrics(resp.read().decode())


def wait_for(fn: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Poll until fn() is true. Not a timing assertion: callers assert on the state after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(interval_s)
    return fn()


def passive_resets_traced() -> bool:
    """Whether tcp/tcp_send_reset fires for a reset the kernel sends without a socket (to a
    closed port). It does since the event carries the reset's reason (6.10); before, it fired
    for resets sent on a socket only, and no hook type of ours sees the others."""
    fmt = Path("/sys/kernel/tracing/events/tcp/tcp_send_reset/format")
    return "reason" in fmt.read_text()
