"""Suite-wide fixtures: root gate for `bpf`/`e2e` tests, tracefs, per-test output directories."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

from support.netns import remove_stale_namespaces

# Property tests draw the same examples on every run of `make test` (a CI run that fails
# fails again on rerun, and a pass is not luck); HYPOTHESIS_PROFILE=explore draws fresh ones
# each run, for hunting (e.g. `HYPOTHESIS_PROFILE=explore .venv/bin/pytest tests/unit`).
settings.register_profile("repeatable", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACEFS = Path("/sys/kernel/tracing")


def _ensure_tracefs() -> None:
    # A fresh machine has tracefs unmounted; tp/ programs attach through it.
    if TRACEFS.is_dir() and not (TRACEFS / "events").exists() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        _ensure_tracefs()
        remove_stale_namespaces()  # left by a run that was killed (SIGKILL skips clean-up)
        return
    skip = pytest.mark.skip(
        reason="needs root: loads BPF programs / creates network namespaces "
        "(run `sudo make test`, or as root)"
    )
    for item in items:
        if "bpf" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def test_output_dir(request: pytest.FixtureRequest) -> Path:
    """A fresh test-output/<test name>/ directory for logs and artefacts of this test."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path = REPO_ROOT / "test-output" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
