"""Probe families. Adding one: bpf/<family>.bpf.c + bpf/<family>.h + <family>.py + a line here."""

from __future__ import annotations

from probewire.probes.base import Probe
from probewire.probes.custom import CustomProbe
from probewire.probes.l7 import L7Probe
from probewire.probes.process import ProcessProbe
from probewire.probes.saturation import SaturationProbe
from probewire.probes.tcp import TcpProbe

REGISTRY: dict[str, type[Probe]] = {
    TcpProbe.name: TcpProbe,
    ProcessProbe.name: ProcessProbe,
    L7Probe.name: L7Probe,
    SaturationProbe.name: SaturationProbe,
    CustomProbe.name: CustomProbe,
}
