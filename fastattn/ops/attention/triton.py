"""Triton FlashAttention-2 kernels (dense and varlen), forward and backward.

The math contract (masking rule, softcap, bias, dropout hash, lse, GQA, varlen) is the shared
attention spec; reference.py spells it out in PyTorch.

Forward, grid (cdiv(Sq, BLOCK_M), B*H) (B*H over axes 1 and 2 past 65535: _bh_grid), query
tiles launched last first (see _fwd_kernel):
a program keeps one query tile Q_i in registers and streams the visible key/value tiles with
an online softmax in base 2 (log2(e) is folded into the scale, so every exponential is one
exp2). It writes out (B, H, Sq, D) and lse (B, H, Sq).
HBM traffic per (b, h): Sq*D reads of Q, about (Sq/BLOCK_M)*Sk_visible*D*2 reads of K and V
(served mostly from L2 across the programs of one head), Sq*D + Sq writes.

Backward, three launches, no atomics (bitwise deterministic):
  _bwd_preprocess    grid (cdiv(Sq, BLOCK_M), B*H):     delta_i = sum_d dO_id * O_id.
  _bwd_dkdv_kernel   grid (cdiv(Sk, BLOCK_N), B*Hkv):   K_j, V_j stay in registers while the
                     program walks every visible query tile of every query head of its GQA
                     group, so dK_j, dV_j are complete sums when written (no repeat of K/V).
  _bwd_dq_kernel     grid (cdiv(Sq, BLOCK_M), B*H):     Q_i, dO_i stay, K/V tiles stream.
P is recomputed from the saved lse in both; the split costs a second QK^T and dO V^T
(backward does ~2.5x the forward's FLOPs instead of 2x) and buys determinism.

Masks: every launch computes, per tile, the range of tiles that can be visible from diag and
the window (skipping the rest) and splits it into edge tiles, which evaluate the element mask,
and interior tiles, which are fully visible and skip it (causal: only the diagonal tiles pay).
Varlen reuses the same kernels: IS_VARLEN reads each sequence's offsets from cu_seqlens.

Hopper (sm_90+, USE_TMA): the interior tiles of each inner loop are loaded through TMA tensor
descriptors; see "The Hopper path" below.
"""

# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into
# strings that Triton 3.0's interpreter does not recognise as constexpr.
import math
import os
import warnings
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_common import INTERPRET, CachedAutotune, TensorDescriptor, TmaSwitch
from .._triton_common import cdiv as _cdiv, next_power_of_2 as _next_power_of_2
from .._triton_common import on_device as _on_device
from .._triton_common import tanh as _tanh
from .reference import empty_bshd as _empty_bshd

# FASTATTN_AUTOTUNE=0 runs the first config the shape pruning keeps instead of timing them all:
# for test runs, where every new shape would otherwise cost a round of compiles.
AUTOTUNE = os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"
# FASTATTN_TRITON_TMA: the Hopper path (see _tma_descriptor and _triton_common.TmaSwitch).
TMA = TmaSwitch("attention")
# FASTATTN_TRITON_DQ: "kernel" (default) computes dQ in its own launch, deterministic, at the
# price of recomputing QK^T and dO V^T there; "atomic" adds each dK/dV program's dQ share into
# an fp32 buffer with atomics instead (FlashAttention-2's scheme: 5 matrix products instead of
# 7, not bitwise reproducible). A benchmarking variant until a GPU run decides between them.
DQ_MODE = os.environ.get("FASTATTN_TRITON_DQ", "kernel")
_DQ_MODES = ("kernel", "atomic")
_warned_atomic = False


def _atomic_dq() -> bool:
    """Whether this backward adds dQ with atomics: FASTATTN_TRITON_DQ=atomic, unless the call
    asked for determinism (flash_attention(deterministic=True), or
    torch.use_deterministic_algorithms(True))."""
    global _warned_atomic
    if DQ_MODE not in _DQ_MODES:
        raise ValueError(f"FASTATTN_TRITON_DQ must be one of {_DQ_MODES}, got {DQ_MODE!r}")
    if DQ_MODE != "atomic":
        return False
    from . import deterministic_requested  # the package is loaded by the time a kernel runs

    if deterministic_requested():
        return False
    if not _warned_atomic:
        _warned_atomic = True
        warnings.warn("fastattn: FASTATTN_TRITON_DQ=atomic: the Triton attention backward adds dQ with "
                      "atomics and is not bitwise reproducible (deterministic=True or "
                      "torch.use_deterministic_algorithms(True) turns it off)", RuntimeWarning, stacklevel=3)
    return True

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# The interpreter runs each program as numpy calls, so small tiles cost little there and
# 16 is also the smallest tile tl.dot accepts; tests get several tiles per row from Sq = 97.
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------


def _streamed(kind):
    # (descriptor arguments, the block that is their tile's row count) of the operands a
    # kernel streams through its inner loop: the only loads that take the TMA path.
    return (("QDesc", "DODesc"), "BLOCK_M") if kind == "dkdv" else (("KDesc", "VDesc"), "BLOCK_N")


def _block_shape_hook(kind):
    # A host-side descriptor carries its tile shape, which must be the launched config's:
    # the autotuner calls this before each config it times and before the chosen one runs.
    names, block = _streamed(kind)

    def hook(nargs):
        for name in names:
            desc = nargs[name]
            if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
                desc.block_shape = [nargs[block], desc.block_shape[1]]

    return hook


def _configs(kind):
    hook = _block_shape_hook(kind)
    main = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook)
        for bm in (64, 128)
        for bn in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
    # Only for head dim 256: in fp32 even a 64 x 64 backward tile needs ~280 KB of shared
    # memory (sm_90 has 227 KB), and the autotuner skips configs that do not fit.
    small = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=s, pre_hook=hook)
        for bm, bn in ((32, 32), (32, 64), (64, 32))
        for s in (1, 2)
    ]
    # Backward only, head dims 64 to 128: the tile held in registers long and the streamed one
    # short (FlashAttention-2's Triton backward on Hopper): dK/dV keeps 128 keys and streams 32
    # queries, dQ keeps 128 queries and streams 32 keys. 8 warps: with 4 they spill (_prune).
    unequal = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=8, num_stages=s, pre_hook=hook)
        for bm, bn in ((32, 128), (128, 32))
        for s in (2, 3)
    ]
    return main + small + unequal


def _prune(kind):
    # Registers and spills per config: `python -m tests.tools.triton_compile_time --dtype bf16
    # --head-dim {64,128} --tiles ... --warps 4 8 --stages 2 3 [--tma]` (ptxas -v for sm_90a,
    # triton 3.8; benchmarks/results/triton-registers-sm90a-2026-11-30.txt, TMA and pointer
    # loads, 2 and 3 stages). A forward program holds Q_i and the fp32 accumulator
    # (2 * BLOCK_M * D) plus a BLOCK_M x BLOCK_N score tile; a dK/dV program holds K_j, V_j and
    # two fp32 accumulators (4 * BLOCK_N * D). What that table shows (GQA: the group size a
    # runtime int; with one query head per kv head, GROUP = 1, dK/dV needs less, e.g. 64 x 64 at
    # D = 128 spills 124 B with 4 warps and none with 8):
    # - dK/dV spills at every tile at D = 128: with 8 warps 64 x 64 160-416 B, 32 x 128 84-176 B;
    #   with 4 warps 64 x 64 536-1312 B. At D = 64, 64 x 64 with 8 warps spills 0-4 B (TMA) or
    #   44-60 B (pointer loads), with 4 warps 120-408 B. So 8 warps come first for dK/dV (the
    #   FASTATTN_AUTOTUNE=0 pick) at D = 128. Not at D <= 64: on an H200 (2026-11-30, gpt2-124m's
    #   attention: B 16, H 12, S 1024, D 64, causal, bf16, benchmarks.profile_step) the
    #   autotuner chose 64 x 64 with 4 warps and 3 stages for both backward kernels (and 64 x 64,
    #   4 warps, 2 stages, already the first config, for the forward), and the 8-warp dK/dV pick
    #   took 2.1x as long (6.2 against 2.9 ms per training step over 12 layers): spills of a few
    #   hundred bytes cost less there than a second warpgroup. That config comes first, also
    #   at the smaller head dims (not timed; their tiles hold less).
    # - dQ at D = 128 with 8 warps: 64 x 128 0 B, 128 x 64 0-32 B.
    # - 4 warps with a 128-wide tile: dK/dV 560-6400 B; dQ with 128 query rows 84-2300 B, and
    #   64 x 128 76-212 B at D = 128 but 0 B at D = 64 (kept there).
    # At D = 256 nothing above 64 x 64 fits. Tiles longer than the (bucketed) sequence only add
    # masked work. Which config is fastest is the autotuner's to find (gpu-check logs its picks).
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d = args["BLOCK_D"]
        sq = args["SQ_BUCKET"]
        sk = args["SK_BUCKET"]
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if args.get("PRECISION") == "ieee":
                # fp32 products: no tensor cores, every tl.dot unrolls into FMAs and ptxas time
                # grows with the tile. `python -m tests.tools.triton_compile_time` (sm_90,
                # triton 3.8, 2 slow cores, 2026-11-29), D = 40: fwd 16, dK/dV 34, dQ 23 s at
                # 64 x 64; 5, 9 and 6 s at 32 x 32 (D = 128 at 32 x 32: 9, 23, 15 s). That day an
                # fp32 GPU test at D = 40 ran past its 90 s limit compiling 64 x 64 tiles.
                # fp32 attention is for checking, not speed.
                if bm == bn == 32:
                    kept.append(c)
                continue
            if {bm, bn} == {32, 128}:
                held = bn if kind == "dkdv" else bm
                if kind != "fwd" and held == 128 and 64 <= d <= 128 and min(sq, sk) > 64:
                    kept.append(c)
                continue
            if (bm < 64 or bn < 64) and d < 256:
                continue
            if d >= 256 and (bm > 64 or bn > 64):
                continue
            if d >= 128 and ((kind == "dkdv" and max(bm, bn) == 128)
                             or (kind == "dq" and bm == bn == 128)):
                continue
            if (sq <= 64 and bm > 64) or (sk <= 64 and bn > 64):
                continue
            if c.num_warps == 8 and max(bm, bn) == 64 and d < (64 if kind == "dkdv" else 128):
                continue
            if c.num_warps == 4 and max(bm, bn) == 128 and (
                    d >= 128 or (d >= 64 and (kind == "dkdv" or (kind == "dq" and bm == 128)))):
                continue
            kept.append(c)
        if kind != "fwd" and d <= 64:   # stable sorts: the measured pick first
            kept.sort(key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                     c.num_stages) != (64, 64, 4, 3))
        elif kind == "dkdv" and 64 < d <= 128:
            kept.sort(key=lambda c: c.num_warps != 8)
        kept = kept or [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2, pre_hook=_block_shape_hook(kind))
        ]
        return kept if AUTOTUNE else kept[:1]

    return prune


# Ints that follow the batch's sequence lengths. Triton compiles a kernel again for each new
# value class of an int argument (== 1, divisible by 16, other), so a run whose lengths vary
# from batch to batch (padded SFT batches, packed DPO pairs, prompts in a generate() prefill)
# would compile every attention kernel several times over, tens of seconds each on a GPU. These
# only bound masks and loops, except the log-sum-exp's strides (its rows are Sq, or the packed
# total, long), which would only prove alignment for its loads of BLOCK_M floats per tile. The
# strides of Q, K, V, O and their gradients keep their specialisation (their tiles' loads need
# it, and with head dims that are multiples of 16 it does not change with the lengths).
_SHAPE_INTS = ["seqlen_q", "seqlen_k", "diag", "window_left", "window_right", "SQ_BUCKET",
               "SK_BUCKET", "stride_lb", "stride_lh", "N_BH"]

# CUDA's limit on grid axes 1 and 2. The (batch, head) pairs (varlen: (sequence, head)) run on
# axis 1, and where they are more than this (8192 packed sequences x 8 heads) on axes 1 and 2
# together (_bh_grid, _bh_index): the last row of axis 2 is partly idle.
_GRID_YZ_MAX = 65535


def _bh_grid(n_bh: int) -> Tuple[int, int]:
    """Grid axes 1 and 2 for n_bh (batch, head) programs: (n_bh, 1), or rows of the limit."""
    if n_bh <= _GRID_YZ_MAX:
        return n_bh, 1
    rows = _cdiv(n_bh, _GRID_YZ_MAX)
    if rows > _GRID_YZ_MAX or n_bh >= 2 ** 31:   # (the kernels index the pairs in int32)
        raise ValueError(f"attention: {n_bh} (batch, head) pairs pass the CUDA grid's "
                         f"{_GRID_YZ_MAX}^2 (or 2^31); split the batch")
    return _GRID_YZ_MAX, rows


@triton.jit
def _bh_index():
    # The (batch, head) pair of this program over grid axes 1 and 2 (_bh_grid).
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)

_TUNE_KEY = ["BLOCK_D", "SQ_BUCKET", "SK_BUCKET", "HAS_BIAS", "HAS_DROPOUT", "HAS_SOFTCAP", "IS_VARLEN", "USE_TMA"]


def _tuned(kind):
    def wrap(kernel):
        if INTERPRET:
            return kernel
        prune = {"early_config_prune": _prune(kind)}
        key, reset = (_TUNE_KEY + ["ATOMIC_DQ"], ["DQAcc"]) if kind == "dkdv" else (_TUNE_KEY, None)
        # reset_to_zero: each config timed adds its dQ shares into DQAcc again
        return CachedAutotune(
            triton.autotune(configs=_configs(kind), key=key, prune_configs_by=prune, reset_to_zero=reset)(kernel)
        )

    return wrap


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _dropout_key(bh, seed_lo, seed_hi):
    # seed_lo / seed_hi / the threshold arrive as int32 bit patterns (Triton types a Python int
    # >= 2**31 as int64); the bitcast gives back the uint32 of the spec.
    return _mix32(_mix32(bh.to(tl.uint32) ^ seed_hi.to(tl.uint32, bitcast=True)) ^ seed_lo.to(tl.uint32, bitcast=True))


@triton.jit
def _sequence(CuQ, CuK, b, seqlen_q, seqlen_k, diag, IS_VARLEN: tl.constexpr):
    """(first query row, first query row as int64, first key row as int64, Sq, Sk, diag) of
    batch entry b: from cu_seqlens for packed sequences (bottom-right causal per sequence),
    else the dense problem's own."""
    q_start = 0
    row_q = 0
    row_k = 0
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        seqlen_k = tl.load(CuK + b + 1) - k_start
        diag = seqlen_k - seqlen_q
        row_q = q_start.to(tl.int64)
        row_k = k_start.to(tl.int64)
    return q_start, row_q, row_k, seqlen_q, seqlen_k, diag


@triton.jit
def _keep(rows, cols, seqlen_k, key, threshold):
    # int32 products wrap, so the bitcast gives i * Sk + j mod 2**32 as the spec asks;
    # r = mix32(mix32(i * Sk + j) ^ key(bh)) (reference.py).
    idx = (rows * seqlen_k + cols).to(tl.uint32, bitcast=True)
    return _mix32(_mix32(idx) ^ key) >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _scores(
    qk,
    rows,
    cols,
    bias_ptr,
    stride_bm,
    stride_bn,
    seqlen_q,
    seqlen_k,
    diag,
    window_left,
    window_right,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    MASK: tl.constexpr,
):
    """s * log2(e) for the tile (rows, cols broadcast to the tile's shape), and tanh's value.

    A missing window side arrives as a window wider than any sequence, so the three
    comparisons need no branch.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * (scale * 1.4426950408889634)
    if HAS_BIAS:
        bias = tl.load(
            bias_ptr + rows * stride_bm + cols * stride_bn, mask=(rows < seqlen_q) & (cols < seqlen_k), other=0.0
        )
        # Finite biases beyond +-2e38 (HF-style masks use finfo.min = -3.4e38) are clamped
        # there, so that bias * log2(e) stays finite: -3.4e38 on every key of a row is a
        # uniform softmax in PyTorch, not a masked row; a +3e38 would become inf - inf.
        # Infinite biases keep their meaning (-inf masks a key).
        b = bias.to(tl.float32)
        b = tl.where(tl.abs(b) < float("inf"), tl.minimum(tl.maximum(b, -2e38), 2e38), b)
        s += b * 1.4426950408889634
    if MASK:
        visible = (cols < seqlen_k) & (cols >= rows + diag - window_left) & (cols <= rows + diag + window_right)
        s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def _key_tiles(m0, seqlen_k, diag, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [lo, hi) that a query tile starting at m0 can see, and [full_lo, full_hi) of
    them that every row sees whole. Row i sees keys i + diag - wl .. i + diag + wr: the first
    row bounds the right edge, the last row the left edge. Everything is clamped at 0 before
    dividing, because Triton's integer division truncates on the GPU and floors in numpy."""
    m_last = m0 + BLOCK_M - 1
    first = tl.maximum(m0 + diag - window_left, 0)
    end = tl.minimum(m_last + diag + window_right + 1, seqlen_k)
    lo = first // BLOCK_N
    hi = tl.where(end > first, (end + BLOCK_N - 1) // BLOCK_N, lo)
    full_lo = (tl.maximum(m_last + diag - window_left, 0) + BLOCK_N - 1) // BLOCK_N
    full_hi = tl.maximum(tl.minimum(m0 + diag + window_right + 1, seqlen_k), 0) // BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_tiles(n0, seqlen_q, seqlen_k, diag, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transpose of _key_tiles for a key tile starting at n0: key j is seen by queries
    j - diag - wr .. j - diag + wl. A key tile that runs past seqlen_k has no interior query
    tile, since its padding columns must be masked everywhere; a query tile that runs past
    seqlen_q is an edge tile."""
    n_last = n0 + BLOCK_N - 1
    first = tl.maximum(n0 - diag - window_right, 0)
    end = tl.minimum(n_last - diag + window_left + 1, seqlen_q)
    lo = first // BLOCK_M
    hi = tl.where(end > first, (end + BLOCK_M - 1) // BLOCK_M, lo)
    full_lo = (tl.maximum(n_last - diag - window_right, 0) + BLOCK_M - 1) // BLOCK_M
    full_hi = tl.maximum(n0 - diag + window_left + 1, 0) // BLOCK_M
    # An interior tile must also lie inside [0, seqlen_q): its loads have no row mask.
    full_hi = tl.minimum(full_hi, seqlen_q // BLOCK_M)
    full_lo = tl.where(n0 + BLOCK_N > seqlen_k, hi, full_lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tma_coords(offset, row0, stride_row, USE_TMA: tl.constexpr):
    """(row, column) of a (batch, head)'s first element in the 2-D view (rows of stride_row
    elements) that _tma_descriptor describes, offset being its element offset in the tensor
    and row0 the sequence's first row (varlen). int32, as TMA coordinates are."""
    row = 0
    col = 0
    if USE_TMA:
        row = (offset // stride_row + row0).to(tl.int32)
        col = (offset % stride_row).to(tl.int32)
    return row, col


@triton.jit
def _lse_log2(lse_ptr, rows, seqlen_q):
    # A fully masked row (lse = -inf) and a padding row become +inf, so that
    # p = exp2(s - lse) is 0 for every s instead of NaN (-inf - -inf) or inf.
    lse = tl.load(lse_ptr + rows, mask=rows < seqlen_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    k_row,
    k_col,
    v_row,
    v_col,
    bias_base,
    stride_kn,
    stride_vn,
    stride_bm,
    stride_bn,
    offs_m,
    offs_d,
    seqlen_q,
    seqlen_k,
    diag,
    window_left,
    window_right,
    scale,
    softcap,
    key,
    threshold,
    tile_lo,
    tile_hi,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    MASK: tl.constexpr,
    TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        if TMA:
            k_t = tl.trans(k_desc.load([k_row + tile * BLOCK_N, k_col]))
        else:
            k_t = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0
            )
        qk = tl.dot(q, k_t, input_precision=PRECISION)
        s, _ = _scores(
            qk, offs_m[:, None], offs_n[None, :], bias_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
            diag, window_left, window_right, scale, softcap, HAS_BIAS, HAS_SOFTCAP, MASK,
        )  # fmt: skip
        # Online softmax: m is the running max, or 0 while a row has seen only -inf, so that
        # neither exp2(-inf - -inf) nor alpha makes a NaN; l stays 0 for such a row.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # lse is of the scores before dropout, so l takes p whole; only the P V product
            # sees the kept entries (1 / (1 - p) is applied once at the end).
            p = tl.where(_keep(offs_m[:, None], offs_n[None, :], seqlen_k, key, threshold), p, 0.0)
        if TMA:
            v = v_desc.load([v_row + tile * BLOCK_N, v_col])
        else:
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
            )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_tuned("fwd")
@triton.jit(do_not_specialize=_SHAPE_INTS + ["threshold", "seed_lo", "seed_hi"])
def _fwd_kernel(
    Q,
    K,
    V,
    Bias,
    Out,
    Lse,
    CuQ,
    CuK,
    KDesc,
    VDesc,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_lb,
    stride_lh,
    H,
    N_BH,
    GROUP,
    seqlen_q,
    seqlen_k,
    scale,
    softcap,
    diag,
    window_left,
    window_right,
    threshold,
    drop_scale,
    seed_lo,
    seed_hi,
    SQ_BUCKET,
    SK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Query tiles in reverse: under a causal mask the last tiles see the most keys, and
    # starting them first leaves the short ones for the tail of the launch. Tiles of one head
    # stay adjacent in launch order, so its K/V are read from L2 while they run.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = _bh_index()
    if pid_bh >= N_BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    q_start, row_q, row_k, seqlen_q, seqlen_k, diag = _sequence(
        CuQ, CuK, b, seqlen_q, seqlen_k, diag, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    k_row, k_col = _tma_coords(b64 * stride_kb + hk64 * stride_kh, row_k, stride_kn, USE_TMA)
    v_row, v_col = _tma_coords(b64 * stride_vb + hk64 * stride_vh, row_k, stride_vn, USE_TMA)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + row_q * stride_qm
    k_base = K + b64 * stride_kb + hk64 * stride_kh + row_k * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + row_k * stride_vn
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    key = 0
    if HAS_DROPOUT:
        key = _dropout_key(pid_bh, seed_lo, seed_hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N)
    # Left edge, interior (no element mask), right edge; for causal the left edge is empty.
    # Interior tiles lie inside [0, seqlen_k), so only they take the TMA loads, which have
    # no element mask.
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, k_row, k_col, v_row, v_col, bias_base, stride_kn,
        stride_vn, stride_bm, stride_bn, offs_m, offs_d, seqlen_q, seqlen_k, diag, window_left, window_right,
        scale, softcap, key, threshold, lo, full_lo, HEAD_DIM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, True, False,
        PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, k_row, k_col, v_row, v_col, bias_base, stride_kn,
        stride_vn, stride_bm, stride_bn, offs_m, offs_d, seqlen_q, seqlen_k, diag, window_left, window_right,
        scale, softcap, key, threshold, full_lo, full_hi, HEAD_DIM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, False, USE_TMA,
        PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, k_row, k_col, v_row, v_col, bias_base, stride_kn,
        stride_vn, stride_bm, stride_bn, offs_m, offs_d, seqlen_q, seqlen_k, diag, window_left, window_right,
        scale, softcap, key, threshold, full_hi, hi, HEAD_DIM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, True, False,
        PRECISION, BLOCK_N,
    )  # fmt: skip

    # l = 0 exactly when the row saw no finite score: out 0, lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_base = Out + b64 * stride_ob + h64 * stride_oh + row_q * stride_om
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    l_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start
    tl.store(l_base + offs_m, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
#
# With P = softmax(S) row-wise, dO the incoming gradient and delta_i = sum_j P_ij dP_ij:
#   dV = (P o Z)^T dO                    (Z = keep / (1 - p), the dropout scaling; 1 without)
#   dP = (dO V^T) o Z
#   dS = P o (dP - delta)                (softmax Jacobian: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik))
#   sum_k P_ik dP_ik = sum_k P_ik Z_ik (dO_i . V_k) = dO_i . O_i, hence delta = rowsum(dO o O).
# Softcap s = c tanh(r / c), r = scale q.k: ds/dr = 1 - tanh^2, so dS picks up (1 - t^2).
# Then dQ = scale dS K and dK = scale dS^T Q (the bias gets no gradient).


@triton.jit(do_not_specialize=["seqlen_q", "stride_lb", "stride_lh", "N_BH"])
def _bwd_preprocess(
    Out,
    DO,
    Delta,
    CuQ,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_lb,
    stride_lh,
    H,
    N_BH,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = _bh_index()
    if pid_bh >= N_BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    q_start = 0
    row0 = 0
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        row0 = q_start.to(tl.int64)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + (row0 + offs_m[:, None]) * stride_om + offs_d[None, :]
    do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + (row0 + offs_m[:, None]) * stride_dom + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    q_desc,
    do_desc,
    q_row,
    q_col,
    do_row,
    do_col,
    lse_base,
    delta_base,
    bias_base,
    dq_base,
    stride_qm,
    stride_dom,
    stride_dqm,
    stride_bm,
    stride_bn,
    offs_n,
    offs_d,
    seqlen_q,
    seqlen_k,
    diag,
    window_left,
    window_right,
    scale,
    softcap,
    key,
    threshold,
    drop_scale,
    tile_lo,
    tile_hi,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    MASK: tl.constexpr,
    TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Works on the transposed tile S^T (keys x queries) so that dV += P^T dO and dK += dS^T Q
    # are plain products with the resident K / V tile as the left operand.
    d_ok = offs_d < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        if TMA:
            q_t = tl.trans(q_desc.load([q_row + tile * BLOCK_M, q_col]))
        else:
            q_t = tl.load(
                q_base + offs_m[None, :] * stride_qm + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None], other=0.0
            )
        qk_t = tl.dot(k, q_t, input_precision=PRECISION)
        s_t, t_t = _scores(
            qk_t, offs_m[None, :], offs_n[:, None], bias_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
            diag, window_left, window_right, scale, softcap, HAS_BIAS, HAS_SOFTCAP, MASK,
        )  # fmt: skip
        lse = _lse_log2(lse_base, offs_m, seqlen_q)
        p_t = tl.exp2(s_t - lse[None, :])
        if TMA:
            do = do_desc.load([do_row + tile * BLOCK_M, do_col])
        else:
            do = tl.load(
                do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
            )
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _keep(offs_m[None, :], offs_n[:, None], seqlen_k, key, threshold)
            pz_t = tl.where(keep, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            pz_t = p_t
        dv += tl.dot(pz_t.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
        if ATOMIC_DQ:
            # dQ_i += dS_ij K_j for this key tile (scale applied when the buffer is cast).
            dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION)
            dq_ptrs = dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq_part, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@_tuned("dkdv")
@triton.jit(do_not_specialize=_SHAPE_INTS + ["threshold", "seed_lo", "seed_hi"])
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    Bias,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    DQAcc,
    CuQ,
    CuK,
    QDesc,
    DODesc,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_lb,
    stride_lh,
    H,
    HKV,
    N_BH,
    GROUP,
    seqlen_q,
    seqlen_k,
    scale,
    softcap,
    diag,
    window_left,
    window_right,
    threshold,
    drop_scale,
    seed_lo,
    seed_hi,
    SQ_BUCKET,
    SK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = _bh_index()
    if pid_bhk >= N_BH:
        return
    b = pid_bhk // HKV
    hk = pid_bhk % HKV
    q_start, row_q, row_k, seqlen_q, seqlen_k, diag = _sequence(
        CuQ, CuK, b, seqlen_q, seqlen_k, diag, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_ptrs = K + b64 * stride_kb + hk64 * stride_kh + (row_k + offs_n[:, None]) * stride_kn + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + hk64 * stride_vh + (row_k + offs_n[:, None]) * stride_vn + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_tiles(n0, seqlen_q, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N)

    # The GROUP query heads sharing this kv head add into the same registers in a fixed order:
    # the sums GQA needs, with no atomics and no second pass.
    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        key = 0
        if HAS_DROPOUT:
            key = _dropout_key(b * H + hk * GROUP + g, seed_lo, seed_hi)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + row_q * stride_qm
        do_base = DO + b64 * stride_dob + h64 * stride_doh + row_q * stride_dom
        q_row, q_col = _tma_coords(b64 * stride_qb + h64 * stride_qh, row_q, stride_qm, USE_TMA)
        do_row, do_col = _tma_coords(b64 * stride_dob + h64 * stride_doh, row_q, stride_dom, USE_TMA)
        lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start
        delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start
        bias_base = Bias + b64 * stride_bb + h64 * stride_bh
        dq_base = DQAcc + b64 * stride_dqb + h64 * stride_dqh + row_q * stride_dqm
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, QDesc, DODesc, q_row, q_col, do_row, do_col, lse_base, delta_base,
            bias_base, dq_base, stride_qm, stride_dom, stride_dqm, stride_bm, stride_bn, offs_n, offs_d, seqlen_q,
            seqlen_k, diag, window_left, window_right, scale, softcap, key, threshold, drop_scale, lo, full_lo, HEAD_DIM,
            HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, True, False, ATOMIC_DQ, PRECISION, BLOCK_M,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, QDesc, DODesc, q_row, q_col, do_row, do_col, lse_base, delta_base,
            bias_base, dq_base, stride_qm, stride_dom, stride_dqm, stride_bm, stride_bn, offs_n, offs_d, seqlen_q,
            seqlen_k, diag, window_left, window_right, scale, softcap, key, threshold, drop_scale, full_lo, full_hi, HEAD_DIM,
            HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, False, USE_TMA, ATOMIC_DQ, PRECISION, BLOCK_M,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, QDesc, DODesc, q_row, q_col, do_row, do_col, lse_base, delta_base,
            bias_base, dq_base, stride_qm, stride_dom, stride_dqm, stride_bm, stride_bn, offs_n, offs_d, seqlen_q,
            seqlen_k, diag, window_left, window_right, scale, softcap, key, threshold, drop_scale, full_hi, hi, HEAD_DIM,
            HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, True, False, ATOMIC_DQ, PRECISION, BLOCK_M,
        )  # fmt: skip

    dk_ptrs = DK + b64 * stride_dkb + hk64 * stride_dkh + (row_k + offs_n[:, None]) * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + hk64 * stride_dvh + (row_k + offs_n[:, None]) * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    k_desc,
    v_desc,
    k_row,
    k_col,
    v_row,
    v_col,
    bias_base,
    stride_kn,
    stride_vn,
    stride_bm,
    stride_bn,
    offs_m,
    offs_d,
    seqlen_q,
    seqlen_k,
    diag,
    window_left,
    window_right,
    scale,
    softcap,
    key,
    threshold,
    drop_scale,
    tile_lo,
    tile_hi,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    MASK: tl.constexpr,
    TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        if TMA:
            k_t = tl.trans(k_desc.load([k_row + tile * BLOCK_N, k_col]))
            v_t = tl.trans(v_desc.load([v_row + tile * BLOCK_N, v_col]))
        else:
            kv_mask = n_ok[None, :] & d_ok[:, None]
            k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)
        qk = tl.dot(q, k_t, input_precision=PRECISION)
        s, t = _scores(
            qk, offs_m[:, None], offs_n[None, :], bias_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
            diag, window_left, window_right, scale, softcap, HAS_BIAS, HAS_SOFTCAP, MASK,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _keep(offs_m[:, None], offs_n[None, :], seqlen_k, key, threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    return dq


@_tuned("dq")
@triton.jit(do_not_specialize=_SHAPE_INTS + ["threshold", "seed_lo", "seed_hi"])
def _bwd_dq_kernel(
    Q,
    K,
    V,
    Bias,
    DO,
    Lse,
    Delta,
    DQ,
    CuQ,
    CuK,
    KDesc,
    VDesc,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_lb,
    stride_lh,
    H,
    N_BH,
    GROUP,
    seqlen_q,
    seqlen_k,
    scale,
    softcap,
    diag,
    window_left,
    window_right,
    threshold,
    drop_scale,
    seed_lo,
    seed_hi,
    SQ_BUCKET,
    SK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Query tiles in reverse: under a causal mask the last tiles see the most keys, and
    # starting them first leaves the short ones for the tail of the launch. Tiles of one head
    # stay adjacent in launch order, so its K/V are read from L2 while they run.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = _bh_index()
    if pid_bh >= N_BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    q_start, row_q, row_k, seqlen_q, seqlen_k, diag = _sequence(
        CuQ, CuK, b, seqlen_q, seqlen_k, diag, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    q_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + (row_q + offs_m[:, None]) * stride_qm + offs_d[None, :]
    do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + (row_q + offs_m[:, None]) * stride_dom + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse = _lse_log2(Lse + b64 * stride_lb + h64 * stride_lh + q_start, offs_m, seqlen_q)
    delta = tl.load(Delta + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    key = 0
    if HAS_DROPOUT:
        key = _dropout_key(pid_bh, seed_lo, seed_hi)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + row_k * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + row_k * stride_vn
    k_row, k_col = _tma_coords(b64 * stride_kb + hk64 * stride_kh, row_k, stride_kn, USE_TMA)
    v_row, v_col = _tma_coords(b64 * stride_vb + hk64 * stride_vh, row_k, stride_vn, USE_TMA)
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, KDesc, VDesc, k_row, k_col, v_row, v_col, bias_base, stride_kn,
        stride_vn, stride_bm, stride_bn, offs_m, offs_d, seqlen_q, seqlen_k, diag, window_left, window_right,
        scale, softcap, key, threshold, drop_scale, lo, full_lo, HEAD_DIM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, True,
        False, PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, KDesc, VDesc, k_row, k_col, v_row, v_col, bias_base, stride_kn,
        stride_vn, stride_bm, stride_bn, offs_m, offs_d, seqlen_q, seqlen_k, diag, window_left, window_right,
        scale, softcap, key, threshold, drop_scale, full_lo, full_hi, HEAD_DIM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
        False, USE_TMA, PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, KDesc, VDesc, k_row, k_col, v_row, v_col, bias_base, stride_kn,
        stride_vn, stride_bm, stride_bn, offs_m, offs_d, seqlen_q, seqlen_k, diag, window_left, window_right,
        scale, softcap, key, threshold, drop_scale, full_hi, hi, HEAD_DIM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, True,
        False, PRECISION, BLOCK_N,
    )  # fmt: skip
    dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + (row_q + offs_m[:, None]) * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _int32_bits(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _dropout_args(dropout_p: float, seed: int) -> Tuple[int, float, int, int]:
    """(threshold, 1 / (1 - p), seed_lo, seed_hi) as the kernels take them (int32 bit patterns)."""
    if dropout_p <= 0.0:
        return 0, 1.0, 0, 0
    threshold = min(math.floor(dropout_p * 2**32), 2**32 - 1)
    # p = 1 drops everything; 0 instead of 1 / 0 gives out = 0 and zero gradients.
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return _int32_bits(threshold), drop_scale, _int32_bits(seed), _int32_bits(seed >> 32)


def _window(w: int, wide: int) -> int:
    # No window on a side = a window wider than any distance between two positions.
    return w if w >= 0 else wide


def _head_block(d: int) -> int:
    return max(16, _next_power_of_2(d))


def _blocks(kwargs: dict) -> dict:
    return {**kwargs, **_INTERPRET_BLOCKS} if INTERPRET else kwargs


def _precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 inputs get fp32 products (the contract); tf32 would cost ~1e-3 relative error.
    # Half-precision products are exact either way; None keeps the backend's default, which
    # every target accepts ("tf32" is not allowed on some AMD targets).
    return "ieee" if dtype == torch.float32 else None


def _bias_strides(bias: Optional[Tensor]) -> Tuple[int, int, int, int]:
    return (0, 0, 0, 0) if bias is None else tuple(bias.stride())


# ---------------------------------------------------------------------------------------------
# The Hopper path: TMA loads of the streamed tiles
# ---------------------------------------------------------------------------------------------
#
# On sm_90+ the interior tiles of each inner loop (K/V in the forward and dQ kernels, Q/dO in
# the dK/dV kernel; the forward's only when forced, see _FORWARD_TMA_IN_AUTO) are fetched by
# the Tensor Memory Accelerator through a host-side tensor descriptor: one instruction per
# tile instead of per-thread address arithmetic, and the tile lands in shared memory in the
# layout the wgmma instructions read. Edge tiles (partial or masked) keep the masked pointer
# loads, so a descriptor never reads outside the sequence, whatever the layout.
#
# A (B, H, S, D) operand with strides (sb, sh, ss, 1) is described as a 2-D matrix with rows
# of ss elements; (b, h) starts at row (b*sb + h*sh) // ss, column (b*sb + h*sh) % ss. That
# covers the contiguous (B, H, S, D) layout (column 0), the (B, S, H, D) transpose and the
# slices of a packed QKV projection (column h*D), and the packed varlen layout. The path is
# taken when every (b, h) block of D columns fits inside a row, D is a power of two (the tile
# is exactly one head), and the TMA alignment rules hold (16-byte base and row stride).

def _tma_descriptor(x: Tensor, strides: Tuple[int, int, int], n_b: int, n_h: int, n_rows: int, block: int):
    """The descriptor of x as _tma_coords addresses it, or None when the layout does not allow
    one. n_b, n_h: the batch entries and heads addressed; n_rows: rows per head (Sq or Sk, or
    the packed total for varlen, whose batch stride is 0)."""
    sb, sh, ss = strides
    d = x.shape[-1]
    es = x.element_size()
    if d != _head_block(d) or ss < d or (ss * es) % 16 or x.data_ptr() % 16:
        return None
    if n_b > 1 and sb % ss:
        return None
    if any((h * sh) % ss + d > ss for h in range(n_h)):
        return None
    rows = ((n_b - 1) * sb + (n_h - 1) * sh) // ss + n_rows
    if rows >= 2**31:  # TMA coordinates are int32
        return None
    return TensorDescriptor(x, [rows, ss], [ss, 1], [block, d])


# Which launches take the path under FASTATTN_TRITON_TMA=auto: the backward's two kernels, not
# the forward, which streams K/V through pointer loads there. Side by side on an H200
# (benchmarks/results/gpu-h200-2026-11-29-2140, head dim 128, seq 4096, bf16, autotuned) the
# forward ran at 448 TFLOP/s with TMA and 464 with pointer loads, the backward (fwd+bwd - fwd)
# at 393 and 361; the sessions around it agree on the forward (469 before the path existed,
# 451 with it). FASTATTN_TRITON_TMA=1 puts the forward on it too (gpu_bench's "TMA forward" row).
_FORWARD_TMA_IN_AUTO = False


def _tma_descriptors(operands, n_b: int, block: str, auto: bool = True):
    """Descriptors for every (tensor, strides, heads, rows) of operands, or None unless all
    of them qualify (``auto``: see TmaSwitch.enabled)."""
    if not TMA.enabled(operands[0][0], auto):
        return None
    rows = _INTERPRET_BLOCKS[block] if INTERPRET else 64  # the autotuner's pre_hook sets it
    descs = tuple(_tma_descriptor(x, st, n_b, n_h, n_rows, rows) for x, st, n_h, n_rows in operands)
    return None if any(desc is None for desc in descs) else descs


def _forward(q, k, v, bias, out, lse, cu_q, cu_k, qs, ks, vs, os_, ls, batch, n_heads, n_kv, sq, sk,
             scale, diag, wl, wr, softcap, dropout_p, seed, varlen):  # fmt: skip
    d = q.shape[-1]
    threshold, drop_scale, seed_lo, seed_hi = _dropout_args(dropout_p, seed)
    wide = 2 * (sq + sk) + abs(diag) + 1
    grid = lambda meta: (_cdiv(sq, meta["BLOCK_M"]), *_bh_grid(batch * n_heads))  # noqa: E731
    kv_rows = k.shape[0] if varlen else sk
    descs = _tma_descriptors(((k, ks, n_kv, kv_rows), (v, vs, n_kv, kv_rows)), batch, "BLOCK_N",
                             _FORWARD_TMA_IN_AUTO)

    def launch(kv, use_tma):
        _fwd_kernel[grid](
            q, k, v, bias if bias is not None else q, out, lse,
            cu_q if cu_q is not None else lse, cu_k if cu_k is not None else lse, *kv,
            *qs, *ks, *vs, *os_, *_bias_strides(bias), *ls,
            n_heads, batch * n_heads, n_heads // n_kv, sq, sk, float(scale), float(softcap), diag,
            _window(wl, wide), _window(wr, wide), threshold, drop_scale, seed_lo, seed_hi,
            _next_power_of_2(sq), _next_power_of_2(sk),
            **_blocks(dict(
                HEAD_DIM=d, BLOCK_D=_head_block(d), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
                HAS_DROPOUT=dropout_p > 0, IS_VARLEN=varlen, USE_TMA=use_tma, PRECISION=_precision(q.dtype),
            )),
        )  # fmt: skip

    with _on_device(q):
        TMA.launch(launch, descs, (k, v))


def _backward(dout, q, k, v, out, lse, bias, dq, dk, dv, cu_q, cu_k, qs, ks, vs, dos, os_, dqs, dks, dvs, ls,
              batch, n_heads, n_kv, sq, sk, scale, diag, wl, wr, softcap, dropout_p, seed, varlen):  # fmt: skip
    d = q.shape[-1]
    block_d = _head_block(d)
    threshold, drop_scale, seed_lo, seed_hi = _dropout_args(dropout_p, seed)
    wide = 2 * (sq + sk) + abs(diag) + 1
    delta = torch.empty_like(lse)
    cu_q_arg = cu_q if cu_q is not None else lse
    cu_k_arg = cu_k if cu_k is not None else lse
    bias_arg = bias if bias is not None else q
    flags = dict(
        HEAD_DIM=d, BLOCK_D=block_d, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
        HAS_DROPOUT=dropout_p > 0, IS_VARLEN=varlen, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    # FASTATTN_TRITON_DQ=atomic: the dK/dV programs add dQ into an fp32 buffer shaped and
    # strided like dq, and the dQ launch is skipped. Otherwise dq itself stands in (never read
    # there; the autotuner's reset may zero it before the dQ kernel writes it whole).
    atomic = _atomic_dq()
    dq_acc = (torch.empty_strided(dq.shape, dq.stride(), dtype=torch.float32, device=dq.device).zero_()
              if atomic else dq)
    q_rows, kv_rows = (q.shape[0], k.shape[0]) if varlen else (sq, sk)
    q_descs = _tma_descriptors(((q, qs, n_heads, q_rows), (dout, dos, n_heads, q_rows)), batch, "BLOCK_M")
    common = (
        float(scale), float(softcap), diag, _window(wl, wide), _window(wr, wide), threshold, drop_scale,
        seed_lo, seed_hi, _next_power_of_2(sq), _next_power_of_2(sk),
    )  # fmt: skip
    # delta is a pure streaming pass (2 * Sq * D reads, Sq writes); 64 rows per program keeps
    # the D = 256 tile at 64 fp32 registers per thread.
    pre_block = 16 if INTERPRET else 64
    with _on_device(q):
        _bwd_preprocess[(_cdiv(sq, pre_block), *_bh_grid(batch * n_heads))](
            out, dout, delta, cu_q_arg, *os_, *dos, *ls, n_heads, batch * n_heads, sq,
            HEAD_DIM=d, BLOCK_D=block_d, IS_VARLEN=varlen, BLOCK_M=pre_block,
        )  # fmt: skip
        grid_kv = lambda meta: (_cdiv(sk, meta["BLOCK_N"]), *_bh_grid(batch * n_kv))  # noqa: E731
        TMA.launch(lambda descs, use_tma: _bwd_dkdv_kernel[grid_kv](
            q, k, v, bias_arg, dout, lse, delta, dk, dv, dq_acc, cu_q_arg, cu_k_arg, *descs,
            *qs, *ks, *vs, *dos, *dks, *dvs, *(dqs if atomic else (0, 0, 0)), *_bias_strides(bias), *ls,
            n_heads, n_kv, batch * n_kv, n_heads // n_kv, sq, sk, *common,
            **_blocks(dict(flags, USE_TMA=use_tma, ATOMIC_DQ=atomic)),
        ), q_descs, (q, dout), (dq_acc,) if atomic else ())  # fmt: skip
        if atomic:
            dq.copy_(dq_acc.mul_(scale))
            return
        kv_descs = _tma_descriptors(((k, ks, n_kv, kv_rows), (v, vs, n_kv, kv_rows)), batch, "BLOCK_N")
        grid_q = lambda meta: (_cdiv(sq, meta["BLOCK_M"]), *_bh_grid(batch * n_heads))  # noqa: E731
        TMA.launch(lambda descs, use_tma: _bwd_dq_kernel[grid_q](
            q, k, v, bias_arg, dout, lse, delta, dq, cu_q_arg, cu_k_arg, *descs,
            *qs, *ks, *vs, *dos, *dqs, *_bias_strides(bias), *ls,
            n_heads, batch * n_heads, n_heads // n_kv, sq, sk, *common,
            **_blocks(dict(flags, USE_TMA=use_tma)),
        ), kv_descs, (k, v))  # fmt: skip


def _bhs(x: Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _packed(x: Tensor) -> Tuple[int, int, int]:
    # (total, H, D) seen as batch stride 0 (the kernel adds the sequence's start row), head, row.
    return 0, x.stride(1), x.stride(0)


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    scale: float,
    diag: int,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
) -> Tuple[Tensor, Tensor]:
    """``(out, lse)``: out (B, H, Sq, D) in q's dtype, stored as (B, Sq, H, D); lse (B, H, Sq)
    float32."""
    batch, n_heads, sq, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    assert n_heads % n_kv == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    out = _empty_bshd(q, q.shape)
    lse = torch.empty(batch, n_heads, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    if bias is not None:
        bias = bias.expand(batch, n_heads, sq, sk)
    _forward(q, k, v, bias, out, lse, None, None, _bhs(q), _bhs(k), _bhs(v), _bhs(out), lse.stride()[:2],
             batch, n_heads, n_kv, sq, sk, scale, diag, window_left, window_right, softcap, dropout_p, seed,
             False)  # fmt: skip
    return out, lse


def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Optional[Tensor],
    scale: float,
    diag: int,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the input dtype, stored as (B, S, H, D) like out; deterministic
    (unless FASTATTN_TRITON_DQ is "atomic")."""
    batch, n_heads, sq, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    assert out.stride(-1) == 1 and dout.stride(-1) == 1
    dq, dk, dv = _empty_bshd(q, q.shape), _empty_bshd(k, k.shape), _empty_bshd(v, v.shape)
    if batch * n_heads * d == 0 or sq == 0 or sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    if bias is not None:
        bias = bias.expand(batch, n_heads, sq, sk)
    _backward(dout, q, k, v, out, lse, bias, dq, dk, dv, None, None, _bhs(q), _bhs(k), _bhs(v), _bhs(dout),
              _bhs(out), _bhs(dq), _bhs(dk), _bhs(dv), lse.stride()[:2], batch, n_heads, n_kv, sq, sk, scale,
              diag, window_left, window_right, softcap, dropout_p, seed, False)  # fmt: skip
    return dq, dk, dv


def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> Tuple[Tensor, Tensor]:
    """``(out, lse)``: out (total_q, H, D) in q's dtype, lse (H, total_q) float32."""
    total_q, n_heads, d = q.shape
    n_kv = k.shape[1]
    n_seq = cu_seqlens_q.numel() - 1
    out = torch.empty(total_q, n_heads, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(n_heads, total_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n_seq <= 0 or max_seqlen_q <= 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    # Causal is bottom-right per sequence: the kernel sets diag = len_k - len_q itself.
    _forward(q, k, v, None, out, lse, cu_seqlens_q, cu_seqlens_k, _packed(q), _packed(k), _packed(v),
             _packed(out), (0, lse.stride(0)), n_seq, n_heads, n_kv, max_seqlen_q, max_seqlen_k, scale,
             max_seqlen_k, -1, 0 if causal else -1, 0.0, 0.0, 0, True)  # fmt: skip
    return out, lse


def varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` shaped like q, k, v (packed), contiguous, in the input dtype."""
    total_q, n_heads, d = q.shape
    n_kv = k.shape[1]
    n_seq = cu_seqlens_q.numel() - 1
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if total_q == 0 or k.shape[0] == 0 or n_seq <= 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0 or n_heads * d == 0:
        return dq, dk, dv
    lse = lse.contiguous()
    _backward(dout, q, k, v, out, lse, None, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, _packed(q), _packed(k),
              _packed(v), _packed(dout), _packed(out), _packed(dq), _packed(dk), _packed(dv), (0, lse.stride(0)),
              n_seq, n_heads, n_kv, max_seqlen_q, max_seqlen_k, scale, max_seqlen_k, -1, 0 if causal else -1,
              0.0, 0.0, 0, True)  # fmt: skip
    return dq, dk, dv
