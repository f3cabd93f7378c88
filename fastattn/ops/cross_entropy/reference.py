"""Pure-PyTorch row kernels of the cross-entropy family: the oracle and the fallback.

Every backend (C++ CPU, CUDA, Triton, this file) implements the same three functions with the
same positional signature; the front door (``__init__.py``) validates, flattens to rows, reduces
and wires autograd, so a backend only ever sees a 2-D ``(R, C)`` view of the logits whose class
dimension is contiguous (``logits.stride(1) == 1``; ``stride(0)`` is arbitrary).

Conventions shared by all backends
----------------------------------
* ``target`` is int64 ``(R,)``; a row whose target equals ``ignore_index`` is *ignored*: its loss,
  log-prob and entropy are 0 and its gradient row is exactly 0 (whatever ``grad_scale`` is, even
  inf). The front door has already checked that every other target lies in ``[0, C)``.
* Math is done in ``acc = promote(logits.dtype, float32)``; per-row results are returned in ``acc``.
* ``grad`` is an output buffer ``(R, C)`` in the logits dtype with ``stride(1) == 1``. It may be
  the logits tensor itself (``inplace_backward``): kernels read every element before writing it.

The math (per row, z = logits, C classes, t = target, w = class weights or 1, eps = label
smoothing, lam = z-loss coefficient, p = softmax(z), lse = log sum_j exp(z_j)):

    loss = (1 - eps) * w_t * (lse - z_t)                  # weighted NLL
         + eps / C * sum_j w_j * (lse - z_j)              # label smoothing (PyTorch's form)
         + lam * lse^2                                    # z-loss (PaLM)

    d loss / d z_j = p_j * ((1 - eps) * w_t + eps * W / C + 2 * lam * lse)
                   - (1 - eps) * w_t * [j == t] - eps * w_j / C,        W = sum_j w_j

using d lse / d z_j = p_j. The gradient is written multiplied by ``grad_scale`` (1 / the mean
denominator, or None for 1), so that for ``reduction="sum"|"mean"`` backward is a plain scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._reference_common import shifted_exp


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _shifted_exp(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``shifted_exp`` of (R, C) rows with pivot and sum as (R,)."""
    pivot, e, total = shifted_exp(z)
    return pivot.squeeze(1), e, total.squeeze(1)


def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    grad: Tensor | None,
    grad_scale: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> Tensor:
    """Per-row loss ``(R,)``; if ``grad`` is given, also writes d loss_r / d logits_r * grad_scale."""
    acc = _acc_dtype(logits.dtype)
    z = logits.to(acc)
    n_classes = z.shape[1]
    valid = target != ignore_index
    t = torch.where(valid, target, 0).unsqueeze(1)

    # lse = pivot + log_sum with pivot the row max (0 for a row of -inf): nll = lse - z_t is
    # taken as (pivot - z_t) + log_sum and p as e / sum, so that a large common offset of the
    # logits (1e4) costs no precision (lse itself rounds at ulp(1e4) ~ 1e-3 in fp32).
    pivot, e, sum_e = _shifted_exp(z)
    log_sum = torch.log(sum_e)
    lse = pivot + log_sum
    w = torch.ones(n_classes, dtype=acc, device=z.device) if weight is None else weight.to(acc)
    w_t = w[t.squeeze(1)]
    eps = label_smoothing

    nll = (pivot - z.gather(1, t).squeeze(1)) + log_sum
    loss = (1 - eps) * w_t * nll
    if z_loss:  # skipped when off, like the kernels (|lse| > 1.8e19 would make 0 * inf)
        loss = loss + z_loss * lse.square()
    if eps:  # skipped when off: a -inf logit would make 0 * inf = nan
        # sum_j w_j (lse - z_j) = W log_sum - sum_j w_j (z_j - pivot): no cancellation of two
        # large numbers at a large common offset
        smooth = w.sum() * log_sum - (z - pivot.unsqueeze(1)) @ w
        loss = loss + eps / n_classes * smooth
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    if grad is not None:
        p = e / sum_e.unsqueeze(1)
        coef = (1 - eps) * w_t + eps * w.sum() / n_classes + 2 * z_loss * lse
        g = p * coef.unsqueeze(1) - eps / n_classes * w.unsqueeze(0)
        g.scatter_add_(1, t, -((1 - eps) * w_t).unsqueeze(1))
        if grad_scale is not None:
            g = g * grad_scale.to(acc)
        g = torch.where(valid.unsqueeze(1), g, torch.zeros_like(g))
        grad.copy_(g)
    return loss


def token_logprobs_fwd(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    inv_temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)``, each ``(R,)`` in acc dtype, for s = logits * inv_temperature.

    logp = s_t - lse(s); entropy = lse(s) - sum_j p_j s_j (p = softmax(s)); entropy is an empty
    tensor when ``with_entropy`` is False. lse is what backward needs to rebuild p without a max
    pass. Ignored rows give logp = entropy = 0 (lse is still the row's true lse).
    """
    acc = _acc_dtype(logits.dtype)
    s = logits.to(acc) * inv_temperature
    valid = target != ignore_index
    t = torch.where(valid, target, 0).unsqueeze(1)
    pivot, e, sum_e = _shifted_exp(s)
    log_sum = torch.log(sum_e)
    lse = pivot + log_sum
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, (s.gather(1, t).squeeze(1) - pivot) - log_sum, zero)
    if with_entropy:
        # entropy = lse - E[s] = log_sum - sum_j e_j (s_j - pivot) / sum: relative to the
        # pivot, so no cancellation between lse and E[s] at a large common offset
        y = s - pivot.unsqueeze(1)
        e_y = torch.where(e > 0, e * y, torch.zeros_like(e))  # p log p -> 0 as p -> 0
        entropy = torch.where(valid, log_sum - e_y.sum(1) / sum_e, zero)
    else:
        entropy = lse.new_empty(0)
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    grad: Tensor,
    ignore_index: int,
    inv_temperature: float,
) -> None:
    """Writes d(sum_r g_r * logp_r + h_r * entropy_r) / d logits into ``grad``.

    With s = z / T and p = softmax(s):
        d logp / d s_k    = [k == t] - p_k
        d entropy / d s_k = -p_k * (s_k - E[s]),   E[s] = sum_j p_j s_j = lse - entropy
    and d s / d z = 1 / T. ``entropy``/``grad_entropy`` are both given or both None.
    """
    acc = _acc_dtype(logits.dtype)
    s = logits.to(acc) * inv_temperature
    valid = target != ignore_index
    t = torch.where(valid, target, 0).unsqueeze(1)
    p = torch.exp(s - lse.unsqueeze(1))
    g = -p * grad_logp.unsqueeze(1)
    g.scatter_add_(1, t, grad_logp.unsqueeze(1).to(acc))
    if grad_entropy is not None:
        mean_s = lse - entropy
        centred = torch.where(p > 0, s - mean_s.unsqueeze(1), torch.zeros_like(p))
        g = g - grad_entropy.unsqueeze(1) * p * centred
    g = torch.where(valid.unsqueeze(1), g * inv_temperature, torch.zeros_like(g))
    grad.copy_(g)


def cross_entropy_slice_bwd(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    row_scale: Tensor,
    grad_entropy: Tensor | None,
    grad: Tensor,
    inv_temperature: float,
    target_coef: float,
    smoothing: float,
) -> None:
    """Gradient of a softmax loss over a *slice* of the classes, given whole-row statistics.

    ``logits`` (R, C) are the columns [v0, v0 + C) of rows whose log-sum-exp over all their
    classes is ``lse`` (R,) (of s = z / T, in acc) and, with an entropy term, whose softmax
    entropy is ``entropy`` (R,). ``target`` (R,) is the target column *within the slice*: a value
    outside [0, C) means the row's target lies in another slice (no one-hot term here; not an
    error). Writes, with p_j = exp(s_j - lse) and E[s] = lse - entropy,

        grad_j = inv_temperature * (row_scale * (p_j - smoothing - target_coef * [j == t])
                                    - grad_entropy * p_j * (s_j - E[s]))

    and an exact 0 row where ``row_scale`` (and ``grad_entropy``, if given) is 0: ignored rows,
    whose logits are not read. Cross-entropy with label smoothing eps over V classes:
    row_scale = d loss, target_coef = 1 - eps, smoothing = eps / V; log p_t (token_logprobs):
    row_scale = -d logp, target_coef = 1, smoothing = 0, and the entropy's gradient as in
    token_logprobs_bwd. ``entropy``/``grad_entropy`` are both given or both None; ``grad`` may
    be ``logits``.
    """
    acc = _acc_dtype(logits.dtype)
    n_cols = logits.shape[1]
    s = logits.to(acc) * inv_temperature
    scale = row_scale.to(acc).unsqueeze(1)
    p = torch.exp(s - lse.to(acc).unsqueeze(1))
    g = scale * (p - smoothing)
    in_slice = (target >= 0) & (target < n_cols)
    t = torch.where(in_slice, target, 0).unsqueeze(1)
    hit = torch.where(in_slice, scale.squeeze(1) * target_coef, torch.zeros_like(scale.squeeze(1)))
    g.scatter_add_(1, t, -hit.unsqueeze(1))
    live = row_scale != 0
    if grad_entropy is not None:
        mean_s = (lse - entropy).to(acc).unsqueeze(1)
        centred = torch.where(p > 0, s - mean_s, torch.zeros_like(p))
        g = g - grad_entropy.to(acc).unsqueeze(1) * p * centred
        live = live | (grad_entropy != 0)
    g = torch.where(live.unsqueeze(1), g * inv_temperature, torch.zeros_like(g))
    grad.copy_(g)
