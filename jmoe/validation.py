"""Config checks that fail with the field, the value and what is allowed."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def check(name: str, value, ok: bool, allowed: str, owner: str) -> None:
    """Raises `ValueError("{owner}.{name}={value!r} is invalid: must be {allowed}")` unless ok."""
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: must be {allowed}")


def check_choice(name: str, value, choices: tuple, owner: str) -> None:
    """`check` that `value` is one of `choices`."""
    check(name, value, value in choices, f"one of {choices}", owner)
