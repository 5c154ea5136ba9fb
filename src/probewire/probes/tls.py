"""OpenSSL uprobes for the http family: which libssl files exist, attaching once per file.

A uprobe on a library file fires in every process that maps it, so the agent attaches once per
libssl inode (found in /proc/*/maps and the loader cache) and rescans periodically for
libraries that new processes (e.g. containers) bring. Processes whose TLS does not go through a
shared libssl (statically linked OpenSSL, Go's crypto/tls, BoringSSL in Chrome) are reported as
not covered, with the reason.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from probewire.errors import ProbewireError
from probewire.runtime.bpf import BpfObject, Link, destroy_links

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
RESCAN_S = 10.0


@dataclass(frozen=True)
class Coverage:
    pid: int
    comm: str
    library: str  # the libssl path mapped, or "" if none
    covered: bool
    reason: str


def _maps(pid_dir: Path) -> set[str]:
    try:
        text = (pid_dir / "maps").read_text()
    except OSError:
        return set()
    # address perms offset dev inode [path]: anonymous mappings have no sixth field.
    return {parts[5] for line in text.splitlines() if len(parts := line.split(None, 5)) == 6}


def libssl_in_maps(proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> path of the libssl it maps (as the process sees it)."""
    found = {}
    for pid_dir in proc.iterdir():
        if pid_dir.name.isdigit():
            for path in _maps(pid_dir):
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


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class TlsAttacher:
    """Attaches the TLS programs of a loaded http object to every libssl it finds."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.links: list[Link] = []
        self.attached: dict[tuple[int, int], str] = {}  # inode -> path attached through
        self.failed: dict[str, str] = {}  # path -> why
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan(self) -> None:
        candidates = [(0, p) for p in system_libssl()]
        candidates += [(pid, path) for pid, path in libssl_in_maps().items()]
        for pid, path in candidates:
            host = path if pid == 0 else _host_path(pid, path)
            inode = _inode(host)
            if inode is None or inode in self.attached or host in self.failed:
                continue
            self._attach(inode, host)

    def _attach(self, inode: tuple[int, int], path: str) -> None:
        links = []
        try:
            for prog, func, ret in TLS_PROBES:
                links.append(self.obj.programs[prog].attach_uprobe(path, func, retprobe=ret))
        except ProbewireError as exc:
            for link in links:
                link.destroy()
            with self._lock:
                self.failed[path] = str(exc)
            log.warning("TLS capture unavailable for %s: %s", path, exc)
            return
        with self._lock:
            self.links.extend(links)
            self.attached[inode] = path
        log.info("TLS capture attached to %s", path)

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._run, name="probewire-tls", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RESCAN_S):
            try:
                self.scan()
            except Exception:  # a vanished /proc entry must not end the rescans
                log.exception("libssl rescan failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            destroy_links(self.links)
            self.links.clear()

    def coverage(self, pids: Iterable[int] | None = None) -> list[Coverage]:
        """Per process using TLS through a libssl: covered, or why not."""
        out = []
        maps = libssl_in_maps()
        for pid, path in sorted(maps.items()):
            if pids is not None and pid not in pids:
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            inode = _inode(_host_path(pid, path))
            covered = inode in self.attached
            reason = "" if covered else self.failed.get(_host_path(pid, path),
                                                        "not attached yet (next rescan)")
            out.append(Coverage(pid, comm, path, covered, reason))
        return out
