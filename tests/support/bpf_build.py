"""Build a BPF C source outside bpf/ (test harnesses, bench programs) the way bpf/Makefile
builds the agent's objects: clang against the project's headers and the generated vmlinux.h."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def compile_bpf(source: Path, out: Path, defines: dict[str, int] | None = None) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError(f"clang is needed to build {source.name} (scripts/setup.sh installs it)")
    vmlinux = REPO / "bpf" / ".output" / "vmlinux.h"
    if not vmlinux.exists():
        raise RuntimeError("bpf/.output/vmlinux.h is made by `make build`")
    flags = [f"-D{name}={value}" for name, value in (defines or {}).items()]
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}", "-Wall",
                    *flags, "-I", str(REPO / "bpf" / "include"), "-I", str(vmlinux.parent),
                    "-I", str(REPO / "bpf"), "-c", str(source), "-o", str(out)], check=True)
    return out
