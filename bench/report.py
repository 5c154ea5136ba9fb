"""Rows of figures and the one markdown table they are printed as."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    """One figure: its value over repeats and the DESIGN.md §5 target it is judged against.

    `goal` is (op, bound) with op in "<=", ">=", "=="; or ("between", lo) with `goal_hi` the
    upper end (inclusive); None means "reported, no target".
    `judge` names the statistic compared with the goal: "median" unless the target is a tail
    (a p99 judged on the max of the samples) or an exact equality over every repeat ("all").
    """

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""
    goal: tuple[str, float] | None = None
    goal_hi: float = 0.0
    judge: str = "median"
    note: str = ""
    status: str | None = None  # overrides met/MISSED: "not installed", "error", ...

    def add(self, value: float) -> None:
        self.values.append(value)

    def verdict(self) -> str:
        if self.status:
            return self.status
        if not self.values:
            return "no data"
        if self.goal is None:
            return "—"
        op, bound = self.goal
        picks = {
            "median": [statistics.median(self.values)],
            "max": [max(self.values)],
            "min": [min(self.values)],
            "all": self.values,
        }[self.judge]
        ok = all(
            {"<=": v <= bound, ">=": v >= bound, "==": abs(v - bound) < 1e-9,
             "between": bound <= v <= self.goal_hi}[op] for v in picks
        )
        return "met" if ok else "MISSED"


def fmt(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def render(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| figure | unit | n | min | median | max | target (DESIGN §5) | status | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.values:
            mn, md, mx = (fmt(min(r.values)), fmt(statistics.median(r.values)),
                          fmt(max(r.values)))
        else:
            mn = md = mx = "—"
        note = r.note.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.name} | {r.unit} | {len(r.values)} | {mn} | {md} | {mx} | "
                     f"{r.target or '—'} | {r.verdict()} | {note} |")
    lines.append("")
    lines.append("status: met/MISSED compare the median with the target, except p99 targets "
                 "(judged on the max sample) and fidelity equalities (judged on every repeat).")
    return "\n".join(lines) + "\n"
