"""pid -> service identity: real processes, and a fake /proc for container and systemd layouts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.config import ServiceRule
from probewire.enrich.service import (
    UNKNOWN_SERVICE,
    ProcessInfo,
    ServiceResolver,
    container_id_from_cgroup,
    interpreter_target,
    pod_uid_from_cgroup,
    read_process,
    service_name,
    systemd_unit_from_cgroup,
)

CID = "4f1c2a3b" * 8  # 64 hex digits, like every runtime's container id
POD_UID = "0b6a7f3e-9c1d-4e2f-8a5b-6c7d8e9f0a1b"


# --- real processes ----------------------------------------------------------------------------


class Spawner(Protocol):
    def __call__(
        self, argv: Sequence[str], wait_for_line: bool = False
    ) -> subprocess.Popen[bytes]: ...


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    """Start real processes; every one is killed and reaped when the test ends."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: Sequence[str], wait_for_line: bool = False) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        started.append(child)
        if wait_for_line:
            assert child.stdout is not None
            child.stdout.readline()  # the child says it is ready (e.g. after renaming itself)
        return child

    yield start
    for child in started:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


def test_read_process_describes_a_running_sleep(spawn: Spawner) -> None:
    child = spawn(["sleep", "30"])
    info = read_process(child.pid)
    assert info is not None
    assert info.pid == child.pid
    assert info.ppid == os.getpid()
    assert info.comm == "sleep"
    assert Path(info.exe).name == "sleep"
    assert info.cmdline == ("sleep", "30")
    assert info.start_time_ticks > 0
    assert info.cgroup.startswith("/")
    assert ServiceResolver().name_for(child.pid) == "sleep"


def test_read_process_returns_none_once_the_process_is_gone(spawn: Spawner) -> None:
    child = spawn(["sleep", "30"])
    child.kill()
    child.wait(timeout=10)
    assert read_process(child.pid) is None


def test_python_module_server_is_named_after_the_module(spawn: Spawner) -> None:
    child = spawn([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"])
    assert ServiceResolver().name_for(child.pid) == "http.server"


def test_python_script_is_named_after_the_script(spawn: Spawner, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text("import time\ntime.sleep(30)\n")
    child = spawn([sys.executable, "-u", str(script)])
    assert ServiceResolver().name_for(child.pid) == "app"


def test_comm_with_spaces_and_parentheses_is_parsed(spawn: Spawner) -> None:
    # /proc/PID/stat puts comm in parentheses; a comm containing ") " must not shift the fields.
    rename = (
        "import sys, time\n"
        "open('/proc/self/comm', 'w').write('x) (y z) 1 2')\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = spawn([sys.executable, "-c", rename], wait_for_line=True)
    info = read_process(child.pid)
    assert info is not None
    assert info.comm == "x) (y z) 1 2"
    assert info.ppid == os.getpid()
    again = read_process(child.pid)
    assert again is not None and again.start_time_ticks == info.start_time_ticks


def test_resolver_keeps_the_name_of_an_exited_process_until_forget(spawn: Spawner) -> None:
    resolver = ServiceResolver()
    child = spawn(["sleep", "30"])
    assert resolver.name_for(child.pid) == "sleep"
    child.kill()
    child.wait(timeout=10)
    # Its last events are still in flight: they keep the service name.
    assert resolver.name_for(child.pid) == "sleep"
    resolver.forget(child.pid)
    assert resolver.name_for(child.pid) == UNKNOWN_SERVICE
    assert resolver.info_for(child.pid) is None


def test_pid_zero_and_negative_are_unknown() -> None:
    resolver = ServiceResolver()
    assert resolver.name_for(0) == UNKNOWN_SERVICE
    assert resolver.name_for(-5) == UNKNOWN_SERVICE
    assert resolver.info_for(0) is None
    assert read_process(0) is None


def test_names_for_resolves_many_pids_at_once(spawn: Spawner) -> None:
    child = spawn(["sleep", "30"])
    names = ServiceResolver().names_for([child.pid, 0, child.pid])
    assert names == {child.pid: "sleep", 0: UNKNOWN_SERVICE}


def test_config_rule_wins_over_the_executable_name(spawn: Spawner) -> None:
    child = spawn(["sleep", "31"])
    rules = [
        ServiceRule(name="never", comm="sleep", cmdline=r"\b99\b"),
        ServiceRule(name="napper", comm="sleep", cmdline=r"\b31$"),
        ServiceRule(name="later", comm="sleep"),
    ]
    assert ServiceResolver(rules).name_for(child.pid) == "napper"


def test_concurrent_readers_and_a_writer_do_not_break_the_cache(spawn: Spawner) -> None:
    children = [spawn(["sleep", "30"]) for _ in range(4)]
    pids = [child.pid for child in children]
    resolver = ServiceResolver(max_entries=3)
    failures: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(200):
                assert set(resolver.names_for(pids).values()) == {"sleep"}
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(200):
        for pid in pids:
            resolver.forget(pid)
    for thread in threads:
        thread.join()
    assert not failures
    assert len(resolver) <= 3


# --- fake /proc --------------------------------------------------------------------------------


def fake_process(
    proc: Path,
    pid: int,
    *,
    comm: str = "app",
    cmdline: Sequence[str] = ("/usr/bin/app",),
    exe: str | None = "/usr/bin/app",
    cgroup: str = "/",
    cgroup_file: str | None = None,
    ppid: int = 1,
    start_time_ticks: int = 1000,
) -> Path:
    base = proc / str(pid)
    base.mkdir(parents=True, exist_ok=True)
    # Fields 5..21 of proc(5) between ppid and starttime, then two trailing fields.
    middle = " ".join(["0"] * 17)
    (base / "stat").write_text(f"{pid} ({comm}) S {ppid} {middle} {start_time_ticks} 0 0\n")
    (base / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in cmdline))
    (base / "cgroup").write_text(cgroup_file if cgroup_file is not None else f"0::{cgroup}\n")
    link = base / "exe"
    if link.is_symlink():
        link.unlink()
    if exe is not None:
        link.symlink_to(exe)
    return base


@pytest.mark.parametrize(
    ("cgroup", "container_id"),
    [
        (f"/docker/{CID}", CID),
        (f"/system.slice/docker-{CID}.scope", CID),
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
            CID,
        ),
        (f"/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/crio-{CID}.scope", CID),
        (f"/kubepods/burstable/pod{POD_UID}/{CID}", CID),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope", CID),
        (f"/machine.slice/libpod-conmon-{CID}.scope", None),
        (f"/kubepods.slice/crio-conmon-{CID}.scope", None),
        ("/system.slice/nginx.service", None),
        ("/", None),
        ("", None),
    ],
)
def test_container_id_from_runtime_cgroup_layouts(cgroup: str, container_id: str | None) -> None:
    assert container_id_from_cgroup(cgroup) == container_id


def test_innermost_container_wins_for_nested_runtimes() -> None:
    inner = "ab" * 32
    path = f"/system.slice/docker-{CID}.scope/kubepods/besteffort/pod{POD_UID}/{inner}"
    assert container_id_from_cgroup(path) == inner


@pytest.mark.parametrize(
    "cgroup",
    [
        f"/kubepods/burstable/pod{POD_UID}/{CID}",
        "/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
    ],
)
def test_pod_uid_from_kubepods_paths(cgroup: str) -> None:
    assert pod_uid_from_cgroup(cgroup) == POD_UID


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("/system.slice/nginx.service", "nginx.service"),
        ("/system.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "foo.service"),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope", None),
        ("/user.slice/user-1000.slice/session-3.scope", None),
        ("/system.slice/run-u42.service", None),
        ("/init.scope", None),
        (f"/system.slice/docker-{CID}.scope/system.slice/nginx.service", "nginx.service"),
        (f"/system.slice/containerd.service/{CID}", None),
        ("/", None),
    ],
)
def test_systemd_unit_is_the_most_specific_service(cgroup: str, unit: str | None) -> None:
    assert systemd_unit_from_cgroup(cgroup) == unit


def test_systemd_service_names_the_process(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, cgroup="/system.slice/nginx.service", exe="/usr/sbin/nginx")
    info = read_process(10, tmp_path)
    assert info is not None and info.systemd_unit == "nginx.service"
    assert ServiceResolver(proc=tmp_path).name_for(10) == "nginx"


def test_generic_user_manager_unit_falls_through_to_the_executable(tmp_path: Path) -> None:
    cgroup = "/user.slice/user-1000.slice/user@1000.service/init.scope"
    fake_process(tmp_path, 11, cgroup=cgroup, exe="/usr/lib/systemd/systemd", comm="systemd")
    assert ServiceResolver(proc=tmp_path).name_for(11) == "systemd"


def test_container_process_gets_the_same_naming_rules(tmp_path: Path) -> None:
    cgroup = f"/system.slice/docker-{CID}.scope"
    fake_process(
        tmp_path,
        12,
        cgroup=cgroup,
        cmdline=("python3", "/srv/api/server.py"),
        exe="/usr/bin/python3.12",
    )
    info = read_process(12, tmp_path)
    assert info is not None and info.container_id == CID and info.systemd_unit is None
    assert ServiceResolver(proc=tmp_path).name_for(12) == "server"


def test_cgroup_rule_names_a_container(tmp_path: Path) -> None:
    fake_process(tmp_path, 13, cgroup=f"/kubepods/pod{POD_UID}/{CID}", exe="/app/bin",
                 comm="bin", cmdline=("/app/bin",))
    rules = [ServiceRule(name="payments", cgroup=POD_UID, exe="/app/*")]
    assert ServiceResolver(rules, proc=tmp_path).name_for(13) == "payments"
    # All given matchers must match: a wrong exe glob turns the rule off.
    rules = [ServiceRule(name="payments", cgroup=POD_UID, exe="/usr/*")]
    assert ServiceResolver(rules, proc=tmp_path).name_for(13) == "bin"


def test_cgroup_v1_host_uses_the_name_systemd_hierarchy(tmp_path: Path) -> None:
    v1 = "12:pids:/system.slice/cron.service\n1:name=systemd:/system.slice/cron.service\n"
    fake_process(tmp_path, 14, cgroup_file=v1, exe="/usr/sbin/cron")
    info = read_process(14, tmp_path)
    assert info is not None and info.cgroup == "/system.slice/cron.service"
    assert info.systemd_unit == "cron.service"


def test_kernel_thread_without_exe_is_named_by_comm(tmp_path: Path) -> None:
    fake_process(tmp_path, 15, comm="kswapd0", cmdline=(), exe=None)
    info = read_process(15, tmp_path)
    assert info is not None and info.exe == "" and info.cmdline == ()
    assert ServiceResolver(proc=tmp_path).name_for(15) == "kswapd0"


def test_deleted_executable_keeps_its_name(tmp_path: Path) -> None:
    fake_process(tmp_path, 16, exe="/usr/bin/orders (deleted)", comm="orders")
    info = read_process(16, tmp_path)
    assert info is not None and info.exe == "/usr/bin/orders"


@pytest.mark.parametrize("stat", ["", "garbage", "17 (x) S", "17 (x S 1 2 3"])
def test_malformed_stat_reads_as_gone(tmp_path: Path, stat: str) -> None:
    fake_process(tmp_path, 17)
    (tmp_path / "17" / "stat").write_text(stat)
    assert read_process(17, tmp_path) is None
    assert ServiceResolver(proc=tmp_path).name_for(17) == UNKNOWN_SERVICE


def test_reused_pid_is_read_again(tmp_path: Path) -> None:
    resolver = ServiceResolver(proc=tmp_path, revalidate_s=0.0)
    fake_process(tmp_path, 20, comm="old", exe="/usr/bin/old", start_time_ticks=100)
    assert resolver.name_for(20) == "old"
    # Same pid, same comm, new process: only the start time tells them apart.
    fake_process(tmp_path, 20, comm="old", exe="/usr/bin/new", start_time_ticks=900)
    assert resolver.name_for(20) == "new"
    info = resolver.info_for(20)
    assert info is not None and info.start_time_ticks == 900


def test_exec_in_place_is_noticed_through_comm(tmp_path: Path) -> None:
    resolver = ServiceResolver(proc=tmp_path, revalidate_s=0.0)
    fake_process(tmp_path, 21, comm="bash", cmdline=("bash",), exe="/usr/bin/bash")
    assert resolver.name_for(21) == "bash"
    fake_process(tmp_path, 21, comm="worker", cmdline=("worker",), exe="/opt/worker")
    assert resolver.name_for(21) == "worker"


def test_cached_names_are_revalidated_at_most_once_a_period_and_exec_forgets(
    tmp_path: Path,
) -> None:
    resolver = ServiceResolver(proc=tmp_path, revalidate_s=3600.0)
    fake_process(tmp_path, 22, comm="bash", cmdline=("bash",), exe="/usr/bin/bash")
    assert resolver.name_for(22) == "bash"
    fake_process(tmp_path, 22, comm="worker", cmdline=("worker",), exe="/opt/worker")
    assert resolver.name_for(22) == "bash"  # not re-read within the period
    resolver.forget(22)  # what an exec event does
    assert resolver.name_for(22) == "worker"


def test_cache_is_bounded_and_evicts_least_recently_used(tmp_path: Path) -> None:
    for pid in (31, 32, 33):
        fake_process(tmp_path, pid, exe=f"/usr/bin/p{pid}", comm=f"p{pid}",
                     cmdline=(f"/usr/bin/p{pid}",))
    resolver = ServiceResolver(proc=tmp_path, max_entries=2)
    assert resolver.names_for([31, 32]) == {31: "p31", 32: "p32"}
    resolver.name_for(31)  # 32 is now the least recently used
    resolver.name_for(33)
    assert len(resolver) == 2
    # 32 was evicted: once its /proc entry is gone there is nothing left to name it by.
    for name in ("stat", "cmdline", "cgroup"):
        (tmp_path / "32" / name).unlink()
    assert resolver.name_for(32) == UNKNOWN_SERVICE
    (tmp_path / "31" / "stat").unlink()
    assert resolver.name_for(31) == "p31"  # still cached


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ServiceResolver(max_entries=0)


# --- naming ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "exe", "name"),
    [
        (("python3", "-m", "http.server", "0"), "/usr/bin/python3.11", "http.server"),
        (("python3", "-mhttp.server"), "", "http.server"),
        (("/usr/bin/python3", "-u", "-X", "dev", "/x/app.py", "--port", "1"), "", "app"),
        (("python3", "/srv/shop/__main__.py"), "", "shop"),
        (("python3", "-c", "print(1)"), "/usr/bin/python3.11", None),
        (("java", "-Xmx1g", "-jar", "/x/orders.jar"), "/usr/lib/jvm/bin/java", "orders"),
        (("java", "-jar", "/x/orders-1.4.2-SNAPSHOT.jar"), "", "orders"),
        (("java", "-cp", "/x/lib/*", "com.example.Billing"), "", "Billing"),
        (("node", "--require", "./otel.js", "/srv/api/index.js"), "", "api"),
        (("node", "server.mjs"), "", "server"),
        (("node", "-e", "1"), "", None),
        (("ruby", "-I", "lib", "bin/worker.rb"), "", "worker"),
        (("perl", "-w", "/usr/local/bin/cleanup.pl"), "", "cleanup"),
        (("php", "-d", "memory_limit=1G", "artisan"), "", "artisan"),
        (("bash", "-e", "/opt/backup.sh"), "/usr/bin/bash", "backup"),
        (("sh", "-c", "sleep 1"), "/usr/bin/dash", None),
        (("nginx: worker process",), "/usr/sbin/nginx", None),
        ((), "", None),
    ],
)
def test_interpreter_target(cmdline: tuple[str, ...], exe: str, name: str | None) -> None:
    assert interpreter_target(cmdline, exe) == name


BLANK_INFO = ProcessInfo(
    pid=100,
    ppid=1,
    comm="",
    exe="",
    cmdline=(),
    cgroup="/",
    container_id=None,
    systemd_unit=None,
    start_time_ticks=1,
)


def info_of(**fields: Any) -> ProcessInfo:
    return dataclasses.replace(BLANK_INFO, **fields)


def test_naming_falls_back_from_exe_to_comm_to_unknown() -> None:
    assert service_name(info_of(exe="/usr/bin/redis-server", comm="redis")) == "redis-server"
    assert service_name(info_of(comm="kworker/0:1")) == "kworker/0:1"
    assert service_name(info_of()) == UNKNOWN_SERVICE


def test_systemd_unit_beats_the_interpreter_script() -> None:
    info = info_of(cmdline=("python3", "app.py"), systemd_unit="shop.service")
    assert service_name(info) == "shop"


# --- properties --------------------------------------------------------------------------------

_segment = st.from_regex(r"[a-z0-9][a-z0-9_.@-]{0,15}", fullmatch=True)
_hex64 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


@given(st.text())
def test_cgroup_parsers_never_raise(text: str) -> None:
    container_id = container_id_from_cgroup(text)
    assert container_id is None or len(container_id) == 64
    unit = systemd_unit_from_cgroup(text)
    assert unit is None or unit.endswith(".service")
    pod_uid_from_cgroup(text)


@given(
    prefix=st.lists(_segment, max_size=4),
    container_id=_hex64,
    form=st.sampled_from(
        ["{}", "docker-{}.scope", "cri-containerd-{}.scope", "crio-{}.scope", "libpod-{}.scope"]
    ),
)
def test_container_id_is_found_under_any_parent_path(
    prefix: list[str], container_id: str, form: str
) -> None:
    path = "/" + "/".join([*prefix, form.format(container_id)])
    assert container_id_from_cgroup(path) == container_id


@given(
    module=st.from_regex(r"[a-z_][a-z0-9_]{0,10}(\.[a-z_][a-z0-9_]{0,10}){0,3}", fullmatch=True),
    rest=st.lists(st.text(max_size=8), max_size=4),
)
def test_python_dash_m_names_the_module(module: str, rest: list[str]) -> None:
    assert interpreter_target(("python3", "-m", module, *rest), "/usr/bin/python3") == module


@given(
    directory=st.lists(_segment, max_size=3),
    stem=st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True),
)
def test_python_script_names_the_script_stem(directory: list[str], stem: str) -> None:
    path = "/".join(["", *directory, f"{stem}.py"])
    assert interpreter_target(("python3", path), "") == (stem if stem != "__main__" else None)


@given(
    stem=st.from_regex(r"[a-z][a-z]{0,12}", fullmatch=True),
    version=st.from_regex(r"(-[0-9]+(\.[0-9]+){0,2})?", fullmatch=True),
)
def test_java_jar_names_the_jar_without_version(stem: str, version: str) -> None:
    assert interpreter_target(("java", "-jar", f"/opt/{stem}{version}.jar"), "") == stem


@given(
    cmdline=st.lists(st.text(max_size=12), max_size=6).map(tuple),
    exe=st.text(max_size=20),
    comm=st.text(max_size=15),
    cgroup=st.text(max_size=40),
)
def test_service_name_is_never_empty_and_never_raises(
    cmdline: tuple[str, ...], exe: str, comm: str, cgroup: str
) -> None:
    info = info_of(
        cmdline=cmdline,
        exe=exe,
        comm=comm,
        cgroup=cgroup,
        systemd_unit=systemd_unit_from_cgroup(cgroup),
        container_id=container_id_from_cgroup(cgroup),
    )
    assert service_name(info).strip()


def test_name_until_says_how_long_a_cached_name_stands_and_generation_moves_on_change(
    tmp_path: Path,
) -> None:
    fake_process(tmp_path, 20, comm="api", exe="/usr/bin/api", cmdline=("/usr/bin/api",))
    resolver = ServiceResolver(proc=tmp_path, revalidate_s=60.0)
    before = resolver.generation
    name, until = resolver.name_until(20)
    assert name == "api" and until > time.monotonic() + 30
    assert resolver.generation == before + 1  # named anew
    assert resolver.name_until(20) == (name, until)  # cached: same answer, no change
    assert resolver.generation == before + 1
    resolver.forget(20)
    assert resolver.generation == before + 2
    resolver.forget(20)  # nothing to forget: nothing changed
    assert resolver.generation == before + 2
    assert resolver.name_until(999) == ("unknown", 0.0)  # not cached: ask again next time


@pytest.mark.parametrize(("comm", "cmdline", "exe", "name"), [
    # Debian's redis-server is a link to redis-check-rdb; redis rewrites its title
    ("redis-server", ("redis-server 127.0.0.1:6379",), "/usr/bin/redis-check-rdb",
     "redis-server"),
    # a busybox applet
    ("wget", ("wget", "-q", "x"), "/bin/busybox", "wget"),
    # comm keeps 15 bytes: the called name comes from the command line
    ("very-long-tool-", ("/usr/bin/very-long-tool-name", "-x"), "/usr/bin/multicall",
     "very-long-tool-name"),
    # a program that renamed its own comm (prctl) keeps its executable's name
    ("worker-3", ("/usr/sbin/nginx", "-g", "x"), "/usr/sbin/nginx", "nginx"),
    ("MainThread", ("/usr/bin/app",), "/usr/bin/app", "app"),
    # python3 -> python3.11: the executable's name starts with comm
    ("python3", ("python3",), "/usr/bin/python3.11", "python3.11"),
])
def test_a_program_called_through_a_link_is_named_as_called(
        tmp_path: Path, comm: str, cmdline: tuple[str, ...], exe: str, name: str) -> None:
    fake_process(tmp_path, 20, comm=comm, cmdline=cmdline, exe=exe)
    assert ServiceResolver(proc=tmp_path).name_for(20) == name


def test_a_forked_child_that_never_execs_keeps_its_parents_name_after_it_is_gone(
        tmp_path: Path) -> None:
    """A PostgreSQL backend: forked by the postmaster, never execs, gone from /proc by the time
    its last exchanges are handled. Named at the fork record, from the live parent."""
    fake_process(tmp_path, 100, comm="postgres", cmdline=("/usr/lib/postgresql/15/bin/postgres",),
                 exe="/usr/lib/postgresql/15/bin/postgres", start_time_ticks=500)
    resolver = ServiceResolver(proc=tmp_path, revalidate_s=0.0)
    assert resolver.name_for(200) == "unknown"  # never in /proc: nothing to name it by
    resolver.inherit(200, 100, 900)
    assert resolver.name_for(200) == "postgres"
    info = resolver.info_for(200)
    assert info is not None and (info.pid, info.ppid, info.start_time_ticks) == (200, 100, 900)
    # In /proc after all (alive at the next look): /proc's word replaces the copy.
    fake_process(tmp_path, 200, comm="worker", cmdline=("/usr/bin/worker",),
                 exe="/usr/bin/worker", start_time_ticks=901)
    assert resolver.name_for(200) == "worker"
    resolver.inherit(300, 999, 950)  # an unknown parent: nothing to inherit
    assert resolver.name_for(300) == "unknown"
