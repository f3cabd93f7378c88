"""Triton GEMMs with the FFN's elementwise work fused into their epilogues.

The math contract (activations, their derivatives, MLP and SwiGLU forward/backward) is the
shared FFN spec; reference.py spells it out in PyTorch. Every kernel computes one tile family
of C = A B^T (A (M, K), B (N, K), any strides), fp32 accumulators, and differs only in what
its epilogue reads and writes:

    kernel / launcher        GEMM                 epilogue reads      epilogue writes
    linear_act               h = x W1^T (+ b1)    b1 (N)              h, a = act(h)
    matmul (plain)           c = a b^T            -                   c
    matmul_act_grad          da = dout W2         h                   dh = da act'(h), a = act(h)
    matmul_glu_grad          dm = dout Wd         g, u                dg = dm u act'(g),
                                                                      du = dm act(g), m = act(g) u
    linear_glu (2 accums)    g = x Wg^T,          -                   g, u, m = act(g) u
                             u = x Wu^T

Why fuse: with T x F activations of e bytes, an unfused MLP forward writes h (T F e) from
the GEMM, then an elementwise pass reads h and writes a (2 T F e more); linear_act writes h
and a straight from registers, saving the T F e re-read and a launch. In the backward the
separate pass would re-read da and h and write dh and a (4 T F e); matmul_act_grad never
writes da, so it moves 3 T F e (h in, dh and a out) instead of 5 T F e. For SwiGLU forward
the shared x tile is loaded once for both gate and up (the A operand traffic halves against
two GEMMs), and m is produced without re-reading g and u (3 T F e written instead of
2 T F e written + 2 T F e read + T F e written). matmul_glu_grad moves 5 T F e (g, u in;
dg, du, m out) instead of 8 T F e (dm written and read back, plus the same 5).

a and m are computed from the *rounded* h (resp. g, u) that is stored, so the forward's a
and the backward's recomputed a are bitwise the same values (the saved tensor is what the
backward sees).

Tiling: a 1-D grid of cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs, ordered in groups of
GROUP_M tile rows: consecutive programs share the same B column tiles and a small set of A
row tiles, so while a group runs its operands stay in L2 (for 16384 x 4096 -> 11008 bf16,
one group of 8 x 128 rows reads 8 MB of A and cycles through B, instead of every program
streaming all of B from HBM). The K loop is software-pipelined by the compiler (num_stages
shared-memory buffers; wgmma on Hopper, mma on Ampere). Rows past M and columns past N are
clamped with a modulo (they read valid memory and are never stored), so the loop body only
masks K, and not even that when K is a multiple of BLOCK_K (EVEN_K).

Hopper (sm_90+, USE_TMA): the K loop's A and B tiles arrive through TMA tensor descriptors
instead (see _operand_desc), which zero-fill past M, N and K, so neither the row wrap nor the
K mask is needed there.
"""

# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into
# strings that Triton 3.0's interpreter does not recognise as constexpr.
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_common import INTERPRET, CachedAutotune, TensorDescriptor, TmaSwitch
from .._triton_common import cdiv as _cdiv, next_power_of_2 as _next_power_of_2
from .._triton_common import on_device as _on_device
from .._triton_common import tanh as _tanh

# FASTATTN_AUTOTUNE=0: the first config the pruning keeps, no timing (test runs; see
# fastattn/ops/attention/triton.py).
AUTOTUNE = os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"

# FASTATTN_TRITON_TMA: the Hopper path (_triton_common.TmaSwitch).
TMA = TmaSwitch("FFN")

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter runs every program as numpy calls: 16 is the smallest tile tl.dot accepts,
# and the test shapes (3, 40) -> 97 span several tiles in each of M, N and K.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------


def _block_shapes(nargs):
    # A host-side descriptor carries its tile shape, which must be the launched config's: the
    # autotuner calls this before each config it times and before the chosen one runs. A
    # descriptor over A^T (A_T) holds (BLOCK_K, BLOCK_M) tiles, else (BLOCK_M, BLOCK_K); the
    # same for B with BLOCK_N.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    for name, rows, transposed in (("ADesc", bm, "A_T"), ("BDesc", bn, "B_T"), ("BGDesc", bn, "B_T"),
                                   ("BUDesc", bn, "B_T")):
        desc = nargs.get(name)
        if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
            desc.block_shape = [bk, rows] if nargs[transposed] else [rows, bk]


def _cfg(bm, bn, bk, warps, stages):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=_block_shapes)


# Half precision (bf16/fp16), one accumulator. 128 x 256 x 64 with 8 warps (two warpgroups,
# 128 fp32 accumulator registers per thread) and 3 stages of 48 KB shared memory is the usual
# Hopper sweet spot at LLM sizes; 128 x 128 variants cover ragged N and the backward kernels
# whose epilogue holds extra tiles (h, or g and u) next to the accumulator; 64-wide tiles are
# for few tokens, where 128-row tiles would be mostly masked.
_HALF_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]
# fp32 with "ieee" products runs on CUDA cores, not tensor cores; 32-deep K tiles keep the
# 4-byte operands of a stage at the half configs' shared-memory footprint.
_FP32_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 64, 32, 4, 3),
    _cfg(64, 64, 32, 4, 4),
]
# Two accumulators (gate, up): 128 x 256 would need 256 accumulator registers per thread, so
# the widest tile is 128 x 128 (2 x 64 registers per thread at 8 warps) with the x tile shared.
_GLU_HALF_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]
_GLU_FP32_CONFIGS = [
    _cfg(128, 64, 32, 8, 3),
    _cfg(64, 64, 32, 4, 3),
]


def _prune(configs, named_args, **kwargs):
    # Tiles much taller / wider than the (power-of-two bucketed) problem only add masked work;
    # the dtype picks the K depth family. At least one config always survives.
    args = {**named_args, **kwargs}
    m, n = args["M_BUCKET"], args["N_BUCKET"]
    fp32 = args["PRECISION"] == "ieee"
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bk == 32) != fp32:
            continue
        if (m <= 64 and bm > 64) or (n <= 64 and bn > 64):
            continue
        kept.append(c)
    kept = kept or [_cfg(64, 64, 32 if fp32 else 64, 4, 3)]
    return kept if AUTOTUNE else kept[:1]


_TUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "EPI", "HAS_BIAS", "USE_TMA", "A_T", "B_T"]


def _tuned(configs):
    def wrap(kernel):
        if INTERPRET:
            return kernel
        return CachedAutotune(
            triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)
        )

    return wrap


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


# ---------------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out)
# ---------------------------------------------------------------------------------------------
#   gelu       y = x Phi(x),                       y' = Phi(x) + x phi(x)
#              Phi(x) = (1 + erf(x / sqrt 2)) / 2,  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
#   gelu_tanh  y = x (1 + t) / 2,  t = tanh(c (x + k x^3)),  c = sqrt(2 / pi), k = 0.044715
#              y' = (1 + t) / 2 + x (1 - t^2) c (1 + 3 k x^2) / 2
#   relu       y = max(x, 0),                      y' = [x > 0]   (0 at 0, as torch)
#   relu2      y = max(x, 0)^2,                    y' = 2 max(x, 0)
#   silu       y = x s,  s = 1 / (1 + exp(-x)),    y' = s (1 + x (1 - s))


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for x < -88: 1 / inf = 0, the right limit.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        y = 0.5 * x * (1.0 + t)
    elif ACT == "relu":
        y = tl.where(x < 0.0, 0.0, x)     # not tl.maximum, which drops NaN (torch keeps it)
    elif ACT == "relu2":
        r = tl.where(x < 0.0, 0.0, x)
        y = r * r
    else:  # silu
        y = x * _sigmoid(x)
    return y


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)), sharing the transcendental between the two."""
    if ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        y = x * cdf
        dy = cdf + x * pdf
    elif ACT == "gelu_tanh":
        x2 = x * x
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x2)
    elif ACT == "relu":
        y = tl.where(x < 0.0, 0.0, x)
        dy = tl.where(x <= 0.0, 0.0, 1.0)     # 0 at 0, 1 at NaN (torch's threshold_backward)
    elif ACT == "relu2":
        r = tl.where(x < 0.0, 0.0, x)
        y = r * r
        dy = 2.0 * r
    else:  # silu
        s = _sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    return y, dy


# ---------------------------------------------------------------------------------------------
# Shared tile helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: programs walk GROUP_M tile rows down a tile column before moving right,
    # so a group's A rows and B columns are reused from L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _operand_rows(pid, size, BLOCK: tl.constexpr):
    # Rows past the end wrap to valid rows (their results are never stored), so operand loads
    # need no row mask; int64 so that offset * stride cannot overflow past 2^31 elements.
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return (offs % size).to(tl.int64)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tma_a(desc, pid_m, k, A_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # The (BLOCK_M, BLOCK_K) A tile at K step k, from a descriptor over A or over A^T.
    if A_T:
        a = tl.trans(desc.load([k * BLOCK_K, pid_m * BLOCK_M]))
    else:
        a = desc.load([pid_m * BLOCK_M, k * BLOCK_K])
    return a


@triton.jit
def _tma_b(desc, pid_n, k, B_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The (BLOCK_K, BLOCK_N) tile of B^T at K step k, from a descriptor over B or over B^T.
    if B_T:
        b = desc.load([k * BLOCK_K, pid_n * BLOCK_N])
    else:
        b = tl.trans(desc.load([pid_n * BLOCK_N, k * BLOCK_K]))
    return b


# The autotuning buckets (next powers of two of M, N, K) are keys of the autotuner, never read by
# the kernels: as specialised ints (== 1, divisible by 16) they would compile a kernel again for
# token counts below 16. M, N and K themselves keep their specialisation: _operand_rows wraps
# rows with % M (% N), and for an operand contiguous along its rows (the .t() views of the
# weight-gradient matmuls) only a size divisible by 16 lets those loads vectorise; K bounds the
# masks along the contiguous dimension of the others. So the forward and data-gradient matmuls
# compile once per class of the token count (== 1, a multiple of 16, other), the weight-gradient
# ones once per class of it as K (and EVEN_K).
_TUNE_INTS = ["M_BUCKET", "N_BUCKET", "K_BUCKET"]

# Width of the column slices the epilogues work on (_gemm_kernel, _glu_kernel). ptxas for
# sm_90a, 8 warps: with 64-column slices the SwiGLU gradient epilogue still spilled ~1 KB at
# 256 x 128; with 32 or 16 no config spills, and 16 needs the fewest registers.
SLICE_N = tl.constexpr(16)


# ---------------------------------------------------------------------------------------------
# One accumulator: plain matmul, linear + activation, matmul + activation gradient, GLU grad
# ---------------------------------------------------------------------------------------------


@_tuned(_HALF_CONFIGS + _FP32_CONFIGS)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit(do_not_specialize=_TUNE_INTS)
def _gemm_kernel(
    A,
    B,
    Bias,
    E1,
    E2,
    O1,
    O2,
    O3,
    ADesc,
    BDesc,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_e1m,
    stride_e1n,
    stride_e2m,
    stride_e2n,
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    EPI: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc = A B^T (+ Bias) on one BLOCK_M x BLOCK_N tile, then by EPI:
    "none"      O1 = acc                                         (plain matmul / linear)
    "act"       O1 = acc, O2 = act(O1)                           (linear_act)
    "act_grad"  E1 = h:      O1 = acc act'(h), O2 = act(h)       (matmul_act_grad)
    "glu_grad"  E1 = g, E2 = u:  O1 = acc u act'(g), O2 = acc act(g), O3 = act(g) u
    Outputs O* are contiguous (M, N); E* have their own strides.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_a = _operand_rows(pid_m, M, BLOCK_M)
    rows_b = _operand_rows(pid_n, N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + rows_b[None, :] * stride_bn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if USE_TMA:
            a = _tma_a(ADesc, pid_m, k, A_T, BLOCK_M, BLOCK_K)
            b = _tma_b(BDesc, pid_n, k, B_T, BLOCK_N, BLOCK_K)
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(a, b, acc, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    if HAS_BIAS:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # The epilogues run on column slices of the product: at 128 x 256 with 8 warps the fp32
    # accumulator alone is 128 registers per thread, and on the whole tile the GELU-gradient
    # epilogue (act'(h) beside it) spilled 1.7 KB per thread, SwiGLU's (g and u) 5.4 KB (ptxas
    # for sm_90a; before and after in benchmarks/results/triton-registers-sm90a-2026-11-30.txt).
    # "none" and "act" round the product to the output dtype first (the stored h is that
    # rounding anyway), halving its registers; the gradient epilogues keep it in fp32.
    if EPI == "none" or EPI == "act":
        p = acc.to(O1.dtype.element_ty)
    else:
        p = acc
    if EPI == "none" or BLOCK_N <= SLICE_N:
        _gemm_epilogue(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n,
                       stride_e2m, stride_e2n, EPI, ACT, BLOCK_N)
    elif BLOCK_N <= 2 * SLICE_N:
        _epilogue_2(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n,
                    stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N)
    elif BLOCK_N <= 4 * SLICE_N:
        _epilogue_4(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n,
                    stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N)
    elif BLOCK_N <= 8 * SLICE_N:
        _epilogue_8(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n,
                    stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N)
    else:
        _epilogue_16(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n,
                     stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _epilogue_2(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                stride_e2n, EPI: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    p0, p1 = _halves(p, BLOCK_M, BLOCK_N)
    _gemm_epilogue(p0, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                   stride_e2n, EPI, ACT, BLOCK_N // 2)
    _gemm_epilogue(p1, offs_m, n0 + BLOCK_N // 2, E1, E2, O1, O2, O3, M, N, stride_e1m,
                   stride_e1n, stride_e2m, stride_e2n, EPI, ACT, BLOCK_N // 2)


@triton.jit
def _epilogue_4(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                stride_e2n, EPI: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    p0, p1 = _halves(p, BLOCK_M, BLOCK_N)
    _epilogue_2(p0, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N // 2)
    _epilogue_2(p1, offs_m, n0 + BLOCK_N // 2, E1, E2, O1, O2, O3, M, N, stride_e1m,
                stride_e1n, stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N // 2)


@triton.jit
def _epilogue_8(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                stride_e2n, EPI: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    p0, p1 = _halves(p, BLOCK_M, BLOCK_N)
    _epilogue_4(p0, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N // 2)
    _epilogue_4(p1, offs_m, n0 + BLOCK_N // 2, E1, E2, O1, O2, O3, M, N, stride_e1m,
                stride_e1n, stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N // 2)


@triton.jit
def _epilogue_16(p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                 stride_e2n, EPI: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    p0, p1 = _halves(p, BLOCK_M, BLOCK_N)
    _epilogue_8(p0, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m,
                stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N // 2)
    _epilogue_8(p1, offs_m, n0 + BLOCK_N // 2, E1, E2, O1, O2, O3, M, N, stride_e1m,
                stride_e1n, stride_e2m, stride_e2n, EPI, ACT, BLOCK_M, BLOCK_N // 2)


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A (BLOCK_M, BLOCK_N) tile's column halves [0, BLOCK_N / 2) and [BLOCK_N / 2, BLOCK_N).
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _gemm_epilogue(
    p, offs_m, n0, E1, E2, O1, O2, O3, M, N, stride_e1m, stride_e1n, stride_e2m, stride_e2n,
    EPI: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # _gemm_kernel's epilogue on the product's columns [n0, n0 + BLOCK_N), p in O1's dtype.
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    om = offs_m.to(tl.int64)[:, None]
    on = offs_n.to(tl.int64)[None, :]
    out = om * N + on
    dtype = O1.dtype.element_ty
    if EPI == "none":
        tl.store(O1 + out, p, mask=mask)
    elif EPI == "act":
        tl.store(O1 + out, p, mask=mask)
        tl.store(O2 + out, _act(p.to(tl.float32), ACT).to(dtype), mask=mask)
    elif EPI == "act_grad":
        h = tl.load(E1 + om * stride_e1m + on * stride_e1n, mask=mask, other=0.0).to(tl.float32)
        a, da_dh = _act_and_grad(h, ACT)
        tl.store(O1 + out, (p.to(tl.float32) * da_dh).to(dtype), mask=mask)
        tl.store(O2 + out, a.to(dtype), mask=mask)
    else:  # "glu_grad"
        g = tl.load(E1 + om * stride_e1m + on * stride_e1n, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(E2 + om * stride_e2m + on * stride_e2n, mask=mask, other=0.0).to(tl.float32)
        ag, dag = _act_and_grad(g, ACT)
        d = p.to(tl.float32)
        tl.store(O1 + out, (d * u * dag).to(dtype), mask=mask)
        tl.store(O2 + out, (d * ag).to(dtype), mask=mask)
        tl.store(O3 + out, (ag * u).to(dtype), mask=mask)


# ---------------------------------------------------------------------------------------------
# Two accumulators: gate and up projections sharing the x tile
# ---------------------------------------------------------------------------------------------


@_tuned(_GLU_HALF_CONFIGS + _GLU_FP32_CONFIGS)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit(do_not_specialize=_TUNE_INTS)
def _glu_kernel(
    A,
    BG,
    BU,
    G,
    U,
    Mout,
    ADesc,
    BGDesc,
    BUDesc,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_gn,
    stride_gk,
    stride_un,
    stride_uk,
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    EPI: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """g = A BG^T, u = A BU^T on one tile (one A load feeds both dots); writes g, u and
    m = act(g) u, all contiguous (M, N). EPI / HAS_BIAS only complete the autotune key."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_a = _operand_rows(pid_m, M, BLOCK_M)
    rows_b = _operand_rows(pid_n, N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    g_ptrs = BG + offs_k[:, None] * stride_gk + rows_b[None, :] * stride_gn
    u_ptrs = BU + offs_k[:, None] * stride_uk + rows_b[None, :] * stride_un

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if USE_TMA:
            a = _tma_a(ADesc, pid_m, k, A_T, BLOCK_M, BLOCK_K)
            bg = _tma_b(BGDesc, pid_n, k, B_T, BLOCK_N, BLOCK_K)
            bu = _tma_b(BUDesc, pid_n, k, B_T, BLOCK_N, BLOCK_K)
        elif EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(g_ptrs)
            bu = tl.load(u_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            bg = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            bu = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = _dot(a, bg, acc_g, PRECISION)
        acc_u = _dot(a, bu, acc_u, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        g_ptrs += BLOCK_K * stride_gk
        u_ptrs += BLOCK_K * stride_uk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    g = acc_g.to(G.dtype.element_ty)
    u = acc_u.to(G.dtype.element_ty)
    # On column slices, as _gemm_kernel's epilogues (it did not spill on the whole tile; the
    # slices take 157 registers per thread instead of 181 at 128 x 128 with 8 warps).
    if BLOCK_N <= SLICE_N:
        _glu_epilogue(g, u, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_N)
    elif BLOCK_N <= 2 * SLICE_N:
        _glu_epilogue_2(g, u, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N)
    elif BLOCK_N <= 4 * SLICE_N:
        _glu_epilogue_4(g, u, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N)
    else:
        _glu_epilogue_8(g, u, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _glu_epilogue(g, u, offs_m, n0, G, U, Mout, M, N, ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    # _glu_kernel's epilogue on columns [n0, n0 + BLOCK_N): stores g, u and act(g) u.
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = offs_m.to(tl.int64)[:, None] * N + offs_n.to(tl.int64)[None, :]
    tl.store(G + out, g, mask=mask)
    tl.store(U + out, u, mask=mask)
    m = _act(g.to(tl.float32), ACT) * u.to(tl.float32)
    tl.store(Mout + out, m.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _glu_epilogue_2(g, u, offs_m, n0, G, U, Mout, M, N, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    g0, g1 = _halves(g, BLOCK_M, BLOCK_N)
    u0, u1 = _halves(u, BLOCK_M, BLOCK_N)
    _glu_epilogue(g0, u0, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_N // 2)
    _glu_epilogue(g1, u1, offs_m, n0 + BLOCK_N // 2, G, U, Mout, M, N, ACT, BLOCK_N // 2)


@triton.jit
def _glu_epilogue_4(g, u, offs_m, n0, G, U, Mout, M, N, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    g0, g1 = _halves(g, BLOCK_M, BLOCK_N)
    u0, u1 = _halves(u, BLOCK_M, BLOCK_N)
    _glu_epilogue_2(g0, u0, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N // 2)
    _glu_epilogue_2(g1, u1, offs_m, n0 + BLOCK_N // 2, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N // 2)


@triton.jit
def _glu_epilogue_8(g, u, offs_m, n0, G, U, Mout, M, N, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    g0, g1 = _halves(g, BLOCK_M, BLOCK_N)
    u0, u1 = _halves(u, BLOCK_M, BLOCK_N)
    _glu_epilogue_4(g0, u0, offs_m, n0, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N // 2)
    _glu_epilogue_4(g1, u1, offs_m, n0 + BLOCK_N // 2, G, U, Mout, M, N, ACT, BLOCK_M, BLOCK_N // 2)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 inputs get fp32 products (tf32 would cost ~1e-3 relative error against an fp32
    # reference); half-precision products are exact either way and None keeps the default.
    return "ieee" if dtype == torch.float32 else None


def _config(kwargs: dict) -> dict:
    return {**kwargs, **_INTERPRET_CONFIG} if INTERPRET else kwargs


def _check_activation(activation: Optional[str], allow_none: bool) -> None:
    if activation is None and allow_none:
        return
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


def _check_2d(name: str, t: Tensor, dtype: torch.dtype, shape: Optional[Tuple[int, int]] = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} like the first input, got {t.dtype}")
    if dtype not in _DTYPES:
        raise ValueError(f"the triton FFN kernels take float32, float16 or bfloat16, got {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _operand_desc(t: Tensor):
    """(descriptor, over_transpose) for a 2-D GEMM operand t (rows, K), or None: over t itself
    when its K dimension is contiguous, over t^T when its rows are (a .t() view), provided the
    TMA alignment rules hold (16-byte base and other stride) and the other stride steps past a
    whole line (no expanded or overlapping rows). The tile shape is set at launch."""
    rows, k = t.shape
    es = t.element_size()
    if TensorDescriptor is None or t.data_ptr() % 16 or rows == 0 or k == 0:
        return None
    if t.stride(1) == 1 and t.stride(0) >= k and (t.stride(0) * es) % 16 == 0:
        return TensorDescriptor(t, [rows, k], [t.stride(0), 1], [16, 16]), False
    if t.stride(0) == 1 and t.stride(1) >= rows and (t.stride(1) * es) % 16 == 0:
        return TensorDescriptor(t, [k, rows], [t.stride(1), 1], [16, 16]), True
    return None


def _tma_plan(a: Tensor, bs: Tuple[Tensor, ...]):
    """(descriptors, A_T, B_T) for operand a and the B operands bs (which share one layout
    flag), or None for the pointer loads."""
    if not TMA.enabled(a):
        return None
    plans = [_operand_desc(t) for t in (a, *bs)]
    if any(p is None for p in plans) or len({p[1] for p in plans[1:]}) != 1:
        return None
    descs = tuple(p[0] for p in plans)
    if INTERPRET:  # no autotuner there to call _block_shapes
        _block_shapes({**_INTERPRET_CONFIG, "A_T": plans[0][1], "B_T": plans[1][1],
                       **dict(zip(("ADesc", "BDesc") if len(bs) == 1 else ("ADesc", "BGDesc", "BUDesc"), descs))})
    return descs, plans[0][1], plans[1][1]


def _buckets(m: int, n: int, k: int) -> Tuple[int, int, int]:
    return _next_power_of_2(max(m, 1)), _next_power_of_2(max(n, 1)), _next_power_of_2(max(k, 1))


def _gemm(a: Tensor, b: Tensor, epi: str, activation: Optional[str], bias: Optional[Tensor] = None,
          e1: Optional[Tensor] = None, e2: Optional[Tensor] = None, n_out: int = 1) -> Tuple[Tensor, ...]:  # fmt: skip
    """C = a @ b^T with a (M, K), b (N, K) of any strides; returns n_out fresh (M, N) tensors."""
    m, k = a.shape
    n = b.shape[0]
    outs = tuple(torch.empty((m, n), dtype=a.dtype, device=a.device) for _ in range(n_out))
    if m == 0 or n == 0:
        return outs
    o1 = outs[0]
    o2 = outs[1] if n_out > 1 else o1
    o3 = outs[2] if n_out > 2 else o1
    e1_arg = e1 if e1 is not None else o1
    e2_arg = e2 if e2 is not None else o1
    grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    plan = _tma_plan(a, (b,))

    def launch(operands, use_tma):
        _gemm_kernel[grid](
            a, b, bias if bias is not None else o1, e1_arg, e2_arg, o1, o2, o3, *operands, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            e1_arg.stride(0), e1_arg.stride(1), e2_arg.stride(0), e2_arg.stride(1),
            *_buckets(m, n, k),
            **_config(dict(EPI=epi, ACT=activation or "none", HAS_BIAS=bias is not None,
                           PRECISION=_precision(a.dtype), USE_TMA=use_tma,
                           A_T=use_tma and plan[1], B_T=use_tma and plan[2])),
        )  # fmt: skip

    with _on_device(a):
        TMA.launch(launch, plan and plan[0], (a, b))
    return outs


def linear_act(
    x: Tensor, w: Tensor, bias: Optional[Tensor], activation: Optional[str]
) -> Tuple[Tensor, Optional[Tensor]]:
    """h = x w^T + bias (T, F) and a = act(h) from one kernel; a is None when activation is None.

    x (T, D), w (F, D), bias (F,) or None; a is computed from h as stored (rounded).
    """
    _check_activation(activation, allow_none=True)
    _check_2d("x", x, x.dtype)
    _check_2d("w", w, x.dtype, (w.shape[0], x.shape[1]))
    if bias is not None:
        if bias.shape != (w.shape[0],) or bias.dtype != x.dtype:
            raise ValueError(f"bias must be ({w.shape[0]},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
        bias = bias.contiguous()
    if activation is None:
        (h,) = _gemm(x, w, "none", None, bias=bias)
        return h, None
    h, a = _gemm(x, w, "act", activation, bias=bias, n_out=2)
    return h, a


def matmul_act_grad(dout: Tensor, w2: Tensor, h: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    """da = dout w2 (dout (T, D), w2 (D, F)); returns dh = da act'(h) and a = act(h), (T, F)."""
    _check_activation(activation, allow_none=False)
    _check_2d("dout", dout, dout.dtype)
    _check_2d("w2", w2, dout.dtype, (dout.shape[1], w2.shape[1]))
    _check_2d("h", h, dout.dtype, (dout.shape[0], w2.shape[1]))
    dh, a = _gemm(dout, w2.t(), "act_grad", activation, e1=h, n_out=2)
    return dh, a


def matmul_glu_grad(
    dout: Tensor, w_down: Tensor, g: Tensor, u: Tensor, activation: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """dm = dout w_down (w_down (D, F)); returns dg = dm u act'(g), du = dm act(g), m = act(g) u."""
    _check_activation(activation, allow_none=False)
    _check_2d("dout", dout, dout.dtype)
    _check_2d("w_down", w_down, dout.dtype, (dout.shape[1], w_down.shape[1]))
    _check_2d("g", g, dout.dtype, (dout.shape[0], w_down.shape[1]))
    _check_2d("u", u, dout.dtype, tuple(g.shape))
    dg, du, m = _gemm(dout, w_down.t(), "glu_grad", activation, e1=g, e2=u, n_out=3)
    return dg, du, m


def matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """c = a @ b_t^T (a (M, K), b_t (N, K), any strides), contiguous (M, N) in a's dtype.

    For the weight and input gradients: dW1 = matmul(dh.t(), x.t()), dx = matmul(dh, w1.t()).
    """
    _check_2d("a", a, a.dtype)
    _check_2d("b_t", b_t, a.dtype, (b_t.shape[0], a.shape[1]))
    (c,) = _gemm(a, b_t, "none", None)
    return c


def linear_glu(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    """g = x w_gate^T, u = x w_up^T (T, F) and m = act(g) u, from one kernel."""
    _check_activation(activation, allow_none=False)
    _check_2d("x", x, x.dtype)
    _check_2d("w_gate", w_gate, x.dtype, (w_gate.shape[0], x.shape[1]))
    _check_2d("w_up", w_up, x.dtype, tuple(w_gate.shape))
    m_, k = x.shape
    n = w_gate.shape[0]
    g, u, m = (torch.empty((m_, n), dtype=x.dtype, device=x.device) for _ in range(3))
    if m_ == 0 or n == 0:
        return g, u, m
    grid = lambda meta: (_cdiv(m_, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    plan = _tma_plan(x, (w_gate, w_up))

    def launch(operands, use_tma):
        _glu_kernel[grid](
            x, w_gate, w_up, g, u, m, *operands, m_, n, k,
            x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
            *_buckets(m_, n, k),
            **_config(dict(EPI="glu", ACT=activation, HAS_BIAS=False, PRECISION=_precision(x.dtype),
                           USE_TMA=use_tma, A_T=use_tma and plan[1], B_T=use_tma and plan[2])),
        )  # fmt: skip

    with _on_device(x):
        TMA.launch(launch, plan and plan[0], (x, w_gate, w_up))
    return g, u, m
