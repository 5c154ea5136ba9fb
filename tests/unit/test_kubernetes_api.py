"""The Kubernetes API path against a local server replaying API JSON: list (paged), watch from
the list's resourceVersion, BOOKMARKs, 410 Gone -> relist, node-limited pods, peers by IP.

No kube-apiserver runs on our machines; tests/support/kube_api.py serves the same wire format.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from probewire.enrich.kubernetes import ApiClient, ApiError, KubeStore, Reflector
from support.kube_api import kube_api, load_items
from support.servers import self_signed_cert

NODE = "node-a"


def _until(fn: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.02)
    return fn()


def test_list_pages_then_watch_from_the_lists_version() -> None:
    with kube_api(pods=load_items("pods.json")) as api:
        seen: list[tuple[str, int]] = []
        r = Reflector(ApiClient(api.url), "/api/v1/pods",
                      {"fieldSelector": f"spec.nodeName={NODE}"},
                      lambda kind, objs: seen.append((kind, len(objs))), "t", page_size=2,
                      watch_timeout_s=5)
        r.start()
        try:
            assert r.synced.wait(10)
            # Five node-a pods in pages of two: three list requests, one SYNC of all five.
            lists = api.list_requests()
            assert [q.get("continue", "") for q in lists] == ["", "2", "4"]
            assert all(q["fieldSelector"] == f"spec.nodeName={NODE}" for q in lists)
            assert seen == [("SYNC", 5)]
            listed_version = r.resource_version
            assert _until(lambda: len(api.watch_requests()) >= 1)
            assert api.watch_requests()[0]["resourceVersion"] == listed_version
            pod = copy.deepcopy(load_items("pods.json")[0])
            pod["metadata"]["labels"]["app.kubernetes.io/name"] = "basket"
            version = api.add("MODIFIED", pod)
            assert _until(lambda: ("MODIFIED", 1) in seen)
            assert _until(lambda: r.resource_version == str(version))
            other = load_items("pods.json")[-1]  # on node-b: filtered out by the selector
            api.add("MODIFIED", other)
            api.add("DELETED", pod)
            assert _until(lambda: ("DELETED", 1) in seen)
            assert seen.count(("MODIFIED", 1)) == 1
        finally:
            r.stop()


def test_410_gone_lists_again_and_resumes() -> None:
    with kube_api(pods=load_items("pods.json")) as api:
        client = ApiClient(api.url)
        store = KubeStore(client, NODE, cluster=False)
        assert store.start(wait_s=10)
        try:
            assert _until(lambda: len(api.watch_requests()) >= 1)
            assert store.pod(container_id="a" * 64).labels["app.kubernetes.io/name"] == "cart"  # type: ignore[union-attr]
            # The pod changes without an event the watch could see, the version the agent
            # watches from is compacted away, and its watch ends (as at its timeout): the
            # re-watch gets 410 Gone, and only a relist can show the change.
            api.bookmarks = False
            pod = copy.deepcopy(load_items("pods.json")[0])
            pod["metadata"]["labels"]["app.kubernetes.io/name"] = "basket"
            api.put("pods", [pod])
            api.compact()
            api.end_watches()
            assert _until(lambda: len(api.list_requests()) >= 2)
            assert _until(lambda: (store.pod(container_id="a" * 64) or None) is not None and
                          store.pod(container_id="a" * 64).labels.get(  # type: ignore[union-attr]
                              "app.kubernetes.io/name") == "basket")
            relisted = store.reflectors[0]
            assert relisted.lists == 2
            # ...and the next watch starts from the new list's version, not the gone one.
            assert _until(lambda: api.watch_requests()[-1]["resourceVersion"]
                          == relisted.resource_version)
        finally:
            store.stop()


def test_cluster_pods_and_services_name_peer_addresses() -> None:
    with kube_api(pods=load_items("pods.json"), services=load_items("services.json")) as api:
        store = KubeStore(ApiClient(api.url), NODE, cluster=True)
        assert store.start(wait_s=10)  # this node's pods; the cluster's arrive after
        try:
            assert all(r.synced.wait(10) for r in store.reflectors)
            assert store.pod_by_ip("10.244.2.21").name == "checkout-5c8f9d7b6f-m2n4p"  # type: ignore[union-attr]
            assert store.service_by_ip("10.96.12.34") == ("shop", "checkout")
            assert store.service_by_ip("None") is None  # headless services have no IP
            assert {p.name for p in store.pods()} >= {"cart-7d9f8b6c5d-x2x9k", "db-0"}
            assert "checkout-5c8f9d7b6f-m2n4p" not in {p.name for p in store.pods()}
        finally:
            store.stop()


def test_bearer_token_is_sent_and_a_refusal_is_reported(tmp_path: pytest.TempPathFactory,
                                                        ) -> None:
    with kube_api(pods=load_items("pods.json")) as api:
        api.token = "s3cret"
        token = tmp_path / "token"  # type: ignore[operator]
        token.write_text("s3cret\n")
        listing = ApiClient(api.url, str(token)).get("/api/v1/pods", {})
        assert len(listing["items"]) == 6
        with pytest.raises(ApiError) as refused:
            ApiClient(api.url).get("/api/v1/pods", {})
        assert refused.value.status == 401


def test_unreachable_api_is_an_error_with_the_url() -> None:
    with pytest.raises(ApiError, match=r"127\.0\.0\.1:1"):
        ApiClient("http://127.0.0.1:1", timeout_s=1).get("/api/v1/pods", {})


def test_in_cluster_client_uses_the_service_host_token_and_ca(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    token = tmp_path / "token"
    token.write_text("projected-token")
    with kube_api(pods=load_items("pods.json"), tls=(cert, key)) as api:
        api.token = "projected-token"
        port = api.url.rsplit(":", 1)[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        client = ApiClient.in_cluster(None, str(token), str(cert), env)
        assert client is not None and client.url == api.url
        assert len(client.get("/api/v1/pods", {})["items"]) == 6
        # A CA that did not sign the server's certificate: refused, with the URL.
        (tmp_path / "other").mkdir()
        other, _ = self_signed_cert(tmp_path / "other")
        untrusting = ApiClient.in_cluster(None, str(token), str(other), env)
        assert untrusting is not None
        with pytest.raises(ApiError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.get("/api/v1/pods", {})
    assert ApiClient.in_cluster(None, str(token), str(cert), {}) is None  # not in a pod
