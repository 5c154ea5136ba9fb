"""Security rules against real attacks on this host: each raises exactly one alert under the
right rule; a benign workload of thousands of execs raises none; a kill rule stops only its
exec. Assertions are scoped to each test's own process subtree (other work on the host runs
under the same agent).

Needs: tp_btf (or tp) sched_process_exec/exit/fork (or task_newtask) and inet_sock_set_state,
bpf_send_signal from a tracing program, ring buffers; nc (netcat-openbsd), gcc, make.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import free_port, running_agent, scrape, total, wait_for

from probewire.agent import Agent
from probewire.probes.base import Probe
from probewire.probes.process import ProcessProbe
from probewire.security.engine import SecurityEngine
from probewire.security.kernel import SEC_EXE_MEMFD
from probewire.security.tree import Node
from support.attacks import write_scripts

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "test-output" / "security"
CONNECT_PORT = free_port()


class Env:
    def __init__(self, agent: Agent, listen: str, scripts: dict[str, Path],
                 alert_log: Path) -> None:
        self.agent = agent
        self.listen = listen
        self.scripts = scripts
        self.alert_log = alert_log
        probe = agent.probes["process"]
        assert isinstance(probe, ProcessProbe) and probe.security is not None
        self.probe: ProcessProbe = probe
        self.engine: SecurityEngine = probe.security
        # The kernel's clause bits against the same criteria evaluated in Python, for every
        # exec the module sees (the listener walk aside: it depends on the moment).
        self.compared = 0
        self.disagreements: list[str] = []
        self._clauses = [c for c in self.engine.rules.clauses
                         if c.kernel and c.match.listening_ancestor is None]
        self.engine.on_exec.append(self._compare)

    def _compare(self, node: Node) -> None:
        self.compared += 1
        for c in self._clauses:
            kernel = bool((node.clauses or 0) & c.mask)
            python = c.kernel_criteria_hold(node, [], lambda pid: False)
            if kernel != python:
                self.disagreements.append(f"{c.rule.id}: kernel {kernel}, python {python}: "
                                          f"{node.exe} {node.comm} {node.flags:#x}")

    def exited(self, pid: int) -> bool:
        return any(e.pid == pid for e in self.probe.events("exit"))

    def run(self, argv: list[str], timeout_s: float = 120.0, on_start: Any = None
            ) -> tuple[int, subprocess.CompletedProcess[str]]:
        """Run a helper; return its pid once the agent has seen it exit (so every record of
        its subtree has been judged: records are handled in ring order)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if on_start is not None:
            on_start(proc.pid)
        out, err = proc.communicate(timeout=timeout_s)
        assert wait_for(lambda: self.exited(proc.pid), 20), f"exit of {proc.pid} not seen"
        return proc.pid, subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def script(self, name: str, *args: str, **kw: Any
               ) -> tuple[int, subprocess.CompletedProcess[str]]:
        return self.run([sys.executable, str(self.scripts[name]), *args], **kw)

    def subtree_alerts(self, root: int) -> list[dict[str, Any]]:
        return [a for a in self.engine.recent()
                if a["process"]["pid"] == root or any(x["pid"] == root for x in a["ancestry"])]


# Every hook's fallback too (tp/ and task_newtask for kernels without tp_btf, field reads by
# bpf_probe_read_kernel for kernels before 6.2): the same attacks, the same single alerts.
FALLBACKS = {h.name: "tp" for h in ProcessProbe.hooks}


@pytest.fixture(scope="module", params=["tp_btf", "tp_probe_reads"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    fallback = request.param == "tp_probe_reads"
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    scripts = write_scripts(WORK)
    alert_log = WORK / "alerts.jsonl"
    config = {
        "probes": {"l7": {"enabled": False}, "tcp": {"enabled": False},
                   "saturation": {"enabled": False}},
        "security": {
            "alert_log": str(alert_log),
            "rules": [
                {"id": "kill_victim", "severity": "critical", "action": "kill",
                 "description": "the test's kill target",
                 "match": {"exe_basename": ["pw-victim"]}},
                {"id": "lineage", "severity": "info", "description": "the lineage probe",
                 "match": {"exe_basename": ["pw-lineage"]}},
                {"id": "long_name", "severity": "info", "description": "a 20-byte name",
                 "match": {"exe_basename": ["pw-long-name-xyz-abc"]}},
                {"id": "parent_connects", "severity": "low",
                 "description": "pw-parent or a descendant connects to the watched port",
                 "match": {"exe_basename": ["pw-parent"],
                           "connects_to": {"ports": [CONNECT_PORT]}}},
            ],
        },
    }
    with pytest.MonkeyPatch.context() as mp:
        if fallback:
            mp.setattr(Probe, "kfuncs", False)
        with running_agent(config, forced_hooks=FALLBACKS if fallback else None) as (agent,
                                                                                    listen):
            if fallback:
                assert {s.section.split("/")[0] for s in agent.status()} == {"tp"}
            env = Env(agent, listen, scripts, alert_log)
            assert env.engine.seeded.wait(60)
            yield env


def only_alert(env: Env, root: int) -> dict[str, Any]:
    alerts = env.subtree_alerts(root)
    assert len(alerts) == 1, [(a["rule"], a["process"]["argv"]) for a in alerts]
    return alerts[0]


def test_reverse_shell_raises_one_reverse_shell_alert(env: Env) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        got: list[bytes] = []

        def attacker() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"echo pwned-$((6*7))\nexit\n")
                conn.settimeout(20)
                while chunk := conn.recv(4096):
                    got.append(chunk)

        t = threading.Thread(target=attacker)
        t.start()
        root, _ = env.script("reverse_shell", str(port))
        t.join(30)
    assert b"pwned-42" in b"".join(got)  # the shell really ran what came over the socket
    alert = only_alert(env, root)
    assert alert["rule"] == "reverse_shell" and alert["severity"] == "critical"
    assert alert["process"]["comm"] == "sh" and alert["process"]["argv"] == ["sh", "-i"]
    assert alert["evidence"]["stdin_tcp"] and alert["evidence"]["stdout_tcp"]
    assert alert["ancestry"][0]["pid"] == root


def _vuln_server(env: Env) -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen([sys.executable, str(env.scripts["vuln_server"])],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server, int(server.stdout.readline())


def _stop(server: subprocess.Popen[str], env: Env) -> None:
    server.terminate()
    server.wait(10)
    assert wait_for(lambda: env.exited(server.pid), 20)


def test_shell_from_a_python_http_server_raises_one_alert_tied_to_the_server(env: Env) -> None:
    server, port = _vuln_server(env)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/run?echo%20injected",
                                    timeout=20) as resp:
            assert resp.read() == b"injected\n"
    finally:
        _stop(server, env)
    alert = only_alert(env, server.pid)
    assert alert["rule"] == "shell_from_network_server"
    assert alert["process"]["argv"] == ["/bin/sh", "-c", "echo injected"]
    assert alert["evidence"]["listener_depth"] == 1
    assert alert["ancestry"][0]["pid"] == server.pid
    # The alert belongs to the service that spawned the shell, not to "dash".
    assert alert["service_name"] == "vuln_server"


def test_netcat_started_by_a_service_raises_one_alert(env: Env) -> None:
    server, port = _vuln_server(env)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/probe?{port}", timeout=20) as r:
            r.read()
    finally:
        _stop(server, env)
    alert = only_alert(env, server.pid)
    assert alert["rule"] == "network_tool_by_service"
    assert alert["process"]["comm"] == "nc" and alert["process"]["exe"].endswith("nc.openbsd")
    assert alert["service_name"] == "vuln_server"


def test_binary_copied_into_tmp_and_run_raises_one_alert(env: Env) -> None:
    root, done = env.script("dropped_binary")
    assert done.returncode == 0, done.stderr
    alert = only_alert(env, root)
    assert alert["rule"] == "exec_from_temp_dir"
    assert alert["process"]["exe"].startswith("/tmp/pw-sec-")
    assert alert["process"]["exe"].endswith("/dropped")


def test_memfd_exec_raises_one_fileless_alert(env: Env) -> None:
    root, done = env.script("memfd_exec")
    assert done.returncode == 0, done.stderr
    alert = only_alert(env, root)
    assert alert["rule"] == "fileless_exec"
    assert alert["process"]["pid"] == root  # the helper itself became the memfd image
    assert alert["process"]["exe"] == "memfd:pw-fileless"
    assert alert["evidence"]["exe_memfd"]
    node = env.engine.tree.get(root)
    assert node is None or node.flags & SEC_EXE_MEMFD


def test_miner_named_binary_with_stratum_url_raises_one_alert_with_redacted_argv(
        env: Env) -> None:
    miner = WORK / "xmrig"
    root, done = env.script("miner", str(miner))
    assert done.returncode == 0, done.stderr
    alert = only_alert(env, root)
    assert alert["rule"] == "crypto_miner"
    assert alert["process"]["argv"] == [str(miner), "-o", "stratum+tcp://pool.example.com:3333",
                                        "-u", "wallet", "-p", "***"]
    # The events API's copy is redacted too, and so is the JSON line.
    execs = [e for e in env.probe.events("exec") if e.pid == alert["process"]["pid"]]
    assert execs and execs[-1].argv[-1] == "***"
    sink = env.engine.sinks[0]
    sink.flush()  # type: ignore[attr-defined]
    lines = [json.loads(line) for line in env.alert_log.read_text().splitlines()]
    mine = [line for line in lines if line["id"] == alert["id"]]
    assert len(mine) == 1 and mine[0]["process"]["argv"][-1] == "***"
    assert "x" not in mine[0]["process"]["argv"][-1]


def test_benign_workload_of_thousands_of_execs_raises_no_alert(env: Env) -> None:
    roots: set[int] = set()
    execs = [0]

    def count(events: list[Any]) -> None:
        # The subtree's execs: by parent, in ring order (the engine has put the batch in the
        # tree already, so a parent that never exec'd is found there).
        for ev in events:
            if ev.kind != "exec":
                continue
            if ev.pid not in roots and ev.ppid not in roots:
                # A parent that forked without exec (a subshell): the tree knows its line.
                parent = env.engine.tree.get(ev.ppid)
                chain = [parent, *env.engine.tree.ancestry(parent)] if parent else []
                if not any(n.pid in roots for n in chain):
                    continue
            roots.update((ev.pid, ev.ppid))
            execs[0] += 1

    env.probe.subscribers.append(count)
    try:
        root, done = env.script("benign", str(env.scripts["build"]), timeout_s=600,
                                on_start=roots.add)
    finally:
        env.probe.subscribers.remove(count)
    assert done.returncode == 0, done.stderr
    assert execs[0] >= 2000
    assert env.subtree_alerts(root) == []


def test_kill_rule_stops_only_the_matched_exec(env: Env) -> None:
    victim = WORK / "pw-victim"
    shutil.copy("/bin/sh", victim)
    marker, other = WORK / "victim.marker", WORK / "other.marker"
    marker.unlink(missing_ok=True)
    other.unlink(missing_ok=True)
    kills_before = total(scrape(env.listen), "probewire_security_kills_total", rule="kill_victim")
    root, done = env.script("kill_victim", str(victim), str(marker), str(other))
    killed, other_rc, trues_failed, trues = done.stdout.split()
    assert int(killed) == -9  # SIGKILL
    assert not marker.exists()  # the victim never ran a single instruction of its own
    assert int(other_rc) == 0 and other.read_text() == "ran\n"
    assert int(trues_failed) == 0 and int(trues) == 50
    alert = only_alert(env, root)
    assert alert["rule"] == "kill_victim" and alert["action"] == "killed"
    assert wait_for(lambda: total(scrape(env.listen), "probewire_security_kills_total",
                                  rule="kill_victim") == kills_before + 1)
    (exit_ev,) = [e for e in env.probe.events("exit") if e.pid == alert["process"]["pid"]]
    assert exit_ev.exit_signal == 9


def test_connection_by_a_descendant_alerts_on_the_ancestor_the_rule_names(env: Env) -> None:
    parent = WORK / "pw-parent"
    shutil.copy("/bin/sh", parent)
    with socket.create_server(("127.0.0.1", CONNECT_PORT)) as listener:
        root, done = env.run([str(parent), "-c", f"{sys.executable} "
                              f"{env.scripts['connector']} {CONNECT_PORT}; exit 0"])
        conn, _ = listener.accept()
        conn.close()
    assert done.returncode == 0, done.stderr
    alert = only_alert(env, root)
    assert alert["rule"] == "parent_connects"
    assert alert["process"]["pid"] == root  # the ancestor the rule is about...
    connection = alert["evidence"]["connection"]
    assert connection["port"] == CONNECT_PORT and connection["address"] == "127.0.0.1"
    assert connection["pid"] != root  # ...caught by its child's connection


def test_ancestry_keeps_a_parent_that_exited_before_its_child_ran(env: Env) -> None:
    lineage = WORK / "pw-lineage"
    shutil.copy("/bin/true", lineage)
    # The outer shell exits at once; its backgrounded subshell (a fork that never execs: the
    # trailing `true` keeps dash from exec'ing pw-lineage in its place) runs pw-lineage
    # later, when the kernel has long reparented it to a subreaper.
    script = f"(sleep 0.3; {lineage}; true) & exit 0"
    root, _ = env.run([sys.executable, "-c",
                       f"import subprocess; subprocess.run(['/bin/sh', '-c', {script!r}])"])
    assert wait_for(lambda: any(a["rule"] == "lineage" for a in env.subtree_alerts(root)), 20)
    alert = only_alert(env, root)
    subshell, outer, helper = alert["ancestry"][:3]
    assert subshell["comm"] == "sh" and not subshell["exited"]
    assert outer["comm"] == "sh" and outer["exited"]  # gone, but kept for its child
    assert outer["argv"] == ["/bin/sh", "-c", script]
    assert helper["pid"] == root and helper["exited"]
    assert alert["ancestry"][3]["pid"] == os.getpid()


def test_execs_carry_the_image_path_the_kernel_resolved(env: Env) -> None:
    build = env.scripts["build"]
    subprocess.run(["make", "-s", "-C", str(build)], check=True)
    root, done = env.run(["/bin/sh", "-c", "cd " + str(build) + " && ./prog > /dev/null"])
    assert done.returncode == 0
    execs = {e.pid: e for e in env.probe.events("exec")}
    (shell,) = [e for e in execs.values() if e.pid == root]
    assert shell.filename == "/bin/sh" and shell.exe == "/usr/bin/dash"  # through symlinks
    (prog,) = [e for e in execs.values() if e.ppid == root and e.comm == "prog"]
    assert prog.filename == "./prog" and prog.exe == str(build / "prog")  # a relative exec


def test_a_name_matches_the_resolved_image_through_a_symlink_on_its_first_15_bytes(
        env: Env) -> None:
    target = WORK / "pw-long-name-xyz-abc"
    alias = WORK / "pw-alias"
    shutil.copy("/bin/true", target)
    alias.unlink(missing_ok=True)
    alias.symlink_to(target)
    # comm is "pw-alias": only the image's own basename (first 15 bytes) can match.
    root, done = env.run([sys.executable, "-c",
                          f"import subprocess; subprocess.run([{str(alias)!r}])"])
    assert done.returncode == 0
    alert = only_alert(env, root)
    assert alert["rule"] == "long_name" and alert["process"]["comm"] == "pw-alias"
    assert alert["process"]["exe"] == str(target)


PODMAN = ["podman", "run", "--rm", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
          "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
          "--rootfs", "/:O"]  # DESIGN §3: no registry here; the host's root, overlaid


def test_package_manager_in_a_real_container_raises_one_alert_naming_it(env: Env) -> None:
    root, done = env.run([*PODMAN, "dpkg", "--version"], timeout_s=180)
    assert done.returncode == 0, done.stderr
    assert "package management program" in done.stdout
    alert = only_alert(env, root)  # runc's own memfd re-exec is excepted: no fileless alert
    assert alert["rule"] == "package_manager_in_container"
    assert alert["process"]["exe"] == "/usr/bin/dpkg" and alert["in_container"]
    # dpkg is gone from /proc by now; the container is named from the kernel's cgroup id.
    assert alert["container_id"] and len(alert["container_id"]) == 64
    assert "conmon" in [a.get("comm") for a in alert["ancestry"]]


def test_kernel_and_python_agree_on_every_exec_seen(env: Env) -> None:
    """Runs last in the module: every exec the tests above made (and the host's own)."""
    assert env.compared >= 2000
    assert env.disagreements == []
