"""The feature probe (runtime/features.py) agrees with bpftool's own probe of the running kernel,
on this host and on every kernel of the matrix (scripts/kernels): the agent's choices rest on it.

Needs: root, bpftool (scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from probewire.runtime.features import KERNEL_FEATURES, probe_kernel_features

pytestmark = pytest.mark.bpf

# bpftool's names for what KERNEL_FEATURES tries (helpers as offered to tracepoint programs).
BPFTOOL_MAPS = {"ringbuf": "have_ringbuf_map_type", "task_storage": "have_task_storage_map_type"}
BPFTOOL_HELPERS = {"bpf_loop": "bpf_loop", "task_pt_regs": "bpf_task_pt_regs",
                   "current_task_btf": "bpf_get_current_task_btf"}


def test_kernel_features_match_bpftool_feature_probe_and_kernel_btf() -> None:
    probe = json.loads(subprocess.run(
        ["bpftool", "-j", "feature", "probe", "kernel"], capture_output=True, text=True,
        check=True, timeout=900).stdout)
    ours = probe_kernel_features()
    assert set(ours) == set(KERNEL_FEATURES)
    assert set(BPFTOOL_MAPS) | set(BPFTOOL_HELPERS) | {"bpf_rdonly_cast"} == set(ours)
    for name, key in BPFTOOL_MAPS.items():
        assert ours[name].available == probe["map_types"][key], (name, ours[name])
    helpers = set(probe["helpers"]["tracepoint_available_helpers"])
    for name, helper in BPFTOOL_HELPERS.items():
        assert ours[name].available == (helper in helpers), (name, ours[name])
    btf = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert ours["bpf_rdonly_cast"].available == ("FUNC 'bpf_rdonly_cast'" in btf)
    for name, s in ours.items():
        assert s.available == (s.reason == ""), (name, s)
