"""Build hook: compile the BPF objects (make -C bpf) before packaging them as package data.

Everything declarative lives in pyproject.toml; this file only adds the build step, so
`pip wheel .`, `python -m build` and `pip install -e .` all ship fresh `probewire/bpf/*.bpf.o`
and the target machine needs no clang.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
BPF_DIR = ROOT / "bpf"
OBJ_DIR = ROOT / "src" / "probewire" / "bpf"
# Set PROBEWIRE_SKIP_BPF_BUILD=1 to package objects that were built beforehand (no toolchain).
SKIP_ENV = "PROBEWIRE_SKIP_BPF_BUILD"


def build_bpf_objects() -> None:
    sources = sorted(BPF_DIR.glob("*.bpf.c"))
    if not sources:
        return
    if os.environ.get(SKIP_ENV) == "1":
        objects = [OBJ_DIR / s.name.replace(".bpf.c", ".bpf.o") for s in sources]
        missing = [o.name for o in objects if not o.exists()]
        if missing:
            raise SystemExit(f"{SKIP_ENV}=1 but {missing} are missing: run `make build` first")
        return
    needed = ("make", os.environ.get("CLANG", "clang"), "bpftool")
    tools = [t for t in needed if not shutil.which(t)]
    if tools:
        raise SystemExit(
            f"building the BPF objects needs {', '.join(tools)}: run scripts/setup.sh "
            f"(or apt-get install clang llvm libbpf-dev bpftool make), "
            f"or set {SKIP_ENV}=1 to package prebuilt objects"
        )
    subprocess.run(["make", "-C", str(BPF_DIR)], check=True)


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        build_bpf_objects()
        # setuptools computes the package-data list lazily; drop any cached copy made before the
        # objects existed so the freshly built ones are picked up.
        self.__dict__.pop("data_files", None)
        super().run()


class SdistWithBpfSources(sdist):
    """Ship the kernel sources and their Makefile, so a wheel built from the sdist builds them."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        extra = [BPF_DIR / "Makefile", *BPF_DIR.glob("*.bpf.c"), *BPF_DIR.glob("*.h")]
        extra += BPF_DIR.glob("include/*.h")
        names = [str(p.relative_to(ROOT)) for p in extra if p.is_file()]
        super().make_release_tree(base_dir, [*files, *(n for n in names if n not in files)])


setup(cmdclass={"build_py": BuildPyWithBpf, "sdist": SdistWithBpfSources})
