"""Triton row kernels of the cross-entropy family; the math and conventions are in reference.py.

Grid: one program per row (R programs). R is the number of tokens (thousands and up), enough
programs to fill every SM, and a row never needs another program's data, so there is no
cross-program reduction. Each program walks its row in BLOCK-wide chunks with an online
softmax: running max m and s = sum_j exp(z_j - m), rescaled by exp(m_old - m_new) when the max
grows. Memory traffic per row of C elements of e bytes:

    cross_entropy_fwd, grad None       C*e read                     (one pass)
    cross_entropy_fwd, grad given      2*C*e read + C*e written     (pass 2 re-reads for p_j)
    token_logprobs_fwd                 C*e read                     (one pass, entropy included)
    token_logprobs_bwd                 C*e read + C*e written       (lse saved by forward)
    cross_entropy_slice_bwd            C*e read + C*e written       (lse of the whole row given)

An ignored row of cross_entropy_fwd / token_logprobs_bwd reads nothing and, with a gradient,
only writes C zeros; token_logprobs_fwd still reads it because it must return its lse.
"""

# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into
# strings that Triton 3.0's interpreter does not recognise as constexpr.
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_common import INTERPRET
from .._triton_common import next_power_of_2 as _next_power_of_2
from .._triton_common import on_device as _on_device


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per chunk. A thread keeps the chunk's fp32 copy and its exponentials in registers
# whatever the input dtype, so the cap is in elements, not bytes: at 8192 elements and 8 warps
# (32 per thread) the heaviest variant (cross-entropy with weights, smoothing and gradient)
# compiles for sm_90 to 128 registers and no spills, so two programs share an SM. That puts
# 32 KB (half) to 64 KB (fp32) of loads in flight per SM, around the ~36 KB that keeping HBM
# busy takes on an H200 (4.8 TB/s x ~1 us latency / 132 SMs). Bigger chunks need 16 warps
# and then the 64K-register file holds only one program, whose two block-wide reductions
# per chunk stall the SM with nothing to overlap them. Tests may lower it to exercise many
# chunks at a small vocab.
MAX_BLOCK = 8192


def _launch_config(n_cols: int) -> Tuple[int, int]:
    # BLOCK >= 16 keeps tl.arange away from degenerate 1- and 2-wide layouts at tiny vocabs.
    # 4 warps up to 2048 elements, 8 above: 8 to 32 elements per thread from 1024 elements on,
    # i.e. whole 16-byte vector loads; smaller vocabularies leave threads idle, which is cheap.
    block = max(16, min(_next_power_of_2(n_cols), MAX_BLOCK))
    return block, 4 if block <= 2048 else 8


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    weight_ptr,
    scale_ptr,
    grad_ptr,
    grad_stride,
    loss_ptr,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    t = tl.load(target_ptr + row)

    if t != ignore_index:
        # An out-of-range target must not be read; NaN in z_t and w_t turns its loss and its
        # whole gradient row into NaN instead.
        in_range = (t >= 0) & (t < n_cols)
        t_safe = tl.where(in_range, t, 0)
        z_t = tl.where(in_range, tl.load(z_row + t_safe).to(tl.float32), float("nan"))
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t_safe)
        else:
            w_t = 1.0
        w_t = tl.where(in_range, w_t, float("nan"))

        # Pass 1. The exponent reference r is the running max, or 0 while every value seen is
        # -inf, so that exp(-inf - -inf) never makes a NaN; a row of only -inf gives lse = -inf
        # as torch.logsumexp does. Label smoothing needs W = sum_j w_j and wz = sum_j w_j
        # (z_j - r), kept relative to the running reference r (moving r by d subtracts
        # d * W_so_far), so that sum_j w_j (lse - z_j) = W log s - wz has no cancellation of
        # two large numbers at a large common offset of the logits.
        m = float("-inf")
        r = 0.0
        s = 0.0
        w_sum = 0.0
        wz = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            r_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - r_new) + tl.sum(tl.exp(x - r_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                else:
                    w = tl.where(mask, 1.0, 0.0)
                wz = wz - (r_new - r) * w_sum + tl.sum(w * tl.where(mask, x - r_new, 0.0), axis=0)
                w_sum += tl.sum(w, axis=0)
            r = r_new
        # lse - z_t is taken as (r - z_t) + log s and p_j as exp(z_j - r) / s: lse itself
        # rounds at a large common offset of the logits (ulp(1e4) ~ 1e-3), these do not.
        log_s = tl.log(s)
        lse = r + log_s
        nll = (r - z_t) + log_s

        if HAS_SMOOTHING:
            eps = label_smoothing
            hard = (1.0 - eps) * w_t
            loss = hard * nll + eps / n_cols * (w_sum * log_s - wz) + z_loss * lse * lse
            coef = hard + eps * w_sum / n_cols + 2.0 * z_loss * lse
        else:
            hard = w_t
            loss = hard * nll + z_loss * lse * lse
            coef = hard + 2.0 * z_loss * lse
        tl.store(loss_ptr + row, loss)

        if HAS_GRAD:
            # Pass 2: g_j = p_j * coef - eps w_j / C - hard [j == t], all times grad_scale.
            # Element j is loaded before it is stored, so grad may alias logits.
            smooth = 0.0
            if HAS_SMOOTHING:
                smooth = label_smoothing / n_cols
            if HAS_SCALE:
                scale = tl.load(scale_ptr).to(tl.float32)
                coef = coef * scale
                hard = hard * scale
                smooth = smooth * scale
            p_coef = coef / s
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - r) * p_coef
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        g -= smooth * tl.load(weight_ptr + cols, mask=mask, other=0.0)
                    else:
                        g -= smooth
                g = tl.where(cols == t, g - hard, g)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, zero, mask=cols < n_cols)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    n_cols,
    ignore_index,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    offs = tl.arange(0, BLOCK)
    t = tl.load(target_ptr + row)
    in_range = (t >= 0) & (t < n_cols)
    t_safe = tl.where(in_range, t, 0)
    s_t = tl.load(z_row + t_safe).to(tl.float32) * inv_temperature
    s_t = tl.where(in_range, s_t, float("nan"))

    # Online softmax over s = z / T. For the entropy, a = sum_j e_j (s_j - r) with
    # e_j = exp(s_j - r) rides along the sum s = sum_j e_j: moving the reference r -> r'
    # maps e_j -> e_j exp(r - r') and (s_j - r) -> (s_j - r) - (r' - r), so
    #     a' = exp(r - r') * (a - (r' - r) * s).
    # Then E[s] - r = a / s and entropy = lse - E[s] = log s - a / s, with no cancellation
    # between two large numbers when the logits carry a big common offset. Terms with
    # e_j = 0 contribute 0 (the p log p -> 0 limit), so -inf logits give a finite entropy.
    # r is the running max, or 0 while it is still -inf (see the cross-entropy kernel).
    m = float("-inf")
    r = 0.0
    s = 0.0
    a = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x * inv_temperature, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        r_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - r_new)
        e = tl.exp(x - r_new)
        if WITH_ENTROPY:
            a = alpha * (a - (r_new - r) * s) + tl.sum(e * tl.where(e > 0.0, x - r_new, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
        r = r_new
    log_s = tl.log(s)
    lse = r + log_s
    valid = t != ignore_index
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, (s_t - r) - log_s, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - a / s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_ptr,
    grad_stride,
    n_cols,
    ignore_index,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    t = tl.load(target_ptr + row)

    if t != ignore_index:
        # g_k = (g_logp ([k == t] - p_k) - g_ent p_k (s_k - E[s])) / T, E[s] = lse - entropy,
        # p_k = exp(s_k - lse) from the saved lse: one read and one write per element, each
        # element read before it is written (grad may alias logits). p_k = 0 drops the
        # entropy term, matching the forward's limit for -inf logits. An out-of-range target
        # makes the row NaN.
        lse = tl.load(lse_ptr + row)
        g_logp = tl.load(grad_logp_ptr + row)
        nan_if_bad = tl.where((t >= 0) & (t < n_cols), 0.0, float("nan"))
        if HAS_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row)
            mean_s = lse - tl.load(entropy_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            p = tl.exp(x - lse)
            g = tl.where(cols == t, g_logp - g_logp * p, -g_logp * p)
            if HAS_ENTROPY:
                g -= g_ent * p * tl.where(p > 0.0, x - mean_s, 0.0)
            g = g * inv_temperature + nan_if_bad
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            tl.store(g_row + cols, zero, mask=cols < n_cols)


@triton.jit
def _cross_entropy_slice_bwd_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    lse_ptr,
    entropy_ptr,
    row_scale_ptr,
    grad_entropy_ptr,
    grad_ptr,
    grad_stride,
    n_cols,
    inv_temperature,
    target_coef,
    smoothing,
    HAS_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    scale = tl.load(row_scale_ptr + row)
    dead = scale == 0.0
    if HAS_ENTROPY:
        h = tl.load(grad_entropy_ptr + row)
        dead = dead & (h == 0.0)
    if dead:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty),
                     mask=cols < n_cols)
    else:
        # g_k = (a (p_k - smoothing) - h p_k (s_k - E[s]) - [k == t] a target_coef) / T with
        # a = row_scale, p_k = exp(s_k - lse) and E[s] = lse - entropy of the whole row; t
        # outside [0, n_cols) (the target is in another slice) never matches. p_k = 0 drops
        # the entropy term (a -inf logit).
        t = tl.load(target_ptr + row)
        lse = tl.load(lse_ptr + row)
        if HAS_ENTROPY:
            mean_s = lse - tl.load(entropy_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            p = tl.exp(x - lse)
            g = scale * (p - smoothing)
            g = tl.where(cols == t, g - scale * target_coef, g)
            if HAS_ENTROPY:
                g -= h * p * tl.where(p > 0.0, x - mean_s, 0.0)
            tl.store(g_row + cols, (g * inv_temperature).to(grad_ptr.dtype.element_ty), mask=mask)


def _fusable(inv_temperature: float) -> bool:
    """Whether a temperature kernel may fuse multiplies into adds (FMA): not at T != 1, where
    s = z * (1/T) must be the rounded product everywhere. Fused into the following subtraction,
    it would be compared unrounded against a max taken of rounded ones: the max element's exp
    argument then errs by ~|s| 2^-24 (hundreds at |s| ~ 1e9: inf and NaN), and log-probs come
    out positive at ordinary |s|. At T = 1 the product is exact and fusion changes nothing."""
    return float(inv_temperature) == 1.0


def _check_rows(name: str, x: Tensor, like: Tensor) -> None:
    if x.dim() != 2 or x.shape != like.shape:
        raise ValueError(f"{name} must be 2-D (rows, classes) shaped like logits {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16 for the triton backend, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous class dimension (stride(1) == 1), got {x.stride()}")


def _per_row(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> Tensor:
    """Per-row loss ``(R,)`` float32; writes the scaled gradient into ``grad`` when given."""
    _check_rows("logits", logits, logits)
    if grad is not None:
        _check_rows("grad", grad, logits)
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    target = target.contiguous()
    if weight is not None:
        weight = _per_row(weight)
    if grad_scale is not None:
        grad_scale = grad_scale.to(torch.float32)
    block, warps = _launch_config(n_cols)
    with _on_device(logits):
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            target,
            loss if weight is None else weight,
            loss if grad_scale is None else grad_scale,
            logits if grad is None else grad,
            0 if grad is None else grad.stride(0),
            loss,
            n_cols,
            ignore_index,
            float(label_smoothing),
            float(z_loss),
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing != 0.0,
            HAS_GRAD=grad is not None,
            HAS_SCALE=grad_scale is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return loss


def token_logprobs_fwd(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    inv_temperature: float,
    with_entropy: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` float32 ``(R,)`` each; entropy is ``(0,)`` unless with_entropy."""
    _check_rows("logits", logits, logits)
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return logp, entropy, lse
    block, warps = _launch_config(n_cols)
    with _on_device(logits):
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            target.contiguous(),
            logp,
            entropy if with_entropy else logp,
            lse,
            n_cols,
            ignore_index,
            float(inv_temperature),
            WITH_ENTROPY=bool(with_entropy),
            BLOCK=block,
            num_warps=warps,
            enable_fp_fusion=_fusable(inv_temperature),
        )
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    grad: Tensor,
    ignore_index: int,
    inv_temperature: float,
) -> None:
    """Writes d(sum_r g_r logp_r + h_r entropy_r) / d logits into ``grad`` (may be ``logits``)."""
    _check_rows("logits", logits, logits)
    _check_rows("grad", grad, logits)
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must be both given or both None")
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    lse = _per_row(lse)
    grad_logp = _per_row(grad_logp)
    has_entropy = grad_entropy is not None
    if has_entropy:
        entropy = _per_row(entropy)
        grad_entropy = _per_row(grad_entropy)
    block, warps = _launch_config(n_cols)
    with _on_device(logits):
        _token_logprobs_bwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            target.contiguous(),
            lse,
            entropy if has_entropy else lse,
            grad_logp,
            grad_entropy if has_entropy else grad_logp,
            grad,
            grad.stride(0),
            n_cols,
            ignore_index,
            float(inv_temperature),
            HAS_ENTROPY=has_entropy,
            BLOCK=block,
            num_warps=warps,
            enable_fp_fusion=_fusable(inv_temperature),
        )


def cross_entropy_slice_bwd(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    row_scale: Tensor,
    grad_entropy: Optional[Tensor],
    grad: Tensor,
    inv_temperature: float,
    target_coef: float,
    smoothing: float,
) -> None:
    """Writes the gradient of a softmax loss over a slice of the classes into ``grad`` (may be
    ``logits``), from each row's whole lse and entropy (the math is in reference.py)."""
    _check_rows("logits", logits, logits)
    _check_rows("grad", grad, logits)
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must be both given or both None")
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    lse = _per_row(lse)
    row_scale = _per_row(row_scale)
    has_entropy = grad_entropy is not None
    if has_entropy:
        entropy = _per_row(entropy)
        grad_entropy = _per_row(grad_entropy)
    block, warps = _launch_config(n_cols)
    with _on_device(logits):
        _cross_entropy_slice_bwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            target.contiguous(),
            lse,
            entropy if has_entropy else lse,
            row_scale,
            grad_entropy if has_entropy else row_scale,
            grad,
            grad.stride(0),
            n_cols,
            float(inv_temperature),
            float(target_coef),
            float(smoothing),
            HAS_ENTROPY=has_entropy,
            BLOCK=block,
            num_warps=warps,
            enable_fp_fusion=_fusable(inv_temperature),
        )
