"""Real podman containers as service identities, without any Kubernetes API.

Containers carrying the CRI annotations kubelet's runtimes set are counted under their
namespace, workload and service (two namespaces with the same app stay two series); a plain
container is named by its container name. Traffic and filters are this test's own ports, so
other processes on the host do not change the counts.
"""

from __future__ import annotations

import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import running_agent, scrape, total, wait_for

from support.containers import PODMAN, podman_container
from support.servers import free_port, wait_port

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _podman_installed() -> None:
    # scripts/setup.sh installs podman: its absence is a broken set-up, not a reason to skip.
    assert PODMAN is not None, "podman missing: run scripts/setup.sh (make test does)"

SERVER = "http_server_request_duration_seconds_count"


def _server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def _get(port: int, n: int) -> None:
    for i in range(n):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?i={i}", timeout=10) as resp:
            resp.read()


def test_cri_annotated_and_plain_containers_are_named_and_labelled() -> None:
    ports = [free_port() for _ in range(4)]
    shop, staging, labelled, plain = ports
    cri = {"io.kubernetes.container.name": "cart"}
    with ExitStack() as stack:
        stack.enter_context(podman_container("probewire-t-shop", _server(shop), {
            **cri, "io.kubernetes.pod.name": "cart-7d9f8b6c5d-x2x9k",
            "io.kubernetes.pod.namespace": "shop"}))
        # containerd spells the same metadata io.kubernetes.cri.*
        stack.enter_context(podman_container("probewire-t-staging", _server(staging), {
            "io.kubernetes.cri.container-name": "cart",
            "io.kubernetes.cri.sandbox-name": "cart-5c8f9d7b6f-m2n4p",
            "io.kubernetes.cri.sandbox-namespace": "staging"}))
        stack.enter_context(podman_container("probewire-t-labelled", _server(labelled), {
            **cri, "io.kubernetes.pod.name": "db-0", "io.kubernetes.pod.namespace": "shop",
            "app.kubernetes.io/name": "orders-db"}))
        stack.enter_context(podman_container("probewire-t-plain", _server(plain)))
        for port in ports:
            wait_port(port)
        agent_cfg = {"filter": {"ports": ports}, "kubernetes": {"api": "off"},
                     "probes": {"l7": {"tls": False}}}
        with running_agent(agent_cfg) as (_agent, listen):
            counts = {shop: 3, staging: 5, labelled: 2, plain: 4}
            for port, n in counts.items():
                _get(port, n)

            def expected() -> bool:
                s = scrape(listen)
                return (total(s, SERVER, service_name="cart", k8s_namespace_name="shop") == 3
                        and total(s, SERVER, service_name="cart",
                                  k8s_namespace_name="staging") == 5
                        and total(s, SERVER, service_name="orders-db") == 2
                        and total(s, SERVER, service_name="probewire-t-plain") == 4)

            wait_for(expected, timeout_s=15)
            s = scrape(listen)
            assert total(s, SERVER, service_name="cart", k8s_namespace_name="shop",
                         k8s_deployment_name="cart") == 3
            assert total(s, SERVER, service_name="cart", k8s_namespace_name="staging",
                         k8s_deployment_name="cart") == 5
            assert total(s, SERVER, service_name="orders-db", k8s_namespace_name="shop",
                         k8s_statefulset_name="db") == 2
            assert total(s, SERVER, service_name="probewire-t-plain") == 4
            # The pod name churns: it is on metrics only with kubernetes.pod_label.
            assert not any("k8s_pod_name" in dict(lbls) for (_, lbls) in s)
            # Exactly our requests, under exactly these four label sets.
            ours = {lbls for (name, lbls), v in s.items() if name == SERVER and v}
            assert sum(total(s, SERVER, **dict(lbls)) for lbls in ours) == sum(counts.values())
