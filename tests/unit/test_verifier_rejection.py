"""What a failed load's error quotes from libbpf's log (runtime/bpf.verifier_rejection), and
how the lockdown mode is read."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from probewire.runtime.bpf import lockdown_mode, verifier_rejection

LIBBPF_1_1_LOG = """libbpf: prog 'handle_exec': BPF program load failed: Permission denied
libbpf: prog 'handle_exec': -- BEGIN PROG LOAD LOG --
0: R1=ctx(off=0,imm=0) R10=fp0
; int handle_exec(void *ctx)
0: (85) call bpf_get_prandom_u32#7    ; R0_w=scalar()
1: (61) r0 = *(u32 *)(r0 +0)
R0 invalid mem access 'scalar'
processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
-- END PROG LOAD LOG --
libbpf: prog 'handle_exec': failed to load: -13
libbpf: failed to load object 'process.bpf.o'"""


def test_the_refused_program_and_the_verifiers_last_lines_without_its_statistics() -> None:
    found = verifier_rejection(LIBBPF_1_1_LOG, keep=2)
    assert found == ("handle_exec", ["1: (61) r0 = *(u32 *)(r0 +0)",
                                     "R0 invalid mem access 'scalar'"])


def test_no_load_log_is_no_verifier_rejection() -> None:
    assert verifier_rejection("libbpf: failed to load object 'x.bpf.o'") is None


@given(st.text())
def test_any_log_text_gives_a_rejection_or_none_and_never_raises(text: str) -> None:
    found = verifier_rejection(text)
    assert found is None or (isinstance(found[0], str) and found[1])


def test_lockdown_mode_is_the_bracketed_one(tmp_path: Path) -> None:
    f = tmp_path / "lockdown"
    f.write_text("none [integrity] confidentiality\n")
    assert lockdown_mode(f) == "integrity"
    assert lockdown_mode(tmp_path / "absent") == ""
