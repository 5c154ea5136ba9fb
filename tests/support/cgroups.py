"""A scratch cgroup v2 directory for tests that filter the agent to their own processes: the
machine is shared, and a cgroup filter is what keeps foreign traffic out of an exact count."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from probewire.runtime.filter import cgroup2_root


@contextmanager
def scratch_cgroup() -> Iterator[Path]:
    """A fresh cgroup; removed on exit once the processes started in it are gone."""
    path = cgroup2_root() / f"probewire-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def enter(cgroup: Path) -> Callable[[], None]:
    """A Popen preexec_fn that moves the child into cgroup before it execs."""

    def move() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return move
