"""A local HTTP server that replays Kubernetes API JSON: list (with limit/continue pages), then
watch from a resourceVersion, and ``410 Gone`` once a version is compacted away.

No kube-apiserver runs on our machines (it needs etcd and a control plane); this replays the
exact wire format of ``GET /api/v1/pods`` and ``/api/v1/services`` (PodList/ServiceList, watch
events one JSON document per line, BOOKMARK events, ``ERROR`` events carrying a v1 Status)
from the objects in tests/data/kubernetes/ and the events a test adds.

    with kube_api(pods=load_pods("pods.json")) as api:
        api.url                  # http://127.0.0.1:PORT
        api.add("MODIFIED", pod) # the next watch sees it
        api.compact()            # versions before now answer 410 Gone
        api.requests             # every (path, query) asked, in order
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

DATA = Path(__file__).resolve().parent.parent / "data" / "kubernetes"


def load_items(name: str) -> list[dict[str, Any]]:
    """The items of a recorded list in tests/data/kubernetes/."""
    return list(json.loads((DATA / name).read_text())["items"])


def _gone(version: int) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {version}", "reason": "Expired",
            "code": 410}


@dataclass
class KubeApi:
    url: str = ""
    version: int = 1000
    compacted: int = 0
    # resource -> uid -> object; an event log per resource: (version, type, object).
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    log: dict[str, list[tuple[int, str, dict[str, Any]]]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    token: str | None = None
    watch_hold_s: float = 0.2  # how long an idle watch waits for events between polls
    cond: threading.Condition = field(default_factory=threading.Condition)
    bookmarks: bool = True
    watch_epoch: int = 0  # bumped by end_watches(): open watches end, as at their timeout

    def put(self, resource: str, items: list[dict[str, Any]]) -> None:
        with self.cond:
            for obj in items:
                self.version += 1
                obj = copy.deepcopy(obj)
                obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
                self.objects.setdefault(resource, {})[obj["metadata"]["uid"]] = obj

    def add(self, kind: str, obj: dict[str, Any], resource: str = "pods") -> int:
        """Record an event (ADDED/MODIFIED/DELETED); returns its resourceVersion."""
        with self.cond:
            self.version += 1
            obj = copy.deepcopy(obj)
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
            uid = obj["metadata"]["uid"]
            if kind == "DELETED":
                self.objects.get(resource, {}).pop(uid, None)
            else:
                self.objects.setdefault(resource, {})[uid] = obj
            self.log.setdefault(resource, []).append((self.version, kind, obj))
            self.cond.notify_all()
            return self.version

    def compact(self) -> None:
        """Versions up to now are gone: a watch (re)started from one of them gets 410; a watch
        that is open goes on, as with etcd compaction."""
        with self.cond:
            self.version += 1
            self.compacted = self.version
            self.cond.notify_all()

    def end_watches(self) -> None:
        """End every open watch (what the API server does at a watch's timeout)."""
        with self.cond:
            self.watch_epoch += 1
            self.cond.notify_all()

    def watch_requests(self, resource: str = "pods") -> list[dict[str, str]]:
        return [q for p, q in self.requests if p.endswith(resource) and q.get("watch")]

    def list_requests(self, resource: str = "pods") -> list[dict[str, str]]:
        return [q for p, q in self.requests if p.endswith(resource) and not q.get("watch")]


def _selected(obj: dict[str, Any], field_selector: str) -> bool:
    for term in filter(None, field_selector.split(",")):
        key, _, value = term.partition("=")
        if key == "spec.nodeName" and obj.get("spec", {}).get("nodeName") != value:
            return False
    return True


def _handler(api: KubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send_json(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            with api.cond:
                api.requests.append((url.path, query))
            if api.token is not None and \
                    self.headers.get("Authorization") != f"Bearer {api.token}":
                self._send_json(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                return
            resource = url.path.rsplit("/", 1)[-1]
            if url.path not in ("/api/v1/pods", "/api/v1/services"):
                self._send_json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                return
            selector = query.get("fieldSelector", "")
            if query.get("watch"):
                self._watch(resource, query, selector)
            else:
                self._list(resource, query, selector)

        def _list(self, resource: str, query: dict[str, str], selector: str) -> None:
            with api.cond:
                items = [copy.deepcopy(o) for o in api.objects.get(resource, {}).values()
                         if _selected(o, selector)]
                version = api.version
            items.sort(key=lambda o: (o["metadata"].get("namespace", ""),
                                      o["metadata"]["name"]))
            start = int(query.get("continue") or 0)
            limit = int(query.get("limit") or 0) or len(items) or 1
            page = items[start:start + limit]
            meta: dict[str, Any] = {"resourceVersion": str(version)}
            if start + limit < len(items):
                meta["continue"] = str(start + limit)
            kind = "PodList" if resource == "pods" else "ServiceList"
            self._send_json(200, {"kind": kind, "apiVersion": "v1", "metadata": meta,
                                  "items": page})

        def _watch(self, resource: str, query: dict[str, str], selector: str) -> None:
            since = int(query.get("resourceVersion") or 0)
            if since and since < api.compacted:
                # What kube-apiserver does for a compacted version: an HTTP 200 watch whose
                # first event is an ERROR with a 410 Status (client-go relists on it).
                self._start_stream()
                self._event({"type": "ERROR", "object": _gone(since)})
                self._end_stream()
                return
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
            epoch = api.watch_epoch
            self._start_stream()
            try:
                while time.monotonic() < deadline and api.watch_epoch == epoch:
                    with api.cond:
                        pending = [e for e in api.log.get(resource, []) if e[0] > since]
                        if not pending:
                            api.cond.wait(api.watch_hold_s)
                            pending = [e for e in api.log.get(resource, []) if e[0] > since]
                    for version, kind, obj in pending:
                        since = version
                        if _selected(obj, selector):
                            self._event({"type": kind, "object": obj})
                    if not pending and api.bookmarks and query.get("allowWatchBookmarks"):
                        with api.cond:
                            latest = api.version
                        if latest > since:
                            since = latest
                            kind_name = "Pod" if resource == "pods" else "Service"
                            self._event({"type": "BOOKMARK", "object": {
                                "kind": kind_name, "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(latest)}}})
                self._end_stream()
            except OSError:
                return  # the agent went away

        def _start_stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _event(self, event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _end_stream(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextlib.contextmanager
def kube_api(pods: list[dict[str, Any]] | None = None,
             services: list[dict[str, Any]] | None = None,
             host: str = "127.0.0.1",
             tls: tuple[Path, Path] | None = None) -> Iterator[KubeApi]:
    """The replaying server; with `tls` (certificate, key) it serves HTTPS, as the API does."""
    api = KubeApi()
    api.put("pods", pods or [])
    api.put("services", services or [])
    server = ThreadingHTTPServer((host, 0), _handler(api))
    server.daemon_threads = True
    scheme = "http"
    if tls is not None:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    api.url = f"{scheme}://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def pod(name: str, namespace: str, uid: str, node: str, ip: str, *,
        owner: tuple[str, str] | None = None, labels: dict[str, str] | None = None,
        containers: dict[str, str] | None = None) -> dict[str, Any]:
    """A v1 Pod object in the API's shape (what `kubectl get pod -o json` shows, trimmed of
    fields the agent does not read). `containers`: name -> container id."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid,
                            "labels": dict(labels or {}),
                            "creationTimestamp": "2026-12-01T10:00:00Z"}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0],
                                    "name": owner[1], "uid": f"owner-{owner[1]}",
                                    "controller": True, "blockOwnerDeletion": True}]
    statuses = [{"name": cname, "containerID": f"containerd://{cid}", "ready": True,
                 "restartCount": 0, "image": "registry.example/app:1",
                 "state": {"running": {"startedAt": "2026-12-01T10:00:05Z"}}}
                for cname, cid in (containers or {}).items()]
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
            "spec": {"nodeName": node, "containers": [
                {"name": c, "image": "registry.example/app:1"} for c in (containers or {})]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "hostIP": "192.0.2.1", "containerStatuses": statuses}}


def main() -> None:
    """`python tests/support/kube_api.py HOST PORT PODS.json [SERVICES.json]`: serve until
    killed (for agents in other network namespaces than the test's)."""
    import sys

    host, port, pods_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pods = json.loads(Path(pods_file).read_text())["items"]
    services = (json.loads(Path(sys.argv[4]).read_text())["items"] if len(sys.argv) > 4
                else [])
    api = KubeApi()
    api.put("pods", pods)
    api.put("services", services)
    server = ThreadingHTTPServer((host, port), _handler(api))
    server.daemon_threads = True
    print(f"listening on {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
