"""LayerNorm and RMSNorm, fused with the residual add before them and the cast after them:
registration, autograd and dispatch (the op's front door).

A pre-norm transformer block computes ``x = x + branch`` and then ``norm(x)``, and under
``torch.autocast`` the norm runs in float32 and the matmul after it casts its output to bf16.
Eagerly that is four kernels and four round trips through memory (add, the norm's statistics
and output, the cast); here it is one pass that reads ``branch`` and ``x`` and writes the new
residual ``x`` and the normalized output, already in the dtype the next matmul takes
(``out_dtype``). Backward is one pass too: it adds the gradient arriving at the residual
output (``dsum``) into d input, where eager autograd accumulates it with another kernel.
The math, with its gradient: ``reference.py``.

Backends: ``triton`` on CUDA tensors (rows up to ``triton.MAX_D`` features; wider rows take
the reference), ``cpu`` (C++, ``csrc/cpu/norm.cpp``), ``reference`` everywhere.

Custom ops: ``fastattn::norm_fwd`` / ``norm_bwd`` on (N, D) rows (the public functions flatten
the leading dimensions and the normalized ones).
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op reads the annotations
# of the functions it registers and rejects them as strings.
import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ... import _autocast, _backends, _eager
from .._args import dense
from . import reference

_PKG = __name__
_HALF = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = {"cpu": _HALF + (torch.float64,), "triton": _HALF}
_CUDA_ORDER = ("triton",)


def _impl(fn: str, dtype: torch.dtype, device: torch.device, d: int):
    name = _backends.select(fn, device, dtype, cuda_order=_CUDA_ORDER, dtypes=_DTYPES)
    if name == "triton":
        from .triton import MAX_D
        if d > MAX_D:
            if _backends.requested() == "triton":
                raise _backends.BackendError(
                    f"{fn}: the triton backend normalizes rows of at most {MAX_D} features, got "
                    f"{d}; use backend 'auto' (which takes the reference there) or 'reference'")
            name = "reference"
    return name, _backends.implementation(name, _PKG)


def _sum_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _unit_cols(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _exact_in(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether every value of dtype a is exactly a value of dtype b (b holds a: float16 and
    bfloat16 hold neither each other)."""
    return a is b or torch.promote_types(a, b) == b


# The C++ kernels take rows of one dtype and weight / bias in the accumulation dtype (see
# csrc/cpu/ops.h); these adapters convert the inputs where the op's arguments differ (exact
# conversions only: a wider output or gradient than the rows takes the reference instead).

def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in dtype, contiguous (itself when it already is: these run on every call)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _cpu_fwd(mod, x, residual, weight, bias, eps, rms, out_dtype):
    s_dtype = _sum_dtype(x, residual)
    if not _exact_in(out_dtype, s_dtype):  # y rounded in s_dtype first would round twice
        return reference.norm_fwd(x, residual, weight, bias, eps, rms, out_dtype)
    acc = reference.acc_dtype(s_dtype)
    y, s, mean, rstd = mod.norm_fwd(_as(x, s_dtype), _as(residual, s_dtype), _as(weight, acc),
                                    _as(bias, acc), eps, rms)
    return y if y.dtype == out_dtype else y.to(out_dtype), s, mean, rstd


def _cpu_bwd(mod, dy, dsum, s, weight, mean, rstd, rms, want_dw, want_db, dx_dtype):
    if not _exact_in(dy.dtype, s.dtype):   # dy would be rounded on the way in
        return reference.norm_bwd(dy, dsum, s, weight, mean, rstd, rms, want_dw, want_db,
                                  dx_dtype)
    ds, dw, db = mod.norm_bwd(_as(dy, s.dtype), _as(dsum, s.dtype), _as(s, s.dtype),
                              _as(weight, reference.acc_dtype(s.dtype)), mean, rstd, rms, want_dw,
                              want_db)
    # copy=True: a dx_dtype equal to s's must still give a tensor of its own (no aliasing)
    return ds, ds.to(dx_dtype, copy=True) if dx_dtype is not None else ds.new_empty(0), dw, db


@_eager.custom_op("fastattn::norm_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float, rms: bool,
             out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of rows x (N, D) [+ residual]: y in out_dtype; s = x + residual in
    their promoted dtype (empty without residual); mean (empty for RMSNorm) and rstd per row in
    the accumulation dtype (float32, float64 for float64 rows)."""
    if rms and bias is not None:
        raise ValueError("norm_fwd: RMSNorm takes no bias (rms=True with a bias tensor)")
    s_dtype = _sum_dtype(x, residual)
    name, impl = _impl("norm", s_dtype, x.device, x.shape[1])
    # Unit-stride rows for every backend (weight and bias too: the kernels index them so), the
    # reference fallbacks included: their elementwise ops would give a transposed x's strides
    # to y and s, where the op (and its fake) promises contiguous outputs.
    x, residual, weight, bias = (_unit_cols(t) for t in (x, residual, weight, bias))
    if name == "cpu":
        return _cpu_fwd(impl, x, residual, weight, bias, eps, rms, out_dtype)
    return impl.norm_fwd(x, residual, weight, bias, eps, rms, out_dtype)


@norm_fwd.register_fake
def _(x, residual, weight, bias, eps, rms, out_dtype):
    s_dtype = _sum_dtype(x, residual)
    acc = reference.acc_dtype(s_dtype)
    n = x.shape[0]
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape if residual is not None else (0,), dtype=s_dtype),
            x.new_empty(0 if rms else n, dtype=acc), x.new_empty(n, dtype=acc))


@_eager.custom_op("fastattn::norm_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def norm_bwd(dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor],
             mean: Tensor, rstd: Tensor, rms: bool, want_dw: bool, want_db: bool,
             dx_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # (the default: Inductor's generated call leaves out a trailing None argument)
    """(ds, dx, dw, db): ds in s's dtype (d loss / d s, dsum included); dx the same rounded to
    dx_dtype, written in the same pass (the gradient of a narrower summand: the bf16 branch
    added to an fp32 residual stream), empty without dx_dtype; dw, db over all rows in the
    accumulation dtype, empty when not wanted."""
    name, impl = _impl("norm", s.dtype, s.device, s.shape[1])
    dy, dsum, s, weight = (_unit_cols(t) for t in (dy, dsum, s, weight))   # (as in norm_fwd)
    if name == "cpu":
        return _cpu_bwd(impl, dy, dsum, s, weight, mean, rstd, rms, want_dw, want_db, dx_dtype)
    return impl.norm_bwd(dy, dsum, s, weight, mean, rstd, rms, want_dw, want_db, dx_dtype)


@norm_bwd.register_fake
def _(dy, dsum, s, weight, mean, rstd, rms, want_dw, want_db, dx_dtype=None):
    acc = reference.acc_dtype(s.dtype)
    d = s.shape[1]
    return (s.new_empty(s.shape),   # contiguous, as every backend returns it
            s.new_empty(s.shape if dx_dtype is not None else (0,),
                        dtype=dx_dtype if dx_dtype is not None else s.dtype),
            s.new_empty(d if want_dw else 0, dtype=acc), s.new_empty(d if want_db else 0, dtype=acc))


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, out_dtype = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.rms = rms
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype,
                  None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.backend = _backends.requested()
    ctx.set_materialize_grads(False)


def _norm_backward(ctx, dy, dsum, _dmean, _drstd):
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if r_dtype is None:  # s was an empty placeholder (a traced backward may hand it a zero)
        dsum = None
    if dy is None:      # only the residual output is used further: d s passes straight through
        if dsum is None:
            return (None,) * 7
        return (dsum.to(x_dtype) if need_x else None,
                dsum.to(r_dtype) if need_r else None, None, None, None, None, None)
    s, weight, mean, rstd = ctx.saved_tensors
    want_dw, want_db = need_w and w_dtype is not None, need_b and b_dtype is not None
    # With a residual, input's gradient may be a narrower copy of ds: the kernel writes both.
    dx_dtype = x_dtype if need_x and r_dtype is not None and x_dtype != s.dtype else None
    with _backends.restored(ctx.backend):
        ds, dx, dw, db = _eager.call(norm_bwd, dy, dsum, s, weight, mean, rstd, ctx.rms, want_dw,
                                     want_db, dx_dtype)
    if dx_dtype is None:
        dx = _cast(ds, x_dtype) if need_x else None
    return (dx, _cast(ds, r_dtype) if need_r and r_dtype is not None else None,
            _cast(dw, w_dtype) if want_dw else None, _cast(db, b_dtype) if want_db else None,
            None, None, None)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_eager.register_autograd(norm_fwd, _norm_backward, setup_context=_norm_setup)
_eager.no_double_backward(norm_bwd, "fastattn.layer_norm / rms_norm",
                          "torch.nn.functional.layer_norm / rms_norm")


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t) -> str:
    return f"{t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__


def _normalized(fn: str, normalized_shape) -> tuple:
    if type(normalized_shape) is int:   # the common case first: no generic checks
        return (normalized_shape,)
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return (int(normalized_shape),)
    if isinstance(normalized_shape, (tuple, list, torch.Size, Sequence)) and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool)
            for n in normalized_shape):
        return tuple(int(n) for n in normalized_shape)
    raise TypeError(f"{fn}: normalized_shape must be an int or a sequence of ints, got "
                    f"{normalized_shape!r}")


def _check(fn: str, x, normalized_shape, weight, bias, residual, eps, out_dtype) -> tuple:
    """The normalized shape as a tuple, after checking every argument."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: input must be a floating-point tensor, got {_describe(x)}")
    dense(fn, "input", x)
    shape = _normalized(fn, normalized_shape)
    if not shape or math.prod(shape) < 1:
        raise ValueError(f"{fn}: normalized_shape must name at least one feature, got {shape}")
    if x.dim() < len(shape) or x.shape[x.dim() - len(shape):] != shape:
        raise ValueError(f"{fn}: input of shape {tuple(x.shape)} does not end with "
                         f"normalized_shape {shape} (expected input of shape (*, "
                         f"{', '.join(map(str, shape))}))")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor or None, got "
                            f"{_describe(t)}")
        dense(fn, name, t)
        if t.shape != shape:
            raise ValueError(f"{fn}: {name} must have shape normalized_shape {shape}, got "
                             f"{tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on input's device {x.device}, got "
                             f"{t.device}")
    if residual is not None:
        if not isinstance(residual, Tensor) or not residual.is_floating_point():
            raise TypeError(f"{fn}: residual must be a floating-point tensor or None, got "
                            f"{_describe(residual)}")
        dense(fn, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have input's shape {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"{fn}: residual must be on input's device {x.device}, got "
                             f"{residual.device}")
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)) \
            or not -math.inf < eps < math.inf or eps < 0:
        raise ValueError(f"{fn}: eps must be a finite real number >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in _FLOATING:
        raise TypeError(f"{fn}: out_dtype must be None or one of float16, bfloat16, float32, "
                        f"float64, got {out_dtype!r}")
    return shape


def _norm(fn: str, x: Tensor, normalized_shape, weight: Optional[Tensor],
          bias: Optional[Tensor], eps, residual: Optional[Tensor],
          out_dtype: Optional[torch.dtype], rms: bool):
    shape = _check(fn, x, normalized_shape, weight, bias, residual,
                   0.0 if eps is None else eps, out_dtype)
    s_dtype = _sum_dtype(x, residual)
    if eps is None:   # F.rms_norm's default in current torch: the accumulation dtype's epsilon
        eps = torch.finfo(reference.acc_dtype(s_dtype)).eps
    if out_dtype is None:
        # F.layer_norm's dtype: on autocast's CUDA fp32 list (its inputs are cast up, the
        # output is float32); on the CPU autocast leaves it alone.
        autocast = x.device.type == "cuda" and s_dtype != torch.float64 \
            and _autocast.dtype("cuda") is not None
        out_dtype = torch.float32 if autocast else s_dtype
    # Rows (N, D) for the op; a 2-D input with one normalized dim is already that (each
    # reshape or view costs a microsecond of host time, and this runs per block per step).
    d = shape[0] if len(shape) == 1 else math.prod(shape)
    rows = x.dim() == 2 and len(shape) == 1
    y, s, _, _ = _eager.call(
        norm_fwd, x if rows else x.reshape(-1, d),
        None if residual is None else residual if rows else residual.reshape(-1, d),
        weight if weight is None or weight.dim() == 1 else weight.reshape(d),
        bias if bias is None or bias.dim() == 1 else bias.reshape(d),
        float(eps), rms, out_dtype)
    if not rows:
        y = y.view_as(x)   # (view_as: a view to x.shape costs twice as long, torch.Size args)
        s = s.view_as(x) if residual is not None else s
    return y if residual is None else (y, s)


def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, residual: Optional[Tensor] = None,
               out_dtype: Optional[torch.dtype] = None):
    """``F.layer_norm`` in one fused pass, optionally after a residual add and before a cast.

    With ``residual`` (input's shape) it normalizes ``s = input + residual`` and returns
    ``(out, s)``: s, the block's next residual stream, in the promoted dtype of the two. The
    statistics are in float32 (float64 for float64 inputs). ``out_dtype`` is the dtype of
    ``out``; the default is ``F.layer_norm``'s: that of s, or float32 inside ``torch.autocast``
    on CUDA (where layer_norm is on autocast's float32 list). Passing the autocast dtype (bf16)
    writes what the next matmul reads, with the same rounding as that matmul's own cast.
    Gradients flow to input, residual, weight and bias. A row whose variance overflows the
    statistics' dtype (|s - mean| beyond ~1.8e19 in float32) is NaN, not the zeros (plus bias)
    that rstd = 0 would give.
    """
    return _norm("layer_norm", input, normalized_shape, weight, bias, eps, residual, out_dtype,
                 rms=False)


def rms_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]],
             weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             residual: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None):
    """``F.rms_norm`` in one fused pass; ``residual`` and ``out_dtype`` as in :func:`layer_norm`.

    ``eps`` None: ``torch.finfo(torch.float32).eps`` for float32/float16/bfloat16 rows (float64's
    for float64), as ``F.rms_norm`` in current torch; torch 2.4 took the input dtype's own
    (7.8e-3 for bf16), so half-precision results differ from that release's by design."""
    return _norm("rms_norm", input, normalized_shape, weight, None, eps, residual, out_dtype,
                 rms=True)
