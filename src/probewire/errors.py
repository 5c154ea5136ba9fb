"""One error family; each message says what failed and how to fix it.

Exit codes follow DESIGN.md: 2 bad usage or config, 3 missing privilege or kernel feature.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PRIVILEGE = 3


class ProbewireError(Exception):
    """Base of every error the agent reports to a user."""

    exit_code: int = 1


class ConfigError(ProbewireError):
    """The configuration file or a command-line value is malformed."""

    exit_code = EXIT_USAGE


class PrivilegeError(ProbewireError):
    """The agent lacks a privilege it needs (root or CAP_BPF/CAP_PERFMON)."""

    exit_code = EXIT_PRIVILEGE


class KernelFeatureError(ProbewireError):
    """The running kernel lacks a feature a probe needs."""

    exit_code = EXIT_PRIVILEGE


class BpfError(ProbewireError):
    """A libbpf call failed (open, load, attach, map access)."""

    exit_code = EXIT_PRIVILEGE
