"""`probewire top` in a real terminal (tmux): it shows the agent's services and the call between
them, refreshes, and quits on Ctrl-C; `--once` prints one frame for scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentlib import wait_for
from uistack import NGINX_TOTAL, UPSTREAM_TOTAL, Stack, drive, observed_stack

pytestmark = pytest.mark.e2e

PROBEWIRE = str(Path(sys.executable).with_name("probewire"))
TMUX = shutil.which("tmux") or "/usr/bin/tmux"
CMD_TIMEOUT_S = 60  # a safety net against hangs, not an assertion on speed
SCREEN_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with observed_stack() as s:
        drive(s)
        yield s


@pytest.fixture
def tmux(test_output_dir: Path) -> Iterator[list[str]]:
    """A private tmux server (its own socket), killed afterwards."""
    socket = f"probewire-test-{os.getpid()}"
    base = [TMUX, "-L", socket]
    try:
        yield base
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=CMD_TIMEOUT_S)


def capture(tmux: list[str], session: str) -> str:
    out = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                         text=True, timeout=CMD_TIMEOUT_S)
    return out.stdout


def test_top_shows_services_and_the_call_between_them_under_tmux(
        stack: Stack, tmux: list[str], test_output_dir: Path) -> None:
    session = "top"
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "40",
                    f"{PROBEWIRE} top --listen {stack.listen}"],
                   check=True, env=env, timeout=CMD_TIMEOUT_S)
    shown = wait_for(lambda: "nginx → upstream" in capture(tmux, session), SCREEN_TIMEOUT_S)
    screen = capture(tmux, session)
    (test_output_dir / "top.txt").write_text(screen)
    assert shown, f"the services never showed up; the screen:\n{screen}"
    cells = [[c.strip() for c in line.strip().strip("│").split("│")]
             for line in screen.splitlines() if line.strip().startswith("│")]
    rows = {c[0]: c for c in cells if c[0] in ("nginx", "upstream")}
    # SERVICE KIND REQ/S ERR% P50 P99 REQUESTS ROUTES CALLS-OUT, most requests first.
    assert rows["nginx"][1] == "service" and rows["nginx"][6] == str(NGINX_TOTAL)
    assert rows["upstream"][6] == str(UPSTREAM_TOTAL)
    assert float(rows["nginx"][2]) > 0 and rows["upstream"][3] == "25.0%"
    # It refreshes: the clock in the title changes.
    title = next(line for line in screen.splitlines() if "probewire top" in line)
    assert wait_for(lambda: title not in capture(tmux, session), SCREEN_TIMEOUT_S)
    subprocess.run([*tmux, "send-keys", "-t", session, "C-c"], check=True, timeout=CMD_TIMEOUT_S)

    def gone() -> bool:
        return subprocess.run([*tmux, "has-session", "-t", session], capture_output=True,
                              timeout=CMD_TIMEOUT_S).returncode != 0

    assert wait_for(gone, SCREEN_TIMEOUT_S), "top did not quit on Ctrl-C"


def test_top_once_prints_one_frame_and_exits(stack: Stack) -> None:
    out = subprocess.run([PROBEWIRE, "top", "--once", "--listen", stack.listen],
                         capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
                         env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr
    assert "nginx" in out.stdout and "upstream" in out.stdout
    assert "nginx → upstream" in out.stdout


def test_top_once_without_an_agent_says_how_to_start_one() -> None:
    out = subprocess.run([PROBEWIRE, "top", "--once", "--listen", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 1
    assert "probewire run --listen 127.0.0.1:1" in out.stdout
