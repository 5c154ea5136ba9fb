"""`probewire top`: a live terminal view of the running agent's services, read from its API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text


def fetch(listen: str, path: str, timeout_s: float = 2.0) -> Any:
    with urllib.request.urlopen(f"http://{listen}{path}", timeout=timeout_s) as resp:
        return json.load(resp)


def _sec(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.0f}µs"
    if v < 1:
        return f"{v * 1e3:.1f}ms"
    return f"{v:.2f}s"


def _ratio(v: float) -> Text:
    style = "bold red" if v >= 0.05 else "yellow" if v > 0 else ""
    return Text(f"{100 * v:.1f}%", style=style)


def render(listen: str, services: dict[str, Any] | None, graph: dict[str, Any] | None,
           error: str | None = None, limit: int = 30) -> RenderableType:
    stamp = time.strftime("%H:%M:%S")
    if services is None or graph is None:
        return Text(f"probewire top — no agent at {listen} ({error}); start one with "
                    f"`sudo probewire run --listen {listen}` — {stamp}", style="yellow")
    rows = services["services"]
    title = (f"probewire top — {listen} — {len(rows)} services — rates over the last "
             f"{services['window_seconds']:.0f} s — {stamp} — Ctrl-C quits")
    table = Table(title=title, title_justify="left", expand=True)
    for col, justify in (("SERVICE", "left"), ("KIND", "left"), ("REQ/S", "right"),
                         ("ERR%", "right"), ("P50", "right"), ("P99", "right"),
                         ("REQUESTS", "right"), ("ROUTES", "right"), ("CALLS OUT", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for s in rows[:limit]:
        table.add_row(
            s["name"], s["kind"], f"{s['rate']:.2f}", _ratio(s["error_ratio"]),
            _sec(s["p50_seconds"]), _sec(s["p99_seconds"]), f"{s['requests']:.0f}",
            str(s["routes"]), f"{s['outgoing_requests']:.0f}",
        )
    edges = Table(title="calls", title_justify="left", expand=True)
    for col, justify in (("CLIENT → SERVER", "left"), ("REQ/S", "right"), ("ERR%", "right"),
                         ("P99", "right"), ("REQUESTS", "right")):
        edges.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for e in sorted(graph["edges"], key=lambda e: -e["rate"])[:10]:
        edges.add_row(f"{e['client']} → {e['server']}", f"{e['rate']:.2f}",
                      _ratio(e["error_ratio"]), _sec(e["p99_seconds"]), f"{e['requests']:.0f}")
    return Group(table, edges)


def frame(listen: str, limit: int = 30) -> tuple[RenderableType, bool]:
    """One rendering of the agent's state, and whether the agent answered."""
    try:
        return render(listen, fetch(listen, "/api/services"), fetch(listen, "/api/graph"),
                      limit=limit), True
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return render(listen, None, None, error=str(getattr(exc, "reason", exc))), False


def run_top(console: Console, listen: str, interval_s: float = 1.0, once: bool = False,
            limit: int = 30) -> bool:
    if once:
        view, ok = frame(listen, limit)
        console.print(view)
        return ok
    try:
        with Live(frame(listen, limit)[0], console=console, screen=True,
                  auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(listen, limit)[0], refresh=True)
    except KeyboardInterrupt:
        pass
    return True
