"""Decoding of process records: argv bytes, exit status classes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from probewire.probes.process import decode_argv, exit_status


@given(st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b),
                min_size=1, max_size=8))
def test_argv_round_trips_nul_separated_strings(args: list[bytes]) -> None:
    raw = b"\0".join(args) + b"\0"
    decoded = decode_argv(raw.ljust(len(raw) + 16, b"\0"), len(raw))
    assert decoded == tuple(a.decode(errors="replace") for a in args)


@given(st.binary(max_size=200), st.integers(min_value=-10, max_value=400))
def test_argv_never_raises_on_garbage(raw: bytes, length: int) -> None:
    assert all(isinstance(a, str) and a for a in decode_argv(raw, length))


def test_truncated_argv_keeps_the_prefix() -> None:
    assert decode_argv(b"python3\0-m\0http.ser", 19) == ("python3", "-m", "http.ser")


def test_exit_status_classes() -> None:
    assert exit_status(0, 0) == "ok"
    assert exit_status(3, 0) == "error"
    assert exit_status(-1, 9) == "killed"
