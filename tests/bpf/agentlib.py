"""Helpers for kernel-facing tests: a real agent, scraping, waiting for counts."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from probewire.agent import Agent
from probewire.config import Config, config_from_mapping
from probewire.export.prometheus import make_registry
from probewire.serve.http import AgentServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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
    base = {"listen": "127.0.0.1:9464", "probes": {"http": {"trace_agent": True}}}
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
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


def wait_for(fn: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Poll until fn() is true. Not a timing assertion: callers assert on the state after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(interval_s)
    return fn()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
