"""TLS capture through the uprobe layer: a process started after the agent with a libssl the
agent has never seen (its own copy, another inode) is attached as it execs and loads the
library, long before the 10 s rescan, and its HTTPS exchanges are counted on both sides.

Needs: uprobes/uretprobes, the process family's exec events, nginx with TLS.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import scrape, total, wait_for

from probewire.probes.l7 import L7Probe
from probewire.runtime.elf import file_id
from probewire.runtime.uprobes import RESCAN_S
from support.servers import nginx, python_upstream

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(120)]

SERVER = "http_server_request_duration_seconds_count"
CLIENT = "http_client_request_duration_seconds_count"
CLIENT_PROGRAM = """
import http.client, ssl, sys
sys.stdin.readline()
for path in ("/static/index.html", "/missing"):
    c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), timeout=10,
                                    context=ssl._create_unverified_context())
    c.request("GET", path)
    c.getresponse().read()
    c.close()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def tls_nginx() -> Iterator[int]:
    with python_upstream() as up, nginx(upstream_port=up.port, tls=True) as ng:
        yield ng.port


def test_new_process_with_an_unseen_libssl_is_attached_as_it_execs(
    agent: tuple[object, str], tls_nginx: int, tmp_path: Path
) -> None:
    a, listen = agent
    http = a.probes["l7"]  # type: ignore[attr-defined]
    assert isinstance(http, L7Probe) and http.tls is not None
    system = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
    if not system.exists():
        pytest.fail("libssl.so.3 missing (Debian libssl3)")
    shutil.copy(system, tmp_path / "libssl.so.3")
    copy_inode = file_id(str(tmp_path / "libssl.so.3"))
    before = scrape(listen)
    t0 = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/python3.11", "-c", CLIENT_PROGRAM, str(tls_nginx)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={"LD_LIBRARY_PATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    try:
        assert wait_for(lambda: copy_inode in http.tls.attached, timeout_s=RESCAN_S * 2)
        attached_after_s = time.monotonic() - t0
        # Driven by the exec event, not the periodic rescan.
        assert attached_after_s < RESCAN_S / 2, attached_after_s
        cov = {c.pid: c for c in http.tls.coverage([proc.pid])}
        assert cov[proc.pid].covered and cov[proc.pid].library.startswith(str(tmp_path))
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        proc.wait()
    https = {"url_scheme": "https", "server_port": str(tls_nginx)}

    def client_delta() -> float:
        return total(scrape(listen), CLIENT, **https) - total(before, CLIENT, **https)

    assert wait_for(lambda: client_delta() >= 2)
    time.sleep(0.1)
    assert client_delta() == 2
    # The copy's last user exited: its uprobes are detached (the loader's libssl stays).
    assert wait_for(lambda: copy_inode not in http.tls.attached, timeout_s=RESCAN_S * 2)
    assert total(scrape(listen), SERVER, url_scheme="https") - total(
        before, SERVER, url_scheme="https") >= 2
