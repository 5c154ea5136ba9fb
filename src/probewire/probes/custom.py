"""custom family: business metrics from any binary, declared in config (probes.custom).

One precompiled object (bpf/custom.bpf.c) serves every probe: each probe's spec (which
arguments, types, offsets, buckets, result test) is written into `custom_specs` at the probe's
index, and every attachment carries that index as its cookie. Calls are counted in per-CPU
`custom_stats` keyed by (process, probe, result, label bytes); this module reads the map at
scrape time, names processes as services and exports `<name>_calls_total`,
`<name>_duration_seconds` and `<name>_<value>` histograms. Attaching goes through the uprobe
layer (runtime/uprobes.py): processes running at start-up and those that exec later.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from probewire.aggregate.budget import LabelBudget
from probewire.config import (
    CUSTOM_LABEL_BYTES,
    CUSTOM_MAX_BOUNDS,
    CUSTOM_MAX_LABELS,
    CUSTOM_MAX_OFFSETS,
    CUSTOM_MAX_VALUES,
    CUSTOM_TYPES,
    CustomField,
    CustomLabel,
    CustomProbeConfig,
)
from probewire.errors import ConfigError
from probewire.probes.base import Probe, ProbeContext
from probewire.runtime.bpf import BpfObject
from probewire.runtime.uprobes import Client, Site, Target, UprobeLayer

log = logging.getLogger(__name__)

# bpf/custom.h
MAX_PROBES = 64
MAX_DEPTH = 4
PY_NAME = 64
PY_SUFFIX = 64
PY_SUFFIXES = 2
FIXED_SHIFT = 16
AT_RETURN, PYTHON, MATCH_SP = 1, 2, 4
ABI_SYSV, ABI_GO, ABI_USDT = 0, 1, 2
OPS = {"==": 1, "!=": 2, "<": 3, "<=": 4, ">": 5, ">=": 6}
RESULTS = {1: "ok", 2: "error"}
ERRORS = ("map_full", "read_failed", "too_deep", "return_without_entry")
TYPE_CODES = {name: i + 1 for i, name in enumerate(CUSTOM_TYPES)}
SIGNED = {"s8", "s16", "s32", "s64", "f32", "f64", "bool"}
NBUCKETS = CUSTOM_MAX_BOUNDS + 1

CUSTOM_FIELD = np.dtype([
    ("arg", np.uint8), ("type", np.uint8), ("n_offsets", np.uint8), ("key_at", np.uint8),
    ("key_size", np.uint8), ("_pad", np.uint8, (3,)), ("offsets", np.int64, (CUSTOM_MAX_OFFSETS,)),
])
CUSTOM_VALUE_SPEC = np.dtype([
    ("field", CUSTOM_FIELD), ("n_bounds", np.uint32), ("is_signed", np.uint32),
    ("bounds", np.int64, (CUSTOM_MAX_BOUNDS,)),
])
CUSTOM_SPEC = np.dtype([
    ("flags", np.uint32), ("abi", np.uint8), ("n_labels", np.uint8), ("n_values", np.uint8),
    ("result_op", np.uint8), ("result_type", np.uint8), ("n_duration_bounds", np.uint8),
    ("py_name_len", np.uint8), ("py_n_suffixes", np.uint8),
    ("py_suffix_len", np.uint8, (PY_SUFFIXES,)), ("_pad", np.uint8, (10,)),
    ("result_operand", np.int64), ("duration_bounds_ns", np.uint64, (CUSTOM_MAX_BOUNDS,)),
    ("labels", CUSTOM_FIELD, (CUSTOM_MAX_LABELS,)),
    ("values", CUSTOM_VALUE_SPEC, (CUSTOM_MAX_VALUES,)),
    ("py_name", "S64"), ("py_suffix", "S64", (PY_SUFFIXES,)),
])
CUSTOM_KEY = np.dtype([
    ("tgid", np.uint32), ("probe", np.uint16), ("result", np.uint8), ("_pad", np.uint8),
    ("labels", np.uint8, (CUSTOM_LABEL_BYTES,)),
])
CUSTOM_STATS = np.dtype([
    ("calls", np.uint64), ("duration_ns_sum", np.uint64),
    ("duration_buckets", np.uint64, (NBUCKETS,)),
    ("value_sum", np.int64, (CUSTOM_MAX_VALUES,)),
    ("value_buckets", np.uint64, (CUSTOM_MAX_VALUES, NBUCKETS)),
])


def _fixed(value: float) -> int:
    """A float as the kernel counts it: value * 2^16, saturated to an s64."""
    return max(-(2**63) + 1, min(2**63 - 1, round(value * (1 << FIXED_SHIFT))))


def _bound(value: float, type_name: str) -> int:
    if type_name in ("f32", "f64"):
        return _fixed(value)
    # An integer field's value v is in the bucket of the first bound >= v: floor the bound.
    floor = math.floor(value)
    if type_name.startswith("u") or type_name == "bool":
        return max(-1, min(floor, 2**64 - 1)) if floor >= 0 else -1
    return max(-(2**63), min(floor, 2**63 - 1))


def python_suffixes(module: str) -> list[str]:
    """Files CPython reports as co_filename for a module: a/b.py or a/b/__init__.py.
    `__main__` is the script itself, whatever its name: any file."""
    if module == "__main__":
        return []
    stem = module.replace(".", "/")
    return [f"{stem}.py", f"{stem}/__init__.py"]


# CPython 3.11 has the function__entry note but never fires it (its new frame layout skipped
# the call site; CPython gh-98894), 3.12-3.14 have no function__entry/return notes at all
# (PEP 669 dropped them; gh-104280), 3.15 restores both. Debian 12's python3 is 3.11.
PYTHON_ENTRY_NOTE = (
    "CPython 3.11 fires function__return but never function__entry (CPython gh-98894, "
    "fixed in 3.15): calls are counted at the return; {name}_duration_seconds needs "
    "function__entry and stays empty on this interpreter"
)
_CPYTHON_VERSION = re.compile(r"python(3\.\d+)")


def python_entry_note(path: str) -> str:
    """What a python_function probe cannot do in the interpreter at `path`, or ""."""
    m = _CPYTHON_VERSION.search(os.path.basename(path))
    if m and m.group(1) in ("3.11", "3.12", "3.13", "3.14"):
        return PYTHON_ENTRY_NOTE
    return ""


def build_spec(cfg: CustomProbeConfig) -> np.void:
    """The kernel's view of one probe (struct custom_spec)."""
    spec: np.void = np.zeros(1, CUSTOM_SPEC)[0]
    flags = 0
    abi = ABI_USDT if cfg.kind != "symbol" else ABI_GO if cfg.abi == "go" else ABI_SYSV
    # A Python call is counted at function__return, the one of CPython's two probes that fires
    # on every interpreter with them (see python_entry_note).
    if cfg.duration or cfg.result is not None or cfg.kind == "python":
        flags |= AT_RETURN
        if cfg.kind == "symbol" and cfg.abi == "sysv":
            flags |= MATCH_SP
    if cfg.kind == "python":
        flags |= PYTHON
        assert cfg.python_function is not None
        module, _, qualname = cfg.python_function.partition(":")
        name = qualname.rsplit(".", 1)[-1].encode()
        suffixes = [s.encode() for s in python_suffixes(module)]
        if len(name) >= PY_NAME or any(len(s) >= PY_SUFFIX for s in suffixes):
            raise ConfigError(f"probes.custom {cfg.name!r}: python_function "
                              f"{cfg.python_function!r} is longer than the kernel compares "
                              f"({PY_NAME - 1} bytes of name, {PY_SUFFIX - 1} of module path)")
        spec["py_name"] = name
        spec["py_name_len"] = len(name)
        spec["py_n_suffixes"] = len(suffixes)
        for i, suffix in enumerate(suffixes):
            spec["py_suffix"][i] = suffix
            spec["py_suffix_len"][i] = len(suffix)
    spec["flags"] = flags
    spec["abi"] = abi
    if cfg.result is not None:
        op, operand = cfg.result.op_operand
        spec["result_op"] = OPS[op]
        spec["result_operand"] = operand if operand < 2**63 else operand - 2**64
        spec["result_type"] = TYPE_CODES[cfg.result.type or ("s64" if cfg.abi == "go" else "s32")]
    bounds_ns = [round(b * 1e9) for b in cfg.duration_buckets]
    spec["n_duration_bounds"] = len(bounds_ns)
    spec["duration_bounds_ns"][: len(bounds_ns)] = bounds_ns
    for i, (label, at) in enumerate(zip(cfg.labels, label_layout(cfg.labels), strict=True)):
        _fill_field(spec["labels"][i], label)
        spec["labels"][i]["key_at"] = at
        spec["labels"][i]["key_size"] = label.key_bytes
    spec["n_labels"] = len(cfg.labels)
    for i, value in enumerate(cfg.values):
        vs = spec["values"][i]
        _fill_field(vs["field"], value)
        vs["n_bounds"] = len(value.buckets)
        vs["is_signed"] = int(value.type in SIGNED)
        raw = [_bound(b, value.type) for b in value.buckets]
        vs["bounds"][: len(raw)] = [r if r < 2**63 else r - 2**64 for r in raw]
    spec["n_values"] = len(cfg.values)
    return spec


def _fill_field(out: np.void, f: CustomField) -> None:
    out["arg"] = f.arg
    out["type"] = TYPE_CODES[f.type]
    out["n_offsets"] = len(f.offsets)
    out["offsets"][: len(f.offsets)] = f.offsets


def label_layout(labels: Sequence[CustomLabel]) -> list[int]:
    """Where each label's bytes go in custom_key.labels, in order."""
    at, out = 0, []
    for label in labels:
        out.append(at)
        at += label.key_bytes
    return out


def decode_label(raw: bytes, label: CustomLabel) -> str:
    """A label's key bytes -> its exported value."""
    if label.type == "str":
        return raw.split(b"\0", 1)[0].decode(errors="replace")
    unsigned = int.from_bytes(raw[:8], "little")
    signed = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
    if label.values is not None:
        number = signed if label.type in SIGNED else unsigned
        if number in label.values:
            return label.values[number]
    if label.type == "bool":
        return "true" if unsigned else "false"
    if label.type in ("f32", "f64"):
        return str(floatToGoString(signed / (1 << FIXED_SHIFT)))  # type: ignore[no-untyped-call]
    return str(signed if label.type in SIGNED else unsigned)


def _value_sum(raw: int, type_name: str) -> float:
    if type_name in ("f32", "f64"):
        return raw / (1 << FIXED_SHIFT)
    if type_name in SIGNED:
        return float(raw)
    return float(raw % (1 << 64))


@dataclass
class _Totals:
    calls: float
    duration_ns_sum: float
    duration_buckets: np.ndarray
    value_sum: np.ndarray  # int64 per value (wrapping as the kernel does)
    value_buckets: np.ndarray

    @classmethod
    def zero(cls) -> _Totals:
        return cls(0.0, 0.0, np.zeros(NBUCKETS), np.zeros(CUSTOM_MAX_VALUES, np.int64),
                   np.zeros((CUSTOM_MAX_VALUES, NBUCKETS)))

    def add(self, other: _Totals) -> None:
        self.calls += other.calls
        self.duration_ns_sum += other.duration_ns_sum
        self.duration_buckets = self.duration_buckets + other.duration_buckets
        self.value_sum = self.value_sum + other.value_sum
        self.value_buckets = self.value_buckets + other.value_buckets


def _target(cfg: CustomProbeConfig) -> Target:
    t = cfg.target
    return Target(exe=t.exe, comm=t.comm, service=t.service, pids=frozenset(t.pids))


class CustomProbe(Probe):
    name = "custom"
    object_name = "custom"
    hooks = ()
    helper_programs = ("custom_entry", "custom_return", "custom_usdt", "custom_usdt_return")
    structs: ClassVar[dict[str, np.dtype]] = {
        "custom_spec": CUSTOM_SPEC, "custom_field": CUSTOM_FIELD,
        "custom_value_spec": CUSTOM_VALUE_SPEC, "custom_key": CUSTOM_KEY,
        "custom_stats": CUSTOM_STATS,
    }

    def __init__(self, ctx: ProbeContext) -> None:
        super().__init__(ctx)
        self.configs: tuple[CustomProbeConfig, ...] = ctx.config.probes.custom.root
        if len(self.configs) > MAX_PROBES:
            raise ConfigError(f"probes.custom: {len(self.configs)} probes, at most {MAX_PROBES}")
        self.specs = [build_spec(c) for c in self.configs]
        self.layer: UprobeLayer | None = None
        self._lock = threading.Lock()
        self._labels_of: dict[bytes, tuple[str, ...]] = {}
        self._last: dict[bytes, _Totals] = {}
        self._retired: dict[tuple[int, tuple[str, ...]], _Totals] = {}
        self.budgets = [
            LabelBudget(c.max_series, {c.labels[0].name: "other"}) if c.labels else None
            for c in self.configs
        ]

    # --- attaching ---------------------------------------------------------------------------
    def after_load(self, obj: BpfObject) -> None:
        specs = obj.maps["custom_specs"]
        for i, spec in enumerate(self.specs):
            specs.update(i.to_bytes(4, "little"), spec.tobytes())
        for cfg in self.configs:
            if cfg.kind == "python" and cfg.duration:
                log.warning("custom probe %s: %s", cfg.name,
                            PYTHON_ENTRY_NOTE.format(name=cfg.name).replace(
                                "this interpreter", "Debian 12's python3.11 (and 3.12-3.14)"))
        self.layer = UprobeLayer("custom", self.ctx.services)
        for i, cfg in enumerate(self.configs):
            self.layer.add(self._client(obj, i, cfg))
        self.layer.start()

    def _client(self, obj: BpfObject, probe: int, cfg: CustomProbeConfig) -> Client:
        progs = obj.programs
        at_return = cfg.duration or cfg.result is not None
        sites: list[Site] = []
        if cfg.kind == "symbol":
            sites.append(Site(progs["custom_entry"], function=cfg.symbol, cookie=probe))
            if at_return:
                sites.append(Site(progs["custom_return"], function=cfg.symbol, returns=True,
                                  cookie=probe))
        elif cfg.kind == "usdt":
            sites.append(Site(progs["custom_usdt"], usdt=cfg.usdt_parts, cookie=probe))
        else:
            sites.append(Site(progs["custom_usdt_return"], usdt=("python", "function__return"),
                              cookie=probe))
            if cfg.duration:
                sites.append(Site(progs["custom_usdt"], usdt=("python", "function__entry"),
                                  cookie=probe))
        return Client(cfg.name, _target(cfg), tuple(sites), go=cfg.abi == "go")

    def on_process_events(self, events: Sequence[Any]) -> None:
        """Exec and exit events from the process family: attach to new processes."""
        if self.layer is not None:
            self.layer.on_process_events(events)

    def on_stop(self) -> None:
        if self.layer is not None:
            self.layer.stop()
            self.layer = None

    # --- what `probewire probes` shows ---------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per probe and process: attach state, the file, and why not when it is not."""
        rows: list[dict[str, Any]] = []
        states = self.layer.processes() if self.layer is not None else []
        for cfg in self.configs:
            where = cfg.symbol or cfg.usdt or cfg.python_function or ""
            mine = [s for s in states if s.client == cfg.name]
            for s in mine:
                note = ""
                if cfg.kind == "python" and cfg.duration and s.state == "attached":
                    note = python_entry_note(s.file).format(name=cfg.name)
                rows.append({"probe": cfg.name, "where": where, "pid": s.pid, "comm": s.comm,
                             "state": s.state, "file": s.file, "shared": s.shared,
                             "reason": s.reason or note})
            if not mine:
                rows.append({"probe": cfg.name, "where": where, "pid": 0, "comm": "",
                             "state": "no process", "file": "", "shared": False,
                             "reason": f"no running process matches {_target(cfg).describe()}"})
        return rows

    # --- metrics -----------------------------------------------------------------------------
    def _snapshot(self) -> dict[tuple[int, tuple[str, ...]], _Totals]:
        keys, values = self.map("custom_stats").read_all(CUSTOM_KEY, CUSTOM_STATS)
        seen: dict[bytes, _Totals] = {}
        gone: list[bytes] = []
        alive: dict[int, bool] = {}
        for i in range(len(keys)):
            key = keys[i]
            raw = key.tobytes()
            per_cpu = values[i]
            seen[raw] = _Totals(
                float(per_cpu["calls"].sum()), float(per_cpu["duration_ns_sum"].sum()),
                per_cpu["duration_buckets"].sum(axis=0).astype(np.float64),
                per_cpu["value_sum"].sum(axis=0, dtype=np.int64),
                per_cpu["value_buckets"].sum(axis=0).astype(np.float64),
            )
            tgid = int(key["tgid"])
            if raw not in self._labels_of:
                self._labels_of[raw] = self._labels(key)
            if tgid not in alive:
                alive[tgid] = os.path.exists(f"/proc/{tgid}")
            if not alive[tgid]:
                gone.append(raw)
        stats_map = self.map("custom_stats")
        with self._lock:
            # Entries of exited processes are read a last time, kept in user space and deleted,
            # so the map holds live processes only and counters never go down.
            for raw in gone:
                self._retire(raw, seen.pop(raw))
                stats_map.delete(raw)
            for raw in set(self._last) - set(seen) - set(gone):
                self._retire(raw, self._last[raw])
            self._last = seen
            out: dict[tuple[int, tuple[str, ...]], _Totals] = {}
            for labelled, totals in self._retired.items():
                out.setdefault(labelled, _Totals.zero()).add(totals)
            for raw, totals in seen.items():
                out.setdefault(self._series_of(raw), _Totals.zero()).add(totals)
            return out

    def _series_of(self, raw: bytes) -> tuple[int, tuple[str, ...]]:
        probe = int.from_bytes(raw[4:6], "little")
        return probe, self._labels_of[raw]

    def _retire(self, raw: bytes, totals: _Totals) -> None:
        series = self._series_of(raw)
        self._labels_of.pop(raw, None)
        self._retired.setdefault(series, _Totals.zero()).add(totals)

    def _labels(self, key: np.void) -> tuple[str, ...]:
        probe = int(key["probe"])
        if probe >= len(self.configs):
            return ()
        cfg = self.configs[probe]
        labels = key["labels"].tobytes()
        values = [self.ctx.services.name_for(int(key["tgid"]))]
        if cfg.result is not None:
            values.append(RESULTS.get(int(key["result"]), "error"))
        names = self._label_names(cfg)
        for label, at in zip(cfg.labels, label_layout(cfg.labels), strict=True):
            values.append(decode_label(labels[at:at + label.key_bytes], label))
        budget = self.budgets[probe]
        admitted = tuple(values) if budget is None else budget.admit(tuple(values), names)
        return admitted

    @staticmethod
    def _label_names(cfg: CustomProbeConfig) -> tuple[str, ...]:
        return ("service_name", *(["result"] if cfg.result is not None else []),
                *(label.name for label in cfg.labels))

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        for probe, cfg in enumerate(self.configs):
            names = list(self._label_names(cfg))
            calls = CounterMetricFamily(
                f"{cfg.name}_calls", f"Calls of {cfg.symbol or cfg.usdt or cfg.python_function} "
                "(custom probe).", labels=names)
            duration = HistogramMetricFamily(
                f"{cfg.name}_duration_seconds", "Entry to return of each call (custom probe).",
                labels=names)
            hists = [HistogramMetricFamily(f"{cfg.name}_{v.name}",
                                           f"Values of argument {v.arg} (custom probe).",
                                           labels=names) for v in cfg.values]
            dur_le = [floatToGoString(b) for b in cfg.duration_buckets]  # type: ignore[no-untyped-call]
            for (p, labels), t in sorted(snap.items(), key=lambda kv: kv[0]):
                if p != probe or not labels:
                    continue
                lv = list(labels)
                calls.add_metric(lv, t.calls)
                if cfg.duration:
                    n = len(cfg.duration_buckets)
                    cum = np.cumsum(t.duration_buckets[: n + 1]).tolist()
                    duration.add_metric(lv, [*zip(dur_le, cum[:n], strict=True),
                                             ("+Inf", cum[n])], t.duration_ns_sum / 1e9)
                for j, v in enumerate(cfg.values):
                    n = len(v.buckets)
                    cum = np.cumsum(t.value_buckets[j][: n + 1]).tolist()
                    le = [floatToGoString(b) for b in v.buckets]  # type: ignore[no-untyped-call]
                    hists[j].add_metric(lv, [*zip(le, cum[:n], strict=True), ("+Inf", cum[n])],
                                        _value_sum(int(t.value_sum[j]), v.type))
            yield calls
            if cfg.duration:
                yield duration
            yield from hists
        yield from self._self_metrics()

    def _self_metrics(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "probewire_custom_errors",
            "Custom probe losses: kernel-side (map_full, read_failed, too_deep, "
            "return_without_entry) and attach-side (symbol_missing, attach_failed).",
            labels=["probe", "reason"])
        _, per_cpu = self.map("custom_errors").read_all(np.dtype(np.uint32),
                                                        np.dtype(np.uint64))
        kernel = per_cpu.sum(axis=1) if len(per_cpu) else np.zeros(0)
        layer_errors = self.layer.errors if self.layer is not None else {}
        attached = GaugeMetricFamily(
            "probewire_custom_attached_processes",
            "Processes a custom probe is attached to.", labels=["probe"])
        states = self.layer.processes() if self.layer is not None else []
        for probe, cfg in enumerate(self.configs):
            for r, reason in enumerate(ERRORS):
                idx = probe * len(ERRORS) + r
                errors.add_metric([cfg.name, reason],
                                  float(kernel[idx]) if idx < len(kernel) else 0.0)
            for reason in ("symbol_missing", "attach_failed"):
                errors.add_metric([cfg.name, reason],
                                  float(layer_errors.get((cfg.name, reason), 0)))
            attached.add_metric([cfg.name], float(sum(
                1 for s in states if s.client == cfg.name and s.state == "attached")))
        yield errors
        yield attached
