"""Principals: who holds which token, and what each may use.

One token means one principal, ``owner``, with full control of the server. For a small team a
token file may name several principals, one per line::

    # name   token                            options
    alice    8f1c...(at least 16 characters)  max-saved-bytes=4GiB share=2
    bob      Zt0q...

Each principal sees and clears only its own sessions and their contexts (``shared/`` names are
shared between the sessions of one principal), has its own cap on saved bytes and its own share
of the model's time (``share=2`` gets two turns for every one of a ``share=1`` principal), and
is named in the server log. This separates a team's work and keeps one member's mistake from
filling the server; it is not a sandbox: every token holder can ship code that runs as the
server's user (see the threat model in docs/protocol.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cloche.errors import UsageError

__all__ = ["MIN_TOKEN_LENGTH", "OWNER", "Principal", "check_distinct", "check_token",
           "parse_principals", "parse_size"]

#: shorter tokens are refused: the token is all that stands between a stranger and running code
#: as the server's user (backoff slows guessing; length makes it hopeless)
MIN_TOKEN_LENGTH = 16

#: the one principal of a server started with a single token
OWNER = "owner"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1000000"`` -> bytes (k/M/G/T are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"not a size: {text!r} (try 2GiB or 500MB)")
    value, unit = float(match.group(1)), match.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def check_token(token: str, whose: str = "the token") -> None:
    """Refuse empty and short tokens, saying how to make a good one."""
    if not isinstance(token, str) or not token:
        raise UsageError(f"{whose} must be a non-empty string")
    if len(token) < MIN_TOKEN_LENGTH:
        raise UsageError(
            f"{whose} is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH}"
            " characters (anyone who guesses it can run code as this user). Leave $CLOCHE_TOKEN"
            " and --token-file unset to have a random one made, or make one with:"
            " python -c 'import secrets; print(secrets.token_urlsafe(24))'")


@dataclass(frozen=True)
class Principal:
    """One token holder. ``max_saved_bytes``: cap on its sessions' saved data (None: only the
    server's cap); ``share``: its weight in the model's queue."""

    name: str
    token: str
    max_saved_bytes: int | None = None
    share: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise UsageError(f"principal names are 1-64 letters, digits, '_', '.' or '-'"
                             f" (starting with a letter or digit), not {self.name!r}")
        check_token(self.token, f"the token of principal {self.name!r}")
        if self.max_saved_bytes is not None and (
                isinstance(self.max_saved_bytes, bool) or not isinstance(self.max_saved_bytes, int)
                or self.max_saved_bytes < 0):
            raise UsageError(f"max_saved_bytes of principal {self.name!r} must be a size in"
                             f" bytes, not {self.max_saved_bytes!r}")
        if isinstance(self.share, bool) or not isinstance(self.share, int) or not (
                1 <= self.share <= 100):
            raise UsageError(f"share of principal {self.name!r} must be an int from 1 to 100,"
                             f" not {self.share!r}")

    def __repr__(self) -> str:  # never print a token
        return (f"Principal({self.name!r}, max_saved_bytes={self.max_saved_bytes},"
                f" share={self.share})")


def parse_principals(text: str, source: str = "the token file") -> list[Principal]:
    """The principals a token file names.

    A file whose only line is one word holds the single token of principal ``owner`` (the
    format every earlier version read). Otherwise each line is ``name token [option=value ...]``
    with options ``max-saved-bytes=SIZE`` and ``share=N``; ``#`` starts a comment.
    """
    lines = [(number, line.split("#", 1)[0].split())
             for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, fields) for number, fields in lines if fields]
    if not lines:
        raise UsageError(f"{source} is empty")
    if len(lines) == 1 and len(lines[0][1]) == 1:
        return [Principal(OWNER, lines[0][1][0])]
    principals: list[Principal] = []
    for number, fields in lines:
        where = f"{source}, line {number}"
        if len(fields) < 2:
            raise UsageError(f"{where}: expected 'name token [max-saved-bytes=SIZE] [share=N]'"
                             f" (a token file with several lines names each token)")
        name, token, *options = fields
        settings: dict[str, int] = {}
        for option in options:
            key, _, value = option.partition("=")
            try:
                if key == "max-saved-bytes":
                    settings["max_saved_bytes"] = parse_size(value)
                elif key == "share":
                    settings["share"] = int(value)
                else:
                    raise UsageError(f"unknown option {key!r} (known: max-saved-bytes, share)")
            except (UsageError, ValueError) as exc:
                raise UsageError(f"{where}: {exc}") from None
        try:
            principals.append(Principal(name, token, **settings))
        except UsageError as exc:
            raise UsageError(f"{where}: {exc.message}") from None
    check_distinct(principals, source)
    return principals


def check_distinct(principals: list[Principal], source: str = "the principals") -> None:
    """Names and tokens must be unique: a token names exactly one principal."""
    names = [p.name for p in principals]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"{source} names principal {name!r} twice")
    tokens = [p.token for p in principals]
    if len(set(tokens)) != len(tokens):
        clash = [p.name for p in principals if tokens.count(p.token) > 1]
        raise UsageError(f"{source} gives principals {', '.join(clash)} the same token: each"
                         " token must name one principal")
