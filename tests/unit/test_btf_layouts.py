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
