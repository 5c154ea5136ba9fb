"""Can this kernel enforce? `probewire doctor` asks by trying: the exec hook sends SIGKILL to
one child of ours as it execs, exactly as a kill rule would (bpf_send_signal from a tracing
program at sched_process_exec), and the child must die by that signal."""

from __future__ import annotations

import signal
import subprocess

from probewire.errors import ProbewireError
from probewire.runtime.bpf import BpfObject
from probewire.runtime.features import ensure_tracefs
from probewire.runtime.objects import object_path

__all__ = ["kill_supported"]

# Preferred program first, as in the process family's exec hook.
PROGRAMS = ("feature_send_signal_btf", "feature_send_signal_tp")


def _try(program: str) -> tuple[bool, str]:
    child = subprocess.Popen(["/bin/sh", "-c", "read _ && exec /bin/true"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert child.stdin is not None
    obj = BpfObject(object_path("features"))
    section = obj.programs[program].section
    try:
        for prog in obj.programs.values():
            prog.set_autoload(prog.name == program)
        obj.set_rodata(send_signal_target=child.pid)
        obj.load()
        link = obj.programs[program].attach()
        try:
            child.stdin.write(b"\n")
            child.stdin.close()
            code = child.wait(10)
        finally:
            link.destroy()
    except ProbewireError as exc:
        return False, f"{section}: {exc}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        obj.close()
    if code == -signal.SIGKILL:
        return True, f"works: a kill rule's SIGKILL stops an exec before it runs ({section})"
    return False, (f"{section}: the child exited with {code}, not SIGKILL; "
                   "action kill would not stop an exec")


def kill_supported() -> tuple[bool, str]:
    """(whether `action: kill` works on this kernel, what was seen)."""
    ensure_tracefs()
    reasons = []
    for program in PROGRAMS:
        ok, detail = _try(program)
        if ok:
            return ok, detail
        reasons.append(detail)
    return False, "; ".join(reasons) + " (alerts still work; kill rules only alert)"
