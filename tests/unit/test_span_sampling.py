"""Sampling probability on spans the OpenTelemetry way (tracestate ot=th), parent-based or not,
and the k8s.* resource attributes of a span's process."""

from __future__ import annotations

import math
import random

import numpy as np

from probewire.enrich.identity import service_key
from probewire.export.spans import (
    RANDOMNESS_BITS,
    SpanAssembler,
    sampling_threshold,
    threshold_text,
)
from probewire.l7.constants import Proto, Role
from probewire.l7.exchanges import EXCHANGE, ExchangeBatch
from probewire.l7.records import HTTP_EXCHANGE

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def servers(n: int, head: bytes = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n",
            service: str = "svc") -> ExchangeBatch:
    """HTTP/1.x server exchange rows, each pointing at its kernel record (whose head spans
    read), as the l7 family hands them to sinks."""
    http = np.zeros(n, dtype=HTTP_EXCHANGE)
    http["req_head"][:, : len(head)] = np.frombuffer(head, np.uint8)
    http["req_head_len"] = len(head)
    rows = np.zeros(n, dtype=EXCHANGE)
    rows["proto"] = Proto.HTTP
    rows["role"] = Role.SERVER
    rows["tgid"] = rows["tid"] = 10
    rows["status"] = 200
    rows["start_ns"], rows["end_ns"] = 1, 2
    return ExchangeBatch(rows, [service] * n, ["GET"] * n, ["/x"] * n, ["200"] * n,
                         ["10.0.0.2"] * n, ["10.0.0.1"] * n, http=http,
                         http_index=np.arange(n), attributes=[{} for _ in range(n)])


def test_threshold_matches_the_specs_examples() -> None:
    # OpenTelemetry's tracestate probability sampling: th for 1/2, 1/4, 1/10, 1/3.
    assert threshold_text(sampling_threshold(0.5)) == "8"
    assert threshold_text(sampling_threshold(0.25)) == "c"
    assert threshold_text(sampling_threshold(0.1)) == "e6666666666666"
    assert threshold_text(sampling_threshold(1 / 3)) == "aaaaaaaaaaaaab"
    assert sampling_threshold(1.0) == 0


def test_one_in_ten_keeps_a_binomial_share_and_stamps_the_probability() -> None:
    n, p = 4000, 0.1
    a = SpanAssembler(p, link_wait_ns=0, rng=random.Random(7))
    spans = a.add(servers(n))
    # Five standard deviations either side: fails by chance about once in 1.7 million runs.
    sd = math.sqrt(n * p * (1 - p))
    assert n * p - 5 * sd <= len(spans) <= n * p + 5 * sd
    assert len(spans) + a.unsampled == n
    for span in spans:
        assert span.context.trace_state.get("ot") == "th:e6666666666666"
        randomness = span.context.trace_id & ((1 << RANDOMNESS_BITS) - 1)
        assert randomness >= sampling_threshold(p)  # consistent with the trace id


def test_a_sampled_parent_decides_and_its_probability_is_kept() -> None:
    head = (f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n"
            "tracestate: ot=th:c;rv:abcdef01234567,vendor=x\r\n\r\n").encode()
    a = SpanAssembler(0.0, link_wait_ns=0, rng=random.Random(1))
    (span,) = a.add(servers(1, head))
    assert span.context.trace_state.get("ot") == "th:c"
    unsampled_parent = f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-00\r\n\r\n"
    assert SpanAssembler(1.0, link_wait_ns=0).add(servers(1, unsampled_parent.encode())) == []


def test_not_parent_based_decides_by_the_trace_id_alone() -> None:
    head = f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-00\r\n\r\n".encode()
    a = SpanAssembler(1.0, link_wait_ns=0, honor_traceparent=False)
    (span,) = a.add(servers(1, head))
    assert f"{span.context.trace_id:032x}" == TRACE
    b = SpanAssembler(0.0, link_wait_ns=0, honor_traceparent=False)
    sampled = f"GET /x HTTP/1.1\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n\r\n".encode()
    assert b.add(servers(1, sampled)) == []


def test_span_resource_carries_kubernetes_attributes() -> None:
    key = service_key("cart", "shop", "deployment", "cart")
    a = SpanAssembler(1.0, link_wait_ns=0, resource_attributes={"service.name": "agent",
                                                                "env": "prod"},
                      process_attributes=lambda tgid, k: {"k8s.pod.name": "cart-1-x2x9k"})
    (span,) = a.add(servers(1, service=key))
    attrs = dict(span.resource.attributes)
    assert attrs["service.name"] == "cart"  # the agent's own name does not leak onto spans
    assert attrs["k8s.namespace.name"] == "shop" and attrs["service.namespace"] == "shop"
    assert attrs["k8s.deployment.name"] == "cart" and attrs["k8s.pod.name"] == "cart-1-x2x9k"
    assert attrs["env"] == "prod"


def test_the_kernels_decision_keeps_its_traces_with_ids_that_agree() -> None:
    """With the kernel deciding (HttpFlag.SAMPLED on its records), exactly the records it kept
    become spans, and each new trace id's randomness is on the kept side of the threshold, as
    a collector reading th will check."""
    from probewire.l7.constants import HttpFlag

    p = 0.1
    a = SpanAssembler(p, link_wait_ns=0, rng=random.Random(3))
    a.kernel_sampling = True
    batch = servers(200)
    assert batch.http is not None
    batch.http["hflags"][::4] = HttpFlag.SAMPLED  # 50 kept by the kernel
    spans = a.add(batch)
    assert len(spans) == 50 and a.unsampled == 150
    for span in spans:
        assert span.context.trace_id & ((1 << RANDOMNESS_BITS) - 1) >= sampling_threshold(p)
        assert span.context.trace_state.get("ot") == "th:e6666666666666"
