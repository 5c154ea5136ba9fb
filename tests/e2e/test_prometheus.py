"""Debian's Prometheus scrapes a real agent with deploy/prometheus/'s config and rules; PromQL
through its HTTP API returns the requests this test drove through nginx -> upstream."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import free_port, running_agent, wait_for

from support.servers import nginx, python_upstream, wait_port

pytestmark = pytest.mark.e2e

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
N = 25
ROUTE = "/api/prom/{id}"


@contextmanager
def prometheus(target: str, output: Path) -> Iterator[str]:
    """Prometheus with deploy/prometheus/prometheus.yml, pointed at `target`, scraping every 1 s."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pw-prom-") as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        log = (output / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [PROMETHEUS_BIN, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(port, timeout_s=60)
            base = f"http://127.0.0.1:{port}"
            assert wait_for(lambda: _ready(base), timeout_s=60), "Prometheus never got ready"
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as resp:
            return int(resp.status) == 200
    except OSError:  # 503 until the TSDB is open
        return False


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def scalar(base: str, query: str) -> float | None:
    result = api(base, "query", query=query)["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_agent_and_promql_counts_the_requests(
    test_output_dir: Path,
) -> None:
    with python_upstream() as up, nginx(upstream_port=up.port) as ng, \
            running_agent() as (_agent, listen), prometheus(listen, test_output_dir) as prom:
        assert wait_for(lambda: any(t["health"] == "up" for t in
                                    api(prom, "targets")["activeTargets"]), timeout_s=60)
        for i in range(N):
            with urllib.request.urlopen(f"{ng.url}/api/prom/{i}", timeout=10) as resp:
                resp.read()
        def server(service: str) -> str:
            return (f'sum(http_server_request_duration_seconds_count{{service_name="{service}",'
                    f'http_route="{ROUTE}"}})')

        client = ('sum(http_client_request_duration_seconds_count{service_name="nginx",'
                  f'server_port="{up.port}",http_route="{ROUTE}"}})')
        assert wait_for(lambda: scalar(prom, server("nginx")) == N
                        and scalar(prom, server("upstream")) == N
                        and scalar(prom, client) == N, timeout_s=60)
        assert scalar(prom, server("nginx")) == N
        assert scalar(prom, server("upstream")) == N
        assert scalar(prom, client) == N
        # The requests arrived between scrapes, so their rate over the window is positive.
        rate = scalar(prom, f'sum(rate(http_server_request_duration_seconds_count'
                            f'{{service_name="nginx",http_route="{ROUTE}"}}[1m]))')
        assert rate is not None and rate > 0
        # Service graph edge nginx -> upstream, and the deploy rules are loaded and healthy.
        edge = scalar(prom, 'sum(traces_service_graph_request_total{client="nginx",'
                            'server="upstream"})')
        assert edge is not None and edge >= N
        groups = api(prom, "rules")["groups"]
        assert {g["name"] for g in groups} == {
            "probewire.red", "probewire.tcp", "probewire.alerts", "probewire.saturation",
            "probewire.saturation.alerts", "probewire.security"}
        assert all(r["health"] != "err" for g in groups for r in g["rules"])
        assert scalar(prom, 'probewire_probe_attached == 0') is None
