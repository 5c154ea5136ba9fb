"""Service keys: unique per Kubernetes identity, expanded into labels at export, attributes on
spans; peers named by address; the Prometheus text of expanded families."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from probewire.enrich.identity import (
    LabelExpander,
    ServiceIdentity,
    display_name,
    parse_service_key,
    resource_attributes,
    service_key,
    service_labels,
)
from probewire.export.prometheus import render_text

SHOP = service_key("cart", "shop", "deployment", "cart")
STAGING = service_key("cart", "staging", "deployment", "cart")

_names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                 max_size=30)


@given(_names, _names, st.sampled_from(["deployment", "statefulset", "job", ""]), _names,
       st.sampled_from(["", "cart-1"]))
def test_keys_round_trip(name: str, ns: str, kind: str, workload: str, pod: str) -> None:
    key = service_key(name, ns, kind, workload, pod)
    assert parse_service_key(key) == ServiceIdentity(name, ns, kind, workload, pod)


def test_a_plain_host_keeps_plain_names() -> None:
    assert service_key("nginx") == "nginx"
    assert service_labels("nginx") == {"service_name": "nginx"}
    assert display_name("nginx") == "nginx"


def test_same_app_in_two_namespaces_gives_two_keys_and_label_sets() -> None:
    assert SHOP != STAGING
    assert service_labels(SHOP) == {"service_name": "cart", "k8s_namespace_name": "shop",
                                    "k8s_deployment_name": "cart"}
    assert service_labels(STAGING)["k8s_namespace_name"] == "staging"
    assert display_name(SHOP) == "cart (shop)"


def test_workload_label_by_kind() -> None:
    for kind, label in (("statefulset", "k8s_statefulset_name"),
                        ("daemonset", "k8s_daemonset_name"), ("job", "k8s_job_name"),
                        ("cronjob", "k8s_cronjob_name")):
        assert service_labels(service_key("x", "ns", kind, "w"))[label] == "w"


def test_resource_attributes_follow_the_semantic_conventions() -> None:
    key = service_key("cart", "shop", "deployment", "cart", "cart-7d9f8b6c5d-x2x9k")
    assert resource_attributes(key) == {
        "service.name": "cart", "service.namespace": "shop", "k8s.namespace.name": "shop",
        "k8s.deployment.name": "cart", "k8s.pod.name": "cart-7d9f8b6c5d-x2x9k"}


def test_expansion_keeps_namespaces_apart_in_prometheus_text() -> None:
    c = CounterMetricFamily("probewire_process_execs", "x", labels=["service_name"])
    c.add_metric([SHOP], 3)
    c.add_metric([STAGING], 5)
    c.add_metric(["nginx"], 7)
    text = b"".join(render_text(LabelExpander().families([c]))).decode()
    assert ('probewire_process_execs_total{k8s_deployment_name="cart",'
            'k8s_namespace_name="shop",service_name="cart"} 3.0') in text
    assert ('probewire_process_execs_total{k8s_deployment_name="cart",'
            'k8s_namespace_name="staging",service_name="cart"} 5.0') in text
    assert 'probewire_process_execs_total{service_name="nginx"} 7.0' in text


def test_service_graph_peers_are_named_and_merged() -> None:
    peers = {"10.244.2.21": service_key("checkout", "shop", "deployment", "checkout"),
             "10.244.2.22": service_key("checkout", "shop", "deployment", "checkout")}
    total = CounterMetricFamily("traces_service_graph_request", "x", labels=["client", "server"])
    total.add_metric([SHOP, "10.244.2.21:8080"], 4)
    total.add_metric([SHOP, "10.244.2.22:8080"], 6)
    total.add_metric([SHOP, "203.0.113.9:443"], 1)  # not a pod: stays an address
    total.add_metric(["10.244.2.21", SHOP], 2)  # a remote client, named by address
    seconds = HistogramMetricFamily("traces_service_graph_request_client_seconds", "x",
                                    labels=["client", "server"])
    seconds.add_metric([SHOP, "10.244.2.21:8080"], [("0.1", 1), ("+Inf", 2)], 0.5)
    seconds.add_metric([SHOP, "10.244.2.22:8080"], [("0.1", 3), ("+Inf", 3)], 0.25)
    out = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in LabelExpander(peers.get).families([total, seconds]) for s in fam.samples}
    edge = (("client", "cart"), ("client_k8s_deployment_name", "cart"),
            ("client_k8s_namespace_name", "shop"), ("server", "checkout"),
            ("server_k8s_deployment_name", "checkout"), ("server_k8s_namespace_name", "shop"))
    assert out[("traces_service_graph_request_total", edge)] == 10
    assert out[("traces_service_graph_request_client_seconds_count", edge)] == 5
    assert out[("traces_service_graph_request_client_seconds_sum", edge)] == 0.75
    assert out[("traces_service_graph_request_client_seconds_bucket",
                (*edge[:3], ("le", "0.1"), *edge[3:]))] == 4
    external = (("client", "cart"), ("client_k8s_deployment_name", "cart"),
                ("client_k8s_namespace_name", "shop"), ("server", "203.0.113.9:443"))
    assert out[("traces_service_graph_request_total", external)] == 1
    remote_client = (("client", "checkout"), ("client_k8s_deployment_name", "checkout"),
                     ("client_k8s_namespace_name", "shop"), ("server", "cart"),
                     ("server_k8s_deployment_name", "cart"),
                     ("server_k8s_namespace_name", "shop"))
    assert out[("traces_service_graph_request_total", remote_client)] == 2


def test_families_without_keys_pass_through_untouched() -> None:
    c = CounterMetricFamily("probewire_events", "x", labels=["probe"])
    c.add_metric(["tcp"], 1)
    (same,) = LabelExpander().families([c])
    assert same is c


def test_the_ui_snapshot_keeps_namespaces_apart() -> None:
    from prometheus_client.registry import CollectorRegistry

    from probewire.serve.snapshot import take

    h = HistogramMetricFamily("http_server_request_duration_seconds", "x",
                              labels=["service_name", "http_request_method",
                                      "http_response_status_code", "http_route"])
    h.add_metric([SHOP, "GET", "200", "/"], [("0.1", 3), ("+Inf", 3)], 0.1)
    h.add_metric([STAGING, "GET", "200", "/"], [("0.1", 5), ("+Inf", 5)], 0.2)

    class Families:
        def collect(self) -> list[HistogramMetricFamily]:
            return list(LabelExpander().families([h]))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())  # type: ignore[arg-type]
    snap = take(registry)
    assert {k[0]: v.count for k, v in snap.server.items()} == {"cart (shop)": 3,
                                                               "cart (staging)": 5}
