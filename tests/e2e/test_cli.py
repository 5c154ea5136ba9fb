"""`probewire` CLI end to end: real subprocesses, real kernel, exact exit codes and output.

Needs: root, BTF, tp_btf tracepoints (the agent's preferred hooks), bpftool for the
cross-check of what the kernel holds. Every subprocess has a timeout and is killed on the way
out; waits poll for a state and then assert on it (no timing assertions).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import free_port, wait_for

from probewire.probes import REGISTRY
from probewire.probes.l7 import ENTER_HOOKS as L7_ENTER_HOOKS
from probewire.runtime import inventory
from probewire.runtime.features import L7_OPTIONAL, probe_kernel_features

pytestmark = pytest.mark.e2e

PROBEWIRE = str(Path(sys.executable).with_name("probewire"))
NOBODY = 65534
CMD_TIMEOUT_S = 120  # a safety net against hangs, not an assertion on speed
START_TIMEOUT_S = 120  # the matrix's emulated guests start the agent in ~30 s under load
UNPRIVILEGED_TIMEOUT_S = 60  # it fails before loading anything
# Programs are freed by RCU after the last fd closes, so they vanish shortly after the holder.
FREE_TIMEOUT_S = 20
# (probe, hook) pairs whose choice the probes tests check.
HOOKS = (
    ("tcp", "inet_sock_set_state"),
    ("tcp", "tcp_retransmit_skb"),
    ("tcp", "tcp_retransmit_synack"),
    ("tcp", "tcp_send_reset"),
    ("tcp", "tcp_receive_reset"),
    ("process", "sched_process_exec"),
    ("process", "sched_process_exit"),
    ("process", "sched_process_fork"),
    ("process", "inet_sock_set_state"),
    ("l7", "inet_sock_set_state"),
    ("saturation", "sched_switch"),
    ("saturation", "sched_wakeup"),
    ("saturation", "sched_wakeup_new"),
    ("saturation", "block_rq_insert"),
    ("saturation", "block_rq_issue"),
    ("saturation", "block_rq_complete"),
    ("saturation", "consume_skb"),
    ("saturation", "kfree_skb"),
    ("saturation", "inet_sock_set_state"),
    ("saturation", "mark_victim"),
)
# The kernel keeps the first 15 bytes of a program name (BPF_OBJ_NAME_LEN - 1).
KERNEL_NAME_LEN = 15


def _env() -> dict[str, str]:
    # Wide enough that rich does not fold the tables we parse.
    return {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROBEWIRE, *args], env=_env(), capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def _expected_programs(listen: str) -> tuple[Counter[str], Counter[str]]:
    """Kernel-truncated names of (every program the agent should hold, those it attaches):
    the program chosen per hook, as the agent reports it, plus each family's helpers."""
    with urllib.request.urlopen(f"http://{listen}/api/probes", timeout=10) as resp:
        payload = json.load(resp)
    # A family this kernel refuses is switched off (and says so); the rest must be attached.
    off = {s["probe"] for s in payload["probes"] if s["fallback_reason"].startswith("family off")}
    status = [s for s in payload["probes"] if s["probe"] not in off]
    attached = Counter(s["program"][:KERNEL_NAME_LEN] for s in status if s["attached"])
    assert sum(attached.values()) == len(status), status
    # OpenSSL uprobes: one link per (program, function) for every libssl file attached.
    from probewire.probes.tls import TLS_PROBES

    libraries = len(payload["tls"]["libraries"])
    assert payload["tls"]["links"] == libraries * len(TLS_PROBES)
    tls_links = Counter(p[:KERNEL_NAME_LEN] for p, _, _ in TLS_PROBES for _ in range(libraries))
    running = {s["probe"] for s in status}  # a family with nothing to attach is not loaded
    helpers = Counter(
        name[:KERNEL_NAME_LEN]
        for family, probe in REGISTRY.items() if family in running
        for name in getattr(probe, "helper_programs", ())
    )
    return attached + helpers, attached + tls_links


def _held_bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, link ids) that process `pid` holds fds to, from /proc/<pid>/fdinfo."""
    progs: set[int] = set()
    links: set[int] = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(
                line.split(":", 1) for line in info.read_text().splitlines() if ":" in line
            )
        except OSError:
            continue  # closed in between
        if "link_id" in fields:
            links.add(int(fields["link_id"]))
        elif "prog_id" in fields and "prog_tag" in fields:
            progs.add(int(fields["prog_id"]))
    return progs, links


def _bpftool(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["bpftool", "-j", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=True
    ).stdout
    return json.loads(out) if out.strip() else []


def _bpftool_prog_ids() -> set[int]:
    return {int(p["id"]) for p in _bpftool("prog", "show")}  # type: ignore[call-overload]


def _bpftool_linked_prog_ids() -> set[int]:
    return {int(lk["prog_id"]) for lk in _bpftool("link", "show") if "prog_id" in lk}  # type: ignore[call-overload]


def _inventory_linked_prog_ids() -> set[int]:
    return {lk.prog_id for lk in inventory.links()}


def _healthy(listen: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
def bpftool() -> None:
    # scripts/setup.sh installs bpftool: its absence is a broken set-up, not a reason to skip.
    assert shutil.which("bpftool") is not None, (
        "bpftool is missing (run make setup, or apt-get install bpftool); it cross-checks "
        "the kernel's view of the agent's programs"
    )


@contextmanager
def agent_process(out_dir: Path, *extra: str, listen: str | None = None
                  ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`probewire run` as a subprocess on a free loopback port, healthy when yielded."""
    listen = listen or f"127.0.0.1:{free_port()}"
    log_path = out_dir / f"agent-{listen.replace(':', '_')}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [PROBEWIRE, "run", "--listen", listen, *extra],
            env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: proc.poll() is not None or _healthy(listen), START_TIMEOUT_S)
            if not _healthy(listen):
                pytest.fail(
                    f"agent did not become healthy at {listen} (exit code {proc.poll()}):\n"
                    + log_path.read_text(errors="replace")
                )
            yield proc, listen
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=CMD_TIMEOUT_S)


def _parse_table(text: str) -> tuple[str, list[list[str]]]:
    """The first rich box table -> (title line, body rows); folded continuation lines joined."""
    lines = text.splitlines()
    end = next((i for i, ln in enumerate(lines) if ln.startswith("└")), len(lines))
    lines = lines[: end + 1]
    title = next((ln.strip() for ln in lines if ln.strip()), "")
    rows: list[list[str]] = []
    header_done = False
    for line in lines:
        if line.startswith(("┡", "╞")):
            header_done = True
            continue
        if not header_done or not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
    return title, rows


def _squash(text: str) -> str:
    return "".join(text.split())


# --- usage and configuration errors: exit 2, the message names the field ----------------------

@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("unknown_key", "probes: {tcpp: {}}\n", ["probes.tcpp", "unknown field"]),
        ("bad_value", "ring: {size_bytes: 1000}\n", ["ring.size_bytes", "not a power of two"]),
        ("yaml_syntax", "listen: [\n", [":2:1: invalid YAML"]),
    ],
)
def test_run_with_bad_config_exits_2_naming_the_field(
    tmp_path: Path, name: str, content: str, expected: list[str]
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(content)
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {path}"), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert result.stdout == ""


def test_run_with_missing_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: config file not found" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--listen", "nonsense"], "listen: 'nonsense' has no port"),
        (["--force-hook", "inet_sock_set_state"], "--force-hook 'inet_sock_set_state'"),
    ],
)
def test_run_with_bad_option_exits_2(args: list[str], expected: str) -> None:
    result = _cli("run", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr


# --- privilege: exit 3 with the fix -------------------------------------------------------------

def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _as_nobody_cmd(argv: list[str]) -> tuple[list[str], object]:
    """argv that runs as uid/gid 65534 with no BPF privilege, and the preexec_fn it needs.

    Plain setuid needs the interpreter readable by nobody. A venv built on a root-only
    interpreter (/root is 0700, e.g. pyenv) is not; then setpriv keeps only
    CAP_DAC_READ_SEARCH (read files), which grants nothing BPF needs.
    """
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import probewire"], preexec_fn=_drop_to_nobody,
            capture_output=True, timeout=CMD_TIMEOUT_S,
        )
        if probe.returncode == 0:
            return argv, _drop_to_nobody
    except PermissionError:
        pass  # exec itself was refused
    # setpriv comes with util-linux (essential on Debian): missing, the machine is broken.
    assert shutil.which("setpriv") is not None, (
        f"{sys.executable} is not readable by uid {NOBODY} and setpriv (util-linux) is "
        "missing: cannot run the CLI unprivileged"
    )
    return [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
        "--bounding-set=-all,+dac_read_search", *argv,
    ], None


def test_run_unprivileged_exits_3_and_says_run_as_root() -> None:
    argv, preexec = _as_nobody_cmd([PROBEWIRE, "run", "--listen", f"127.0.0.1:{free_port()}"])
    proc = subprocess.Popen(
        argv, env={**_env(), "HOME": "/"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=preexec,  # type: ignore[arg-type]
    )
    try:
        _, stderr = proc.communicate(timeout=UNPRIVILEGED_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate(timeout=CMD_TIMEOUT_S)
        pytest.fail(
            "unprivileged `probewire run` hung instead of exiting 3 (a failed start must not "
            f"wait in AgentServer.stop() for a server loop that never ran); stderr:\n{stderr}"
        )
    assert proc.returncode == 3, stderr
    assert "run as root" in stderr, stderr
    assert "CAP_BPF" in stderr, stderr


# --- lifecycle: nothing stays attached after SIGKILL or SIGTERM --------------------------------

def _agent_bpf_state(
    proc: subprocess.Popen[bytes], listen: str, before: set[int]
) -> tuple[set[int], set[int]]:
    """The agent's program and link ids, checked against inventory and bpftool while running."""
    expected_held, expected_attached = _expected_programs(listen)
    held_progs, held_links = _held_bpf_ids(proc.pid)
    loaded = {p.id: p for p in inventory.programs()}
    added = set(loaded) - before
    assert held_progs <= added, f"agent programs {held_progs - added} were loaded before it started"
    assert Counter(loaded[i].name for i in held_progs) == expected_held
    assert held_progs <= _bpftool_prog_ids()
    # Attached means a link the agent holds references the program.
    held = [lk for lk in inventory.links() if lk.id in held_links]
    linked = {lk.prog_id for lk in held}
    assert len(held_links) == sum(expected_attached.values())
    assert Counter(loaded[lk.prog_id].name for lk in held) == expected_attached
    assert linked <= _bpftool_linked_prog_ids()
    return held_progs, held_links


def _assert_gone(progs: set[int], links: set[int]) -> None:
    def gone() -> bool:
        return not (progs & {p.id for p in inventory.programs()}) and not (
            progs & _inventory_linked_prog_ids()
        )

    wait_for(gone, FREE_TIMEOUT_S, 0.1)
    assert not progs & {p.id for p in inventory.programs()}
    assert not progs & _bpftool_prog_ids()
    assert not progs & _inventory_linked_prog_ids()
    assert not progs & _bpftool_linked_prog_ids()
    assert not links & {lk.id for lk in inventory.links()}


@pytest.mark.usefixtures("bpftool")
def test_run_listens_on_an_ipv6_address_in_brackets(test_output_dir: Path) -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    with agent_process(test_output_dir, listen=f"[::1]:{port}") as (_, listen), \
            urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        assert b"probewire_startup_seconds" in resp.read()


def test_sigkill_leaves_no_program_or_link_attached(test_output_dir: Path) -> None:
    before = {p.id for p in inventory.programs()}
    with agent_process(test_output_dir) as (proc, listen):
        progs, links = _agent_bpf_state(proc, listen, before)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=CMD_TIMEOUT_S) == -signal.SIGKILL
    _assert_gone(progs, links)


@pytest.mark.usefixtures("bpftool")
def test_sigterm_exits_0_and_leaves_nothing_attached(test_output_dir: Path) -> None:
    before = {p.id for p in inventory.programs()}
    with agent_process(test_output_dir) as (proc, listen):
        progs, links = _agent_bpf_state(proc, listen, before)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=CMD_TIMEOUT_S) == 0
    _assert_gone(progs, links)


# --- doctor -------------------------------------------------------------------------------------

def _other_agent_programs() -> set[int]:
    return {p.id for p in inventory.ours()}


def test_doctor_reports_hook_types_this_kernel_offers() -> None:
    from probewire.runtime.features import probe_hook_types, probe_kernel_features

    held_before = _other_agent_programs()
    result = _cli("doctor", "--listen", f"127.0.0.1:{free_port()}")
    # The kernel frees a closed program after an RCU grace period (a program doctor test-ran
    # on each CPU was seen a moment after doctor exited): leftovers are what stays.
    deadline = time.monotonic() + 5.0
    while (held_after := _other_agent_programs()) - held_before and time.monotonic() < deadline:
        time.sleep(0.05)
    title, rows = _parse_table(result.stdout)
    assert title == "probewire doctor", result.stdout
    checks = {r[0]: (r[1], r[2]) for r in rows}
    for name in ("privileges", "BTF", "tracefs", "memlock", "libbpf"):
        assert checks[name][0] == "yes", (name, checks[name])
    assert checks["hook tp_btf"] == ("yes", "works")
    # kprobes exist iff the kernel has kprobe events (CONFIG_KPROBE_EVENTS); not on ours, on
    # every Debian kernel of the matrix (scripts/kernels).
    has_kprobes = Path("/sys/kernel/tracing/kprobe_events").exists()
    assert checks["hook kprobe"][0] == ("yes" if has_kprobes else "no"), checks["hook kprobe"]
    # The CLI reports what the runtime finds, with the kernel's reason where it says no (our
    # 6.18 refuses fentry with EPERM).
    support = probe_hook_types()
    for hook_type, s in support.items():
        assert checks[f"hook {hook_type}"][0] == ("yes" if s.available else "no"), hook_type
    if not support["fentry"].available:
        assert _squash(support["fentry"].reason) == _squash(checks["hook fentry"][1])
    features = probe_kernel_features()
    assert features["ringbuf"].available, "ring buffers (5.8+) are the agent's floor"
    for name, f in features.items():
        assert checks[f"feature {name}"] == (("yes", "works") if f.available else
                                              ("no", f.reason)), name
    # Each family is on, or off with the kernel's reason: an old kernel loses a family, never
    # the agent (doctor still exits 0).
    # A family the default configuration leaves off (custom: no probes.custom) says whether
    # this kernel could run it.
    for name in REGISTRY:
        ok, detail = checks[f"family {name}"]
        assert (ok, detail.split(" ", 1)[0]) in (("yes", "on"), ("no", "off"), ("yes", "not")), (
            name, detail)
    assert checks["family custom"][1].startswith(
        ("not enabled in the configuration", "off on this kernel: this kernel lacks")), checks
    assert result.returncode == 0, result.stdout
    if not held_before and not held_after:
        assert checks["leftover programs"] == ("yes", "none")
    else:
        # Another agent (e.g. the bpf tests' in-process one) holds probewire programs: they
        # go when it exits, so they are in use, not left over.
        ok, detail = checks["leftover programs"]
        assert ok == "yes", detail
        assert "in use by" in detail


def test_doctor_flags_a_pinned_program_that_outlives_its_process(tmp_path) -> None:
    """A program nobody holds (here: pinned in a bpffs we mount) is a leftover: exit 3."""
    import ctypes

    from probewire.runtime._libbpf import lib
    from probewire.runtime.bpf import BpfObject
    from probewire.runtime.objects import object_path

    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        with BpfObject(object_path("features")) as obj:
            for prog in obj.programs.values():
                prog.set_autoload(prog.name == "feature_tp")
            obj.load()
            pin = bpffs / "leftover"
            assert lib().bpf_obj_pin(obj.programs["feature_tp"].fd, str(pin).encode()) == 0, (
                ctypes.get_errno())
        result = _cli("doctor", "--listen", f"127.0.0.1:{free_port()}")
        _, rows = _parse_table(result.stdout)
        checks = {r[0]: (r[1], r[2]) for r in rows}
        assert result.returncode == 3, result.stdout
        assert checks["leftover programs"][0] == "no"
        assert "feature_tp" in checks["leftover programs"][1]
        pin.unlink()
    finally:
        subprocess.run(["umount", str(bpffs)], check=False)


# --- probes -------------------------------------------------------------------------------------

def _probe_rows(listen: str) -> dict[tuple[str, str], list[str]]:
    """The `probes` table keyed by (probe, hook): two families may hook the same tracepoint."""
    result = _cli("probes", "--listen", listen)
    assert result.returncode == 0, result.stderr
    title, rows = _parse_table(result.stdout)
    assert title == f"probewire probes — running agent at {listen}", result.stdout
    by_hook = {(r[0], r[1]): r for r in rows}
    declared = {(probe.name, hook.name) for probe in REGISTRY.values() for hook in probe.hooks}
    # A kernel without bpf_loop & co. runs l7_bounded, which adds an enter hook per syscall.
    if not all(f.available for f in probe_kernel_features(L7_OPTIONAL).values()):
        declared |= {("l7", hook.name) for hook in L7_ENTER_HOOKS}
    assert len(by_hook) == len(rows), result.stdout
    assert set(by_hook) == declared and set(HOOKS) <= declared, result.stdout
    for row in rows:
        # Attached, or its whole family switched off on this kernel, with the reason.
        assert row[3] == "yes" or _squash(row[6]).startswith("familyoff:"), row
    return by_hook


def _family_off(rows: dict[tuple[str, str], list[str]], probe: str) -> bool:
    return any(r[0] == probe and r[3] == "no" for r in rows.values())


def _preferred(probe: str, hook: str) -> tuple[str, str]:
    """(the section the agent must choose for a hook: its first program whose hook type this
    kernel offers, the section of its first program). tp_btf on ours, which refuses fentry;
    fentry/fexit where trampolines work."""
    from probewire.runtime.bpf import BpfObject
    from probewire.runtime.features import hook_type_of, probe_hook_types
    from probewire.runtime.objects import object_path

    cls = REGISTRY[probe]
    with BpfObject(object_path(cls.object_name)) as obj:
        sections = [obj.programs[p].section
                    for h in cls.hooks if h.name == hook for p in h.programs]
    support = probe_hook_types({hook_type_of(s) for s in sections})
    return next(s for s in sections if support[hook_type_of(s)].available), sections[0]


def test_probes_shows_the_preferred_hook_chosen_and_attached_for_every_hook(
        test_output_dir: Path) -> None:
    with agent_process(test_output_dir) as (_, listen):
        rows = _probe_rows(listen)
    for probe, hook in HOOKS:
        if _family_off(rows, probe):
            continue
        _probe, _hook, chosen, attached, _avg, _runs, reason = rows[probe, hook]
        preferred, first = _preferred(probe, hook)
        assert (chosen, attached) == (preferred, "yes"), rows[probe, hook]
        # A program passed over is named with the kernel's reason (fentry: EPERM here). The
        # preferred one may carry only a note of the stand-ins it runs with on an old kernel
        # (saturation on 5.10: "thread state in a hash by thread id (this kernel lacks ...)").
        if chosen == first:
            assert reason == "" or ("this kernel lacks" in reason
                                    and _squash(first) not in _squash(reason)), rows[probe, hook]
        else:
            assert _squash(first) in _squash(reason), rows[probe, hook]


def test_force_hook_tp_is_shown_with_the_forced_reason(test_output_dir: Path) -> None:
    with agent_process(test_output_dir, "--force-hook", "inet_sock_set_state=tp") as (_, listen):
        rows = _probe_rows(listen)
    # The override names a hook, so every family hooking that tracepoint takes it.
    forced = [(p, h) for p, h in HOOKS
              if h == "inet_sock_set_state" and not _family_off(rows, p)]
    assert forced == [(p, "inet_sock_set_state") for p in ("tcp", "process", "l7", "saturation")
                      if not _family_off(rows, p)]
    assert ("tcp", "inet_sock_set_state") in forced
    for key in forced:
        _probe, _hook, chosen, attached, _avg, _runs, reason = rows[key]
        assert (chosen, attached) == ("tp/sock/inet_sock_set_state", "yes")
        assert _squash(reason) == _squash(
            "tp_btf/inet_sock_set_state: not the forced hook type tp"
        ), reason
    for probe, hook in HOOKS:
        if (probe, hook) not in forced and not _family_off(rows, probe):
            assert rows[probe, hook][2:4] == [_preferred(probe, hook)[0], "yes"], rows[probe, hook]
    assert sum("not the forced hook type" in r[6] for r in rows.values()) == len(forced)
