"""The web UI in real headless Chromium (Debian's, driven by Playwright): nginx -> Python
upstream traffic shows up as two services and an edge on the map, a service page lists its routes
with exact counts, and every page renders; a screenshot of each lands in test-output/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A dev dependency (pyproject.toml): without it the set-up is broken, so import, never skip.
import playwright.sync_api as playwright
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentlib import scrape, total, wait_for
from uistack import (
    NGINX_ROUTES,
    SERVER_COUNT,
    UPSTREAM_ROUTES,
    Stack,
    drive,
    observed_stack,
    tracing_everything,
)

from probewire.probes.process import ProcessProbe

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's chromium, never a browser Playwright would download; nothing reaches the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
UI_TIMEOUT_MS = 30_000  # a safety net for waits on page state, not an assertion on speed


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with observed_stack(sample_interval_s=1.0) as s:
        drive(s)
        yield s


@pytest.fixture(scope="module")
def page(stack: Stack) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup.sh)")
    with tempfile.TemporaryDirectory(prefix="pw-chromium-") as profile, \
            playwright.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            pg = context.new_page()
            pg.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            yield pg
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            context.close()


def open_page(page: Any, stack: Stack, hash_: str) -> None:
    page.goto(f"{stack.base}/#/{hash_}")
    page.wait_for_selector(f"body[data-loaded='{hash_.split('/')[0] or 'map'}']")


def routes_shown(page: Any) -> dict[tuple[str, str], int]:
    rows = page.locator("[data-testid=routes] tbody tr")
    out = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        key = (row.get_attribute("data-method"), row.get_attribute("data-route"))
        out[key] = int(row.locator("td[data-col=requests]").inner_text().replace(",", ""))
    return out


def test_map_shows_both_services_and_the_edge_between_them(page: Any, stack: Stack,
                                                          test_output_dir: Path) -> None:
    open_page(page, stack, "map")
    for name in ("nginx", "upstream"):
        node = page.locator(f"[data-testid=node][data-service='{name}']")
        node.wait_for()
        assert name in (node.text_content() or "")
    edge = page.locator("[data-testid=edge][data-client='nginx'][data-server='upstream']")
    edge.wait_for()
    assert float(edge.get_attribute("data-rate")) > 0
    assert float(edge.get_attribute("data-requests")) == sum(UPSTREAM_ROUTES.values())
    label = edge.locator("text").text_content() or ""
    assert "/s" in label and "err" in label and "p99" in label
    services = page.locator("[data-testid=services]")
    assert "nginx" in services.inner_text() and "upstream" in services.inner_text()
    page.screenshot(path=str(test_output_dir / "map.png"), full_page=True)


@pytest.mark.parametrize(("service", "routes"), [("upstream", UPSTREAM_ROUTES),
                                                  ("nginx", NGINX_ROUTES)])
def test_clicking_a_service_shows_its_routes_with_exact_counts(
        page: Any, stack: Stack, test_output_dir: Path, service: str,
        routes: dict[tuple[str, str], int]) -> None:
    open_page(page, stack, "map")
    page.locator(f"[data-testid=node][data-service='{service}']").click()
    page.wait_for_selector(f"[data-testid=service-name]:has-text('{service}')")
    page.wait_for_selector("[data-testid=routes] tbody tr")
    assert routes_shown(page) == routes
    assert page.locator("[data-testid=stat-requests]").inner_text().startswith(
        str(sum(routes.values())))
    # Sorting by errors, most first, puts /api/fail (the upstream's 503s) on top. (The sort
    # choice is kept across pages: the second service starts sorted already.)
    errors = "[data-testid=routes] th[data-key=errors]"
    for _ in range(2):  # a click re-renders at once, so the class is current after it
        if page.locator(f"{errors}.sorted:not(.asc)").count():
            break
        page.locator(errors).click()
    assert page.locator(f"{errors}.sorted:not(.asc)").count() == 1
    first = page.locator("[data-testid=routes] tbody tr").first
    assert first.get_attribute("data-route") == "/api/fail"
    if service == "nginx":
        assert "upstream" in page.locator("[data-testid=outgoing]").inner_text()
    else:
        assert "nginx" in page.locator("[data-testid=incoming]").inner_text()
    # RED charts: wait for the history to hold a few points, then for the charts to draw them.
    assert wait_for(lambda: len((stack.server.history.series(service) or {"time": []})["time"])
                    >= 3, 30)
    page.wait_for_selector("#c-rate .uplot canvas")
    page.wait_for_selector("#c-lat .uplot canvas")
    page.screenshot(path=str(test_output_dir / f"service-{service}.png"), full_page=True)


def test_tcp_page_lists_nginx_connections(page: Any, stack: Stack,
                                          test_output_dir: Path) -> None:
    open_page(page, stack, "tcp")
    table = page.locator("[data-testid=tcp]")
    table.wait_for()
    assert f"listening :{stack.nginx.port}" in table.inner_text()
    assert f"127.0.0.1:{stack.upstream.port}" in table.inner_text()
    page.screenshot(path=str(test_output_dir / "tcp.png"), full_page=True)


def test_events_page_shows_a_new_process_exec_and_exit(page: Any, stack: Stack,
                                                       test_output_dir: Path) -> None:
    marker = f"probewire-ui-{os.getpid()}"
    with tracing_everything(stack):
        subprocess.run(["/bin/sh", "-c", "exit 3", marker], check=False, timeout=30)
        assert wait_for(lambda: any(marker in e.argv for e in events_of(stack)), 30)
    open_page(page, stack, "events")
    row = page.locator(f"[data-testid=events] tbody tr[data-kind=exec]:has-text('{marker}')")
    row.wait_for()
    assert "/bin/sh" in row.inner_text() or "sh" in row.inner_text()
    page.wait_for_selector("[data-testid=events] tbody tr[data-kind=exit]:has-text('code 3')")
    page.screenshot(path=str(test_output_dir / "events.png"), full_page=True)


def events_of(stack: Stack) -> list[Any]:
    probe = stack.agent.probes["process"]
    assert isinstance(probe, ProcessProbe)
    return probe.events()


def test_agent_page_shows_hooks_and_drops(page: Any, stack: Stack,
                                          test_output_dir: Path) -> None:
    open_page(page, stack, "agent")
    hooks = page.locator("[data-testid=hooks]")
    hooks.wait_for()
    for s in stack.agent.status():
        assert s.hook in hooks.inner_text()
    drops = page.locator("[data-testid=probe-drops]").inner_text()
    assert all(name in drops for name in stack.agent.running)
    page.screenshot(path=str(test_output_dir / "agent.png"), full_page=True)


def test_security_page_draws_an_alerts_ancestry_and_links_to_its_services_red_page(
        page: Any, stack: Stack, test_output_dir: Path) -> None:
    from support.attacks import write_scripts

    scripts = write_scripts(test_output_dir)
    probe = stack.agent.probes["process"]
    assert isinstance(probe, ProcessProbe) and probe.security is not None
    engine = probe.security
    with tracing_everything(stack):
        server = subprocess.Popen([sys.executable, str(scripts["vuln_server"])],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            base = f"http://127.0.0.1:{int(server.stdout.readline())}"
            # From a child: the far end of the agent's own connections (this process's) is
            # never traced, and the server's exchanges are counted below.
            for path in ("/hello", "/hello", "/run?echo%20injected"):
                subprocess.run(["curl", "-sf", "-o", "/dev/null", base + path], check=True,
                               timeout=20)

            def alerted() -> bool:
                return any(a["rule"] == "shell_from_network_server"
                           and a["ancestry"] and a["ancestry"][0]["pid"] == server.pid
                           for a in engine.recent())

            assert wait_for(alerted, 30)
            assert wait_for(lambda: total(scrape(stack.listen), SERVER_COUNT,
                                          service_name="vuln_server") >= 3, 30)
        finally:
            server.terminate()
            server.wait(10)
    open_page(page, stack, "security")
    card = page.locator("[data-testid=alert][data-rule=shell_from_network_server]").filter(
        has=page.locator(f"[data-testid=ancestor][data-pid='{server.pid}']"))
    card.first.wait_for()
    assert card.count() == 1
    # The lineage is drawn oldest first, the shell that matched last.
    drawn = [int(p) for p in card.locator("[data-testid=ancestor]").evaluate_all(
        "els => els.map(e => e.dataset.pid)")]
    assert drawn[-2:] == [server.pid, int(card.get_attribute("data-pid") or 0)]
    assert os.getpid() in drawn
    assert "echo injected" in card.inner_text()
    page.screenshot(path=str(test_output_dir / "security.png"), full_page=True)
    link = card.locator("[data-testid=alert-service]")
    assert link.inner_text() == "vuln_server"
    link.click()
    page.wait_for_selector("body[data-loaded='service']")
    assert page.locator("[data-testid=service-name]").inner_text().startswith("vuln_server")
    page.wait_for_selector("[data-testid=routes] tbody tr")
    assert routes_shown(page) == {("GET", "/hello"): 2, ("GET", "/run"): 1}
