#!/usr/bin/env python3
"""Writes src/probewire/l7/constants.py from the enums in the BTF of the built l7 object.

Kernel/user constants are declared once, in C (bpf/l7/*.h); this module is how Python gets
them. Run `make constants` after changing an enum; tests/unit/test_btf_layouts.py fails while
the committed module and the object disagree. Reading BTF needs no privilege.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "src" / "probewire" / "l7" / "constants.py"

# (C enum, Python class, prefix stripped from its enumerators, IntFlag?)
ENUMS = (
    ("l7_proto", "Proto", "L7_PROTO_", False),
    ("l7_role", "Role", "L7_ROLE_", False),
    ("l7_dir", "Direction", "L7_DIR_", False),
    ("l7_transport", "Transport", "L7_", False),
    ("l7_record", "RecordKind", "L7_RECORD_", False),
    ("l7_flag", "L7Flag", "L7_FLAG_", True),
    ("l7_coverage", "Coverage", "L7_COV_", False),
    ("http_method", "HttpMethod", "HTTP_", False),
    ("http_flag", "HttpFlag", "HTTP_FLAG_", True),
)
# Sizes: enumerators that become module constants, named as in C without the LIMIT_ part.
LIMITS = ("l7_limit", "l7_data_limit", "http_limit")


def render(enum_values: dict[str, dict[str, int]]) -> str:
    out = [
        '"""Kernel/user constants of the l7 family, generated from the BTF of l7.bpf.o by',
        "scripts/gen_constants.py: do not edit. Their one source is the C enums in bpf/l7/*.h;",
        'run `make constants` after changing one (tests/unit/test_btf_layouts.py checks)."""',
        "",
        "import enum",
        "",
    ]
    for c_name in LIMITS:
        for name, value in enum_values[c_name].items():
            out.append(f"{name.replace('LIMIT_', '')} = {value}")
    for c_name, py_name, prefix, flag in ENUMS:
        base = "enum.IntFlag" if flag else "enum.IntEnum"
        out += ["", "", f"class {py_name}({base}):", f'    """enum {c_name}"""', ""]
        for name, value in enum_values[c_name].items():
            if not name.startswith(prefix):
                raise SystemExit(f"enum {c_name}: {name} lacks the prefix {prefix}")
            out.append(f"    {name[len(prefix):]} = {value}")
    return "\n".join(out) + "\n"


def generate() -> str:
    sys.path.insert(0, str(REPO / "src"))
    from probewire.runtime.bpf import BpfObject
    from probewire.runtime.objects import object_path

    obj = BpfObject(object_path("l7"))
    try:
        names = [c for c, *_ in ENUMS] + list(LIMITS)
        return render({name: obj.enum_values(name) for name in names})
    finally:
        obj.close()


if __name__ == "__main__":
    TARGET.write_text(generate())
    print(f"wrote {TARGET.relative_to(REPO)}")
