"""Type checks for JSON values read back from files ckptops wrote (a resume journal, a tune log)
or that users wrote (an adapter config): small predicates that compose into the shape of a record.

Why one module: such a file sits on disk where it may be damaged or edited, and a value of
another type (``"size": "12"``, ``"r": true``) must be refused or treated as damaged, never
surface as a ``TypeError`` deep in the code that uses it. JSON's ``true`` is a Python ``bool``,
which is an ``int``: every check here refuses it where a number is wanted.
"""

from __future__ import annotations

from typing import Any, Callable

Check = Callable[[Any], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return is_int(value) or isinstance(value, float)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def list_of(check: Check, length: int | None = None) -> Check:
    return lambda value: (isinstance(value, list) and (length is None or len(value) == length)
                          and all(check(v) for v in value))


def row(*checks: Check) -> Check:
    """A JSON array of ``len(checks)`` values, each passing its check."""
    return lambda value: (isinstance(value, list) and len(value) == len(checks)
                          and all(check(v) for check, v in zip(checks, value)))


def dict_of(check: Check) -> Check:
    """A JSON object of any keys, each value passing ``check``."""
    return lambda value: isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def fields(**checks: Check) -> Check:
    """A JSON object holding (at least) these keys, each value passing its check."""
    return lambda value: isinstance(value, dict) and all(k in value and check(value[k]) for k, check in checks.items())
