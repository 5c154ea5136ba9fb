"""`python -m bench --quick` runs every benchmark end to end and writes its table (no timing
assertions: the figures are the benchmark's business, not the test's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

# One row (by its start) of each benchmark in bench/__main__.py BENCHMARKS.
EXPECTED_ROWS = (
    "overhead (default probes): throughput ratio",
    "user space: records per agent CPU-second",
    "fidelity: (recorded + dropped) / nginx access-log lines",
    "start-up: load + attach default probes",
    "agent RSS idle (default probes)",
    "event → /metrics, idle",
    "bpftrace: throughput ratio",
    "vs bcc: start-up",
    "event → OTLP span export p99, idle",
    "agent RSS holding HTTP series",
    "user space: L7Probe.on_batch",
    "user space: ring drain + decode + aggregate, one core",
    "exec throughput ratio (default rules / no agent)",
    "soak: answered requests neither recorded nor counted as dropped",
    "fault: ring storm",
    "agent RSS, idle (no Kubernetes)",
    "realistic, keep-alive (default probes): throughput ratio",
    "realistic, new connections (default probes): throughput ratio",
    "realistic, keep-alive (OTLP traces): spans dropped per run",
)
# The soak and the fault matrix have their own short tests (tests/bpf/test_fault_matrix.py):
# here a shorter soak and one fault row prove the bench plumbing.
SHORT = {"BENCH_SOAK_MINUTES": "0.1", "BENCH_SOAK_CONNECTIONS": "1000",
         "BENCH_FAULTS": "ring_storm"}


@pytest.mark.timeout(510)  # 390 s, and up to 120 s for bench/realistic.py
def test_quick_bench_runs_every_benchmark_and_writes_one_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=500, stdin=subprocess.DEVNULL,
        env={**os.environ, **SHORT},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout  # the same table is printed and written
    for name in EXPECTED_ROWS:
        assert f"| {name}" in table, f"row {name!r} missing from:\n{table}"
    assert "| error |" not in table
    # Not a timing: every record the kernel wrote reached on_batch, every drop was counted.
    flood_exact = [line for line in table.splitlines() if line.startswith("| ring flood (")]
    assert len(flood_exact) == 4 and all("| met |" in line for line in flood_exact), table
