"""tcp probe across two test hosts (network namespaces): retransmits under loss equal the
kernel's TcpRetransSegs, and the RTT histogram sees a 20 ms link as 20 ms.

The agent traces every namespace of the host and other test runs use these addresses and ports
too: the exact count is filtered to a scratch cgroup the test's processes run in.

Needs: tp_btf (or tp) tcp/tcp_retransmit_skb, tcp/tcp_retransmit_synack, sock/inet_sock_set_state;
iproute2 + nftables for the hosts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from agentlib import scrape, total, wait_for

from probewire.agent import Agent
from support.cgroups import enter, scratch_cgroup
from support.netns import TwoHosts, two_hosts

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(120)]

PORT = 5301
# Accepts n connections; reads each to EOF, answers "ok", closes.
SINK = """
import socket, sys
n = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(16)
for _ in range(n):
    c, _ = s.accept()
    c.settimeout(30)
    while c.recv(1 << 16):
        pass
    c.sendall(b"ok"); c.close()
""".replace("PORT", str(PORT))
# argv: host nbytes connections
CLIENT = """
import socket, sys
host, nbytes, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(conns):
    s = socket.create_connection((host, PORT), timeout=30)
    s.sendall(b"x" * nbytes)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(2) == b"ok"
    s.close()
""".replace("PORT", str(PORT))


def transfer(
    net: TwoHosts, host: str, nbytes: int, conns: int, cgroup: Path | None = None
) -> None:
    """Sink and client, both in `cgroup` when one is given."""
    kw = {"preexec_fn": enter(cgroup)} if cgroup else {}
    sink = net.exec(net.server_ns, [sys.executable, "-c", SINK, str(conns)], **kw)
    net.wait_listening(net.server_ns, PORT)
    client = net.exec(net.client_ns,
                      [sys.executable, "-c", CLIENT, host, str(nbytes), str(conns)], **kw)
    assert client.wait(timeout=90) == 0
    assert sink.wait(timeout=30) == 0


def retrans(net: TwoHosts) -> int:
    return net.nstat(net.client_ns)["TcpRetransSegs"] + net.nstat(net.server_ns)[
        "TcpRetransSegs"]


def test_retransmits_match_kernel_counter_under_loss(agent) -> None:
    a, listen = agent
    ours, kernel = retransmits_under_loss(a, listen)
    assert kernel > 0
    assert ours == kernel


def retransmits_under_loss(a: Agent, listen: str) -> tuple[int, int]:
    """(retransmits the agent at `listen` counted, TcpRetransSegs of both hosts) for 3 MB
    sent over a link that loses 10% of the segments, by processes of a cgroup the agent is
    filtered to while it runs."""
    p = str(PORT)
    assert a.filter is not None
    with two_hosts() as net, scratch_cgroup() as cg:
        net.add_loss(net.client_ns, dport=PORT, percent=10)
        a.filter.apply(cgroups=[str(cg)])
        try:
            before_kernel = retrans(net)
            s = scrape(listen)
            before_ours = total(s, "probewire_tcp_retransmits_total", server_port=p)
            before_closed = total(s, "probewire_tcp_connections_closed_total", server_port=p)
            transfer(net, net.server_ip, nbytes=1_000_000, conns=3, cgroup=cg)
            # Both ends of all 3 have closed (a close adds what its socket retransmitted).
            wait_for(lambda: total(scrape(listen), "probewire_tcp_connections_closed_total",
                                   server_port=p) - before_closed >= 6)
            kernel = retrans(net) - before_kernel
            ours = total(scrape(listen), "probewire_tcp_retransmits_total",
                         server_port=p) - before_ours
        finally:
            a.filter.apply()
        assert net.loss_drops() > 0
        return int(ours), kernel


def test_rtt_histogram_places_a_20ms_link_in_the_20ms_bucket(agent) -> None:
    _, listen = agent
    p = str(PORT)
    with two_hosts() as net:
        _, server_ip = net.add_delay_link(rtt_ms=20)
        before = total(scrape(listen), "probewire_tcp_rtt_seconds_count", server_port=p,
                       server_address=server_ip)
        transfer(net, server_ip, nbytes=20_000, conns=4)
        wait_for(lambda: total(scrape(listen), "probewire_tcp_rtt_seconds_count",
                               server_port=p, server_address=server_ip) >= before + 4)
        s = scrape(listen)
        labels = {"server_port": p, "server_address": server_ip, "direction": "client"}
        count = total(s, "probewire_tcp_rtt_seconds_count", **labels) - before
        assert count == 4
        # 20 ms sits in the slot 16.384-32.768 ms: nothing at or below 16.384 ms, all by 32.768.
        assert total(s, "probewire_tcp_rtt_seconds_bucket", le="0.016384", **labels) == 0
        assert total(s, "probewire_tcp_rtt_seconds_bucket", le="0.032768", **labels) == count
