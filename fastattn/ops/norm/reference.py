"""Pure-PyTorch LayerNorm / RMSNorm with a fused residual add: the oracle every kernel is
tested against, and the fallback.

The math, per row of D features (statistics in float32, float64 for float64 inputs)::

    s     = x + residual      (rounded to the sum's dtype: the residual stream's next value)
    LayerNorm   mean = sum_j s_j / D,  var = sum_j (s_j - mean)^2 / D,  rstd = 1 / sqrt(var + eps)
                xhat_j = (s_j - mean) rstd,  y_j = xhat_j w_j + b_j
    RMSNorm     rstd = 1 / sqrt(sum_j s_j^2 / D + eps),  xhat_j = s_j rstd,  y_j = xhat_j w_j

Backward, with g_j = dy_j w_j (xhat depends on every s_k of its row through mean and rstd):

    LayerNorm   ds_j = rstd (g_j - mean_k g_k - xhat_j mean_k(g_k xhat_k)) + dsum_j
    RMSNorm     ds_j = rstd (g_j - xhat_j mean_k(g_k xhat_k)) + dsum_j
    dw_j = sum over rows of dy_j xhat_j,   db_j = sum over rows of dy_j

(d/ds_k of xhat_j is rstd (delta_jk - 1/D - xhat_j xhat_k / D) for LayerNorm and
rstd (delta_jk - xhat_j xhat_k / D) for RMSNorm.) dsum is the gradient that reaches the
residual output s from its later uses. The functions below are the interface the C++ CPU and
Triton backends implement; they take 2-D (N, D) tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float, rms: bool,
             out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y in out_dtype, s in the sum's dtype or an empty tensor without residual, mean (N,)
    or empty for RMSNorm, rstd (N,)); mean and rstd in the accumulation dtype."""
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    acc = acc_dtype(s_dtype)
    s = x if residual is None else (x.to(acc) + residual.to(acc)).to(s_dtype)
    z = s.to(acc)
    if rms:
        mean = None
        rstd = torch.rsqrt(z.square().mean(-1) + eps)
        xhat = z * rstd[:, None]
    else:
        mean = z.mean(-1)
        centred = z - mean[:, None]
        var = centred.square().mean(-1)
        # a variance past the acc dtype's range would give rstd 0 and a row of zeros: NaN
        # instead, as F.layer_norm gives (F.rms_norm gives the zeros, as the branch above)
        rstd = torch.where(torch.isposinf(var), float("nan"), torch.rsqrt(var + eps))
        xhat = centred * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    empty = z.new_empty(0)
    return (y.to(out_dtype), s if residual is not None else x.new_empty(0),
            mean if mean is not None else empty, rstd)


def norm_bwd(dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor],
             mean: Tensor, rstd: Tensor, rms: bool, want_dw: bool, want_db: bool,
             dx_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ds in s's dtype, ds rounded to dx_dtype or an empty tensor, dw, db in the accumulation
    dtype or empty tensors when not wanted)."""
    acc = acc_dtype(s.dtype)
    z = s.to(acc)
    xhat = (z if rms else z - mean[:, None]) * rstd[:, None]
    d = dy.to(acc)
    g = d * weight.to(acc) if weight is not None else d
    gx = (g * xhat).mean(-1, keepdim=True)
    inner = g - xhat * gx if rms else g - g.mean(-1, keepdim=True) - xhat * gx
    ds = inner * rstd[:, None]
    if dsum is not None:
        ds = ds + dsum.to(acc)
    dw = (d * xhat).sum(0) if want_dw else z.new_empty(0)   # distinct tensors: a custom op's
    db = d.sum(0) if want_db else z.new_empty(0)             # outputs may not alias each other
    dx = ds.to(dx_dtype, copy=True) if dx_dtype is not None else s.new_empty(0)
    return ds.to(s.dtype), dx, dw, db
