"""runtime/features.py's FAMILY_NEEDS names exactly the version-bound helpers each family's
object calls: a helper added to a family's C without an entry there would fail that family's
load on an old kernel with the verifier's message instead of being switched off by name."""

from __future__ import annotations

import struct

import pytest
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from probewire.probes import REGISTRY
from probewire.probes.saturation import BOUNDED_TWINS
from probewire.runtime.features import (
    FAMILY_NEEDS,
    KERNEL_FEATURES,
    L7_OPTIONAL,
    SATURATION_OPTIONAL,
)
from probewire.runtime.objects import object_path

# Helper ids (enum bpf_func_id) of the features that newer kernels brought. Task storage is
# found by its helpers: a map of the type is only used through them.
FEATURE_HELPERS = {
    "task_storage": {156, 157},  # bpf_task_storage_get/_delete (5.11)
    "current_task_btf": {158},
    "attach_cookie": {174},
    "task_pt_regs": {175},
    "bpf_loop": {181},
    "percpu_lookup": {195},
}
# Used on some paths only, with a fallback on kernels without it.
OPTIONAL = {"saturation": set(SATURATION_OPTIONAL), "l7": set(L7_OPTIONAL)}
BPF_CALL = 0x85  # BPF_JMP | BPF_CALL; src_reg 0 is a helper, 1 a BPF subprogram, 2 a kfunc


def helpers_called(path: str) -> set[int]:
    """Every helper id a call instruction of the object names, in any code section (programs
    and the subprograms in .text, e.g. bpf_loop callbacks)."""
    found = set()
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if not section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR:
                continue
            code = section.data()
            for off in range(0, len(code) - 7, 8):
                op, regs, _off, imm = struct.unpack_from("<BBhi", code, off)
                if op == BPF_CALL and regs >> 4 == 0:
                    found.add(imm)
    return found


def test_feature_helpers_cover_the_version_bound_features() -> None:
    assert set(FEATURE_HELPERS) <= set(KERNEL_FEATURES)
    for needs in FAMILY_NEEDS.values():
        assert set(needs) <= set(FEATURE_HELPERS), needs


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_family_needs_match_the_helpers_its_object_calls(family: str) -> None:
    called = helpers_called(str(object_path(REGISTRY[family].object_name)))
    used = {name for name, ids in FEATURE_HELPERS.items() if ids & called}
    assert used - OPTIONAL.get(family, set()) == set(FAMILY_NEEDS.get(family, ())), used


def helpers_by_program(path: str) -> dict[str, set[int]]:
    """Helper ids each function of the object calls (its own code: programs inline theirs)."""
    from elftools.elf.sections import SymbolTableSection

    found: dict[str, set[int]] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = next(s for s in elf.iter_sections() if isinstance(s, SymbolTableSection))
        for sym in symtab.iter_symbols():
            if sym["st_info"]["type"] != "STT_FUNC":
                continue
            code = elf.get_section(sym["st_shndx"]).data()
            code = code[sym["st_value"]:sym["st_value"] + sym["st_size"]]
            calls = found.setdefault(sym.name, set())
            for off in range(0, len(code) - 7, 8):
                op, regs, _off, imm = struct.unpack_from("<BBhi", code, off)
                if op == BPF_CALL and regs >> 4 == 0:
                    calls.add(imm)
    return found


def test_saturation_bounded_twins_call_neither_bpf_loop_nor_percpu_lookup() -> None:
    """What a kernel before 5.19 loads for the listen signal: the *_bounded twins, and the
    per-CPU offset recorder; no subprogram call either (a bpf_loop callback's reference is an
    instruction 5.10 refuses even on a dead path)."""
    calls = helpers_by_program(str(object_path("saturation")))
    assert {f"{p}_bounded" for p in BOUNDED_TWINS} | {"record_cpu_offset"} <= set(calls)
    for name in [f"{p}_bounded" for p in BOUNDED_TWINS] + ["record_cpu_offset"]:
        assert not calls[name] & (FEATURE_HELPERS["bpf_loop"] | FEATURE_HELPERS["percpu_lookup"]
                                  | FEATURE_HELPERS["current_task_btf"]), (name, calls[name])
    for name in BOUNDED_TWINS:
        assert calls[name] & FEATURE_HELPERS["bpf_loop"], name  # the twin is the other one


def test_the_l7_bounded_object_calls_none_of_the_features_its_variant_stands_in_for() -> None:
    """What a kernel lacking all of L7_OPTIONAL (Debian 5.10) loads instead of l7."""
    from probewire.probes.l7 import BOUNDED_OBJECT

    called = helpers_called(str(object_path(BOUNDED_OBJECT)))
    assert {name for name, ids in FEATURE_HELPERS.items() if ids & called} == set()
