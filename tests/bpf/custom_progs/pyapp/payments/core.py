"""Functions tests/bpf/test_custom.py counts through CPython's USDT probes."""


def process_payment(amount: int, currency: int) -> bool:
    return amount % 7 != 0


def refund(amount: int) -> int:
    # Same co_name as Ledger.refund, another qualname: only the module tells them apart.
    return -amount


class Ledger:
    def refund(self, amount: int) -> int:
        return amount
