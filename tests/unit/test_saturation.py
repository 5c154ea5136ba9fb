"""saturation family's pure parts: which hooks a config attaches, kernel dev_t and cgroup path
decoding, kallsyms ranges, the windowed saturation thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probewire.config import config_from_mapping
from probewire.enrich.service import ServiceResolver
from probewire.errors import ConfigError
from probewire.probes.base import ProbeContext
from probewire.probes.saturation import (
    OOM_NAME_LEN,
    OOM_PATH_DEPTH,
    SaturationProbe,
    _Folded,
    cgroup_path,
    device_name,
    kallsyms_range,
    kernel_dev,
)
from probewire.serve.saturation import saturated_by


def _probe(**switches: bool) -> SaturationProbe:
    config = config_from_mapping({"probes": {"saturation": switches}})
    return SaturationProbe(ProbeContext(config, ServiceResolver(())))


def test_each_switch_leaves_its_hooks_unattached() -> None:
    assert {h.name for h in _probe().active_hooks()} == {h.name for h in SaturationProbe.hooks}
    assert "block_rq_issue" not in {h.name for h in _probe(block=False).active_hooks()}
    # sched_switch serves both CPU time and the run queue: off only when both are.
    assert "sched_switch" in {h.name for h in _probe(runqueue=False).active_hooks()}
    assert {h.name for h in _probe(runqueue=False, cpu=False, block=False, listen=False,
                                   oom=False).active_hooks()} == set()


def test_an_unknown_switch_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"probes\.saturation\.runq"):
        config_from_mapping({"probes": {"saturation": {"runq": False}}})


@given(st.integers(0, (1 << 12) - 1), st.integers(0, (1 << 20) - 1))
def test_kernel_dev_t_splits_into_major_and_minor(major: int, minor: int) -> None:
    assert kernel_dev(major << 20 | minor) == (major, minor)


def test_device_name_from_sysfs_or_numbers(tmp_path: Path) -> None:
    (tmp_path / "7:3").mkdir()
    (tmp_path / "7:3" / "uevent").write_text("MAJOR=7\nMINOR=3\nDEVNAME=loop3\n")
    assert device_name(7 << 20 | 3, tmp_path) == "loop3"
    assert device_name(8 << 20 | 1, tmp_path) == "8:1"


def _components(names: list[str]) -> np.ndarray:
    out = np.zeros(OOM_PATH_DEPTH, dtype=f"S{OOM_NAME_LEN}")
    out[: len(names)] = [n.encode() for n in names]
    return out


def test_cgroup_path_from_leaf_first_components() -> None:
    assert cgroup_path(_components(["pod1", "kubepods"]), 2) == "/kubepods/pod1"
    assert cgroup_path(_components([]), 0) == "/"
    deep = [f"c{i}" for i in range(OOM_PATH_DEPTH)]
    assert cgroup_path(_components(deep), OOM_PATH_DEPTH).startswith("…/c7/")


def test_kallsyms_range_ends_at_the_next_symbol(tmp_path: Path) -> None:
    k = tmp_path / "kallsyms"
    k.write_text("ffffffff82075000 T tcp_rcv_state_process\nffffffff82074000 T a\n"
                 "ffffffff82076800 t b\n")
    assert kallsyms_range("tcp_rcv_state_process", k) == (0xFFFFFFFF82075000, 0xFFFFFFFF82076800)
    assert kallsyms_range("missing", k) == (0, 0)
    (tmp_path / "hidden").write_text("0000000000000000 T tcp_rcv_state_process\n")
    assert kallsyms_range("tcp_rcv_state_process", tmp_path / "hidden") == (0, 0)


def test_folded_totals_never_go_down_when_keys_vanish_or_repeat_labels() -> None:
    folded = _Folded(1)
    keys = np.array([1, 2], dtype=np.uint32)
    out = folded.update(keys, np.array([[5.0], [7.0]]), lambda k: ("svc",))
    assert out == {("svc",): pytest.approx(np.array([12.0]))}
    out = folded.update(keys[:1], np.array([[6.0]]), lambda k: ("svc",))
    assert out[("svc",)][0] == 13.0  # key 2 retired with its last 7


def _row(**kw: float | None) -> dict:
    row = {"runqueue_p99_seconds": None, "disk_p99_seconds": None,
           "listen_overflows_window": 0.0, "oom_kills_window": 0.0}
    row.update(kw)
    return row


def test_saturation_thresholds() -> None:
    assert saturated_by(_row()) == []
    assert saturated_by(_row(runqueue_p99_seconds=0.011)) == ["cpu run queue"]
    assert saturated_by(_row(disk_p99_seconds=0.049)) == []
    assert saturated_by(_row(disk_p99_seconds=0.05, listen_overflows_window=1,
                             oom_kills_window=1)) == ["disk latency", "listen queue overflow",
                                                      "OOM kill"]
