"""The in-kernel filter (bpf/include/common.h): which pids, cgroups and ports are traced.

Every program consults it first; the agent rewrites it while running.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from probewire.errors import ConfigError
from probewire.runtime.bpf import Map

FILTER_PIDS = 1 << 0
FILTER_CGROUPS = 1 << 1
FILTER_PORTS = 1 << 2


def cgroup2_root(mounts: Path = Path("/proc/self/mounts")) -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on unified hosts,
    /sys/fs/cgroup/unified on hybrid ones (systemd's v1+v2 layout)."""
    for line in mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    return Path("/sys/fs/cgroup")


def cgroup_id(entry: str | int) -> int:
    """A cgroup v2 id is the inode number of its directory (bpf_get_current_cgroup_id)."""
    if isinstance(entry, int):
        return entry
    if entry.isdigit():
        return int(entry)
    root = cgroup2_root()
    path = Path(entry)
    if not str(path).startswith(str(root)):
        path = root / str(entry).lstrip("/")
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise ConfigError(
            f"filter.cgroups: cgroup {entry!r} not found at {path}; give a cgroup v2 path "
            f"under {root} or a numeric cgroup id"
        ) from exc


class Filter:
    """Writes the filter into the shared maps (fds by map name)."""

    def __init__(self, maps: Mapping[str, Map]) -> None:
        self._maps = maps

    def _add(self, name: str, keys: list[bytes]) -> None:
        m = self._maps[name]
        for key in keys:
            m.update(key, b"\x01")

    def _remove_others(self, name: str, keys: list[bytes]) -> None:
        m = self._maps[name]
        wanted = set(keys)
        for key in list(m.keys()):
            if key not in wanted:
                m.delete(key)

    def apply(
        self,
        pids: Sequence[int] = (),
        cgroups: Sequence[str | int] = (),
        ports: Sequence[int] = (),
        container_cgroups: Sequence[int] | None = None,
    ) -> None:
        """Set the filter; empty lists trace everything. Sets members before the mode.

        `container_cgroups`: cgroup ids of the containers Kubernetes selectors matched (None
        when no selector is set). A list, even an empty one, turns the cgroup filter on: no
        matching container means nothing is traced, not everything. Maps are rewritten in
        place (entries added and removed), so a running program never sees an empty set.
        """
        ids = [cgroup_id(c) for c in cgroups]
        if container_cgroups is not None:
            ids.extend(container_cgroups)
        members = {
            "filter_pids": [np.uint32(p).tobytes() for p in pids],
            "filter_cgroups": [np.uint64(i).tobytes() for i in dict.fromkeys(ids)],
            "filter_ports": [np.uint16(p).tobytes() for p in ports],
        }
        # New members first, the mode next, old members last: while the agent rewrites a live
        # filter, programs see the old or the new set or their union, never an empty set.
        for name, keys in members.items():
            self._add(name, keys)
        flags = (
            (FILTER_PIDS if pids else 0)
            | (FILTER_CGROUPS if cgroups or container_cgroups is not None else 0)
            | (FILTER_PORTS if ports else 0)
        )
        self._maps["filter_config"].update(np.uint32(0).tobytes(), np.uint32(flags).tobytes())
        for name, keys in members.items():
            self._remove_others(name, keys)
