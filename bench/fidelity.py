"""Fidelity: every request nginx served is either recorded by probewire or counted as dropped.

Ground truth is nginx's access log (one line per request it answered); wrk's own count misses
the requests in flight when it stops, so it is stated beside it, not used to judge.
"""

from __future__ import annotations

from bench.harness import pinned_nginx, run_wrk, running_agent, total, wait_stable
from bench.report import Row


def run(quick: bool) -> list[Row]:
    repeats, duration_s = (1, 10) if quick else (2, 60)
    rate = Row("fidelity: request rate achieved", "req/s", target="≥ 20,000 req/s (test load)",
               goal=(">=", 20_000.0), note=f"wrk -t1 -c32 -d{duration_s}s, nginx with access log")
    vs_log = Row("fidelity: (recorded + dropped) / nginx access-log lines", "ratio",
                 target="== 1 (recorded + dropped == sent)", goal=("==", 1.0), judge="all")
    recorded_share = Row("fidelity: recorded / access-log lines", "ratio")
    vs_wrk = Row("fidelity: (recorded + dropped) / wrk completed requests", "ratio",
                 note="wrk does not count requests in flight when it stops")
    log_vs_wrk = Row("fidelity: access-log lines - wrk completed", "requests")
    in_flight = Row("fidelity: wrk's exchanges counted (answered + aborted) - wrk completed",
                    "requests", target="0 ≤ x ≤ 32 (at most one request in flight per "
                    "connection when wrk stops)", goal=("between", 0.0), goal_hi=32.0,
                    judge="all",
                    note="client side: wrk's answered exchanges plus its aborted ones "
                         "(probewire_http_aborted_total): a request wrk sent but never read the "
                         "answer to is counted as aborted when wrk exits; < 0 would mean "
                         "exchanges missed")
    notes = []
    for _ in range(repeats):
        with running_agent("default") as agent, pinned_nginx(access_log=True) as ng:
            def counts() -> tuple[float, float]:
                s = agent.scrape()
                return (total(s, "http_server_request_duration_seconds_count",
                              service_name="nginx"),
                        total(s, "probewire_events_dropped_total", probe="l7"))

            def records() -> tuple[float, float]:
                """(wrk's exchanges: answered + aborted, of those answered)"""
                s = agent.scrape()
                answered = total(s, "http_client_request_duration_seconds_count",
                                 service_name="wrk")
                return (answered + total(s, "probewire_http_aborted_total",
                                         service_name="wrk", direction="client"), answered)
            rec0, drop0 = counts()
            ev0, cli0 = records()
            w = run_wrk(f"{ng.url}/static/index.html", duration_s)
            log_lines = wait_stable(lambda: float(ng.access_log_lines()))
            rec, drop = counts()
            rec_drop = wait_stable(lambda: sum(counts()))
            rec, drop = counts()
            if rec + drop != rec_drop:  # still moving: take the later reading as is
                rec_drop = rec + drop
            rec, drop = rec - rec0, drop - drop0
            ev, cli = records()
            ev, cli = ev - ev0, cli - cli0
            in_flight.add(ev - w.requests)
            rate.add(w.requests / w.duration_s)
            vs_log.add((rec + drop) / log_lines if log_lines else float("nan"))
            recorded_share.add(rec / log_lines if log_lines else float("nan"))
            vs_wrk.add((rec + drop) / w.requests if w.requests else float("nan"))
            log_vs_wrk.add(log_lines - w.requests)
            notes.append(f"log {log_lines:.0f}, wrk {w.requests}, recorded {rec:.0f}, "
                         f"dropped {drop:.0f}, wrk exchanges {ev:.0f} of which answered "
                         f"{cli:.0f}")
    vs_log.note = "; ".join(notes) + " (dropped counts every http record, any role)"
    return [rate, vs_log, in_flight, recorded_share, vs_wrk, log_vs_wrk]
