"""Triton LayerNorm / RMSNorm with a fused residual add (the math: reference.py).

Forward: one program per row, the row held in registers: s = x + residual is read once and
written once (the residual stream's next value), y written once in the caller's dtype, so
a norm under autocast writes its bf16 output directly instead of an fp32 one that the next
matmul casts again. Traffic per row: D (x) + D (residual) + D (s) + D (y) elements, against
eager's add (3D), layer_norm (2D) and autocast's cast (2D, half of them bf16).

Backward: each program walks a contiguous range of rows; per row it reads dy, s (and dsum)
once, writes ds once, and keeps its rows' dw = sum dy xhat and db = sum dy in fp32 registers,
written as one partial per program and summed in program order by the host (deterministic,
no atomics). Rows per program: enough programs to keep every SM's memory pipeline busy
(_programs), few enough that the partials (programs x D fp32) stay small.

Rows are held whole: D up to MAX_D elements (a register tile of BLOCK_D = D rounded up to a
power of two). Wider rows take the reference path (see the op's dispatch).
"""

import torch
import triton
import triton.language as tl

from .._triton_common import INTERPRET, cast_for, on_device, sm_count
from .._triton_common import cdiv as _cdiv, next_power_of_2 as _next_power_of_2

MAX_D = 16384


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,
    stride_x, stride_r, stride_y, stride_s,
    D, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    z = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        z += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = cast_for(z, S)  # the residual output, rounded once; the statistics are of it
        tl.store(S + row * stride_s + cols, s, mask=mask)
        z = s.to(tl.float32)
    if RMS:
        zc = z
    else:
        mean = tl.sum(z, axis=0) / D
        zc = tl.where(mask, z - mean, 0.0)
        tl.store(Mean + row, mean)
    var = tl.sum(zc * zc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    if not RMS:  # a variance past fp32 (|s - mean| > ~1.8e19): NaN as F.layer_norm, not rstd 0
        rstd = tl.where(var == float("inf"), float("nan"), rstd)
    tl.store(Rstd + row, rstd)
    y = zc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, cast_for(y, Y), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, DSUM, S, W, Mean, Rstd, DS, DX, DW_PART, DB_PART,
    stride_dy, stride_dsum, stride_s, stride_ds, stride_dx,
    N, D, rows_per_program,
    HAS_DSUM: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr, HAS_DX: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # the loop's index is int64 with its bounds
    last = tl.minimum(first + rows_per_program, N)
    for r in range(first, last):
        z = tl.load(S + r * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + r)
        if RMS:
            xhat = z * rstd
        else:
            xhat = tl.where(mask, (z - tl.load(Mean + r)) * rstd, 0.0)
        g = dy * w if HAS_W else dy
        gx = tl.sum(g * xhat, axis=0) / D
        if RMS:
            ds = (g - xhat * gx) * rstd
        else:
            ds = (g - tl.sum(g, axis=0) / D - xhat * gx) * rstd
        if HAS_DSUM:
            ds += tl.load(DSUM + r * stride_dsum + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DS + r * stride_ds + cols, cast_for(ds, DS), mask=mask)
        if HAS_DX:  # the narrower summand's gradient: ds rounded once more (from fp32 ds)
            tl.store(DX + r * stride_dx + cols, cast_for(ds, DX), mask=mask)
        if WANT_DW:
            dw += dy * xhat
        if WANT_DB:
            db += dy
    if WANT_DW:
        tl.store(DW_PART + pid * D + cols, dw, mask=mask)
    if WANT_DB:
        tl.store(DB_PART + pid * D + cols, db, mask=mask)


def _block(d: int) -> int:
    return _next_power_of_2(d)


def _warps(block: int) -> int:
    # ~8 fp32 elements per thread and operand up to 4 warps, then more warps, not more registers
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


# Backward programs per SM by row block: as many as stay resident together, and no more. The
# rows are split evenly, so a program beyond what an SM holds runs in a second wave that costs
# a whole program's time (8 programs on an SM that holds 7 take twice as long as 7). What fits,
# from `ptxas -v` on the kernel lowered for sm_90a (triton 3.8; tests/tools/triton_aot), 64K
# registers per SM: block 256: 31-39 registers (12-16 programs of 4 warps fit), 512: 40-48
# (10-12), 1024: 64-72 (7-8), 2048 (8 warps): 64-103 (2-4), 4096: 102-161 (1-2), 8192
# (16 warps): 102-127 (1), over layer/RMS norm, bf16/fp32 gradients and every gradient
# output. The counts keep a margin below that for other Triton releases' allocations.
_BWD_PROGRAMS_PER_SM = {256: 8, 512: 8, 1024: 6, 2048: 2}


def _programs(n: int, device: torch.device, block: int) -> int:
    """Backward programs: a few per SM (rows in flight while the others compute their row
    sums; _BWD_PROGRAMS_PER_SM), at most one per row; few in the interpreter, which runs them
    one by one."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(n, 3))
    per_sm = _BWD_PROGRAMS_PER_SM.get(block, 8 if block < 256 else 1)
    return max(1, min(n, per_sm * sm_count(device)))


def norm_fwd(x, residual, weight, bias, eps, rms, out_dtype):
    """As reference.norm_fwd; x, residual (N, D) with unit column stride."""
    n, d = x.shape
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((n, d), dtype=out_dtype, device=x.device)
    s = torch.empty((n, d), dtype=s_dtype, device=x.device) if residual is not None \
        else x.new_empty(0)
    mean = torch.empty(0 if rms else n, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return y, s, mean, rstd
    block = _block(d)
    with on_device(x):
        _norm_fwd_kernel[(n,)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, s if residual is not None else y,
            mean if not rms else rstd, rstd,
            x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            s.stride(0) if residual is not None else 0, d, float(eps),
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            RMS=rms, BLOCK_D=block, num_warps=_warps(block),
        )  # fmt: skip
    return y, s, mean, rstd


def norm_bwd(dy, dsum, s, weight, mean, rstd, rms, want_dw, want_db, dx_dtype=None):
    """As reference.norm_bwd; dy, dsum, s (N, D) with unit column stride."""
    n, d = s.shape
    ds = torch.empty((n, d), dtype=s.dtype, device=s.device)
    dx = torch.empty((n, d), dtype=dx_dtype, device=s.device) if dx_dtype is not None \
        else s.new_empty(0)
    block = _block(d)
    rows = _cdiv(n, _programs(n, s.device, block))
    programs = _cdiv(n, rows) if n else 0   # every program gets at least one row
    part = (programs, d) if n else (1, d)
    new = torch.empty if n else torch.zeros  # no rows: zero gradients
    dw_part = new(part, dtype=torch.float32, device=s.device) if want_dw else None
    db_part = new(part, dtype=torch.float32, device=s.device) if want_db else None
    if n:
        with on_device(s):
            _norm_bwd_kernel[(programs,)](
                dy, dsum if dsum is not None else dy, s, weight if weight is not None else s,
                mean if not rms else rstd, rstd, ds, dx if dx_dtype is not None else ds,
                dw_part if want_dw else ds, db_part if want_db else ds,
                dy.stride(0), dsum.stride(0) if dsum is not None else 0, s.stride(0), ds.stride(0),
                dx.stride(0) if dx_dtype is not None else 0, n, d, rows,
                HAS_DSUM=dsum is not None, HAS_W=weight is not None, RMS=rms,
                HAS_DX=dx_dtype is not None, WANT_DW=want_dw, WANT_DB=want_db, BLOCK_D=block,
                num_warps=_warps(block),
            )  # fmt: skip
    return (ds, dx, dw_part.sum(0) if want_dw else rstd.new_empty(0),
            db_part.sum(0) if want_db else rstd.new_empty(0))
