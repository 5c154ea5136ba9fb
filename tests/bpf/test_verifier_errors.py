"""A program the kernel's verifier refuses: the load error names the program and quotes the
verifier's verdict (captured from libbpf's log), and does not blame lockdown or privileges.
Needs: root, clang."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.bpf_build import compile_bpf

from probewire.errors import KernelFeatureError
from probewire.runtime.bpf import BpfObject

HERE = Path(__file__).parent


def test_a_verifier_rejection_names_the_program_and_quotes_the_verifier(tmp_path: Path) -> None:
    obj_path = compile_bpf(HERE / "verifier_reject.bpf.c", tmp_path / "verifier_reject.bpf.o")
    with BpfObject(obj_path) as obj, pytest.raises(KernelFeatureError) as caught:
        obj.load()
    message = str(caught.value)
    print(message)
    assert "verifier rejected program 'reads_a_number_as_a_pointer'" in message
    # The verdict: 'scalar' since 5.18, 'inv' before.
    assert "R0 invalid mem access" in message
    assert "lockdown" not in message
    assert "processed " not in message  # the closing statistics are left out
