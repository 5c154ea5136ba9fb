"""Typed API over libbpf: BpfObject, Program, Map, Link.

Opening an object and reading its BTF needs no privilege; loading and attaching does. Links
are owned by this process (never pinned unless asked), so the kernel detaches them when the
process exits, however it exits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

import numpy as np

from probewire.errors import BpfError, KernelFeatureError, PrivilegeError
from probewire.runtime import _libbpf
from probewire.runtime._libbpf import lib

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}

# The kernel's internal "not supported" (include/linux/errno.h), which leaks to user space:
# 5.10 answers a batch lookup on a per-CPU array with it (no batch ops for that map type yet).
ENOTSUPP = 524

PRIVILEGE_FIX = "run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE"


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def lockdown_mode(path: Path = Path("/sys/kernel/security/lockdown")) -> str:
    """The kernel's lockdown mode ("none", "integrity", "confidentiality"), or "" where the
    kernel has no lockdown LSM."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def _has_bpf_capabilities(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds what loading tracing programs takes (effective set)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            return bool(caps >> _CAP_SYS_ADMIN & 1) or (
                bool(caps >> _CAP_BPF & 1) and bool(caps >> _CAP_PERFMON & 1))
    return True


def _raise_for(what: str, err: int) -> None:
    err = abs(err)
    detail = _libbpf.strerror(err)
    if err in (errno.EPERM, errno.EACCES):
        if os.geteuid() != 0:
            raise PrivilegeError(f"{what}: {detail}; {PRIVILEGE_FIX}")
        mode = lockdown_mode()
        if err == errno.EPERM and mode in ("integrity", "confidentiality"):
            raise KernelFeatureError(
                f"{what}: {detail} although running as root: the kernel is locked down "
                f"({mode}), which refuses BPF that reads kernel memory; boot with "
                "lockdown=none (or without Secure Boot's lockdown) to run probewire"
            )
        if err == errno.EPERM and not _has_bpf_capabilities():
            raise KernelFeatureError(
                f"{what}: {detail} although running as root: the process lacks CAP_BPF and "
                f"CAP_PERFMON (or CAP_SYS_ADMIN) here (a container or user namespace?); "
                f"{PRIVILEGE_FIX} in the host's namespace"
            )
        raise KernelFeatureError(f"{what}: {detail} although running as root; this kernel "
                                 "refuses it (a hook type or helper it does not offer)")
    if err in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ESRCH):
        raise KernelFeatureError(f"{what}: {detail} (errno {err}); this kernel lacks the hook")
    raise BpfError(f"{what}: {detail} (errno {err})")


_PROG_LOG = re.compile(r"prog '([^']+)': -- BEGIN PROG LOAD LOG --\n?(.*?)-- END PROG LOAD LOG --",
                       re.DOTALL)
# The verifier's closing statistics, which say nothing of why it refused.
_VERIFIER_STATS = re.compile(r"^(processed \d+ insns|verification time|stack depth|"
                             r"max_states_per_insn|mark_precise)")
VERIFIER_LINES = 6


def verifier_rejection(libbpf_log: str, keep: int = VERIFIER_LINES) -> tuple[str, list[str]] | None:
    """From libbpf's messages of a failed load: the program the verifier refused and the last
    `keep` lines of its log that say why (the failing instruction and the verifier's verdict
    come last). None when no program's load log is in them (not a verifier rejection)."""
    found = _PROG_LOG.findall(libbpf_log)
    if not found:
        return None
    prog, text = found[-1]
    lines = [line.rstrip() for line in text.splitlines()
             if line.strip() and not _VERIFIER_STATS.match(line.strip())]
    return prog, lines[-keep:] or ["(the verifier's log is empty)"]


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        _raise_for(what, _libbpf.last_errno() or errno.EINVAL)
    assert ptr is not None
    return ptr


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class StructLayout:
    """A C struct as the object's BTF describes it (offsets and sizes in bytes)."""

    name: str
    size: int
    fields: tuple[Field, ...]

    def check_dtype(self, dtype: np.dtype) -> None:
        """Raise BpfError unless `dtype` has exactly this struct's size, names and offsets."""
        problems: list[str] = []
        if dtype.itemsize != self.size:
            problems.append(f"size {dtype.itemsize} != C size {self.size}")
        assert dtype.fields is not None
        py = {n: (int(off), dt.itemsize) for n, (dt, off, *_) in dtype.fields.items()}
        c = {f.name: (f.offset, f.size) for f in self.fields if not f.name.startswith("_pad")}
        py = {n: v for n, v in py.items() if not n.startswith("_pad")}
        for name in sorted(set(py) | set(c)):
            if name not in py:
                problems.append(f"field {name} missing in the Python dtype")
            elif name not in c:
                problems.append(f"field {name} not in the C struct")
            elif py[name] != c[name]:
                problems.append(f"field {name}: Python (offset, size) {py[name]} != C {c[name]}")
        if problems:
            raise BpfError(f"struct {self.name} and its dtype drifted: " + "; ".join(problems))


class Link:
    """An attachment of a program to a hook; destroyed on close or process exit."""

    def __init__(self, ptr: int, description: str) -> None:
        self._ptr: int | None = ptr
        self.description = description

    @property
    def fd(self) -> int:
        return int(lib().bpf_link__fd(self._ptr)) if self._ptr else -1

    def destroy(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None


def obj_info(fd: int, length: int) -> bytes:
    """The first `length` bytes of a BPF object's info struct (BPF_OBJ_GET_INFO_BY_FD), as many
    as the kernel filled (fewer on a kernel whose struct is shorter); b"" on failure."""
    buf = ctypes.create_string_buffer(length)
    size = ctypes.c_uint32(length)
    if lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)) != 0:
        return b""
    return buf.raw[: size.value]


# struct bpf_prog_info (include/uapi/linux/bpf.h, stable ABI): run_time_ns @192, run_cnt @200.
_PROG_INFO_RUN_TIME_AT = 192
_PROG_INFO_STATS_LEN = 208


@dataclass(frozen=True)
class ProgStats:
    run_time_ns: int
    run_cnt: int

    @property
    def avg_ns(self) -> float:
        return self.run_time_ns / self.run_cnt if self.run_cnt else 0.0


class Program:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name: str = lib().bpf_program__name(ptr).decode()
        self.section: str = lib().bpf_program__section_name(ptr).decode()

    @property
    def fd(self) -> int:
        return int(lib().bpf_program__fd(self._ptr))

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self._ptr))

    def set_autoload(self, enabled: bool) -> None:
        rc = lib().bpf_program__set_autoload(self._ptr, enabled)
        if rc:
            _raise_for(f"set autoload of {self.name}", rc)

    def attach(self) -> Link:
        """Attach by the program's SEC() (tp/, tp_btf/, raw_tp/, kprobe/, fentry/...)."""
        ptr = lib().bpf_program__attach(self._ptr)
        _check_ptr(ptr, f"attach {self.name} ({self.section})")
        return Link(ptr, self.section)

    def attach_uprobe(
        self, binary: str, func_name: str, *, retprobe: bool = False, pid: int = -1
    ) -> Link:
        opts = _libbpf.UprobeOpts(
            sz=ctypes.sizeof(_libbpf.UprobeOpts), retprobe=retprobe, func_name=func_name.encode()
        )
        ptr = lib().bpf_program__attach_uprobe_opts(
            self._ptr, pid, binary.encode(), 0, ctypes.byref(opts)
        )
        kind = "uretprobe" if retprobe else "uprobe"
        _check_ptr(ptr, f"attach {kind} {binary}:{func_name}")
        return Link(ptr, f"{kind}:{binary}:{func_name}")

    def attach_uprobe_at(
        self, binary: str, offset: int, *, retprobe: bool = False, pid: int = -1,
        cookie: int = 0, what: str = "",
    ) -> Link:
        """A uprobe at a file offset (the uprobe layer resolves symbols itself), carrying
        `cookie` for bpf_get_attach_cookie; pid -1 is every process mapping the file."""
        opts = _libbpf.UprobeOpts(sz=ctypes.sizeof(_libbpf.UprobeOpts), retprobe=retprobe,
                                  bpf_cookie=cookie)
        ptr = lib().bpf_program__attach_uprobe_opts(
            self._ptr, pid, binary.encode(), offset, ctypes.byref(opts)
        )
        kind = "uretprobe" if retprobe else "uprobe"
        where = f"{binary}:{what or hex(offset)}" + (f" (pid {pid})" if pid >= 0 else "")
        _check_ptr(ptr, f"attach {kind} {where}")
        return Link(ptr, f"{kind}:{where}")

    def attach_usdt(
        self, binary: str, provider: str, name: str, *, pid: int = -1, cookie: int = 0
    ) -> Link:
        """Every site of a USDT probe, through libbpf (which reads the note's operand specs
        and sets the semaphore's kernel reference count); `cookie` is bpf_usdt_cookie()."""
        opts = _libbpf.UsdtOpts(sz=ctypes.sizeof(_libbpf.UsdtOpts), usdt_cookie=cookie)
        ptr = lib().bpf_program__attach_usdt(
            self._ptr, pid, binary.encode(), provider.encode(), name.encode(), ctypes.byref(opts)
        )
        where = f"{binary}:{provider}:{name}" + (f" (pid {pid})" if pid >= 0 else "")
        _check_ptr(ptr, f"attach usdt {where}")
        return Link(ptr, f"usdt:{where}")

    def test_run(self, ctx: bytes, cpu: int | None = None) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN of a SEC("syscall") program with `ctx` as its context, which the
        program may write its results into: (return value, context after the run). `cpu`: run
        a raw_tp program on that CPU (BPF_F_TEST_RUN_ON_CPU, 5.10)."""
        ctx_io = ctypes.create_string_buffer(ctx, len(ctx))
        opts = _libbpf.TestRunOpts(
            sz=ctypes.sizeof(_libbpf.TestRunOpts), ctx_in=ctypes.addressof(ctx_io),
            ctx_size_in=len(ctx),
        )
        if cpu is not None:
            opts.flags, opts.cpu = _libbpf.BPF_F_TEST_RUN_ON_CPU, cpu
        rc = lib().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        if rc:
            _raise_for(f"test run of {self.name}", rc)
        return int(opts.retval), ctx_io.raw

    def stats(self) -> ProgStats:
        """Run time and count from BPF stats (non-zero only while stats are enabled), by
        BPF_OBJ_GET_INFO_BY_FD: a scrape asks for every program's, and one syscall costs a
        fraction of reading and parsing /proc/self/fdinfo."""
        fd = self.fd
        info = obj_info(fd, _PROG_INFO_STATS_LEN) if fd >= 0 else b""
        if len(info) < _PROG_INFO_STATS_LEN:
            return ProgStats(0, 0)  # no program, or a kernel before 5.1 (no BPF stats)
        run_time_ns, run_cnt = struct.unpack_from("<QQ", info, _PROG_INFO_RUN_TIME_AT)
        return ProgStats(run_time_ns, run_cnt)


class Map:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name: str = lib().bpf_map__name(ptr).decode()

    @property
    def fd(self) -> int:
        return int(lib().bpf_map__fd(self._ptr))

    @property
    def type(self) -> int:
        return int(lib().bpf_map__type(self._ptr))

    @property
    def key_size(self) -> int:
        return int(lib().bpf_map__key_size(self._ptr))

    @property
    def value_size(self) -> int:
        return int(lib().bpf_map__value_size(self._ptr))

    @property
    def max_entries(self) -> int:
        return int(lib().bpf_map__max_entries(self._ptr))

    @property
    def percpu(self) -> bool:
        return self.type in _PERCPU_TYPES

    @property
    def value_stride(self) -> int:
        """Bytes one lookup returns: per-CPU maps return one 8-aligned value per CPU."""
        if self.percpu:
            return ((self.value_size + 7) // 8 * 8) * possible_cpus()
        return self.value_size

    def set_max_entries(self, n: int) -> None:
        rc = lib().bpf_map__set_max_entries(self._ptr, n)
        if rc:
            _raise_for(f"resize map {self.name} to {n}", rc)

    def set_type(self, map_type: int, map_flags: int | None = None) -> None:
        """Create the map as another type (a kernel without the declared one), with other
        flags when the declared ones do not fit that type."""
        rc = lib().bpf_map__set_type(self._ptr, map_type)
        if rc:
            _raise_for(f"set the type of map {self.name} to {map_type}", rc)
        if map_flags is not None:
            rc = lib().bpf_map__set_map_flags(self._ptr, map_flags)
            if rc:
                _raise_for(f"set the flags of map {self.name} to {map_flags:#x}", rc)

    def reuse_fd(self, fd: int) -> None:
        """Share an already created map (e.g. the filter maps) instead of creating one."""
        rc = lib().bpf_map__reuse_fd(self._ptr, fd)
        if rc:
            _raise_for(f"reuse fd for map {self.name}", rc)

    # --- element access (after load) -------------------------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_stride)
        rc = lib().bpf_map_lookup_elem(self.fd, key, value)
        if rc:
            if abs(rc) == errno.ENOENT:
                return None
            _raise_for(f"lookup in map {self.name}", rc)
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = _libbpf.BPF_ANY) -> None:
        rc = lib().bpf_map_update_elem(self.fd, key, value, flags)
        if rc:
            _raise_for(f"update map {self.name}", rc)

    def delete(self, key: bytes) -> bool:
        rc = lib().bpf_map_delete_elem(self.fd, key)
        if rc and abs(rc) != errno.ENOENT:
            _raise_for(f"delete from map {self.name}", rc)
        return bool(rc == 0)

    def keys(self) -> Iterator[bytes]:
        key = ctypes.create_string_buffer(self.key_size)
        prev: ctypes.Array[ctypes.c_char] | None = None
        while lib().bpf_map_get_next_key(self.fd, prev, key) == 0:
            yield key.raw
            prev = ctypes.create_string_buffer(key.raw, self.key_size)

    def count(self) -> int:
        """Entries in the map, read in batches (iterating keys costs a syscall per key)."""
        value_size = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size
        keys, _ = self.read_all(np.dtype((np.void, self.key_size)),
                                np.dtype((np.void, value_size)))
        return len(keys)

    def read_all(self, key_dtype: np.dtype, value_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """All entries as (keys, values); per-CPU values come as shape (n, ncpus).

        Uses the batch lookup (one syscall per chunk of up to 4096 entries, buffers sized per
        chunk, not per map capacity) and falls back to key iteration where a map type has no
        batch support.
        """
        self._check_sizes(key_dtype, value_dtype)
        ncpu = possible_cpus() if self.percpu else 1
        cap = max(1, self.max_entries)
        token_in = ctypes.create_string_buffer(max(8, self.key_size))
        token_out = ctypes.create_string_buffer(max(8, self.key_size))
        opts = _libbpf.MapBatchOpts(sz=ctypes.sizeof(_libbpf.MapBatchOpts))
        key_parts: list[np.ndarray] = []
        value_parts: list[np.ndarray] = []
        got = 0
        first = True
        while got < cap:
            chunk = min(4096, cap - got)
            keys = np.zeros(chunk, dtype=key_dtype)
            values = np.zeros((chunk, ncpu) if self.percpu else chunk, dtype=value_dtype)
            count = ctypes.c_uint32(chunk)
            rc = lib().bpf_map_lookup_batch(
                self.fd,
                None if first else token_in,
                token_out,
                keys.ctypes.data,
                values.ctypes.data,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            err = abs(rc) if rc else 0
            if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, ENOTSUPP) and first:
                return self._read_by_iteration(key_dtype, value_dtype)
            if count.value:
                key_parts.append(keys[: count.value])
                value_parts.append(values[: count.value])
            got += count.value
            if err == errno.ENOENT:
                break
            if err:
                _raise_for(f"batch read of map {self.name}", rc)
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False
        if not key_parts:
            empty_values = np.zeros((0, ncpu) if self.percpu else 0, dtype=value_dtype)
            return np.zeros(0, dtype=key_dtype), empty_values
        if len(key_parts) == 1:
            return key_parts[0], value_parts[0]
        return np.concatenate(key_parts), np.concatenate(value_parts)

    def _read_by_iteration(
        self, key_dtype: np.dtype, value_dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        raw_keys = list(self.keys())
        raw_values = [self.lookup(k) or bytes(self.value_stride) for k in raw_keys]
        keys = np.frombuffer(b"".join(raw_keys), dtype=key_dtype)
        values = np.frombuffer(b"".join(raw_values), dtype=value_dtype)
        if self.percpu:
            values = values.reshape(len(raw_keys), possible_cpus())
        return keys.copy(), values.copy()

    def _check_sizes(self, key_dtype: np.dtype, value_dtype: np.dtype) -> None:
        if key_dtype.itemsize != self.key_size or value_dtype.itemsize != (
            (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size
        ):
            raise BpfError(
                f"map {self.name}: dtype sizes ({key_dtype.itemsize}, {value_dtype.itemsize}) "
                f"do not match key/value sizes ({self.key_size}, {self.value_size})"
            )


class StandaloneMap(Map):
    """A map created by the agent itself (bpf_map_create), shared by several objects."""

    def __init__(self, like: Map) -> None:
        self.name = like.name
        self._spec = (like.type, like.key_size, like.value_size, like.max_entries)
        fd = lib().bpf_map_create(like.type, like.name.encode(), like.key_size,
                                  like.value_size, like.max_entries, None)
        if fd < 0:
            _raise_for(f"create map {like.name}", fd)
        self._fd = int(fd)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def type(self) -> int:
        return self._spec[0]

    @property
    def key_size(self) -> int:
        return self._spec[1]

    @property
    def value_size(self) -> int:
        return self._spec[2]

    @property
    def max_entries(self) -> int:
        return self._spec[3]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def destroy_links(links: list[Link]) -> None:
    """Detach many links at once: each detach waits for an RCU grace period (tens of ms), and
    ctypes releases the GIL, so doing them side by side makes shutdown fast."""
    if len(links) <= 1:
        for link in links:
            link.destroy()
        return
    with ThreadPoolExecutor(max_workers=min(16, len(links))) as pool:
        list(pool.map(Link.destroy, links))


class BpfObject:
    """One compiled .bpf.o: open (no privilege) → configure → load → attach programs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BpfError(
                f"BPF object {self.path} not found; build it with `make build` "
                "(or reinstall the probewire package)"
            )
        ptr = lib().bpf_object__open_file(str(self.path).encode(), None)
        self._ptr: int | None = _check_ptr(ptr, f"open BPF object {self.path}")
        self.loaded = False
        self.programs: dict[str, Program] = {}
        prog = lib().bpf_object__next_program(self._ptr, None)
        while prog:
            p = Program(self, prog)
            self.programs[p.name] = p
            prog = lib().bpf_object__next_program(self._ptr, prog)
        self.maps: dict[str, Map] = {}
        m = lib().bpf_object__next_map(self._ptr, None)
        while m:
            mp = Map(self, m)
            self.maps[mp.name] = mp
            m = lib().bpf_object__next_map(self._ptr, m)

    # --- BTF ---------------------------------------------------------------------------------
    def _btf(self) -> int:
        btf = lib().bpf_object__btf(self._ptr)
        if not btf:
            raise BpfError(f"{self.path} has no BTF; compile it with clang -g")
        return int(btf)

    def struct_layout(self, name: str) -> StructLayout:
        btf = self._btf()
        type_id = lib().btf__find_by_name_kind(btf, name.encode(), _libbpf.BTF_KIND_STRUCT)
        if type_id < 0:
            raise BpfError(f"struct {name} not found in the BTF of {self.path}")
        t = lib().btf__type_by_id(btf, type_id).contents
        vlen = t.info & 0xFFFF
        kflag = t.info >> 31
        members = ctypes.cast(
            ctypes.addressof(t) + ctypes.sizeof(_libbpf.BtfType),
            ctypes.POINTER(_libbpf.BtfMember * vlen),
        ).contents
        fields = []
        for m in members:
            bit_offset = m.offset & 0xFFFFFF if kflag else m.offset
            fields.append(
                Field(
                    name=lib().btf__name_by_offset(btf, m.name_off).decode(),
                    offset=bit_offset // 8,
                    size=int(lib().btf__resolve_size(btf, m.type)),
                )
            )
        return StructLayout(name=name, size=t.size_or_type, fields=tuple(fields))

    def enum_values(self, name: str) -> dict[str, int]:
        """The enumerators of C `enum name` as the object's BTF holds them, in order."""
        btf = self._btf()
        type_id = lib().btf__find_by_name_kind(btf, name.encode(), _libbpf.BTF_KIND_ENUM)
        if type_id < 0:
            raise BpfError(f"enum {name} not found in the BTF of {self.path}")
        t = lib().btf__type_by_id(btf, type_id).contents
        vlen = t.info & 0xFFFF
        members = ctypes.cast(
            ctypes.addressof(t) + ctypes.sizeof(_libbpf.BtfType),
            ctypes.POINTER(_libbpf.BtfEnum * vlen),
        ).contents
        return {lib().btf__name_by_offset(btf, m.name_off).decode(): int(m.val) for m in members}

    def set_rodata(self, **values: int | np.ndarray) -> None:
        """Set `const volatile` globals before load (load-time settings). An array global takes
        a numpy array of exactly its size (e.g. ``np.array([...], np.uint64)``)."""
        if self.loaded:
            raise BpfError("const volatile globals can only be set before load")
        rodata = next((m for m in self.maps.values() if m.name.endswith(".rodata")), None)
        if rodata is None:
            raise BpfError(f"{self.path} has no .rodata section to set {sorted(values)}")
        btf = self._btf()
        sec_id = lib().btf__find_by_name_kind(btf, b".rodata", _libbpf.BTF_KIND_DATASEC)
        sec = lib().btf__type_by_id(btf, sec_id).contents
        vlen = sec.info & 0xFFFF
        infos = ctypes.cast(
            ctypes.addressof(sec) + ctypes.sizeof(_libbpf.BtfType),
            ctypes.POINTER(_libbpf.BtfVarSecinfo * vlen),
        ).contents
        size = ctypes.c_size_t()
        data = lib().bpf_map__initial_value(rodata._ptr, ctypes.byref(size))
        placed: set[str] = set()
        for info in infos:
            var = lib().btf__type_by_id(btf, info.type).contents
            name = lib().btf__name_by_offset(btf, var.name_off).decode()
            if name in values:
                value = values[name]
                if isinstance(value, np.ndarray):
                    raw = value.tobytes()
                    if len(raw) != info.size:
                        raise BpfError(f"{self.path}: {name} takes {info.size} bytes, "
                                       f"got an array of {len(raw)}")
                else:
                    raw = int(value).to_bytes(info.size, "little", signed=value < 0)
                ctypes.memmove(data + info.offset, raw, info.size)
                placed.add(name)
        missing = set(values) - placed
        if missing:
            raise BpfError(f"{self.path} has no const volatile globals named {sorted(missing)}")

    # --- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        with _libbpf.captured_log() as messages:
            rc = lib().bpf_object__load(self._ptr)
        if rc:
            rejection = verifier_rejection("\n".join(messages))
            if rejection is not None:
                prog, lines = rejection
                raise KernelFeatureError(
                    f"load {self.path.name}: the kernel's verifier rejected program '{prog}' "
                    f"({_libbpf.strerror(rc)}); its last words:\n    " + "\n    ".join(lines)
                    + "\n(libbpf's warning above in the log has the verifier's whole log; fix the "
                    "program, or switch its family off in the config on this kernel)"
                )
            _raise_for(f"load {self.path.name}", rc)
        self.loaded = True

    def close(self) -> None:
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class StatsHandle:
    """Keeps BPF run-time stats enabled for as long as the fd is open."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# mallopt(3) parameter number (glibc malloc.h).
_M_MMAP_THRESHOLD = -3
# Allocations at least this big get their own mapping, returned to the kernel on free.
HEAP_MMAP_THRESHOLD_BYTES = 1 << 20


def limit_heap_retention() -> None:
    """Keep big transient buffers out of malloc's heaps, so they do not stay in RSS.

    Loading an object makes libbpf parse the kernel's BTF (several MB) and free it again. The
    families load in parallel threads, so that happens in several malloc arenas; glibc's dynamic
    mmap threshold (raised to the size of the first big buffer freed) then serves the later ones
    from those arenas, whose top is never trimmed below twice that size: 10-25 MB of the agent's
    RSS stayed after start-up. A fixed threshold turns that dynamic behaviour off. Without
    glibc's mallopt there is nothing to do; a refusal (returns 0) only costs that memory.
    """
    try:
        mallopt = _libbpf._libc().mallopt
    except (OSError, AttributeError):
        return
    mallopt.restype = ctypes.c_int
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD_BYTES)


def enable_stats() -> StatsHandle:
    fd = lib().bpf_enable_stats(_libbpf.BPF_STATS_RUN_TIME)
    if fd < 0:
        _raise_for("enable BPF run-time stats", fd)
    return StatsHandle(int(fd))


class StatsSampler:
    """Keeps BPF run-time stats on for `window_s` of every `period_s`.

    Stats are host-wide: while on, every BPF program on the host (not only ours) pays two
    sched_clock() reads per run; on a VM whose sched_clock is the paravirtual clock that was
    2.7% of all CPU samples in a perf profile of nginx under wrk. Run time and run count both
    grow only inside the windows, so their ratio (ns per run) is still right.
    """

    def __init__(self, window_s: float = 1.0, period_s: float = 5.0, delay_s: float = 1.0) -> None:
        self.window_s = window_s
        self.period_s = period_s
        # The first window opens after start-up settled (loading and attaching is no steady
        # state to measure).
        self.delay_s = delay_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        enable_stats().close()  # fail now (and loudly) if stats cannot be turned on at all
        self._thread = threading.Thread(target=self._run, name="probewire-bpf-stats",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._stop.wait(self.delay_s)
        while not self._stop.is_set():
            handle = enable_stats()
            try:
                self._stop.wait(self.window_s)
            finally:
                handle.close()
            self._stop.wait(self.period_s - self.window_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
