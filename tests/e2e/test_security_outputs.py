"""Security alerts leave the agent the ways docs/security.md lists: OTLP log records to a real
receiver (gRPC and HTTP/protobuf), JSON lines on the stdout of `probewire run`, the API, and the
metric; argv redacted in every one of them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import running_agent, wait_for

from probewire.probes.process import ProcessProbe
from support.attacks import write_scripts
from support.metrics import parse_metrics, total
from support.otlp_receiver import any_value, attrs, otlp_receiver
from support.servers import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROBEWIRE = REPO / ".venv" / "bin" / "probewire"


@pytest.fixture
def scripts(test_output_dir: Path) -> dict[str, Path]:
    return write_scripts(test_output_dir)


def run_miner(scripts: dict[str, Path], directory: Path) -> int:
    """The miner attack (a /bin/true named xmrig, a stratum URL and `-p x`): its helper's pid."""
    proc = subprocess.Popen([sys.executable, str(scripts["miner"]), str(directory / "xmrig")])
    assert proc.wait(60) == 0
    return proc.pid


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_alerts_are_otlp_log_records(protocol: str, scripts: dict[str, Path],
                                     test_output_dir: Path) -> None:
    with otlp_receiver(protocol) as rx, running_agent({
        "probes": {"l7": {"enabled": False}, "tcp": {"enabled": False},
                   "saturation": {"enabled": False}},
        "export": {"otlp": {"enabled": True, "protocol": protocol, "endpoint": rx.endpoint,
                            "interval_s": 3600, "traces": False,
                            "resource_attributes": {"deployment.environment": "test"}}},
    }) as (agent, _listen):
        helper = run_miner(scripts, test_output_dir)

        def mine() -> list[Any]:
            return [(res, r) for res, r in rx.logs()
                    if json.loads(attrs(r.attributes)["probewire.security.ancestry"])[0]["pid"]
                    == helper]

        assert wait_for(lambda: bool(mine()), 20)
        probe = agent.probes["process"]
        assert isinstance(probe, ProcessProbe) and probe.security is not None
        alert = next(a for a in probe.security.recent()
                     if a["ancestry"] and a["ancestry"][0]["pid"] == helper)
    ((resource, record),) = mine()
    a = attrs(record.attributes)
    assert resource["service.name"] == "probewire"
    assert resource["deployment.environment"] == "test"
    assert record.event_name == "probewire.security.alert"
    assert record.severity_text == "CRITICAL" and record.severity_number == 21  # FATAL
    assert a["probewire.security.rule"] == "crypto_miner"
    assert a["probewire.security.alert_id"] == alert["id"]
    assert a["process.pid"] == alert["process"]["pid"]
    assert a["process.executable.path"] == str(test_output_dir / "xmrig")
    args = next(kv.value for kv in record.attributes if kv.key == "process.command_args")
    assert [any_value(v) for v in args.array_value.values][-2:] == ["-p", "***"]
    assert "stratum+tcp://" in any_value(record.body)


def test_run_writes_alerts_as_json_lines_on_stdout(scripts: dict[str, Path],
                                                    test_output_dir: Path) -> None:
    cfg = test_output_dir / "agent.yaml"
    cfg.write_text("probes: {l7: {enabled: false}, tcp: {enabled: false}}\n"
                   "security: {alert_log: '-'}\n")
    listen = f"127.0.0.1:{free_port()}"
    out = test_output_dir / "stdout.txt"
    with out.open("w") as stdout:
        agent = subprocess.Popen([str(PROBEWIRE), "run", "--config", str(cfg), "--listen",
                                  listen], stdout=stdout, stderr=subprocess.PIPE, text=True)
        try:
            def up() -> bool:
                try:
                    with urllib.request.urlopen(f"http://{listen}/healthz", timeout=1):
                        return True
                except OSError:
                    return False

            assert wait_for(up, 30), agent.stderr.read() if agent.poll() is not None else ""
            helper = run_miner(scripts, test_output_dir)

            def lines() -> list[dict[str, Any]]:
                return [json.loads(line) for line in out.read_text().splitlines()
                        if line.startswith("{")]

            def mine() -> list[dict[str, Any]]:
                return [a for a in lines() if a["ancestry"] and a["ancestry"][0]["pid"] == helper]

            assert wait_for(lambda: bool(mine()), 20)
            with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
                metrics = parse_metrics(resp.read().decode())
            with urllib.request.urlopen(f"http://{listen}/api/security/alerts", timeout=10) as r:
                api = json.load(r)
        finally:
            agent.terminate()
            agent.wait(20)
    (alert,) = mine()
    assert alert["rule"] == "crypto_miner" and alert["process"]["argv"][-1] == "***"
    assert alert["process"]["exe"] == str(test_output_dir / "xmrig")
    assert [a for a in api["alerts"] if a["id"] == alert["id"]] == [alert]
    assert total(metrics, "probewire_security_alerts_total", rule="crypto_miner",
                 service_name=alert["service_name"]) >= 1
    assert agent.returncode == 0
