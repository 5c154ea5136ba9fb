"""Secrets never leave: argv redaction, table cases and properties (hypothesis)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probewire.config import config_from_mapping
from probewire.security.redact import MASK, Redactor

R = Redactor()


@pytest.mark.parametrize(("argv", "expected"), [
    (["mysql", "-u", "root", "-p", "hunter2", "shop"], ["mysql", "-u", "root", "-p", MASK, "shop"]),
    (["app", "--password=s3cret", "--token", "abc"], ["app", "--password=***", "--token", MASK]),
    (["curl", "-H", "Authorization: Bearer eyJhbGciOi.x.y", "https://api"],
     ["curl", "-H", "Authorization: ***", "https://api"]),
    (["curl", "-H", "proxy-authorization:Basic Zm9vOmJhcg=="], ["curl", "-H",
                                                                "proxy-authorization:***"]),
    (["psql", "postgres://bob:pw123@db:5432/x?sslmode=require&password=zzz"],
     ["psql", "postgres://bob:***@db:5432/x?sslmode=require&password=***"]),
    (["env", "DB_PASSWORD=abc", "API_KEY=k1", "Token=t", "bypass=1"],
     ["env", "DB_PASSWORD=***", "API_KEY=***", "Token=***", "bypass=1"]),
    (["aws", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
     ["aws", MASK, MASK]),
    (["git", "checkout", "0123456789abcdef0123456789abcdef01234567"],
     ["git", "checkout", "0123456789abcdef0123456789abcdef01234567"]),
    (["sh", "-c", "i=0; while [ $i -lt 10 ]; do /bin/true; done"],
     ["sh", "-c", "i=0; while [ $i -lt 10 ]; do /bin/true; done"]),
    (["xmrig", "-o", "stratum+tcp://wallet.rig:x@pool:3333"],
     ["xmrig", "-o", "stratum+tcp://wallet.rig:***@pool:3333"]),
    (["tool", "-p"], ["tool", "-p"]),  # a flag without a value
    ([], []),
])
def test_builtin_redactions(argv: list[str], expected: list[str]) -> None:
    assert list(R(argv)) == expected


def test_config_extends_flags_and_patterns() -> None:
    cfg = config_from_mapping({"security": {"redact": {
        "flags": ["--db-pass"], "patterns": [r"sk_live_\w+", r"pin=(?P<value>\d+)"]}}})
    r = Redactor(cfg.security.redact.flags, cfg.security.redact.patterns)
    assert r(["app", "--db-pass", "x1", "--db-pass=x2", "sk_live_abc123", "card pin=1234"]) == (
        "app", "--db-pass", MASK, "--db-pass=***", MASK, "card pin=***")
    assert r(["mysql", "-p", "still"]) == ("mysql", "-p", MASK)  # the built-ins stay


SECRET = st.text(alphabet=string.ascii_letters + string.digits + "!#$%*+-./@^_~",
                 min_size=4, max_size=40)
FLAG = st.sampled_from(sorted(R.flags))
WORD = st.text(alphabet=string.ascii_lowercase + "/.-", min_size=1, max_size=12)


@given(st.lists(WORD, max_size=5), FLAG, SECRET, st.lists(WORD, max_size=5))
def test_the_value_after_a_secret_flag_never_appears(before: list[str], flag: str, secret: str,
                                                     after: list[str]) -> None:
    out = R([*before, flag, secret, *after])
    assert out[len(before) + 1] == MASK
    if flag.startswith("--"):
        assert R([flag + "=" + secret])[0] == flag + "=" + MASK


@given(st.sampled_from(["password", "PASSWORD", "api_key", "token", "client_secret"]),
       st.text(alphabet=string.ascii_letters + string.digits, min_size=4, max_size=30))
def test_key_value_secrets_are_masked_inside_longer_arguments(key: str, value: str) -> None:
    out = R(["cmd", f"https://h/x?user=a&{key}={value}&next=1"])
    assert value not in out[1].split(f"{key}=", 1)[1].split("&", 1)[0]
    assert out[1].endswith("&next=1")


@settings(max_examples=300)
@given(st.lists(st.text(max_size=60), max_size=12))
def test_any_argv_keeps_its_length_and_redacting_twice_changes_nothing(argv: list[str]) -> None:
    once = R(argv)
    assert len(once) == len(argv)
    assert R(once) == once
