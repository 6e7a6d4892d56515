"""Store URLs without their secrets: `${VAR}` expansion, passwords removed from everything the tool writes or prints.

A study TOML may name its stores with a password in them (`postgresql://USER:PASSWORD@HOST/DB`), or better with
`${VAR}` references expanded from the environment when the config is loaded (`postgresql://postgres:${PGPASSWORD}@
spark-1/optuna`), or with none at all: psycopg is libpq, which reads PGPASSWORD, PGPASSFILE and ~/.pgpass itself.
Whatever the TOML holds, a copy of it, a pointer file, an MLflow param, tag or artifact and every printed line carry
the URL without its password (`redact`, `redact_text`), and the CLI's console replaces any password it has seen
(`remember`, plus MLFLOW_TRACKING_PASSWORD and PGPASSWORD from the environment) with `***` as a last guard.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any
from urllib.parse import quote, unquote

from mtp_abliterate.search.errors import UserError

# `${NAME}`: the only expansion (no `$NAME`, no defaults): a literal `$` elsewhere in a password stays as it is.
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# scheme://user:password@ in any text; the password ends at the last `@` before the host (RFC 3986 encodes `@`
# and `/` in it, but SQLAlchemy's parser takes the password up to the `@`: so does this one, within one token).
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"'<>]*):(?P<password>[^\s\"'<>]*)@")
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "PGPASSWORD")
MIN_SECRET = 4  # shorter strings are not replaced in printed text (they would mangle ordinary words)

_seen: set[str] = set()


class UnsetVariable(UserError, KeyError):
    """A `${VAR}` whose variable is not set in the environment; `args[0]` is its name."""

    def __str__(self) -> str:  # KeyError's own would print the bare name in quotes
        return f"${{{self.args[0]}}} is not set in the environment; export {self.args[0]} before running"


def expand(value: str) -> str:
    """`value` with every `${VAR}` replaced by the environment's value; raises UnsetVariable naming the first one
    that is not set. The expanded password is remembered (the console never prints it)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise UnsetVariable(name)
        return os.environ[name]

    out = ENV_REF.sub(one, value)
    if (pw := password(out)) is not None:
        remember(pw)
    return out


def password(url: str) -> str | None:
    """The password in `url`'s user-info (percent-decoded), or None."""
    m = URL_PASSWORD.search(url)
    return unquote(m.group("password")) if m and m.group("password") else None


def literal_password(value: str) -> bool:
    """Whether a URL as written in a TOML holds a password itself (not one `${VAR}` reference)."""
    m = URL_PASSWORD.search(value)
    return bool(m and m.group("password") and not ENV_REF.fullmatch(m.group("password")))


def redact(url: str) -> str:
    """A URL as it may be printed, logged and written: without its password (`user:pw@host` -> `user@host`; libpq
    then takes the password from PGPASSWORD or ~/.pgpass when the URL is used again)."""
    return URL_PASSWORD.sub(lambda m: m.group("head") + "@", url)


def redact_text(text: str) -> str:
    """Any text (a TOML, a log line) with every URL's password removed, except a `${VAR}` reference, which stays
    (it names the variable, not the secret), and with every remembered password replaced by `***`."""

    def one(m: re.Match[str]) -> str:
        return m.group(0) if ENV_REF.fullmatch(m.group("password")) else m.group("head") + "@"

    return scrub(URL_PASSWORD.sub(one, text))


def remember(secret: str) -> None:
    _seen.add(secret)


def secrets() -> set[str]:
    found = set(_seen) | {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    return {s for s in found if len(s) >= MIN_SECRET}


def scrub(text: str) -> str:
    """`text` with every known password (remembered, or in SECRET_ENV) replaced by `***`, percent-encoded too."""
    for s in sorted(secrets(), key=len, reverse=True):
        text = text.replace(s, "***")
        if (encoded := quote(s, safe="")) != s:
            text = text.replace(encoded, "***")
    return text


class ScrubbedStdout:
    """sys.stdout as it is when written to (a test runner swaps it), every write passed through `scrub`: the CLI's
    console prints through it."""

    def write(self, text: str) -> int:
        sys.stdout.write(scrub(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stdout, name)
