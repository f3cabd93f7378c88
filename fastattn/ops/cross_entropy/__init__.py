"""The cross-entropy family: registration, autograd, dispatch — the op's front door.

Public functions (re-exported as ``fastattn.<name>``):

* ``cross_entropy`` — ``F.cross_entropy`` for class-index targets, plus z-loss. The forward
  kernel writes the loss *and* the gradient in one pass over the logits; backward only scales.
* ``linear_cross_entropy`` — ``cross_entropy(linear(x, W, b), t)`` chunk by chunk over tokens
  (or over the vocabulary, in two passes), never holding the (tokens x vocab) logits;
  gradients are produced in the forward.
* ``token_logprobs`` / ``linear_token_logprobs`` — per-token log p(target) (and entropy) with
  gradients, without a log-softmax tensor: the policy/reference log-probs of DPO, GRPO, PPO.

Every kernel backend implements four row functions (see ``reference.py`` for the math and the
conventions); this file checks arguments, flattens to rows, computes reductions and wires
``torch.library`` custom ops (``fastattn::*``) with fake (meta) kernels and autograd formulas, so
``torch.compile`` traces through them without a graph break.
"""

import contextlib
import contextvars
import functools
import math
import numbers
import os
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ... import _autocast, _backends, _eager
from .. import _cpu_matmul
from .._args import dense, flag, real_number

_PKG = __name__
_CUDA_ORDER = ("cuda", "triton")
_LOW = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = {"cpu": _LOW + (torch.float64,), "cuda": _LOW, "triton": _LOW}
_REDUCTIONS = ("none", "mean", "sum")
_DEVICES = ("cpu", "cuda")
# A backward scale of exactly 1 (loss.backward() on a mean/sum) is skipped rather than paid for
# with a full read+write of the gradient. On CUDA, knowing the scale is 1 costs a 4-byte
# device-to-host read: a sync, after which the device idles until the host has queued the next
# kernels, and the host's lead over the device is gone. That only pays off for a gradient whose
# pass costs more, above this many elements (64M: ~60 us in bf16 at an H200's 4.3 TB/s; the
# logits of a plain cross_entropy, not linear_cross_entropy's d input and d weight: at 4M, its
# 2 syncs were 2 of the 3 per step of a gpt2-124m training step on an H200, 2026-11-30).
_SKIP_SCALE_MIN_NUMEL = 1 << 26


def _backend(op: str, x: Tensor) -> str:
    return _backends.select(op, x.device, x.dtype, cuda_order=_CUDA_ORDER, dtypes=_DTYPES)


def _kernels(op: str, x: Tensor):
    return _backends.implementation(_backend(op, x), _PKG)


def _chunk_kernels(op: str, x: Tensor):
    """(op's row kernels for x, a function giving the context its chunk loops run in): with
    the "cpu" backend the loops' logits GEMMs, and the input-gradient GEMMs of token chunks,
    take oneDNN where it is the faster (_cpu_matmul); every other backend keeps ATen's."""
    name = _backend(op, x)
    return (_backends.implementation(name, _PKG),
            functools.partial(_cpu_matmul.enabled, name == "cpu"))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# Argument checks (run in the public functions, before any op is called)
# --------------------------------------------------------------------------------------------

def _check_float(fn: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor "
                        f"(float32, float16, bfloat16 or float64), got {t.dtype}")
    dense(fn, name, t)


def _check_target(fn: str, target: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    dense(fn, "target", target)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold class indices (an integer tensor), got "
                        f"{target.dtype}; class-probability targets are not supported")
    return target.long()


def _check_same_device(fn: str, **tensors: Optional[Tensor]) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def _check_options(fn: str, reduction: str, label_smoothing: float, ignore_index: int) -> int:
    """Checks the options F.cross_entropy shares; returns ignore_index as a Python int (numpy
    and other integral types are accepted, as PyTorch accepts them)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= real_number(fn, "label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= int(ignore_index) < 2 ** 63:    # the targets' int64 range
        raise ValueError(f"{fn}: ignore_index must fit in int64, got {int(ignore_index)}")
    return int(ignore_index)


_TRUSTED = contextvars.ContextVar("fastattn_trusted_targets", default=False)


@contextlib.contextmanager
def trusted_targets(enabled: bool = True) -> Iterator[None]:
    """Inside this block the cross-entropy family takes its targets as valid on CUDA.

    Every target must be ``ignore_index`` or a class index in ``[0, C)``. Checking that on a
    GPU means reading a flag back to the host: a synchronisation, after which the GPU idles
    until the host has queued the next kernels (and that cannot happen inside a CUDA graph
    capture). A caller that built its targets knowing the class count (token ids from the
    tokenizer of the model's vocabulary, checked when the batch was made) can skip it here:
    an out-of-range target then gives NaN for its row's loss or log-prob and gradient, no
    error, and the kernels still never read outside the logits. CPU tensors are always checked
    (it costs no synchronisation there). ``FASTATTN_CHECK_TARGETS=0`` does the same for the
    whole process. Thread- and task-local, like ``fastattn.use_backend``. (One call still
    synchronises: ``cross_entropy`` with class weights, ``z_loss`` and ``reduction="mean"``
    reads the weight sum and token count back to scale the z-loss.)"""
    token = _TRUSTED.set(bool(enabled))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _validate_targets(fn: str, target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Every target must be ignore_index or in [0, C). One reduction over R ints; on CUDA it
    syncs to report the bad entry (trusted_targets() or FASTATTN_CHECK_TARGETS=0 skip it there:
    kernels then give NaN for such rows instead of an error, and never read out of bounds).
    Called inside the ops' implementations only, which torch.compile does not trace."""
    if target.numel() == 0:
        return
    if target.device.type != "cpu" and (
            _TRUSTED.get() or os.environ.get("FASTATTN_CHECK_TARGETS", "1") == "0"):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise TargetOutOfRange(fn, where, int(target[where]), n_classes, ignore_index)


class TargetOutOfRange(ValueError):
    """A target that is neither ignore_index nor a class index. The ops see targets flattened to
    rows; the public functions re-raise it with the index in the caller's target shape
    (``_in_target_shape``), at no cost to calls that succeed."""

    def __init__(self, fn: str, where: Tuple[int, ...], value: int, n_classes: int,
                 ignore_index: int):
        self.fn, self.where, self.value = fn, where, value
        self.n_classes, self.ignore_index = n_classes, ignore_index
        super().__init__(f"{fn}: target[{', '.join(map(str, where))}] = {value} is out of range: "
                         f"expected a class index in [0, {n_classes}) or "
                         f"ignore_index={ignore_index}")


def _in_target_shape(shape: torch.Size, call, *args):
    """``call(*args)``, re-raising a TargetOutOfRange of the flattened targets at the entry's
    index in the caller's target ``shape``. Not while torch.compile traces (the plain call: the
    error then names the flattened index)."""
    if torch.compiler.is_compiling():
        return call(*args)
    try:
        return call(*args)
    except TargetOutOfRange as err:
        if len(shape) < 2 or len(err.where) != 1:
            raise
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(err.where[0]), shape))
        raise TargetOutOfRange(err.fn, where, err.value, err.n_classes,
                               err.ignore_index) from None


# --------------------------------------------------------------------------------------------
# The whole backward of the fused losses: a scale
# --------------------------------------------------------------------------------------------

def _scaled(grad: Tensor, scale: Tensor) -> Tensor:
    """grad * scale, for a 0-dim scale or one per row of grad.

    Eagerly, the gradient the forward produced is scaled in its own memory, and a scale of
    exactly 1 (``loss.backward()``) is skipped. When traced (torch.compile, export) it is a plain
    multiply the compiler fuses and places; branching on the value is impossible there anyway.
    """
    if scale.dim() == 1:
        scale = scale.unsqueeze(-1)
    if type(grad) is not Tensor or type(scale) is not Tensor or torch.compiler.is_compiling():
        return grad * scale
    if grad.numel() == 0:
        return grad
    if (scale.numel() == 1 and (grad.device.type == "cpu" or grad.numel() >= _SKIP_SCALE_MIN_NUMEL)
            and scale.item() == 1):
        return grad
    return grad.mul_(scale.to(_acc_dtype(grad.dtype)))


# --------------------------------------------------------------------------------------------
# fastattn::cross_entropy_fwd (+ an in-place variant that writes the gradient into the logits)
# --------------------------------------------------------------------------------------------

def _mean_denominator(target: Tensor, weight32: Optional[Tensor], ignore_index: int,
                      acc: torch.dtype) -> Tensor:
    """The divisor of reduction="mean": the summed weight of the non-ignored targets."""
    valid = target != ignore_index
    if weight32 is None:
        return valid.sum(dtype=acc)
    safe = torch.where(valid, target, torch.zeros_like(target))
    picked = weight32[safe]
    if picked.dtype != acc:     # (no aliasing .to: setup_context calls this too)
        picked = picked.to(acc)
    return (picked * valid).sum()


def _nonzero(denominator: Tensor, valid: Tensor) -> Tensor:
    """The divisor of a "mean" gradient: 1 where no target is valid (the gradient rows are then
    all zero and stay zero, as PyTorch's, not 0 / 0 = NaN). Valid targets of total class weight
    0 keep the 0 (NaN, as PyTorch's)."""
    return torch.where(valid.any(), denominator, torch.ones_like(denominator))


def _defers_mean(dtype: torch.dtype, reduction: str) -> bool:
    """float16 + "mean": the stored gradient is w_t (p - y) / max|w| (no class weights: p - y)
    without the 1/denominator, which backward applies together with grad_output. Folded in,
    (p - y) / N would be rounded to fp16 before the loss scale reaches it, and every p below
    ~N * 6e-8 would flush to 0 (GradScaler's point is that p * scale / N survives). Dividing by
    the largest class weight keeps w_t (p - y) within fp16's range whatever the weights.
    bfloat16 has float32's range."""
    return dtype == torch.float16 and reduction == "mean"


def _weight_bound(weight32: Tensor) -> Tensor:
    """max |w| of the class weights (1 where they are all 0), on the device: no sync."""
    bound = weight32.abs().amax() if weight32.numel() else weight32.new_ones(())
    return torch.where(bound > 0, bound, torch.ones_like(bound))


def _z_loss_for_weighted_mean(z_loss: float, denominator: Tensor, target: Tensor,
                              ignore_index: int) -> float:
    """The z-loss coefficient the row kernels take for reduction="mean" with class weights.

    The z-loss is a per-token term, not weighted by the target's class: "mean" averages it
    over the non-ignored tokens while the cross-entropy part is divided by their summed class
    weight (F.cross_entropy's weighted mean), so that uniform class weights change nothing
    (Liger-Kernel's convention). The kernels add z_loss * lse^2 to a row and the reduction
    divides every row by the summed weight W; a coefficient of z_loss * W / n gives the
    z-loss its divisor n. One device-to-host read, only in this case."""
    n_valid = (target != ignore_index).sum()
    weight_sum, n = torch.stack([denominator.double(), n_valid.double()]).tolist()
    return z_loss * weight_sum / n if n > 0 else z_loss


def _ce_rows(fn: str, logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
             label_smoothing: float, z_loss: float, reduction: str,
             grad: Optional[Tensor]) -> Tensor:
    """Runs the row kernel on (R, C) logits and reduces; writes the gradient into ``grad``."""
    n_rows, n_classes = logits.shape
    _validate_targets(fn, target, n_classes, ignore_index)
    acc = _acc_dtype(logits.dtype)
    # class weights in the accumulation dtype: float64 logits keep float64 weights
    weight_acc = None if weight is None else weight.to(acc).contiguous()
    denominator = None
    if reduction == "mean":  # sum of the weights of the non-ignored targets, on the device
        denominator = _mean_denominator(target, weight_acc, ignore_index, acc)
        if weight_acc is not None and z_loss:
            z_loss = _z_loss_for_weighted_mean(z_loss, denominator, target, ignore_index)
    # Kernels take a float32 scale; float64 logits are scaled after, at float64 precision.
    # float16 gradients keep no 1/denominator at all (backward applies it, _defers_mean).
    deferred = grad is not None and _defers_mean(logits.dtype, reduction)
    fold_scale = (grad is not None and denominator is not None and acc == torch.float32
                  and not deferred)
    grad_scale = denominator.reciprocal() if fold_scale else None
    if deferred and weight_acc is not None:
        grad_scale = _weight_bound(weight_acc).reciprocal()
    if n_rows == 0:
        rows = logits.new_zeros(0, dtype=acc)
    else:
        rows = _kernels(fn, logits).cross_entropy_fwd(
            logits, target, weight_acc, grad, grad_scale, ignore_index, label_smoothing, z_loss)
        if grad is not None and acc == torch.float64 and denominator is not None:
            grad.div_(_nonzero(denominator, target != ignore_index))
    if reduction == "none":
        return rows
    total = rows.sum()
    if denominator is not None:
        total = total / denominator
    return total        # in the accumulation dtype: the caller rounds it (or not, under autocast)


@_eager.custom_op("fastattn::cross_entropy_fwd", mutates_args=(), device_types=_DEVICES)
def _cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, z_loss: float, reduction: str,
                       compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss, d loss / d logits) for (R, C) logits; the gradient is empty if not compute_grad."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    loss = _ce_rows("cross_entropy", logits, target, weight, ignore_index, label_smoothing,
                    z_loss, reduction, grad)
    return loss, grad if grad is not None else logits.new_empty(0)


@_cross_entropy_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, reduction, compute_grad):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad \
        else logits.new_empty(0)
    return logits.new_empty(loss_shape, dtype=_acc_dtype(logits.dtype)), grad


def _deferred_scale(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    ignore_index: int, reduction: str) -> None:
    """Saves the scale the kernel left out (_defers_mean) for backward: 1 / denominator, times
    max |w| with class weights."""
    ctx.deferred = _defers_mean(logits.dtype, reduction)
    if ctx.deferred:
        weight32 = weight
        if weight is not None and weight.dtype != torch.float32:
            weight32 = weight.to(torch.float32)
        # no valid target: the gradient is 0 (the kernel wrote zeros), not 0 * inf, as
        # PyTorch's; valid targets of total weight 0 give NaN, as PyTorch's
        count = _mean_denominator(target, None, ignore_index, torch.float32)
        total = count if weight32 is None else _mean_denominator(target, weight32,
                                                                 ignore_index, torch.float32)
        inv = torch.where(count > 0, total.reciprocal(), 0.0)
        ctx.inv_denominator = inv if weight32 is None else inv * _weight_bound(weight32)


def _grad_scale(ctx, grad_loss: Tensor) -> Tensor:
    return grad_loss * ctx.inv_denominator if ctx.deferred else grad_loss


def _ce_setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, _, _, reduction, compute_grad = inputs
    _, grad = output
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(grad)
    # The gradient output never receives a gradient; without this autograd would hand backward
    # a materialised logits-sized tensor of zeros for it.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    _deferred_scale(ctx, logits, target, weight, ignore_index, reduction)
    _eager.keep_anchors(ctx, logits)


@_eager.first_order("fastattn.cross_entropy")
def _ce_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError("fastattn::cross_entropy_fwd ran with compute_grad=False, so it holds "
                           "no gradient; call fastattn.cross_entropy with grad enabled")
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 8
    return _scaled(grad, _grad_scale(ctx, grad_loss)), None, None, None, None, None, None, None


_eager.register_autograd(_cross_entropy_fwd, _ce_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("fastattn::cross_entropy_fwd_inplace", mutates_args=("logits",),
                         device_types=_DEVICES)
def _cross_entropy_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                               ignore_index: int, label_smoothing: float, z_loss: float,
                               reduction: str) -> Tensor:
    """Loss of (R, C) logits; overwrites the logits with d loss / d logits."""
    return _ce_rows("cross_entropy", logits, target, weight, ignore_index, label_smoothing,
                    z_loss, reduction, logits)


@_cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, reduction):
    return logits.new_empty((logits.shape[0],) if reduction == "none" else (),
                            dtype=_acc_dtype(logits.dtype))


class _CrossEntropyInplace(torch.autograd.Function):
    """inplace_backward=True: the logits' memory receives their gradient (no second buffer).

    A mutating op cannot carry a torch.library autograd formula, hence this Function. Autograd
    will refuse (version counter) any other use of the logits that saved them for backward.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, reduction):
        loss = torch.ops.fastattn.cross_entropy_fwd_inplace(
            logits, target, weight, ignore_index, label_smoothing, z_loss, reduction)
        ctx.save_for_backward(logits)
        _deferred_scale(ctx, logits, target, weight, ignore_index, reduction)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, _grad_scale(ctx, grad_loss)), None, None, None, None, None, None


def _a_leaf_or_a_view_of_one(t: Tensor) -> bool:
    """Whether ``t`` is a leaf that requires grad (a parameter, say) or a view of one: writing
    the gradient into its memory would lose the leaf's values, which autograd refuses for
    in-place ops (the inplace_backward op writes from inside its Function, past that check).
    (Without reading storage pointers, which torch.compile cannot trace.)"""
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


def _rows_view(x: Tensor) -> Tensor:
    """(N, C, d1, ...) or (N, C) or (C,) -> (R, C) with a contiguous class dimension."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    elif x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, inplace_backward: bool = False) -> Tensor:
    """Fused softmax cross-entropy with the semantics of ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits ``(N, C)``, ``(N, C, d1, ...)`` or ``(C,)``; float32/float16/bfloat16 (math
            in float32; float64 runs on the CPU kernel or the reference).
        target: class indices ``(N,)``, ``(N, d1, ...)`` or ``()``; any integer dtype.
        weight: optional class weights ``(C,)``, used in float32 (also for float64 logits).
        ignore_index: targets equal to it contribute no loss and no gradient.
        reduction: ``"mean"`` (divided by the summed weight of non-ignored targets), ``"sum"``
            or ``"none"`` (shape of ``target``).
        label_smoothing: in [0, 1], PyTorch's definition.
        z_loss: adds ``z_loss * logsumexp(logits)**2`` to each non-ignored token's loss (PaLM),
            not scaled by its class weight; ``"mean"`` averages this term over the non-ignored
            tokens (and the rest, as ``F.cross_entropy``, over their summed class weight), so
            uniform class weights change nothing (Liger-Kernel's convention; with class
            weights that takes one device-to-host read).
        inplace_backward: let the gradient overwrite ``input``'s memory (saves one logits-sized
            buffer). Only for callers that never read ``input`` again. A leaf tensor (a
            parameter, or one created with ``requires_grad=True``) or a view of one is never
            overwritten (autograd forbids writing into those): it takes the out-of-place path.

    One kernel pass computes the loss and, when a gradient will be needed, the gradient too; the
    backward is a scale by ``grad_output`` (skipped when it is 1). Under ``torch.no_grad`` (or for
    inputs that do not require grad) no gradient is computed or stored. Returns a tensor in
    ``input``'s dtype, or in float32 inside ``torch.autocast`` (as ``F.cross_entropy``).
    Because backward scales the stored gradient in place, a second backward through the same
    graph (``retain_graph=True``) raises autograd's in-place error; compute the
    loss again instead.
    """
    fn = "cross_entropy"
    _check_float(fn, "input", input)
    flag(fn, "inplace_backward", inplace_backward)
    target = _check_target(fn, target)
    ignore_index = _check_options(fn, reduction, label_smoothing, ignore_index)
    if not 0 <= real_number(fn, "z_loss", z_loss) < math.inf:
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0, got {z_loss}")
    if input.dim() == 0:
        raise ValueError(f"{fn}: input must have a class dimension, got a 0-d tensor")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    expected = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(input.shape)}; expected target shape {expected}")
    if weight is not None:
        _check_float(fn, "weight", weight)
        if tuple(weight.shape) != (n_classes,):
            raise ValueError(f"{fn}: weight must have shape ({n_classes},) (one per class), "
                             f"got {tuple(weight.shape)}")
    _check_same_device(fn, input=input, target=target, weight=weight)
    if n_classes == 0:
        raise ValueError(f"{fn}: input has 0 classes")

    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{fn}: gradients with respect to weight are not supported; "
                                  "pass weight.detach()")
    logits = _rows_view(input)
    rows_target = target.reshape(-1).contiguous()
    need_grad = torch.is_grad_enabled() and input.requires_grad
    # rows that share memory (an expand()ed input) cannot each receive their own gradient:
    # those take the out-of-place path (inplace_backward permits reuse; it does not demand it)
    disjoint_rows = logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1]
    if need_grad and inplace_backward and disjoint_rows and not _a_leaf_or_a_view_of_one(input):
        loss = _in_target_shape(target.shape, _CrossEntropyInplace.apply, logits, rows_target,
                                weight, ignore_index, float(label_smoothing), float(z_loss),
                                reduction)
    else:
        loss, _ = _in_target_shape(
            target.shape, _eager.call, _cross_entropy_fwd, logits, rows_target, weight,
            ignore_index, float(label_smoothing), float(z_loss), reduction, need_grad)
    # The loss leaves the kernel in float32 (float64 for float64 logits); under autocast it
    # stays there, as F.cross_entropy's does (an fp32-list op), else it takes input's dtype.
    if _autocast.dtype(input.device.type) is None:
        loss = loss.to(input.dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Chunked linear + loss: the (tokens x vocab) logits exist one chunk at a time
# --------------------------------------------------------------------------------------------

# Fewest rows per chunk (see default_chunk_size). GPUs need more: an H200 does ~660 TFLOP/s
# against ~4.2 TB/s (157 FLOP/byte), and the weight-gradient GEMM of a chunk of r rows does
# 2r FLOPs per accumulator element against its 8 bytes of fp32 read and write. At 512 rows the
# first H200 run (2026-11-29, vocab 131072, hidden 4096, 16384 tokens) took 110 ms against
# torch.compile's 82; 32 chunks x 4 GiB of accumulator traffic take ~32 ms at that bandwidth,
# about the size of the gap (a model, not yet a measurement). 2048 rows cut that traffic by 4
# (logits chunk: 512 MB in bf16 at that vocab).
MIN_CHUNK_ROWS = {"cpu": 512, "cuda": 2048}   # other accelerators: as CUDA


def default_chunk_size(n_tokens: int, hidden: int, vocab: int, device: str = "cpu") -> int:
    """Rows per chunk: a chunk of logits about as large as the hidden states themselves
    (chunk * vocab ~= tokens * hidden), and never fewer than ``MIN_CHUNK_ROWS[device]`` rows
    (512 on CPUs, 2048 on GPUs).

    The floor is set by the weight gradient: every chunk adds dlogits^T x into the whole
    (vocab, hidden) fp32 accumulator, 8 bytes of traffic per element, against 2 * chunk FLOPs
    per element for that GEMM. At 64 rows the accumulator traffic dominates (measured 2.5x
    slower on the CPU benchmark shape); GPUs need more rows than CPUs (MIN_CHUNK_ROWS).
    """
    rows = math.ceil(n_tokens * hidden / max(vocab, 1))
    floor = MIN_CHUNK_ROWS.get(device, MIN_CHUNK_ROWS["cuda"])
    return max(1, min(n_tokens, max(floor, rows)))


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc in fp32 (fp64 for fp64) and a, b possibly half: products summed in
    fp32 (cuBLAS reads and writes the fp32 accumulator in the same GEMM where it can)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        if acc.device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out"):
            try:  # cuBLAS: half inputs, fp32 accumulator read and written in the same GEMM
                torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
                return
            except RuntimeError:  # releases whose dtype_out wants self in the input dtype
                pass
        acc.add_(torch.mm(a, b))


# Row stride of every chunk of logits, in elements: a multiple of 64. cuBLAS's fastest GEMMs
# (on Hopper, the TMA-fed ones) want 16-byte aligned leading dimensions, and a vocabulary such
# as GPT-2's 50257, or a trained BPE's 44532, makes the logits' rows misaligned: every GEMM that
# reads or writes them (logits, d input, d weight) then falls back to older kernels. On the
# H200, gpt2-124m at vocabulary 44532 (benchmarks.profile_step, 2026-11-30) ran those three
# GEMMs as Ampere CUTLASS kernels at ~240 TFLOP/s, ~13.9 ms of a 50 ms step, where the model's
# aligned GEMMs ran Hopper kernels at ~700 (nanoGPT pads its vocabulary to 50304 for this
# reason). Padding the row stride, not the vocabulary, keeps the op's results unchanged: the
# pad columns are never computed or read. On the CPU the padded stride measured even with the
# dense one (MKL, 512 x 192 x 8191, by hand).
_LOGITS_ROW_ALIGN = 64


def _logits_buffer(like: Tensor, rows: int, cols: int) -> Tensor:
    """Uninitialised (rows, cols) storage for a chunk of logits in ``like``'s dtype and device,
    rows _LOGITS_ROW_ALIGN-aligned apart (a plain contiguous tensor when cols is a multiple)."""
    stride = -(-cols // _LOGITS_ROW_ALIGN) * _LOGITS_ROW_ALIGN
    return like.new_empty((rows, stride))[:, :cols]


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """out = x @ weight^T + bias in place (``out``: rows of a _logits_buffer; ATen's GEMMs take
    its row stride as their leading dimension, no copy)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _chunk_logits(x: Tensor, weight: Tensor, bias: Optional[Tensor], out) -> Tensor:
    """One chunk's logits x @ weight^T + bias: where the CPU backend sends the product to
    oneDNN (``_cpu_matmul``), a new contiguous tensor (oneDNN writes no strided ``out``, and a
    copy into one would cost a pass over the logits); else written into ``out()``, a view of
    the loop's one buffer, made on first use."""
    if _cpu_matmul.routes_linear(x, weight, bias):
        return _cpu_matmul.linear(x, weight, bias)
    return _linear_into(out(), x, weight, bias)


def _lazy_buffer(like: Tensor, rows: int, cols: int):
    """A function returning one _logits_buffer(like, rows, cols), allocated at its first call."""
    held = []

    def get() -> Tensor:
        if not held:
            held.append(_logits_buffer(like, rows, cols))
        return held[0]
    return get


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b (out: rows of a contiguous tensor): as in _chunk_logits, oneDNN where the
    CPU backend routes the product there (then one copy of the product, the size of ``out``,
    not of the logits)."""
    if _cpu_matmul.routes_mm(a, b):
        out.copy_(_cpu_matmul.mm(a, b))
    else:
        torch.mm(a, b, out=out)


def _token_chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int):
    """(start, end, logits of x[start:end]) per chunk of ``chunk`` rows; the logits share one
    buffer, overwritten by the next chunk (or, on oneDNN, are a new tensor each: the loops
    over chunks drop each one, ``del logits``, before asking for the next, so that the
    allocator can hand its block to the next chunk instead of mapping fresh pages)."""
    n_tokens = x.shape[0]
    buf = _lazy_buffer(x, min(chunk, n_tokens), weight.shape[0])
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        yield start, end, _chunk_logits(x[start:end], weight, bias,
                                        lambda: buf()[:end - start])


def _linear_chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int,
                   row_fn, want_dx: bool, want_dw: bool, own_dtype: bool = False):
    """Shared loop: logits = x[s:e] @ W^T + b; ``row_fn(logits, s, e)`` may turn them into
    d loss / d logits in place; then dx[s:e] = dlogits @ W, dW += dlogits^T x, db += sum.
    dW and db add up in float32 (float64 for float64), or with ``own_dtype`` in the weight's
    own dtype, in place in the gradient itself (see check_accum_dtype)."""
    n_tokens = x.shape[0]
    want_db = bias is not None and (want_dx or want_dw)
    dx = x.new_empty(x.shape) if want_dx else None    # contiguous, as the fakes say
    acc = weight.dtype if own_dtype else _acc_dtype(weight.dtype)
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_dw else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if want_db else None
    for start, end, logits in _token_chunks(x, weight, bias, chunk):
        xc = x[start:end]
        row_fn(logits, start, end)
        if dx is not None:
            _mm_into(dx[start:end], logits, weight)
        if dw is not None:
            _addmm_acc(dw, logits.t(), xc)
        if db is not None:
            db.add_(logits.sum(0, dtype=acc))
        del logits, xc    # (see _token_chunks)
    return (dx if dx is not None else x.new_empty(0),
            dw.to(weight.dtype) if dw is not None else x.new_empty(0),
            db.to(bias.dtype) if db is not None else x.new_empty(0))


def default_vocab_chunk_size(n_tokens: int, hidden: int, vocab: int,
                             device: str = "cpu") -> int:
    """Vocabulary columns per chunk of ``chunk_over="vocab"``: a chunk of logits about as large
    as the hidden states (tokens * chunk ~= tokens * hidden, i.e. chunk ~= hidden), and never
    fewer than ``MIN_CHUNK_ROWS[device]`` columns. The floor has the reason of the token chunks'
    floor, with the roles swapped: every chunk adds dlogits @ W_chunk into the whole
    (tokens, hidden) fp32 accumulator of d input."""
    floor = MIN_CHUNK_ROWS.get(device, MIN_CHUNK_ROWS["cuda"])
    return max(1, min(vocab, max(floor, hidden)))


def _vocab_slices(vocab: int, chunk: int):
    for v0 in range(0, vocab, chunk):
        yield v0, min(v0 + chunk, vocab)


def _vocab_chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int):
    """(v0, v1, logits of columns v0:v1 for every token) per chunk of ``chunk`` vocabulary
    columns, in one buffer (as _token_chunks: the last chunk is usually narrower, and its
    rows stay aligned)."""
    vocab = weight.shape[0]
    buf = _lazy_buffer(x, x.shape[0], min(chunk, vocab))
    for v0, v1 in _vocab_slices(vocab, chunk):
        yield v0, v1, _chunk_logits(x, weight[v0:v1], None if bias is None else bias[v0:v1],
                                    lambda: buf()[:, :v1 - v0])


def _slice_target(target: Tensor, valid: Tensor, v0: int, v1: int) -> Tensor:
    """Each row's target column within [v0, v1), or -1 where it lies elsewhere (or is ignored)."""
    local = target - v0
    return torch.where(valid & (local >= 0) & (local < v1 - v0), local, -1)


def _merge_entropy(lse: Tensor, entropy: Tensor, lse_c: Tensor, ent_c: Tensor) -> Tensor:
    """Entropy of the softmax over two disjoint sets of classes from each set's lse and entropy:
    H = sum_k w_k (H_k + lse - lse_k), w_k = exp(lse_k - lse), lse = logaddexp(lse_1, lse_2).
    Every term is >= 0, so nothing cancels; a set with w_k = 0 (or all -inf, w_k = NaN)
    contributes 0, not 0 * inf."""
    merged = torch.logaddexp(lse, lse_c)
    out = torch.zeros_like(merged)
    for l_k, h_k in ((lse, entropy), (lse_c, ent_c)):
        w = torch.exp(l_k - merged)
        out += torch.where(w > 0, w * (h_k + (merged - l_k)), torch.zeros_like(w))
    return out


def _vocab_stats(kernels, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 valid: Tensor, chunk: int, inv_temperature: float = 1.0,
                 with_entropy: bool = False, with_sum: bool = False):
    """Pass 1 over vocabulary chunks: per token (s_t, lse, entropy, sum_z) of s = logits / T,
    one chunk of logits at a time. Each chunk's row kernel (token_logprobs_fwd) gives its
    lse_c and the entropy of the softmax within the chunk; lse merges by logaddexp, the
    entropy by _merge_entropy, both running in float64 (vectors of n_tokens: free, and many
    merges add no rounding of their own). s_t is gathered from the chunk that holds the target
    (0 where none does); sum_z (the logits' sum, for label smoothing) and entropy are None
    unless asked for."""
    n_tokens = x.shape[0]
    acc, f64 = _acc_dtype(x.dtype), torch.float64
    lse = torch.full((n_tokens,), -math.inf, dtype=f64, device=x.device)
    entropy = torch.zeros(n_tokens, dtype=f64, device=x.device) if with_entropy else None
    s_t = torch.zeros(n_tokens, dtype=acc, device=x.device)
    z_sum = torch.zeros(n_tokens, dtype=acc, device=x.device) if with_sum else None
    # a target in range for every row (column 0; its log-prob is not used): token_logprobs_fwd
    # returns 0 for the entropy of an ignored row, and the chunk's entropy may be needed here
    first = torch.zeros(n_tokens, dtype=torch.long, device=x.device)
    for v0, v1, logits in _vocab_chunks(x, weight, bias, chunk):
        _, ent_c, lse_c = kernels.token_logprobs_fwd(logits, first, -1, inv_temperature,
                                                     with_entropy)
        lse_c = lse_c.to(f64)
        if entropy is not None:
            entropy = _merge_entropy(lse, entropy, lse_c, ent_c.to(f64))
        lse = torch.logaddexp(lse, lse_c)
        local = _slice_target(target, valid, v0, v1)
        picked = logits.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1).to(acc)
        s_t = torch.where(local >= 0, picked * inv_temperature, s_t)
        if z_sum is not None:
            z_sum += logits.sum(1, dtype=acc)
        del logits    # (see _token_chunks)
    # A target outside [0, V) (unchecked: trusted_targets) lies in no chunk, so s_t would stay
    # 0 and its row's loss read as a finite number: a NaN lse makes the row NaN instead (its
    # loss, log-prob and, through the softmax of pass 2, its gradient), as the row kernels do.
    bad = valid & ((target < 0) | (target >= weight.shape[0]))
    lse = torch.where(bad, torch.full_like(lse, math.nan), lse)
    return s_t, lse.to(acc), None if entropy is None else entropy.to(acc), z_sum


def _vocab_ce_loss(kernels, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   valid: Tensor, chunk: int, label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """(loss, lse) per token over vocabulary chunks:
    loss = lse - (1 - eps) z_t - eps / V * sum_j z_j (0 on ignored rows)."""
    z_t, lse, _, z_sum = _vocab_stats(kernels, x, weight, bias, target, valid, chunk,
                                      with_sum=bool(label_smoothing))
    loss = lse - (1 - label_smoothing) * z_t
    if z_sum is not None:
        loss = loss - (label_smoothing / weight.shape[0]) * z_sum
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def _vocab_pass2(kernels, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 valid: Tensor, lse: Tensor, row_scale: Tensor, chunk: int, want_dx: bool,
                 want_dw: bool, *, target_coef: float, smoothing: float,
                 inv_temperature: float = 1.0, entropy: Optional[Tensor] = None,
                 grad_entropy: Optional[Tensor] = None,
                 own_dtype: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) from whole-vocabulary row statistics, one vocabulary chunk at a time: the
    chunk's logits are recomputed and turned into d loss / d logits in place by the slice
    kernel (cross_entropy_slice_bwd: row_scale, target_coef, smoothing, and the entropy term
    of token_logprobs), then dW[chunk] = dlogits^T x is written once, in its final dtype, by
    one GEMM over all tokens (as eager's weight gradient is, under the same cuBLAS reduction
    settings; no (vocab, hidden) buffer beside dW), db[chunk] = the column sums, and
    dx += dlogits @ W[chunk] is summed in an fp32 (tokens, hidden) buffer (with ``own_dtype``
    in dx itself, in its dtype)."""
    acc = _acc_dtype(x.dtype)
    want_db = bias is not None and (want_dx or want_dw)
    dx_acc = (torch.zeros(x.shape, dtype=x.dtype if own_dtype else acc, device=x.device)
              if want_dx else None)
    dw = weight.new_empty(weight.shape) if want_dw else None   # contiguous, as the fakes say
    db = bias.new_empty(bias.shape) if want_db else None
    scale = row_scale.to(acc).contiguous()
    for v0, v1, logits in _vocab_chunks(x, weight, bias, chunk):
        w_chunk = weight[v0:v1]
        kernels.cross_entropy_slice_bwd(logits, _slice_target(target, valid, v0, v1), lse,
                                        entropy, scale, grad_entropy, logits, inv_temperature,
                                        target_coef, smoothing)
        if dx_acc is not None:
            _addmm_acc(dx_acc, logits, w_chunk)
        if dw is not None:
            torch.mm(logits.t(), x, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = logits.sum(0, dtype=acc)
        del logits    # (see _token_chunks)
    return (dx_acc.to(x.dtype) if dx_acc is not None else x.new_empty(0),
            dw if dw is not None else x.new_empty(0),
            db if db is not None else x.new_empty(0))


def _lce_recomputes(dtype: torch.dtype, reduction: str, want_dx: bool, want_dw: bool) -> bool:
    """Whether the linear cross-entropy leaves its gradients to backward, which recomputes the
    logits: "none" (each token's grad_output is not known before), and "mean" over float16.
    There a gradient of (p - y) / N, computed before backward, rounds to fp16 before the loss
    scale reaches it, and flushes every p below ~N * 6e-8 to 0 (the underflow GradScaler is
    for); backward folds grad_output / N into the kernel's scale before its one rounding, as
    eager's softmax backward does. One more matmul, only for float16's "mean"."""
    return (want_dx or want_dw) and (reduction == "none" or _defers_mean(dtype, reduction))


@_eager.custom_op("fastattn::linear_cross_entropy_fwd", mutates_args=(),
                  device_types=_DEVICES)
def _linear_cross_entropy_fwd(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                              ignore_index: int, label_smoothing: float, reduction: str,
                              chunk_size: int, by_vocab: bool, want_dx: bool, want_dw: bool,
                              own_dtype: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dx, dW, db, lse) of cross_entropy(x @ W^T + b, target). For "mean"/"sum" the
    gradients asked for are computed in this same pass; they are empty otherwise ("none", and
    "mean" over float16, recompute the chunks in backward, see _lce_recomputes and
    linear_cross_entropy_bwd). ``by_vocab``: chunks of ``chunk_size`` vocabulary columns (two
    passes, see _vocab_stats and _vocab_pass2), else of token rows. ``own_dtype``: the gradient
    summed over chunks adds up in its own dtype (see check_accum_dtype).
    lse (per token) is returned only where backward needs it (by_vocab, recomputing)."""
    fn = "linear_cross_entropy"
    n_tokens = x.shape[0]
    _validate_targets(fn, target, weight.shape[0], ignore_index)
    recompute = _lce_recomputes(x.dtype, reduction, want_dx, want_dw)
    need_grad = (want_dx or want_dw) and not recompute
    valid = target != ignore_index
    acc = _acc_dtype(x.dtype)
    denominator = valid.sum(dtype=acc) if reduction == "mean" else None
    # The row kernels take a float32 scale: float64 token-chunk gradients are divided after,
    # at float64 precision (as in _ce_rows).
    divide_after = need_grad and denominator is not None and acc == torch.float64 and not by_vocab
    grad_scale = (denominator.reciprocal() if (need_grad and denominator is not None
                                               and not divide_after) else None)
    kernels, matmuls = _chunk_kernels(fn, x)
    lse_out = x.new_empty(0, dtype=_acc_dtype(x.dtype))
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)

    with torch.no_grad(), matmuls():
        if by_vocab:
            rows, lse = _vocab_ce_loss(kernels, x, weight, bias, target, valid, chunk_size,
                                       label_smoothing)
            if need_grad:
                per_row = (denominator.to(rows.dtype).reciprocal() if denominator is not None
                           else torch.ones((), dtype=rows.dtype, device=x.device))
                scale = torch.where(valid, per_row, torch.zeros_like(rows))
                dx, dw, db = _vocab_pass2(kernels, x, weight, bias, target, valid, lse, scale,
                                          chunk_size, want_dx, want_dw,
                                          target_coef=1.0 - label_smoothing,
                                          smoothing=label_smoothing / weight.shape[0],
                                          own_dtype=own_dtype)
            elif recompute:
                lse_out = lse
        else:
            rows = torch.empty(n_tokens, dtype=_acc_dtype(x.dtype), device=x.device)

            def row_fn(logits, start, end):
                rows[start:end] = kernels.cross_entropy_fwd(
                    logits, target[start:end], None, logits if need_grad else None, grad_scale,
                    ignore_index, label_smoothing, 0.0)

            if need_grad:
                dx, dw, db = _linear_chunks(x, weight, bias, chunk_size, row_fn, want_dx,
                                            want_dw, own_dtype)
                if divide_after:
                    for g in (dx, dw, db):
                        if g.numel():
                            g.div_(_nonzero(denominator, valid))
            else:
                for start, end, logits in _token_chunks(x, weight, bias, chunk_size):
                    row_fn(logits, start, end)
                    del logits    # (see _token_chunks)
    if reduction == "none":
        loss = rows
    else:
        loss = rows.sum() if denominator is None else rows.sum() / denominator
    # In the accumulation dtype: the public function rounds it to the input dtype, except under
    # autocast, where (as F.cross_entropy there) the loss stays fp32.
    return loss, dx, dw, db, lse_out


@_linear_cross_entropy_fwd.register_fake
def _(x, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, by_vocab,
      want_dx, want_dw, own_dtype):
    acc = _acc_dtype(x.dtype)
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=acc)
    recompute = _lce_recomputes(x.dtype, reduction, want_dx, want_dw)
    lse = x.new_empty(x.shape[0] if (by_vocab and recompute) else 0, dtype=acc)
    if recompute:
        want_dx = want_dw = False
    want_db = bias is not None and (want_dx or want_dw)
    return (loss, x.new_empty(x.shape) if want_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if want_dw else x.new_empty(0),
            bias.new_empty(bias.shape) if want_db else x.new_empty(0), lse)


@_eager.custom_op("fastattn::linear_cross_entropy_bwd", mutates_args=(),
                  device_types=_DEVICES)
def _linear_cross_entropy_bwd(grad_loss: Tensor, x: Tensor, weight: Tensor, target: Tensor,
                              bias: Optional[Tensor], lse: Optional[Tensor], ignore_index: int,
                              label_smoothing: float, chunk_size: int, want_dx: bool,
                              want_dw: bool, own_dtype: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward when the forward left the gradients out (_lce_recomputes): recomputes each
    chunk's logits and scales row r of their gradient by grad_loss[r] ("none": one per token)
    or by grad_loss itself (0-d: "mean" over float16, grad_output / denominator). With ``lse``
    (the forward's, per token) the chunks are of the vocabulary."""
    kernels, matmuls = _chunk_kernels("linear_cross_entropy", x)
    scale = grad_loss.to(torch.float32)

    with torch.no_grad(), matmuls():
        if lse is not None:
            valid = target != ignore_index
            scale = torch.where(valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))
            return _vocab_pass2(kernels, x, weight, bias, target, valid, lse, scale, chunk_size,
                                want_dx, want_dw, target_coef=1.0 - label_smoothing,
                                smoothing=label_smoothing / weight.shape[0],
                                own_dtype=own_dtype)

        def row_fn(logits, start, end):
            if scale.dim() == 0:    # the kernel scales before its one rounding to the dtype
                kernels.cross_entropy_fwd(logits, target[start:end], None, logits, scale,
                                          ignore_index, label_smoothing, 0.0)
                return
            kernels.cross_entropy_fwd(logits, target[start:end], None, logits, None,
                                      ignore_index, label_smoothing, 0.0)
            # (per-token scales in float32, or float64 for float64 logits: not rounded to fp32)
            logits.mul_(grad_loss[start:end].to(
                torch.promote_types(logits.dtype, torch.float32)).unsqueeze(1))

        return _linear_chunks(x, weight, bias, chunk_size, row_fn, want_dx, want_dw, own_dtype)


@_linear_cross_entropy_bwd.register_fake
def _(grad_loss, x, weight, target, bias, lse, ignore_index, label_smoothing, chunk_size, want_dx,
      want_dw, own_dtype):
    want_db = bias is not None and (want_dx or want_dw)
    return (x.new_empty(x.shape) if want_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if want_dw else x.new_empty(0),
            bias.new_empty(bias.shape) if want_db else x.new_empty(0))


def _lce_setup_context(ctx, inputs, output):
    (x, weight, target, bias, ignore_index, label_smoothing, reduction, chunk, by_vocab, want_dx,
     want_dw, own_dtype) = inputs
    _, dx, dw, db, lse = output
    ctx.mark_non_differentiable(dx, dw, db, lse)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradient outputs
    ctx.reduction, ctx.ignore_index, ctx.label_smoothing, ctx.chunk = (
        reduction, ignore_index, label_smoothing, chunk)
    ctx.want = (want_dx, want_dw)
    ctx.by_vocab, ctx.own_dtype = by_vocab, own_dtype
    ctx.has_bias = bias is not None
    ctx.backend = _backends.requested()
    ctx.recompute = _lce_recomputes(x.dtype, reduction, want_dx, want_dw)
    _eager.keep_anchors(ctx, x, weight, bias)
    if ctx.recompute:
        ctx.save_for_backward(x, weight, target, bias, lse)
        if reduction == "mean":     # no valid target: gradient 0, not 0 * inf
            count = _mean_denominator(target, None, ignore_index, torch.float32)
            ctx.inv_denominator = torch.where(count > 0, count.reciprocal(), 0.0)
    else:
        ctx.save_for_backward(dx, dw, db)


@_eager.first_order("fastattn.linear_cross_entropy")
def _lce_backward(ctx, grad_loss, *_unused):
    want_dx, want_dw = ctx.want
    if grad_loss is None:
        return (None,) * 12
    if ctx.recompute:
        x, weight, target, bias, lse = ctx.saved_tensors
        if ctx.reduction == "mean":
            grad_loss = grad_loss.to(torch.float32) * ctx.inv_denominator
        with _backends.restored(ctx.backend):
            dx, dw, db = _eager.call(
                _linear_cross_entropy_bwd, grad_loss, x, weight, target, bias,
                lse if ctx.by_vocab else None, ctx.ignore_index, ctx.label_smoothing, ctx.chunk,
                want_dx, want_dw, ctx.own_dtype)
    else:
        dx, dw, db = (_scaled(g, grad_loss) if g.numel() else g for g in ctx.saved_tensors)
    return (dx if want_dx else None, dw if want_dw else None, None,
            db if ctx.has_bias and db.numel() else None, None, None, None, None, None, None, None,
            None)


_eager.register_autograd(_linear_cross_entropy_fwd, _lce_backward,
                         setup_context=_lce_setup_context)


def check_chunk_over(fn: str, chunk_over: str) -> bool:
    """Whether ``chunk_over`` asks for vocabulary chunks; a clear error unless tokens/vocab."""
    if chunk_over not in ("tokens", "vocab"):
        raise ValueError(f"{fn}: chunk_over must be 'tokens' or 'vocab', got {chunk_over!r}")
    return chunk_over == "vocab"


def check_accum_dtype(fn: str, accum_dtype: Optional[torch.dtype],
                      weight: Optional[Tensor] = None) -> bool:
    """Whether ``accum_dtype`` asks the gradient that is summed over chunks (d weight and d bias
    over token chunks, d input over vocabulary chunks) to add up in place in its own dtype
    (``None``, as Liger-Kernel's default, or the weight's dtype) rather than in a float32
    buffer (``torch.float32``, the default; float64 stays float64). A clear error otherwise."""
    if accum_dtype is None:
        return True
    if accum_dtype == torch.float32:
        return False
    if weight is not None and accum_dtype == weight.dtype:
        return True
    own = "" if weight is None else f" or {weight.dtype} (the weight's)"
    raise ValueError(f"{fn}: accum_dtype must be torch.float32, None{own}, got {accum_dtype!r}")


def _check_linear(fn: str, x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                  chunk_size: Optional[int], by_vocab: bool = False) -> Tuple[Tensor, Tensor, int]:
    _check_float(fn, "input", x)
    _check_float(fn, "weight", weight)
    target = _check_target(fn, target)
    if x.dim() < 1:
        raise ValueError(f"{fn}: input must be (..., hidden), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be (vocab, hidden), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{fn}: input hidden size {x.shape[-1]} does not match weight "
                         f"{tuple(weight.shape)} (expected weight.shape[1] == {x.shape[-1]})")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must equal input shape "
                         f"without its last dimension, {tuple(x.shape[:-1])}")
    if bias is not None:
        _check_float(fn, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{fn}: input, weight and bias must share a dtype, got input {x.dtype}, "
                        f"weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))
    _check_same_device(fn, input=x, weight=weight, target=target, bias=bias)
    if weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight has 0 rows (vocab size 0)")
    # (math.prod, not numel(): a symbolic token count stays symbolic under torch.export)
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    n_tokens = x2.shape[0]
    if chunk_size is None:
        default = default_vocab_chunk_size if by_vocab else default_chunk_size
        chunk_size = default(n_tokens, weight.shape[1], weight.shape[0], weight.device.type)
    elif (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
          or chunk_size < 1):     # (numpy integers too, as for ignore_index)
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    else:
        chunk_size = int(chunk_size)
    extent = weight.shape[0] if by_vocab else n_tokens
    return x2, target.reshape(-1).contiguous(), max(1, min(chunk_size, max(extent, 1)))


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor,
                         bias: Optional[Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, *,
                         chunk_size: Optional[int] = None, chunk_over: str = "tokens",
                         accum_dtype: Optional[torch.dtype] = torch.float32) -> Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the full logits.

    ``input`` is ``(..., hidden)``, ``weight`` ``(vocab, hidden)``, ``target`` ``input.shape[:-1]``.
    For ``"mean"``/``"sum"`` the gradients are computed in the forward and backward only scales
    them; ``"none"`` computes them in backward (its per-token grad_output is not known before),
    and so does ``"mean"`` over float16, one more matmul, so that grad_output (a loss scale)
    and the 1/N reach the logits' gradient before it is rounded to fp16.
    Two ways to cut the logits, both summing every gradient in float32:

    * ``chunk_over="tokens"`` (default): ``chunk_size`` token rows at a time (default: a chunk of
      logits about the size of ``input``, at least 512 rows on CPUs and 2048 on GPUs). Each
      chunk's logits are turned into their gradient in place by the fused kernel, then ``d input``
      and ``d weight`` are taken from it: three matmuls of tokens x hidden x vocab in all (with
      ``"none"``: four). ``d weight`` is summed over the chunks in a float32 ``(vocab, hidden)``
      tensor: for bf16/fp16 weights a buffer of its own, twice the size of ``d weight``.
    * ``chunk_over="vocab"``: ``chunk_size`` vocabulary columns at a time (default: ``hidden``
      columns, at least 512 on CPUs and 2048 on GPUs), in two passes: the first finds each
      token's log-sum-exp over the whole vocabulary, the second recomputes each chunk's logits,
      turns them into their gradient and writes that chunk's rows of ``d weight`` once, in
      their final dtype, with one matmul over all tokens (as eager's own weight gradient).
      Four matmuls (one more than "tokens" for "mean"/"sum", as many for "none"), but no
      buffer beside ``d weight``: its float32 buffer is ``d input``'s ``(tokens, hidden)``.
      The choice for bf16/fp16 weights when the vocabulary is large and memory is short.

    ``accum_dtype=None`` (or the weight's dtype) sums that gradient -- ``d weight`` and ``d bias``
    over token chunks, ``d input`` over vocabulary chunks -- in itself, in its own bf16/fp16,
    as Liger-Kernel does by default: no float32 buffer beside it (for a bf16 weight, twice the
    weight's size saved over token chunks), at the price of one rounding per chunk instead of
    one in all (n chunks: about sqrt(n) times the rounding error of a float32 sum). Each
    chunk's own product is still summed in float32 by the matmul. For float32 and float64
    weights it changes nothing. The default ``chunk_size`` is not changed by it (on GPUs its
    2048-row floor, set by the float32 buffer's traffic, makes a chunk of logits of
    2048 x vocab); for the least memory pass ``chunk_size`` of about tokens * hidden / vocab
    rows, as ``make gpu-check``'s row "fastattn (bf16 d weight)" does.

    The loss and log-sum-exp are float32 numbers either way; over vocabulary chunks the loss is
    ``lse - z_target`` of two such numbers, so its absolute error is about ``ulp(lse)``
    (token chunks subtract relative to each row's max, which matters only for logits far from
    0, such as a common offset of 1e4).

    As with ``cross_entropy``, where the forward computed the gradients a backward scales them
    in place, so a second backward through the same graph (``retain_graph=True``) raises
    autograd's in-place error; compute the loss again instead.
    """
    fn = "linear_cross_entropy"
    ignore_index = _check_options(fn, reduction, label_smoothing, ignore_index)
    by_vocab = check_chunk_over(fn, chunk_over)
    autocast = isinstance(input, Tensor) and _autocast.dtype(input.device.type) is not None
    if autocast:
        input, weight, bias = _autocast.cast(input.device.type, input, weight, bias)
    x2, t2, chunk = _check_linear(fn, input, weight, target, bias, chunk_size, by_vocab)
    own_dtype = check_accum_dtype(fn, accum_dtype, weight)
    grad_on = torch.is_grad_enabled()
    want_dx = grad_on and input.requires_grad
    want_dw = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss, *_ = _in_target_shape(
        target.shape, _eager.call, _linear_cross_entropy_fwd, x2, weight, t2, bias, ignore_index,
        float(label_smoothing), reduction, chunk, by_vocab, want_dx, want_dw, own_dtype)
    if not autocast:
        loss = loss.to(input.dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Per-token log-probabilities (and entropy)
# --------------------------------------------------------------------------------------------

@_eager.custom_op("fastattn::token_logprobs_fwd", mutates_args=(), device_types=_DEVICES)
def _token_logprobs_fwd(logits: Tensor, target: Tensor, ignore_index: int, inv_temperature: float,
                        with_entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) per row of (R, V) logits, float32 (float64 for float64 logits)."""
    _validate_targets("token_logprobs", target, logits.shape[1], ignore_index)
    if logits.shape[0] == 0:
        empty = logits.new_empty(0, dtype=_acc_dtype(logits.dtype))
        return empty, empty.clone(), empty.clone()
    logp, entropy, lse = _kernels("token_logprobs", logits).token_logprobs_fwd(
        logits, target, ignore_index, inv_temperature, with_entropy)
    return logp, entropy, lse


@_token_logprobs_fwd.register_fake
def _(logits, target, ignore_index, inv_temperature, with_entropy):
    acc = _acc_dtype(logits.dtype)
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=acc), logits.new_empty(rows if with_entropy else 0, dtype=acc),
            logits.new_empty(rows, dtype=acc))


@_eager.custom_op("fastattn::token_logprobs_bwd", mutates_args=(), device_types=_DEVICES)
def _token_logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor,
                        target: Tensor, lse: Tensor, entropy: Tensor, ignore_index: int,
                        inv_temperature: float) -> Tensor:
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if logits.shape[0]:
        _kernels("token_logprobs", logits).token_logprobs_bwd(
            logits, target, lse, entropy if grad_entropy is not None else None,
            grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            grad, ignore_index, inv_temperature)
    return grad


@_token_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, target, lse, entropy, ignore_index, inv_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _tlp_setup_context(ctx, inputs, output):
    logits, target, ignore_index, inv_temperature, _ = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.ignore_index, ctx.inv_temperature = ignore_index, inv_temperature
    ctx.backend = _backends.requested()
    ctx.save_for_backward(logits, target, lse, entropy)


def _tlp_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, target, lse, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    with _backends.restored(ctx.backend):
        grad_entropy = None if grad_entropy is None else grad_entropy.to(lse.dtype)
        grad = _eager.call(_token_logprobs_bwd, grad_logp.to(lse.dtype), grad_entropy, logits,
                           target, lse, entropy, ctx.ignore_index, ctx.inv_temperature)
    return grad, None, None, None, None


_eager.register_autograd(_token_logprobs_fwd, _tlp_backward, setup_context=_tlp_setup_context)
_eager.no_double_backward(_token_logprobs_bwd, "fastattn.token_logprobs",
                          "torch.log_softmax and gather")


def _check_temperature(fn: str, temperature: float) -> float:
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"{fn}: temperature must be a Python number, got "
                        f"{type(temperature).__name__}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    inv = 1.0 / float(temperature)
    if not inv <= _FP32_MAX:   # the kernels scale the logits by it in float32
        raise ValueError(f"{fn}: temperature must be at least {1 / _FP32_MAX:.3g} (the logits are "
                         f"scaled by its reciprocal in float32), got {temperature!r}")
    return inv


_FP32_MAX = torch.finfo(torch.float32).max


def token_logprobs(logits: Tensor, target: Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100,
                   return_entropy: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """log softmax(logits / temperature)[target] per token, never materialising the log-softmax.

    ``logits`` is ``(..., vocab)`` and ``target`` ``logits.shape[:-1]``; the result has the shape of
    ``target`` and is float32 (float64 for float64 logits). Tokens whose target is
    ``ignore_index`` get 0 and no gradient. With ``return_entropy=True`` also returns the entropy
    of softmax(logits / temperature) per token. The forward reads the logits once; the backward
    reads them once more and writes their gradient.
    """
    fn = "token_logprobs"
    _check_float(fn, "logits", logits)
    target = _check_target(fn, target)
    ignore_index = _check_options(fn, "none", 0.0, ignore_index)  # per token
    inv_t = _check_temperature(fn, temperature)
    flag(fn, "return_entropy", return_entropy)
    if logits.dim() < 1:
        raise ValueError(f"{fn}: logits must have at least 1 dimension (..., vocab), got a "
                         f"0-dimensional tensor")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must equal logits shape "
                         f"without its last dimension, {tuple(logits.shape[:-1])}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{fn}: logits have 0 classes")
    _check_same_device(fn, logits=logits, target=target)
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1 and rows.shape[-1] != 1:
        rows = rows.contiguous()
    logp, entropy, _ = _in_target_shape(target.shape, _eager.call, _token_logprobs_fwd, rows,
                                        target.reshape(-1).contiguous(), ignore_index, inv_t,
                                        return_entropy)
    logp = logp.reshape(target.shape)
    return (logp, entropy.reshape(target.shape)) if return_entropy else logp


@_eager.custom_op("fastattn::linear_token_logprobs_fwd", mutates_args=(),
                  device_types=_DEVICES)
def _linear_token_logprobs_fwd(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                               ignore_index: int, inv_temperature: float, with_entropy: bool,
                               chunk_size: int, by_vocab: bool,
                               own_dtype: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) per token; ``own_dtype`` is for backward (a gradient summed over
    chunks adds up in its own dtype, see check_accum_dtype)."""
    fn = "linear_token_logprobs"
    _validate_targets(fn, target, weight.shape[0], ignore_index)
    n_tokens = x.shape[0]
    acc = _acc_dtype(x.dtype)
    kernels, matmuls = _chunk_kernels(fn, x)
    if by_vocab:
        valid = target != ignore_index
        with torch.no_grad(), matmuls():
            s_t, lse, entropy, _ = _vocab_stats(kernels, x, weight, bias, target, valid,
                                                chunk_size, inv_temperature, with_entropy)
        zero = torch.zeros_like(lse)
        return (torch.where(valid, s_t - lse, zero),
                torch.where(valid, entropy, zero) if with_entropy else lse.new_empty(0), lse)
    logp = torch.zeros(n_tokens, dtype=acc, device=x.device)
    entropy = torch.zeros(n_tokens if with_entropy else 0, dtype=acc, device=x.device)
    lse = torch.zeros(n_tokens, dtype=acc, device=x.device)
    with torch.no_grad(), matmuls():
        for start, end, logits in _token_chunks(x, weight, bias, chunk_size):
            lp, ent, ls = kernels.token_logprobs_fwd(logits, target[start:end], ignore_index,
                                                     inv_temperature, with_entropy)
            logp[start:end], lse[start:end] = lp, ls
            if with_entropy:
                entropy[start:end] = ent
            del logits    # (see _token_chunks)
    return logp, entropy, lse


@_linear_token_logprobs_fwd.register_fake
def _(x, weight, target, bias, ignore_index, inv_temperature, with_entropy, chunk_size, by_vocab,
      own_dtype):
    acc = _acc_dtype(x.dtype)
    n = x.shape[0]
    return (x.new_empty(n, dtype=acc), x.new_empty(n if with_entropy else 0, dtype=acc),
            x.new_empty(n, dtype=acc))


@_eager.custom_op("fastattn::linear_token_logprobs_bwd", mutates_args=(),
                  device_types=_DEVICES)
def _linear_token_logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], x: Tensor,
                               weight: Tensor, target: Tensor, bias: Optional[Tensor], lse: Tensor,
                               entropy: Tensor, ignore_index: int, inv_temperature: float,
                               chunk_size: int, by_vocab: bool, own_dtype: bool, want_dx: bool,
                               want_dw: bool) -> Tuple[Tensor, Tensor, Tensor]:
    kernels, matmuls = _chunk_kernels("linear_token_logprobs", x)
    grad_logp = grad_logp.contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()

    with torch.no_grad(), matmuls():
        if by_vocab:
            # d logp_r / d s = onehot - p: the slice kernel's row_scale is -grad_logp
            valid = target != ignore_index
            zero = torch.zeros_like(lse)
            return _vocab_pass2(
                kernels, x, weight, bias, target, valid, lse,
                torch.where(valid, -grad_logp.to(lse.dtype), zero), chunk_size, want_dx,
                want_dw, target_coef=1.0, smoothing=0.0, inv_temperature=inv_temperature,
                entropy=None if grad_entropy is None else entropy,
                grad_entropy=None if grad_entropy is None else torch.where(
                    valid, grad_entropy.to(lse.dtype), zero), own_dtype=own_dtype)

        def row_fn(logits, start, end):
            kernels.token_logprobs_bwd(
                logits, target[start:end], lse[start:end],
                None if grad_entropy is None else entropy[start:end], grad_logp[start:end],
                None if grad_entropy is None else grad_entropy[start:end], logits, ignore_index,
                inv_temperature)

        return _linear_chunks(x, weight, bias, chunk_size, row_fn, want_dx, want_dw, own_dtype)


@_linear_token_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, x, weight, target, bias, lse, entropy, ignore_index,
      inv_temperature, chunk_size, by_vocab, own_dtype, want_dx, want_dw):
    want_db = bias is not None and (want_dx or want_dw)
    return (x.new_empty(x.shape) if want_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if want_dw else x.new_empty(0),
            bias.new_empty(bias.shape) if want_db else x.new_empty(0))


def _ltlp_setup_context(ctx, inputs, output):
    x, weight, target, bias, ignore_index, inv_temperature, _, chunk, by_vocab, own_dtype = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, inv_temperature, chunk, by_vocab, own_dtype)
    ctx.has_bias = bias is not None
    ctx.backend = _backends.requested()
    ctx.save_for_backward(x, weight, target, bias, lse, entropy)


def _ltlp_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    x, weight, target, bias, lse, entropy = ctx.saved_tensors
    want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or (
        ctx.has_bias and ctx.needs_input_grad[3])
    if (grad_logp is None and grad_entropy is None) or not (want_dx or want_dw):
        return (None,) * 10
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    with _backends.restored(ctx.backend):
        grad_entropy = None if grad_entropy is None else grad_entropy.to(lse.dtype)
        dx, dw, db = _eager.call(_linear_token_logprobs_bwd, grad_logp.to(lse.dtype), grad_entropy,
                                 x, weight, target, bias, lse, entropy, *ctx.args, want_dx,
                                 want_dw)
    return (dx if want_dx else None, dw if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and db.numel() else None, None, None, None, None, None, None)


_eager.register_autograd(_linear_token_logprobs_fwd, _ltlp_backward,
                         setup_context=_ltlp_setup_context)
_eager.no_double_backward(_linear_token_logprobs_bwd, "fastattn.linear_token_logprobs",
                          "torch.nn.functional.linear, log_softmax and gather")


def linear_token_logprobs(hidden: Tensor, weight: Tensor, target: Tensor,
                          bias: Optional[Tensor] = None, *, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          chunk_size: Optional[int] = None,
                          chunk_over: str = "tokens", accum_dtype: Optional[torch.dtype] = torch.float32
                          ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``token_logprobs(F.linear(hidden, weight, bias), target, ...)`` chunk by chunk.

    ``hidden`` is ``(..., hidden)``, ``weight`` ``(vocab, hidden)``; neither pass holds more than
    one chunk of logits. Backward recomputes each chunk's logits (per-token grad_outputs, such as
    DPO or PPO weights, are only known then): with ``chunk_over="tokens"`` (default) chunks of
    token rows, ``d weight`` summed in a float32 ``(vocab, hidden)`` tensor (a buffer of its
    own for bf16/fp16 weights); with ``chunk_over="vocab"`` chunks of vocabulary columns, each
    slice of ``d weight`` written once (one GEMM over all tokens) and only ``d hidden`` summed
    in a float32 ``(tokens, hidden)`` buffer: the same number of matmuls, less memory for
    bf16/fp16 weights when the vocabulary outnumbers the tokens (see ``linear_cross_entropy``;
    the same ``chunk_size`` defaults, and the same ``accum_dtype``: ``None`` sums that gradient
    in itself, in the weight's bf16/fp16, with no float32 buffer). The entropy over vocabulary
    chunks is merged from the chunks' entropies as a sum of non-negative terms (no
    cancellation).
    """
    fn = "linear_token_logprobs"
    ignore_index = _check_options(fn, "none", 0.0, ignore_index)  # per token
    inv_t = _check_temperature(fn, temperature)
    flag(fn, "return_entropy", return_entropy)
    by_vocab = check_chunk_over(fn, chunk_over)
    if isinstance(hidden, Tensor):  # the matmul in the autocast dtype; log-probs stay fp32
        hidden, weight, bias = _autocast.cast(hidden.device.type, hidden, weight, bias)
    x2, t2, chunk = _check_linear(fn, hidden, weight, target, bias, chunk_size, by_vocab)
    own_dtype = check_accum_dtype(fn, accum_dtype, weight)
    logp, entropy, _ = _in_target_shape(target.shape, _eager.call, _linear_token_logprobs_fwd,
                                        x2, weight, t2, bias, ignore_index, inv_t,
                                        return_entropy, chunk, by_vocab, own_dtype)
    logp = logp.reshape(target.shape)
    return (logp, entropy.reshape(target.shape)) if return_entropy else logp
