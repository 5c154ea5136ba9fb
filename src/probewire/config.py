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
    "ContainersConfig",
    "CustomProbeConfig",
    "CustomProbes",
    "ExportConfig",
    "FilterConfig",
    "HttpConfig",
    "KubernetesConfig",
    "L7Config",
    "MemoryConfig",
    "OtlpConfig",
    "ProbeToggle",
    "ProbesConfig",
    "RingConfig",
    "RouteLearningConfig",
    "SamplingConfig",
    "SaturationConfig",
    "SecurityConfig",
    "SecurityMatch",
    "SecurityRule",
    "ServeConfig",
    "ServiceRule",
    "ServicesConfig",
    "config_from_mapping",
    "load_config",
    "parse_listen",
    "read_config_file",
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


class RouteLearningConfig(_Model):
    """Route templates learned per service (aggregate/routes.py RouteLearner)."""

    enabled: bool = Field(default=True, description="true or false")
    max_distinct: int = Field(
        default=64, ge=2, strict=True,
        description="distinct values a path position may show (per service, under the same "
        "prefix) before it becomes a {param}, an integer >= 2",
    )
    max_nodes_per_service: int = Field(
        default=2048, ge=16, strict=True,
        description="learned path values kept per service, an integer >= 16; a value beyond "
        "it turns its position into a {param} instead",
    )
    max_services: int = Field(
        default=64, ge=1, strict=True,
        description="services that learn, an integer >= 1; others keep the heuristic routes",
    )
    keep_hits: int = Field(
        default=4, ge=1, strict=True,
        description="a value seen under this many distinct paths before its position "
        "collapses stays literal (like /users/me beside /users/{id}), an integer >= 1",
    )
    keep_max: int = Field(
        default=8, ge=0, strict=True,
        description="at most this many values stay literal per collapsed position, >= 0",
    )


class MemoryConfig(_Model):
    """The memory guard (runtime/memory.py): shrink caches near the memory limit."""

    limit_mb: int = Field(
        default=0, ge=0, strict=True,
        description="the agent's memory limit in MB against its RSS; 0 uses the limit of its "
        "cgroup (memory.high/memory.max, or memory.limit_in_bytes on cgroup v1), if any",
    )
    shrink_at: float = Field(
        default=0.85, gt=0.0, le=1.0, allow_inf_nan=False,
        description="drop caches when usage reaches this share of the limit, 0 < x <= 1",
    )
    interval_s: float = Field(
        default=1.0, gt=0.0, allow_inf_nan=False,
        description="seconds between memory readings, a number > 0",
    )


class L7Config(_Model):
    """The L7 capture layer and the protocols parsed on it."""

    enabled: bool = Field(default=True, description="true or false")
    protocols: tuple[str, ...] | None = Field(
        default=None,
        description="protocols classified and parsed (default: every registered one: http, "
        "http2, postgresql, mysql, redis, memcached, dns)",
    )
    tls: bool = Field(
        default=True,
        description="capture TLS plaintext through uprobes on OpenSSL's libssl",
    )
    trace_agent: bool = Field(
        default=False,
        description="also trace the agent's own traffic (its /metrics scrapes) and the far "
        "end of the connections it opens (a collector on this host receiving its exports)",
    )
    max_series_per_metric: int = Field(
        default=2000,
        ge=10,
        strict=True,
        description="label sets one L7 metric may hold; more fold into an \"other\" series "
        "(http_route, db_collection_name, dns_question_name ...) and are counted",
    )
    max_series_per_service: int = Field(
        default=500,
        ge=1,
        strict=True,
        description="label sets one service may hold in one L7 metric (max_series_per_metric "
        "still caps the total); more of that service's fold into \"other\", so one service's "
        "flood of routes never takes another's room",
    )
    series_ttl_s: float = Field(
        default=0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="drop a label set no exchange wrote for this many seconds and give its "
        "room back (0: never); a series that comes back starts from zero, which Prometheus' "
        "rate() reads as a counter reset",
    )
    kernel_aggregation: bool = Field(
        default=True,
        description="count exchanges of known operations (HTTP routes) in kernel maps "
        "instead of sending each one to user space (forced off while export.otlp.traces "
        "needs every exchange)",
    )
    kernel_keys: int = Field(
        default=16384,
        ge=16,
        le=1 << 20,
        strict=True,
        description="label-ish keys the kernel aggregation map holds; an exchange that "
        "finds it full is sent to user space instead (never lost)",
    )

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, protocols: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if protocols is None:
            return None
        from probewire.l7.registry import PROTOCOLS

        names = [p.name for p in PROTOCOLS]
        unknown = [p for p in protocols if p not in names]
        if unknown:
            raise ValueError(f"unknown protocol(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(names)}")
        return tuple(dict.fromkeys(protocols))


class HttpConfig(_Model):
    """HTTP (1.x and 2) on the L7 capture layer."""

    routes: tuple[str, ...] = Field(
        default=(),
        description="route patterns tried before the heuristics, e.g. /users/{id} or "
        "/static/{*path}",
    )
    route_learning: RouteLearningConfig = Field(
        default_factory=lambda: RouteLearningConfig(),
        description="route templates learned per service",
    )

    @field_validator("routes")
    @classmethod
    def _routes_valid(cls, routes: tuple[str, ...]) -> tuple[str, ...]:
        from probewire.aggregate.routes import validate_route_pattern

        return tuple(validate_route_pattern(r) for r in routes)


class SaturationConfig(_Model):
    """The fourth golden signal: each switch leaves its hooks unattached when false."""

    enabled: bool = Field(default=True, description="true or false")
    runqueue: bool = Field(
        default=True,
        description="run-queue latency and off-CPU waits by reason (sched_wakeup, "
        "sched_wakeup_new, sched_switch)",
    )
    cpu: bool = Field(default=True, description="CPU time per service (sched_switch)")
    block: bool = Field(
        default=True,
        description="block I/O latency and bytes (block_rq_insert, block_rq_issue, "
        "block_rq_complete)",
    )
    listen: bool = Field(
        default=True,
        description="TCP listen-queue overflows and drops (consume_skb, kfree_skb, "
        "inet_sock_set_state)",
    )
    oom: bool = Field(default=True, description="OOM kills (oom/mark_victim)")


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
    l7: L7Config = Field(
        default_factory=lambda: L7Config(),
        description="the L7 capture layer: HTTP, HTTP/2, gRPC, databases, caches, DNS",
    )
    http: HttpConfig = Field(default_factory=lambda: HttpConfig(), description="HTTP routes")
    process: ProbeToggle = Field(
        default=ProbeToggle(), description="the process (exec/exit) probe family"
    )
    saturation: SaturationConfig = Field(
        default=SaturationConfig(),
        description="the saturation family (run queue, CPU, block I/O, listen queues, OOM)",
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
    data_size_bytes: int = Field(
        default=16 * 1024 * 1024,
        strict=True,
        description=(
            "the L7 capture layer's bytes ring (HTTP/2, databases, caches, DNS) in bytes, a "
            "power of two >= the page size: one record lost there gives a whole HTTP/2 "
            "connection up (HPACK state cannot be resynchronized), so it is sized to ride out "
            "a reader held off the CPU for a while, e.g. 16777216"
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

    @field_validator("size_bytes", "data_size_bytes")
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
    # --- Kubernetes selectors (enrich/workload.py turns them into container cgroups) ---
    k8s_namespaces: tuple[str, ...] = Field(
        default=(), description="a list of Kubernetes namespaces (fnmatch globs), e.g. shop"
    )
    k8s_workloads: tuple[str, ...] = Field(
        default=(),
        description="a list of workloads as name or kind/name (fnmatch globs), e.g. "
        "deployment/cart",
    )
    k8s_labels: dict[str, str] = Field(
        default_factory=dict,
        description="a mapping of pod labels that must all match, e.g. app.kubernetes.io/name: "
        "cart",
    )

    @property
    def kubernetes(self) -> bool:
        """Whether any Kubernetes selector is set (then only matching containers are traced)."""
        return bool(self.k8s_namespaces or self.k8s_workloads or self.k8s_labels)


def _valid_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"{pattern!r} is not a valid regular expression ({exc}); escape special "
            "characters such as . + ( [ with a backslash"
        ) from None
    return pattern


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
        if any(ord(c) < 32 for c in name):
            raise ValueError(f"{name!r} contains a control character; use printable text")
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
        return None if pattern is None else _valid_regex(pattern)

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
    # --- per-signal settings (OTEL_EXPORTER_OTLP_TRACES_*/_METRICS_*), used as given ---
    traces_endpoint: str | None = Field(
        default=None, description="the full URL for spans, e.g. http://collector:4318/v1/traces "
        "(nothing is appended); default: endpoint"
    )
    metrics_endpoint: str | None = Field(
        default=None, description="the full URL for metrics, e.g. http://collector:4318/v1/metrics "
        "(nothing is appended); default: endpoint"
    )
    traces_protocol: Literal["grpc", "http/protobuf"] | None = Field(
        default=None, description="grpc or http/protobuf for spans; default: protocol"
    )
    metrics_protocol: Literal["grpc", "http/protobuf"] | None = Field(
        default=None, description="grpc or http/protobuf for metrics; default: protocol"
    )
    traces_headers: dict[str, str] | None = Field(
        default=None, description="request headers for spans instead of headers"
    )
    metrics_headers: dict[str, str] | None = Field(
        default=None, description="request headers for metrics instead of headers"
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


# --- security (docs/security.md) --------------------------------------------------------------

_RULE_ID = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Criteria the exec hook decides in the kernel (the only ones a kill rule may use).
KERNEL_CRITERIA = ("exe_basename", "exe_dir", "fileless", "stdio_tcp", "listening_ancestor",
                   "uid", "container")
MAX_SECURITY_DEPTH = 8  # SEC_MAX_DEPTH in bpf/process.h
MAX_SECURITY_CLAUSES = 64  # SEC_MAX_CLAUSES: one bit each
MAX_NAME_BYTES = 15  # names compare on the kernel's comm length


def _as_tuple(value: Any) -> Any:
    """A single string where a list is expected means a list of one."""
    return (value,) if isinstance(value, str) else value


def _as_list(value: Any) -> Any:
    """A single mapping where a list of mappings is expected means a list of one."""
    return (value,) if isinstance(value, dict) else value


_Names = typing.Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]


class SecurityAncestor(_Model):
    """Some ancestor within `depth` generations matches every criterion given."""

    exe: _Names | None = Field(default=None, description="globs on the ancestor's image path")
    exe_basename: _Names | None = Field(
        default=None, description="names of the ancestor's image, e.g. [sshd]")
    service: _Names | None = Field(default=None, description="service names, e.g. [shop]")
    depth: int = Field(
        default=MAX_SECURITY_DEPTH, ge=1, le=64, strict=True,
        description="generations to look up: 1 is the parent",
    )

    @model_validator(mode="after")
    def _has_criterion(self) -> SecurityAncestor:
        if (self.exe, self.exe_basename, self.service) == (None, None, None):
            raise ValueError("give at least one of exe, exe_basename, service")
        return self


class SecurityConnects(_Model):
    """An outbound TCP connection (by the process or a descendant) to these destinations."""

    ports: tuple[_Port, ...] = Field(default=(), description="destination ports 1..65535")
    addresses: tuple[str, ...] = Field(
        default=(), description="destination addresses or networks, e.g. 203.0.113.0/24",
    )

    @field_validator("addresses")
    @classmethod
    def _networks(cls, addresses: tuple[str, ...]) -> tuple[str, ...]:
        for address in addresses:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(
                    f"{address!r} is not an IP address or network; write e.g. 203.0.113.7 or "
                    "203.0.113.0/24 or 2001:db8::/32"
                ) from None
        return addresses

    @model_validator(mode="after")
    def _has_destination(self) -> SecurityConnects:
        if not self.ports and not self.addresses:
            raise ValueError("give ports, addresses or both")
        return self


class SecurityMatch(_Model):
    """Criteria of one rule, all of which must hold (docs/security.md has each one)."""

    exe: _Names | None = Field(
        default=None, description="globs on the image path, e.g. /opt/*/bin/*")
    exe_basename: _Names | None = Field(
        default=None, description="names of the image (the first 15 bytes count), e.g. [nc]")
    exe_dir: _Names | None = Field(
        default=None, description="absolute directories the image is under, e.g. [/tmp]")
    argv: str | None = Field(
        default=None, description="a regular expression searched in the space-joined argv")
    ancestor: SecurityAncestor | None = Field(
        default=None, description="a mapping: exe, exe_basename and/or service, and depth")
    uid: tuple[typing.Annotated[int, Field(strict=True, ge=0, le=2**32 - 2)], ...] | None = \
        Field(default=None, description="effective uids, e.g. [0]")
    container: bool | None = Field(
        default=None, description="true: inside a container; false: on the host")
    fileless: Literal[True] | None = Field(
        default=None, description="true: the image is a memfd or a deleted file")
    stdio_tcp: Literal[True] | None = Field(
        default=None, description="true: stdin or stdout is a TCP socket")
    listening_ancestor: int | None = Field(
        default=None, ge=1, le=MAX_SECURITY_DEPTH, strict=True,
        description=f"1..{MAX_SECURITY_DEPTH}: an ancestor this many generations up at most "
                    "(1: the parent) listens on a TCP port",
    )
    connects_to: SecurityConnects | None = Field(
        default=None, description="a mapping with ports and/or addresses")

    @field_validator("argv")
    @classmethod
    def _argv_regex(cls, pattern: str | None) -> str | None:
        return None if pattern is None else _valid_regex(pattern)

    @field_validator("exe_dir")
    @classmethod
    def _absolute_dirs(cls, dirs: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for d in dirs or ():
            if not d.startswith("/") or len(d.encode()) > 200:
                raise ValueError(f"{d!r} is not an absolute directory (≤ 200 bytes), e.g. /tmp")
        return dirs

    @field_validator("exe_basename")
    @classmethod
    def _plain_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in names or ():
            if not name or "/" in name or "\0" in name:
                raise ValueError(f"{name!r} is not a file name; give the last component only")
        return names

    def criteria(self) -> set[str]:
        return {name for name in type(self).model_fields if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _not_empty(self) -> SecurityMatch:
        if not self.criteria():
            raise ValueError("an empty match matches every process; give at least one criterion")
        return self


class SecurityRule(_Model):
    """One rule: alert (or kill) when its match holds and none of its exceptions do."""

    id: str = Field(description="a unique id: lowercase letters, digits and _, e.g. my_rule")
    severity: Literal["critical", "high", "medium", "low", "info"] = Field(
        default="high", description="critical, high, medium, low or info")
    description: str = Field(default="", description="what the rule catches, for the alert")
    match: typing.Annotated[tuple[SecurityMatch, ...], BeforeValidator(_as_list)] = Field(
        description="a mapping of criteria (all must hold), or a list of them (any one)")
    except_: tuple[SecurityMatch, ...] = Field(
        default=(), alias="except",
        description="a list of mappings of criteria; a match that also matches one is dropped")
    action: Literal["alert", "kill"] = Field(
        default="alert", description="alert, or kill (SIGKILL from the kernel at exec)")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("id")
    @classmethod
    def _id_form(cls, rule_id: str) -> str:
        if not _RULE_ID.match(rule_id):
            raise ValueError(f"{rule_id!r} is not a rule id; use lowercase letters, digits and _")
        return rule_id

    @field_validator("match")
    @classmethod
    def _some_alternative(cls, match: tuple[SecurityMatch, ...]) -> tuple[SecurityMatch, ...]:
        if not match:
            raise ValueError("an empty list matches nothing; give at least one mapping")
        return match

    @property
    def alternatives(self) -> tuple[SecurityMatch, ...]:
        return self.match

    @model_validator(mode="after")
    def _kill_is_decided_in_kernel(self) -> SecurityRule:
        if self.action != "kill":
            return self
        if self.except_:
            raise ValueError("except: a kill rule is decided in the kernel at exec, where "
                             "exceptions are not evaluated; narrow match instead")
        for i, alt in enumerate(self.alternatives):
            late = sorted(alt.criteria() - set(KERNEL_CRITERIA))
            if late:
                where = "match" if len(self.alternatives) == 1 else f"match.{i}"
                raise ValueError(
                    f"{where}.{late[0]}: action kill needs criteria the kernel decides at "
                    f"exec ({', '.join(KERNEL_CRITERIA)}); {', '.join(late)} can only be "
                    "decided later, in user space: use action alert"
                )
        return self

    # Last, so it wraps the validators above: their errors get the rule's id too.
    @model_validator(mode="wrap")
    @classmethod
    def _name_the_rule(cls, data: Any, handler: Any) -> SecurityRule:
        """Errors inside a rule say which rule (by id) and which field of it."""
        rule_id = data.get("id") if isinstance(data, dict) else None
        # A single mapping was given: its errors say match.argv, not match.0.argv.
        single = isinstance(data, dict) and isinstance(data.get("match"), dict)
        try:
            rule: SecurityRule = handler(data)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                parts = [str(p) for p in error["loc"]]
                if single and parts[:2] == ["match", "0"]:
                    del parts[1]
                loc = ".".join(parts)
                message = str(error["msg"]).removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    names = [p for p in parts[:-1] if not p.isdigit()]
                    model: type[BaseModel] = SecurityMatch if names else SecurityRule
                    if names[1:2] == ["ancestor"]:
                        model = SecurityAncestor
                    elif names[1:2] == ["connects_to"]:
                        model = SecurityConnects
                    known = ", ".join(f.alias or n for n, f in model.model_fields.items())
                    message = f"unknown field; known fields are: {known}"
                elif error["type"] == "literal_error" and loc.endswith("action"):
                    message = f"unknown action {error['input']!r}; use alert or kill"
                elif error["type"] not in ("value_error", "missing") and "input" in error:
                    message += f" (got {error['input']!r})"
                problems.append(f"{loc}: {message}" if loc else message)
            name = f"rule {rule_id!r}" if rule_id else "a rule without an id"
            raise ValueError(f"{name}: " + "; ".join(problems)) from None
        return rule


class SecurityRedact(_Model):
    """Secrets removed from argv wherever it is shown (added to the built-in list)."""

    flags: tuple[str, ...] = Field(
        default=(), description="more flags whose value is a secret, e.g. [--db-pass]")
    patterns: tuple[str, ...] = Field(
        default=(), description="more regular expressions; a group named value, if any, is "
                                "what gets replaced, else the whole match")

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_valid_regex(p) for p in patterns)


class SecurityConfig(_Model):
    """Exec and connection rules, the process tree, alerts and enforcement."""

    enabled: bool = Field(default=True, description="true or false")
    default_rules: bool = Field(default=True, description="load the built-in rules")
    disabled_rules: tuple[str, ...] = Field(
        default=(), description="ids of built-in rules to leave out, e.g. [exec_from_temp_dir]")
    rules: tuple[SecurityRule, ...] = Field(
        default=(), description="more rules; one with a built-in rule's id replaces it")
    alert_log: str | None = Field(
        default=None, description="a file to append alerts to as JSON lines, or - for stdout")
    otlp_logs: bool = Field(
        default=True, description="send alerts as OTLP log records while export.otlp is on")
    redact: SecurityRedact = Field(default=SecurityRedact(), description="secrets in argv")
    max_processes: int = Field(
        default=16384, ge=256, le=1 << 20, strict=True,
        description="processes the tree keeps (live ones and exited ancestors of live ones)")
    max_alerts: int = Field(
        default=1000, ge=1, le=100_000, strict=True,
        description="recent alerts the API and the UI keep")

    @model_validator(mode="after")
    def _rule_set(self) -> SecurityConfig:
        from probewire.security.defaults import DEFAULT_RULE_IDS

        unknown = [r for r in self.disabled_rules if r not in DEFAULT_RULE_IDS]
        if unknown:
            raise ValueError(f"disabled_rules: {unknown[0]!r} is not a built-in rule; the "
                             f"built-in ids are {', '.join(DEFAULT_RULE_IDS)}")
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"rules: the id {rule.id!r} is used twice; ids are unique")
            seen.add(rule.id)
        effective = self.effective_rules()
        clauses = sum(len(r.alternatives) for r in effective)
        if clauses > MAX_SECURITY_CLAUSES:
            raise ValueError(f"rules: {clauses} match alternatives in all; the kernel holds "
                             f"{MAX_SECURITY_CLAUSES}: disable or merge some")
        alts = [m for r in effective for m in r.alternatives]
        for what, values, cap in (
            ("exe_basename names", {n.encode()[:MAX_NAME_BYTES] for m in alts
                                    for n in m.exe_basename or ()}, 1024),
            ("exe_dir directories", {d for m in alts for d in m.exe_dir or ()}, 256),
            ("uids", {u for m in alts for u in m.uid or ()}, 256),
            ("connects_to ports", {p for m in alts if m.connects_to
                                   for p in m.connects_to.ports}, 1024),
            ("connects_to addresses", {a for m in alts if m.connects_to
                                       for a in m.connects_to.addresses}, 1024),
        ):
            if len(values) > cap:
                raise ValueError(f"rules: {len(values)} distinct {what} in all; the kernel's "
                                 f"map holds {cap} (bpf/process.bpf.c): use fewer")
        return self

    def effective_rules(self) -> tuple[SecurityRule, ...]:
        """Built-in rules (unless disabled or replaced by a user rule of the same id), then
        the user's rules."""
        from probewire.security.defaults import DEFAULT_RULES

        mine = {r.id for r in self.rules}
        builtin = tuple(
            SecurityRule.model_validate(r) for r in DEFAULT_RULES
            if self.default_rules and r["id"] not in mine and r["id"] not in self.disabled_rules
        ) if self.enabled else ()
        return builtin + (self.rules if self.enabled else ())
class ContainersConfig(_Model):
    """Where container runtimes keep each container's metadata on the host."""

    state_paths: dict[Literal["containerd", "crio", "docker", "podman"], tuple[str, ...]] = Field(
        default_factory=lambda: _default_state_paths(),
        description="per runtime (containerd, crio, docker, podman), a list of paths of a "
        "container's OCI config.json (docker: config.v2.json) with {id} for the container id "
        "and * for one path component",
    )
    scan_interval_s: float = Field(
        default=2.0, gt=0, allow_inf_nan=False,
        description="seconds between scans of the cgroup tree for new containers, while "
        "filter.k8s_* selectors need them, a number > 0",
    )

    @field_validator("state_paths")
    @classmethod
    def _has_id(cls, paths: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for runtime, patterns in paths.items():
            for pattern in patterns:
                if "{id}" not in pattern or not pattern.startswith("/"):
                    raise ValueError(
                        f"{runtime}: {pattern!r} must be an absolute path containing {{id}}, "
                        "e.g. /run/containerd/io.containerd.runtime.v2.task/*/{id}/config.json"
                    )
        return paths


def _default_state_paths() -> dict[Literal["containerd", "crio", "docker", "podman"],
                                   tuple[str, ...]]:
    from probewire.enrich.container import DEFAULT_STATE_PATHS

    return {k: tuple(v) for k, v in DEFAULT_STATE_PATHS.items()}  # type: ignore[misc]


class KubernetesConfig(_Model):
    """Kubernetes identity: from container annotations always; from the API server when
    reachable."""

    api: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto (use the API server when running in a pod), on (fail without it), "
        "or off (container annotations and the pod-name heuristic only)",
    )
    api_url: str | None = Field(
        default=None,
        description="the API server URL, e.g. https://10.96.0.1:443; default: "
        "KUBERNETES_SERVICE_HOST/PORT",
    )
    token_file: str = Field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/token",
        description="bearer token file (the pod's service account token)",
    )
    ca_file: str = Field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        description="PEM CA bundle that signed the API server's certificate",
    )
    node_name: str | None = Field(
        default=None, description="this node's name; default: $NODE_NAME, else the host name"
    )
    cluster_peers: bool = Field(
        default=True,
        description="also watch every pod's and Service's address in the cluster, to name "
        "service-graph peers on other nodes (memory grows with the cluster)",
    )
    pod_label: bool = Field(
        default=False,
        description="add k8s_pod_name to metrics (it churns with every rollout; spans and "
        "OTLP resources always carry the pod)",
    )
    startup_wait_s: float = Field(
        default=5.0, ge=0, allow_inf_nan=False,
        description="how long start-up waits for the first pod list, seconds >= 0",
    )

    @field_validator("api", mode="before")
    @classmethod
    def _api_yaml_bool(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class SamplingConfig(_Model):
    """Span and ring-record sampling (1-in-N); counters and histograms stay exact."""

    one_in: int = Field(
        default=1, ge=1, le=1 << 24, strict=True,
        description="keep 1 trace (and its ring records) in N, an integer >= 1 (1: all)",
    )
    honor_traceparent: bool = Field(
        default=True,
        description="an incoming W3C traceparent's sampled flag decides for its trace",
    )

    @property
    def probability(self) -> float:
        return 1.0 / self.one_in


class TlsServeConfig(_Model):
    """TLS for the agent's endpoint (as Prometheus exporters' web config)."""

    cert_file: str = Field(description="PEM server certificate (chain)")
    key_file: str = Field(description="PEM private key of cert_file")
    client_ca_file: str | None = Field(
        default=None, description="PEM CA bundle; when set, clients must present a "
        "certificate it signed (mutual TLS)"
    )


class BasicAuthConfig(_Model):
    username: str = Field(description="the user name scrapers send")
    password_file: str = Field(description="a file holding the password (e.g. a mounted Secret)")


class ServeApisConfig(_Model):
    """Parts of the JSON API that can be switched off (they show process details)."""

    events: bool = Field(default=True, description="serve /api/events (exec/exit feed)")
    security: bool = Field(default=True, description="serve /api/security*")


class ServeConfig(_Model):
    """How /metrics, /api and the UI are served beyond loopback."""

    tls: TlsServeConfig | None = Field(default=None, description="TLS settings; off when unset")
    basic_auth: BasicAuthConfig | None = Field(
        default=None, description="require HTTP basic auth (except /healthz)"
    )
    bearer_token_file: str | None = Field(
        default=None,
        description="require 'Authorization: Bearer <token>' with the token in this file "
        "(except /healthz)",
    )
    apis: ServeApisConfig = Field(default_factory=lambda: ServeApisConfig(),
                                  description="API parts to serve")


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
    security: SecurityConfig = Field(
        default_factory=lambda: SecurityConfig(), description="security rules and alerts"
    )
    memory: MemoryConfig = Field(
        default_factory=lambda: MemoryConfig(), description="the memory guard"
    )
    # --- fleet: containers, Kubernetes, sampling, serving (issue 17) ---
    containers: ContainersConfig = Field(
        default_factory=lambda: ContainersConfig(), description="container runtime state"
    )
    kubernetes: KubernetesConfig = Field(
        default_factory=lambda: KubernetesConfig(), description="Kubernetes identity"
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(), description="span sampling"
    )
    serve: ServeConfig = Field(
        default_factory=lambda: ServeConfig(), description="TLS, auth and API switches"
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
    data = read_config_file(path)
    if not data:  # an empty file or only comments: all defaults
        return Config()
    return config_from_mapping(data, source=str(path))


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML mapping of a config file, unvalidated ({} for an empty file)."""
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

    if data is None:
        return {}
    if not isinstance(data, dict):
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{path}:{line}: the top level must be a mapping of settings such as "
            f"'listen: {DEFAULT_LISTEN}', not a {type(data).__name__}"
        )
    return data


# --- the environment: PROBEWIRE_* and OpenTelemetry's OTEL_* (issue 17) -----------------------
#
# Precedence, highest first: command-line flags > environment > config file > defaults.
# PROBEWIRE_<PATH> sets any key, the path's dots written as "_" and upper-cased
# (PROBEWIRE_PROBES_L7_MAX_SERIES_PER_METRIC=500); the value is YAML, so lists and mappings
# work (PROBEWIRE_FILTER_PORTS='[80, 443]'). OTEL_* variables follow the OpenTelemetry SDK
# environment specification; a set OTLP endpoint turns OTLP export on.

# PROBEWIRE_* variables that are not configuration (setup.py reads this one at build time).
NON_CONFIG_ENV = frozenset({"PROBEWIRE_SKIP_BPF_BUILD"})
# What Kubernetes injects for a Service named "probewire" in the pod's namespace (service
# links): PROBEWIRE_SERVICE_HOST, PROBEWIRE_PORT_9464_TCP_ADDR, ... never configuration.
_SERVICE_LINK_ENV = re.compile(
    r"^PROBEWIRE_(?:SERVICE_(?:HOST|PORT(?:_\w+)?)|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_\w+)?)?)$")
ENV_PREFIX = "PROBEWIRE_"
OTLP_GRPC_PORT = 4317


def _env_path(model: type[BaseModel], rest: str) -> list[str] | None:
    """The field path an upper-cased, "_"-joined name spells in `model` (longest field name
    first, so MAX_SERIES_PER_METRIC is one field, not four), or None."""
    for name in sorted(model.model_fields, key=len, reverse=True):
        upper = name.upper()
        if rest == upper:
            return [name]
        if rest.startswith(upper + "_"):
            annotation = model.model_fields[name].annotation
            for candidate in (annotation, *typing.get_args(annotation)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    tail = _env_path(candidate, rest[len(upper) + 1:])
                    if tail is not None:
                        return [name, *tail]
    return None


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _get_path(data: Mapping[str, Any], path: list[str]) -> Any:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _parse_kv_list(text: str, var: str) -> dict[str, str]:
    """OTEL's ``key1=value1,key2=value2`` with percent-encoded values (W3C Baggage format)."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{var}: {item.strip()!r} is not key=value; write e.g. "
                              "api-key=secret,tenant=a")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def probewire_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(overrides as a nested mapping, dotted path -> variable) from PROBEWIRE_* variables."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in NON_CONFIG_ENV \
                or _SERVICE_LINK_ENV.match(var):
            continue
        path = _env_path(Config, var[len(ENV_PREFIX):])
        if path is None:
            sections = ", ".join(f"{ENV_PREFIX}{n.upper()}" for n in Config.model_fields)
            raise ConfigError(
                f"{var}: names no configuration key; unset it, or spell a key's dotted path "
                f"with _ (e.g. PROBEWIRE_FILTER_PORTS); keys start with one of: {sections}")
        try:
            value = yaml.safe_load(env[var]) if env[var].strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{var}: not a YAML value ({exc}); quote strings, write lists "
                              "as [1, 2]") from None
        _set_path(data, path, value)
        origins[".".join(path)] = var
    return data, origins


_SAMPLERS = {
    # OTEL_TRACES_SAMPLER -> (honour the parent's sampled flag, default ratio)
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


def _truthy(value: str) -> bool:
    return value.strip().lower() == "true"


def otel_env(env: Mapping[str, str], file_data: Mapping[str, Any],
             ) -> tuple[dict[str, Any], dict[str, str]]:
    """(overrides, dotted path -> variable) from the OpenTelemetry SDK variables."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    base = ["export", "otlp"]

    def put(field: str, value: Any, var: str) -> None:
        _set_path(data, [*base, field], value)
        origins[".".join([*base, field])] = var

    def get(var: str) -> str | None:
        value = env.get(var)
        return value if value is not None and value.strip() != "" else None

    endpoint_vars = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                     "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    simple = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "endpoint",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "traces_endpoint",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "metrics_endpoint",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "protocol",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "traces_protocol",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "metrics_protocol",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "certificate_file",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "client_certificate_file",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "client_key_file",
    }
    for var, field in simple.items():
        value = get(var)
        if value is not None:
            put(field, value.strip(), var)
    for var, field in (("OTEL_EXPORTER_OTLP_HEADERS", "headers"),
                       ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "traces_headers"),
                       ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "metrics_headers")):
        value = get(var)
        if value is not None:
            put(field, _parse_kv_list(value, var), var)
    if (value := get("OTEL_EXPORTER_OTLP_INSECURE")) is not None:
        put("insecure", _truthy(value), "OTEL_EXPORTER_OTLP_INSECURE")
    if (value := get("OTEL_EXPORTER_OTLP_TIMEOUT")) is not None:
        try:
            put("timeout_s", float(value) / 1000.0, "OTEL_EXPORTER_OTLP_TIMEOUT")
        except ValueError:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT: {value!r} is not a number of "
                              "milliseconds, e.g. 10000") from None
    if (value := get("OTEL_METRIC_EXPORT_INTERVAL")) is not None:
        try:
            put("interval_s", float(value) / 1000.0, "OTEL_METRIC_EXPORT_INTERVAL")
        except ValueError:
            raise ConfigError(f"OTEL_METRIC_EXPORT_INTERVAL: {value!r} is not a number of "
                              "milliseconds, e.g. 60000") from None
    if (value := get("OTEL_RESOURCE_ATTRIBUTES")) is not None:
        attrs = dict(_get_path(file_data, [*base, "resource_attributes"]) or {})
        attrs.update(_parse_kv_list(value, "OTEL_RESOURCE_ATTRIBUTES"))
        put("resource_attributes", attrs, "OTEL_RESOURCE_ATTRIBUTES")
    if (value := get("OTEL_SERVICE_NAME")) is not None:
        # Names the agent's own resource; the services it observes keep their names.
        attrs = dict(_get_path(data, [*base, "resource_attributes"])
                     or _get_path(file_data, [*base, "resource_attributes"]) or {})
        attrs["service.name"] = value.strip()
        put("resource_attributes", attrs, "OTEL_SERVICE_NAME")
    for var, field in (("OTEL_TRACES_EXPORTER", "traces"), ("OTEL_METRICS_EXPORTER", "metrics")):
        value = get(var)
        if value is None:
            continue
        choice = value.strip().lower()
        if choice not in ("otlp", "none"):
            raise ConfigError(f"{var}: {value!r} is not supported; use otlp or none")
        put(field, choice == "otlp", var)

    sampler = get("OTEL_TRACES_SAMPLER")
    if sampler is not None:
        choice = sampler.strip().lower()
        if choice not in _SAMPLERS:
            raise ConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not supported; use one of "
                              f"{', '.join(_SAMPLERS)}")
        honor, ratio = _SAMPLERS[choice]
        if ratio is None:
            arg = get("OTEL_TRACES_SAMPLER_ARG")
            try:
                ratio = float(arg) if arg is not None else 1.0
            except ValueError:
                raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {arg!r} is not a ratio 0.0..1.0, "
                                  "e.g. 0.1") from None
        put("sampling_ratio", ratio, "OTEL_TRACES_SAMPLER_ARG"
            if get("OTEL_TRACES_SAMPLER_ARG") is not None else "OTEL_TRACES_SAMPLER")
        _set_path(data, ["sampling", "honor_traceparent"], honor)
        origins["sampling.honor_traceparent"] = "OTEL_TRACES_SAMPLER"

    if any(get(var) is not None for var in endpoint_vars):
        put("enabled", True, next(v for v in endpoint_vars if get(v) is not None))
        # The spec's default protocol is http/protobuf; an endpoint on 4317 (OTLP/gRPC's port)
        # is taken as gRPC, as Beyla does, rather than failing against a gRPC collector.
        if _get_path(data, [*base, "protocol"]) is None \
                and _get_path(file_data, [*base, "protocol"]) is None:
            url = (get("OTEL_EXPORTER_OTLP_ENDPOINT") or get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                   or get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or "")
            from urllib.parse import urlsplit

            try:
                port = urlsplit(url.strip()).port
            except ValueError:
                port = None
            put("protocol", "grpc" if port == OTLP_GRPC_PORT else "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT")
    if (value := get("OTEL_SDK_DISABLED")) is not None and _truthy(value):
        put("enabled", False, "OTEL_SDK_DISABLED")
    return data, origins


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config(path: Path | None, env: Mapping[str, str] | None = None,
                   flags: Mapping[str, Any] | None = None) -> Config:
    """The effective configuration: flags > environment > file > defaults.

    `flags` holds dotted paths set on the command line (e.g. {"listen": "0.0.0.0:9464"}). An
    invalid value names its key and where it came from (the file, or the variable that set it).
    """
    import os

    env = os.environ if env is None else env
    file_data = read_config_file(path) if path is not None else {}
    otel, otel_origins = otel_env(env, file_data)
    ours, our_origins = probewire_env(env)
    data = _deep_merge(_deep_merge(file_data, otel), ours)
    origins = {**otel_origins, **our_origins}
    for dotted, value in (flags or {}).items():
        _set_path(data, dotted.split("."), value)
        origins[dotted] = f"--{dotted.replace('_', '-')}"
    source = str(path) if path is not None else "<defaults>"
    try:
        return config_from_mapping(data, source=source)
    except ConfigError as exc:
        if not origins:
            raise
        lines = []
        for line in str(exc).splitlines():
            dotted = line.strip().split(":", 1)[0]
            origin = next((var for p, var in origins.items()
                           if dotted == p or dotted.startswith(p + ".")), None)
            lines.append(f"{line} (set by {origin})" if origin and line.startswith("  ")
                         else line)
        raise ConfigError("\n".join(lines)) from None
