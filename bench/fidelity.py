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
    all_records = Row("fidelity: (http exchanges + dropped) / (2 x access-log lines)", "ratio",
                      target="== 1 (every drop counted)", goal=("==", 1.0), judge="all",
                      note="every exchange, both sides, counted in kernel maps or sent as a "
                           "record (probewire_http_exchanges_total): each request is one nginx "
                           "server exchange and one wrk client exchange")
    excess = Row("fidelity: (http exchanges + dropped) - 2 x access-log lines", "exchanges",
                 target="== 0", goal=("==", 0.0), judge="all",
                 note="the same check in exchanges: > 0 means traffic other than this "
                      "nginx/wrk pair (a concurrent test) or double counting; < 0 exchanges "
                      "missed")
    notes = []
    for _ in range(repeats):
        with running_agent("default") as agent, pinned_nginx(access_log=True) as ng:
            def counts() -> tuple[float, float]:
                s = agent.scrape()
                return (total(s, "http_server_request_duration_seconds_count",
                              service_name="nginx"),
                        total(s, "probewire_events_dropped_total", probe="http"))

            def records() -> tuple[float, float]:
                s = agent.scrape()
                return (total(s, "probewire_http_exchanges_total"),
                        total(s, "http_client_request_duration_seconds_count",
                              service_name="wrk"))
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
            all_records.add((ev + drop) / (2 * log_lines) if log_lines else float("nan"))
            excess.add(ev + drop - 2 * log_lines)
            rate.add(w.requests / w.duration_s)
            vs_log.add((rec + drop) / log_lines if log_lines else float("nan"))
            recorded_share.add(rec / log_lines if log_lines else float("nan"))
            vs_wrk.add((rec + drop) / w.requests if w.requests else float("nan"))
            log_vs_wrk.add(log_lines - w.requests)
            notes.append(f"log {log_lines:.0f}, wrk {w.requests}, recorded {rec:.0f}, "
                         f"dropped {drop:.0f}, http exchanges {ev:.0f}, wrk client recorded "
                         f"{cli:.0f}")
    vs_log.note = "; ".join(notes) + " (dropped counts every http record, any role)"
    return [rate, vs_log, all_records, excess, recorded_share, vs_wrk, log_vs_wrk]
