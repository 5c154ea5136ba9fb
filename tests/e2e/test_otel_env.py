"""The standard OpenTelemetry environment, as a new user tries it: no config file, only
OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_PROTOCOL, and spans reach a real OTLP
receiver (tests/support/otlp_receiver.py decodes what a collector would receive)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import free_port, wait_for

from support.otlp_receiver import otlp_receiver
from support.servers import wait_port

pytestmark = pytest.mark.e2e

PROBEWIRE = str(Path(sys.executable).with_name("probewire"))
N = 7


def _healthy(listen: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_only_the_otel_endpoint_variables_export_spans(protocol: str, tmp_path: Path) -> None:
    port, listen = free_port(), f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "PROBEWIRE_"))}
    with otlp_receiver(protocol) as rx:
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "PYTHONUNBUFFERED": "1"})
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                                   "127.0.0.1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            agent = subprocess.Popen([PROBEWIRE, "run", "--listen", listen], env=env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        try:
            wait_port(port)
            assert wait_for(lambda: agent.poll() is not None or _healthy(listen), 60), \
                log_path.read_text()
            for i in range(N):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/env/{i}", timeout=10)
                except urllib.error.HTTPError as exc:  # http.server: 404 for a missing file
                    exc.read()

            def ours() -> list[object]:
                return [s for s in rx.spans() if s.span.kind == s.span.SPAN_KIND_SERVER
                        and s.attributes.get("server.port") == port
                        and str(s.attributes.get("url.path", "")).startswith("/env/")]

            assert wait_for(lambda: len(ours()) >= N, 30), log_path.read_text()
            spans = ours()
            assert len(spans) == N
            assert sorted(s.attributes["url.path"] for s in spans) == [  # type: ignore[attr-defined]
                f"/env/{i}" for i in range(N)]
        finally:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
            server.kill()
            server.wait()
