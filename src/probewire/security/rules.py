"""Rules compiled for the kernel and evaluated in user space.

Each alternative of a rule's match is a *clause* with one bit (up to 64). The exec hook keeps a
clause's bit only if every kernel criterion of it holds (exe_basename, exe_dir, fileless,
stdio_tcp, listening_ancestor, uid, container): a clause without one always keeps it. User
space then checks, only for the clauses whose bit came back set, what the kernel cannot
decide: exe globs, the argv regex, ancestors (from the process tree) and the rule's
exceptions. Clauses with connects_to are checked when a watched connection is recorded, against
the connecting process and its ancestors.

The same criteria are also evaluated wholly in Python (:func:`kernel_criteria_hold`) for
exceptions, for processes seeded from /proc and for the tests that hold the kernel to it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from probewire.config import KERNEL_CRITERIA, SecurityMatch, SecurityRule
from probewire.security.kernel import (
    SEC_EXE_DELETED,
    SEC_EXE_MEMFD,
    SEC_IN_CONTAINER,
    SEC_STDIN_TCP,
    SEC_STDOUT_TCP,
    KernelTables,
    dir_prefix,
    name_key,
)
from probewire.security.tree import Node

__all__ = ["Clause", "Connection", "RuleSet", "basename"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Ancestor lookups: is this pid a network server (listening, per the kernel's map)?
IsListener = Callable[[int], bool]
ServiceOf = Callable[[Node], str]


@dataclass(frozen=True)
class Connection:
    """An outbound TCP connection the kernel reported (a watched destination)."""

    pid: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class Clause:
    """One alternative of one rule, with its criteria compiled."""

    def __init__(self, bit: int, rule: SecurityRule, match: SecurityMatch) -> None:
        self.bit = bit
        self.mask = 1 << bit
        self.rule = rule
        self.match = match
        self.kernel = match.criteria() & set(KERNEL_CRITERIA)
        self.names = {name_key(n) for n in match.exe_basename or ()}
        self.dirs = tuple(dir_prefix(d) for d in match.exe_dir or ())
        self.globs = tuple(match.exe or ())
        self.argv = re.compile(match.argv) if match.argv is not None else None
        self.uids = frozenset(match.uid or ())
        anc = match.ancestor
        self.anc_globs = tuple(anc.exe or ()) if anc else ()
        self.anc_names = {name_key(n) for n in anc.exe_basename or ()} if anc else set()
        self.anc_services = frozenset(anc.service or ()) if anc else frozenset()
        conn = match.connects_to
        self.ports = frozenset(conn.ports) if conn else frozenset()
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(a, strict=False) for a in conn.addresses) if conn else ()
        self.on_connect = conn is not None

    # --- the parts only user space decides ----------------------------------------------------
    def user_criteria_hold(self, node: Node, ancestry: Sequence[Node], service_of: ServiceOf
                           ) -> bool:
        if self.globs and not _glob_matches(self.globs, node):
            return False
        if self.argv is not None and not self.argv.search(" ".join(node.argv)):
            return False
        if self.match.ancestor is not None:
            depth = self.match.ancestor.depth
            if not any(self._ancestor_matches(a, service_of) for a in ancestry[:depth]):
                return False
        return True

    def _ancestor_matches(self, node: Node, service_of: ServiceOf) -> bool:
        if node.evicted and not node.exe:
            return False
        if self.anc_globs and not _glob_matches(self.anc_globs, node):
            return False
        if self.anc_names and not (self.anc_names & names_of(node)):
            return False
        return not self.anc_services or service_of(node) in self.anc_services

    def connection_matches(self, conn: Connection) -> bool:
        if self.ports and conn.port not in self.ports:
            return False
        return not self.networks or any(conn.address in n for n in self.networks
                                        if n.version == conn.address.version)

    # --- the kernel's part, in Python ----------------------------------------------------------
    def kernel_criteria_hold(self, node: Node, ancestry: Sequence[Node],
                             is_listener: IsListener) -> bool:
        """What the exec hook decides, from what the node carries (exceptions, seeded nodes,
        and the tests that compare the two)."""
        m = self.match
        if self.names and not (self.names & names_of(node)):
            return False
        if self.dirs and not any(p.startswith(self.dirs) for p in _paths(node)):
            return False
        if m.fileless and not node.flags & (SEC_EXE_MEMFD | SEC_EXE_DELETED):
            return False
        if m.stdio_tcp and not node.flags & (SEC_STDIN_TCP | SEC_STDOUT_TCP):
            return False
        if m.container is not None and bool(node.flags & SEC_IN_CONTAINER) != m.container:
            return False
        if self.uids and node.euid not in self.uids:
            return False
        if m.listening_ancestor is not None:
            depth = node.listener_depth or listener_depth(ancestry, is_listener,
                                                          m.listening_ancestor)
            if not 1 <= depth <= m.listening_ancestor:
                return False
        return True

    def matches(self, node: Node, ancestry: Sequence[Node], is_listener: IsListener,
                service_of: ServiceOf, conn: Connection | None) -> bool:
        """Every criterion, decided here (used for exceptions). A connects_to criterion holds
        only for a connection being judged."""
        if self.on_connect and (conn is None or not self.connection_matches(conn)):
            return False
        return (self.kernel_criteria_hold(node, ancestry, is_listener)
                and self.user_criteria_hold(node, ancestry, service_of))


def names_of(node: Node) -> set[bytes]:
    """The names exe_basename compares with, as the kernel does: the comm (the basename exec
    gave the process) and the basename of the resolved image."""
    out = {name_key(node.comm)} if node.comm else set()
    if node.exe:
        out.add(name_key(basename(node.exe)))
    return out


def _paths(node: Node) -> list[str]:
    return [p for p in (node.exe, node.filename) if p.startswith("/")]


def _glob_matches(globs: Sequence[str], node: Node) -> bool:
    paths = [p for p in (node.exe, node.filename) if p]
    return any(fnmatch.fnmatchcase(p, g) for p in paths for g in globs)


def listener_depth(ancestry: Sequence[Node], is_listener: IsListener, limit: int) -> int:
    for depth, node in enumerate(ancestry[:limit], start=1):
        if node.pid > 1 and not node.exited and is_listener(node.pid):
            return depth
    return 0


class RuleSet:
    """The effective rules (config.security.effective_rules()) as clauses."""

    def __init__(self, rules: Sequence[SecurityRule]) -> None:
        self.rules = {r.id: r for r in rules}
        self.clauses: list[Clause] = []
        self.exceptions: dict[str, list[Clause]] = {}
        for rule in rules:
            for alt in rule.alternatives:
                self.clauses.append(Clause(len(self.clauses), rule, alt))
            # Exceptions are never sent to the kernel: their bits are only for Clause's shape.
            self.exceptions[rule.id] = [Clause(0, rule, e) for e in rule.except_]
        self.exec_clauses = [c for c in self.clauses if not c.on_connect]
        self.connect_clauses = [c for c in self.clauses if c.on_connect]

    def clauses_of(self, rule_id: str) -> list[Clause]:
        return [c for c in self.clauses if c.rule.id == rule_id]

    def excepted(self, rule_id: str, node: Node, ancestry: Sequence[Node],
                 is_listener: IsListener, service_of: ServiceOf,
                 conn: Connection | None = None) -> bool:
        return any(e.matches(node, ancestry, is_listener, service_of, conn)
                   for e in self.exceptions.get(rule_id, ()))

    def kernel_tables(self) -> KernelTables:
        t = KernelTables()
        cfg = t.config[0]
        for c in self.clauses:
            t.add_bit("clauses", c.bit)
            m = c.match
            for name in c.names:
                t.names[name] = t.names.get(name, 0) | c.mask
            if c.names:
                t.add_bit("need_name", c.bit)
            for prefix in c.dirs:
                t.prefixes[prefix] = t.prefixes.get(prefix, 0) | c.mask
            if c.dirs:
                t.add_bit("need_prefix", c.bit)
            if m.fileless:
                t.add_bit("need_fileless", c.bit)
            if m.stdio_tcp:
                t.add_bit("need_stdio_tcp", c.bit)
            for uid in c.uids:
                t.uids[uid] = t.uids.get(uid, 0) | c.mask
            if c.uids:
                t.add_bit("need_uid", c.bit)
            if m.container is True:
                t.add_bit("need_container", c.bit)
            elif m.container is False:
                t.add_bit("need_host", c.bit)
            if m.listening_ancestor is not None:
                t.add_bit("need_listener", c.bit)
                for d in range(1, m.listening_ancestor + 1):
                    cfg["listener_within"][d] |= c.mask
                cfg["listener_depth"] = max(int(cfg["listener_depth"]), m.listening_ancestor)
            if c.rule.action == "kill":
                t.add_bit("kill", c.bit)
            if c.kernel:
                t.add_bit("gated", c.bit)
            t.ports |= c.ports
            t.networks.extend(n for n in c.networks if not c.ports)
        cfg["watch_connects"] = int(bool(t.ports or t.networks))
        return t

    def describe(self) -> list[dict[str, object]]:
        """The rules as the API shows them: what the kernel decides and what user space does."""
        out: list[dict[str, object]] = []
        for rule in self.rules.values():
            clauses = self.clauses_of(rule.id)
            out.append({
                "id": rule.id, "severity": rule.severity, "description": rule.description,
                "action": rule.action,
                "match": [c.match.model_dump(exclude_none=True) for c in clauses],
                "except": [e.model_dump(exclude_none=True) for e in rule.except_],
                "kernel_criteria": sorted({k for c in clauses for k in c.kernel}),
            })
        return out
