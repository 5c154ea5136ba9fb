"""Container identity: runtime + id from cgroup paths (v1 and v2 layouts), metadata from each
runtime's on-host state files, and Kubernetes identity from CRI annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.enrich.container import (
    ContainerRef,
    ContainerStore,
    container_from_cgroup,
    iter_container_cgroups,
)
from probewire.enrich.kubernetes import (
    identity_from_annotations,
    pod_from_object,
    workload_from_owner,
    workload_from_pod_name,
)
from probewire.enrich.service import _cgroup_v2_path
from support.kube_api import load_items

CID = "4f1c2a3b" * 8
UID = "0b6a7f3e-9c1d-4e2f-8a5b-6c7d8e9f0a1b"
SYSTEMD_UID = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("cgroup", "runtime"),
    [
        # systemd cgroup driver (cgroup v2 nodes, and the name=systemd hierarchy on v1)
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/"
         f"cri-containerd-{CID}.scope", "containerd"),
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/"
         f"crio-{CID}.scope", "crio"),
        (f"/system.slice/docker-{CID}.scope", "docker"),
        (f"/machine.slice/libpod-{CID}.scope", "podman"),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
         "podman"),
        # cgroupfs driver
        (f"/docker/{CID}", "docker"),
        (f"/libpod_parent/libpod-{CID}", "podman"),
        (f"/kubepods/burstable/pod{UID}/{CID}", ""),  # containerd or CRI-O: state files tell
    ],
)
def test_runtime_and_id_from_cgroup_layouts(cgroup: str, runtime: str) -> None:
    assert container_from_cgroup(cgroup) == ContainerRef(runtime, CID)


@pytest.mark.parametrize("cgroup", [f"/machine.slice/libpod-conmon-{CID}.scope",
                                    f"/kubepods.slice/crio-conmon-{CID}.scope",
                                    "/system.slice/nginx.service", "/", ""])
def test_monitors_and_hosts_are_not_containers(cgroup: str) -> None:
    assert container_from_cgroup(cgroup) is None


def test_v1_and_v2_proc_cgroup_files_give_the_same_container() -> None:
    hybrid = (f"12:pids:/libpod_parent/libpod-{CID}\n1:name=systemd:/libpod_parent/libpod-{CID}\n"
              f"0::/libpod_parent/libpod-{CID}\n")
    v1_only = f"4:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n"
    v2_only = f"0::/system.slice/docker-{CID}.scope\n"
    assert container_from_cgroup(_cgroup_v2_path(hybrid)) == ContainerRef("podman", CID)
    assert container_from_cgroup(_cgroup_v2_path(v1_only)) == ContainerRef("docker", CID)
    assert container_from_cgroup(_cgroup_v2_path(v2_only)) == ContainerRef("docker", CID)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./@", max_size=200))
def test_any_cgroup_path_parses_without_error(path: str) -> None:
    ref = container_from_cgroup(path)
    assert ref is None or len(ref.id) == 64


def test_cgroup_tree_scan_finds_containers_and_skips_their_children(tmp_path: Path) -> None:
    (tmp_path / f"kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope"
     / "sub").mkdir(parents=True)
    (tmp_path / f"libpod_parent/libpod-{'ab' * 32}").mkdir(parents=True)
    (tmp_path / f"libpod_parent/libpod-conmon-{'cd' * 32}").mkdir(parents=True)
    found = dict(iter_container_cgroups(tmp_path))
    assert sorted(r.runtime for r in found.values()) == ["containerd", "podman"]


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_store_reads_each_runtimes_state_files(tmp_path: Path) -> None:
    paths = {
        "containerd": (f"{tmp_path}/containerd/*/{{id}}/config.json",),
        "crio": (f"{tmp_path}/storage/overlay-containers/{{id}}/userdata/config.json",),
        "docker": (f"{tmp_path}/docker/{{id}}/config.v2.json",),
        "podman": (f"{tmp_path}/storage/overlay-containers/{{id}}/userdata/config.json",),
    }
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    _write(tmp_path / f"containerd/k8s.io/{a}/config.json", {"annotations": {
        "io.kubernetes.cri.sandbox-name": "cart-7d9f8b6c5d-x2x9k",
        "io.kubernetes.cri.sandbox-namespace": "shop",
        "io.kubernetes.cri.container-name": "cart",
        "io.kubernetes.cri.sandbox-uid": UID}})
    _write(tmp_path / f"storage/overlay-containers/{b}/userdata/config.json", {"annotations": {
        "io.kubernetes.pod.name": "db-0", "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.container.name": "postgres", "io.kubernetes.cri-o.Created": "x"}})
    _write(tmp_path / f"docker/{c}/config.v2.json",
           {"Name": "/web", "Config": {"Labels": {"tier": "front"}}})
    _write(tmp_path / f"storage/overlay-containers/{d}/userdata/config.json",
           {"annotations": {"io.container.manager": "libpod"}})
    _write(tmp_path / "storage/overlay-containers/containers.json",
           [{"id": d, "names": ["plain-box"]}])
    store = ContainerStore(paths)
    cri = store.lookup(ContainerRef("containerd", a))
    assert (cri.runtime, cri.name) == ("containerd", "cart")
    pod = identity_from_annotations(cri.annotations)
    assert pod is not None and (pod.namespace, pod.pod, pod.container, pod.uid) == (
        "shop", "cart-7d9f8b6c5d-x2x9k", "cart", UID)
    assert (pod.workload_kind, pod.workload_name) == ("deployment", "cart")
    crio = store.lookup(ContainerRef("", b))
    assert (crio.runtime, crio.name) == ("crio", "postgres")
    docker = store.lookup(ContainerRef("docker", c))
    assert (docker.name, dict(docker.labels)) == ("web", {"tier": "front"})
    podman = store.lookup(ContainerRef("podman", d))
    assert (podman.runtime, podman.name) == ("podman", "plain-box")
    assert identity_from_annotations(podman.annotations) is None
    missing = store.lookup(ContainerRef("docker", "e" * 64))
    assert missing.source == "" and missing.name == ""


def test_a_garbage_state_file_is_unknown_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / f"{'a' * 64}.json"
    path.write_bytes(b"\xff{not json")
    store = ContainerStore({"docker": (f"{tmp_path}/{{id}}.json",)})
    assert store.lookup(ContainerRef("docker", "a" * 64)).source == ""


@pytest.mark.parametrize(
    ("pod", "workload"),
    [
        ("cart-7d9f8b6c5d-x2x9k", ("deployment", "cart")),
        ("my-api-v2-5c8f9d7b6f-m2n4p", ("deployment", "my-api-v2")),
        ("backup-28391040-x7k2q", ("cronjob", "backup")),
        ("db-0", ("statefulset", "db")),
        ("kafka-12", ("statefulset", "kafka")),
        ("fluentd-x2x9k", ("daemonset", "fluentd")),
        ("standalone", ("", "")),
    ],
)
def test_workload_from_pod_name_heuristic(pod: str, workload: tuple[str, str]) -> None:
    assert workload_from_pod_name(pod) == workload


def test_owner_references_decide_with_the_api() -> None:
    hashed = {"pod-template-hash": "7d9f8b6c5d"}
    assert workload_from_owner("ReplicaSet", "cart-7d9f8b6c5d", hashed) == ("deployment", "cart")
    assert workload_from_owner("ReplicaSet", "lonely", {}) == ("replicaset", "lonely")
    assert workload_from_owner("Job", "backup-28391040", {}) == ("cronjob", "backup")
    assert workload_from_owner("Job", "migrate", {}) == ("job", "migrate")
    assert workload_from_owner("StatefulSet", "db", {}) == ("statefulset", "db")
    assert workload_from_owner("Node", "n1", {}) == ("", "")


def test_recorded_pods_decode_to_their_workloads() -> None:
    pods = {p.name: p for p in map(pod_from_object, load_items("pods.json")) if p}
    assert (pods["cart-7d9f8b6c5d-x2x9k"].workload_kind,
            pods["cart-7d9f8b6c5d-x2x9k"].workload_name) == ("deployment", "cart")
    assert pods["db-0"].workload_kind == "statefulset"
    assert pods["fluentd-x2x9k"].workload_kind == "daemonset"
    assert (pods["backup-28391040-x7k2q"].workload_kind,
            pods["backup-28391040-x7k2q"].workload_name) == ("cronjob", "backup")
    assert pods["cart-7d9f8b6c5d-x2x9k"].containers == {"a" * 64: "cart"}
    assert pods["cart-7d9f8b6c5d-x2x9k"].ips == ("10.244.1.11",)
    assert pod_from_object({"kind": "Status"}) is None


def test_kubernetes_selectors_match_namespace_workload_and_labels() -> None:
    from probewire.config import FilterConfig
    from probewire.enrich.kubernetes import PodIdentity
    from probewire.enrich.workload import matches_selectors

    cart = PodIdentity("shop", "cart-7d9f8b6c5d-x2x9k", "cart", "", "deployment", "cart",
                       {"app.kubernetes.io/name": "cart", "tier": "web"})
    assert matches_selectors(cart, FilterConfig(k8s_namespaces=("sh*",)))
    assert not matches_selectors(cart, FilterConfig(k8s_namespaces=("staging",)))
    assert matches_selectors(cart, FilterConfig(k8s_workloads=("deployment/cart",)))
    assert matches_selectors(cart, FilterConfig(k8s_workloads=("cart",)))
    assert not matches_selectors(cart, FilterConfig(k8s_workloads=("statefulset/cart",)))
    assert matches_selectors(cart, FilterConfig(k8s_labels={"tier": "web"}))
    assert not matches_selectors(cart, FilterConfig(k8s_namespaces=("shop",),
                                                    k8s_labels={"tier": "db"}))
    assert not matches_selectors(None, FilterConfig(k8s_namespaces=("*",)))
