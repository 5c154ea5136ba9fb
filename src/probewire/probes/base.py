"""What a probe family declares, and the generic machinery that loads and runs it.

A family module (tcp.py, process.py) declares its object, its hooks (preferred program
first, fallbacks after), the C structs its dtypes mirror, and its metrics. Everything else
(hook choice, filter-map sharing, ring draining, stats) is here and knows no family.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from prometheus_client.core import Metric

from probewire.config import Config
from probewire.enrich.service import ServiceResolver
from probewire.errors import KernelFeatureError, ProbewireError
from probewire.runtime.bpf import BpfObject, Link, Map, ProgStats, destroy_links
from probewire.runtime.features import HookSupport, hook_type_of
from probewire.runtime.objects import object_path

log = logging.getLogger(__name__)

# Maps every object declares (bpf/include/common.h) that the agent shares between objects.
SHARED_MAPS = ("filter_config", "filter_pids", "filter_cgroups", "filter_ports")


@dataclass(frozen=True)
class Hook:
    """One thing to observe and the programs that can observe it, best first."""

    name: str
    programs: tuple[str, ...]


@dataclass
class HookChoice:
    hook: str
    program: str | None
    section: str
    attached: bool = False
    reason: str = ""  # why the preferred program was not used, or why none could be


@dataclass
class ProbeContext:
    """What a family may use from the rest of the agent."""

    config: Config
    services: ServiceResolver


class Probe:
    """Base of a probe family. Subclasses fill the ClassVars and override the hooks they need."""

    name: ClassVar[str]
    # The object file (bpf/<object_name>.bpf.c); an instance may pick a variant of its
    # family's object for the kernel it runs on (l7: l7_bounded before bpf_loop).
    object_name: str
    hooks: ClassVar[tuple[Hook, ...]]
    structs: ClassVar[dict[str, np.dtype]] = {}
    record_dtype: ClassVar[np.dtype | None] = None  # set when the family ships ring records
    # Further ring buffers of the object (map name -> record dtype), drained like "events".
    extra_rings: ClassVar[dict[str, np.dtype]] = {}
    # Those of them whose records vary in length (the dtype is their fixed part; on_ring gets
    # a runtime.ring.VarBatch).
    variable_rings: ClassVar[frozenset[str]] = frozenset()
    # Loaded but never attached (e.g. the target of a tail call); a family may set its own
    # per instance (what it loads can depend on its config).
    helper_programs: tuple[str, ...] = ()
    # Kernel fields by plain loads where the kernel has bpf_rdonly_cast (6.2+); off makes the
    # programs take the bpf_probe_read_kernel path older kernels take (tests cover both).
    kfuncs: ClassVar[bool] = True

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.obj: BpfObject | None = None

    # --- overridable ------------------------------------------------------------------------
    def before_load(self, obj: BpfObject) -> None:
        """Load-time settings (const volatile globals, map sizes)."""

    def after_load(self, obj: BpfObject) -> None:
        """Seed maps from /proc state that predates the agent."""

    def on_batch(self, records: np.ndarray) -> None:
        """Handle a batch of ring records (called on the reader thread)."""

    def on_ring(self, map_name: str, records: Any) -> None:
        """Handle a batch from one of `extra_rings` (a VarBatch for `variable_rings`)."""

    def on_stop(self) -> None:
        """Release what after_load took beyond the declared hooks (e.g. uprobe links)."""

    def collect(self) -> Iterable[Metric]:
        """Metrics read at scrape time."""
        return ()

    def active_hooks(self) -> tuple[Hook, ...]:
        """The hooks this instance attaches: all of them unless its config turns some off."""
        return self.hooks

    def program_note(self, program: str) -> str:
        """What `probes` and doctor should say about a chosen program beyond its hook type
        (e.g. the variant a kernel without bpf_loop gets), or ""."""
        return ""

    # --- helpers ----------------------------------------------------------------------------
    def budget_families(self) -> Iterable[tuple[str, float, int]]:
        """(metric, overflows, active series) of each label budget the family keeps."""
        return ()

    def map(self, name: str) -> Map:
        assert self.obj is not None, f"probe {self.name} is not loaded"
        return self.obj.maps[name]


def events_dropped(obj: BpfObject) -> int:
    """Records an object's programs could not write to a full ring (common.h count_drop),
    summed over CPUs: what probewire_events_dropped_total exports."""
    _, values = obj.maps["events_dropped"].read_all(np.dtype(np.uint32), np.dtype(np.uint64))
    return int(values.sum())


@dataclass
class RunningProbe:
    """A probe whose object is loaded and whose chosen programs are attached."""

    probe: Probe
    obj: BpfObject
    choices: list[HookChoice]
    links: list[Link] = field(default_factory=list)

    def dropped(self) -> int:
        return events_dropped(self.obj)

    def program_stats(self) -> dict[str, ProgStats]:
        return {
            c.program: self.obj.programs[c.program].stats()
            for c in self.choices
            if c.program and c.attached
        }

    def stop(self) -> None:
        self.probe.on_stop()
        destroy_links(self.links)
        self.links.clear()
        self.obj.close()


def choose_programs(
    probe: Probe, support: dict[str, HookSupport], obj: BpfObject,
    forced: dict[str, str] | None = None,
) -> list[HookChoice]:
    """Per hook: the first program whose hook type this kernel supports.

    `forced` (hook name -> hook type, e.g. {"inet_sock_set_state": "tp"}) pins a choice, so
    tests can prove each fallback works on a kernel that also has the preferred hook.
    """
    choices = []
    for hook in probe.active_hooks():
        rejected: list[str] = []
        chosen: str | None = None
        for prog_name in hook.programs:
            section = obj.programs[prog_name].section
            htype = hook_type_of(section)
            want = (forced or {}).get(hook.name)
            if want and htype != want:
                rejected.append(f"{section}: not the forced hook type {want}")
                continue
            s = support.get(htype)
            if s is None or s.available:
                chosen = prog_name
                break
            rejected.append(f"{section}: {s.reason}")
        section = obj.programs[chosen].section if chosen else ""
        note = probe.program_note(chosen) if chosen else ""
        choices.append(HookChoice(hook.name, chosen, section,
                                  reason="; ".join([*rejected, *([note] if note else [])])))
    return choices


def start_probe(
    probe: Probe,
    support: dict[str, HookSupport],
    shared: Mapping[str, Map],
    ring_size_bytes: int,
    forced: dict[str, str] | None = None,
    wakeup_records: int = 128,
    obj: BpfObject | None = None,
    data_ring_bytes: int | None = None,
) -> RunningProbe:
    """Open, configure, load and attach one family; `shared` holds the maps every family
    uses (the filter), created once by the agent."""
    if obj is None:
        obj = BpfObject(object_path(probe.object_name))
    try:
        for struct_name, dtype in probe.structs.items():
            obj.struct_layout(struct_name).check_dtype(dtype)
        choices = choose_programs(probe, support, obj, forced)
        chosen = {c.program for c in choices if c.program} | {
            name for name in probe.helper_programs
            if support.get(hook_type_of(obj.programs[name].section),
                           HookSupport("", True, "")).available
        }
        for prog in obj.programs.values():
            prog.set_autoload(prog.name in chosen)
        for name in SHARED_MAPS:
            if name in shared and name in obj.maps:
                obj.maps[name].reuse_fd(shared[name].fd)
        obj.maps["events"].set_max_entries(ring_size_bytes if probe.record_dtype else 4096)
        for ring_name in probe.extra_rings:
            size = ring_size_bytes
            if ring_name in probe.variable_rings and data_ring_bytes is not None:
                size = data_ring_bytes
            obj.maps[ring_name].set_max_entries(size)
        probe.obj = obj
        obj.set_rodata(wakeup_records=wakeup_records, use_kfuncs=int(probe.kfuncs))
        probe.before_load(obj)
        obj.load()
        running = RunningProbe(probe, obj, choices)
        for choice in choices:
            if not choice.program:
                raise KernelFeatureError(
                    f"probe {probe.name}: no usable hook for {choice.hook} ({choice.reason})"
                )
            running.links.append(obj.programs[choice.program].attach())
            choice.attached = True
        probe.after_load(obj)
        return running
    except ProbewireError:
        for_cleanup = locals().get("running")
        if isinstance(for_cleanup, RunningProbe):
            for_cleanup.stop()
        else:
            obj.close()
        probe.obj = None
        raise
