"""Serving beyond loopback: TLS, basic auth, bearer tokens (as Prometheus exporters do), /healthz
open for kubelet, and API parts switched off. A real AgentServer on a real socket; the agent is
constructed but not started (nothing here needs the kernel)."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from probewire.agent import Agent
from probewire.config import config_from_mapping
from probewire.errors import ConfigError
from probewire.export.prometheus import make_registry
from probewire.serve.http import AgentServer
from support.servers import self_signed_cert


@contextmanager
def server(serve: dict[str, Any]) -> Iterator[str]:
    config = config_from_mapping({"serve": serve, "kubernetes": {"api": "off"}})
    agent = Agent(config)
    srv = AgentServer(agent, make_registry(agent), "127.0.0.1", 0, serve=config.serve)
    srv.start()
    try:
        host, port = srv.address
        yield f"{'https' if srv.tls else 'http'}://{host}:{port}"
    finally:
        srv.stop()


def _get(url: str, headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_tls_with_basic_auth(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    password = tmp_path / "password"
    password.write_text("hunter2\n")
    trust = ssl.create_default_context(cafile=str(cert))
    with server({"tls": {"cert_file": str(cert), "key_file": str(key)},
                 "basic_auth": {"username": "prom", "password_file": str(password)}}) as base:
        assert base.startswith("https://")
        assert _get(f"{base}/metrics", context=trust) == 401
        assert _get(f"{base}/metrics", _basic("prom", "wrong"), trust) == 401
        assert _get(f"{base}/metrics", _basic("prom", "hunter2"), trust) == 200
        assert _get(f"{base}/api/agent", _basic("prom", "hunter2"), trust) == 200
        assert _get(f"{base}/healthz", context=trust) == 200  # kubelet's probes: no secret
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the cert
            urllib.request.urlopen(f"{base}/healthz", timeout=10)
        # A rotated Secret takes effect without a restart.
        password.write_text("correct horse\n")
        assert _get(f"{base}/metrics", _basic("prom", "correct horse"), trust) == 200


def test_bearer_token_and_switched_off_apis(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t")
    with server({"bearer_token_file": str(token),
                 "apis": {"events": False, "security": False}}) as base:
        ok = {"Authorization": "Bearer s3cr3t"}
        assert _get(f"{base}/metrics") == 401
        assert _get(f"{base}/metrics", {"Authorization": "Bearer nope"}) == 401
        assert _get(f"{base}/metrics", ok) == 200
        assert _get(f"{base}/api/events", ok) == 404
        assert _get(f"{base}/api/security/events", ok) == 404
        assert _get(f"{base}/api/probes", ok) == 200


def test_bad_tls_and_secret_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"serve\.tls"), \
            server({"tls": {"cert_file": str(tmp_path / "no.pem"),
                            "key_file": str(tmp_path / "no.key")}}):
        pass
    with pytest.raises(ConfigError, match=r"serve\.bearer_token_file"), \
            server({"bearer_token_file": str(tmp_path / "missing")}):
        pass
