from bench.report import Row
def run(quick: bool) -> list[Row]:
    return []
