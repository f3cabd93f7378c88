"""Drop-in LayerNorm and RMSNorm: subclasses of torch's, so their parameters, state_dict and
constructor are torch's own; forward runs fastattn's fused norm, and takes an optional
``residual`` to add first (then it returns ``(out, input + residual)``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.norm import layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` through :func:`fastattn.layer_norm`."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, out_dtype=out_dtype)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` through :func:`fastattn.rms_norm`."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual, out_dtype=out_dtype)
