"""OpenSSL uprobes for the http family: which libssl files exist, attaching once per file.

A uprobe on a library file fires in every process that maps it, so TLS capture attaches once
per libssl inode, through the uprobe layer (runtime/uprobes.py): the loader's libssl at
start-up, the libssl of every running process, and that of each new process as it execs (the
process family's events; a rescan every 10 s finds libraries loaded later with dlopen).
Processes whose TLS does not go through a shared libssl (statically linked OpenSSL, Go's
crypto/tls, BoringSSL in Chrome) are reported as not covered, with the reason.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probewire.runtime.bpf import BpfObject, Link
from probewire.runtime.elf import file_id, read_maps
from probewire.runtime.uprobes import RESCAN_S, Client, Site, Target, UprobeLayer

__all__ = ["RESCAN_S", "TLS_PROBES", "TLS_PROGRAMS", "Coverage", "TlsAttacher"]

log = logging.getLogger(__name__)

# (program, function, is return probe). The return program serves every function: the
# parked arguments tell it which call it returns from.
TLS_PROBES = (
    ("tls_write_enter", "SSL_write", False),
    ("tls_read_enter", "SSL_read", False),
    ("tls_write_ex_enter", "SSL_write_ex", False),
    ("tls_read_ex_enter", "SSL_read_ex", False),
    ("tls_handshake_enter", "SSL_do_handshake", False),
    ("tls_exit", "SSL_write", True),
    ("tls_exit", "SSL_read", True),
    ("tls_exit", "SSL_write_ex", True),
    ("tls_exit", "SSL_read_ex", True),
    ("tls_exit", "SSL_do_handshake", True),
)
TLS_PROGRAMS = tuple(sorted({p for p, _, _ in TLS_PROBES}))
LIBSSL = re.compile(r"/libssl\.so(\.\d+)*$")


@dataclass(frozen=True)
class Coverage:
    pid: int
    comm: str
    library: str  # the libssl path mapped, or "" if none
    covered: bool
    reason: str


def libssl_in_maps(proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> path of the libssl it maps (as the process sees it)."""
    found = {}
    for pid_dir in proc.iterdir():
        if pid_dir.name.isdigit():
            for path in read_maps(int(pid_dir.name), proc):
                if LIBSSL.search(path):
                    found[int(pid_dir.name)] = path.strip()
                    break
    return found


def system_libssl() -> list[str]:
    """libssl files the dynamic loader would give a new process."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.rsplit("=> ", 1)[1].strip() for line in out.splitlines()
                   if "libssl.so" in line and "=> " in line})


def _host_path(pid: int, path: str) -> str:
    # A process in another mount namespace (a container) maps a path of its own root.
    return f"/proc/{pid}/root{path}"


class TlsAttacher:
    """Attaches the TLS programs of a loaded http object to every libssl it finds."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.layer = UprobeLayer("tls")
        self.layer.add(Client(
            "tls", Target(every_process=True),
            tuple(Site(obj.programs[prog], function=func, returns=ret)
                  for prog, func, ret in TLS_PROBES),
            files=LIBSSL, static_paths=system_libssl,
        ))

    @property
    def links(self) -> list[Link]:
        return self.layer.links()

    @property
    def attached(self) -> dict[tuple[int, int], str]:
        """inode -> path attached through."""
        return self.layer.attached_files()

    @property
    def failed(self) -> dict[str, str]:
        """path -> why the attach failed."""
        return self.layer.failed_files()

    def scan(self) -> None:
        self.layer.scan()

    def start(self) -> None:
        self.layer.start()

    def stop(self) -> None:
        self.layer.stop()

    def on_process_events(self, events: Sequence[Any]) -> None:
        """Exec/exit events: a new process's libssl is attached as soon as the loader maps it."""
        self.layer.on_process_events(events)

    def coverage(self, pids: Iterable[int] | None = None) -> list[Coverage]:
        """Per process using TLS through a libssl: covered, or why not."""
        out = []
        maps = libssl_in_maps()
        attached = self.attached
        failed = self.failed
        wanted = set(pids) if pids is not None else None
        for pid, path in sorted(maps.items()):
            if wanted is not None and pid not in wanted:
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            host = _host_path(pid, path)
            inode = file_id(host)
            covered = inode in attached
            reason = "" if covered else failed.get(host, failed.get(path, "not attached yet "
                                                                   "(next rescan)"))
            out.append(Coverage(pid, comm, path, covered, reason))
        return out
