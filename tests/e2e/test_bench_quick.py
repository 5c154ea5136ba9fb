"""`python -m bench --quick` runs end to end and writes its table (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

EXPECTED_ROWS = (
    "start-up: load + attach default probes",
    "start-up: process start → /healthz answers",
    "agent RSS idle (default probes)",
    "event → /metrics, idle",
    "event → /metrics, under wrk load",
    "/metrics scrape time",
)


@pytest.mark.timeout(180)
def test_quick_bench_subset_writes_a_table_with_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "startup,latency", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout  # the same table is printed and written
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in table, f"row {name!r} missing from:\n{table}"
    assert "| error |" not in table
