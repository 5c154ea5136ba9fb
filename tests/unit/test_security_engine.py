"""Rules compiled for the kernel (the tables the exec hook reads) and the engine's user-space
half, fed with records as the kernel writes them (no root needed). The kernel's half is held
to the same rules in tests/bpf/test_security.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probewire.config import config_from_mapping
from probewire.enrich.service import ServiceResolver
from probewire.probes.process import PROCESS_EVENT, ProcessEvent
from probewire.security.engine import SecurityEngine
from probewire.security.kernel import (
    PROCESS_CONNECT,
    PROCESS_EXEC,
    PROCESS_EXIT,
    PROCESS_FORK,
    SEC_CHECKED,
    SEC_STDIN_TCP,
    name_key,
)
from probewire.security.redact import Redactor
from probewire.security.rules import RuleSet
from probewire.security.tree import NS_PER_TICK


def ruleset(data: dict[str, Any] | None = None) -> RuleSet:
    return RuleSet(config_from_mapping(data or {}).security.effective_rules())


def test_default_rules_compile_to_the_kernel_tables() -> None:
    rs = ruleset()
    t = rs.kernel_tables()
    cfg = t.config[0]
    bit = {c.rule.id: c.mask for c in rs.clauses if c.rule.id != "crypto_miner"}
    miner = [c for c in rs.clauses if c.rule.id == "crypto_miner"]
    assert len(rs.clauses) == 9 and len(miner) == 3
    assert int(cfg["clauses"]) == (1 << 9) - 1
    assert t.names[name_key("bash")] == bit["reverse_shell"] | bit["shell_from_network_server"]
    assert t.names[name_key("nc")] == bit["network_tool_by_service"]
    assert t.names[name_key("xmrig")] == miner[0].mask
    assert t.names[name_key("apt-get")] == bit["package_manager_in_container"]
    assert t.prefixes == {p: bit["exec_from_temp_dir"]
                          for p in ("/tmp/", "/dev/shm/", "/var/tmp/", "/run/user/")}
    assert int(cfg["need_stdio_tcp"]) == bit["reverse_shell"]
    assert int(cfg["need_fileless"]) == bit["fileless_exec"]
    assert int(cfg["need_container"]) == bit["package_manager_in_container"]
    assert int(cfg["listener_within"][1]) == (bit["shell_from_network_server"]
                                              | bit["network_tool_by_service"])
    assert [int(v) for v in cfg["listener_within"][2:5]] == [bit["network_tool_by_service"]] * 3
    assert int(cfg["listener_within"][5]) == 0 and int(cfg["listener_depth"]) == 4
    assert int(cfg["kill"]) == 0  # nothing kills by default
    assert t.ports == {3333, 3357, 5555, 7777, 14433, 14444, 45560, 45700}
    assert int(cfg["watch_connects"]) == 1
    # The argv and connects_to alternatives have no kernel criterion: not gated.
    assert int(cfg["gated"]) == int(cfg["clauses"]) & ~(miner[1].mask | miner[2].mask)


def test_nested_prefixes_carry_every_shorter_prefix_bits_for_the_lpm_lookup() -> None:
    rs = ruleset({"security": {"default_rules": False, "rules": [
        {"id": "opt", "match": {"exe_dir": ["/opt"]}},
        {"id": "opt_app", "match": {"exe_dir": ["/opt/app/"]}, "action": "kill"},
        {"id": "optional", "match": {"exe_dir": ["/optional"]}},
    ]}})
    bits = rs.kernel_tables().prefix_bits()
    assert bits == {"/opt/": 0b001, "/opt/app/": 0b011, "/optional/": 0b100}
    assert int(rs.kernel_tables().config[0]["kill"]) == 0b010


# --- the engine on records --------------------------------------------------------------------

class Feed:
    """Records as the kernel writes them, handed to an engine the way ProcessProbe does."""

    def __init__(self, tmp_path: Path, data: dict[str, Any] | None = None) -> None:
        config = config_from_mapping(data or {})
        proc = tmp_path / "proc"  # an empty /proc: nothing to seed, nothing to adopt
        proc.mkdir()
        self.engine = SecurityEngine(config, ServiceResolver(proc=proc), Redactor(), proc=proc)
        self.rules = self.engine.rules
        # The kernel keeps the bits of clauses without a kernel criterion on every exec.
        self.ungated = sum(c.mask for c in self.rules.clauses if not c.kernel)
        self.clock = 1_000

    def mask(self, rule_id: str, alternative: int = 0) -> int:
        return self.rules.clauses_of(rule_id)[alternative].mask

    def batch(self, *recs: dict[str, Any]) -> None:
        arr = np.zeros(len(recs), PROCESS_EVENT)
        decoded: list[ProcessEvent | None] = []
        for i, r in enumerate(recs):
            self.clock += 1
            for key, value in r.items():
                if key not in ("argv", "service", "start", "comm", "filename", "exe"):
                    arr[i][key] = value
            if r["kind"] == PROCESS_EXEC:
                arr[i]["clauses"] |= np.uint64(self.ungated)
            arr[i]["start_ns"] = r.get("start", r["pid"]) * NS_PER_TICK
            arr[i]["timestamp_ns"] = self.clock
            if r["kind"] == PROCESS_EXEC:
                decoded.append(ProcessEvent(
                    "exec", r["pid"], r["ppid"], 0, self.clock, 0, r.get("comm", ""),
                    r.get("service", "svc"), filename=r.get("filename", r.get("exe", "")),
                    argv=tuple(r.get("argv", ())), exe=r.get("exe", "")))
            else:
                decoded.append(None)
        for i, r in enumerate(recs):  # numpy wants bytes for the S fields
            for key in ("comm", "filename", "exe"):
                if key in r:
                    arr[i][key] = r[key].encode()
        self.engine.on_batch(arr, decoded)

    def alerts(self) -> list[tuple[str, int]]:
        return [(a["rule"], a["process"]["pid"]) for a in self.engine.recent()]


def exec_(pid: int, ppid: int, exe: str, clauses: int, **kw: Any) -> dict[str, Any]:
    comm = kw.pop("comm", exe.rsplit("/", 1)[-1][:15])
    return {"kind": PROCESS_EXEC, "pid": pid, "ppid": ppid, "exe": exe, "comm": comm,
            "clauses": clauses, "sec_flags": SEC_CHECKED | kw.pop("flags", 0), **kw}


def fork(pid: int, ppid: int) -> dict[str, Any]:
    return {"kind": PROCESS_FORK, "pid": pid, "ppid": ppid}


def test_kernel_candidates_become_one_alert_per_rule_and_image(tmp_path: Path) -> None:
    f = Feed(tmp_path)
    shell = f.mask("reverse_shell")
    f.batch(exec_(10, 1, "/usr/bin/python3", 0, argv=["python3"]), fork(11, 10),
            exec_(11, 10, "/usr/bin/dash", shell, comm="sh", flags=SEC_STDIN_TCP,
                  argv=["sh", "-i"]))
    assert f.alerts() == [("reverse_shell", 11)]
    alert = f.engine.recent()[0]
    assert [a["pid"] for a in alert["ancestry"]] == [10]
    assert alert["evidence"]["stdin_tcp"] and alert["evidence"]["kernel_criteria"] == [
        "exe_basename", "stdio_tcp"]
    # A new exec of the same pid is a new image: a new alert.
    f.batch(exec_(11, 10, "/usr/bin/dash", shell, comm="sh", flags=SEC_STDIN_TCP))
    assert len(f.alerts()) == 2
    assert f.engine.alert_counts[("reverse_shell", "critical", "svc")] == 2


def test_user_space_criteria_and_exceptions_are_applied_to_kernel_candidates(
        tmp_path: Path) -> None:
    f = Feed(tmp_path)
    server = f.mask("shell_from_network_server")
    # sshd (a login server, excepted) -> its session -> a shell: no alert.
    f.batch(exec_(20, 1, "/usr/sbin/sshd", 0), fork(21, 20), exec_(21, 20, "/usr/sbin/sshd", 0),
            fork(22, 21), exec_(22, 21, "/usr/bin/bash", server, listener_depth=1))
    assert f.alerts() == []
    # A web server's shell: an alert, tied to the server (the kernel said it listens).
    f.batch(exec_(30, 1, "/usr/bin/python3", 0, service="shop"), fork(31, 30),
            exec_(31, 30, "/usr/bin/dash", server, comm="sh", listener_depth=1, service="dash"))
    assert f.alerts() == [("shell_from_network_server", 31)]
    assert f.engine.recent()[0]["service_name"] == "shop"
    # A candidate bit for an argv-only clause still needs its regex to match in user space.
    argv_clause = f.mask("crypto_miner", 1)
    f.batch(exec_(40, 1, "/usr/bin/curl", argv_clause, argv=["curl", "https://x"]),
            exec_(41, 1, "/opt/m", argv_clause, argv=["m", "-o", "stratum+tcp://p:3333"]))
    assert f.alerts()[-1] == ("crypto_miner", 41) and len(f.alerts()) == 2


def connect(pid: int, port: int, address: str = "203.0.113.9") -> dict[str, Any]:
    ip = ipaddress.ip_address(address)
    raw = ip.packed.ljust(16, b"\0")
    return {"kind": PROCESS_CONNECT, "pid": pid, "ppid": 0, "dport": port,
            "family": 2 if ip.version == 4 else 10, "daddr": np.frombuffer(raw, np.uint8)}


def test_a_connection_is_judged_against_the_process_and_its_ancestors(tmp_path: Path) -> None:
    f = Feed(tmp_path, {"security": {"rules": [
        {"id": "agent_calls_home", "match": {"exe_basename": ["updater"],
                                             "connects_to": {"ports": [8443]}}}]}})
    named = f.mask("agent_calls_home")
    f.batch(exec_(50, 1, "/opt/updater", named), fork(51, 50),
            exec_(51, 50, "/usr/bin/curl", 0), connect(51, 8443))
    (alert,) = f.engine.recent()
    assert alert["rule"] == "agent_calls_home" and alert["process"]["pid"] == 50
    assert alert["evidence"]["connection"] == {"pid": 51, "address": "203.0.113.9",
                                               "port": 8443}
    f.batch(connect(51, 8443), connect(51, 9999))  # once per image; 9999 is not watched
    assert len(f.engine.recent()) == 1
    # The default miner rule: a pool port, but loopback is excepted.
    f.batch(exec_(60, 1, "/usr/bin/python3", 0), connect(60, 3333, "127.0.0.1"))
    assert len(f.engine.recent()) == 1
    f.batch(connect(60, 3333, "198.51.100.1"))
    assert f.alerts()[-1] == ("crypto_miner", 60)


def test_exits_prune_the_tree(tmp_path: Path) -> None:
    f = Feed(tmp_path)
    f.batch(exec_(70, 1, "/bin/a", 0), fork(71, 70), exec_(71, 70, "/bin/b", 0))
    assert len(f.engine.tree) == 2
    f.batch({"kind": PROCESS_EXIT, "pid": 70, "ppid": 1}, {"kind": PROCESS_EXIT, "pid": 71,
                                                            "ppid": 70})
    assert len(f.engine.tree) == 0 and f.engine.tree.ghosts == 0


@pytest.mark.parametrize("rule_id", ["reverse_shell", "fileless_exec", "exec_from_temp_dir"])
def test_python_evaluation_of_kernel_criteria_agrees_on_a_matching_node(
        tmp_path: Path, rule_id: str) -> None:
    from probewire.security.kernel import SEC_EXE_MEMFD, SEC_STDOUT_TCP
    from probewire.security.tree import Node

    nodes = {"reverse_shell": Node(1, 1, exe="/usr/bin/bash", comm="bash",
                                   flags=SEC_STDOUT_TCP),
             "fileless_exec": Node(1, 1, exe="memfd:x", comm="3", flags=SEC_EXE_MEMFD),
             "exec_from_temp_dir": Node(1, 1, exe="/tmp/a/b", comm="b")}
    rs = ruleset()
    (clause,) = rs.clauses_of(rule_id)
    node = nodes[rule_id]
    assert clause.kernel_criteria_hold(node, [], lambda pid: False)
    others = [c for c in rs.clauses if c.rule.id != rule_id and c.kernel]
    assert not any(c.kernel_criteria_hold(node, [], lambda pid: False) for c in others)


def test_python_constants_match_the_enums_in_the_objects_btf() -> None:
    from probewire.runtime.bpf import BpfObject
    from probewire.runtime.objects import object_path
    from probewire.security.kernel import ENUMS, check_enums

    with BpfObject(object_path("process")) as obj:
        check_enums(obj)
        assert {name: obj.enum_values(name) for name in ENUMS} == ENUMS


def test_an_exit_is_visible_only_after_its_batch_was_judged(tmp_path: Path) -> None:
    """The family publishes a batch's events after the rules judged it: whoever sees a server's
    exit (the security tests wait for it) also sees the alerts of its subtree, even when the
    child's exec and the server's exit arrive in one batch."""
    from probewire.probes.base import ProbeContext
    from probewire.probes.process import ProcessProbe

    feed = Feed(tmp_path)
    probe = ProcessProbe(ProbeContext(config_from_mapping({}), feed.engine.services))
    probe.security = feed.engine
    tool = feed.mask("network_tool_by_service")
    seen_at_alert: list[bool] = []
    feed.engine.on_alert.append(
        lambda alert: seen_at_alert.append(any(e.pid == 20 for e in probe.events("exit"))))
    captured: list[tuple[np.ndarray, list[ProcessEvent | None]]] = []
    judge = feed.engine.on_batch
    feed.engine.on_batch = lambda recs, dec: captured.append((recs, list(dec)))  # type: ignore
    feed.batch(exec_(20, 1, "/usr/bin/python3", 0, argv=["python3", "server.py"]),
               fork(21, 20),
               exec_(21, 20, "/usr/bin/nc.openbsd", tool, comm="nc", listener_depth=1,
                     argv=["nc", "-z", "127.0.0.1", "80"]),
               {"kind": PROCESS_EXIT, "pid": 21, "ppid": 20},
               {"kind": PROCESS_EXIT, "pid": 20, "ppid": 1})
    feed.engine.on_batch = judge  # type: ignore[method-assign]
    (records, _), = captured
    probe.on_batch(records)
    assert [(a["rule"], a["process"]["pid"]) for a in feed.engine.recent()] == [
        ("network_tool_by_service", 21)]
    assert seen_at_alert == [False]
    assert any(e.pid == 20 for e in probe.events("exit"))
