"""What the exchange pipeline keeps between batches, and the connection stage that fills it.

A steady stream of exchange rows (l7/exchanges.py EXCHANGE) costs whole-array work only: per
connection (protocol, process, role, addresses, ports, peer process: the words of the rows'
neutral header) the memo holds its service, addresses, endpoints and series class; per label
set what the budget said and its series rows (red.py); per edge its rows (graph.py).

Everything here is a memo of a deterministic answer (formatting an address, the budget's answer
for a label set), except service names, which are asked again whenever the resolver says an
answer may have changed (ServiceResolver.name_until); a changed name, or a label set the series
TTL freed (the budget's answers change then), drops everything built from names. Ids are dense
and start afresh with the memo (`too_big`, or the memory guard's `shrink`).
"""

from __future__ import annotations

import collections
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from probewire.aggregate.ids import (
    MIX,
    Column,
    IdCache,
    SortedIds,
    distinct,
    interned,
    interned_all,
    same_rows,
)
from probewire.aggregate.series import grown
from probewire.enrich.net import format_address
from probewire.enrich.service import ServiceResolver
from probewire.l7.constants import Role
from probewire.l7.exchanges import EXCHANGE

# Memo tables start afresh past this many entries; a batch beyond BATCH_MAX rows is taken in
# parts, so every id fits its bits in a key.
MEMO_MAX = 1 << 16
BATCH_MAX = 1 << 18
ID_BITS = 19
# Connections cost ~300 bytes each: a host opening many keeps at most this many in the memo.
CONNS_MAX = 1 << 14
CONN_BITS = 16
ENDPOINTS_MAX = 65536
# As plain ints: numpy probes an enum member for array protocols (~1 µs a use, per batch).
_SERVER = int(Role.SERVER)
# Columns of the memo's per-connection rows: its service, its peer process's service (0: not
# known), peer and local address ids, series class (protocol, role, service, client's server
# endpoint), endpoint put key less a client's own port, client edge id, server edge id.
(SVC, PEER_SVC, PEER, LOCAL, CLASS, PUT, CLIENT_EDGE, SERVER_EDGE) = range(8)
CONN_COLUMNS = 8
_KEEP_ALL = ~np.uint64(0)


def _conn_words(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit words of a row holding its connection (protocol, process, role, addresses,
    ports, peer process, flags), and a mask per word keeping only those bytes."""
    keep = np.zeros(dtype.itemsize, dtype=np.uint8)
    for name in ("proto", "role", "tgid", "peer_tgid", "family", "flags", "lport", "rport",
                 "laddr", "raddr"):
        fld, offset = dtype.fields[name][:2]  # type: ignore[index]
        keep[offset: offset + fld.itemsize] = 0xFF
    words = keep.view(np.uint64)
    index = words.nonzero()[0]
    return index, words[index]


CONN_WORDS, CONN_MASKS = _conn_words(EXCHANGE)


def _port_clear(dtype: np.dtype, name: str) -> tuple[int, np.uint64]:
    """(column of the connection words holding port field `name`, mask clearing it)."""
    offset = dtype.fields[name][1]  # type: ignore[index]
    column = int(np.flatnonzero(offset // 8 == CONN_WORDS)[0])
    return column, ~np.uint64(0xFFFF << (8 * (offset % 8)))


# A connection's ephemeral port (a server's client port, a client's own port) is left out of
# its words: what the memo keeps per connection does not depend on it.
_LPORT_CLEAR = _port_clear(EXCHANGE, "lport")
_RPORT_CLEAR = _port_clear(EXCHANGE, "rport")
_CONN_MIX = (np.arange(1, len(CONN_WORDS) + 1, dtype=np.uint64) * MIX) | np.uint64(1)


class Bounded(OrderedDict[tuple[str, int], str]):
    """Endpoint -> service, forgetting the oldest beyond a fixed size."""

    def put(self, key: tuple[str, int], value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > ENDPOINTS_MAX:
            self.popitem(last=False)


@dataclass
class Endpoints:
    """Which service owns which local endpoint: a server's (address, port) names the server
    side of client edges; a client's names a server's local client. And which addresses are
    this host's."""

    servers: Bounded = field(default_factory=Bounded)
    clients: Bounded = field(default_factory=Bounded)
    local_addresses: set[str] = field(default_factory=lambda: {"127.0.0.1", "::1"})

    def server_name(self, endpoint: tuple[str, int]) -> str:
        name = self.servers.get(endpoint)
        if name is None and endpoint[0] in self.local_addresses:
            name = next((svc for (_, port), svc in self.servers.items()
                         if port == endpoint[1]), None)
        return name or f"{endpoint[0]}:{endpoint[1]}"


class Memo:
    def __init__(self) -> None:
        # (family, address words) -> id; per id its string, whether it is one of ours
        # (Endpoints.local_addresses, as of `locals_seen` of them) and whether it was added
        # there.
        self.address_ids: dict[tuple[int, int, int], int] = {}
        self.address_names: list[str] = []
        self.address_local = Column(0)
        self.address_added = Column(0)
        self.locals_seen = -1
        # (tgid << 16 | server port) -> service id; per id its key, name and until when the
        # name stands (reset to 0 whenever the resolver's generation moves). Id 0: no process
        # (a server's client the kernel did not know).
        self.service_ids: dict[int, int] = {-1: 0}
        self.service_keys: list[int] = [-1]
        self.service_names: list[str] = [""]
        self.service_until = Column(0.0, np.float64)
        self.service_until[0] = np.inf
        self.generation = -1
        # Client endpoints (address id << 16 | port) -> id, with their (address, port).
        self.endpoint_ids: dict[int, int] = {}
        self.endpoints: list[tuple[str, int]] = []
        # Small interned tuples: series classes (protocol, role, service, endpoint), client
        # edges (protocol, service, endpoint).
        self.class_ids: dict[tuple[int, int, int, int], int] = {}
        self.classes: list[tuple[int, int, int, int]] = []
        self.client_edge_ids: dict[tuple[int, int, int], int] = {}
        self.client_edges: list[tuple[int, int, int]] = []
        self.names_epoch = 0  # moves with drop_names
        self.drop_connections()
        self.drop_names()

    def drop_connections(self) -> None:
        """Forget connections (and endpoint puts, one per client connection): many hosts
        open connections without end, and nothing else refers to them."""
        # By hash of a connection's words: a direct-mapped cache in front of a dict.
        # (No victims: the dict behind it is as quick for a few misses.)
        self.conn_cache = IdCache(CONN_BITS, victims=False)
        self.conn_keys: dict[int, int] = {}
        self.conn_count = 0
        self.conn_words = np.zeros((64, len(CONN_WORDS)), dtype=np.uint64)
        # Per connection, a row: see SVC..SERVER_EDGE.
        self.conns = np.zeros((64, CONN_COLUMNS), dtype=np.int64)
        # Endpoint put key (see Connections.new) -> ((local address, port), service).
        self.put_items: dict[int, tuple[tuple[str, int], str]] = {}

    def drop_names(self) -> None:
        """Forget everything built from service names (one changed) or from budget answers
        (a label set was freed)."""
        self.names_epoch = getattr(self, "names_epoch", 0) + 1
        # Series keys -> entry; per entry a row of `entries`: sink (plus FOLDED if its label
        # set was folded), its rows in the duration, request size and response size series
        # of the sink (-1: none). Keys with the same effect share an entry (with a budget
        # full, most keys fold into a few series). An aborted entry's labels.
        self.entry_cache = IdCache(14)
        self.entry_of = SortedIds()
        self.entry_keys = 0
        self.entries = np.zeros((64, 4), dtype=np.int32)
        self.entry_ids: dict[tuple[int, ...], int] = {}
        self.aborted_labels: list[tuple[str, ...]] = []
        self.aborted_ids: dict[tuple[str, ...], int] = {}
        self.any_folded = False
        # Client edges: per client edge id, its edge_client_total key and histogram row.
        self.client_edge_total: list[tuple[str, tuple[str, int], str] | None] = []
        self.client_edge_row = Column()
        # Server edges: client names; per connection its edge (SERVER_EDGE: -2 not worked
        # out, -3 a local client named by its port, worked out per row); edge keys
        # (service, client name, remote?, connection type) -> id; per id its labels and rows
        # (seconds, total, failed), folded?
        self.name_ids: dict[str, int] = {}
        self.conns[:, SERVER_EDGE] = -2
        self.put_items.clear()
        self.server_edge_ids: dict[tuple[int, int, int, str], int] = {}
        self.server_edge_labels: list[tuple[str, ...]] = []
        self.server_edges = np.zeros((64, 4), dtype=np.int64)
        self.server_edge_folded = False

    def entry(self, kind: int, duration: int = -1, req: int = -1, resp: int = -1,
              aborted: tuple[str, ...] | None = None) -> int:
        """The entry with these effects (for an aborted one: counted under `aborted`)."""
        self.entry_keys += 1
        content = (kind, duration, req, resp) if aborted is None else (
            kind, interned(self.aborted_ids, self.aborted_labels, aborted))
        entry = self.entry_ids.get(content)
        if entry is None:
            entry = self.entry_ids[content] = len(self.entry_ids)
            if entry == len(self.entries):
                self.entries = grown(self.entries, 2 * len(self.entries))
            self.entries[entry] = content if aborted is None else (kind, -1, -1, content[1])
            self.any_folded |= bool(kind & FOLDED)
        return entry

    def address_ids_of(self, family: list[int], words: np.ndarray, ours: set[str]) -> list[int]:
        """Ids of (family, 16 address bytes as two words) rows, made for new ones."""
        keys = list(zip(family, words[:, 0].tolist(), words[:, 1].tolist(), strict=True))
        get = self.address_ids.get
        ids = [get(k, -1) for k in keys]
        if -1 in ids:
            for i, key in enumerate(keys):
                aid = get(key, -1)
                if aid < 0:
                    aid = self.address_ids[key] = len(self.address_names)
                    raw = key[1].to_bytes(8, "little") + key[2].to_bytes(8, "little")
                    name = format_address(key[0], raw)
                    self.address_names.append(name)
                    self.address_local[aid] = name in ours
                    self.address_added[aid] = 0
                ids[i] = aid
        return ids

    def service_ids_of(self, keys: list[int]) -> list[int]:
        ids = interned_all(self.service_ids, self.service_keys, keys)
        while len(self.service_names) < len(self.service_keys):
            self.service_names.append("")  # not asked yet: its until is 0
        self.service_until.ensure(len(self.service_keys))
        return ids

    def endpoint(self, address: int, port: int) -> int:
        key = address << 16 | port
        found = self.endpoint_ids.get(key)
        if found is None:
            found = self.endpoint_ids[key] = len(self.endpoints)
            self.endpoints.append((self.address_names[address], port))
        return found

    def size(self) -> int:
        """Entries of its largest table."""
        return max(len(self.address_names), len(self.service_keys), len(self.endpoints),
                   len(self.classes), len(self.client_edges), self.entry_keys,
                   len(self.name_ids), len(self.server_edge_labels))

    def too_big(self) -> bool:
        return self.size() > MEMO_MAX


# Entry kinds beyond the sinks (red.py): an aborted exchange counted on its own, a row that
# feeds no RED series (gRPC: rpc_* metrics; a DNS server). FOLDED marks a folded label set.
ABORTED, SKIPPED = 14, 15
FOLDED = 16


class Connections:
    """The connection stage: each row's connection id in the memo, with what the memo maps it
    to (service, addresses, class, endpoints), and the services asked again when due."""

    def __init__(self, services: ServiceResolver, endpoints: Endpoints) -> None:
        self.services = services
        self.endpoints = endpoints

    def ids(self, memo: Memo, rows: np.ndarray) -> np.ndarray:
        """The memo's connection id of each row.

        A connection is the words of the row holding protocol, process, role, addresses,
        ports and peer process, less the ephemeral port (a server's client port, a client's
        own port: nothing kept per connection depends on it, and a host opening connections
        without end opens few of these). It is looked up by a hash of its words and
        confirmed by comparing them all.
        """
        if memo.conn_count > CONNS_MAX:
            memo.drop_connections()
        is_server = rows["role"] == _SERVER
        flat = rows if rows.flags.c_contiguous else np.ascontiguousarray(rows)
        words = flat.view(np.uint64).reshape(len(rows), -1)[:, CONN_WORDS] & CONN_MASKS
        (lcol, lclear), (rcol, rclear) = _LPORT_CLEAR, _RPORT_CLEAR
        if lcol == rcol:
            words[:, lcol] &= np.where(is_server, rclear, lclear)
        else:
            words[:, rcol] &= np.where(is_server, rclear, _KEEP_ALL)
            words[:, lcol] &= np.where(is_server, _KEEP_ALL, lclear)
        key = (words @ _CONN_MIX >> np.uint64(1)).view(np.int64)
        conn, slots = memo.conn_cache.find(key)
        # -1 reads the last row: harmless, those rows are misses already.
        conn[~same_rows(memo.conn_words, conn, words)] = -1
        miss = (conn < 0).nonzero()[0]
        if len(miss):
            # Mostly a connection whose cache slot another took: the dict knows it (there are
            # few: ephemeral ports are left out).
            known = memo.conn_keys
            conn[miss] = [known.get(k, -1) for k in key[miss].tolist()]
            conn[miss[~same_rows(memo.conn_words, conn[miss], words[miss])]] = -1
            new = miss[conn[miss] < 0]
            if len(new):
                conn[new] = self._new(memo, rows, new, words[new], key[new])
                # A hash another connection has: this one is made again when next seen.
                for k, c in zip(key[new].tolist(), conn[new].tolist(), strict=True):
                    known.setdefault(k, c)
            memo.conn_cache.put(key[miss], slots[miss], conn[miss])
            memo.conn_cache.fit(len(known), lambda: (
                np.fromiter(known, np.int64, len(known)),
                np.fromiter(known.values(), np.int64, len(known))))
        return conn

    def _new(self, memo: Memo, rows: np.ndarray, at_rows: np.ndarray, words: np.ndarray,
             key: np.ndarray) -> np.ndarray:
        """Ids for connections the cache did not know (one per distinct connection among
        `at_rows`), with what each maps to, worked out for all of them at once."""
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        # Equal hashes, different connections: those rows get connections of their own.
        odd = (~(words == words[first][inverse]).all(axis=1)).nonzero()[0]
        if len(odd):
            inverse[odd] = len(first) + np.arange(len(odd))
            first = np.concatenate([first, odd])
        at = at_rows[first]
        role = rows["role"][at].astype(np.int64)
        proto = rows["proto"][at].tolist()
        server = role == Role.SERVER
        lport = rows["lport"][at].astype(np.int64)
        rport = rows["rport"][at].tolist()
        peer_tgid = rows["peer_tgid"][at].astype(np.int64)
        family = rows["family"][at].tolist()
        # Service per (tgid, local port): port rules name the server side.
        svc = memo.service_ids_of((rows["tgid"][at].astype(np.int64) << 16
                                   | np.where(server, lport, 0)).tolist())
        peer_svc = memo.service_ids_of((peer_tgid << 16).tolist())
        peer_svc = [s if t else 0 for s, t in zip(peer_svc, peer_tgid.tolist(), strict=True)]
        ours = self.endpoints.local_addresses
        peer = memo.address_ids_of(family, np.ascontiguousarray(rows["raddr"][at]).view(
            np.uint64), ours)
        local = memo.address_ids_of(family, np.ascontiguousarray(rows["laddr"][at]).view(
            np.uint64), ours)
        # A client's server endpoint labels its series and edges; a server's is 0.
        role_list, server_list = role.tolist(), server.tolist()
        endpoint = [0 if s else memo.endpoint(p, port)
                    for s, p, port in zip(server_list, peer, rport, strict=True)]
        cls = interned_all(memo.class_ids, memo.classes,
                           list(zip(proto, role_list, svc, endpoint, strict=True)))
        # Endpoint puts, keyed (service, local address, port, role) in an int; a client's
        # own port is the row's, added per row.
        put = ((np.array(svc) << ID_BITS | np.array(local)) << 16
               | np.where(server, lport, 0)) << 8 | role
        client_edge = [interned(memo.client_edge_ids, memo.client_edges, (pr, s, e))
                       if r == Role.CLIENT else -1
                       for pr, r, s, e in zip(proto, role_list, svc, endpoint, strict=True)]
        base, m = memo.conn_count, len(at)
        memo.conn_count += m
        while len(memo.conn_words) < base + m:
            memo.conn_words = grown(memo.conn_words, 2 * len(memo.conn_words))
        memo.conn_words[base: base + m] = words[first]
        while len(memo.conns) < base + m:
            memo.conns = grown(memo.conns, 2 * len(memo.conns))
        new_rows = memo.conns[base: base + m]
        for column, values in ((SVC, svc), (PEER_SVC, peer_svc), (PEER, peer),
                               (LOCAL, local), (CLASS, cls), (PUT, put),
                               (CLIENT_EDGE, client_edge)):
            new_rows[:, column] = values
        new_rows[:, SERVER_EDGE] = -2
        return base + inverse

    def check_services(self, memo: Memo, services: np.ndarray) -> None:
        """Ask the resolver again for every service name of the batch (`services`: ids, a
        row's own and its peer process's) whose last answer may no longer stand, as asking
        for each on every batch would; rebuild what was built from a name that changed."""
        resolver = self.services
        until = memo.service_until
        if resolver.generation != memo.generation:
            memo.generation = resolver.generation
            until.data[:] = 0.0
            until.data[0] = np.inf  # the "no process" service
        now = time.monotonic()
        if (until.data.take(services) > now).all():
            return
        changed = False
        for sid in distinct(services.ravel()):
            if until.data[sid] > now:
                continue
            key = memo.service_keys[sid]
            name, until[sid] = resolver.name_until(key >> 16, key & 0xFFFF)
            changed |= memo.service_names[sid] not in ("", name)
            memo.service_names[sid] = name
        if changed:
            memo.drop_names()

    def add_local_addresses(self, memo: Memo, local: np.ndarray) -> None:
        """This batch's local addresses into the host's set (once per address), then which
        known addresses are ours, if that set grew."""
        added = memo.address_added.data
        ours = self.endpoints.local_addresses
        if not added[local].all():
            for aid in distinct(local[added[local] == 0]):
                ours.add(memo.address_names[aid])
                added[aid] = 1
        if len(ours) != memo.locals_seen:
            memo.locals_seen = len(ours)
            flags = [name in ours for name in memo.address_names]
            memo.address_local.data[: len(flags)] = flags
            memo.conns[:, SERVER_EDGE] = -2  # a remote client may be local now

    def put_endpoints(self, memo: Memo, is_server: np.ndarray, put: np.ndarray) -> None:
        """Which service owns each local endpoint of the batch (server side: for the graph's
        client-side edges; client side: to name a server's local client).

        One put per distinct (role, local address, port, service), in the order they first
        appear, done in bulk: the tables end up as sequential puts would leave them. `put` is
        each row's key, (service, local address, port, role) packed in an int.
        """
        made = memo.put_items
        if len(made) > MEMO_MAX:
            made.clear()
        for side, table in ((True, self.endpoints.servers), (False, self.endpoints.clients)):
            keys = put[is_server] if side else put[~is_server]
            if not len(keys):
                continue
            order = dict.fromkeys(keys.tolist())
            for k in [k for k in order if k not in made]:
                local = (k >> 24) & ((1 << ID_BITS) - 1)
                made[k] = ((memo.address_names[local], (k >> 8) & 0xFFFF),
                           memo.service_names[k >> (24 + ID_BITS)])
            items = list(map(made.__getitem__, order))
            # Keys by their last put, latest first, each with its last value.
            puts = dict(reversed(items))
            puts.update(items)
            table.update(puts)
            collections.deque(map(table.move_to_end, reversed(puts)), maxlen=0)
            while len(table) > ENDPOINTS_MAX:
                table.popitem(last=False)
