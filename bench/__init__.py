"""probewire benchmarks: `python -m bench [--quick] [--only NAME]`.

Each benchmark measures real processes on 127.0.0.1 (nginx, wrk, the `probewire run` agent) and
returns rows of figures; __main__ prints them as one markdown table next to DESIGN.md §5's targets
and writes it to bench/results/latest.md. Nothing here is tuned to pass: a missed target says
MISSED.
"""
