"""Custom probes (probes.custom) against real programs built here: a C service with
process_payment(struct payment *, uint32_t) and a USDT probe, the same service in Go (register
ABI), and a Python module through CPython's USDT probes. Counts are exact per (currency,
result), per amount bucket, and duration count == calls, in processes started before the agent
and after it; a symbol missing in a later process is counted and the agent stays up.

Needs: uprobes and uretprobes with BPF cookies (Linux 5.15+), gcc with <sys/sdt.h>
(systemtap-sdt-dev), Debian's golang-go, Debian's python3.11 (built with USDT probes).
Every probe targets binaries built in this test's own directory (or this test's pids), so
other processes on the host cannot change a count.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentlib import Samples, running_agent, scrape, total, wait_for

from probewire.agent import Agent

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

PROGS = Path(__file__).parent / "custom_progs"
CURRENCIES = {0: "usd", 1: "eur", 2: "gbp"}
AMOUNT_BUCKETS = (1000, 10000, 50000)
PYTHON = "/usr/bin/python3.11"


@dataclass
class Service:
    """A line-driven test program: `call ...` lines, then `sync` waits for them."""

    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def calls(self, lines: list[str]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("".join(f"{line}\n" for line in lines) + "sync\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.stop()


def start(started: list[Service], argv: list[str], cwd: Path | None = None) -> Service:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=cwd)
    service = Service(proc)
    started.append(service)
    return service


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("custom")


@pytest.fixture(scope="module")
def payd_c(build_dir: Path) -> Path:
    if not any(Path(d, "sys/sdt.h").exists() for d in ("/usr/include",
                                                        "/usr/include/x86_64-linux-gnu")):
        pytest.fail("<sys/sdt.h> missing: apt-get install systemtap-sdt-dev (scripts/setup.sh)")
    out = build_dir / "payd"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(PROGS / "payd.c")], check=True)
    return out


@pytest.fixture(scope="module")
def payd_go(build_dir: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.fail("go missing: apt-get install golang-go (scripts/setup.sh)")
    out = build_dir / "payd-go"
    env = {**os.environ, "HOME": str(build_dir), "GOCACHE": str(build_dir / "gocache"),
           "GO111MODULE": "off", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(out), str(PROGS / "payd.go")], check=True, env=env,
                   timeout=180)
    return out


def payments_probe(exe: str, **extra: Any) -> dict[str, Any]:
    """The issue's example probe, aimed at `exe`."""
    return {
        "name": "payments",
        "target": {"exe": exe},
        "symbol": "process_payment",
        "duration": True,
        # A C int: -1 must read as negative, which the default result type (s32) gives.
        "result": {"ok": ">= 0"},
        "labels": [{"name": "currency", "arg": 1, "type": "u32", "values": CURRENCIES},
                   {"name": "merchant", "arg": 0, "offsets": [16, 0], "type": "str",
                    "max_len": 16}],
        "values": [{"name": "amount", "arg": 0, "offsets": [8], "type": "u64",
                    "buckets": list(AMOUNT_BUCKETS)}],
        **extra,
    }


def agent_config(probes: list[dict[str, Any]]) -> dict[str, Any]:
    # The process family brings exec events; tcp and http are not needed here.
    return {"bpf_stats": "off",
            "probes": {"tcp": {"enabled": False}, "l7": {"enabled": False},
                       "saturation": {"enabled": False}, "custom": probes}}


def random_calls(n: int, rng: random.Random, go: bool = False) -> list[tuple[int, int, str]]:
    out = []
    for _ in range(n):
        amount = rng.choice([rng.randrange(0, 70000), rng.choice(AMOUNT_BUCKETS),
                             rng.choice(AMOUNT_BUCKETS) + 1, 7 * rng.randrange(1, 9000)])
        currency = rng.randrange(0, 4)  # 3 has no name: it shows as the number
        merchant = str(rng.randrange(1, 4)) if go else rng.choice(["acme", "globex", "initech"])
        out.append((amount, currency, merchant))
    return out


def expected(calls: list[tuple[int, int, str]], merchant: bool = True) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for amount, currency, m in calls:
        result = "error" if amount % 7 == 0 else "ok"
        counts[(CURRENCIES.get(currency, str(currency)), result, *([m] if merchant else []))] += 1
    return counts


def amount_buckets(calls: list[tuple[int, int, str]]) -> dict[str, int]:
    amounts = [a for a, _, _ in calls]
    out = {str(float(b)): sum(a <= b for a in amounts) for b in AMOUNT_BUCKETS}
    out["+Inf"] = len(amounts)
    return out


class Delta:
    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.before: Samples = scrape(listen)
        self.after: Samples = self.before

    def refresh(self) -> Delta:
        self.after = scrape(self.listen)
        return self

    def __call__(self, name: str, **labels: str) -> float:
        return total(self.after, name, **labels) - total(self.before, name, **labels)


def assert_exact(d: Delta, service: str, calls: list[tuple[int, int, str]],
                 merchant: bool = True) -> None:
    assert wait_for(lambda: d.refresh()("payments_calls_total", service_name=service)
                    >= len(calls)), d("payments_calls_total", service_name=service)
    d.refresh()
    assert d("payments_calls_total", service_name=service) == len(calls)
    for key, n in expected(calls, merchant).items():
        labels = {"currency": key[0], "result": key[1]}
        if merchant:
            labels["merchant"] = key[2]
        assert d("payments_calls_total", service_name=service, **labels) == n, (key, n)
    assert d("payments_duration_seconds_count", service_name=service) == len(calls)
    for le, n in amount_buckets(calls).items():
        assert d("payments_amount_bucket", service_name=service, le=le) == n, (le, n)
    assert d("payments_amount_sum", service_name=service) == sum(a for a, _, _ in calls)


def state_of(agent: Agent, probe: str, pid: int) -> dict[str, Any] | None:
    custom = agent.probes["custom"]
    rows = [r for r in custom.status() if r["probe"] == probe and r["pid"] == pid]  # type: ignore[attr-defined]
    return rows[0] if rows else None


def c_lines(calls: list[tuple[int, int, str]]) -> list[str]:
    return [f"call {a} {c} {m}" for a, c, m in calls]


def test_c_function_counted_exactly_before_and_after_the_agent_started(
    payd_c: Path, build_dir: Path, services: list[Service]
) -> None:
    rng = random.Random(16)
    before = start(services, [str(payd_c)])
    # A second binary (another inode) matching the same glob, first run after the agent.
    later_binary = build_dir / "payd2"
    shutil.copy(payd_c, later_binary)
    glob = f"{build_dir}/payd*"
    with running_agent(agent_config([payments_probe(glob)])) as (agent, listen):
        assert (state_of(agent, "payments", before.pid) or {}).get("state") == "attached"
        d = Delta(listen)
        calls = random_calls(700, rng)
        before.calls(c_lines(calls))
        assert_exact(d, "payd", calls)

        # The same binary started after the agent: its inode is attached already.
        d = Delta(listen)
        after = start(services, [str(payd_c)])
        calls = random_calls(500, rng)
        after.calls(c_lines(calls))
        assert_exact(d, "payd", calls)

        # A binary first seen after the agent started: attached when its exec is seen.
        d = Delta(listen)
        newer = start(services, [str(later_binary)])
        assert wait_for(lambda: (state_of(agent, "payments", newer.pid) or {}).get("state")
                        == "attached"), state_of(agent, "payments", newer.pid)
        calls = random_calls(600, rng)
        newer.calls(c_lines(calls))
        assert_exact(d, "payd2", calls)

        # The processes exit: their kernel entries are read a last time and deleted, the
        # counters stay.
        totals = d.refresh()("payments_calls_total")
        for s in services:
            s.stop()
        assert wait_for(lambda: all(state_of(agent, "payments", s.pid) is None
                                    for s in services))
        d.refresh()
        assert d("payments_calls_total") == totals
        assert agent.probes["custom"].map("custom_stats").count() == 0  # type: ignore[attr-defined]
        assert total(d.after, "probewire_custom_errors_total", probe="payments") == 0


def test_usdt_probe_in_c_counted_with_its_operands(payd_c: Path, services: list[Service]) -> None:
    rng = random.Random(17)
    probe = {"name": "payment_done", "target": {"exe": str(payd_c)},
             "usdt": "payd:payment_done",
             "labels": [{"name": "currency", "arg": 1, "type": "u32", "values": CURRENCIES},
                        {"name": "merchant", "arg": 2, "type": "str", "max_len": 16}],
             "values": [{"name": "amount", "arg": 0, "type": "u64",
                         "buckets": list(AMOUNT_BUCKETS)}]}
    with running_agent(agent_config([probe])) as (_agent, listen):
        d = Delta(listen)
        svc = start(services, [str(payd_c)])
        calls = random_calls(400, rng)
        wait_for(lambda: (state_of(_agent, "payment_done", svc.pid) or {}).get("state")
                 == "attached")
        svc.calls(c_lines(calls))
        assert wait_for(lambda: d.refresh()("payment_done_calls_total") >= len(calls))
        d.refresh()
        assert d("payment_done_calls_total") == len(calls)
        per: Counter[tuple[str, str]] = Counter(
            (CURRENCIES.get(c, str(c)), m) for _, c, m in calls)
        for (currency, merchant), n in per.items():
            assert d("payment_done_calls_total", currency=currency, merchant=merchant) == n
        for le, n in amount_buckets(calls).items():
            assert d("payment_done_amount_bucket", le=le) == n


def test_go_function_arguments_read_under_the_register_abi(
    payd_go: Path, services: list[Service]
) -> None:
    rng = random.Random(18)
    probe = {"name": "payments", "target": {"exe": str(payd_go)}, "symbol": "main.processPayment",
             "abi": "go", "duration": True, "result": {"ok": ">= 0"},
             "labels": [{"name": "currency", "arg": 1, "type": "s32", "values": CURRENCIES},
                        {"name": "merchant", "arg": 2, "type": "s64"}],
             "values": [{"name": "amount", "arg": 0, "type": "s64",
                         "buckets": list(AMOUNT_BUCKETS)}]}
    before = start(services, [str(payd_go)])
    with running_agent(agent_config([probe])) as (agent, listen):
        assert (state_of(agent, "payments", before.pid) or {}).get("state") == "attached"
        d = Delta(listen)
        # Every call runs in a new goroutine whose stack must grow first (payd.go): counted
        # once each, and each return found although the stack moved.
        calls = random_calls(600, rng, go=True)
        before.calls(c_lines(calls))
        assert_exact(d, "payd-go", calls)
        assert total(d.after, "probewire_custom_errors_total", probe="payments") == 0


def test_python_function_counted_through_cpythons_usdt_probes(services: list[Service]) -> None:
    rng = random.Random(19)
    app = PROGS / "pyapp"
    svc = start(services, [PYTHON, "-u", str(app / "payd.py")], cwd=app)
    probes = [
        {"name": "py_payments", "target": {"pids": [svc.pid]},
         "python_function": "payments.core:process_payment", "duration": True},
        # Module-level refund only: Ledger.refund has the same name in the same module, and
        # CPython's probes carry no qualname, so this counts both (see README).
        {"name": "py_refunds", "target": {"pids": [svc.pid]},
         "python_function": "payments.core:refund"},
    ]
    with running_agent(agent_config(probes)) as (agent, listen):
        assert (state_of(agent, "py_payments", svc.pid) or {}).get("state") == "attached", \
            state_of(agent, "py_payments", svc.pid)
        d = Delta(listen)
        n = 300
        svc.calls([f"call {rng.randrange(1, 10**6)} {rng.randrange(3)}" for _ in range(n)]
                  + ["refund"] * 5)
        assert wait_for(lambda: d.refresh()("py_payments_calls_total") >= n)
        d.refresh()
        assert d("py_payments_calls_total", service_name="payd") == n
        assert d("py_refunds_calls_total") == n + 5
        # Debian 12's python3.11 never fires function__entry (CPython gh-98894): calls are
        # counted at function__return, and the agent says why the duration stays empty.
        assert d("py_payments_duration_seconds_count", service_name="payd") == 0
        row = state_of(agent, "py_payments", svc.pid)
        assert row is not None and "gh-98894" in row["reason"]
    # The agent (python3.11 too) never took the probes: it would have counted its own calls.


def test_symbol_missing_in_a_later_process_is_counted_and_the_agent_stays_up(
    payd_c: Path, build_dir: Path, services: list[Service]
) -> None:
    stripped = build_dir / "payd-stripped"
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(payd_c)], check=True)
    probe = payments_probe(f"{build_dir}/payd-stripped")
    with running_agent(agent_config([probe])) as (agent, listen):
        svc = start(services, [str(stripped)])
        assert wait_for(lambda: (state_of(agent, "payments", svc.pid) or {}).get("state")
                        == "missing", timeout_s=15), state_of(agent, "payments", svc.pid)
        row = state_of(agent, "payments", svc.pid)
        assert row is not None and "stripped binary" in row["reason"]
        s = scrape(listen)
        assert total(s, "probewire_custom_errors_total", probe="payments",
                     reason="symbol_missing") == 1
        svc.calls(["call 5 1 acme"])  # the process runs on, unobserved; the agent serves on
        assert total(scrape(listen), "payments_calls_total") == 0
        # `probewire probes` lists it with the reason.
        out = subprocess.run([sys.executable, "-m", "probewire.cli", "probes", "--listen", listen],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "400"})
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if f" {svc.pid} " in ln)
        assert "missing" in line and "stripped binary" in line, out.stdout


@pytest.mark.parametrize(("probe", "words"), [
    ({"labels": [{"name": "currency", "arg": 1, "type": "u128"}]},
     ["probes.custom.0.labels.0.type", "unknown type 'u128'"]),
    ({"labels": [{"name": "currency", "arg": 6, "type": "u32"}]},
     ["probes.custom.0.labels.0.arg", "0..5"]),
    ({"target": {"exe": ""}}, ["probes.custom.0.target", "empty target"]),
    ({"target": {}}, ["probes.custom.0.target", "empty target"]),
])
def test_bad_spec_exits_2_naming_the_probe_and_field(
    tmp_path: Path, probe: dict[str, Any], words: list[str]
) -> None:
    import yaml

    spec = {**payments_probe("*/payd"), **probe}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"probes": {"custom": [spec]}}))
    out = subprocess.run([sys.executable, "-m", "probewire.cli", "run", "--config", str(config),
                          "--listen", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    message = " ".join(out.stderr.split())
    for word in [*words, "custom probe 'payments'"]:
        assert word in message, message
