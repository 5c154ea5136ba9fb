"""Real containers for tests: Debian's podman with runc, the host's root as the image.

crun refuses this host's hybrid cgroup layout and no image registry is reachable, so every
container runs `--runtime runc --cgroup-manager cgroupfs --rootfs /:O` (an overlay of the
host's root) on the host network. The container gets its own cgroup
(/libpod_parent/libpod-<id>, in cgroup v1 and v2) and `--annotation`s land in its OCI
config.json, where a CRI runtime would put kubelet's pod metadata.

    with podman_container("web", ["python3", "-m", "http.server", "8080"],
                          annotations={"io.kubernetes.pod.name": "..."}) as c:
        c.id, c.pid
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

PODMAN = shutil.which("podman")
RUN_ARGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs", "--network", "host",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# `--rootfs` turns the first positional argument into the root file system: it comes last.
ROOTFS = ("--rootfs", "/:O")


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    pid: int


def _podman(*args: str, timeout: float = 60) -> str:
    assert PODMAN is not None, "podman is not installed (scripts/setup.sh installs it)"
    out = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


@contextlib.contextmanager
def podman_container(name: str, command: Sequence[str],
                     annotations: Mapping[str, str] | None = None) -> Iterator[Container]:
    """A running container, removed (with SIGKILL) when the block ends, even on failure."""
    with contextlib.suppress(RuntimeError):
        _podman("rm", "-f", "-t", "0", name)  # left over by a killed run
    args = ["run", "-d", "--name", name, *RUN_ARGS]
    for key, value in (annotations or {}).items():
        args += ["--annotation", f"{key}={value}"]
    container_id = _podman(*args, *ROOTFS, *command)
    try:
        pid = 0
        deadline = time.monotonic() + 30
        while not pid and time.monotonic() < deadline:
            state = json.loads(_podman("inspect", container_id))[0]["State"]
            pid = int(state.get("Pid") or 0)
            if not pid:
                time.sleep(0.05)
        assert pid, f"container {name} did not start"
        yield Container(name, container_id, pid)
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _podman("rm", "-f", "-t", "0", container_id)
