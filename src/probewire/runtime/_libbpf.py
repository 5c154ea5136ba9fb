"""ctypes binding over the system libbpf.so.1 (the only module that touches ctypes).

No maintained Python binding of libbpf exists (bcc compiles at run time, which is what we
beat), so the few entry points the agent needs are declared here by hand, against libbpf
1.1's ABI (Debian 12). Everything else in the package uses the typed API in `bpf.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from functools import cache
from typing import Any

from probewire.errors import BpfError

log = logging.getLogger("probewire.libbpf")

# enum libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
# enum bpf_stats_type
BPF_STATS_RUN_TIME = 0
# BTF kinds (uapi/linux/btf.h)
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION = 1, 2, 3, 4, 5
BTF_KIND_ENUM = 6
BTF_KIND_TYPEDEF, BTF_KIND_VAR, BTF_KIND_DATASEC = 8, 14, 15
# map update flags
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_MAP_TYPE_HASH = 1
BPF_F_TEST_RUN_ON_CPU = 1 << 0


class BtfType(Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class BtfMember(Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


class BtfEnum(Structure):
    _fields_ = [("name_off", c_uint32), ("val", ctypes.c_int32)]


class BtfArray(Structure):
    _fields_ = [("type", c_uint32), ("index_type", c_uint32), ("nelems", c_uint32)]


class BtfVarSecinfo(Structure):
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


class MapBatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class UprobeOpts(Structure):
    # struct bpf_uprobe_opts in libbpf 1.1
    _fields_ = [
        ("sz", c_size_t),
        ("ref_ctr_offset", c_size_t),
        ("bpf_cookie", c_uint64),
        ("retprobe", c_bool),
        ("func_name", c_char_p),
    ]


class UsdtOpts(Structure):
    # struct bpf_usdt_opts in libbpf 1.1
    _fields_ = [("sz", c_size_t), ("usdt_cookie", c_uint64)]


class TestRunOpts(Structure):
    # struct bpf_test_run_opts in libbpf 1.1
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "libbpf_strerror": (c_int, [c_int, c_char_p, c_size_t]),
    "libbpf_probe_bpf_prog_type": (c_int, [c_int, c_void_p]),
    # Kernel features tried by loading a tiny program or creating a map (runtime/features.py).
    "libbpf_probe_bpf_map_type": (c_int, [c_int, c_void_p]),
    "libbpf_probe_bpf_helper": (c_int, [c_int, c_int, c_void_p]),
    "btf__load_vmlinux_btf": (c_void_p, []),
    "btf__type_cnt": (c_uint32, [c_void_p]),
    "btf__free": (None, [c_void_p]),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__name": (c_char_p, [c_void_p]),
    "bpf_object__btf": (c_void_p, [c_void_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__section_name": (c_char_p, [c_void_p]),
    "bpf_program__set_autoload": (c_int, [c_void_p, c_bool]),
    "bpf_program__autoload": (c_bool, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_uprobe_opts": (
        c_void_p,
        [c_void_p, c_int, c_char_p, c_size_t, POINTER(UprobeOpts)],
    ),
    "bpf_program__attach_usdt": (
        c_void_p,
        [c_void_p, c_int, c_char_p, c_char_p, c_char_p, POINTER(UsdtOpts)],
    ),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__max_entries": (c_uint32, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
    "bpf_map__set_type": (c_int, [c_void_p, c_int]),
    "bpf_map__set_map_flags": (c_int, [c_void_p, c_uint32]),
    "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, POINTER(c_size_t)]),
    "bpf_map__btf_value_type_id": (c_uint32, [c_void_p]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, POINTER(c_uint32), POINTER(MapBatchOpts)],
    ),
    "bpf_enable_stats": (c_int, [c_int]),
    "bpf_prog_test_run_opts": (c_int, [c_int, POINTER(TestRunOpts)]),
    "bpf_prog_get_next_id": (c_int, [c_uint32, POINTER(c_uint32)]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_link_get_next_id": (c_int, [c_uint32, POINTER(c_uint32)]),
    "bpf_link_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, POINTER(c_uint32)]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_map_create": (c_int, [c_int, c_char_p, c_uint32, c_uint32, c_uint32, c_void_p]),
    "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_uint32]),
    "btf__type_by_id": (POINTER(BtfType), [c_void_p, c_uint32]),
    "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
    "btf__resolve_size": (c_int64, [c_void_p, c_uint32]),
    "btf__resolve_type": (c_int, [c_void_p, c_uint32]),
}


class Lib:
    """The loaded libbpf with typed function attributes (see `_SIGNATURES`)."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        self._fns: dict[str, Any] = {}
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(cdll, name)
            fn.restype = restype
            fn.argtypes = argtypes
            self._fns[name] = fn

    def __getattr__(self, name: str) -> Any:
        try:
            return self._fns[name]
        except KeyError:
            raise AttributeError(f"libbpf function {name} is not declared in _SIGNATURES") from None


@cache
def lib() -> Lib:
    """Load libbpf.so.1 once and route its log to Python logging."""
    path = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        cdll = ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise BpfError(
            f"cannot load libbpf ({path}): {exc}; install it: apt-get install libbpf1"
        ) from exc
    loaded = Lib(cdll)
    loaded.libbpf_set_print(_print_callback)
    return loaded


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.vsnprintf.restype = c_int
    libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
    return libc


_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}
_VERIFIER_LOG_MAX = 1 << 16


def _format_va(fmt: bytes, va_list: int) -> str:
    # On x86-64 and arm64 a va_list parameter is passed as a pointer, so vsnprintf can
    # expand it straight from the callback's argument.
    buf = ctypes.create_string_buffer(_VERIFIER_LOG_MAX)
    _libc().vsnprintf(buf, len(buf), fmt, va_list)
    return buf.value.decode(errors="replace").rstrip("\n")


_capture = threading.local()


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """libbpf's messages on this thread while inside, at every level (libbpf calls its print
    function on the calling thread): a failed load's error quotes the verifier from them."""
    lines: list[str] = []
    outer = getattr(_capture, "lines", None)
    _capture.lines = lines
    try:
        yield lines
    finally:
        _capture.lines = outer


def _print(level: int, fmt: bytes, va_list: int) -> int:
    py_level = _LEVELS.get(level, logging.DEBUG)
    capture: list[str] | None = getattr(_capture, "lines", None)
    if capture is None and not log.isEnabledFor(py_level):
        return 0
    text = _format_va(fmt, va_list)
    if capture is not None:
        capture.append(text)
    log.log(py_level, "%s", text)
    return 0


# Kept referenced for the life of the process: libbpf holds the raw pointer.
_print_callback = PRINT_FN(_print)


def strerror(err: int) -> str:
    err = abs(err)
    buf = ctypes.create_string_buffer(256)
    lib().libbpf_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace") or os.strerror(err)


def last_errno() -> int:
    return ctypes.get_errno()


def version() -> tuple[int, int]:
    return (
        int(lib().libbpf_major_version()),
        int(lib().libbpf_minor_version()),
    )


__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BPF_STATS_RUN_TIME",
    "BTF_KIND_ARRAY",
    "BTF_KIND_DATASEC",
    "BTF_KIND_ENUM",
    "BTF_KIND_STRUCT",
    "BTF_KIND_TYPEDEF",
    "BTF_KIND_UNION",
    "BTF_KIND_VAR",
    "BtfArray",
    "BtfEnum",
    "BtfMember",
    "BtfType",
    "BtfVarSecinfo",
    "MapBatchOpts",
    "UprobeOpts",
    "UsdtOpts",
    "last_errno",
    "lib",
    "strerror",
    "version",
]
