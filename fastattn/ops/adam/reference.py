"""Pure-PyTorch Adam/AdamW step over lists of tensors: the oracle and the fallback.

Every backend (C++ CPU, CUDA, Triton, this file) implements ``adam_step`` with this exact
positional signature; ``fastattn.optim.Adam``/``AdamW`` group the tensors and call it.

Per element, in float32 (t = step, the count *after* this step's increment):

    if found_inf is given and != 0: change nothing (a GradScaler step with inf/nan grads)
    g = grad * inv_scale (if given);  g = -g if maximize
    p = master (fp32 copy, if master weights are kept) else param, in float32
    weight decay:  AdamW (decoupled)  p = p * (1 - lr * wd)
                   Adam               g = g + wd * p
    m = lerp(m, g, 1 - beta1)                   # m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v) if amsgrad              # the running max replaces v below
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    (the two bias corrections and lr / (1 - beta1^t) in float64, rounded to float32, as torch)
    write p to master (if any) and to param (rounded to param's dtype); m, v, vmax are stored
    in their own dtype (float32, or bfloat16 when moments are kept in bf16).

This is torch.optim.Adam/AdamW's single-tensor algorithm (same order of operations), so fp32
results agree with it to rounding. An optimizer step moves 16 bytes per fp32 parameter read
(param, grad, m, v) and 12 written (param, m, v): 28 bytes, pure memory traffic.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def adam_step(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    masters: List[Tensor],
    step: Tensor,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    inv_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
) -> None:
    """One step, in place. ``max_exp_avg_sqs`` is empty unless amsgrad, ``masters`` empty unless
    master weights are kept; ``step``/``lr``/``inv_scale``/``found_inf`` are float32 0-dim
    tensors on the parameters' device (read there: no host sync on CUDA)."""
    if not params:
        return
    skip = None if found_inf is None else found_inf.ne(0)
    # Bias corrections in float64, then rounded to float32, as torch computes them: in float32,
    # 1 - beta2**t cancels (1 - 0.999 keeps 4 significant digits), which would move the step
    # by ~1e-5 relative.
    t = step.to(torch.float64)
    lr32 = lr.to(torch.float32)
    bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=t.device), t)
    bc2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=t.device), t)
    step_size = (lr.to(torch.float64) / bc1).to(torch.float32)
    bc2_sqrt = bc2.sqrt().to(torch.float32)
    for i, param in enumerate(params):
        g = grads[i].to(torch.float32)
        if inv_scale is not None:
            g = g * inv_scale
        if maximize:
            g = -g
        source = masters[i] if masters else param
        p = source.to(torch.float32)
        if weight_decay != 0:
            if decoupled:
                p = p * (1 - lr32 * weight_decay)
            else:
                g = g + weight_decay * p
        m = torch.lerp(exp_avgs[i].to(torch.float32), g, 1 - beta1)
        v = exp_avg_sqs[i].to(torch.float32) * beta2 + (1 - beta2) * g * g
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(torch.float32), v)
            denom = vmax.sqrt() / bc2_sqrt + eps
        else:
            denom = v.sqrt() / bc2_sqrt + eps
        p = p - step_size * m / denom
        updates = [(exp_avgs[i], m), (exp_avg_sqs[i], v), (param, p)]
        if amsgrad:
            updates.append((max_exp_avg_sqs[i], vmax))
        if masters:
            updates.append((masters[i], p))
        for dst, value in updates:
            if skip is not None:
                value = torch.where(skip, dst.to(torch.float32), value)
            dst.copy_(value)
