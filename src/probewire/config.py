"""Agent configuration: pydantic models that are the one source of truth for keys and defaults.

Every field has a default, so an empty or absent file is a valid configuration. Unknown keys are
errors (``extra="forbid"`` on every model): a typo such as ``probes.tcpp`` must not silently turn
into "use the default". Every failure surfaces as :class:`~probewire.errors.ConfigError` whose
message names the file, the dotted field path and the fix.
"""

from __future__ import annotations

import ipaddress
import itertools
import mmap
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from probewire.errors import ConfigError

__all__ = [
    "Config",
    "CustomProbeConfig",
    "CustomProbes",
    "ExportConfig",
    "FilterConfig",
    "OtlpConfig",
    "ProbeToggle",
    "ProbesConfig",
    "RingConfig",
    "ServiceRule",
    "ServicesConfig",
    "config_from_mapping",
    "load_config",
    "parse_listen",
]

DEFAULT_LISTEN = "127.0.0.1:9464"
MAX_PORT = 65535
# The kernel truncates a task's comm to TASK_COMM_LEN - 1 = 15 bytes, so a longer exact comm
# matcher could never match anything.
MAX_COMM_BYTES = 15
# BPF_MAP_TYPE_RINGBUF wants max_entries to be a power of two and a multiple of the page size;
# a power of two >= the page size is both. mmap.PAGESIZE is 4096 on x86-64 but 16/64 KiB on
# some arm64 kernels, where a 4096-byte ring would fail at load time instead of here.
MIN_RING_BYTES = max(4096, mmap.PAGESIZE)


class _Model(BaseModel):
    # frozen: the agent wires one Config through every stage; nobody may change it underneath
    # the others (build a new one with config_from_mapping instead).
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_listen(value: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port``; raises ValueError with a fix, for pydantic."""
    text = value.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise ValueError(f"{value!r} is not [IPv6]:port; write it like [::1]:9464")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} inside brackets is not an IPv6 address; write it like [::1]:9464"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} has no port; write host:port, e.g. {DEFAULT_LISTEN}")
        if ":" in host:
            raise ValueError(
                f"{value!r} looks like a bare IPv6 address; put it in brackets, e.g. [::1]:9464"
            )
    if not host or any(c.isspace() for c in host):
        raise ValueError(
            f"{value!r} has an empty or blank host; write host:port, e.g. {DEFAULT_LISTEN} "
            "(use 0.0.0.0 or [::] to listen on every address)"
        )
    if not port_text.isdigit() or not 1 <= int(port_text) <= MAX_PORT:
        raise ValueError(f"port {port_text!r} in {value!r} must be an integer 1..{MAX_PORT}")
    return host, int(port_text)


def parse_listen(value: str) -> tuple[str, int]:
    """Split a listen address into ``(host, port)``; IPv6 hosts come back without brackets.

    Raises ConfigError, so the CLI can use it directly on ``--listen``.
    """
    try:
        return _split_listen(value)
    except ValueError as exc:
        raise ConfigError(f"listen: {exc}") from None


class ProbeToggle(_Model):
    """Switch for one probe family."""

    enabled: bool = Field(default=True, description="true or false")


class HttpConfig(_Model):
    """HTTP/1.x golden signals."""

    enabled: bool = Field(default=True, description="true or false")
    routes: tuple[str, ...] = Field(
        default=(),
        description="route patterns tried before the heuristics, e.g. /users/{id} or "
        "/static/{*path}",
    )
    tls: bool = Field(
        default=True,
        description="capture HTTPS plaintext through uprobes on OpenSSL's libssl",
    )
    trace_agent: bool = Field(
        default=False,
        description="also trace the agent's own HTTP traffic (its /metrics scrapes)",
    )
    max_series_per_metric: int = Field(
        default=2000,
        ge=10,
        strict=True,
        description="label sets one HTTP metric may hold; more go to http_route=\"other\"",
    )
    kernel_aggregation: bool = Field(
        default=True,
        description="count exchanges of known routes in kernel maps instead of sending each "
        "one to user space (forced off while export.otlp.traces needs every exchange)",
    )
    kernel_keys: int = Field(
        default=16384,
        ge=16,
        le=1 << 20,
        strict=True,
        description="label-ish keys the kernel aggregation map holds; an exchange that "
        "finds it full is sent to user space instead (never lost)",
    )

    @field_validator("routes")
    @classmethod
    def _routes_valid(cls, routes: tuple[str, ...]) -> tuple[str, ...]:
        from probewire.aggregate.routes import validate_route_pattern

        return tuple(validate_route_pattern(r) for r in routes)


# --- custom probes (probes.custom) ---------------------------------------------------------------
# The schema's names are a contract (README "Custom probes"); limits mirror bpf/custom.h.

CUSTOM_TYPES = ("u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "f32", "f64", "bool", "str")
CUSTOM_MAX_LABELS = 8
CUSTOM_MAX_VALUES = 4
CUSTOM_MAX_OFFSETS = 4
CUSTOM_MAX_BOUNDS = 16
# Bytes of label values one kernel key holds: an integer label takes 8, a str its max_len.
CUSTOM_LABEL_BYTES = 64
CUSTOM_STR_DEFAULT_BYTES = 32
# Integer argument registers: x86-64 System V (rdi, rsi, rdx, rcx, r8, r9), Go's register ABI
# (rax, rbx, rcx, rdi, rsi, r8, r9, r10, r11), and USDT's at most 12 operands (sys/sdt.h).
CUSTOM_ARG_REGISTERS = {
    "sysv": ("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
    "go": ("rax", "rbx", "rcx", "rdi", "rsi", "r8", "r9", "r10", "r11"),
}
CUSTOM_USDT_MAX_ARGS = 12
CUSTOM_DURATION_BUCKETS = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5,
                           1.0, 5.0, 10.0)
_METRIC_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESULT_TEST = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*([-+]?(?:0[xX][0-9a-fA-F]+|\d+))\s*$")
_PY_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_<][\w.<>]*$")
_RESERVED_LABELS = ("service_name", "result", "le")


def _metric_name(name: str, what: str) -> str:
    if not _METRIC_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid {what}; use letters, digits and underscores, not starting "
            "with a digit, e.g. payments"
        )
    return name


class CustomTarget(_Model):
    """Which processes a custom probe attaches to: exactly one matcher."""

    exe: str | None = Field(
        default=None, description="a glob (fnmatch) on the executable path, e.g. */payd"
    )
    service: str | None = Field(default=None, description="a service name, e.g. payments")
    comm: str | None = Field(
        default=None, description=f"the exact process comm (at most {MAX_COMM_BYTES} bytes)"
    )
    pids: tuple[_Pid, ...] = Field(default=(), description="a list of process ids, e.g. [1234]")

    @model_validator(mode="after")
    def _one_matcher(self) -> CustomTarget:
        given = [k for k in ("exe", "service", "comm") if getattr(self, k) is not None]
        given += ["pids"] if self.pids else []
        blank = [k for k in ("exe", "service", "comm")
                 if getattr(self, k) is not None and not str(getattr(self, k)).strip()]
        if blank or not given:
            raise ValueError(
                "empty target; give one of exe (a glob such as \"*/payd\"), service, comm or "
                "pids (a non-empty list)"
            )
        if len(given) > 1:
            raise ValueError(f"target has {' and '.join(given)}; give exactly one of them")
        if self.comm is not None and len(self.comm.encode()) > MAX_COMM_BYTES:
            raise ValueError(f"comm {self.comm!r} is longer than {MAX_COMM_BYTES} bytes and can "
                             "never match (the kernel truncates comm); use exe instead")
        return self


class CustomField(_Model):
    """One argument read: a register, or through a chain of offsets from it."""

    name: str = Field(description="the label or metric suffix, e.g. currency")
    arg: int = Field(strict=True, ge=0, description="the argument index, 0 for the first")
    type: str = Field(description=f"one of {', '.join(CUSTOM_TYPES)}")
    offsets: tuple[int, ...] = Field(
        default=(), max_length=CUSTOM_MAX_OFFSETS,
        description="byte offsets: every one but the last dereferences a pointer, the last "
        "reads the value, e.g. [8]",
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in CUSTOM_TYPES:
            raise ValueError(f"unknown type {value!r}; use one of {', '.join(CUSTOM_TYPES)}")
        return value

    @field_validator("name")
    @classmethod
    def _name_ok(cls, name: str) -> str:
        return _metric_name(name, "name")


class CustomLabel(CustomField):
    """A bounded label from an argument."""

    values: dict[int, str] | None = Field(
        default=None, description="names for raw values, e.g. {0: usd, 1: eur}; others show "
        "as the number",
    )
    max_len: int = Field(
        default=CUSTOM_STR_DEFAULT_BYTES, strict=True, ge=2, le=CUSTOM_LABEL_BYTES,
        description=f"str only: bytes read, NUL included (2..{CUSTOM_LABEL_BYTES})",
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in _RESERVED_LABELS:
            raise ValueError(f"label name {name!r} is reserved; choose another")
        return name

    @property
    def key_bytes(self) -> int:
        return self.max_len if self.type == "str" else 8


class CustomValue(CustomField):
    """A histogram of an argument's values."""

    buckets: tuple[float, ...] = Field(
        min_length=1, max_length=CUSTOM_MAX_BOUNDS,
        description=f"1..{CUSTOM_MAX_BOUNDS} increasing upper bounds, e.g. [1000, 10000]",
    )

    @field_validator("type")
    @classmethod
    def _numeric(cls, value: str) -> str:
        if value == "str":
            raise ValueError("a histogram needs a number; use a str as a label instead")
        return value

    @field_validator("buckets")
    @classmethod
    def _increasing(cls, buckets: tuple[float, ...]) -> tuple[float, ...]:
        if any(b >= c for b, c in itertools.pairwise(buckets)):
            raise ValueError(f"buckets {list(buckets)} must be strictly increasing")
        if any(b != b or abs(b) == float("inf") for b in buckets):
            raise ValueError("buckets must be finite numbers (+Inf is always added)")
        return buckets

    @model_validator(mode="after")
    def _unsigned_bounds(self) -> CustomValue:
        if self.type.startswith("u") and self.buckets[0] < 0:
            raise ValueError(f"buckets: a {self.type} is never negative; start the buckets at 0 "
                             "or above")
        return self


class CustomResult(_Model):
    """result="ok"|"error" from the return value."""

    ok: str = Field(description='a test of the return value, e.g. "== 0" or ">= 0"')
    type: Literal["u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "bool"] | None = Field(
        default=None, description="how to read the return register: s32 for a C int (the "
        "default under abi sysv), s64 for a long or pointer (the default under abi go)",
    )

    @field_validator("ok")
    @classmethod
    def _test_parses(cls, ok: str) -> str:
        if not _RESULT_TEST.match(ok):
            raise ValueError(
                f"{ok!r} is not a test of the return value; write an operator (==, !=, <, <=, "
                "> or >=) and an integer, e.g. \"== 0\""
            )
        return ok.strip()

    @property
    def op_operand(self) -> tuple[str, int]:
        m = _RESULT_TEST.match(self.ok)
        assert m is not None
        return m.group(1), int(m.group(2), 0)


class CustomProbeConfig(_Model):
    """One custom probe: where it attaches and what it counts."""

    name: str = Field(description="the metric prefix, e.g. payments")
    target: CustomTarget = Field(description="exe, service, comm or pids")
    symbol: str | None = Field(
        default=None, description="a function (plain, mangled or demangled C++ name)"
    )
    usdt: str | None = Field(default=None, description="a USDT probe, provider:probe")
    python_function: str | None = Field(
        default=None, description="a Python function module:qualname (CPython's USDT probes)"
    )
    abi: Literal["sysv", "go"] = Field(
        default="sysv", description="sysv (C, C++, Rust) or go (Go's register ABI)"
    )
    duration: bool = Field(default=False, description="export <name>_duration_seconds")
    duration_buckets: tuple[float, ...] = Field(
        default=CUSTOM_DURATION_BUCKETS, min_length=1, max_length=CUSTOM_MAX_BOUNDS,
        description="increasing upper bounds in seconds",
    )
    result: CustomResult | None = Field(default=None, description='e.g. {ok: "== 0"}')
    labels: tuple[CustomLabel, ...] = Field(
        default=(), max_length=CUSTOM_MAX_LABELS, description="bounded labels from arguments"
    )
    values: tuple[CustomValue, ...] = Field(
        default=(), max_length=CUSTOM_MAX_VALUES, description="histograms of argument values"
    )
    max_series: int = Field(
        default=1000, strict=True, ge=1,
        description="label sets per metric; more are folded into the first label = other",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, name: str) -> str:
        return _metric_name(name, "metric prefix")

    @field_validator("duration_buckets")
    @classmethod
    def _increasing(cls, buckets: tuple[float, ...]) -> tuple[float, ...]:
        if any(b >= c for b, c in itertools.pairwise(buckets)) or buckets[0] <= 0:
            raise ValueError(f"{list(buckets)} must be positive and strictly increasing")
        return buckets

    @property
    def kind(self) -> str:
        return "symbol" if self.symbol else "usdt" if self.usdt else "python"

    @property
    def usdt_parts(self) -> tuple[str, str]:
        assert self.usdt is not None
        provider, _, probe = self.usdt.partition(":")
        return provider, probe

    @model_validator(mode="after")
    def _consistent(self) -> CustomProbeConfig:
        where = [k for k in ("symbol", "usdt", "python_function") if getattr(self, k)]
        if len(where) != 1:
            raise ValueError(
                "say where to attach with exactly one of symbol (a function), usdt "
                "(provider:probe) or python_function (module:qualname)"
                + (f"; got {' and '.join(where)}" if where else "")
            )
        if self.usdt is not None:
            provider, _, probe = self.usdt.partition(":")
            if not provider or not probe or ":" in probe:
                raise ValueError(f"usdt {self.usdt!r}: write provider:probe, e.g. myapp:payment")
        if self.python_function is not None:
            if not _PY_FUNCTION.match(self.python_function):
                raise ValueError(f"python_function {self.python_function!r}: write "
                                 "module:qualname, e.g. payments.core:process_payment")
            if self.labels or self.values or self.result:
                raise ValueError("python_function: CPython's USDT probes pass no arguments or "
                                 "return value; remove labels, values and result")
        if self.kind != "symbol":
            if self.abi != "sysv":
                raise ValueError("abi: go applies to symbol probes only")
            if self.usdt is not None and (self.duration or self.result):
                raise ValueError("usdt: a USDT probe is a point, with no return; remove "
                                 "duration and result (or probe the function with symbol)")
        if self.kind == "usdt":
            limit, regs = CUSTOM_USDT_MAX_ARGS, "USDT operands"
        else:
            names = CUSTOM_ARG_REGISTERS[self.abi]
            limit, regs = len(names), f"{self.abi} ABI registers {', '.join(names)}"
        seen: set[str] = set()
        used_bytes = 0
        for group, fields in (("labels", self.labels), ("values", self.values)):
            for i, f in enumerate(fields):
                at = f"{group}.{i} ({f.name})"
                if f.arg >= limit:
                    raise ValueError(
                        f"{at}.arg: {f.arg} is not an argument index here: 0..{limit - 1} "
                        f"({regs}); arguments passed on the stack cannot be read"
                    )
                if f.type in ("f32", "f64") and not f.offsets and self.kind != "usdt":
                    raise ValueError(
                        f"{at}.type: a {f.type} argument is passed in an SSE register, which "
                        "uprobes cannot read; read a float through a pointer with offsets"
                    )
                if f.name in seen:
                    raise ValueError(f"{at}.name: {f.name!r} is used twice; names must differ")
                seen.add(f.name)
                if isinstance(f, CustomLabel):
                    used_bytes += f.key_bytes
        if used_bytes > CUSTOM_LABEL_BYTES:
            raise ValueError(
                f"labels take {used_bytes} bytes, more than the {CUSTOM_LABEL_BYTES}-byte label "
                "budget of a kernel key (a number takes 8, a str its max_len); lower max_len "
                "or drop a label"
            )
        clash = {v.name for v in self.values} & {"calls", "duration_seconds"}
        if clash:
            raise ValueError(f"values: {sorted(clash)} would clash with {self.name}_calls_total "
                             f"or {self.name}_duration_seconds; rename it")
        return self


class CustomProbes(RootModel[tuple[CustomProbeConfig, ...]]):
    """probes.custom: a list of custom probes; the family is loaded when it is not empty."""

    model_config = ConfigDict(frozen=True)

    @property
    def enabled(self) -> bool:
        return bool(self.root)

    @model_validator(mode="after")
    def _unique_names(self) -> CustomProbes:
        names = [p.name for p in self.root]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"probe names {dupes} are used twice; each name is a metric prefix")
        return self


class ProbesConfig(_Model):
    """Which probe families to load."""

    tcp: ProbeToggle = Field(default=ProbeToggle(), description="the TCP probe family")
    http: HttpConfig = Field(
        default_factory=lambda: HttpConfig(), description="the HTTP/1.x probe family"
    )
    process: ProbeToggle = Field(
        default=ProbeToggle(), description="the process (exec/exit) probe family"
    )
    custom: CustomProbes = Field(
        default_factory=lambda: CustomProbes(()),
        description="a list of custom probes (uprobes, uretprobes, USDT) counted in the kernel",
    )


class RingConfig(_Model):
    """Kernel ring buffer and user-space batching."""

    size_bytes: int = Field(
        default=4 * 1024 * 1024,
        strict=True,
        description=(
            f"kernel ring buffer size per probe family in bytes, a power of two >= "
            f"{MIN_RING_BYTES}, e.g. 4194304"
        ),
    )
    batch_records: int = Field(
        default=128,
        strict=True,
        ge=1,
        description="flush downstream after this many records, an integer >= 1",
    )
    flush_ms: float = Field(
        default=5.0,
        gt=0,
        allow_inf_nan=False,
        description="flush downstream after this many milliseconds, a number > 0",
    )

    @field_validator("size_bytes")
    @classmethod
    def _power_of_two(cls, size_bytes: int) -> int:
        if size_bytes < MIN_RING_BYTES or size_bytes & (size_bytes - 1):
            raise ValueError(
                f"{size_bytes} is not a power of two >= {MIN_RING_BYTES} (the page size); "
                "use e.g. 1048576, 4194304 or 16777216"
            )
        return size_bytes


def _cgroup_entry(entry: object) -> str | int:
    hint = (
        "write an absolute cgroup v2 path like /sys/fs/cgroup/system.slice/nginx.service "
        "or a numeric cgroup id (the inode number of the cgroup directory)"
    )
    if isinstance(entry, bool):
        raise ValueError(f"{entry!r} is not a cgroup; {hint}")
    if isinstance(entry, int):
        if entry <= 0:
            raise ValueError(f"{entry} is not a cgroup id (ids are > 0); {hint}")
        return entry
    if isinstance(entry, str):
        text = entry.strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
        if text.startswith("/"):
            # Trailing slashes would make the same cgroup compare unequal later on.
            return text.rstrip("/") or "/"
    raise ValueError(f"{entry!r} is not a cgroup; {hint}")


_Cgroup = typing.Annotated[str | int, BeforeValidator(_cgroup_entry)]
_Port = typing.Annotated[int, Field(strict=True, ge=1, le=MAX_PORT)]
_Pid = typing.Annotated[int, Field(strict=True, gt=0)]


class FilterConfig(_Model):
    """What to trace; every list empty means trace everything."""

    pids: tuple[_Pid, ...] = Field(default=(), description="a list of process ids, integers > 0")
    cgroups: tuple[_Cgroup, ...] = Field(
        default=(),
        description=(
            "a list of cgroup v2 paths such as /sys/fs/cgroup/system.slice/nginx.service, "
            "or numeric cgroup ids"
        ),
    )
    ports: tuple[_Port, ...] = Field(default=(), description=f"a list of TCP ports 1..{MAX_PORT}")


class ServiceRule(_Model):
    """Names a service; all matchers given must match, and the first matching rule wins."""

    name: str = Field(description="the service name to report, a non-empty string")
    exe: str | None = Field(
        default=None, description="a glob (fnmatch) on the executable path, e.g. /usr/bin/java"
    )
    comm: str | None = Field(
        default=None,
        description=f"the exact process comm (at most {MAX_COMM_BYTES} bytes), e.g. java",
    )
    cmdline: str | None = Field(
        default=None,
        description="a regular expression searched in the space-joined command line",
    )
    cgroup: str | None = Field(
        default=None, description="a regular expression searched in the cgroup v2 path"
    )
    port: _Port | None = Field(
        default=None,
        description="a local TCP port: names the server side of connections on that port",
    )

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("the service name is empty; give the rule a name such as payments")
        return name.strip()

    @field_validator("comm")
    @classmethod
    def _comm_fits(cls, comm: str | None) -> str | None:
        if comm is not None and len(comm.encode()) > MAX_COMM_BYTES:
            truncated = comm.encode()[:MAX_COMM_BYTES].decode(errors="ignore")
            raise ValueError(
                f"{comm!r} is longer than {MAX_COMM_BYTES} bytes and can never match, because "
                f"the kernel truncates comm; use {truncated!r} "
                "or match the cmdline instead"
            )
        return comm

    @field_validator("cmdline", "cgroup")
    @classmethod
    def _regex_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"{pattern!r} is not a valid regular expression ({exc}); escape special "
                    "characters such as . ( [ with a backslash"
                ) from None
        return pattern

    @model_validator(mode="after")
    def _has_matcher(self) -> ServiceRule:
        if (self.exe, self.comm, self.cmdline, self.cgroup, self.port) == (None,) * 5:
            raise ValueError(
                f"rule {self.name!r} has no matcher; "
                "add at least one of exe, comm, cmdline, cgroup, port"
            )
        return self


class ServicesConfig(_Model):
    """How processes get their service name."""

    rules: tuple[ServiceRule, ...] = Field(
        default=(),
        description="a list of rules, each a mapping with name and exe/comm/cmdline/cgroup",
    )


class OtlpConfig(_Model):
    """OpenTelemetry (OTLP) export of metrics and spans; off unless enabled."""

    enabled: bool = Field(default=False, description="true to export over OTLP")
    endpoint: str | None = Field(
        default=None,
        description="collector URL, e.g. http://localhost:4317 (grpc) or http://localhost:4318 "
        "(http/protobuf; /v1/metrics and /v1/traces are appended); default by protocol",
    )
    protocol: Literal["grpc", "http/protobuf"] = Field(
        default="grpc", description="grpc or http/protobuf"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="a mapping of extra request headers, e.g. api-key: X"
    )
    insecure: bool = Field(
        default=True,
        description="grpc only: true for plaintext, false for TLS (https:// endpoints are TLS)",
    )
    certificate_file: str | None = Field(
        default=None, description="PEM file of CA certificates to trust (TLS)"
    )
    client_certificate_file: str | None = Field(
        default=None, description="PEM client certificate for mutual TLS"
    )
    client_key_file: str | None = Field(default=None, description="PEM client key for mutual TLS")
    timeout_s: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="export timeout in seconds, > 0"
    )
    metrics: bool = Field(default=True, description="export the /metrics families over OTLP")
    interval_s: float = Field(
        default=15.0, gt=0, allow_inf_nan=False,
        description="seconds between metric exports, a number > 0",
    )
    traces: bool = Field(default=True, description="export a span per HTTP exchange")
    sampling_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="head sampling ratio of new traces, 0.0..1.0 (tail sampling: the collector)",
    )
    link_wait_ms: float = Field(
        default=2000.0, ge=0, allow_inf_nan=False,
        description="how long a client span waits for the server span that encloses it, in ms",
    )
    max_queue_spans: int = Field(
        default=8192, ge=1, le=1_048_576,
        description="HTTP exchanges waiting to become spans, 1..1048576; a batch that would "
        "exceed it is dropped and counted, so a collector slower than the traffic bounds "
        "export latency and memory instead of growing them",
    )
    resource_attributes: dict[str, str] = Field(
        default_factory=dict,
        description="a mapping of extra resource attributes, e.g. deployment.environment: prod",
    )

    @model_validator(mode="after")
    def _mtls_pair(self) -> OtlpConfig:
        if (self.client_certificate_file is None) != (self.client_key_file is None):
            raise ValueError(
                "client_certificate_file and client_key_file go together; set both or neither"
            )
        return self


class ExportConfig(_Model):
    """Where signals go besides /metrics."""

    otlp: OtlpConfig = Field(default_factory=lambda: OtlpConfig(), description="OTLP export")


class Config(_Model):
    """The whole agent configuration."""

    listen: str = Field(
        default=DEFAULT_LISTEN,
        description=f"host:port for the metrics endpoint, e.g. {DEFAULT_LISTEN} or [::1]:9464",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="one of debug, info, warning, error"
    )
    bpf_stats: Literal["on", "sampled", "off"] = Field(
        default="sampled",
        description="BPF run-time statistics (probewire_bpf_run_*): on, off, or sampled (on one "
        "second in five; they are host-wide and cost every BPF program two clock reads a run)",
    )
    probes: ProbesConfig = Field(default=ProbesConfig(), description="probe families")
    ring: RingConfig = Field(default=RingConfig(), description="ring buffer settings")
    filter: FilterConfig = Field(default=FilterConfig(), description="what to trace")
    services: ServicesConfig = Field(default=ServicesConfig(), description="service naming rules")
    export: ExportConfig = Field(
        default_factory=lambda: ExportConfig(), description="OTLP export settings"
    )

    @field_validator("listen")
    @classmethod
    def _listen_parses(cls, listen: str) -> str:
        _split_listen(listen)
        return listen.strip()

    @field_validator("bpf_stats", mode="before")
    @classmethod
    def _bpf_stats_yaml_bool(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on`/`off` as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_lowercase(cls, level: Any) -> Any:
        return level.strip().lower() if isinstance(level, str) else level

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` split into host and port."""
        return _split_listen(self.listen)


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that a pydantic error location points into, to list its known fields."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a tuple of models: the item model is already selected
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, RootModel):
            annotation = annotation.model_fields["root"].annotation  # probes.custom: a list
        if typing.get_origin(annotation) in (tuple, list):
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: Mapping[str, Any]) -> str:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    path = ".".join(str(part) for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = ", ".join(model.model_fields) if model else "see the documentation"
        return f"{path}: unknown field; remove it; known fields are: {known}"
    message = str(error["msg"]).removeprefix("Value error, ")
    hint = ""
    # Item errors (filter.pids.0) carry the hint of the list field that holds them.
    names = [part for part in loc if isinstance(part, str)]
    field_model = _model_at(tuple(names[:-1]))
    field_name = names[-1] if names else None
    if field_model is not None and field_name in field_model.model_fields:
        description = field_model.model_fields[field_name].description
        if description and error["type"] != "value_error":
            # Custom validators already say how to fix; pydantic's own messages do not.
            hint = f"; expected {description}"
    shown = ""
    if error["type"] not in ("value_error", "missing") and "input" in error:
        shown = f" (got {error['input']!r})"
    return f"{path}: {message}{shown}{hint}"


def _name_custom_probe(problem: str, loc: tuple[int | str, ...], data: Mapping[str, Any]) -> str:
    """Say which custom probe a problem is in by its name, not only its index."""
    if len(loc) < 3 or loc[:2] != ("probes", "custom") or not isinstance(loc[2], int):
        return problem
    try:
        name = data["probes"]["custom"][loc[2]]["name"]
    except (KeyError, IndexError, TypeError):
        return problem
    # The cross-field checks (arg index by ABI, float registers) report from the probe's level
    # with the field's own path first: join the two into one dotted path.
    problem = re.sub(r"^(probes\.custom\.\d+): ((?:labels|values)\.\d+) \((\w+)\)\.(\w+): ",
                     r"\1.\2.\4 (\3): ", problem)
    return f"{problem} (custom probe {name!r})" if isinstance(name, str) else problem


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed mapping; errors name ``source`` and every bad field."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        problems = [_name_custom_probe(_describe(error), error["loc"], data)
                    for error in exc.errors()]
        noun = "problem" if len(problems) == 1 else "problems"
        lines = "\n  ".join(problems)
        raise ConfigError(
            f"{source}: invalid configuration ({len(problems)} {noun}):\n  {lines}"
        ) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found key {key!r} twice; keep only one",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path | None) -> Config:
    """Read and validate a YAML config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found; pass an existing file with --config "
            "or leave --config out to run with the defaults"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass the YAML file itself") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied; make the file readable by the agent's user"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None

    try:
        # _UniqueKeyLoader is a SafeLoader subclass: YAML tags cannot build arbitrary objects.
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or "syntax error"
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None

    if data is None:  # an empty file or only comments: all defaults
        return Config()
    if not isinstance(data, dict):
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{path}:{line}: the top level must be a mapping of settings such as "
            f"'listen: {DEFAULT_LISTEN}', not a {type(data).__name__}"
        )
    return config_from_mapping(data, source=str(path))
