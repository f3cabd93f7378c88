"""Fused Adam/AdamW step: registration and dispatch (the op's front door).

``fastattn::adam_step_`` updates lists of parameters and their Adam state in place in one pass
(28 bytes per fp32 parameter: param, grad, m, v read; param, m, v written). The math and the
argument conventions are in ``reference.py``; ``fastattn.optim.Adam``/``AdamW`` group the
tensors (one call per device, dtype policy and step count) and call it.
"""

from typing import List, Optional

import torch
from torch import Tensor

from ... import _backends, _eager

_PKG = __name__
_CUDA_ORDER = ("cuda", "triton")
_LOW = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = {"cpu": _LOW, "cuda": _LOW, "triton": _LOW}


@_eager.custom_op(
    "fastattn::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters"),
    device_types=("cpu", "cuda"),
)
def adam_step_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
               exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], masters: List[Tensor],
               step: Tensor, lr: Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
               inv_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """One Adam/AdamW step over same-device, same-dtype tensor lists (see reference.py)."""
    if not params:
        return
    name = _backends.select("adam", params[0].device, params[0].dtype, cuda_order=_CUDA_ORDER,
                            dtypes=_DTYPES)
    _backends.implementation(name, _PKG).adam_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, step, lr, beta1, beta2,
        eps, weight_decay, decoupled, amsgrad, maximize, inv_scale, found_inf)


@adam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, step, lr, beta1, beta2,
      eps, weight_decay, decoupled, amsgrad, maximize, inv_scale, found_inf):
    return None
