"""Reads commands on stdin: `call <amount> <currency>` calls process_payment (and the noise
around it), `sync` prints ok once every call before it returned."""

import sys

from payments.core import Ledger, process_payment, refund


def main() -> None:
    ledger = Ledger()
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "call":
            amount, currency = int(parts[1]), int(parts[2])
            process_payment(amount, currency)
            ledger.refund(amount)
        elif parts == ["refund"]:
            refund(1)
        elif parts == ["sync"]:
            print("ok", flush=True)


main()
