"""A user-space TCP relay that records each recv as a Segment with its true boundaries.

    with TcpRelay(server_port) as relay:          # client -> relay.port -> server
        drive(relay.port)
    relay.connections  # per accepted connection: (server-view segments, client-view segments)

The relay is itself a process doing real reads and writes: on its client-facing socket it is
the server (requests read = IN, responses written = OUT), on its server-facing socket the
client (requests written = OUT, responses read = IN). Both views are recorded, each read
as one Segment, so parsers can be checked from either end on real bytes.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from probewire.l7.protocol import Direction, Segment


@dataclass
class Recorded:
    server_view: list[Segment] = field(default_factory=list)  # the relay as the server
    client_view: list[Segment] = field(default_factory=list)  # the relay as the client


class TcpRelay:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[Recorded] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TcpRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # let the last replies through
        self._stop.set()
        self._thread.join(5)
        self.listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ)
        peers: dict[socket.socket, tuple[socket.socket, Recorded, bool]] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    upstream = socket.create_connection(self.target)
                    rec = Recorded()
                    self.connections.append(rec)
                    for s in (client, upstream):
                        s.setblocking(True)
                        sel.register(s, selectors.EVENT_READ)
                    peers[client] = (upstream, rec, True)
                    peers[upstream] = (client, rec, False)
                    continue
                if sock not in peers:  # closed with its peer earlier in this batch
                    continue
                other, rec, from_client = peers[sock]
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                ts = time.monotonic_ns()
                if not data:
                    for s in (sock, other):
                        if peers.pop(s, None) is not None:
                            sel.unregister(s)
                            s.close()
                    continue
                if from_client:  # a request: read by the relay-as-server, written as client
                    rec.server_view.append(Segment(Direction.IN, data, ts))
                    other.sendall(data)
                    rec.client_view.append(Segment(Direction.OUT, data, time.monotonic_ns()))
                else:
                    rec.client_view.append(Segment(Direction.IN, data, ts))
                    other.sendall(data)
                    rec.server_view.append(Segment(Direction.OUT, data, time.monotonic_ns()))
        for s in list(peers):
            s.close()
        sel.close()


class UdpRelay:
    """A UDP relay in a network namespace: datagrams to listen (e.g. 127.0.0.1:53, where the
    namespace's resolv.conf points) go to the server from a socket per client, and back.
    Records the relay-as-server view (IN: queries, OUT: answers, peer = the client)."""

    def __init__(self, netns: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.netns, self.listen, self.target = netns, listen, target
        self.segments: list[Segment] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UdpRelay:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the UDP relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import ctypes
        import os

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        try:  # only this thread moves into the namespace; its sockets stay there
            if libc.setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        front.bind(self.listen)
        sel = selectors.DefaultSelector()
        sel.register(front, selectors.EVENT_READ)
        upstreams: dict[tuple[str, int], socket.socket] = {}
        owner: dict[socket.socket, tuple[str, int]] = {}
        self._ready.set()
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data, addr = sock.recvfrom(65536)
                ts = time.monotonic_ns()
                if sock is front:
                    self.segments.append(Segment(Direction.IN, data, ts, peer=addr))
                    up = upstreams.get(addr)
                    if up is None:
                        up = upstreams[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        owner[up] = addr
                        sel.register(up, selectors.EVENT_READ)
                    up.sendto(data, self.target)
                else:
                    client = owner[sock]
                    front.sendto(data, client)
                    self.segments.append(Segment(Direction.OUT, data, time.monotonic_ns(),
                                                 peer=client))
        for s in (front, *upstreams.values()):
            s.close()
        sel.close()
