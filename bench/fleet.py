"""Agent RSS and CPU on a busy Kubernetes node: 500 containers' cgroups and 5,000 pods replayed
through the API, beside the same agent with no Kubernetes at all, in one run (--quick: 100
containers and 1,000 pods).

The node: 500 kubepods-style container cgroups (systemd driver: cri-containerd-<id>.scope under
kubepods-besteffort-pod<uid>.slice) made in the cgroup v2 hierarchy, each with its OCI
config.json (CRI annotations) in a state directory the agent is pointed at
(containers.state_paths). The cluster: 5,000 pods, 500 of them on this node (one per container,
containerStatuses naming the ids), and 500 Services, served by tests/support/kube_api.py (the
API JSON wire format; no kube-apiserver runs here). The agent watches this node's pods, every
pod and every Service (kubernetes.cluster_peers), and filters by namespace
(filter.k8s_namespaces), so its cgroup scan resolves all 500 containers every
containers.scan_interval_s.

Rows: RSS and CPU idle (no traffic) for both configurations, the time and CPU to list the
5,000 pods at start-up, and the CPU to follow 5,000 watch events (a rollout touching every pod).
Numbers need a quiet machine; this one is shared.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import get, running_agent, wait_stable
from bench.report import Row
from support import kube_api  # tests/support, on sys.path through bench.harness

SCALE = {False: (500, 5000, 500), True: (100, 1000, 100)}  # quick: (containers, pods, Services)
NODE = "bench-node"
NAMESPACES = 20


def _cgroup2_root() -> Path:
    from probewire.runtime.filter import cgroup2_root

    return cgroup2_root()


@contextlib.contextmanager
def node(containers: int, tmp: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """`containers` container cgroups with their state files; yields (state dir, pods)."""
    root = _cgroup2_root() / f"probewire-bench-{secrets.token_hex(3)}"
    state = tmp / "containerd"
    pods = []
    try:
        for i in range(containers):
            uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
            ns = f"bench-{i % NAMESPACES}"
            rs = f"app{i % 50}-{'bcdfghjklm'[i % 10]}{'2456789'[i % 7]}b7c"
            name = f"{rs}-x{i:04d}"[:63]
            (root / "kubepods.slice" / "kubepods-besteffort.slice"
             / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
             / f"cri-containerd-{cid}.scope").mkdir(parents=True)
            (state / "k8s.io" / cid).mkdir(parents=True)
            (state / "k8s.io" / cid / "config.json").write_text(json.dumps({"annotations": {
                "io.kubernetes.cri.sandbox-name": name,
                "io.kubernetes.cri.sandbox-namespace": ns,
                "io.kubernetes.cri.container-name": "app",
                "io.kubernetes.cri.sandbox-uid": uid}}))
            pods.append(kube_api.pod(
                name, ns, uid, NODE, f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}",
                owner=("ReplicaSet", rs), labels={"app.kubernetes.io/name": f"app{i % 50}",
                                                  "pod-template-hash": rs.rsplit("-", 1)[1]},
                containers={"app": cid}))
        yield state, pods
    finally:
        if root.exists():
            for path in sorted((p for p in root.rglob("*") if p.is_dir()),
                               key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


def _other_pods(count: int) -> list[dict[str, Any]]:
    return [kube_api.pod(f"remote-{i}-x2x9k", f"bench-{i % NAMESPACES}", str(uuid.uuid4()),
                         f"node-{i % 100}", f"10.{128 + i // 65536}.{i // 256 % 256}.{i % 256}",
                         owner=("ReplicaSet", f"remote-{i % 200}-b7c"),
                         labels={"pod-template-hash": "b7c"},
                         containers={"app": secrets.token_hex(32)})
            for i in range(count)]


def _services(count: int) -> list[dict[str, Any]]:
    return [{"kind": "Service", "apiVersion": "v1",
             "metadata": {"name": f"svc-{i}", "namespace": f"bench-{i % NAMESPACES}",
                          "uid": str(uuid.uuid4())},
             "spec": {"clusterIP": f"10.96.{i // 256}.{i % 256}",
                      "clusterIPs": [f"10.96.{i // 256}.{i % 256}"]}}
            for i in range(count)]


def _idle(agent: Any, seconds: float) -> tuple[float, float]:
    """(RSS MB once stable, CPU % of one core over `seconds` of no traffic)."""
    rss = wait_stable(agent.rss_mb, 1.0, 20.0)
    cpu0, t0 = agent.cpu_s(), time.monotonic()
    time.sleep(seconds)
    return rss, 100.0 * (agent.cpu_s() - cpu0) / (time.monotonic() - t0)


def run(quick: bool) -> list[Row]:
    idle_s = 3.0 if quick else 20.0
    containers, pods_n, services_n = SCALE[quick]
    key = f"{containers} containers, {pods_n:,} pods"
    rss = {k: Row(f"agent RSS, idle ({k})", "MB", target="≤ 60 MB idle (DESIGN §5)",
                  goal=("<=", 60.0)) for k in ("no Kubernetes", key)}
    cpu = {k: Row(f"agent CPU, idle ({k})", "% of a core") for k in rss}
    listed = Row(f"start-up to healthy (this node's {containers} pods listed)", "s")
    cluster_listed = Row(f"start to the cluster's {pods_n:,} pods and {services_n} Services "
                         "listed", "s")
    churn = Row(f"agent CPU to follow {pods_n:,} pod watch events", "CPU s")
    applied = Row("containers matched by the namespace filter", "containers",
                  target=f"= {containers}", goal=("==", float(containers)), judge="all")
    with running_agent("{probes: {http: {tls: false}}, kubernetes: {api: off}, "
                       "bpf_stats: off}") as agent:
        r, c = _idle(agent, idle_s)
        rss["no Kubernetes"].add(r)
        cpu["no Kubernetes"].add(c)
    tmp = Path(tempfile.mkdtemp(prefix="pw-bench-fleet-"))
    try:
        with node(containers, tmp) as (state, local_pods), \
                kube_api.kube_api(pods=local_pods + _other_pods(pods_n - containers),
                                  services=_services(services_n)) as api:
            config = json.dumps({
                "bpf_stats": "off", "probes": {"http": {"tls": False}},
                "containers": {"state_paths": {
                    "containerd": [f"{state}/*/{{id}}/config.json"]}},
                "kubernetes": {"api": "on", "api_url": api.url, "node_name": NODE,
                               "token_file": "/nonexistent", "startup_wait_s": 60},
                "filter": {"k8s_namespaces": ["bench-*"]},
            })
            with running_agent(config, timeout_s=120) as agent:
                listed.add(agent.healthy_after_s)
                listed.note = ("start-up waits for this node's pods only; the cluster-wide "
                               "lists (peer names) follow")
                deadline = time.monotonic() + 120
                kube: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    kube = json.loads(get(f"http://{agent.listen}/api/agent")
                                      ).get("kubernetes") or {}
                    if kube.get("cluster_pods") == pods_n and kube.get("services") == services_n:
                        break
                    time.sleep(0.1)
                cluster_listed.add(time.monotonic() - agent.spawned_at)
                cluster_listed.note = (f"{kube.get('node_pods')} node pods, "
                                       f"{kube.get('cluster_pods')} cluster pods, "
                                       f"{kube.get('services')} Services, pages of 500")
                r, c = _idle(agent, idle_s)
                rss[key].add(r)
                cpu[key].add(c)
                matched = agent.scrape()
                applied.add(sum(v for (n, lbls), v in matched.items()
                                if n == "probewire_map_entries"
                                and ("map", "filter_cgroups") in lbls
                                and ("probe", "tcp") in lbls))
                applied.note = "filter_cgroups entries (probewire_map_entries), refreshed ≤ 10 s"
                cpu0 = agent.cpu_s()
                for pod in local_pods * (pods_n // containers):
                    changed = copy.deepcopy(pod)
                    changed["metadata"]["labels"]["rollout"] = secrets.token_hex(2)
                    api.add("MODIFIED", changed)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    kube = json.loads(get(
                        f"http://{agent.listen}/api/agent")).get("kubernetes") or {}
                    if sum(w["events"] for w in kube.get("watches", [])) >= 2 * pods_n:
                        break
                    time.sleep(0.2)
                churn.add(agent.cpu_s() - cpu0)
                churn.note = ("each event seen twice (node and cluster watches); cached "
                              "names and the filter scan redone once per burst (≤ 5/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note = "needs a quiet machine: other agents and tests share these 2 cores"
    for row in (*rss.values(), *cpu.values()):
        row.note = row.note or note
    return [*rss.values(), *cpu.values(), listed, cluster_listed, applied, churn]
