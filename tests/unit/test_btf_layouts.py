"""Record and key dtypes match the C structs in the compiled objects' BTF (no root needed)."""

from __future__ import annotations

import numpy as np
import pytest

from probewire.errors import BpfError
from probewire.probes import REGISTRY
from probewire.runtime.bpf import BpfObject
from probewire.runtime.objects import object_path

CASES = [(p.object_name, s, d) for p in REGISTRY.values() for s, d in p.structs.items()]


@pytest.mark.parametrize(("obj_name", "struct", "dtype"), CASES,
                         ids=[f"{o}.{s}" for o, s, _ in CASES])
def test_python_dtype_matches_c_struct(obj_name: str, struct: str, dtype: np.dtype) -> None:
    with BpfObject(object_path(obj_name)) as obj:
        layout = obj.struct_layout(struct)
        layout.check_dtype(dtype)
        assert layout.size == dtype.itemsize


def test_drifted_dtype_is_reported_with_the_field() -> None:
    from probewire.probes.tcp import TCP_FLOW_KEY

    drifted = np.dtype([("tgid", np.uint32), ("port", np.uint32), ("direction", np.uint8),
                        ("family", np.uint8), ("raddr", np.uint8, (14,))])
    assert drifted.itemsize == TCP_FLOW_KEY.itemsize
    with BpfObject(object_path("tcp")) as obj, pytest.raises(BpfError, match="field port"):
        obj.struct_layout("tcp_flow_key").check_dtype(drifted)


def test_every_probe_declares_programs_that_exist_in_its_object() -> None:
    for probe in REGISTRY.values():
        with BpfObject(object_path(probe.object_name)) as obj:
            for hook in probe.hooks:
                assert set(hook.programs) <= set(obj.programs), hook


def test_l7_constants_module_is_what_the_object_btf_says() -> None:
    """Kernel/user constants have one source, the C enums: the committed module is generated
    from the object's BTF (scripts/gen_constants.py; `make constants` rewrites it)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_constants.py"
    spec = importlib.util.spec_from_file_location("gen_constants", script)
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.TARGET.read_text() == gen.generate(), "run `make constants`: bpf/l7 enums changed"


def test_every_header_field_starts_every_l7_record_at_the_same_offset() -> None:
    """Records share one neutral header: the type tag first, then the protocol."""
    from probewire.l7.records import HTTP_EXCHANGE, L7_DATA, L7_HEADER

    with BpfObject(object_path("l7")) as obj:
        header = obj.struct_layout("l7_header")
        assert [f.name for f in header.fields][:2] == ["kind", "proto"]
        for record in ("http_exchange", "l7_data"):
            layout = obj.struct_layout(record)
            assert layout.fields[: len(header.fields)] == header.fields, record
    for dtype in (HTTP_EXCHANGE, L7_DATA):
        assert dtype.names is not None and L7_HEADER.names is not None
        assert dtype.names[: len(L7_HEADER.names)] == L7_HEADER.names
