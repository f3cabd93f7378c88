"""Pure-PyTorch helpers shared by several ops' reference.py (the test oracles)."""

from __future__ import annotations

import torch
from torch import Tensor


def shifted_exp(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(pivot, e, total)`` over the last dim, each keeping it (size 1 for pivot and total):
    pivot = the row max (0 where it is -inf: a row of -inf, or no columns at all), e =
    exp(s - pivot), total = its row sum.

    Softmaxes and log-sum-exps built on these keep their precision when a row's values share a
    large offset: p = e / total, and log-sum-exp = pivot + log(total) where differences such as
    lse - s_t are taken as (pivot - s_t) + log(total), never through the rounded lse. A NaN
    makes the row's pivot NaN and stays NaN, as in PyTorch."""
    if s.shape[-1] == 0:
        m = s.new_full((*s.shape[:-1], 1), float("-inf"))
    else:
        m = s.amax(dim=-1, keepdim=True)
    pivot = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - pivot)
    return pivot, e, e.sum(dim=-1, keepdim=True)
