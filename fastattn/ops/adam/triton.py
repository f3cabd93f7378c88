"""Triton kernel of the fused Adam/AdamW step; the math and conventions are in reference.py.

One launch per tensor, one program per BLOCK elements of it. Each program reads param (or its
fp32 master), grad, m, v (+ vmax) once and writes param, m, v (+ vmax, master) once: 28 bytes
per element for fp32 everything, pure memory traffic, so the kernel only has to keep enough
loads in flight. BLOCK = 4096 with 8 warps gives every thread 16 elements, i.e. four (fp32) or
two (16-bit) 16-byte vectors per tensor, 16+ independent loads per thread in flight. Compiled
for sm_90a (triton 3.8, aligned pointers and numel % 16 == 0) the variants take 78-115
registers and no spills, so two programs (64-128 KB of loads) share an SM.

step, lr, inv_scale and found_inf are read through pointers (no host sync: the launch sequence
can be captured in a CUDA graph). The bias corrections 1 - beta^t are computed per program in
fp32 as -expm1(t * ln(beta)) with ln(beta) from the host in double (see _one_minus_exp): this
keeps them within a few fp32 ulps of torch.optim's host-side double values even at t = 1,
where 1 - powf(beta2, t) would lose 4-5 digits to cancellation. A nonzero found_inf masks
every load and store off, so the step then moves no memory beyond the flag itself.

The element math uses the correctly rounded sqrt and divisions (sqrt_rn, div_rn), as the CUDA
kernel gets them from nvcc's defaults: Triton's `/` and tl.sqrt lower to approximate PTX
(div.full.f32, sqrt.approx.f32, up to 2 ulp) on NVIDIA GPUs. This removes one source of
rounding differences from torch's kernels, not all: the operation order differs from torch's
CUDA step, so results are not bit-identical to it. Not yet timed by `make gpu-check`.
"""

# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into
# strings that Triton 3.0's interpreter does not recognise as constexpr.
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_common import INTERPRET
from .._triton_common import cdiv as _cdiv
from .._triton_common import on_device as _on_device
from .._triton_common import cast_for as _cast_for


BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _one_minus_exp(x):
    # 1 - e^x for x = t * ln(beta) <= 0, i.e. the bias correction 1 - beta^t. Written as
    # 1 - exp(x) it cancels for small |x| (t = 1, beta2 = 0.999: an ulp of beta^t is 6e-5 of
    # the result); the Taylor series -x (1 + x/2 + x^2/6 + ... + x^8/9!) is accurate to fp32
    # rounding for |x| <= 0.5 (next term < 1e-9 relative), and beyond that 1 - exp(x) >= 0.39
    # has no cancellation. (No expm1 in triton.language before 3.x's libdevice moves.)
    poly = 1.0 / 362880.0
    poly = poly * x + 1.0 / 40320.0
    poly = poly * x + 1.0 / 5040.0
    poly = poly * x + 1.0 / 720.0
    poly = poly * x + 1.0 / 120.0
    poly = poly * x + 1.0 / 24.0
    poly = poly * x + 1.0 / 6.0
    poly = poly * x + 0.5
    poly = poly * x + 1.0
    return tl.where(x > -0.5, -x * poly, 1.0 - tl.exp(x))


@triton.jit
def _adam_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    master_ptr,
    step_ptr,
    lr_ptr,
    inv_scale_ptr,
    found_inf_ptr,
    n_elements,
    log_beta1,
    log_beta2,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    BLOCK: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_WD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LERP_LOW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if HAS_FOUND_INF:
        # A skipped step is an empty tensor: every load and store is masked off.
        n_elements = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n_elements)
    mask = offs < n_elements

    t = tl.load(step_ptr).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    step_size = tl.math.div_rn(lr, _one_minus_exp(t * log_beta1))
    bc2_sqrt = tl.math.sqrt_rn(_one_minus_exp(t * log_beta2))

    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if HAS_SCALE:
        g = g * tl.load(inv_scale_ptr).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    # torch.lerp(m, g, w): m + w (g - m) for |w| < 0.5, else g - (g - m)(1 - w).
    diff = g - m
    if LERP_LOW:
        m = m + lerp_w * diff
    else:
        m = g - diff * (1.0 - lerp_w)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.load(max_exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # torch.maximum propagates NaN from either side.
        vmax = tl.where((v > vmax) | (v != v), v, vmax)
        denom = tl.math.div_rn(tl.math.sqrt_rn(vmax), bc2_sqrt) + eps
        tl.store(max_exp_avg_sq_ptr + offs, _cast_for(vmax, max_exp_avg_sq_ptr), mask=mask)
    else:
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.math.div_rn(m, denom)

    tl.store(exp_avg_ptr + offs, _cast_for(m, exp_avg_ptr), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, _cast_for(v, exp_avg_sq_ptr), mask=mask)
    tl.store(param_ptr + offs, _cast_for(p, param_ptr), mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else float("-inf")


def _flat(t: Tensor, name: str, i: int) -> Tensor:
    if not t.is_contiguous():
        raise ValueError(f"adam_step (triton): `{name}[{i}]` must be contiguous, got strides "
                         f"{tuple(t.stride())}")
    return t


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
    """One step, in place (see reference.py). Tensors must be contiguous; ``step``/``lr``/
    ``inv_scale``/``found_inf`` are float32 one-element tensors on the parameters' device."""
    if not params:
        return
    n = len(params)
    if len(grads) != n or len(exp_avgs) != n or len(exp_avg_sqs) != n:
        raise ValueError("adam_step (triton): grads, exp_avgs and exp_avg_sqs need one tensor "
                         f"per parameter ({n}), got {len(grads)}, {len(exp_avgs)}, "
                         f"{len(exp_avg_sqs)}")
    if len(max_exp_avg_sqs) != (n if amsgrad else 0):
        raise ValueError(f"adam_step (triton): max_exp_avg_sqs must have "
                         f"{n if amsgrad else 0} tensors (amsgrad={amsgrad}), got "
                         f"{len(max_exp_avg_sqs)}")
    if masters and len(masters) != n:
        raise ValueError(f"adam_step (triton): masters must be empty or have {n} tensors, got "
                         f"{len(masters)}")
    for name, t in (("step", step), ("lr", lr), ("inv_scale", inv_scale),
                    ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1):
            raise ValueError(f"adam_step (triton): `{name}` must be a float32 one-element "
                             f"tensor, got {t.dtype} of shape {tuple(t.shape)}")
    flags = dict(
        BLOCK=BLOCK,
        AMSGRAD=bool(amsgrad),
        HAS_MASTER=bool(masters),
        DECOUPLED=bool(decoupled),
        HAS_WD=weight_decay != 0,
        MAXIMIZE=bool(maximize),
        HAS_SCALE=inv_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        LERP_LOW=abs(1.0 - beta1) < 0.5,
    )
    scalars = (_log(beta1), _log(beta2), 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay)
    with _on_device(params[0]):
        _launch_all(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, step, lr,
                    inv_scale, found_inf, amsgrad, scalars, flags)


def _launch_all(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, step, lr,
                inv_scale, found_inf, amsgrad, scalars, flags):
    for i, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        p = _flat(param, "params", i)
        g = _flat(grads[i], "grads", i)
        m = _flat(exp_avgs[i], "exp_avgs", i)
        v = _flat(exp_avg_sqs[i], "exp_avg_sqs", i)
        # Absent tensors get a stand-in pointer the kernel never dereferences.
        vmax = _flat(max_exp_avg_sqs[i], "max_exp_avg_sqs", i) if amsgrad else v
        master = _flat(masters[i], "masters", i) if masters else p
        for name, t in (("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v),
                        ("max_exp_avg_sqs", vmax), ("masters", master)):
            if t.numel() != numel:
                raise ValueError(f"adam_step (triton): `{name}[{i}]` has {t.numel()} elements, "
                                 f"`params[{i}]` has {numel}")
        grid = (_cdiv(numel, BLOCK),)
        _adam_kernel[grid](
            p, g, m, v, vmax, master, step, lr,
            inv_scale if inv_scale is not None else step,
            found_inf if found_inf is not None else step,
            numel, *scalars, num_warps=NUM_WARPS, **flags)
