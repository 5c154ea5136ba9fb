"""The agent's own exports are not traced at either end.

A real agent (`probewire run`, its own process) exports spans and metrics to a real OTLP
receiver in this process, over gRPC and HTTP/protobuf. This process is traced like any other,
so without the kernel's check (bpf/l7/self_conns.h) its server side of the export connections
would become exchanges, metrics and spans, exported in turn. Other traffic of this same
process, to an upstream in another process, keeps its exact counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import scrape, total, wait_for

from support.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver
from support.servers import free_port, python_upstream

pytestmark = pytest.mark.e2e

PROBEWIRE = str(Path(sys.executable).with_name("probewire"))
N = 25
START_TIMEOUT_S = 120  # a safety net against hangs, not an assertion on speed


def _healthy(listen: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def _agent(config: dict[str, Any], *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    listen = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="pw-otlp-self-") as tmp:
        path = Path(tmp) / "probewire.yaml"
        path.write_text(yaml.safe_dump(config))
        log_path = Path(tmp) / "agent.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([PROBEWIRE, "run", "--config", str(path), "--listen", listen,
                                     *extra],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: proc.poll() is not None or _healthy(listen), START_TIMEOUT_S)
                if not _healthy(listen):
                    pytest.fail(f"agent not healthy at {listen} (exit {proc.poll()}):\n"
                                + log_path.read_text(errors="replace"))
                yield proc, listen
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=30)


def _get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as resp:
        resp.read()


def _self_conns(agent_pid: int) -> list[dict[str, Any]]:
    """The agent's l7_self_conns map, as bpftool dumps it (BTF-formatted)."""
    maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], check=True,
                                     capture_output=True, text=True).stdout)
    fds = Path(f"/proc/{agent_pid}/fdinfo")
    held = set()
    for info in fds.iterdir():
        try:
            for line in info.read_text().splitlines():
                if line.startswith("map_id:"):
                    held.add(int(line.split()[1]))
        except OSError:
            continue
    ids = [m["id"] for m in maps if m.get("name") == "l7_self_conns" and m["id"] in held]
    assert len(ids) == 1, f"the agent holds {len(ids)} l7_self_conns maps"
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(ids[0])], check=True,
                         capture_output=True, text=True).stdout
    return [e["formatted"]["key"] for e in json.loads(out)]


def _spans_to(rx: Receiver, port: int) -> list[ReceivedSpan]:
    return [s for s in rx.spans() if s.attributes.get("server.port") == port]


# The agent's connections are learnt from inet_sock_set_state: its tp_btf program, and the tp
# one it falls back to on kernels without tp_btf.
@pytest.mark.parametrize(("protocol", "hook"), [
    ("grpc", "tp_btf"), ("http/protobuf", "tp_btf"), ("grpc", "tp")])
def test_the_agents_exports_make_no_exchange_at_the_receiving_end(protocol: str,
                                                                  hook: str) -> None:
    pid = os.getpid()
    with otlp_receiver(protocol) as rx, python_upstream() as up:
        rx_port = int(rx.endpoint.rsplit(":", 1)[1])
        config = {"export": {"otlp": {
            "enabled": True, "protocol": protocol, "endpoint": rx.endpoint, "interval_s": 1,
            "link_wait_ms": 50}}}
        with _agent(config, "--force-hook", f"inet_sock_set_state={hook}") as (agent, listen):
            for i in range(N):
                _get(f"{up.url}/self/{i}")
            # The upstream's server spans and this process's client spans, all of them.
            assert wait_for(lambda: len([s for s in _spans_to(rx, up.port)
                                         if s.span.kind == s.span.SPAN_KIND_SERVER]) >= N
                            and len([s for s in _spans_to(rx, up.port)
                                     if s.span.kind == s.span.SPAN_KIND_CLIENT
                                     and s.resource.get("process.pid") == pid]) >= N, 60)
            # Metric exports keep coming every second, on the same connections (gRPC) or new
            # ones (HTTP): wait for several while the exchanges would be made.
            seen = len(rx.trace_requests) + len(rx.metric_requests)
            assert wait_for(lambda: len(rx.metric_requests) >= 3
                            and len(rx.trace_requests) + len(rx.metric_requests) > seen + 2, 30)
            tuples = _self_conns(agent.pid)
            samples = scrape(listen)
        spans = _spans_to(rx, up.port)

    # The kernel knew the export connections as the agent's...
    assert any(t["sport"] == rx_port for t in tuples), tuples
    # ...so their receiving end made nothing: no exchange reached user space (the user-space
    # check would have counted it), no metric, no span.
    assert total(samples, "probewire_otlp_spans_total", result="export_call") == 0
    assert _spans_to(rx, rx_port) == []
    assert [s.span.name for s in rx.spans()
            if "opentelemetry.proto.collector" in s.span.name
            or str(s.attributes.get("url.path", "")).startswith("/v1/")] == []
    assert [labels for (name, labels) in samples
            if "opentelemetry.proto.collector" in str(labels) or "/v1/" in str(labels)] == []
    # Other traffic of this very process is exact.
    servers = [s for s in spans if s.span.kind == s.span.SPAN_KIND_SERVER]
    clients = [s for s in spans if s.span.kind == s.span.SPAN_KIND_CLIENT
               and s.resource.get("process.pid") == pid]
    assert sorted(s.attributes["url.path"] for s in servers) == sorted(
        f"/self/{i}" for i in range(N))
    assert len(clients) == N
