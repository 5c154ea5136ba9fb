"""Kernel-facing tests share one real agent (loading and attaching costs ~0.3 s)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agentlib import running_agent

from probewire.agent import Agent


@pytest.fixture(scope="session")
def agent() -> Iterator[tuple[Agent, str]]:
    with running_agent() as pair:
        yield pair
