"""`probewire` command line: run, probes, doctor, top, routes. Exit codes: 0 ok, 2 usage/config,
3 privilege or kernel feature (the message says the fix)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from probewire import __version__
from probewire.config import Config, parse_listen, resolve_config
from probewire.errors import EXIT_USAGE, ConfigError, ProbewireError

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="probewire: zero-instrumentation eBPF observability agent.",
)


# rich (and urllib.request) are imported by the commands that use them: `run` stays in memory
# for the life of the agent and needs neither.
@functools.cache
def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see README).")
]
ListenOpt = Annotated[
    str | None, typer.Option("--listen", help="host:port for /metrics and the API.")
]


def _fail(exc: ProbewireError) -> typer.Exit:
    _console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _flags(listen: str | None) -> dict[str, Any]:
    """Dotted config keys set on the command line (they win over the environment and file)."""
    if listen is None:
        return {}
    parse_listen(listen)
    return {"listen": listen}


def _config(path: Path | None, listen: str | None) -> Config:
    # flag > environment (PROBEWIRE_*, OTEL_*) > file > defaults
    return resolve_config(path, flags=_flags(listen))


def _parse_forced(values: list[str]) -> dict[str, str]:
    forced = {}
    for value in values:
        hook, sep, hook_type = value.partition("=")
        if not sep or not hook or not hook_type:
            raise ConfigError(
                f"--force-hook {value!r}: expected HOOK=TYPE, e.g. inet_sock_set_state=tp"
            )
        forced[hook] = hook_type
    return forced


@app.command()
def run(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    force_hook: Annotated[
        list[str] | None,
        typer.Option("--force-hook", help="Pin a hook type, e.g. inet_sock_set_state=tp."),
    ] = None,
) -> None:
    """Load and attach the probes and serve /metrics until SIGINT/SIGTERM."""
    # numpy's OpenBLAS starts a thread per core at import; the agent does no linear algebra.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from probewire.agent import Agent
    from probewire.export.prometheus import make_registry
    from probewire.reload import ConfigWatcher, Reloader
    from probewire.serve.http import AgentServer

    try:
        cfg = _config(config, listen)
        logging.basicConfig(
            level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        agent = Agent(cfg, _parse_forced(force_hook or []))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        # Live reconfiguration: SIGHUP, and the file watched (ConfigMap updates included).
        # Reloads run on the main thread, never inside a signal handler.
        reload_asked = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: reload_asked.set())
        reloader = Reloader(agent, config, flags=_flags(listen))
        watcher = ConfigWatcher(config, reload_asked.set) if config is not None else None
        host, port = cfg.listen_address
        try:
            registry = make_registry(agent)
            registry.register(reloader)
            server = AgentServer(agent, registry, host, port, serve=cfg.serve)
        except OSError as exc:
            raise ConfigError(
                f"listen {cfg.listen}: {exc.strerror}; choose another --listen"
            ) from exc
        try:
            agent.start()
            server.start()
            print(
                f"probewire {__version__}: {len(agent.running)} probes attached in "
                f"{agent.startup_s:.3f} s; metrics at http://{cfg.listen}/metrics",
                flush=True,
            )
            if watcher is not None:
                watcher.start()
            while not stop.is_set():
                if reload_asked.wait(0.2):
                    reload_asked.clear()
                    reloader.reload("file changed or SIGHUP")
        finally:
            if watcher is not None:
                watcher.stop()
            server.stop()
            agent.stop()
    except ProbewireError as exc:
        raise _fail(exc) from None


def _fetch(listen: str, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://{listen}{path}", timeout=2) as resp:
        return json.load(resp)


@app.command()
def probes(config: ConfigOpt = None, listen: ListenOpt = None) -> None:
    """Each probe's hooks: the program chosen, why not the preferred one, attached, ns/event.

    Asks the running agent; with none running, loads the probes once to show the choices.
    """
    import urllib.error

    from rich.table import Table

    console = _console()
    try:
        cfg = _config(config, listen)
        try:
            data = _fetch(cfg.listen, "/api/probes")
            source = f"running agent at {cfg.listen}"
        except (urllib.error.URLError, OSError):
            data = _probe_locally(cfg)
            source = "loaded just now (no agent running; ns/event needs a running agent)"
    except ProbewireError as exc:
        raise _fail(exc) from None
    table = Table(title=f"probewire probes — {source}")
    for col in ("probe", "hook", "chosen", "attached", "avg ns/event", "runs", "fallback reason"):
        table.add_column(col, overflow="fold")
    for p in data["probes"]:
        table.add_row(
            p["probe"], p["hook"], p["section"] or "-", "yes" if p["attached"] else "no",
            f"{p['avg_ns']:.0f}" if p["run_cnt"] else "-", str(p["run_cnt"]),
            p["fallback_reason"] or "",
        )
    console.print(table)
    tls = data.get("tls")
    if tls is not None:
        cov = Table(title="TLS capture (OpenSSL uprobes): processes using libssl")
        for col in ("pid", "comm", "library", "covered", "why not"):
            cov.add_column(col, overflow="fold")
        for p in tls["processes"]:
            cov.add_row(str(p["pid"]), p["comm"], p["library"], "yes" if p["covered"] else "no",
                        p["reason"])
        console.print(cov)
        console.print(
            f"libssl attached: {', '.join(tls['libraries']) or 'none'}; "
            + "; ".join(f"{k}: {v}" for k, v in tls["failed"].items())
            + " TLS linked statically (Go crypto/tls, BoringSSL in grpcio or Chrome) is not seen.",
            highlight=False, soft_wrap=True,
        )
    custom = data.get("custom")
    if custom:
        _print_custom(console, custom)


def _print_custom(console: Console, rows: list[dict[str, Any]]) -> None:
    """Custom probes per process: attached (to which file, shared by inode or per process),
    or why not (no such symbol with the nearest names, a stripped binary, ...)."""
    from rich.table import Table

    table = Table(title="custom probes (probes.custom): per process")
    for col in ("probe", "symbol / usdt", "pid", "comm", "state", "file", "why not / note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        state = r["state"] + (" (by inode)" if r["shared"] else "")
        table.add_row(r["probe"], r["where"], str(r["pid"] or "-"), r["comm"] or "-", state,
                      r["file"] or "-", r["reason"])
    console.print(table)


def _probe_locally(cfg: Config) -> dict[str, Any]:
    import dataclasses

    from probewire.agent import Agent

    agent = Agent(cfg)
    agent.start()
    try:
        from probewire.serve.api import custom_status

        return {"probes": [{**dataclasses.asdict(s), "avg_ns": s.avg_ns} for s in agent.status()],
                "tls": agent.tls_status(), "custom": custom_status(agent)}
    finally:
        agent.stop()


@app.command()
def doctor(listen: ListenOpt = None) -> None:
    """Check privileges, BTF, tracefs, memlock, libbpf, hook types and leftover programs."""
    from probewire.doctor import run_checks

    ok = run_checks(_console(), listen or "127.0.0.1:9464")
    raise typer.Exit(0 if ok else 3)


@app.command()
def top(
    listen: ListenOpt = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.1)] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    limit: Annotated[int, typer.Option(help="Services shown at most.", min=1)] = 30,
) -> None:
    """Live view of the running agent's services: rate, error ratio, p50/p99. Ctrl-C quits."""
    from probewire.serve.top import run_top

    try:
        target = listen or "127.0.0.1:9464"
        parse_listen(target)
    except ProbewireError as exc:
        raise _fail(exc) from None
    # Exit 1 when --once finds no agent (a script's "nothing to read", not a usage error).
    raise typer.Exit(0 if run_top(_console(), target, interval, once, limit) else 1)


@app.command()
def routes(
    listen: ListenOpt = None,
    service: Annotated[str | None, typer.Option(help="Only this service.")] = None,
) -> None:
    """Route templates the running agent learned per service: the path positions that became
    parameters, how many values they showed, and the values kept literal."""
    import urllib.error
    from urllib.parse import quote

    from rich.table import Table

    try:
        target = listen or "127.0.0.1:9464"
        parse_listen(target)
    except ProbewireError as exc:
        raise _fail(exc) from None
    path = "/api/routes" + (f"?service={quote(service)}" if service else "")
    try:
        data = _fetch(target, path)
    except (urllib.error.URLError, OSError) as exc:
        _console(stderr=True).print(f"no agent answering at {target} ({exc}); start one with "
                                    "`probewire run` or pass --listen", highlight=False)
        raise typer.Exit(1) from None
    console = _console()
    if not data.get("enabled"):
        console.print("route learning is off (probes.http.route_learning.enabled) or the HTTP "
                      "family does not offer it")
        return
    table = Table(title=f"learned routes (generation {data.get('generation', 0)})")
    for col in ("service", "template", "values seen", "kept literal", "why", "nodes"):
        table.add_column(col, overflow="fold")
    for name, svc in sorted(data.get("services", {}).items()):
        templates = svc.get("templates", [])
        if not templates:
            table.add_row(name, "-", "", "", "", str(svc.get("nodes", 0)))
        for t in templates:
            table.add_row(name, t["template"], str(t["distinct_values"]),
                          ", ".join(t["kept"]), t["reason"], str(svc.get("nodes", 0)))
    console.print(table)
    if data.get("untracked"):
        console.print(f"{data['untracked']} lookups came from services beyond "
                      "probes.http.route_learning.max_services (not learned)")


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    try:
        app(standalone_mode=True)
    except ConfigError as exc:  # raised outside a command (should not happen)
        _console(stderr=True).print(f"error: {exc}")
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
