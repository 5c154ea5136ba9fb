"""Container identity without any API: runtime and id from a cgroup path, metadata from the
runtime's own state on the host.

Every runtime puts a container in a cgroup named after its 64-hex id, and writes the OCI
``config.json`` it hands to the low-level runtime (runc, crun) somewhere under /run or /var/lib.
The CRI runtimes (containerd, CRI-O) copy kubelet's pod metadata into that file's annotations
(``io.kubernetes.pod.name`` ...), which is how an agent learns a pod without talking to the API
server (Coroot's node agent does the same). Docker keeps names and labels in ``config.v2.json``,
podman its names in containers/storage's ``containers.json``.

Where each runtime keeps those files is configurable (``containers.state_paths``): a list of
paths per runtime with ``{id}`` standing for the container id (and ``*`` matching one path
component, e.g. containerd's namespace). Everything read here may vanish under us: a container
that stops mid-read is reported as unknown, never as an exception.
"""

from __future__ import annotations

import glob
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_STATE_PATHS",
    "RUNTIMES",
    "ContainerInfo",
    "ContainerRef",
    "ContainerStore",
    "container_from_cgroup",
    "iter_container_cgroups",
]

RUNTIMES = ("containerd", "crio", "docker", "podman")

# {id} is the 64-hex container id; * matches one path component (glob).
DEFAULT_STATE_PATHS: Mapping[str, tuple[str, ...]] = {
    # containerd's shim v2 bundles, one directory per namespace: k8s.io for CRI, moby for
    # docker >= 20.10, default for ctr/nerdctl.
    "containerd": ("/run/containerd/io.containerd.runtime.v2.task/*/{id}/config.json",),
    # CRI-O and podman share containers/storage: runroot (/run) and graphroot (/var/lib).
    "crio": (
        "/run/containers/storage/overlay-containers/{id}/userdata/config.json",
        "/var/lib/containers/storage/overlay-containers/{id}/userdata/config.json",
    ),
    "docker": (
        "/var/lib/docker/containers/{id}/config.v2.json",
        "/run/containerd/io.containerd.runtime.v2.task/moby/{id}/config.json",
        "/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/{id}/config.json",
    ),
    "podman": (
        "/var/lib/containers/storage/overlay-containers/{id}/userdata/config.json",
        "/run/containers/storage/overlay-containers/{id}/userdata/config.json",
    ),
}

_ID = r"([0-9a-f]{64})"
# Innermost component first; the runtime is told by the scope's prefix (systemd cgroup driver)
# or by the parent directory (cgroupfs driver: /docker/<id>, /kubepods/.../pod<uid>/<id>).
# "crio-conmon-"/"libpod-conmon-" scopes hold the monitor process, not the container.
_SCOPE = re.compile(rf"^(docker|cri-containerd|crio|libpod)-{_ID}(?:\.scope)?$")
_BARE = re.compile(rf"^{_ID}$")
_SCOPE_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "crio": "crio",
                  "libpod": "podman"}
# Container cgroups are never deeper than this under the cgroup root on any layout we know
# (kubepods.slice/kubepods-burstable.slice/...-pod<uid>.slice/cri-containerd-<id>.scope is 4;
# docker-in-docker or kind nodes add a few).
MAX_SCAN_DEPTH = 8
# How long a container whose metadata was not found is not looked for again: the runtime
# writes config.json before it starts the process, so a miss is a runtime we do not know
# (or a path not configured), not a race worth re-reading for on every lookup.
MISS_TTL_S = 10.0


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """A container as its cgroup path tells it: the runtime ("" when the layout does not say,
    e.g. a bare id under kubepods with the cgroupfs driver: containerd or CRI-O) and its id."""

    runtime: str
    id: str


@dataclass(frozen=True)
class ContainerInfo:
    """What the runtime's on-host state says about one container."""

    runtime: str
    id: str
    name: str = ""  # docker/podman name, or the CRI container name
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    source: str = ""  # the file it was read from ("" when nothing was found)


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def container_from_cgroup(cgroup_path: str) -> ContainerRef | None:
    """The innermost container in a cgroup path (v1 or v2 layout), or None outside one.

    Innermost wins: with kind or docker-in-docker the outer scope is the node container.
    """
    parts = _components(cgroup_path)
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        m = _SCOPE.match(part)
        if m:
            return ContainerRef(_SCOPE_RUNTIME[m.group(1)], m.group(2))
        m = _BARE.match(part)
        if m:
            parent = parts[index - 1] if index else ""
            if parent == "docker":
                return ContainerRef("docker", m.group(1))
            if parent.startswith("pod") or parent.startswith("kubepods"):
                return ContainerRef("", m.group(1))  # CRI with cgroupfs: containerd or CRI-O
            return ContainerRef("", m.group(1))
    return None


def iter_container_cgroups(root: Path, max_depth: int = MAX_SCAN_DEPTH,
                           ) -> Iterator[tuple[str, ContainerRef]]:
    """Every container cgroup under ``root`` (a cgroup hierarchy's mount point), as
    (path relative to root, container); a container's own sub-cgroups are not entered."""
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        try:
            with os.scandir(root / rel.lstrip("/") if rel else root) as entries:
                dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue  # removed while we walked
        for name in dirs:
            child = f"{rel}/{name}"
            ref = None
            if "-conmon-" not in name:
                m = _SCOPE.match(name)
                if m:
                    ref = ContainerRef(_SCOPE_RUNTIME[m.group(1)], m.group(2))
                elif _BARE.match(name):
                    ref = container_from_cgroup(child)
            if ref is not None:
                yield child, ref
            elif depth + 1 < max_depth:
                stack.append((child, depth + 1))


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(k, str)}


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _StorageNames:
    """containers/storage's containers.json (podman, CRI-O): id -> first name, re-read when
    the file changes."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[tuple[int, int], dict[str, str]]] = {}

    def name(self, containers_json: str, container_id: str) -> str:
        try:
            st = os.stat(containers_json)
        except OSError:
            return ""
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._files.get(containers_json)
        if cached is None or cached[0] != stamp:
            data = _read_json(containers_json)
            names: dict[str, str] = {}
            if isinstance(data, list):
                for entry in data:
                    if isinstance(entry, dict) and entry.get("names"):
                        names[str(entry.get("id"))] = str(entry["names"][0])
            cached = self._files[containers_json] = (stamp, names)
        return cached[1].get(container_id, "")


class ContainerStore:
    """Container metadata by id, read from the runtimes' state files and cached.

    Thread-safe. A found container is cached until :meth:`forget` (or LRU eviction): its
    annotations never change after creation. A miss is retried after MISS_TTL_S.
    """

    def __init__(self, state_paths: Mapping[Any, Sequence[str]] | None = None,
                 max_entries: int = 8192) -> None:
        self.state_paths = {r: tuple(p) for r, p in (state_paths or DEFAULT_STATE_PATHS).items()}
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[ContainerInfo, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._names = _StorageNames()

    def lookup(self, ref: ContainerRef) -> ContainerInfo:
        """The container's metadata; a ContainerInfo with no source when none was found."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ref.id)
            if hit is not None and (hit[0].source or now - hit[1] < MISS_TTL_S):
                self._cache.move_to_end(ref.id)
                return hit[0]
        info = self._read(ref)
        with self._lock:
            self._cache[ref.id] = (info, now)
            self._cache.move_to_end(ref.id)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return info

    def forget(self, container_id: str) -> None:
        with self._lock:
            self._cache.pop(container_id, None)

    def _candidates(self, ref: ContainerRef) -> Iterator[tuple[str, str]]:
        runtimes = [ref.runtime] if ref.runtime in self.state_paths else list(self.state_paths)
        for runtime in runtimes:
            for pattern in self.state_paths[runtime]:
                path = pattern.replace("{id}", ref.id)
                if any(c in path for c in "*?["):
                    for found in sorted(glob.glob(path)):
                        yield runtime, found
                else:
                    yield runtime, path

    def _read(self, ref: ContainerRef) -> ContainerInfo:
        for runtime, path in self._candidates(ref):
            data = _read_json(path)
            if not isinstance(data, dict):
                continue
            if path.endswith("config.v2.json"):  # docker's own record
                cfg = data.get("Config") if isinstance(data.get("Config"), dict) else {}
                return ContainerInfo(
                    "docker", ref.id, str(data.get("Name", "")).lstrip("/"),
                    _str_map(cfg.get("Annotations") if cfg else None) or {},
                    _str_map(cfg.get("Labels") if cfg else None), path)
            annotations = _str_map(data.get("annotations"))
            actual = runtime
            if annotations.get("io.container.manager") == "libpod":
                actual = "podman"
            elif any(k.startswith("io.kubernetes.cri-o.") for k in annotations) \
                    and actual == "podman":
                actual = "crio"
            name = (annotations.get("io.kubernetes.container.name")
                    or annotations.get("io.kubernetes.cri.container-name") or "")
            if not name and "/overlay-containers/" in path:
                storage = path.split("/overlay-containers/", 1)[0]
                name = self._names.name(f"{storage}/overlay-containers/containers.json", ref.id)
            return ContainerInfo(actual, ref.id, name, annotations, {}, path)
        return ContainerInfo(ref.runtime, ref.id)
