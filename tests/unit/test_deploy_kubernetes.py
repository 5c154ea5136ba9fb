"""deploy/kubernetes: every overlay renders with `kubectl kustomize` and validates against the
Kubernetes schemas (kubernetes-validate ships them; nothing is fetched), and the pieces agree
with each other and with the agent's config model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from probewire.config import config_from_mapping

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
# Oldest minor version whose schemas the manifests must satisfy (DaemonSet, RBAC v1 and
# seccompProfile fields are all older than this).
KUBERNETES_VERSION = "1.27"
OVERLAYS = [ROOT / "base", *sorted((ROOT / "overlays").iterdir())]


def _render(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None, "kubectl is missing: scripts/setup.sh installs kubernetes-client"
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay: Path) -> None:
    docs = _render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace",
                     "PodMonitor", "ServiceAccount"]
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            continue  # a CRD of the Prometheus operator: checked below, not in these schemas
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    by_kind = {d["kind"]: d for d in docs}
    ds, cm = by_kind["DaemonSet"], by_kind["ConfigMap"]
    ns = by_kind["Namespace"]["metadata"]["name"]
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # The pieces refer to each other by the names this overlay gave them.
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    (subject,) = by_kind["ClusterRoleBinding"]["subjects"]
    assert (subject["name"], subject["namespace"]) == (pod["serviceAccountName"], ns)
    assert by_kind["ClusterRoleBinding"]["roleRef"]["name"] == \
        by_kind["ClusterRole"]["metadata"]["name"]
    assert {d["metadata"].get("namespace", ns) for d in docs
            if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")} == {ns}
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
    # Mounted as a directory: a subPath mount never sees ConfigMap updates (no live reload).
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in mount and container["args"][-1].startswith(mount["mountPath"])
    # The shipped config is valid for this agent.
    config = config_from_mapping(yaml.safe_load(cm["data"]["config.yaml"]), "ConfigMap")
    assert config.listen_address[1] == container["ports"][0]["containerPort"]
    # Read-only RBAC.
    for rule in by_kind["ClusterRole"]["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    # Capabilities instead of privileged.
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"} <= set(security["capabilities"]["add"])
    assert pod["hostPID"] is True
    assert all(m.get("readOnly") for m in container["volumeMounts"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]
    # The PodMonitor selects the DaemonSet's pods on a port they declare.
    monitor = by_kind["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in container["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= port_names


def test_canary_runs_only_on_canary_nodes_and_base_avoids_them() -> None:
    def node_terms(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ds = next(d for d in docs if d["kind"] == "DaemonSet")
        affinity = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        return [e for t in terms for e in t["matchExpressions"]]

    assert node_terms(_render(ROOT / "base")) == [
        {"key": "probewire.io/canary", "operator": "NotIn", "values": ["true"]}]
    assert node_terms(_render(ROOT / "overlays" / "canary")) == [
        {"key": "probewire.io/canary", "operator": "In", "values": ["true"]}]
