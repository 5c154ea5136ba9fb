"""The default rule set and the default secret-redaction list, as plain data.

Each rule is documented (rationale and known false positives) in docs/security.md; the ids are a
contract (metrics, alert rules and dashboards name them). config.py validates these dicts
through the same model as user rules, so a default can never be a rule a user could not write.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_RULES",
    "DEFAULT_RULE_IDS",
    "REDACT_FLAGS",
    "TEMP_DIRS",
]

SHELLS = ["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "tcsh", "csh"]
TEMP_DIRS = ["/tmp", "/dev/shm", "/var/tmp", "/run/user"]
# Remote-login servers listen and start shells by design.
LOGIN_SERVERS = ["sshd", "sshd-session", "dropbear", "in.telnetd", "telnetd", "login"]
MINER_NAMES = [
    "xmrig", "xmr-stak", "xmr-stak-cpu", "minerd", "cpuminer", "cpuminer-multi", "ccminer",
    "ethminer", "nbminer", "t-rex", "lolminer", "phoenixminer", "nanominer", "teamredminer",
    "gminer", "srbminer", "srbminer-multi", "kawpowminer", "bminer", "cgminer", "bfgminer",
    "kdevtmpfsi", "kinsing",
]
# Stratum ports the big public pools publish (minexmr, supportxmr, nanopool, ...).
POOL_PORTS = [3333, 3357, 5555, 7777, 14433, 14444, 45560, 45700]
NETWORK_TOOLS = ["nc", "ncat", "netcat", "nc.openbsd", "nc.traditional", "socat", "nmap",
                 "masscan", "zmap"]
PACKAGE_MANAGERS = ["apt", "apt-get", "aptitude", "dpkg", "yum", "dnf", "microdnf", "rpm",
                    "zypper", "apk", "pip", "pip3", "npm", "gem"]

DEFAULT_RULES: list[dict[str, Any]] = [
    {
        "id": "reverse_shell",
        "severity": "critical",
        "description": "a shell whose stdin or stdout is a TCP socket: whoever is at the other "
                       "end of the connection types into it",
        "match": {"exe_basename": SHELLS, "stdio_tcp": True},
    },
    {
        "id": "shell_from_network_server",
        "severity": "critical",
        "description": "a shell started by a process that listens on a TCP port (command "
                       "injection, a web shell)",
        "match": {"exe_basename": SHELLS, "listening_ancestor": 1},
        "except": [{"ancestor": {"exe_basename": LOGIN_SERVERS, "depth": 3}}],
    },
    {
        "id": "exec_from_temp_dir",
        "severity": "high",
        "description": "a program run from a temporary, world-writable directory (a dropped "
                       "binary or script)",
        "match": {"exe_dir": TEMP_DIRS},
    },
    {
        "id": "fileless_exec",
        "severity": "critical",
        "description": "a program run from memory (memfd_create) or from a file already deleted",
        "match": {"fileless": True},
        # runc re-executes itself from a sealed memfd copy (its CVE-2019-5736 mitigation).
        "except": [{"exe": ["memfd:runc_cloned:/proc/self/exe"], "argv": "^runc init$"}],
    },
    {
        "id": "crypto_miner",
        "severity": "critical",
        "description": "a known miner, a stratum pool URL in the arguments, or a connection to "
                       "a mining pool port",
        "match": [
            {"exe_basename": MINER_NAMES},
            {"argv": r"stratum\+(?:tcp|ssl|tls|ws|wss)://"},
            {"connects_to": {"ports": POOL_PORTS}},
        ],
        "except": [{"connects_to": {"addresses": ["127.0.0.0/8", "::1/128"]}}],
    },
    {
        "id": "network_tool_by_service",
        "severity": "high",
        "description": "netcat, socat or a port scanner started inside a network server's "
                       "process tree",
        "match": {"exe_basename": NETWORK_TOOLS, "listening_ancestor": 4},
        "except": [{"ancestor": {"exe_basename": LOGIN_SERVERS, "depth": 8}}],
    },
    {
        "id": "package_manager_in_container",
        "severity": "medium",
        "description": "a package manager run inside a running container (containers are "
                       "meant to be immutable)",
        "match": {"exe_basename": PACKAGE_MANAGERS, "container": True},
    },
]

DEFAULT_RULE_IDS: tuple[str, ...] = tuple(rule["id"] for rule in DEFAULT_RULES)

# Flags whose next argument (or `=value`) is a secret. docs/security.md lists the patterns.
REDACT_FLAGS = [
    "-p", "--password", "--passwd", "--pass", "--token", "--secret", "--api-key", "--apikey",
    "--access-token", "--auth-token", "--client-secret", "--secret-key", "--access-key",
]
