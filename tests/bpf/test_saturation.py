"""saturation family against the kernel's own counters, with every hook type it can use (tp_btf,
and the tp/ fallback with per-thread state by thread id): run-queue waits vs schedstat's
run_delay, CPU seconds vs utime+stime, block requests vs /proc/diskstats, listen overflows vs
the namespace's TcpExtListenOverflows, an OOM kill in a memory-limited cgroup.

Exact despite other load on the host: every check is scoped to processes, a loop device, a
network namespace and a cgroup this module creates. Needs: tp_btf or tp tracepoints
sched/sched_{switch,wakeup,wakeup_new}, block/block_rq_{issue,complete}, skb/{consume,kfree}_skb,
sock/inet_sock_set_state, oom/mark_victim; root; losetup; a memory cgroup controller.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import random
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from agentlib import running_agent, scrape, total, wait_for

from probewire.agent import Agent
from probewire.probes import saturation
from probewire.probes.saturation import SIGNAL_HOOKS
from probewire.runtime.features import SATURATION_OPTIONAL, HookSupport
from support.netns import two_hosts

pytestmark = pytest.mark.bpf

TOKEN = secrets.token_hex(3)
RULES = [
    {"name": "pwsat-victim", "cmdline": f"pwsat-victim-{TOKEN}"},
    {"name": "pwsat-hog", "cmdline": f"pwsat-hog-{TOKEN}"},
    {"name": "pwsat-listener", "cmdline": f"pwsat-listener-{TOKEN}"},
    {"name": "pwsat-oom", "cmdline": f"pwsat-oom-{TOKEN}"},
    {"name": "pwsat-oom", "comm": "pwsat-oom"},  # a zombie's cmdline is empty, its comm is not
]
SAT_HOOKS = sorted({h for hooks in SIGNAL_HOOKS.values() for h in hooks})
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE = "pytest"  # this process


@pytest.fixture(scope="module", params=["tp_btf", "tp", "stand_ins"])
def sat_agent(request: pytest.FixtureRequest) -> Iterator[tuple[Agent, str]]:
    """`stand_ins`: tp_btf with what a kernel before 5.11/5.17/5.19 gets (Debian 5.10 in the
    kernel matrix): the *_bounded listen programs, the current task by probe reads, thread
    state by thread id. The kernel's answer for those features is replaced; the rest is real."""
    forced = {h: "tp" for h in SAT_HOOKS} if request.param == "tp" else {}
    hook_type = "tp" if request.param == "tp" else "tp_btf"
    with contextlib.ExitStack() as stack:
        if request.param == "stand_ins":
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                saturation, "probe_kernel_features", without_optional_features)
        pair = stack.enter_context(running_agent({"services": {"rules": RULES}},
                                                 forced_hooks=forced))
        status = [s for s in pair[0].status() if s.probe == "saturation"]
        assert {s.hook for s in status} == set(SAT_HOOKS)
        assert all(s.attached and s.section.startswith(f"{hook_type}/") for s in status)
        if request.param == "stand_ins":
            bounded = {s.hook: s for s in status if s.hook in SIGNAL_HOOKS["listen"]}
            assert all(s.program and s.program.endswith("_bounded") for s in bounded.values())
            assert all("bounded-loop variant (this kernel lacks bpf_loop (5.17+) and "
                       "percpu_lookup (5.19+))" in s.fallback_reason for s in bounded.values())
            # Every CPU recorded its per-CPU offset (the walk over CPUs reads others' counters
            # there), and no two are alike.
            offsets = pair[0].running["saturation"].obj.maps["cpu_offsets"]
            found = [offsets.lookup(struct.pack("<I", cpu)) for cpu in range(os.cpu_count() or 1)]
            values = [struct.unpack("<Q", v)[0] if v else 0 for v in found]
            assert all(values) and len(set(values)) == len(values), values
        yield pair


def without_optional_features(names: Iterable[str] | None = None) -> dict[str, HookSupport]:
    return {name: HookSupport(name, False, "the kernel refuses it (test)")
            for name in (names if names is not None else SATURATION_OPTIONAL)}


# --- run queue and CPU ---------------------------------------------------------------------------

HOG = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
"""
# Spins with a short sleep now and then, so its waits start both at preemption and at wake-up;
# then blocks on stdin (off the CPU, its last wait counted) until the test has read it.
VICTIM = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    spin = time.process_time() + 0.02
    while time.process_time() < spin:
        pass
    time.sleep(0.001)
print("done", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def schedstats_on() -> Iterator[None]:
    """kernel.sched_schedstats on for the block (restored after); kernels whose run_delay
    comes from delay accounting alone (no such sysctl, as here) need nothing."""
    knob = Path("/proc/sys/kernel/sched_schedstats")
    old = knob.read_text().strip() if knob.exists() else None
    if old == "0":
        knob.write_text("1")
    try:
        yield
    finally:
        if old == "0":
            knob.write_text("0")


def _exited_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """utime + stime of an exited child, read while it is a zombie (before it is reaped)."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK
    proc.wait()
    return cpu_s


def _schedstat(pid: int) -> tuple[int, int]:
    """(on-CPU ns, run-queue wait ns) of a thread: /proc/<pid>/schedstat."""
    on_cpu, run_delay, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu), int(run_delay)


def test_runqueue_wait_and_cpu_time_match_the_kernel(sat_agent: tuple[Agent, str]) -> None:
    _, listen = sat_agent
    cpu = str(max(os.sched_getaffinity(0)))
    hogs_s, victim_s = 3.0, 1.5
    with schedstats_on():
        hogs = [subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-c", HOG, str(hogs_s),
                                  f"pwsat-hog-{TOKEN}"]) for _ in range(2)]
        victim = subprocess.Popen(
            ["taskset", "-c", cpu, sys.executable, "-c", VICTIM, str(victim_s),
             f"pwsat-victim-{TOKEN}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert victim.stdout is not None and victim.stdout.readline() == b"done\n"
            time.sleep(0.2)  # into its read(): off the CPU
            victim_cpu_ns, run_delay_ns = _schedstat(victim.pid)
            victim_stat = Path(f"/proc/{victim.pid}/stat").read_text()
            hog_cpu_s = sum(_exited_cpu_s(h) for h in hogs)
            s = scrape(listen)
        finally:
            for p in (*hogs, victim):
                p.kill()
                p.wait()
    fields = victim_stat[victim_stat.rindex(")") + 2:].split()
    victim_utime_stime_s = (int(fields[11]) + int(fields[12])) / CLK_TCK

    waited_s = total(s, "probewire_sched_runqueue_latency_seconds_sum",
                     service_name="pwsat-victim")
    waits = total(s, "probewire_sched_runqueue_latency_seconds_count",
                  service_name="pwsat-victim")
    print(f"victim run_delay {run_delay_ns / 1e9:.4f} s, probewire {waited_s:.4f} s "
          f"over {waits:.0f} waits")
    assert run_delay_ns > 0.2e9, "the victim hardly waited: are the hogs on its CPU?"
    assert waited_s == pytest.approx(run_delay_ns / 1e9, rel=0.01)
    assert total(s, "probewire_sched_wait_seconds_total", service_name="pwsat-victim",
                 reason="runqueue") == pytest.approx(waited_s)
    buckets = total(s, "probewire_sched_runqueue_latency_seconds_bucket",
                    service_name="pwsat-victim", le="+Inf")
    assert buckets == waits > 0

    hog_s = total(s, "probewire_process_cpu_seconds_total", service_name="pwsat-hog")
    victim_cpu_s = total(s, "probewire_process_cpu_seconds_total", service_name="pwsat-victim")
    print(f"hogs utime+stime {hog_cpu_s:.3f} s, probewire {hog_s:.3f} s; victim on-CPU "
          f"{victim_cpu_ns / 1e9:.4f} s, utime+stime {victim_utime_stime_s:.2f} s, "
          f"probewire {victim_cpu_s:.4f} s")
    assert hog_s == pytest.approx(hog_cpu_s, rel=0.01)
    assert victim_cpu_s == pytest.approx(victim_utime_stime_s, rel=0.01, abs=2 / CLK_TCK)
    # The same kernel number schedstat shows, to the nanosecond's rounding.
    assert victim_cpu_s == pytest.approx(victim_cpu_ns / 1e9, rel=1e-6)


# --- block I/O -----------------------------------------------------------------------------------

BLKDISCARD = 0x1277
SECTOR = 512


@contextlib.contextmanager
def loop_device(tmp_path: Path, size_mb: int = 64) -> Iterator[str]:
    backing = tmp_path / "loop.img"
    with backing.open("wb") as f:
        f.truncate(size_mb << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        with contextlib.suppress(FileNotFoundError):  # udev probes a new device; let it finish
            subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def diskstats(name: str) -> dict[str, int]:
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == name:
            # Fields 4, 8, 15, 19 of the kernel's iostats.rst: requests completed.
            return {"read": int(f[3]), "write": int(f[7]), "discard": int(f[14]),
                    "flush": int(f[18])}
    raise LookupError(f"{name} not in /proc/diskstats")


def _block(s: dict, device: str, op: str, what: str, **labels: str) -> float:
    return total(s, f"probewire_block_io_{what}", device=device, operation=op, **labels)


def _schedulers(name: str) -> list[str]:
    """none, and mq-deadline when the kernel has it: with an I/O scheduler every request is
    queued (block_rq_insert) before its issue, and may be issued by another task or kblockd."""
    offered = (Path("/sys/block") / name / "queue" / "scheduler").read_text()
    return ["none"] + (["mq-deadline"] if "mq-deadline" in offered else [])


def test_direct_io_on_a_loop_device_matches_diskstats(sat_agent: tuple[Agent, str],
                                                      tmp_path: Path) -> None:
    """Counts per operation equal /proc/diskstats', and bytes are this process's. Debian 6.1
    issues these direct writes from kblockd (a kworker) after the writer queued them: they
    must still count for the writer."""
    _, listen = sat_agent
    rng = random.Random(TOKEN)
    with loop_device(tmp_path) as dev:
        name = Path(dev).name
        for scheduler in _schedulers(name):
            (Path("/sys/block") / name / "queue" / "scheduler").write_text(scheduler)
            _direct_io_matches_diskstats(listen, dev, name, rng, scheduler)


def _direct_io_matches_diskstats(listen: str, dev: str, name: str, rng: random.Random,
                                 scheduler: str) -> None:
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 256 << 10)  # page-aligned, as O_DIRECT wants
    try:
        time.sleep(0.3)
        before_k, before_p = diskstats(name), scrape(listen)
        sizes = {"read": 0, "write": 0}
        for _ in range(120):
            op = rng.choice(("read", "write"))
            n = rng.randrange(1, 64) * 4096
            off = rng.randrange(0, (60 << 20) // 4096) * 4096
            with memoryview(buf) as whole, whole[:n] as view:
                done = (os.pwritev(fd, [view], off) if op == "write"
                        else os.preadv(fd, [view], off))
            assert done == n
            sizes[op] += n
        os.fsync(fd)  # a cache flush request
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", 1 << 20, 1 << 20))
        time.sleep(0.3)
        after_k = diskstats(name)
        wait_for(lambda: sum(_block(scrape(listen), name, op, "duration_seconds_count")
                             for op in ("read", "write", "flush", "discard"))
                 - sum(_block(before_p, name, op, "duration_seconds_count")
                       for op in ("read", "write", "flush", "discard"))
                 >= sum(after_k[k] - before_k[k] for k in after_k))
        after_p = scrape(listen)
    finally:
        os.close(fd)
        buf.close()
    print(f"{name} {scheduler} (diskstats, probewire):",
          {k: (after_k[k] - before_k[k], _block(after_p, name, k, "duration_seconds_count")
               - _block(before_p, name, k, "duration_seconds_count")) for k in after_k})
    for op in ("read", "write", "flush", "discard"):
        kernel = after_k[op] - before_k[op]
        seen = (_block(after_p, name, op, "duration_seconds_count")
                - _block(before_p, name, op, "duration_seconds_count"))
        assert seen == kernel, (scheduler, op)
        # Every request is in the histogram's buckets.
        assert (_block(after_p, name, op, "duration_seconds_bucket", le="+Inf")
                - _block(before_p, name, op, "duration_seconds_bucket", le="+Inf")) == kernel
    assert after_k["flush"] - before_k["flush"] >= 1
    assert after_k["discard"] - before_k["discard"] >= 1
    for op, nbytes in sizes.items():
        mine = (_block(after_p, name, op, "bytes_total", service_name=SERVICE)
                - _block(before_p, name, op, "bytes_total", service_name=SERVICE))
        assert mine == nbytes, (scheduler, op)
        assert (_block(after_p, name, op, "duration_seconds_sum", service_name=SERVICE)
                - _block(before_p, name, op, "duration_seconds_sum", service_name=SERVICE)) > 0


# --- listen queues -------------------------------------------------------------------------------

LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)  # a tiny backlog, and nobody ever accepts
print("listening", flush=True)
time.sleep(60)
"""
BURST = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[3])):
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex((sys.argv[1], int(sys.argv[2])))
    socks.append(c)
time.sleep(float(sys.argv[4]))  # SYN retransmits overflow again
"""


def test_listen_overflows_match_the_namespace_counters(sat_agent: tuple[Agent, str]) -> None:
    _, listen = sat_agent
    port = 8080
    with two_hosts("pwsat") as net:
        server = net.exec(net.server_ns, [sys.executable, "-c", LISTENER, net.server_ip,
                                          str(port), f"pwsat-listener-{TOKEN}"],
                          stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"listening\n"
        before = net.nstat(net.server_ns)
        net.run(net.client_ns, [sys.executable, "-c", BURST, net.server_ip, str(port), "24",
                                "2.5"])
        after = net.nstat(net.server_ns)
        overflows = after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
        drops = after["TcpExtListenDrops"] - before["TcpExtListenDrops"]

        def seen(name: str) -> float:
            return total(scrape(listen), name, service_name="pwsat-listener",
                         server_port=str(port))

        wait_for(lambda: seen("probewire_tcp_listen_drops_total") >= drops)
        print(f"ListenOverflows {overflows}, ListenDrops {drops}; probewire "
              f"{seen('probewire_tcp_listen_overflows_total'):.0f}, "
              f"{seen('probewire_tcp_listen_drops_total'):.0f}")
        assert overflows > 10
        assert seen("probewire_tcp_listen_overflows_total") == overflows
        assert seen("probewire_tcp_listen_drops_total") == drops


# --- OOM kills -----------------------------------------------------------------------------------

HUNGRY = """
import ctypes, sys
ctypes.CDLL(None).prctl(15, b"pwsat-oom", 0, 0, 0)  # PR_SET_NAME
hoard = []
while True:
    hoard.append(bytearray(1 << 20))
"""


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[tuple[Path, str]]:
    """A memory-limited cgroup (v1 memory controller where it is bound, else cgroup2); yields
    its directory and its path as the controller's hierarchy names it."""
    name = f"pwsat-oom-{os.getpid()}-{TOKEN}"
    v1 = Path("/sys/fs/cgroup/memory")
    root = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
    path = root / name
    path.mkdir()
    try:
        if root == v1:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        else:
            (path / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        yield path, f"/{name}"
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_oom_kill_in_a_limited_cgroup_names_the_victim(sat_agent: tuple[Agent, str]) -> None:
    agent, listen = sat_agent
    with memory_cgroup(48 << 20) as (cgroup_dir, cgroup):
        procs = cgroup_dir / "cgroup.procs"
        cgroup_id = cgroup_dir.stat().st_ino  # a kernfs directory's inode is its node id

        def enter() -> None:
            procs.write_text(str(os.getpid()))

        victim = subprocess.Popen([sys.executable, "-c", HUNGRY, f"pwsat-oom-{TOKEN}"],
                                  preexec_fn=enter)
        try:
            assert victim.wait(timeout=60) == -9  # SIGKILL from the OOM killer
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()

        def kills() -> float:
            return total(scrape(listen), "probewire_oom_kills_total", service_name="pwsat-oom",
                         cgroup=cgroup)

        wait_for(lambda: kills() >= 1)
        assert kills() == 1
    probe = agent.probes["saturation"]
    mine = [k for k in probe.oom_kills() if k.pid == victim.pid]  # type: ignore[attr-defined]
    assert len(mine) == 1
    assert (mine[0].comm, mine[0].cgroup, mine[0].trigger_pid) == ("pwsat-oom", cgroup,
                                                                   victim.pid)
    assert mine[0].cgroup_id == cgroup_id
