"""Triton KV-cache decode attention (flash-decoding); contract: "Decode" in the attention spec.

q (B, H, Sq, D), k_cache / v_cache (B, Hkv, S_max, D), cache_seqlens int32 (B,). Query i of
batch b sees cache position j iff j < L_b and j <= i + L_b - Sq, L_b = clamp(seqlens[b], 0, S_max).

Two kernels:

1. `_decode_split_kernel`, grid (B * Hkv, num_splits, cdiv(M, BLOCK_M)). M = (H / Hkv) * Sq:
   the query heads sharing one kv head and their Sq rows are packed as the M rows of one tile
   (row r = g * Sq + i, query head hkv * G + g), so every K/V byte of a split is read from
   memory once, not once per query head (GQA/MQA) or per query row. The program walks its slice
   of [0, L_b) in BLOCK_N steps with an online softmax (exp2 domain: s2 = q.k * scale * log2 e,
   running max m, running sum l = sum exp2(s2 - m), acc = sum exp2(s2 - m) v) and writes the
   split's normalised partial output acc / l and its natural-log lse = (m + log2 l) * ln 2 in
   fp32 to a workspace. A split (or row) that sees nothing writes out 0, lse -inf.
2. `_decode_combine_kernel`, grid (B * Hkv * M): merges the splits of one query row,
       lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) * out_s,
   and writes out in q's dtype and lse fp32 (0 and -inf when every split is empty).

Memory traffic: the split kernel reads each visible K and V row once (2 * L_b * Hkv * D * e
bytes per batch, the whole cost at long L) plus q, and writes num_splits * M * (D + 1) * 4
bytes of partials per (b, kv head); the combine re-reads those partials and writes out/lse.
The splits exist because B * Hkv alone (e.g. 1 * 8) is far fewer programs than a GPU has SMs:
a memory-bound kernel needs every SM issuing loads, so the KV length is cut until about two
programs per SM are in flight, keeping each split >= ~256 positions so the partials stay small
next to the cache bytes (D + 1 fp32 per row vs 2 * 256 * D * e cache bytes per split).
"""

# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into
# strings that Triton 3.0's interpreter does not recognise as constexpr.
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_common import INTERPRET, sm_count
from .._triton_common import cdiv as _cdiv, next_power_of_2 as _next_power_of_2


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LOG2E = 1.4426950408889634

# Fewest cache positions per split: below this the fp32 partials (M * (D + 1) * 4 bytes per
# split) and the combine launch stop being small next to the K/V bytes the split reads.
MIN_SPLIT_LEN = 256
# Most splits: the combine kernel holds all of a row's partials in one [MAX_SPLITS, D] tile.
MAX_SPLITS = 64


# The cache buffer's length and the split count change from one generate() call to the next;
# as specialised ints (== 1, divisible by 16) each new class would compile the kernel again.
@triton.jit(do_not_specialize=["S_max", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, o_part_ptr, lse_part_ptr,
    sqb, sqh, sqs,
    skb, skh, sks,
    svb, svh, svs,
    Hkv, G, Sq, S_max, M, D, num_splits,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)

    L = tl.load(seqlens_ptr + b)
    L = tl.minimum(tl.maximum(L, 0), S_max)
    # Balance this batch's valid length (not S_max) over the splits, in whole BLOCK_N blocks.
    n_blocks = tl.cdiv(L, BLOCK_N)
    blocks_per_split = tl.cdiv(n_blocks, num_splits)
    start = split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, L)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    g = rows // Sq
    qi = rows % Sq
    # Last visible position of each row (bottom-right causal); < 0 means none.
    last = qi + L - Sq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    head = (hkv * G + g).to(tl.int64)
    q_ptrs = q_ptr + b64 * sqb + head[:, None] * sqh + qi.to(tl.int64)[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = k_ptr + b64 * skb + hkv64 * skh
    v_base = v_ptr + b64 * svb + hkv64 * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        kv_mask = col_ok[:, None] & d_ok[None, :]
        cols64 = cols.to(tl.int64)
        k = tl.load(k_base + cols64[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols64[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        visible = col_ok[None, :] & (cols[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Pivot 0 while a row has seen nothing: exp2(-inf - 0) = 0, never exp2(-inf + inf).
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - pivot)
        p = tl.math.exp2(s - pivot[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # l != 0, not l > 0: a NaN in q or a visible k/v row reaches the output, as in PyTorch
    has = l_i != 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    # Workspace layout: o_part (B * Hkv, num_splits, M, D), lse_part (B * Hkv, num_splits, M).
    part = (pid_bh.to(tl.int64) * num_splits + split) * M
    o_ptrs = o_part_ptr + (part + rows.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_part_ptr + part + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    Hkv, G, Sq, M, D, num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // M  # b * Hkv + hkv
    r = pid % M
    b = bh // Hkv
    hkv = bh % Hkv
    h = hkv * G + r // Sq
    i = r % Sq

    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    part = (bh.to(tl.int64) * num_splits + offs_s) * M + r
    lse_s = tl.load(lse_part_ptr + part, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse_s, axis=0)
    pivot = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.math.exp2((lse_s - pivot) * 1.4426950408889634)
    w_sum = tl.sum(w, axis=0)
    o_s = tl.load(o_part_ptr + part[:, None] * D + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    has = w_sum != 0.0
    out = tl.sum(o_s * w[:, None], axis=0) / tl.where(has, w_sum, 1.0)
    lse = tl.where(has, pivot + tl.log(tl.where(has, w_sum, 1.0)), float("-inf"))

    row = (b.to(tl.int64) * (Hkv * G) + h) * Sq + i  # out (B, H, Sq, D), lse (B, H, Sq)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, lse)


def pick_num_splits(batch: int, hkv: int, m_blocks: int, s_max: int, device: torch.device) -> int:
    """Splits of the KV length: enough programs (batch * hkv * m_blocks * splits) for ~2 per SM,
    each split at least MIN_SPLIT_LEN positions, at most MAX_SPLITS. Uses S_max, not the
    per-batch lengths, so no device -> host copy of cache_seqlens is needed."""
    if s_max <= 0:
        return 1
    by_len = max(1, s_max // MIN_SPLIT_LEN)
    sms = sm_count(device)
    if sms == 0:
        # CPU / interpreter: few programs (each is slow), but > 1 split on a long cache so that
        # the combine path is what gets tested.
        return max(1, min(4, _cdiv(s_max, 64)))
    programs = max(1, batch * hkv * m_blocks)
    want = _cdiv(2 * sms, programs)
    return max(1, min(want, by_len, MAX_SPLITS))


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"decode_fwd: q must be (B, H, Sq, D) and k_cache, v_cache (B, Hkv, S_max, D), got "
            f"shapes {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, Sq, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_fwd: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must have the same shape")
    Bk, Hkv, _, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(f"decode_fwd: k_cache {tuple(k_cache.shape)} does not match q "
                         f"{tuple(q.shape)} in batch or head dim")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"decode_fwd: H={H} must be a multiple of Hkv={Hkv}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_fwd: q, k_cache, v_cache must share one dtype in float32/"
                         f"float16/bfloat16, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (q, k_cache, v_cache)):
        raise ValueError("decode_fwd: q, k_cache, v_cache need stride(-1) == 1")
    if cache_seqlens.shape != (B,) or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"decode_fwd: cache_seqlens must be int32 of shape ({B},), got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if any(t.device != q.device for t in (k_cache, v_cache, cache_seqlens)):
        raise ValueError("decode_fwd: q, k_cache, v_cache, cache_seqlens must be on one device")


def decode_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
               scale: float, num_splits: int = 0) -> Tuple[Tensor, Tensor]:
    """(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32); num_splits 0 = heuristic."""
    _check(q, k_cache, v_cache, cache_seqlens)
    B, H, Sq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    M = G * Sq
    out = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse

    BLOCK_D = max(16, _next_power_of_2(D))
    # tl.dot needs >= 16 rows. Up to 64 packed rows per tile (128 at small D): typical decode
    # (G * Sq <= 64) then reads K/V once; the fp32 accumulator BLOCK_M x BLOCK_D stays <= 64 KB.
    max_m = 128 if BLOCK_D <= 64 else 64
    BLOCK_M = max(16, min(_next_power_of_2(M), max_m))
    m_blocks = _cdiv(M, BLOCK_M)
    # K/V tile of BLOCK_N x BLOCK_D per loop step: 64 rows keeps two 16-KB (bf16, D=128) tiles in
    # flight per step; 32 in the interpreter so short test caches still loop over several blocks.
    if INTERPRET:
        BLOCK_N = 32
    else:
        BLOCK_N = 64 if BLOCK_D <= 128 else 32
    if num_splits <= 0:
        num_splits = pick_num_splits(B, Hkv, m_blocks, S_max, q.device)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))

    o_part = torch.empty((B * Hkv, num_splits, M, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * Hkv, num_splits, M), dtype=torch.float32, device=q.device)
    qk_scale = float(scale) * _LOG2E
    _decode_split_kernel[(B * Hkv, num_splits, m_blocks)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, G, Sq, S_max, M, D, num_splits,
        qk_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        IEEE=q.dtype == torch.float32,
        num_warps=4 if BLOCK_D <= 64 else 8,
    )
    _decode_combine_kernel[(B * Hkv * M,)](
        o_part, lse_part, out, lse,
        Hkv, G, Sq, M, D, num_splits,
        BLOCK_S=max(2, _next_power_of_2(num_splits)), BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return out, lse
