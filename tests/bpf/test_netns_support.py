"""The two-host test network really produces loss (retransmits) and delay (RTT)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from support.netns import TwoHosts, parse_snmp, two_hosts

pytestmark = pytest.mark.timeout(60)

PORT = 5201
# Accepts connections, reads each to EOF, answers "ok" so the client knows all bytes arrived.
SINK_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(16)
while True:
    c, _ = s.accept()
    c.settimeout(30)
    while c.recv(1 << 16):
        pass
    c.sendall(b"ok"); c.close()
"""
# argv: host nbytes hold_s. Sends nbytes, keeps the connection open hold_s, then waits for "ok".
BULK_CLIENT = f"""
import socket, sys, time
host, nbytes, hold_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, {PORT}), timeout=30)
chunk = b"x" * 65536
sent = 0
while sent < nbytes:
    sent += s.send(chunk[: nbytes - sent])
time.sleep(hold_s)
s.shutdown(socket.SHUT_WR)
assert s.recv(2) == b"ok"
"""


def start_sink(net: TwoHosts, ns: str) -> subprocess.Popen[bytes]:
    sink: subprocess.Popen[bytes] = net.exec(ns, [sys.executable, "-c", SINK_SERVER])
    net.wait_listening(ns, PORT)
    return sink


def bulk_send_sampling_rtt(
    net: TwoHosts, host: str, nbytes: int, hold_s: float = 0.0, timeout_s: float = 15.0
) -> list[float]:
    """Run the bulk client in the client ns; return the RTTs (ms) `ss` showed meanwhile."""
    client = net.exec(
        net.client_ns, [sys.executable, "-c", BULK_CLIENT, host, str(nbytes), str(hold_s)]
    )
    rtts: list[float] = []
    deadline = time.monotonic() + timeout_s
    while client.poll() is None and time.monotonic() < deadline:
        rtts += net.tcp_rtts_ms(net.client_ns, PORT)
        time.sleep(0.05)
    try:
        assert client.wait(timeout=max(0.1, deadline - time.monotonic())) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"bulk transfer of {nbytes} B to {host} did not finish in {timeout_s} s")
    return rtts


def test_parse_snmp_names_counters_like_nstat() -> None:
    text = "Tcp: RtoMin RetransSegs\nTcp: 200 7\nUdp: InDatagrams\nUdp: 3\n"
    assert parse_snmp(text) == {"TcpRtoMin": 200, "TcpRetransSegs": 7, "UdpInDatagrams": 3}


@pytest.mark.bpf
def test_loss_on_data_direction_causes_retransmits() -> None:
    with two_hosts() as net:
        start_sink(net, net.server_ns)
        net.add_loss(net.client_ns, dport=PORT, percent=10)
        before = net.nstat(net.client_ns)["TcpRetransSegs"]
        bulk_send_sampling_rtt(net, net.server_ip, 2_000_000)
        retrans = net.nstat(net.client_ns)["TcpRetransSegs"] - before
        dropped = net.loss_drops()
        print(f"10% loss, 2 MB: {dropped} segments dropped, TcpRetransSegs +{retrans}")
        assert dropped > 0
        assert retrans > 0


@pytest.mark.bpf
def test_delay_link_gives_fixed_rtt_while_loopback_stays_fast() -> None:
    with two_hosts() as net:
        loopback_sink = start_sink(net, net.client_ns)  # a loopback peer inside the client ns
        loopback = bulk_send_sampling_rtt(net, "127.0.0.1", 1000, hold_s=0.5)
        loopback_sink.kill()
        loopback_sink.wait(timeout=5)

        _, server_ip = net.add_delay_link(rtt_ms=20)
        start_sink(net, net.server_ns)
        idle = bulk_send_sampling_rtt(net, server_ip, 1000, hold_s=0.5)
        bulk = bulk_send_sampling_rtt(net, server_ip, 2_000_000, hold_s=0.2)
        print(
            f"RTT ms: loopback max {max(loopback):.3f}; 20 ms delay link: idle "
            f"{min(idle):.1f}..{max(idle):.1f}, bulk {min(bulk):.1f}..{max(bulk):.1f}"
        )
        # Lower bounds only: netem guarantees the delay, while an upper bound on an RTT is a
        # timing a busy machine breaks. Loopback in the same namespace does not get the delay.
        assert max(loopback) < 19.0
        assert all(rtt >= 19.0 for rtt in idle + bulk)


@pytest.mark.bpf
def test_rate_limit_adds_queueing_delay_under_bulk_transfer() -> None:
    with two_hosts() as net:
        loopback_sink = start_sink(net, net.client_ns)  # a loopback peer inside the client ns
        loopback = bulk_send_sampling_rtt(net, "127.0.0.1", 1000, hold_s=0.5)
        loopback_sink.kill()
        loopback_sink.wait(timeout=5)

        start_sink(net, net.server_ns)
        net.add_rate_limit(net.client_ns, rate_kbit=10_000, queue_packets=30)
        shaped = bulk_send_sampling_rtt(net, net.server_ip, 2_000_000)
        print(
            f"RTT ms: loopback max {max(loopback):.3f}, shaped veth max {max(shaped):.1f} "
            f"median {sorted(shaped)[len(shaped) // 2]:.1f} over {len(shaped)} samples"
        )
        # Loopback is not shaped (its worst RTT stays under the shaped link's queueing delay);
        # only lower bounds, as above.
        assert max(loopback) < 10.0
        assert max(shaped) >= 10.0
