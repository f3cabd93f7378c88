"""Argument checks shared by the ops' front doors."""

from __future__ import annotations

import numbers

import torch
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


def flag(fn: str, name: str, value) -> bool:
    """A switch argument: a bool, as torch's own ops take them (``is_causal="False"`` would be
    truthy and switch the option on). A TypeError naming the argument otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool (True or False), got "
                        f"{type(value).__name__} {value!r}")
    return value


def dense(fn: str, name: str, t: Tensor) -> None:
    """The kernels read strided memory: a sparse (or other non-strided) tensor gets a clear
    error here rather than an internal one from the dispatcher."""
    if t.layout is not torch.strided:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}; "
                        f"call .to_dense() first")
