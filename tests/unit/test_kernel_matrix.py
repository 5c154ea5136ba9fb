"""scripts/kernels/matrix.py's summary: outcomes from junit (or pytest -v's log when a guest was
stopped), hook choices and switched-off families from report.py's JSON, one table."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kernels" / "matrix.py"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.bpf.test_tcp" name="test_a" time="1.0"/>
<testcase classname="tests.bpf.test_tcp" name="test_b[x]" time="1.0">
  <failure message="AssertionError: assert 1.0 == 2">long text</failure></testcase>
<testcase classname="tests.e2e.test_cli" name="test_c" time="1.0">
  <skipped message="needs fentry" /></testcase>
<testcase classname="tests.bpf.test_http" name="test_d" time="1.0">
  <error message="fixture failed">trace</error></testcase>
</testsuite></testsuites>
"""

REPORT = {
    "kernel": "5.10.0-46-amd64",
    "hook_types": {"tp_btf": {"hook_type": "tp_btf", "available": True, "reason": ""},
                   "fentry": {"hook_type": "fentry", "available": False, "reason": "EPERM"}},
    "kernel_features": {"bpf_loop": {"hook_type": "bpf_loop", "available": False,
                                     "reason": "the kernel refuses it"}},
    "families": {
        "tcp": {"loaded": True, "error": "", "hooks": [
            {"probe": "tcp", "hook": "tcp_receive_reset", "section": "fentry/tcp_reset",
             "attached": True}]},
        "http": {"loaded": False, "error": "load http.bpf.o: Invalid argument",
                 "log": ["libbpf: map 'tls_calls': failed to create: Invalid argument(-22)",
                         "libbpf: failed to load object 'http.bpf.o'"]},
    },
    "hook_costs": {"tcp_receive_reset": {"tp_btf": {"avg_ns": 900, "runs": 300},
                                         "kprobe": None}},
}


@pytest.fixture(scope="module")
def matrix() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernel_matrix", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_matrix"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_summary_has_each_outcome_hook_choice_feature_and_the_reason_a_family_is_off(
        matrix: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    run = matrix.SuiteRun("bullseye", release="5.10.0-46-amd64", seconds=120.0)
    matrix.collect(run, tmp_path)
    assert run.tests == {"test_tcp::test_a": "passed", "test_tcp::test_b[x]": "failed",
                         "test_cli::test_c": "skipped", "test_http::test_d": "error"}
    text = matrix.summary([run])
    assert "| test_tcp::test_b[x] | FAIL |" in text
    assert "| test_cli::test_c | skip |" in text
    assert "| **passed** | 1 |" in text and "| **failed** | 1 |" in text
    assert "| **error** | 1 |" in text and "| **minutes in the guest** | 2.0 |" in text
    assert "| tcp / tcp_receive_reset | fentry |" in text
    assert "| http / (family) | off |" in text
    assert "| hook fentry | no |" in text and "| bpf_loop | no |" in text
    assert "| tcp_receive_reset / tp_btf | 900 (300 runs) |" in text
    assert "| tcp_receive_reset / kprobe | n/a |" in text
    # The map the kernel refused is quoted; libbpf's closing line adds nothing.
    assert "tls_calls': failed to create" in text
    assert "failed to load object" not in text
    assert "test_tcp::test_b[x]: AssertionError: assert 1.0 == 2" in text


def test_outcomes_come_from_the_pytest_log_when_the_guest_wrote_no_junit(
        matrix: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "pytest.log").write_text(
        "collecting ... collected 3 items\n\n"
        "tests/bpf/test_tcp.py::test_a PASSED                        [ 33%]\n"
        "tests/bpf/test_tcp.py::test_b[x y] FAILED                   [ 66%]\n"
        "tests/bpf/test_http.py::test_c \n"  # still running when the guest was stopped
        "FAILED tests/bpf/test_tcp.py::test_b[x y] - AssertionError\n")
    run = matrix.SuiteRun("trixie")
    matrix.collect(run, tmp_path)
    assert run.tests == {"test_tcp::test_a": "passed", "test_tcp::test_b[x y]": "failed"}


STALL_REPORT = (b"[  116.3] rcu: INFO: rcu_sched self-detected stall on CPU\n"
                b"[  116.3] rcu: \t1-...!: (3590 ticks this GP)\n")


@pytest.mark.parametrize(("console", "watch_age_s", "frozen"), [
    (STALL_REPORT, 400.0, True),   # a stall report and a watcher silent for 400 s
    (STALL_REPORT, 30.0, False),   # a stall report, but the guest still writes: starved, alive
    # No report: the watcher writes every 60 s whatever the tests do, so 5 silent minutes
    # are a slow host, 10 a guest that stopped (a CI guest once froze with no report).
    (b"[ 5.0] loop: module loaded\n", 300.0, False),
    (b"[ 5.0] loop: module loaded\n", 601.0, True),
    (b"[ 9.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [python:159]\n", 301.0, True),
])
def test_a_guest_counts_as_frozen_on_a_stall_report_and_a_silent_watcher(
        matrix: ModuleType, tmp_path: Path, console: bytes, watch_age_s: float,
        frozen: bool) -> None:
    (tmp_path / "console.log").write_bytes(console)
    watch = tmp_path / "watch.log"
    watch.write_text("12:00:00\n")
    then = time.time() - watch_age_s
    os.utime(watch, (then, then))
    why = matrix.guest_frozen(tmp_path)
    assert bool(why) == frozen, why
    if frozen:
        assert "console.log" in why and "froze" in why
