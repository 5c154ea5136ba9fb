"""HTTP/2 and gRPC at real-client volume, both sides exact: a grpcio client multiplexing hundreds
of calls of random sizes (bytes to 1 MiB) and outcomes on one channel, streaming calls of all
four kinds, cancellations; h2load with 100 streams per connection against nginx over TLS; curl
fetching many URLs in parallel over one HTTP/2 connection. The kernel walks the frames of
every call whatever its size (bpf/l7/proto_http2.h), so nothing is lost to large writes.

Needs: uprobes on libssl.so.3, tp/ syscall tracepoints, ring buffers, tail calls, bpf_loop.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import running_agent, scrape, total, wait_for
from test_http import SERVER
from test_http2 import h2_nginx  # noqa: F401  (fixture)

from support.servers import python_script_server

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(300)]

VOLUME_SERVER = r'''
import sys, time, grpc
from concurrent import futures

def echo(req, ctx):
    kind, _, rest = req.partition(b":")
    size = rest.partition(b":")[0]
    if kind == b"invalid":
        ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad argument " + "x" * 50)
    if kind == b"missing":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if kind == b"slow":
        time.sleep(1.0)
    return b"r" * int(size or b"1")

def fanout(req, ctx):
    for i in range(int(req)):
        yield b"item%d" % i
        time.sleep(0.002)

def total_size(requests, ctx):
    return b"%d" % sum(len(r) for r in requests)

def chat(requests, ctx):
    for r in requests:
        yield r[::-1]

handler = grpc.method_handlers_generic_handler("bench.Load", {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Fanout": grpc.unary_stream_rpc_method_handler(fanout),
    "Sum": grpc.stream_unary_rpc_method_handler(total_size),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
})
options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
'''

# Prints {"Method status": count} as the client saw each call end.
LOAD_CLIENT = r'''
import json, random, sys, grpc
from collections import Counter

port, seed, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
channel = grpc.insecure_channel("127.0.0.1:" + port, options=options)
grpc.channel_ready_future(channel).result(timeout=10)
echo = channel.unary_unary("/bench.Load/Echo")
fanout = channel.unary_stream("/bench.Load/Fanout")
total = channel.stream_unary("/bench.Load/Sum")
chat = channel.stream_stream("/bench.Load/Chat")
seen = Counter()

def size():  # bytes to 1 MiB, most of them small
    return int(2 ** rng.uniform(0, 20))

pending = []
for _ in range(calls):  # all in flight at once, on one channel
    kind = rng.choices(["ok", "invalid", "missing", "slow"], [80, 8, 8, 4])[0]
    request = kind.encode() + b":" + str(size()).encode() + b":" + b"p" * size()
    pending.append(echo.future(request, timeout=0.3 if kind == "slow" else 60))
for f in pending:
    try:
        f.result()
        seen["Echo OK"] += 1
    except grpc.RpcError as e:
        seen["Echo " + e.code().name] += 1

for _ in range(rng.randint(3, 6)):
    list(fanout(str(rng.randint(1, 30)).encode(), timeout=30))
    seen["Fanout OK"] += 1
for _ in range(rng.randint(2, 4)):  # cancelled mid-stream by the client
    call = fanout(b"500", timeout=30)
    next(call)
    call.cancel()
    try:
        list(call)
    except grpc.RpcError as e:
        seen["Fanout " + e.code().name] += 1
for _ in range(rng.randint(3, 6)):
    total(iter([b"q" * size() for _ in range(rng.randint(1, 8))]), timeout=30)
    seen["Sum OK"] += 1
for _ in range(rng.randint(3, 6)):
    list(chat(iter([b"m" * size() for _ in range(rng.randint(1, 8))]), timeout=30))
    seen["Chat OK"] += 1
channel.close()
print(json.dumps(seen))
'''

GRPC_CODES = {"OK": "0", "CANCELLED": "1", "UNKNOWN": "2", "INVALID_ARGUMENT": "3",
              "DEADLINE_EXCEEDED": "4", "NOT_FOUND": "5"}


@pytest.fixture(scope="module")
def volume_server() -> Iterator[int]:
    with python_script_server("volume_server", VOLUME_SERVER) as server:
        yield server.port


def rpc_counts(listen: str, family: str, service: str) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in scrape(listen).items():
        d = dict(labels)
        if name == f"{family}_count" and d.get("service_name") == service:
            out[(d["rpc_method"], d["rpc_grpc_status_code"])] += int(value)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_hundreds_of_multiplexed_grpc_calls_counted_exactly_on_both_sides(
        volume_server: int, tmp_path: Path, seed: int) -> None:
    client = tmp_path / "load_client.py"
    client.write_text(LOAD_CLIENT)
    with running_agent() as (_, listen):
        out = subprocess.run([sys.executable, str(client), str(volume_server), str(seed), "300"],
                             capture_output=True, text=True, timeout=240, check=True)
        seen = json.loads(out.stdout)
        want = Counter({(k.split()[0], GRPC_CODES[k.split()[1]]): v for k, v in seen.items()})
        calls = sum(want.values())
        for family, service in (("rpc_client_duration_seconds", "load_client"),
                                ("rpc_server_duration_seconds", "volume_server")):
            wait_for(lambda f=family, s=service: sum(rpc_counts(listen, f, s).values()) >= calls,
                     timeout_s=60)
            lost = "; ".join(f"{k[0]}{dict(k[1])}={v:g}" for k, v in scrape(listen).items()
                             if v and k[0].startswith(("probewire_http2_", "probewire_events_",
                                                       "probewire_l7_truncated")))
            assert rpc_counts(listen, family, service) == want, f"{family}: {lost}"
        s = scrape(listen)
        assert total(s, "probewire_http2_connections_lost_total") == 0
        assert total(s, "probewire_l7_truncated_calls_total", protocol="http2") == 0
    # The mix did what it says: errors of each kind, deadlines, cancellations.
    assert {("Echo", "3"), ("Echo", "5"), ("Fanout", "1")} <= set(want)


def _h2load(port: int, path: str, n: int, clients: int) -> Counter[str]:
    out = subprocess.run(["h2load", "-n", str(n), "-c", str(clients), "-m", "100",
                          f"https://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    assert done and codes, out
    assert int(done[2]) == n, out
    return Counter({"2xx": int(codes[1]), "3xx": int(codes[2]), "4xx": int(codes[3]),
                    "5xx": int(codes[4])})


def test_h2load_with_100_streams_per_connection_is_exact_per_route_and_status(
        h2_nginx: int) -> None:  # noqa: F811
    runs = {"/static/index.html": (1500, "200"), "/missing": (700, "404"),
            "/boom": (400, "500")}
    with running_agent() as (_, listen):
        for path, (n, status) in runs.items():
            codes = _h2load(h2_nginx, path, n, clients=3)
            assert codes[status[0] + "xx"] == n, (path, codes)
        want = sum(n for n, _ in runs.values())
        client = "http_client_request_duration_seconds_count"
        wait_for(lambda: total(scrape(listen), SERVER, service_name="nginx") >= want
                 and total(scrape(listen), client, service_name="h2load") >= want, timeout_s=60)
        s = scrape(listen)
        for path, (n, status) in runs.items():
            route = "/static/index.html" if path.startswith("/static") else path
            assert total(s, SERVER, service_name="nginx", http_route=route,
                         http_response_status_code=status) == n, path
            assert total(s, "http_client_request_duration_seconds_count", service_name="h2load",
                         http_route=route, http_response_status_code=status) == n, path
        assert total(s, SERVER, service_name="nginx") == want
        assert total(s, "probewire_http2_connections_lost_total") == 0


def test_curl_fetching_urls_in_parallel_over_one_http2_connection_is_exact(
        h2_nginx: int) -> None:  # noqa: F811
    urls = [f"https://127.0.0.1:{h2_nginx}/static/index.html"] * 40 + \
        [f"https://127.0.0.1:{h2_nginx}/missing"] * 25
    with running_agent() as (_, listen):
        out = subprocess.run(["curl", "-sk", "--http2", "--parallel", "--parallel-max", "50",
                              "-w", "%{http_code} %{http_version} %{num_connects}\n",
                              *[arg for u in urls for arg in ("-o", "/dev/null", u)]],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        transfers = [line.split() for line in out.splitlines() if line.strip()]
        assert len(transfers) == 65 and all(v == "2" for _, v, _ in transfers), out
        # Multiplexed: one connection made for all of them.
        assert sum(int(c) for _, _, c in transfers) == 1, out
        client = "http_client_request_duration_seconds_count"
        wait_for(lambda: total(scrape(listen), SERVER, service_name="nginx") >= 65
                 and total(scrape(listen), client, service_name="curl") >= 65)
        s = scrape(listen)
        assert total(s, SERVER, service_name="nginx", http_route="/static/index.html",
                     http_response_status_code="200") == 40
        assert total(s, SERVER, service_name="nginx", http_route="/missing",
                     http_response_status_code="404") == 25
        assert total(s, "http_client_request_duration_seconds_count", service_name="curl") == 65
        assert total(s, "probewire_http2_connections_lost_total") == 0
