"""What a uprobe needs from an ELF file: functions, their file offsets, USDT notes, Go sites.

Symbols come from .symtab and .dynsym (a stripped binary keeps only .dynsym, its exported
functions), including PIE executables and shared libraries (a uprobe takes a file offset, which
the program headers give for any virtual address). C++ names match mangled or demangled
(`ns::Cls::method` or `ns::Cls::method(int)`); Go names as Go spells them (`main.process`).

pyelftools reads the headers, sections and notes. The symbol tables themselves are decoded with
numpy: pyelftools builds a Python object per symbol (0.24 s for python3.11's 2,208 .dynsym
entries here), numpy reads the same table as one array. Demangling is libstdc++'s own
__cxa_demangle (through cxxfilt); Go's return sites are found by disassembling with capstone.
"""

from __future__ import annotations

import difflib
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

from probewire.errors import ProbewireError

__all__ = ["ElfFile", "Function", "GoSites", "SymbolNotFound", "UsdtNote", "file_id"]

_SYM64 = np.dtype([("st_name", "<u4"), ("st_info", "u1"), ("st_other", "u1"),
                   ("st_shndx", "<u2"), ("st_value", "<u8"), ("st_size", "<u8")])
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_PF_X = 1
_NEAREST = 5
_CLONE = re.compile(r" \[clone [^\]]*\]")


class SymbolNotFound(ProbewireError):
    """A function or USDT probe is not in a file; the message says why and what is near."""


def file_id(path: str) -> tuple[int, int] | None:
    """(device, inode): what the kernel attaches a uprobe to, whatever path reached it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class Function:
    name: str  # as in the symbol table (mangled for C++)
    address: int  # virtual address
    size: int


@dataclass(frozen=True)
class UsdtNote:
    provider: str
    name: str
    address: int  # virtual address of the probe site (prelink-adjusted)
    semaphore: int  # virtual address of its semaphore, 0 when it has none
    args: str  # the operand specs, e.g. "8@%rbp 8@%r12 -4@%eax"

    @property
    def arg_count(self) -> int:
        return len(self.args.split()) if self.args else 0


@dataclass(frozen=True)
class GoSites:
    """Where to probe a Go function: its entry after the stack check, and each RET."""

    entry: int  # virtual address
    returns: tuple[int, ...]


@dataclass(frozen=True)
class _Segment:
    vaddr: int
    offset: int
    filesz: int
    executable: bool


class ElfFile:
    """One ELF file, read lazily; cheap to keep per (device, inode)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                self.elf_type: str = elf["e_type"]
                self.machine: str = elf["e_machine"]
                self.elfclass: int = elf.elfclass
                self._segments = tuple(
                    _Segment(s["p_vaddr"], s["p_offset"], s["p_filesz"], bool(s["p_flags"] & _PF_X))
                    for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"
                )
                self._sections = {s.name: (s["sh_addr"], s["sh_offset"], s["sh_size"],
                                           s["sh_link"], s["sh_type"])
                                  for s in elf.iter_sections()}
                self._section_names = [s.name for s in elf.iter_sections()]
                self._notes = self._read_notes(elf)
        except (OSError, ELFError, struct.error, ValueError) as exc:
            raise SymbolNotFound(f"{path}: not a readable ELF file ({exc})") from None

    # --- what kind of file ----------------------------------------------------------------
    @property
    def is_pie_or_library(self) -> bool:
        return self.elf_type == "ET_DYN"

    @property
    def has_symtab(self) -> bool:
        return ".symtab" in self._sections

    @property
    def is_go(self) -> bool:
        return ".go.buildinfo" in self._sections or ".gopclntab" in self._sections

    # --- symbols ---------------------------------------------------------------------------
    def _read_table(self, name: str) -> dict[str, list[Function]]:
        sec = self._sections.get(name)
        if sec is None or self.elfclass != 64:
            return {}
        _, offset, size, link, _ = sec
        strtab_name = self._section_names[link] if link < len(self._section_names) else ""
        strtab = self._sections.get(strtab_name)
        if strtab is None:
            return {}
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
            f.seek(strtab[1])
            names = f.read(strtab[2])
        syms = np.frombuffer(raw[: len(raw) // _SYM64.itemsize * _SYM64.itemsize], _SYM64)
        kind = syms["st_info"] & 0xF
        keep = ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (syms["st_value"] != 0) & (
            syms["st_shndx"] != 0)
        out: dict[str, list[Function]] = {}
        for name_off, value, sym_size in zip(syms["st_name"][keep].tolist(),
                                             syms["st_value"][keep].tolist(),
                                             syms["st_size"][keep].tolist(), strict=True):
            end = names.find(b"\0", name_off)
            sym = names[name_off:end if end >= 0 else None].decode(errors="replace")
            # Versioned names (.dynsym's "memcpy@@GLIBC_2.14" are split by the loader, but some
            # tools write them into .symtab): the bare name is what users write.
            sym = sym.split("@", 1)[0]
            if sym:
                fns = out.setdefault(sym, [])
                if all(fn.address != value for fn in fns):
                    fns.append(Function(sym, value, sym_size))
        return out

    @cached_property
    def functions(self) -> dict[str, list[Function]]:
        """Every defined function, .symtab first, then exported ones .symtab lacks."""
        table = self._read_table(".symtab")
        for sym, fns in self._read_table(".dynsym").items():
            table.setdefault(sym, fns)
        return table

    @cached_property
    def _demangled(self) -> dict[str, list[Function]]:
        """Demangled C++ names, with and without their parameter list."""
        import cxxfilt

        out: dict[str, list[Function]] = {}
        for sym, fns in self.functions.items():
            if not sym.startswith("_Z"):
                continue
            try:
                full = cxxfilt.demangle(sym)
            except cxxfilt.InvalidName:
                continue
            # GCC's specialised copies ("f(int) [clone .isra.0]") are the code that runs when
            # the original was optimised away; their arguments may differ (see README).
            plain = _CLONE.sub("", full)
            for key in {full, plain, _without_params(plain)}:
                out.setdefault(key, []).extend(fns)
        return out

    def find_functions(self, name: str) -> list[Function]:
        """The function `name` names: a symbol, or every C++ overload of a demangled name."""
        found = self.functions.get(name)
        if found:
            return found
        found = self._demangled.get(name)
        if found:
            return sorted(set(found), key=lambda fn: fn.address)
        raise SymbolNotFound(self.why_missing(name))

    def why_missing(self, name: str) -> str:
        near = self.nearest(name)
        near_text = f"; nearest names: {', '.join(near)}" if near else ""
        if not self.has_symtab:
            return (f"{name} not found in {self.path}: a stripped binary (no .symtab), and "
                    f"{name} is not exported in .dynsym{near_text}")
        return f"no such symbol {name} in {self.path}{near_text}"

    def nearest(self, name: str, n: int = _NEAREST) -> list[str]:
        candidates: Iterable[str] = list(self.functions)
        if "::" in name or "(" in name:
            candidates = list(self._demangled)
        return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)

    # --- addresses -------------------------------------------------------------------------
    def file_offset(self, address: int) -> int:
        """The file offset of a virtual address in an executable segment (what uprobes take)."""
        for seg in self._segments:
            if seg.executable and seg.vaddr <= address < seg.vaddr + seg.filesz:
                return address - seg.vaddr + seg.offset
        raise SymbolNotFound(f"{self.path}: address {address:#x} is in no executable segment")

    def code(self, fn: Function) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.file_offset(fn.address))
            return f.read(fn.size)

    # --- USDT ------------------------------------------------------------------------------
    def _read_notes(self, elf: ELFFile) -> tuple[UsdtNote, ...]:
        sec = elf.get_section_by_name(".note.stapsdt")
        if not isinstance(sec, NoteSection):
            return ()
        base_sec = self._sections.get(".stapsdt.base")
        word = 8 if elf.elfclass == 64 else 4
        fmt = "<QQQ" if word == 8 else "<III"
        notes = []
        for note in sec.iter_notes():
            if note["n_name"] != "stapsdt" or note["n_descsz"] < 3 * word:
                continue
            desc: bytes = note["n_descdata"]
            pc, base, semaphore = struct.unpack_from(fmt, desc)
            provider, name, args, *_ = [*desc[3 * word:].split(b"\0"), b"", b"", b""]
            if base_sec is not None and base:
                # prelink moves sections; the note records where .stapsdt.base was.
                pc += base_sec[0] - base
            notes.append(UsdtNote(provider.decode(errors="replace"), name.decode(errors="replace"),
                                  pc, semaphore, args.decode(errors="replace")))
        return tuple(notes)

    @property
    def usdt_notes(self) -> tuple[UsdtNote, ...]:
        return self._notes

    def find_usdt(self, provider: str, name: str) -> list[UsdtNote]:
        found = [n for n in self._notes if n.provider == provider and n.name == name]
        if found:
            return found
        if not self._notes:
            raise SymbolNotFound(f"{self.path} has no USDT probes (no .note.stapsdt section)")
        names = sorted({f"{n.provider}:{n.name}" for n in self._notes})
        near = difflib.get_close_matches(f"{provider}:{name}", names, n=_NEAREST, cutoff=0.5)
        raise SymbolNotFound(f"no USDT probe {provider}:{name} in {self.path}; "
                             f"nearest: {', '.join(near) or ', '.join(names[:_NEAREST])}")

    # --- Go --------------------------------------------------------------------------------
    def go_sites(self, fn: Function) -> GoSites:
        """Entry after Go's stack-growth check, and every RET of a Go function (x86-64).

        A goroutine that outgrows its stack calls morestack from the prologue and re-enters the
        function from its first instruction, so a probe there would see such a call twice; the
        arguments are still in their registers right after the check's conditional jump. Return
        probes go on the RET instructions because a uretprobe rewrites the return address on a
        stack that Go copies elsewhere when it grows.
        """
        if self.machine != "EM_X86_64":
            raise SymbolNotFound(f"{self.path}: abi go is supported on x86-64 only, "
                                 f"not {self.machine}")
        import capstone

        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        code = self.code(fn)
        entry = fn.address
        returns = []
        insns = list(md.disasm(code, fn.address))
        for i, insn in enumerate(insns[:6]):
            if insn.mnemonic in ("jbe", "jna") and insn.op_str.startswith("0x"):
                target = int(insn.op_str, 16)
                if fn.address < target < fn.address + fn.size and i + 1 < len(insns):
                    entry = insns[i + 1].address
                break
        for insn in insns:
            if insn.mnemonic == "ret":
                returns.append(insn.address)
        if not returns:
            raise SymbolNotFound(f"{fn.name} in {self.path} has no RET instruction (it never "
                                 "returns, or ends in a tail jump); drop duration and result")
        return GoSites(entry, tuple(returns))


def _without_params(demangled: str) -> str:
    """`ns::f(int) const` -> `ns::f`; operator() and templates are kept whole."""
    depth = 0
    for i in range(len(demangled) - 1, -1, -1):
        c = demangled[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                head = demangled[:i]
                return head if not head.endswith("operator") else demangled
    return demangled


def read_maps(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """Files a process maps, executable ones first, in address order, without duplicates."""
    try:
        text = (proc / str(pid) / "maps").read_text()
    except OSError:
        return []
    exec_files: dict[str, None] = {}
    other: dict[str, None] = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            path = parts[5].strip()
            if path.endswith(" (deleted)"):
                continue  # replaced on disk: the path now names another file
            (exec_files if "x" in parts[1] else other)[path] = None
    return [*exec_files, *(p for p in other if p not in exec_files)]
