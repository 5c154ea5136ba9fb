"""The kernel side of the rules: constants mirrored from bpf/process.h (checked against the
object's BTF at load, so the two cannot drift), the compiled tables the exec hook reads, and
the listening-socket seed taken from /proc.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from probewire.errors import BpfError

if TYPE_CHECKING:
    from probewire.runtime.bpf import BpfObject

# enum process_kind
PROCESS_EXEC = 1
PROCESS_EXIT = 2
PROCESS_FORK = 3
PROCESS_CONNECT = 4
# enum process_sec_flag
SEC_CHECKED = 1 << 0
SEC_STDIN_TCP = 1 << 1
SEC_STDOUT_TCP = 1 << 2
SEC_EXE_MEMFD = 1 << 3
SEC_EXE_DELETED = 1 << 4
SEC_IN_CONTAINER = 1 << 5
SEC_EXE_TRUNCATED = 1 << 6
SEC_KILLED = 1 << 7
SEC_KILL_FAILED = 1 << 8
# enum process_sizes
PROCESS_FILENAME_LEN = 128
PROCESS_ARGS_LEN = 256
PROCESS_EXE_LEN = 256
SEC_MAX_CLAUSES = 64
SEC_MAX_DEPTH = 8
SEC_NAME_LEN = 16
SEC_DEPTH_SLOTS = 16

ENUMS: dict[str, dict[str, int]] = {
    "process_kind": {"PROCESS_EXEC": PROCESS_EXEC, "PROCESS_EXIT": PROCESS_EXIT,
                     "PROCESS_FORK": PROCESS_FORK, "PROCESS_CONNECT": PROCESS_CONNECT},
    "process_sec_flag": {
        "SEC_CHECKED": SEC_CHECKED, "SEC_STDIN_TCP": SEC_STDIN_TCP,
        "SEC_STDOUT_TCP": SEC_STDOUT_TCP, "SEC_EXE_MEMFD": SEC_EXE_MEMFD,
        "SEC_EXE_DELETED": SEC_EXE_DELETED, "SEC_IN_CONTAINER": SEC_IN_CONTAINER,
        "SEC_EXE_TRUNCATED": SEC_EXE_TRUNCATED, "SEC_KILLED": SEC_KILLED,
        "SEC_KILL_FAILED": SEC_KILL_FAILED,
    },
    "process_sizes": {
        "PROCESS_FILENAME_LEN": PROCESS_FILENAME_LEN, "PROCESS_ARGS_LEN": PROCESS_ARGS_LEN,
        "PROCESS_EXE_LEN": PROCESS_EXE_LEN, "SEC_MAX_CLAUSES": SEC_MAX_CLAUSES,
        "SEC_MAX_DEPTH": SEC_MAX_DEPTH, "SEC_NAME_LEN": SEC_NAME_LEN,
        "SEC_DEPTH_SLOTS": SEC_DEPTH_SLOTS,
    },
}

SECURITY_CONFIG = np.dtype([
    ("clauses", np.uint64),
    ("need_name", np.uint64),
    ("need_prefix", np.uint64),
    ("need_fileless", np.uint64),
    ("need_stdio_tcp", np.uint64),
    ("need_uid", np.uint64),
    ("need_container", np.uint64),
    ("need_host", np.uint64),
    ("need_listener", np.uint64),
    ("listener_within", np.uint64, (SEC_DEPTH_SLOTS,)),
    ("kill", np.uint64),
    ("gated", np.uint64),
    ("listener_depth", np.uint32),
    ("watch_connects", np.uint32),
])
SECURITY_PREFIX_KEY = np.dtype([("prefixlen", np.uint32), ("path", f"S{PROCESS_EXE_LEN}")])
SECURITY_ADDR_KEY = np.dtype([("prefixlen", np.uint32), ("family", np.uint8),
                              ("addr", np.uint8, (16,)), ("_pad", np.uint8, (3,))])
SECURITY_LISTENER = np.dtype([("sockets", np.uint32), ("inherited", np.uint32)])
STRUCTS: dict[str, np.dtype] = {
    "security_config": SECURITY_CONFIG,
    "security_prefix_key": SECURITY_PREFIX_KEY,
    "security_addr_key": SECURITY_ADDR_KEY,
    "security_listener": SECURITY_LISTENER,
}
AF_INET, AF_INET6 = 2, 10
_U64 = np.dtype(np.uint64)


def check_enums(obj: BpfObject) -> None:
    """The constants above against the object's BTF; a drift is a build error, not a
    silently wrong flag."""
    for enum, values in ENUMS.items():
        found = obj.enum_values(enum)
        if found != values:
            diff = sorted(set(found.items()) ^ set(values.items()))
            raise BpfError(f"{obj.path.name}: enum {enum} differs from "
                           f"probewire/security/kernel.py: {diff}; rebuild or update both")


def name_key(name: str) -> bytes:
    """A name as the kernel compares it: its first 15 bytes (TASK_COMM_LEN - 1), NUL padded."""
    return name.encode()[: SEC_NAME_LEN - 1].ljust(SEC_NAME_LEN, b"\0")


def dir_prefix(directory: str) -> str:
    """/tmp -> /tmp/: a prefix that matches what is under the directory, not /tmpfoo."""
    return directory.rstrip("/") + "/"


@dataclass
class KernelTables:
    """What the compiled rules put in the exec hook's maps."""

    config: np.ndarray = field(default_factory=lambda: np.zeros(1, SECURITY_CONFIG))
    names: dict[bytes, int] = field(default_factory=dict)
    prefixes: dict[str, int] = field(default_factory=dict)
    uids: dict[int, int] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)

    def add_bit(self, need: str, bit: int) -> None:
        self.config[0][need] |= np.uint64(1 << bit)

    def prefix_bits(self) -> dict[str, int]:
        """Each prefix's bits with those of every shorter prefix of it: the LPM trie returns
        only the longest match, which must stand for all of them."""
        return {p: self._covering(p) for p in self.prefixes}

    def _covering(self, path: str) -> int:
        bits = 0
        for prefix, b in self.prefixes.items():
            if path.startswith(prefix):
                bits |= b
        return bits

    def write(self, obj: BpfObject) -> None:
        maps = obj.maps
        for name, bits in self.names.items():
            maps["security_names"].update(name, np.uint64(bits).tobytes())
        for path, bits in self.prefix_bits().items():
            key = np.zeros(1, SECURITY_PREFIX_KEY)
            key["prefixlen"] = len(path.encode()) * 8
            key["path"] = path.encode()
            maps["security_prefixes"].update(key.tobytes(), np.uint64(bits).tobytes())
        for uid, bits in self.uids.items():
            maps["security_uids"].update(uid.to_bytes(4, "little"), np.uint64(bits).tobytes())
        for port in self.ports:
            maps["security_watched_ports"].update(port.to_bytes(2, "little"), b"\x01")
        for net in self.networks:
            key = np.zeros(1, SECURITY_ADDR_KEY)
            key["family"] = AF_INET if net.version == 4 else AF_INET6
            key["prefixlen"] = 8 + net.prefixlen
            raw = net.network_address.packed
            key["addr"][0][: len(raw)] = np.frombuffer(raw, np.uint8)
            maps["security_watched_addrs"].update(key.tobytes(), b"\x01")
        # The config last: the hook sees no clause before its tables are complete.
        maps["security_config"].update((0).to_bytes(4, "little"), self.config.tobytes())


def kills_per_clause(obj: BpfObject) -> np.ndarray:
    """SIGKILLs sent per clause, summed over CPUs."""
    _, values = obj.maps["security_kills"].read_all(np.dtype(np.uint32), _U64)
    return np.asarray(values.reshape(len(values), -1).sum(axis=1), dtype=np.uint64)


def is_listener(obj: BpfObject, pid: int) -> bool:
    raw = obj.maps["security_listeners"].lookup(pid.to_bytes(4, "little"))
    if raw is None:
        return False
    entry = np.frombuffer(raw, SECURITY_LISTENER)[0]
    return bool(entry["sockets"] or entry["inherited"])


# --- the /proc seed of listening sockets ------------------------------------------------------

def _listening_inodes(tables: Iterable[Path]) -> set[int]:
    inodes = set()
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":  # TCP_LISTEN
                inodes.add(int(parts[9]))
    return inodes


def listening_holders(proc: Path = Path("/proc")) -> dict[int, list[int]]:
    """Listening TCP socket inode -> the pids holding it, across every network namespace (a
    container's listeners are in its own /proc/PID/net/tcp)."""
    pids = [int(d.name) for d in proc.iterdir() if d.name.isdigit()]
    per_netns: dict[str, int] = {}
    socks: dict[int, list[int]] = {}
    for pid in pids:
        base = proc / str(pid)
        try:
            netns = os.readlink(base / "ns" / "net")
        except OSError:
            continue
        per_netns.setdefault(netns, pid)
        try:
            fds = os.listdir(base / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(base / "fd" / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                socks.setdefault(int(target[8:-1]), []).append(pid)
    listening = set()
    for pid in per_netns.values():
        listening |= _listening_inodes([proc / str(pid) / "net" / "tcp",
                                        proc / str(pid) / "net" / "tcp6"])
    return {ino: sorted(holders) for ino, holders in socks.items() if ino in listening}


def seed_listeners(obj: BpfObject, holders: Mapping[int, list[int]]) -> int:
    """Put listeners that predate the agent in the maps; returns how many processes. Every
    holder counts as a listener (a forked worker holds its master's socket as much as the
    master does); the lowest pid (usually the one that called listen()) owns the socket for
    its close. pid 1 never counts (see listener_depth in process.bpf.c)."""
    counts: dict[int, int] = {}
    for ino, pids in holders.items():
        pids = [p for p in pids if p > 1]
        if not pids:
            continue
        obj.maps["security_listen_socks"].update(ino.to_bytes(8, "little"),
                                                 pids[0].to_bytes(4, "little"))
        for pid in pids:
            counts[pid] = counts.get(pid, 0) + 1
    for pid, n in counts.items():
        value = np.zeros(1, SECURITY_LISTENER)
        value["sockets"] = n
        obj.maps["security_listeners"].update(pid.to_bytes(4, "little"), value.tobytes())
    return len(counts)
