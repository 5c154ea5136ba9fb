"""Three "nodes" on one host: each a network namespace with its own agent and its own service,
the services calling each other across nodes (frontend on node-1 -> cart on node-2 ->
checkout on node-3). Debian's Prometheus scrapes the three agents through file_sd; PromQL gives
per-node and cluster-wide numbers equal to the traffic this test generated, and cross-node
service-graph edges are named by service, not by address.

Each service runs in a kubepods-style cgroup (systemd driver layout, cri-containerd scope) and
the API server, a local server replaying API JSON (no kube-apiserver runs here), knows its pod:
the agent of node-N watches node-N's pods (owner references name the workload) and every pod's
address (names peers on other nodes). Each agent traces only its own node's containers
(filter.k8s_namespaces matches the containers its API view knows), which is also what keeps
three agents on one kernel from counting each other's nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import wait_for

from support import kube_api
from support.netns import _delete_ns, _sh

pytestmark = pytest.mark.e2e

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
PROBEWIRE = str(Path(sys.executable).with_name("probewire"))
SUPPORT = Path(kube_api.__file__).resolve().parent
CGROUP2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")
NET = "198.18.10"
HUB_IP = f"{NET}.254"
API_PORT, PROM_PORT, AGENT_PORT, SVC_PORT = 6443, 9090, 9464, 8080
NAMESPACE = "fleet"
N = 40
SERVICES = {1: ("frontend", 2), 2: ("cart", 3), 3: ("checkout", None)}  # node: (name, calls)


def _hash() -> str:
    return "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(10))


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = f"pw-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cgroup_root = CGROUP2 / f"probewire-test-{self.tag}"
        self.nodes: dict[int, dict[str, Any]] = {}

    def ns(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    def exec(self, ns: str, argv: list[str], log: str, cgroup: Path | None = None,
             ) -> subprocess.Popen[bytes]:
        # nsenter, not `ip netns exec`: that one remounts /sys in a new mount namespace, which
        # hides the cgroup2 mount (and tracefs) that an agent on a node sees.
        cmd = ["nsenter", f"--net=/run/netns/{ns}", *argv]
        if cgroup is not None:
            # Enter the cgroup before exec, so every syscall of the service is in it.
            cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]
        out = (self.tmp / log).open("wb")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc

    def network(self) -> None:
        hub = self.ns(0)
        _sh(["ip", "netns", "add", hub])
        self.namespaces.append(hub)
        _sh(["ip", "-n", hub, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0"])
        for dev in ("lo", "br0"):
            _sh(["ip", "-n", hub, "link", "set", dev, "up"])
        for i in SERVICES:
            node = self.ns(i)
            _sh(["ip", "netns", "add", node])
            self.namespaces.append(node)
            _sh(["ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name",
                 f"veth{i}", "netns", hub])
            _sh(["ip", "-n", node, "addr", "add", f"{NET}.{i}/24", "dev", "eth0"])
            for dev in ("lo", "eth0"):
                _sh(["ip", "-n", node, "link", "set", dev, "up"])
            _sh(["ip", "-n", hub, "link", "set", f"veth{i}", "master", "br0"])
            _sh(["ip", "-n", hub, "link", "set", f"veth{i}", "up"])

    def pods(self) -> list[dict[str, Any]]:
        items = []
        for i, (name, _) in SERVICES.items():
            uid = str(uuid.uuid4())
            cid = secrets.token_hex(32)
            pod_hash = _hash()
            scope = (self.cgroup_root / f"node-{i}" / "kubepods.slice"
                     / "kubepods-besteffort.slice"
                     / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
                     / f"cri-containerd-{cid}.scope")
            scope.mkdir(parents=True)
            self.nodes[i] = {"name": name, "uid": uid, "cid": cid, "cgroup": scope}
            items.append(kube_api.pod(
                f"{name}-{pod_hash}-{_hash()[:5]}", NAMESPACE, uid, f"node-{i}", f"{NET}.{i}",
                owner=("ReplicaSet", f"{name}-{pod_hash}"),
                labels={"app": name, "pod-template-hash": pod_hash},
                containers={name: cid}))
        return items

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:
            _delete_ns(ns)
        # Leaves first: a cgroup directory is removed only when empty.
        if self.cgroup_root.exists():
            for path in sorted(self.cgroup_root.rglob("*"), key=lambda p: -len(p.parts)):
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()
            with contextlib.suppress(OSError):
                self.cgroup_root.rmdir()


@contextlib.contextmanager
def cluster(tmp: Path) -> Iterator[Cluster]:
    c = Cluster(tmp)
    try:
        c.network()
        yield c
    finally:
        c.close()


def _in_ns(ns: str, url: str, timeout_s: float = 10) -> tuple[int, str]:
    """GET `url` from inside network namespace `ns` (curl): (status, body)."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "curl", "-s", "-m",
                          str(timeout_s), "-w", "\n%{http_code}", url], capture_output=True,
                         text=True, timeout=timeout_s + 5)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def _promql(c: Cluster, query: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    url = f"http://{HUB_IP}:{PROM_PORT}/api/v1/query?{urllib.parse.urlencode(params)}"
    status, body = _in_ns(c.ns(0), url)
    assert status == 200, body
    return list(json.loads(body)["data"]["result"])


def _by(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def _diagnose(c: Cluster) -> str:
    out = []
    for i in SERVICES:
        base = f"http://{NET}.{i}:{AGENT_PORT}"
        _, agent = _in_ns(c.ns(i), f"{base}/api/agent")
        _, metrics = _in_ns(c.ns(i), f"{base}/metrics")
        out.append(f"node-{i}: {json.loads(agent).get('kubernetes')}\n" + "\n".join(
            ln for ln in metrics.splitlines() if ln.startswith(
                ("http_server_request_duration_seconds_count", "probewire_http_exchanges",
                 "traces_service_graph_request_total"))))
    for proc in c.procs:
        try:
            out.append(f"{proc.args[-3:]}: " + Path(f"/proc/{proc.pid}/cgroup").read_text()
                       .splitlines()[-1])
        except OSError as exc:
            out.append(f"{proc.args}: {exc}")
    return "\n".join(out)


def test_three_nodes_scraped_by_prometheus_add_up_and_name_cross_node_edges(
        test_output_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="pw-nodes-") as tmp_name, \
            cluster(Path(tmp_name)) as c:
        tmp = Path(tmp_name)
        pods_file = tmp / "pods.json"
        pods_file.write_text(json.dumps({"kind": "PodList", "apiVersion": "v1",
                                         "metadata": {}, "items": c.pods()}))
        hub = c.ns(0)
        c.exec(hub, [sys.executable, str(SUPPORT / "kube_api.py"), HUB_IP, str(API_PORT),
                     str(pods_file)], "api.log")
        for i, (name, calls) in SERVICES.items():
            argv = [sys.executable, str(SUPPORT / "chain_service.py"), f"{NET}.{i}",
                    str(SVC_PORT)]
            if calls is not None:
                argv.append(f"http://{NET}.{calls}:{SVC_PORT}")
            c.exec(c.ns(i), argv, f"{name}.log", cgroup=c.nodes[i]["cgroup"])
        targets = []
        for i in SERVICES:
            config = {
                "listen": f"{NET}.{i}:{AGENT_PORT}", "bpf_stats": "off",
                "probes": {"l7": {"tls": False}},
                "kubernetes": {"api": "on", "api_url": f"http://{HUB_IP}:{API_PORT}",
                               "node_name": f"node-{i}", "token_file": "/nonexistent"},
                "filter": {"k8s_namespaces": [NAMESPACE]},
            }
            path = tmp / f"agent-{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            c.exec(c.ns(i), [PROBEWIRE, "run", "--config", str(path)], f"agent-{i}.log")
            targets.append({"targets": [f"{NET}.{i}:{AGENT_PORT}"],
                            "labels": {"node": f"node-{i}"}})
        (tmp / "targets.json").write_text(json.dumps(targets))
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "probewire", "file_sd_configs": [
                {"files": [str(tmp / "targets.json")], "refresh_interval": "1s"}]}]}))
        c.exec(hub, [PROMETHEUS_BIN, f"--config.file={tmp / 'prometheus.yml'}",
                     f"--storage.tsdb.path={tmp / 'data'}",
                     f"--web.listen-address={HUB_IP}:{PROM_PORT}"], "prometheus.log")
        try:
            for i in SERVICES:
                assert wait_for(lambda i=i: _in_ns(c.ns(i), f"http://{NET}.{i}:{AGENT_PORT}"
                                                   "/healthz", 2)[0] == 200, 90), \
                    (tmp / f"agent-{i}.log").read_text()
            assert wait_for(lambda: _in_ns(hub, f"http://{HUB_IP}:{PROM_PORT}/-/ready", 2)[0]
                            == 200, 60)
            # The k8s filter has found this node's container (its cgroup scan).
            assert wait_for(lambda: len(_promql(c, 'up == 1')) == 3, 60)

            # One request first, so every series exists (at 1) before the measured window.
            server = ('sum by (node) (http_server_request_duration_seconds_count'
                      f'{{k8s_namespace_name="{NAMESPACE}"}})')
            assert _in_ns(c.ns(1), f"http://{NET}.1:{SVC_PORT}/order/warm-up")[0] == 200
            ones = {"node-1": 1.0, "node-2": 1.0, "node-3": 1.0}
            assert wait_for(lambda: _by(_promql(c, server), "node") == ones, 60)
            start = time.time()
            time.sleep(2.5)  # a scrape or two at 1 between the window's start and the load
            # The load: N requests into the frontend from node-1 (outside any container).
            for k in range(N):
                status, _ = _in_ns(c.ns(1), f"http://{NET}.1:{SVC_PORT}/order/{k}")
                assert status == 200
            total = N + 1
            expected = {"node-1": total, "node-2": total, "node-3": total}
            done = wait_for(lambda: _by(_promql(c, server), "node") == expected, 60)
            if not done:
                (test_output_dir / "diagnose.txt").write_text(_diagnose(c))
            assert done, (_promql(c, server), f"see {test_output_dir}/diagnose.txt")
            end = time.time()
            window_ms = int((end - start) * 1000)
            # Rates over the window: the counters at its end less at its start (no
            # extrapolation, unlike rate()), per second. Exactly the load's N requests.
            series = ("http_server_request_duration_seconds_count"
                      f'{{k8s_namespace_name="{NAMESPACE}"}}')
            rate = (f"sum by (node) ({series}) - "
                    f"sum by (node) ({series} offset {window_ms}ms)")
            per_node = _by(_promql(c, f"({rate}) / {window_ms / 1000}", at=end), "node")
            assert per_node == {f"node-{i}": N / (window_ms / 1000) for i in SERVICES}
            cluster_rate = _promql(c, f"sum({rate}) / {window_ms / 1000}", at=end)
            assert float(cluster_rate[0]["value"][1]) == 3 * N / (window_ms / 1000)
            # Each node's service, by its workload, and only its own.
            per_service = _promql(c, 'sum by (node, service_name, k8s_deployment_name) ('
                                     'http_server_request_duration_seconds_count'
                                     f'{{k8s_namespace_name="{NAMESPACE}"}})')
            assert {(r["metric"]["node"], r["metric"]["service_name"],
                     r["metric"]["k8s_deployment_name"]): float(r["value"][1])
                    for r in per_service} == {
                ("node-1", "frontend", "frontend"): total, ("node-2", "cart", "cart"): total,
                ("node-3", "checkout", "checkout"): total}
            cluster_total = _promql(c, 'sum(http_server_request_duration_seconds_count'
                                       f'{{k8s_namespace_name="{NAMESPACE}"}})')
            assert float(cluster_total[0]["value"][1]) == 3 * total
            client = ('sum by (node, server_address) (http_client_request_duration_seconds_'
                      f'count{{k8s_namespace_name="{NAMESPACE}"}})')
            assert _by(_promql(c, client), "node") == {"node-1": total, "node-2": total}
            assert _by(_promql(c, client), "server_address") == {
                f"{NET}.2": total, f"{NET}.3": total}

            # Cross-node edges, named: each side reports the edge it sees (the client's
            # agent from its request, the server's agent from its remote client).
            edges = ('sum by (node, client, server, client_k8s_deployment_name, '
                     'server_k8s_deployment_name) (traces_service_graph_request_total'
                     f'{{server_k8s_namespace_name="{NAMESPACE}"}})')
            got = {(r["metric"]["node"], r["metric"]["client"], r["metric"]["server"],
                    r["metric"].get("client_k8s_deployment_name"),
                    r["metric"].get("server_k8s_deployment_name")): float(r["value"][1])
                   for r in _promql(c, edges)}
            assert got == {
                ("node-1", "frontend", "cart", "frontend", "cart"): total,
                ("node-2", "frontend", "cart", "frontend", "cart"): total,
                ("node-2", "cart", "checkout", "cart", "checkout"): total,
                ("node-3", "cart", "checkout", "cart", "checkout"): total,
            }, got
            # One edge, counted once cluster-wide: the sides agree, so max over nodes.
            once = _promql(c, 'max without (node, instance) (traces_service_graph_request_'
                              'total{client="frontend", server="cart"})')
            assert float(once[0]["value"][1]) == total
        finally:
            for name in ("api.log", "prometheus.log", *(f"agent-{i}.log" for i in SERVICES)):
                with contextlib.suppress(OSError):
                    shutil.copy(tmp / name, test_output_dir / name)
