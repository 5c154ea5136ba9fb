"""Two test hosts in network namespaces joined by a veth pair, with loss and delay.

    with two_hosts() as net:
        server = net.exec(net.server_ns, [sys.executable, "-m", "http.server", "8000"])
        net.add_loss(net.client_ns, dport=8000, percent=10)  # 10% of client->:8000 segments lost
        _, slow_server_ip = net.add_delay_link(rtt_ms=20)    # a second link with a fixed 20 ms RTT
        before = net.nstat(net.client_ns)["TcpRetransSegs"]

Facts of our kernel (6.18): `netem`, `fq`, `prio`, `sfq`, `fq_codel` qdiscs are not built; `htb`,
`tbf`, `pfifo`, `bfifo`, nftables and cls_bpf are. So:
- loss is an nft rule (by default where the segment arrives, which behaves like a lossy wire);
- a fixed delay is a TUN link whose packets a small forwarder process holds for RTT/2 each way
  (add_delay_link); add_rate_limit gives HTB queueing delay instead, which exists only while a
  bulk transfer keeps the queue full and swings between ~1 and queue bytes / rate ms (the
  default congestion control here is BBR, which drains the queue every few RTTs).
The veth runs without segmentation offload (gso_max_segs 1) unless asked, so a loss percentage and
a queue length in packets mean what they say.

Only addresses from 198.18.0.0/15 (RFC 2544 benchmarking range) are used, and only inside the
namespaces created here. Namespaces (and every process started in them) are removed on exit, even
on exceptions; names carry the creator's pid so parallel runs never clash and leftovers of a
killed run can be swept with `remove_stale_namespaces()` (conftest does it at start-up).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import re
import secrets
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

CLIENT_IP = "198.18.0.1"
SERVER_IP = "198.18.0.2"
PREFIX_LEN = 24
IFNAME = "eth0"
DELAY_CLIENT_IP = "198.18.1.1"
DELAY_SERVER_IP = "198.18.1.2"
DELAY_IFNAME = "dly0"
_LOSS_TABLE = "pw_loss"
_SNMP_FILES = ("/proc/net/snmp", "/proc/net/netstat")
_CMD_TIMEOUT_S = 10.0


def _sh(argv: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def parse_snmp(text: str) -> dict[str, int]:
    """Parse /proc/net/{snmp,netstat} (header line + value line per group) into nstat names."""
    counters: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        group, _, names = header.partition(":")
        vgroup, _, nums = values.partition(":")
        if group != vgroup:
            raise ValueError(f"misaligned snmp lines: {header!r} / {values!r}")
        for name, num in zip(names.split(), nums.split(), strict=True):
            counters[group + name] = int(num)
    return counters


@dataclass
class TwoHosts:
    """Handle for a client and a server namespace joined by one veth (`eth0` in each)."""

    client_ns: str
    server_ns: str
    client_ip: str = CLIENT_IP
    server_ip: str = SERVER_IP
    ifname: str = IFNAME
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    _delay_link: tuple[str, str] | None = field(default=None, repr=False)

    # -- processes -------------------------------------------------------------------------------
    def exec(self, ns: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside ns; it is killed when the hosts are torn down (if still running)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], **popen_kw
        )
        self._procs.append(proc)
        return proc

    def run(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside ns to completion, capturing text output."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    # -- faults ----------------------------------------------------------------------------------
    def peer_of(self, ns: str) -> str:
        if ns not in (self.client_ns, self.server_ns):
            raise ValueError(f"{ns} is not one of these hosts")
        return self.server_ns if ns == self.client_ns else self.client_ns

    def add_loss(self, ns: str, dport: int, percent: int, *, where: str = "wire") -> None:
        """Lose `percent`% (at random) of the TCP segments that ns sends to port dport.

        where="wire" (default) drops them as they arrive in the peer namespace (nft prerouting),
        so the sender sees exactly what a lossy link does: dup ACKs / SACKs, fast retransmits
        (2 MB at 10%: ~160 drops, 150-400 TcpRetransSegs, always > 0).
        where="local" drops them in ns's own output hook, as the DESIGN example does: TCP gets a
        local send error and mostly re-sends the segment as new data, so TcpRetransSegs grows
        little and erratically (~150 drops gave 0-70 retransmits): do not use it to make
        retransmits happen.
        """
        if not 0 <= percent <= 100 or where not in ("wire", "local"):
            raise ValueError(f"bad loss spec: percent={percent} where={where}")
        if where == "wire":
            rule_ns, hook, match = self.peer_of(ns), "prerouting", 'iifname != "lo" '
        else:
            rule_ns, hook, match = ns, "output", ""
        rules = (
            f"table inet {_LOSS_TABLE} {{\n"
            f"  chain {hook} {{ type filter hook {hook} priority -300; policy accept;\n"
            f"    {match}tcp dport {int(dport)} numgen random mod 100 < {int(percent)}"
            f" counter drop\n"
            f"  }}\n}}\n"
        )
        _sh(["ip", "netns", "exec", rule_ns, "nft", "-f", "-"], input=rules)

    def clear_loss(self) -> None:
        """Remove every add_loss rule from both namespaces."""
        for ns in (self.client_ns, self.server_ns):
            _sh(
                ["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", _LOSS_TABLE],
                check=False,
            )

    def loss_drops(self) -> int:
        """Segments dropped so far by add_loss rules, in both namespaces (nft rule counters)."""
        total = 0
        for ns in (self.client_ns, self.server_ns):
            out = _sh(["ip", "netns", "exec", ns, "nft", "list", "ruleset"])
            total += sum(int(n) for n in re.findall(r"counter packets (\d+)", out))
        return total

    def add_rate_limit(self, ns: str, rate_kbit: int, queue_packets: int) -> None:
        """Shape ns's egress on the veth to rate_kbit with a FIFO of queue_packets.

        Under a bulk transfer the queue fills and adds up to queue_packets * 1514 B / rate of
        delay to every packet behind it (10 Mbit/s and 30 packets: ~36 ms). Without a transfer
        keeping the queue busy there is no delay: this is queueing delay, not a fixed latency.
        """
        dev = ["dev", self.ifname]
        tc = ["ip", "netns", "exec", ns, "tc"]
        _sh([*tc, "qdisc", "replace", *dev, "root", "handle", "1:", "htb", "default", "1"])
        rate = f"{int(rate_kbit)}kbit"
        _sh(
            [
                *tc,
                "class",
                "replace",
                *dev,
                "parent",
                "1:",
                "classid",
                "1:1",
                "htb",
                "rate",
                rate,
                "ceil",
                rate,
            ]
        )
        _sh(
            [
                *tc,
                "qdisc",
                "replace",
                *dev,
                "parent",
                "1:1",
                "handle",
                "10:",
                "pfifo",
                "limit",
                str(int(queue_packets)),
            ]
        )

    def add_delay_link(self, rtt_ms: float) -> tuple[str, str]:
        """Add a second, point-to-point link with a fixed round-trip delay; return its addresses.

        No netem here, so a small forwarder process moves packets between a TUN device in each
        namespace (`dly0`) and holds each one for rtt_ms / 2: every packet, idle or not, sees the
        delay (unlike add_rate_limit). Returns (client_ip, server_ip) to use instead of the veth
        addresses. The forwarder is a Python loop: good for ~10k packets/s, not for benchmarks.
        """
        if self._delay_link is not None:
            raise RuntimeError("add_delay_link() was already called for these hosts")
        fwd = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "delay-forward",
                self.client_ns,
                self.server_ns,
                DELAY_IFNAME,
                str(float(rtt_ms) / 2),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._procs.append(fwd)
        assert fwd.stdout is not None
        if fwd.stdout.readline().strip() != "ready":
            raise RuntimeError(f"delay forwarder failed to start (exit {fwd.poll()})")
        for ns, ip, peer in (
            (self.client_ns, DELAY_CLIENT_IP, DELAY_SERVER_IP),
            (self.server_ns, DELAY_SERVER_IP, DELAY_CLIENT_IP),
        ):
            _sh(["ip", "-n", ns, "addr", "add", ip, "peer", f"{peer}/32", "dev", DELAY_IFNAME])
            _sh(["ip", "-n", ns, "link", "set", DELAY_IFNAME, "up"])
        self._delay_link = (DELAY_CLIENT_IP, DELAY_SERVER_IP)
        return self._delay_link

    def clear_rate_limit(self, ns: str) -> None:
        _sh(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", self.ifname, "root"],
            check=False,
        )

    # -- observation -----------------------------------------------------------------------------
    def nstat(self, ns: str) -> dict[str, int]:
        """Absolute kernel counters of ns under nstat's names (TcpRetransSegs, TcpExtTCP...).

        Read straight from /proc/net/{snmp,netstat} inside ns: unlike `nstat`, this never reads
        or writes nstat's history file (shared by all namespaces), so it cannot disturb anything.
        """
        counters: dict[str, int] = {}
        for path in _SNMP_FILES:
            counters.update(parse_snmp(_sh(["ip", "netns", "exec", ns, "cat", path])))
        return counters

    def tcp_rtts_ms(self, ns: str, dport: int) -> list[float]:
        """Smoothed RTT (ms) of each TCP connection in ns to port dport, as `ss -tin` shows it."""
        out = _sh(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "ss",
                "-tinH",
                "state",
                "connected",
                "dport",
                f"= :{int(dport)}",
            ]
        )
        return [float(m) for m in re.findall(r"\brtt:([0-9.]+)/", out)]

    def wait_listening(self, ns: str, port: int, timeout_s: float = 5.0) -> None:
        """Wait until something listens on TCP port in ns."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = _sh(["ip", "netns", "exec", ns, "ss", "-tlnH", "sport", f"= :{int(port)}"])
            if out.strip():
                return
            time.sleep(0.02)
        raise TimeoutError(f"nothing listens on :{port} in {ns} after {timeout_s} s")

    # -- teardown --------------------------------------------------------------------------------
    def _stop_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2)


def _ns_pids(ns: str) -> list[int]:
    out = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split()]


def _delete_ns(ns: str) -> None:
    # A process left in the namespace would keep it (and its veth) alive after the name is gone.
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _sh(["ip", "netns", "delete", ns], check=False)


def remove_stale_namespaces(prefix: str = "pw") -> list[str]:
    """Delete namespaces left by two_hosts() runs whose creating process no longer exists."""
    removed = []
    for line in _sh(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        # -c/-s: two_hosts(); -n<i>: the multi-node test's hub and nodes.
        m = re.fullmatch(re.escape(prefix) + r"-(\d+)-[0-9a-f]+-(?:[cs]|n\d)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_ns(name)
            removed.append(name)
    return removed


@contextlib.contextmanager
def two_hosts(prefix: str = "pw", *, offload: bool = False) -> Iterator[TwoHosts]:
    """Create client and server namespaces joined by a veth; always remove them afterwards.

    offload=False (default) caps GSO at one segment, so TCP hands the veth MTU-sized packets as
    on a real wire: a loss percentage and a queue length in packets then mean what they say
    (with offload a 2 MB transfer is only ~30 64 KB super-packets). offload=True is faster.
    """
    if os.geteuid() != 0:
        raise PermissionError("two_hosts() needs root (ip netns add): run the tests as root")
    tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    hosts = TwoHosts(client_ns=f"{tag}-c", server_ns=f"{tag}-s")
    created: list[str] = []
    try:
        for ns in (hosts.client_ns, hosts.server_ns):
            _sh(["ip", "netns", "add", ns])
            created.append(ns)
        # Created inside the client ns with its peer in the server ns, so the host's own
        # namespace never sees (or clashes on) the interface names.
        _sh(
            [
                "ip",
                "-n",
                hosts.client_ns,
                "link",
                "add",
                IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                IFNAME,
                "netns",
                hosts.server_ns,
            ]
        )
        for ns, ip in ((hosts.client_ns, hosts.client_ip), (hosts.server_ns, hosts.server_ip)):
            _sh(["ip", "-n", ns, "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", IFNAME])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            if not offload:
                _sh(["ip", "-n", ns, "link", "set", IFNAME, "gso_max_segs", "1"])
            _sh(["ip", "-n", ns, "link", "set", IFNAME, "up"])
        yield hosts
    finally:
        hosts._stop_processes()
        for ns in created:
            _delete_ns(ns)


# -- the delay forwarder (runs as its own process: python netns.py delay-forward ...) -------------
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


def _open_tun_in(ns: str, ifname: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{ns}") as nsfile:
        # os.setns is 3.12+. This process is single-threaded, so the whole process switches.
        if libc.setns(nsfile.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({ns})")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    # A non-persistent TUN device lives in the namespace current at TUNSETIFF and dies with fd.
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", ifname.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _delay_forward(client_ns: str, server_ns: str, ifname: str, one_way_ms: float) -> None:
    fd_c = _open_tun_in(client_ns, ifname)
    fd_s = _open_tun_in(server_ns, ifname)
    peer = {fd_c: fd_s, fd_s: fd_c}
    delay_s = one_way_ms / 1000.0
    queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out fd, packet)
    seq = 0
    print("ready", flush=True)
    poller = select.poll()
    for fd in peer:
        poller.register(fd, select.POLLIN)
    while True:
        timeout_ms = None
        if queue:
            timeout_ms = max(0, int((queue[0][0] - time.monotonic()) * 1000) + 1)
        for fd, _ in poller.poll(timeout_ms):
            now = time.monotonic()
            for _ in range(256):  # bounded drain per wake-up
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                heapq.heappush(queue, (now + delay_s, seq, peer[fd], pkt))
                seq += 1
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, pkt = heapq.heappop(queue)
            with contextlib.suppress(OSError):  # the device went down: drop, like a wire
                os.write(out, pkt)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "delay-forward":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _delay_forward(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    else:
        sys.exit(f"usage: {sys.argv[0]} delay-forward CLIENT_NS SERVER_NS IFNAME ONE_WAY_MS")
