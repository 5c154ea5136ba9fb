"""Custom probes without a kernel: the config schema and its errors, the kernel spec built from
it, label decoding, and the ELF side of the uprobe layer (symbols of PIE, C++ and stripped
binaries, USDT notes) on programs compiled here."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.config import CustomLabel, config_from_mapping
from probewire.errors import ConfigError
from probewire.probes.custom import (
    AT_RETURN,
    MATCH_SP,
    PYTHON,
    build_spec,
    decode_label,
    label_layout,
    python_entry_note,
    python_suffixes,
)
from probewire.runtime.elf import ElfFile, SymbolNotFound, read_maps

PROGS = Path(__file__).parent.parent / "bpf" / "custom_progs"

GOOD: dict[str, Any] = {
    "name": "payments", "target": {"exe": "*/payd"}, "symbol": "process_payment",
    "duration": True, "result": {"ok": "== 0"},
    "labels": [{"name": "currency", "arg": 1, "type": "u32", "values": {0: "usd", 1: "eur"}}],
    "values": [{"name": "amount", "arg": 0, "offsets": [8], "type": "u64",
                "buckets": [1000, 10000, 50000]}],
}


def probe_config(**changes: Any) -> Any:
    spec = {**copy.deepcopy(GOOD), **changes}
    return config_from_mapping({"probes": {"custom": [spec]}}).probes.custom.root[0]


def error_of(**changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        probe_config(**changes)
    return " ".join(str(info.value).split())


def test_the_issues_example_parses_and_enables_the_family() -> None:
    cfg = probe_config()
    assert cfg.kind == "symbol" and cfg.result is not None
    assert cfg.result.op_operand == ("==", 0)
    assert config_from_mapping({}).probes.custom.enabled is False


@pytest.mark.parametrize(("changes", "words"), [
    ({"labels": [{"name": "c", "arg": 1, "type": "u128"}]},
     ["probes.custom.0.labels.0.type", "unknown type 'u128'", "u8, u16"]),
    ({"labels": [{"name": "c", "arg": 6, "type": "u32"}]},
     ["probes.custom.0.labels.0.arg (c)", "0..5", "rdi"]),
    ({"abi": "go", "labels": [{"name": "c", "arg": 9, "type": "u32"}]},
     ["labels.0.arg (c)", "0..8", "r11"]),
    ({"target": {}}, ["probes.custom.0.target", "empty target"]),
    ({"target": {"comm": " "}}, ["empty target"]),
    ({"target": {"pids": []}}, ["empty target"]),
    ({"target": {"exe": "a", "comm": "b"}}, ["exactly one"]),
    ({"symbol": None}, ["exactly one of symbol"]),
    ({"symbol": None, "usdt": "payd"}, ["provider:probe"]),
    ({"symbol": None, "usdt": "payd:done"}, ["a USDT probe is a point"]),
    ({"symbol": None, "python_function": "m:f", "duration": False, "result": None},
     ["CPython's USDT probes pass no arguments"]),
    ({"result": {"ok": "= 0"}}, ["probes.custom.0.result.ok", "== 0"]),
    ({"values": [{"name": "amount", "arg": 0, "type": "f64", "buckets": [1]}]},
     ["SSE register", "offsets"]),
    ({"values": [{"name": "amount", "arg": 0, "type": "str", "buckets": [1]}]},
     ["a histogram needs a number"]),
    ({"values": [{"name": "amount", "arg": 0, "type": "u64", "buckets": [5, 1]}]},
     ["strictly increasing"]),
    ({"labels": [{"name": f"l{i}", "arg": 0, "type": "str", "max_len": 40} for i in range(2)]},
     ["64-byte label budget"]),
    ({"labels": [{"name": "result", "arg": 0, "type": "u8"}]}, ["reserved"]),
    ({"name": "9lives"}, ["not a valid metric prefix"]),
    ({"bogus": 1}, ["probes.custom.0.bogus", "unknown field", "symbol"]),
])
def test_bad_spec_is_an_error_naming_the_probe_and_field(changes: dict[str, Any],
                                                         words: list[str]) -> None:
    message = error_of(**changes)
    for word in [*words, "custom probe 'payments'" if "name" not in changes else ""]:
        assert word in message, message


def test_two_probes_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        config_from_mapping({"probes": {"custom": [GOOD, GOOD]}})


def test_spec_carries_flags_layout_and_bounds() -> None:
    spec = build_spec(probe_config(labels=[
        {"name": "currency", "arg": 1, "type": "u32"},
        {"name": "merchant", "arg": 0, "offsets": [16, 0], "type": "str", "max_len": 16},
        {"name": "vip", "arg": 2, "type": "bool"},
    ]))
    assert spec["flags"] == AT_RETURN | MATCH_SP
    assert spec["n_labels"] == 3 and list(spec["labels"]["key_at"][:3]) == [0, 8, 24]
    assert list(spec["labels"][1]["offsets"][:2]) == [16, 0] and spec["labels"][1]["n_offsets"] == 2
    assert list(spec["values"][0]["bounds"][:3]) == [1000, 10000, 50000]
    assert spec["result_op"] == 1 and spec["result_operand"] == 0
    assert spec["n_duration_bounds"] == 15 and spec["duration_bounds_ns"][0] == 1000
    go = build_spec(probe_config(abi="go"))
    assert go["flags"] == AT_RETURN  # Go pairs by goroutine, not by stack pointer
    py = build_spec(probe_config(symbol=None, python_function="payments.core:Ledger.refund",
                                 labels=[], values=[], result=None, duration=False))
    assert py["flags"] == AT_RETURN | PYTHON  # counted at function__return
    assert py["py_name"] == b"refund" and py["py_n_suffixes"] == 2
    assert py["py_suffix"][0] == b"payments/core.py"


def test_python_module_files_and_the_interpreters_missing_entry_probe() -> None:
    assert python_suffixes("a.b") == ["a/b.py", "a/b/__init__.py"]
    assert python_suffixes("__main__") == []
    assert "gh-98894" in python_entry_note("/usr/bin/python3.11")
    assert python_entry_note("/usr/bin/python3.15") == ""


INT_TYPES = {"u8": (0, 2**8 - 1), "u16": (0, 2**16 - 1), "u32": (0, 2**32 - 1),
             "u64": (0, 2**64 - 1), "s8": (-(2**7), 2**7 - 1), "s16": (-(2**15), 2**15 - 1),
             "s32": (-(2**31), 2**31 - 1), "s64": (-(2**63), 2**63 - 1)}


@given(st.sampled_from(sorted(INT_TYPES)), st.data())
def test_integer_labels_decode_as_the_kernel_stored_them(type_name: str, data: Any) -> None:
    lo, hi = INT_TYPES[type_name]
    value = data.draw(st.integers(lo, hi))
    label = CustomLabel(name="x", arg=0, type=type_name)
    # The kernel writes the normalised value as 8 little-endian bytes (two's complement).
    raw = (value % 2**64).to_bytes(8, "little")
    assert decode_label(raw, label) == str(value)


@given(st.binary(max_size=80))
def test_any_label_bytes_decode_without_raising(raw: bytes) -> None:
    for type_name in ("str", "bool", "f64", "u64", "s32"):
        assert isinstance(decode_label(raw.ljust(8, b"\0"),
                                       CustomLabel(name="x", arg=0, type=type_name)), str)


def test_labels_map_values_and_render_floats_and_strings() -> None:
    named = CustomLabel(name="c", arg=0, type="u32", values={1: "eur"})
    assert decode_label((1).to_bytes(8, "little"), named) == "eur"
    assert decode_label((3).to_bytes(8, "little"), named) == "3"
    assert decode_label((int(2.5 * 65536)).to_bytes(8, "little"),
                        CustomLabel(name="f", arg=0, type="f64", offsets=[0])) == "2.5"
    assert decode_label(b"acme\0junk", CustomLabel(name="m", arg=0, type="str")) == "acme"
    assert label_layout([named, CustomLabel(name="m", arg=0, type="str", max_len=10), named]) \
        == [0, 8, 18]


# --- the ELF side of the uprobe layer ---------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("elf")
    out = {"pie": tmp / "payd", "stripped": tmp / "payd-stripped", "cpp": tmp / "shop"}
    subprocess.run(["gcc", "-O2", "-o", str(out["pie"]), str(PROGS / "payd.c")], check=True)
    subprocess.run(["strip", "--strip-all", "-o", str(out["stripped"]), str(out["pie"])],
                   check=True)
    cpp = tmp / "shop.cc"
    cpp.write_text("namespace shop { struct Cart {\n"
                   "  __attribute__((noinline)) int add(int n) { return n + 1; }\n"
                   "  __attribute__((noinline)) int add(long n) { return (int)n + 2; } }; }\n"
                   "int main(int argc, char **) { shop::Cart c; return c.add(argc) + "
                   "c.add((long)argc); }\n")
    if shutil.which("g++"):
        subprocess.run(["g++", "-O2", "-o", str(out["cpp"]), str(cpp)], check=True)
    return out


def test_pie_symbols_resolve_to_file_offsets(built: dict[str, Path]) -> None:
    elf = ElfFile(str(built["pie"]))
    assert elf.is_pie_or_library and elf.has_symtab and not elf.is_go
    (fn,) = elf.find_functions("process_payment")
    assert elf.file_offset(fn.address) == fn.address  # first PT_LOAD of a PIE maps at 0
    (note,) = elf.find_usdt("payd", "payment_done")
    assert note.arg_count == 3 and note.semaphore == 0


def test_missing_symbol_says_why_and_what_is_near(built: dict[str, Path]) -> None:
    with pytest.raises(SymbolNotFound, match="nearest names: process_payment"):
        ElfFile(str(built["pie"])).find_functions("process_paymnt")
    with pytest.raises(SymbolNotFound, match="stripped binary"):
        ElfFile(str(built["stripped"])).find_functions("process_payment")
    with pytest.raises(SymbolNotFound, match="nearest: payd:payment_done"):
        ElfFile(str(built["pie"])).find_usdt("payd", "payment_dne")


def test_cpp_names_match_demangled_with_every_overload(built: dict[str, Path]) -> None:
    if not built["cpp"].exists():
        pytest.fail("g++ missing (Debian g++)")
    elf = ElfFile(str(built["cpp"]))
    assert len(elf.find_functions("shop::Cart::add")) == 2
    (one,) = elf.find_functions("shop::Cart::add(long)")
    assert one.name.startswith("_ZN4shop4Cart3add")
    assert one in elf.find_functions(one.name)


def test_maps_list_the_executable_and_its_libraries() -> None:
    files = read_maps(int(Path("/proc/self/stat").read_text().split()[0]))
    assert any("libc" in f for f in files)
