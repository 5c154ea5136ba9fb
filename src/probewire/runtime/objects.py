"""Where the compiled BPF objects live: inside the installed package (probewire/bpf/)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from probewire.errors import BpfError


def object_path(family: str) -> Path:
    path = Path(str(resources.files("probewire") / "bpf" / f"{family}.bpf.o"))
    if not path.is_file():
        raise BpfError(
            f"BPF object {path} is missing; build it with `make build` "
            "(a wheel built by `pip wheel .` ships it)"
        )
    return path
