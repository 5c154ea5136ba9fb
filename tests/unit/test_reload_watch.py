"""The config watcher sees kubelet's atomic ConfigMap swaps (symlink chains), and the keys that
wait for a restart are named."""

from __future__ import annotations

import os
from pathlib import Path

from probewire.config import config_from_mapping
from probewire.reload import ConfigWatcher, restart_needed


def _swap(root: Path, version: int, text: str) -> None:
    target = root / f"..v{version}"
    target.mkdir()
    (target / "config.yaml").write_text(text)
    (root / "..tmp").symlink_to(target.name)
    os.replace(root / "..tmp", root / "..data")


def test_symlink_swap_is_a_change_and_a_mid_swap_miss_is_not(tmp_path: Path) -> None:
    _swap(tmp_path, 1, "log_level: info\n")
    (tmp_path / "config.yaml").symlink_to("..data/config.yaml")
    changes: list[int] = []
    watcher = ConfigWatcher(tmp_path / "config.yaml", lambda: changes.append(1))
    assert not watcher.check()
    # Same size, same content length, new inode: only the swap tells.
    _swap(tmp_path, 2, "log_level: warn\n")
    assert watcher.check() and changes == [1]
    assert not watcher.check()
    (tmp_path / "..data").unlink()  # between kubelet's steps: no file, no reload
    assert not watcher.check()
    (tmp_path / "..data").symlink_to("..v2")
    assert not watcher.check()  # back to what was already applied


def test_restart_needed_names_what_cannot_change_live() -> None:
    old = config_from_mapping({})
    new = config_from_mapping({"listen": "127.0.0.1:9999", "filter": {"ports": [80]},
                               "probes": {"tcp": {"enabled": False}},
                               "services": {"rules": [{"name": "x", "comm": "x"}]}})
    assert restart_needed(old, new) == ["listen", "probes.tcp.enabled"]
