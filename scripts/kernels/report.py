"""What the agent finds and chooses on the running kernel, as JSON for the matrix summary.

Run inside a matrix guest by guest.sh (or by hand on any host, as root):
    .venv/bin/python scripts/kernels/report.py OUT.json

Each probe family is started on its own, so a family the kernel refuses is named with its own
error and the libbpf log of its load (the verifier's word), not mixed with the others'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from probewire.agent import Agent
from probewire.config import config_from_mapping
from probewire.errors import ProbewireError
from probewire.probes import REGISTRY
from probewire.runtime.features import probe_hook_types, probe_kernel_features

# Verifier logs run to thousands of lines; the end holds the rejection.
LOG_TAIL_LINES = 60


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().rstrip("\n").splitlines())


def _probes_config(name: str) -> dict[str, Any]:
    """`probes` with only family `name` on. custom is a list of probes, on when it has one:
    here a uprobe on libc's getppid in this process (real, so the object loads)."""
    probes: dict[str, Any] = {other: {"enabled": other == name}
                              for other in REGISTRY if other != "custom"}
    if name == "custom":
        probes["custom"] = [{"name": "matrix_getppid", "target": {"pids": [os.getpid()]},
                             "symbol": "getppid"}]
    return probes


def _family(name: str) -> dict[str, Any]:
    agent = Agent(config_from_mapping({"probes": _probes_config(name), "bpf_stats": "off"}))
    capture = _Capture()
    libbpf = logging.getLogger("probewire.libbpf")
    libbpf.addHandler(capture)
    libbpf.setLevel(logging.WARNING)
    t0 = time.monotonic()
    try:
        agent.start()
    except ProbewireError as exc:
        # Alone, a family switched off for a missing feature leaves none to run: its own
        # reason says more than the agent's.
        reason = getattr(agent, "disabled", {}).get(name) or str(exc)
        return {"loaded": False, "error": reason, "log": capture.lines[-LOG_TAIL_LINES:]}
    finally:
        libbpf.removeHandler(capture)
    try:
        disabled = dict(getattr(agent, "disabled", {}))
        return {
            "loaded": name in agent.running,
            "error": disabled.get(name, ""),
            "startup_s": round(time.monotonic() - t0, 3),
            "hooks": [dataclasses.asdict(s) for s in agent.status()],
            "features_off": dict(getattr(agent, "features_off", {})),
            "log": capture.lines[-LOG_TAIL_LINES:] if name in disabled else [],
        }
    finally:
        agent.stop()


# The hook whose every program type (tp_btf, fentry, tp, kprobe) counts the same event: a reset
# received on a socket, which a refused connect to a closed loopback port produces once.
COST_HOOK = "tcp_receive_reset"
COST_EVENTS = 300


def _hook_costs() -> dict[str, Any]:
    """ns per program run of COST_HOOK under each hook type the kernel offers, in one run of
    the same workload (BPF stats on). Under TCG only the ratios mean anything."""
    import socket

    from probewire.probes.tcp import TcpProbe
    from probewire.runtime.bpf import BpfObject
    from probewire.runtime.features import hook_type_of
    from probewire.runtime.objects import object_path

    with BpfObject(object_path(TcpProbe.object_name)) as obj:
        hook = next(h for h in TcpProbe.hooks if h.name == COST_HOOK)
        types = [hook_type_of(obj.programs[p].section) for p in hook.programs]
    support = probe_hook_types(types)
    costs: dict[str, Any] = {}
    for hook_type in types:
        if not support[hook_type].available:
            costs[hook_type] = None
            continue
        agent = Agent(config_from_mapping({"probes": _probes_config("tcp"), "bpf_stats": "on"}),
                      {COST_HOOK: hook_type})
        agent.start()
        try:
            for _ in range(COST_EVENTS):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                with socket.socket() as c, contextlib.suppress(ConnectionRefusedError):
                    c.connect(("127.0.0.1", port))
            st = next(s for s in agent.status() if s.hook == COST_HOOK)
            costs[hook_type] = {"avg_ns": round(st.avg_ns), "runs": st.run_cnt}
        finally:
            agent.stop()
    return costs


def main() -> None:
    out = Path(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report: dict[str, Any] = {
        "kernel": platform.release(),
        "hook_types": {t: dataclasses.asdict(s) for t, s in probe_hook_types().items()},
        "kernel_features": {
            f: dataclasses.asdict(s) for f, s in probe_kernel_features().items()
        },
        "families": {name: _family(name) for name in REGISTRY},
    }
    try:
        report["hook_costs"] = {COST_HOOK: _hook_costs()}
    except ProbewireError as exc:
        report["hook_costs"] = {COST_HOOK: {"error": str(exc)}}
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
