"""Secrets out of argv, before anything shows it (events API, UI, logs, alerts, OTLP).

What is replaced by ``***`` (docs/security.md keeps this list for users):

- the value after a secret-bearing flag, given as the next argument (``--password s3cret``)
  or attached with ``=`` (``--token=abc``): -p, --password, --passwd, --pass, --token,
  --secret, --api-key, --apikey, --access-token, --auth-token, --client-secret, --secret-key,
  --access-key, plus ``security.redact.flags``;
- an ``Authorization:`` or ``Proxy-Authorization:`` header value (``curl -H``), to the end of
  that argument;
- ``key=value`` pairs whose key names a secret (password, passwd, pwd, pass, token, secret,
  api_key/apikey/api-key, access_token, auth_token, client_secret, secret_access_key,
  private_key), anywhere in an argument (query strings, connection strings);
- the password of a URL's user info (``scheme://user:pass@host``);
- AWS access key ids (AKIA/ASIA/ABIA/ACCA + 16) and 40-character secret access keys (base64
  alphabet with upper and lower case and a digit, / or +; git's 40-hex ids are left alone);
- whatever ``security.redact.patterns`` match (only their group named ``value`` if they have
  one).

Hand-written: the patterns are the field's usual ones (Falco's and Tetragon's redaction filters
are regexes the user writes); no maintained library redacts command lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from probewire.security.defaults import REDACT_FLAGS

__all__ = ["MASK", "Redactor"]

MASK = "***"

_SECRET_KEYS = (r"password|passwd|pwd|pass|token|secret|api[_-]?key|apikey|access[_-]?token|"
                r"auth[_-]?token|client[_-]?secret|secret[_-]?access[_-]?key|private[_-]?key")
# (pattern, words one of which the lowercased text must contain for the pattern to be tried):
# Python's re is slow on case-insensitive alternations, and most command lines hold no secret,
# so a few substring tests keep the common case near a microsecond.
_BUILTIN: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Header values contain spaces ("Bearer x"): everything to the end of the argument.
    (r"(?i)\b(?:proxy-)?authorization\s*:\s*(?P<value>\S.*)", ("authorization",)),
    (rf"(?i)(?<![A-Za-z0-9])(?:{_SECRET_KEYS})\s*[=:]\s*(?P<value>[^&\s;,]+)",
     ("pass", "pwd", "token", "secret", "key")),
    (r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:(?P<value>[^@/\s]+)@", ("://",)),
    (r"\b(?P<value>(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16})\b", ("akia", "asia", "abia", "acca")),
    (r"(?<![A-Za-z0-9/+])(?P<value>(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
     r"(?=[A-Za-z0-9/+]{0,39}[0-9/+])[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", ()),
)
_LONG_RUN = re.compile(r"[A-Za-z0-9/+]{40}")


class Redactor:
    """Replaces secrets in argv; thread-safe. Cheap when nothing matches: substring tests on
    the joined arguments pick the few patterns worth running."""

    def __init__(self, flags: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self.flags = frozenset((*REDACT_FLAGS, *flags))
        self._builtin = [(re.compile(p), words) for p, words in _BUILTIN]
        self._extra = [re.compile(p) for p in patterns]
        long_flags = sorted((f for f in self.flags if f.startswith("--")), key=len, reverse=True)
        attached = "|".join(re.escape(f) for f in long_flags)
        self._attached = re.compile(rf"^(?:{attached})=") if long_flags else None

    def _active(self, text: str) -> list[re.Pattern[str]]:
        lower = text.lower()
        out = [p for p, words in self._builtin
               if (any(w in lower for w in words) if words else _LONG_RUN.search(text))]
        return out + self._extra

    def __call__(self, argv: Sequence[str]) -> tuple[str, ...]:
        args = tuple(argv)
        if not args:
            return args
        joined = " ".join(args)
        active = self._active(joined)
        flagged = bool(self.flags.intersection(args))
        attached = self._attached is not None and "=" in joined and "--" in joined
        if not active and not flagged and not attached:
            return args
        out = list(args)
        for i, arg in enumerate(args):
            if i and args[i - 1] in self.flags:
                out[i] = MASK
                continue
            if attached and self._attached is not None:
                m = self._attached.match(arg)
                if m:
                    out[i] = arg[: m.end()] + MASK
                    continue
            for pattern in active:
                arg = pattern.sub(_mask, arg)
            out[i] = arg
        return tuple(out)

    def redact_text(self, text: str) -> str:
        """Secrets out of one string (an argument, a log line)."""
        for pattern in self._active(text):
            text = pattern.sub(_mask, text)
        return text


def _mask(m: re.Match[str]) -> str:
    if "value" not in m.re.groupindex or m.group("value") is None:
        return MASK
    start, end = m.span("value")
    whole = m.group(0)
    offset = m.start(0)
    return whole[: start - offset] + MASK + whole[end - offset:]
