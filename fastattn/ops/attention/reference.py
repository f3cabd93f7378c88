"""Pure-PyTorch attention: the oracle every kernel is tested against, and the fallback.

It materialises the (Sq, Sk) score matrix, so it is slow and memory-hungry; it is written to be
read. Every backend implements these functions with the same positional signatures; the front
door (``__init__.py``) validates arguments, builds the additive bias from masks and wires
autograd, so a backend sees only the kernel contract below.

Contract
--------
q ``(B, H, Sq, D)``; k, v ``(B, Hkv, Sk, D)`` with ``H % Hkv == 0``: query head h reads kv head
``h // (H // Hkv)`` (grouped-query attention; MQA is Hkv = 1). For query i and key j::

    s_ij = (q_i . k_j) * scale
    s_ij = softcap * tanh(s_ij / softcap)                  if softcap > 0   (Gemma 2)
    s_ij = s_ij + bias[b, h, i, j]                          if a bias is given (fp32, may be -inf)
    s_ij = -inf  unless visible(i, j):
        (window_left < 0 or j >= i + diag - window_left) and (window_right < 0 or j <= i + diag + window_right)

``diag`` aligns the causal diagonal: 0 is PyTorch's top-left ``is_causal``, ``Sk - Sq`` is
FlashAttention's bottom-right; causal is ``window_right = 0``.
``lse_i = log sum_j exp(s_ij)`` (fp32) and ``p_ij = exp(s_ij - lse_i)``. A row with no finite
score (fully masked) has ``lse = -inf``, ``p = 0``, output 0 and zero gradients — never NaN.
With dropout, ``out_i = sum_j p_ij * keep_ij / (1 - dropout_p) * v_j`` where ``keep`` is the
counter-based hash below, identical bit for bit on every backend, so backward regenerates it
and tests can compare backends exactly.

Backward, with ``P~ = P * keep / (1 - p_drop)`` (P itself without dropout)::

    dV = P~^T dO
    dP~ = dO V^T;  dP = dP~ * keep / (1 - p_drop)
    dS = P * (dP - delta),  delta_i = sum_j P~_ij dP~_ij = dO_i . O_i
          (softmax Jacobian: d lse_i / d s_ij = p_ij)
    dS *= 1 - tanh^2(raw / softcap)                        if softcap (d/dx c*tanh(x/c))
    dQ = scale * dS K;  dK = scale * dS^T Q   (summed over the query heads of a kv group)

Layout: the dense op returns out, dQ, dK, dV stored as (B, S, H, D) (``empty_bshd``), as
PyTorch's flash and cuDNN attention do, so that a model's ``out.transpose(1, 2).reshape(B, S,
H * D)`` and autograd's way back into a fused QKV projection are views. The Triton and C++
kernels write it; the front door copies any other layout into it (this module's outputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._reference_common import shifted_exp

_M32 = 0xFFFFFFFF


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# Dropout keep mask: a counter-based hash, so no mask is ever stored.
#
#   mix32(x): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
#   key(bh)   = mix32(mix32(bh ^ seed_hi) ^ seed_lo),  bh = b * H + h
#   r(i, j)   = mix32(mix32(i * Sk + j mod 2^32) ^ key(bh));  keep iff r >= floor(p * 2^32)
#
# mix32 is Wellons' "lowbias32" integer finaliser. Here the uint32 arithmetic runs in int64 with
# explicit masks; a 32 x 32-bit product would overflow int64, so it is split into 16-bit halves.
# ---------------------------------------------------------------------------------------------

def _mul32(x: Tensor, c: int) -> Tensor:
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(dropout_p: float) -> int:
    return min(int(math.floor(dropout_p * 2.0 ** 32)), _M32)


def dropout_keep(seed: int, batch: int, heads: int, sq: int, sk: int, dropout_p: float,
                 device: torch.device | str = "cpu") -> Tensor:
    """The boolean keep mask ``(B, H, Sq, Sk)`` every backend draws for this seed."""
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device)
    key = _mix32(_mix32(bh ^ (seed >> 32)) ^ (seed & _M32))
    ij = torch.arange(sq, dtype=torch.int64, device=device)[:, None] * sk \
        + torch.arange(sk, dtype=torch.int64, device=device)[None, :]
    r = _mix32(_mix32(ij & _M32)[None] ^ key[:, None, None])
    return (r >= dropout_threshold(dropout_p)).view(batch, heads, sq, sk)


# ---------------------------------------------------------------------------------------------
# Dense attention
# ---------------------------------------------------------------------------------------------

def visible(sq: int, sk: int, diag: int, window_left: int, window_right: int,
            device: torch.device | str = "cpu") -> Tensor:
    """Boolean ``(Sq, Sk)``: which keys each query may attend to."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i + diag - window_left
    if window_right >= 0:
        ok &= j <= i + diag + window_right
    return ok


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] in (0, heads) else x.repeat_interleave(heads // x.shape[1], dim=1)


def _scores(q, k, bias, scale, diag, window_left, window_right, softcap, acc):
    """(s, t): the masked scores and tanh(raw / softcap) (None without softcap), in acc."""
    raw = torch.matmul(q.to(acc), _expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(raw / softcap)
        raw = softcap * t
    if bias is not None:
        raw = raw + bias.to(acc)
    ok = visible(q.shape[2], k.shape[2], diag, window_left, window_right, q.device)
    return raw.masked_fill(~ok, float("-inf")), t


def _softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    # p = exp(s - max) / sum, not exp(s - lse): when every score of a row is huge (a -1e9 mask
    # on all keys) lse = max + log(sum) rounds to max in fp32 and such p would sum to Sk.
    # Fully masked rows (no key, or all -inf) have sum 0: p = 0 and lse = -inf.
    pivot, e, total = shifted_exp(s)
    p = e / total.masked_fill(total == 0, 1.0)
    return p, (pivot + torch.log(total)).squeeze(-1)


def _dropped(p: Tensor, seed: int, dropout_p: float) -> Tensor:
    if dropout_p <= 0:
        return p
    b, h, sq, sk = p.shape
    keep = dropout_keep(seed, b, h, sq, sk, dropout_p, p.device)
    return p * keep / (1.0 - dropout_p)


def bshd_strides(shape) -> tuple:
    """Strides of a (B, H, S, D) tensor stored as (B, S, H, D)."""
    b, h, s, d = shape
    return (s * h * d, d, h * d, 1)


def empty_bshd(like: Tensor, shape) -> Tensor:
    """An uninitialised (B, H, S, D) tensor of like's dtype and device, stored as (B, S, H, D).
    empty_strided, not a transposed view: an autograd output that is a view refuses every
    in-place change to it (or to its reshape)."""
    return like.new_empty_strided(tuple(shape), bshd_strides(shape))


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, diag: int,
                  window_left: int, window_right: int, softcap: float, dropout_p: float,
                  seed: int, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: out ``(B, H, Sq, D)`` in q's dtype, lse ``(B, H, Sq)`` in fp32 (fp64 for fp64).

    ``upcast=False`` does every step in the input dtype (what plain PyTorch code in fp16/bf16
    would do): the baseline of the "error at most 2x PyTorch's" test rule. Differentiable.
    """
    acc = _acc_dtype(q.dtype) if upcast else q.dtype
    s, _ = _scores(q, k, bias, scale, diag, window_left, window_right, softcap, acc)
    p, lse = _softmax(s)
    out = torch.matmul(_dropped(p, seed, dropout_p), _expand_kv(v, q.shape[1]).to(acc))
    return out.to(q.dtype), lse.to(_acc_dtype(q.dtype))


def _group_sum(dx: Tensor, kv_heads: int) -> Tensor:
    b, h, s, d = dx.shape
    if kv_heads == h:
        return dx
    return dx.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  bias: Tensor | None, scale: float, diag: int, window_left: int,
                  window_right: int, softcap: float, dropout_p: float,
                  seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the input dtype; ``lse`` is ignored (recomputed, the oracle trusts
    nothing a kernel saved)."""
    acc = _acc_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    s, t = _scores(q, k, bias, scale, diag, window_left, window_right, softcap, acc)
    p, _ = _softmax(s)
    do = dout.to(acc)
    ve = _expand_kv(v, heads).to(acc)
    pd = _dropped(p, seed, dropout_p)
    dv = torch.matmul(pd.transpose(-1, -2), do)
    dp = _dropped(torch.matmul(do, ve.transpose(-1, -2)), seed, dropout_p)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, _expand_kv(k, heads).to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return (dq.to(q.dtype), _group_sum(dk, kv_heads).to(k.dtype),
            _group_sum(dv, kv_heads).to(v.dtype))


# ---------------------------------------------------------------------------------------------
# Packed sequences and KV-cache decoding, by running each sequence through a dense kernel.
# ``dense_fwd`` / ``dense_bwd`` default to the functions above; a backend without a native
# decode kernel (the C++ CPU one: one dense call per distinct cache length) passes its own.
# ---------------------------------------------------------------------------------------------

def _seq_bounds(cu: Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _as_batch(x: Tensor) -> Tensor:
    """(S, H, D) rows of one sequence -> a (1, H, S, D) view."""
    return x.transpose(0, 1).unsqueeze(0)


def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
               dense_fwd=attention_fwd) -> tuple[Tensor, Tensor]:
    """Packed ``(total, H, D)`` sequences; causal is bottom-right per sequence. lse ``(H, total_q)``."""
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"),
                     dtype=torch.promote_types(q.dtype, torch.float32))
    for (q0, q1), (k0, k1) in zip(_seq_bounds(cu_seqlens_q), _seq_bounds(cu_seqlens_k)):
        if q1 == q0:
            continue
        o, l = dense_fwd(_as_batch(q[q0:q1]), _as_batch(k[k0:k1]), _as_batch(v[k0:k1]), None,
                         scale, (k1 - k0) - (q1 - q0), -1, 0 if causal else -1, 0.0, 0.0, 0)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return out, lse


def varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
               scale: float, causal: bool, dense_bwd=attention_bwd) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in zip(_seq_bounds(cu_seqlens_q), _seq_bounds(cu_seqlens_k)):
        if q1 == q0:
            continue
        g = dense_bwd(_as_batch(dout[q0:q1]), _as_batch(q[q0:q1]), _as_batch(k[k0:k1]),
                      _as_batch(v[k0:k1]), _as_batch(out[q0:q1]),
                      lse[:, q0:q1].unsqueeze(0).contiguous(), None, scale,
                      (k1 - k0) - (q1 - q0), -1, 0 if causal else -1, 0.0, 0.0, 0)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(0, 1) for x in g)
    return dq, dk, dv


def decode_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float,
               num_splits: int = 0, dense_fwd=attention_fwd) -> tuple[Tensor, Tensor]:
    """Queries are the last Sq of each sequence's L_b valid cache positions (bottom-right
    causal among them). ``num_splits`` is a GPU kernel's tuning knob, meaningless here."""
    sq, s_max = q.shape[2], k_cache.shape[2]
    # One dense call per distinct length (generate() gives every row the same one): rows of a
    # run [lo, hi) with one length are views; other rows of that length are gathered.
    rows_of: dict = {}
    for b, length in enumerate(cache_seqlens.tolist()):
        rows_of.setdefault(max(0, min(int(length), s_max)), []).append(b)
    if len(rows_of) == 1 and next(iter(rows_of)) > 0:   # one length: one call, no copies
        length = next(iter(rows_of))
        return dense_fwd(q, k_cache[:, :, :length], v_cache[:, :, :length], None, scale,
                         length - sq, -1, 0, 0.0, 0.0, 0)
    out = q.new_zeros(q.shape)
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32))
    for length, rows in rows_of.items():
        if length == 0:
            continue  # nothing visible: out 0, lse -inf
        lo, hi = rows[0], rows[-1] + 1
        if hi - lo == len(rows):
            o, l = dense_fwd(q[lo:hi], k_cache[lo:hi, :, :length], v_cache[lo:hi, :, :length],
                             None, scale, length - sq, -1, 0, 0.0, 0.0, 0)
            out[lo:hi], lse[lo:hi] = o, l
        else:
            idx = torch.tensor(rows, device=q.device)
            o, l = dense_fwd(q[idx], k_cache[idx, :, :length], v_cache[idx, :, :length],
                             None, scale, length - sq, -1, 0, 0.0, 0.0, 0)
            out[idx], lse[idx] = o, l
    return out, lse
