"""Checks of user-given values, with one message style: ``<name> must be <what>, got <value>.``

Every layer validates integers, numbers and choices through these three functions, so a
limit reads the same wherever it is enforced and a new check is one call. Standard library
only: importing it loads neither NumPy nor TensorFlow (NumPy scalars are accepted all the
same, as ``numbers.Integral`` / ``numbers.Real``).

Example:
    >>> check_int("batch_size", 8, minimum=1)
    8
    >>> check_int("batch_size", 0, minimum=1)
    Traceback (most recent call last):
    ...
    remap_tf.errors.InvalidInputError: batch_size must be an integer >= 1, got 0.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

from remap_tf.errors import InvalidInputError


def _bounds(minimum, maximum, open_minimum: bool = False) -> str:
    low = ">" if open_minimum else ">="
    if minimum is not None and maximum is not None and not open_minimum:
        return f" from {minimum} to {maximum}"
    parts = []
    if minimum is not None:
        parts.append(f"{low} {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return (" " + " and ".join(parts)) if parts else ""


def check_int(
    name: str, value, minimum: int | None = None, maximum: int | None = None, allow_none=False
) -> int | None:
    """``value`` as an ``int`` if it is an integer (not a bool) within the bounds.

    Args:
        name: how the user knows the value (an argument, a flag or a config field).
        value: the value given.
        minimum, maximum: inclusive bounds; None for none.
        allow_none: pass None through.

    Raises:
        InvalidInputError: ``<name> must be an integer >= 1, got 0.``
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise InvalidInputError(
            f"{name} must be an integer{_bounds(minimum, maximum)}, got {value!r}."
        )
    return int(value)


def check_number(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a ``float`` if it is a finite real number (not a bool) within the bounds.

    Args:
        name: how the user knows the value.
        value: the value given.
        minimum, maximum: bounds (inclusive, except ``minimum`` with ``open_minimum``).
        open_minimum: ``value`` must be strictly above ``minimum`` (e.g. "a number > 0").
        allow_none: pass None through.

    Raises:
        InvalidInputError: ``<name> must be a number > 0, got -1.``
    """
    if value is None and allow_none:
        return None
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and value == value  # not NaN
        and abs(value) != float("inf")
    )
    if ok and minimum is not None:
        ok = value > minimum if open_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        raise InvalidInputError(
            f"{name} must be a number{_bounds(minimum, maximum, open_minimum)}, got {value!r}."
        )
    return float(value)


def closest(value, known: Iterable) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``known`` to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(name: str, value, choices: Iterable):
    """``value`` if it is one of ``choices``.

    Raises:
        InvalidInputError: ``<name> must be one of [...], got 'x'. Did you mean 'y'?``
    """
    choices = list(choices)
    if value not in choices:
        raise InvalidInputError(
            f"{name} must be one of {choices}, got {value!r}.{closest(value, choices)}"
        )
    return value
