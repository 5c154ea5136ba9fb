"""Agent configuration: pydantic models that are the one source of truth for keys and defaults.

Every field has a default, so an empty or absent file is a valid configuration. Unknown keys are
errors (``extra="forbid"`` on every model): a typo such as ``probes.tcpp`` must not silently turn
into "use the default". Every failure surfaces as :class:`~probewire.errors.ConfigError` whose
message names the file, the dotted field path and the fix.
"""

from __future__ import annotations

import ipaddress
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
    ValidationError,
    field_validator,
    model_validator,
)

from probewire.errors import ConfigError

__all__ = [
    "Config",
    "ExportConfig",
    "FilterConfig",
    "MemoryConfig",
    "OtlpConfig",
    "ProbeToggle",
    "ProbesConfig",
    "RingConfig",
    "RouteLearningConfig",
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
    max_series_per_service: int = Field(
        default=500,
        ge=1,
        strict=True,
        description="label sets one service may hold in one HTTP metric (max_series_per_metric "
        "still caps the total); more of that service's go to http_route=\"other\", so one "
        "service's flood of routes never takes another's room",
    )
    series_ttl_s: float = Field(
        default=0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="drop a label set no exchange wrote for this many seconds and give its "
        "room back (0: never); a series that comes back starts from zero, which Prometheus' "
        "rate() reads as a counter reset",
    )
    route_learning: RouteLearningConfig = Field(
        default_factory=lambda: RouteLearningConfig(),
        description="route templates learned per service",
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


class ProbesConfig(_Model):
    """Which probe families to load."""

    tcp: ProbeToggle = Field(default=ProbeToggle(), description="the TCP probe family")
    http: HttpConfig = Field(
        default_factory=lambda: HttpConfig(), description="the HTTP/1.x probe family"
    )
    process: ProbeToggle = Field(
        default=ProbeToggle(), description="the process (exec/exit) probe family"
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
    memory: MemoryConfig = Field(
        default_factory=lambda: MemoryConfig(), description="the memory guard"
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
        annotation = field.annotation
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


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed mapping; errors name ``source`` and every bad field."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
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
