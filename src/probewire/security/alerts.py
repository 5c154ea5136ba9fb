"""Where alerts go besides the metric and the API: JSON lines (a file or stdout, for Loki,
Fluent Bit or Vector) and OTLP log records (export/otlp_logs.py).

A sink never blocks the ring reader: each has a bounded queue and a thread of its own; an alert
that finds the queue full is dropped and counted (probewire_security_alerts_dropped_total).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from typing import IO, Any, Protocol

from probewire.errors import ConfigError

__all__ = ["AlertSink", "JsonLinesSink", "QueuedSink"]

log = logging.getLogger(__name__)

QUEUE_ALERTS = 10_000


class AlertSink(Protocol):
    name: str
    dropped: int

    def emit(self, alert: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class QueuedSink:
    """A sink whose writes happen on its own thread."""

    name = "queued"

    def __init__(self) -> None:
        self.dropped = 0
        self.sent = 0
        self._queue: queue.Queue[dict[str, Any] | threading.Event | None] = queue.Queue(
            QUEUE_ALERTS)
        self._thread = threading.Thread(target=self._run, name=f"probewire-{self.name}",
                                        daemon=True)
        self._thread.start()

    def emit(self, alert: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            if isinstance(alert, threading.Event):
                self.flush_output()
                alert.set()
                continue
            try:
                self.write(alert)
                self.sent += 1
            except Exception:  # a broken output must not stop the others
                self.dropped += 1
                log.exception("security alert output %s failed", self.name)

    def write(self, alert: dict[str, Any]) -> None:
        raise NotImplementedError

    def flush_output(self) -> None:
        """Push what was written out of any buffer."""

    def flush(self) -> None:
        """Wait until every alert queued so far is written out (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(10)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)


class JsonLinesSink(QueuedSink):
    """One JSON object per line, appended to a file (or written to stdout for "-")."""

    name = "jsonl"

    def __init__(self, target: str) -> None:
        self.target = target
        self._own = target != "-"
        try:
            # Held for the life of the agent, closed in close().
            self._out: IO[str] = (
                open(target, "a", encoding="utf-8")  # noqa: SIM115
                if self._own else sys.stdout
            )
        except OSError as exc:
            raise ConfigError(
                f"security.alert_log: cannot open {target}: {exc.strerror}; give a writable "
                "file, - for stdout, or leave it out"
            ) from None
        super().__init__()

    def write(self, alert: dict[str, Any]) -> None:
        self._out.write(json.dumps(alert, separators=(",", ":")) + "\n")
        if self._queue.empty():
            self._out.flush()

    def flush_output(self) -> None:
        self._out.flush()

    def close(self) -> None:
        super().close()
        if self._own:
            self._out.close()
        else:
            self._out.flush()
