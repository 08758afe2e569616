"""Flow-control options of a task, checked where they are declared: priorities, rate limits
and concurrency limits. The supervisor enforces them (``supervisor/limits.py``); this module only
parses and validates, so a bad value fails at decoration or at ``options()``, naming it."""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

from .errors import ConfigError

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*([smh])\s*")


def check_priority(value: Any, where: str) -> int:
    """Any int (higher starts first); bool and everything else is refused."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: priority={value!r}, expected an int (higher starts first, default 0)")
    if not -(2**31) <= value < 2**31:
        raise ConfigError(f"{where}: priority={value!r}, expected an int between -2**31 and 2**31 - 1")
    return value


def check_concurrency(value: Any, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{where}: concurrency={value!r}, expected an int >= 1 (attempts at once) or None")
    return value


def key_fields(template: str, what: str) -> list[str]:
    """The parameter names a key template (``lock``, a rate limit's ``key``) formats."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{what} template {template!r} is not a valid str.format template: {exc}") from None
    roots = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ConfigError(f"{what} template {template!r}: use parameter names in braces, not {{{field}}}")
        roots.append(root)
    return roots


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """At most ``count`` attempt starts per ``period`` seconds ("100/s", "10/m", "5/h"), across
    every actor and node of the supervisor; with ``key`` (a template over the task's arguments,
    like ``lock``) one such budget per formatted key."""

    rate: str
    key: str | None = None
    count: int = dataclasses.field(init=False)
    period: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        match = _RATE.fullmatch(self.rate) if isinstance(self.rate, str) else None
        if match is None or int(match.group(1)) < 1:
            raise ConfigError(f"rate_limit {self.rate!r}: expected 'N/s', 'N/m' or 'N/h' with N >= 1 (say '100/s')")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise ConfigError(f"rate_limit key={self.key!r}: expected a non-empty key template or None")
        object.__setattr__(self, "count", int(match.group(1)))
        object.__setattr__(self, "period", PERIODS[match.group(2)])

    @classmethod
    def of(cls, value: Any, where: str) -> RateLimit | None:
        """``rate_limit=`` as declared: None, "N/s", or a RateLimit."""
        if value is None or isinstance(value, RateLimit):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        raise ConfigError(f"{where}: rate_limit={value!r}, expected 'N/s', 'N/m', 'N/h' or cpsl.RateLimit(...)")


__all__ = ["PERIODS", "RateLimit", "check_concurrency", "check_priority", "key_fields"]
