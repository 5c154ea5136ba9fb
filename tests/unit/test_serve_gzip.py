"""/metrics compression: which Accept-Encoding headers get gzip, and that the chunks inflate to
the page."""

from __future__ import annotations

import gzip

import pytest

from probewire.serve.http import accepts_gzip, gzip_chunks


@pytest.mark.parametrize(
    ("header", "gzip_ok"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("deflate, GZIP;q=0.5", True),
        ("gzip;q=1.0,identity;q=0.5,*;q=0", True),  # Prometheus' own header
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("gzip;q=nonsense", False),
        ("deflate", False),
        ("", False),
        ("x-gzip", False),
    ],
)
def test_gzip_only_when_the_client_accepts_it(header: str, gzip_ok: bool) -> None:
    assert accepts_gzip(header) is gzip_ok


def test_gzip_chunks_inflate_to_the_joined_page() -> None:
    chunks = [f"metric_{i} {i}.0\n".encode() * 50 for i in range(200)]
    out = gzip_chunks(iter(chunks))
    assert gzip.decompress(b"".join(out)) == b"".join(chunks)
    assert sum(map(len, out)) < sum(map(len, chunks)) / 10
    assert gzip.decompress(b"".join(gzip_chunks(iter([])))) == b""
