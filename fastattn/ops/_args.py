"""Argument checks shared by the ops' front doors."""

from __future__ import annotations

import numbers

from torch import Tensor


def real_number(fn: str, name: str, value) -> float:
    """A number argument as a float; a TypeError naming it otherwise (float("a") would not).
    Accepts what float() takes of a real number: Python and numpy scalars, 0-d arrays, a
    one-element real tensor."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not (isinstance(value, numbers.Real)
                                       or (hasattr(value, "__float__")   # 0-d numpy arrays
                                           and not isinstance(value, (str, bytes, complex)))):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    return float(value)
