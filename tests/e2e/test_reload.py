"""Live reconfiguration of a running `probewire run`: the config file is a ConfigMap-style
symlink chain swapped atomically, as kubelet does; the port and pid filters change what is
counted within 2 s, with the same process and counters that keep counting; a broken file is
refused and the old config keeps running; service rules and route patterns apply to the next
request; SIGHUP reloads.

Counts are of this test's own servers (named by port rules), so other traffic on the host does
not change them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import free_port, scrape, total, wait_for

from support.servers import wait_port

pytestmark = pytest.mark.e2e

PROBEWIRE = str(Path(sys.executable).with_name("probewire"))
SERVER = "http_server_request_duration_seconds_count"
RELOADS = "probewire_config_reloads_total"
APPLY_WITHIN_S = 2.0  # the bound from writing the file to the new filter counting


class ConfigMapDir:
    """A directory laid out like a ConfigMap volume: config.yaml -> ..data/config.yaml,
    ..data -> ..<version>/; an update writes a new version and swaps ..data atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        (root / "config.yaml").symlink_to("..data/config.yaml")

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"

    def write(self, text: str) -> None:
        self.version += 1
        target = self.root / f"..2026_12_04_{self.version:04d}"
        target.mkdir()
        (target / "config.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / "..data")


def _config(ports: list[int], pids: list[int], rules: dict[str, int],
            routes: list[str] | None = None) -> str:
    return yaml.safe_dump({
        "filter": {"ports": ports, "pids": pids},
        "services": {"rules": [{"name": n, "port": p} for n, p in rules.items()]},
        "probes": {"l7": {"tls": False}, "http": {"routes": routes or []}},
        "kubernetes": {"api": "off"},
    })


@contextmanager
def _server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _get(port: int, n: int) -> None:
    for i in range(n):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?i={i}", timeout=10) as resp:
            resp.read()


def _api(listen: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{listen}{path}", timeout=10) as resp:
        return json.load(resp)


def _healthy(listen: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_filters_reload_live_broken_file_refused_sighup_reloads(tmp_path: Path) -> None:
    port_a, port_b, listen_port = free_port(), free_port(), free_port()
    listen = f"127.0.0.1:{listen_port}"
    rules = {"reload-a": port_a, "reload-b": port_b}
    cm = ConfigMapDir(tmp_path)
    cm.write(_config([port_a], [], rules))
    log_path = tmp_path / "agent.log"
    with _server(port_a) as server_a, _server(port_b), log_path.open("wb") as log:
        agent = subprocess.Popen([PROBEWIRE, "run", "--config", str(cm.path), "--listen", listen],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert wait_for(lambda: agent.poll() is not None or _healthy(listen), 60), \
                log_path.read_text()
            pid = _api(listen, "/api/agent")["pid"]
            assert pid == agent.pid

            def counted(service: str) -> float:
                return total(scrape(listen), SERVER, service_name=service)

            def reloads(result: str) -> float:
                return total(scrape(listen), RELOADS, result=result)

            # Port A only.
            _get(port_a, 3)
            _get(port_b, 3)
            assert wait_for(lambda: counted("reload-a") == 3)
            assert counted("reload-b") == 0

            # Port B only, through an atomic ConfigMap swap: applied within 2 s.
            cm.write(_config([port_b], [], rules))
            assert wait_for(lambda: reloads("success") == 1, APPLY_WITHIN_S), \
                log_path.read_text()
            _get(port_a, 4)
            _get(port_b, 4)
            assert wait_for(lambda: counted("reload-b") == 4)
            assert counted("reload-a") == 3  # the same counter, not reset and not counting

            # A broken file: refused, reported, and the running filter stays.
            cm.write("filter: {ports: [not-a-port]\n")
            assert wait_for(lambda: reloads("failure") == 1, APPLY_WITHIN_S)
            status = _api(listen, "/api/agent")["config"]
            assert status["last_result"] == "failure" and "YAML" in status["last_error"]
            cm.write("filter: {ports: [70000]}\n")  # valid YAML, invalid value
            assert wait_for(lambda: reloads("failure") == 2, APPLY_WITHIN_S)
            assert "filter.ports.0" in _api(listen, "/api/agent")["config"]["last_error"]
            _get(port_b, 2)
            _get(port_a, 2)
            assert wait_for(lambda: counted("reload-b") == 6)
            assert counted("reload-a") == 3

            # The pid filter: server A's process only.
            cm.write(_config([], [server_a.pid], rules))
            assert wait_for(lambda: reloads("success") == 2, APPLY_WITHIN_S)
            _get(port_a, 5)
            _get(port_b, 5)
            assert wait_for(lambda: counted("reload-a") == 8)
            assert counted("reload-b") == 6

            # Service rules and route patterns: new names and routes from the next request on.
            renamed = {"reload-a": port_a, "reload-b2": port_b}
            cm.write(_config([port_b], [], renamed, routes=["/items/{id}"]))
            assert wait_for(lambda: reloads("success") == 3, APPLY_WITHIN_S)
            for i in range(3):
                with contextlib.suppress(urllib.error.HTTPError):
                    urllib.request.urlopen(f"http://127.0.0.1:{port_b}/items/{i}", timeout=10)
            assert wait_for(lambda: total(scrape(listen), SERVER, service_name="reload-b2",
                                          http_route="/items/{id}") == 3)
            assert counted("reload-b") == 6  # the old series stays as it was

            # SIGHUP reloads (and no longer kills the agent).
            agent.send_signal(signal.SIGHUP)
            assert wait_for(lambda: reloads("success") == 4, APPLY_WITHIN_S)
            assert agent.poll() is None and _api(listen, "/api/agent")["pid"] == pid
            assert "configuration reloaded" in log_path.read_text()
            assert "refused, the running configuration stays" in log_path.read_text()
        finally:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
