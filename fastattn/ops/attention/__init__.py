"""Attention: registration, autograd and dispatch (the op's front door).

Public functions
----------------
``scaled_dot_product_attention``  the signature and semantics of
    ``torch.nn.functional.scaled_dot_product_attention`` (top-left causal, boolean or additive
    masks broadcastable to (B, H, Sq, Sk), ``enable_gqa``), so it can be swapped in by name.
``flash_attention``  the full-featured entry point: GQA/MQA, sliding window, soft-capping,
    dropout, the fp32 log-sum-exp as an output; causal is bottom-right aligned, as in
    FlashAttention (the same as top-left when Sq == Sk).
``varlen_attention``  packed sequences without padding (cu_seqlens), FlashAttention's varlen.
``decode_attention``  new query tokens against a KV cache of per-sequence length (split-KV).

Conventions: see ``reference.py``. A query row that can see no key (fully masked) gets output
0, log-sum-exp -inf and zero gradients, never NaN (PyTorch's SDPA returns NaN there). Inputs
with NaN give NaN, as in PyTorch. The log-sum-exp is returned detached: no gradient flows
through it. The backward pass is deterministic on every backend (no atomics), so
``deterministic=True`` costs nothing; the one exception is the opt-in benchmarking variant
FASTATTN_TRITON_DQ=atomic of the Triton backward (see triton.py), which warns once and which
``deterministic=True`` or ``torch.use_deterministic_algorithms(True)`` turns off.

Custom ops: ``fastattn::attention_fwd`` / ``_bwd``, ``fastattn::varlen_attention_fwd`` / ``_bwd``
and ``fastattn::decode_attention`` (inference, no autograd).
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op reads the annotations
# of the functions it registers and rejects them as strings.
import contextlib
import math
import operator
import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

from ... import _autocast, _backends, _eager
from .._args import dense, flag, real_number
from . import reference

_PKG = __name__
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
# Dense and varlen attention: Triton is the GPU kernel, the C++ one the CPU kernel. Decode has
# a CUDA split-KV kernel and a Triton one; CUDA is preferred where its shape limits allow.
_DENSE_DTYPES = {"cpu": _FLOAT, "triton": _FLOAT}
_DENSE_CUDA_ORDER = ("triton",)
_DECODE_DTYPES = {"cpu": _FLOAT, "triton": _FLOAT, "cuda": _FLOAT}
_DECODE_CUDA_ORDER = ("cuda", "triton")
# ... except for long caches on Hopper, where the Triton split-KV kernel reads faster. H200,
# bf16, B=8, H=32/8, D=128, two runs (2026-11-29): cache 32768: Triton 89% and 91% of copy
# bandwidth, CUDA 65% both times; cache 8192: CUDA 52% both times, Triton 42% and 27%. The
# cross-over between them is unmeasured, and so are other GPUs (which keep CUDA); the cache
# buffer's length (S_max) decides, as the valid lengths live on the device.
_TRITON_DECODE_FROM = 32768
_TRITON_DECODE_CAPABILITY = (9, 0)


def _prefer_triton_decode(k_cache: Tensor) -> bool:
    """Whether an unasked decode on this cache runs the Triton kernel instead of the CUDA one."""
    return (_backends.requested() == "auto" and k_cache.shape[2] >= _TRITON_DECODE_FROM
            and k_cache.is_cuda and not _backends._triton_interpret()
            and torch.cuda.get_device_capability(k_cache.device) >= _TRITON_DECODE_CAPABILITY
            and bool(_backends.status("triton")))


def _impl(op: str, x: Tensor, dtypes, cuda_order) -> tuple[str, object]:
    name = _backends.select(op, x.device, x.dtype, cuda_order=cuda_order, dtypes=dtypes,
                            dot=True)
    return name, _backends.implementation(name, _PKG)


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# flash_attention(deterministic=True), for the duration of the backward kernel it asked for: the
# request travels as an argument of the ops (so a torch.compile'd graph carries it too) and is
# set here only inside attention_bwd's body, which no tracer enters.
_DETERMINISTIC = threading.local()


@contextlib.contextmanager
def _deterministic(flag: bool):
    previous = getattr(_DETERMINISTIC, "on", False)
    _DETERMINISTIC.on = bool(flag)
    try:
        yield
    finally:
        _DETERMINISTIC.on = previous


def deterministic_requested() -> bool:
    """True in the backward of flash_attention(deterministic=True), or when
    torch.use_deterministic_algorithms(True) is on: no backward variant with atomics then."""
    return getattr(_DETERMINISTIC, "on", False) or torch.are_deterministic_algorithms_enabled()


def _last_contiguous(x: Tensor) -> Tensor:
    """x with a unit stride in its last dimension, as every kernel addresses head_dim: itself,
    a copy, or for a head_dim of 1 (whose stride, never stepped, may be anything: a strided
    slice, the stride-0 dout of ``.sum().backward()``) a view with stride 1 there."""
    if x.stride(-1) == 1:
        return x
    return x.squeeze(-1).unsqueeze(-1) if x.shape[-1] == 1 else x.contiguous()


def _as_bshd(t: Tensor) -> Tensor:
    """t in the dense op's output layout (reference.py's contract): itself when a kernel wrote
    it so, else a copy."""
    if t.stride() == reference.bshd_strides(t.shape):
        return t
    return reference.empty_bshd(t, t.shape).copy_(t)


# ---------------------------------------------------------------------------------------------
# Dense attention: fastattn::attention_fwd / attention_bwd
# ---------------------------------------------------------------------------------------------

@_eager.custom_op("fastattn::attention_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                  diag: int, window_left: int, window_right: int, softcap: float,
                  dropout_p: float, seed: int, deterministic: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention in the kernel contract of reference.py (validated inputs).
    ``deterministic`` is for the backward (autograd hands it on); no forward uses atomics."""
    _, impl = _impl("attention", q, _DENSE_DTYPES, _DENSE_CUDA_ORDER)
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch: zeros / -inf by definition
        impl = reference
    out, lse = impl.attention_fwd(q, k, v, bias, scale, diag, window_left, window_right, softcap,
                                  dropout_p, seed)
    return _as_bshd(out), lse


@attention_fwd.register_fake
def _(q, k, v, bias, scale, diag, window_left, window_right, softcap, dropout_p, seed,
      deterministic):
    return (reference.empty_bshd(q, q.shape),
            q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype)))


@_eager.custom_op("fastattn::attention_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  bias: Optional[Tensor], scale: float, diag: int, window_left: int,
                  window_right: int, softcap: float, dropout_p: float, seed: int,
                  deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out and lse; ``deterministic`` rules out a variant
    with atomics (see deterministic_requested)."""
    _, impl = _impl("attention", q, _DENSE_DTYPES, _DENSE_CUDA_ORDER)
    if q.numel() == 0 or k.numel() == 0:
        impl = reference
    with _deterministic(deterministic):
        grads = impl.attention_bwd(_last_contiguous(dout), q, k, v, out, lse, bias, scale, diag,
                                   window_left, window_right, softcap, dropout_p, seed)
    return tuple(_as_bshd(g) for g in grads)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias, scale, diag, window_left, window_right, softcap, dropout_p,
      seed, deterministic):
    return tuple(reference.empty_bshd(t, t.shape) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.params = params
    # Backward may run on another thread (CUDA), outside the caller's use_backend block.
    ctx.backend = _backends.requested()
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    # dlse is ignored: the public functions return lse detached.
    if dout is None:
        return (None,) * 12
    q, k, v, out, lse, bias = ctx.saved_tensors
    with _backends.restored(ctx.backend):
        dq, dk, dv = _eager.call(attention_bwd, dout, q, k, v, out, lse, bias, *ctx.params)
    return (dq, dk, dv) + (None,) * 9


_eager.register_autograd(attention_fwd, _attention_backward, setup_context=_attention_setup)
_eager.no_double_backward(attention_bwd, "fastattn.flash_attention / scaled_dot_product_attention",
                          "softmax(q k^T * scale) v in plain torch ops (or "
                          "torch.nn.functional.scaled_dot_product_attention under "
                          "torch.nn.attention.sdpa_kernel(SDPBackend.MATH): its fused "
                          "kernels have no double backward either)")


# ---------------------------------------------------------------------------------------------
# Packed sequences: fastattn::varlen_attention_fwd / _bwd
# ---------------------------------------------------------------------------------------------

def _varlen_impl(q: Tensor, k: Tensor):
    name, impl = _impl("varlen_attention", q, _DENSE_DTYPES, _DENSE_CUDA_ORDER)
    if q.numel() == 0 or k.numel() == 0:
        return reference.varlen_fwd, reference.varlen_bwd
    if name == "cpu":  # the C++ kernels take the op's arguments as they are
        return impl.varlen_attention_fwd, impl.varlen_attention_bwd
    return impl.varlen_fwd, impl.varlen_bwd


@_eager.custom_op("fastattn::varlen_attention_fwd", mutates_args=(),
                  device_types=("cpu", "cuda"))
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    return _varlen_impl(q, k)[0](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              scale, causal)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))


@_eager.custom_op("fastattn::varlen_attention_bwd", mutates_args=(),
                  device_types=("cpu", "cuda"))
def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float,
                         causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _varlen_impl(q, k)[1](_last_contiguous(dout), q, k, v, out, lse, cu_seqlens_q,
                              cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal)


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = params
    ctx.backend = _backends.requested()
    ctx.set_materialize_grads(False)


def _varlen_backward(ctx, dout, dlse):
    if dout is None:
        return (None,) * 9
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    with _backends.restored(ctx.backend):
        dq, dk, dv = _eager.call(varlen_attention_bwd, dout, q, k, v, out, lse, cu_q, cu_k,
                                  *ctx.params)
    return (dq, dk, dv) + (None,) * 6


_eager.register_autograd(varlen_attention_fwd, _varlen_backward, setup_context=_varlen_setup)
_eager.no_double_backward(varlen_attention_bwd, "fastattn.varlen_attention",
                          "softmax(q k^T * scale) v per sequence in plain torch ops")


# ---------------------------------------------------------------------------------------------
# KV-cache decoding: fastattn::decode_attention
# ---------------------------------------------------------------------------------------------

def _cuda_decode_supports(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Optional[str]:
    """None if the CUDA decode kernel takes these inputs (the checks of its binding), else why
    not; the Triton kernel takes the rest."""
    d = q.shape[-1]
    if d % 8 or not 16 <= d <= 256:
        return f"head_dim {d} (it takes multiples of 8 from 16 to 256)"
    if (q.shape[1] // k_cache.shape[1]) * q.shape[2] > 8 * 65535:
        return "more than 524280 query rows per kv head"
    if k_cache.shape[2] > 2 ** 30:
        return "caches of more than 2^30 positions"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):  # 16-byte vector loads
        e = t.element_size()
        if t.data_ptr() % 16 or any(s * e % 16 for s, n in zip(t.stride()[:-1], t.shape[:-1])
                                    if n > 1):
            return f"{name} rows that are not 16-byte aligned"
    return None


@_eager.custom_op("fastattn::decode_attention", mutates_args=(),
                  device_types=("cpu", "cuda"))
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                        scale: float, num_splits: int) -> tuple[Tensor, Tensor]:
    name, impl = _impl("decode_attention", q, _DECODE_DTYPES, _DECODE_CUDA_ORDER)
    if name == "cuda" and _prefer_triton_decode(k_cache):
        name, impl = "triton", _backends.implementation("triton", _PKG)
    if q.numel() == 0 or k_cache.numel() == 0:
        return reference.decode_fwd(q, k_cache, v_cache, cache_seqlens, scale, num_splits)
    if name == "cuda":
        why = _cuda_decode_supports(q, k_cache, v_cache)
        if why is None:
            out, lse = impl.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, num_splits)
            return out, lse
        if _backends.requested() == "cuda":
            raise _backends.BackendError(f"decode_attention: backend 'cuda' does not support {why}; "
                                         f"use backend 'triton'")
        impl = _backends.implementation("triton", _PKG)
        name = "triton"
    if name == "triton":
        from . import triton_decode
        return triton_decode.decode_fwd(q, k_cache, v_cache, cache_seqlens, scale, num_splits)
    if name == "cpu":   # (the dense kernel's out is stored (B, S, H, D); decode's is contiguous)
        out, lse = reference.decode_fwd(q, k_cache, v_cache, cache_seqlens, scale, num_splits,
                                        dense_fwd=impl.attention_fwd)
        return out.contiguous(), lse
    return reference.decode_fwd(q, k_cache, v_cache, cache_seqlens, scale, num_splits)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, num_splits):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _decode_setup(ctx, inputs, output):
    pass


def _decode_backward(ctx, dout, dlse):
    # A formula that refuses, so that the error names the op and the way out (without one,
    # autograd's message says only that no formula was registered).
    raise RuntimeError("decode_attention has no backward: it is the inference step of a KV "
                       "cache (generate()). Train with flash_attention or "
                       "scaled_dot_product_attention, or call decode_attention under "
                       "torch.no_grad()")


_eager.register_autograd(decode_attention_op, _decode_backward, setup_context=_decode_setup)


# ---------------------------------------------------------------------------------------------
# Argument checks and mask handling (shared by the public functions)
# ---------------------------------------------------------------------------------------------

def _check_float(fn: str, **tensors: Tensor) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        dense(fn, name, t)
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of {first_name} ({first.dtype}), "
                            f"got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} must be on the device of {first_name} "
                             f"({first.device}), got {t.device}")


def _check_qkv4(fn: str, q: Tensor, k: Tensor, v: Tensor, gqa: bool,
                shown: Optional[tuple] = None) -> None:
    """q, k, v in the (B, H, S, D) layout. ``shown``: the caller's tensors, when q, k, v are
    views of them in that layout (varlen's (tokens, H, D)), so that messages give their shapes."""
    _check_float(fn, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
    sq, sk, sv = (tuple(t.shape) for t in (shown or (q, k, v)))
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{fn}: q, k, v must have one batch size, got shapes {sq}, {sk}, {sv}")
    if k.shape[3] != q.shape[3]:     # (before k against v: the message names the odd one out)
        raise ValueError(f"{fn}: k must have q's head_dim {q.shape[3]}, got {k.shape[3]}")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: v must have the shape of k {sk}, got {sv}"
                         + (" (a value head_dim different from the query's is not supported)"
                            if k.shape[:3] == v.shape[:3] else ""))
    if q.shape[3] == 0:
        raise ValueError(f"{fn}: head_dim must be at least 1, got shape {sq}")
    hq, hkv = q.shape[1], k.shape[1]
    if (hkv == 0 and hq != 0) or (hkv and hq % hkv):
        raise ValueError(f"{fn}: the heads of q ({hq}) must be a multiple of the heads of k and "
                         f"v ({hkv})")
    if hq != hkv and hkv != 1 and not gqa:  # one kv head is plain broadcasting in PyTorch
        raise ValueError(f"{fn}: q has {hq} heads but k and v have {hkv}; pass enable_gqa=True "
                         f"for grouped-query attention")


def _check_scale(fn: str, scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = real_number(fn, "scale", scale)
    if not -math.inf < scale < math.inf:
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return scale


def _check_dropout(fn: str, dropout_p: float, name: str = "dropout_p",
                   allow_one: bool = False) -> float:
    """A dropout probability in [0, 1) (the kernels'), or [0, 1] with ``allow_one`` (a caller
    that serves 1 another way)."""
    dropout_p = real_number(fn, name, dropout_p)
    if not (0.0 <= dropout_p < 1.0 or (allow_one and dropout_p == 1.0)):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{fn}: {name} must be in {interval}, got {dropout_p}")
    return dropout_p


def _check_mask(fn: str, name: str, mask: Tensor, device: torch.device) -> None:
    """A mask argument is a tensor on the query's device (another device would reach the op
    as a mix of devices)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{fn}: {name} must be on the query's device ({device}), got "
                         f"{mask.device}")


def _draw_seed(dropout_p: float) -> int:
    # From the CPU generator: no device sync; torch.manual_seed makes it reproducible.
    if dropout_p == 0.0:
        return 0
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


def _float_mask_to_fp32(mask: Tensor) -> Tensor:
    """A float additive mask in the kernels' fp32. A float64 value past fp32's range (finfo.min
    as a "masked" marker, say) is clamped to fp32's largest finite value, so a finite mask stays
    finite: rounding it to -inf would turn a row torch softmaxes uniformly into a dead row."""
    if mask.dtype == torch.float64:
        big = torch.finfo(torch.float32).max
        mask = torch.where(mask.isinf(), mask, mask.clamp(-big, big))
    return mask.to(torch.float32)


def _mask_to_bias(fn: str, mask: Tensor, device: torch.device, full: tuple,
                  q4_shape) -> Tensor:
    """An SDPA attn_mask (bool: True = attend; float: added to the scores) as the kernels'
    fp32 additive bias of shape (B, H, Sq, Sk): converted at the mask's own size, then
    broadcast with stride 0 to ``full`` and flattened to ``q4_shape``. The flattening is a view
    for 3-D and 4-D inputs; with more leading dims, a mask broadcast over only some of them is
    copied at full size by it (as the inputs are)."""
    _check_mask(fn, "attn_mask", mask, device)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill(~mask, float("-inf"))
    elif mask.is_floating_point():
        bias = _float_mask_to_fp32(mask.detach())
    else:
        raise TypeError(f"{fn}: attn_mask must be bool or floating point, got {mask.dtype}")
    try:
        bias = bias.expand(full)
    except RuntimeError:
        raise ValueError(f"{fn}: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"{full}") from None
    return bias.reshape(q4_shape)


def _run_dense(q, k, v, bias, scale, diag, window_left, window_right, softcap, dropout_p,
               deterministic=False):
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    seed = _draw_seed(dropout_p)
    return _eager.call(attention_fwd, q, k, v, bias, scale, diag, window_left, window_right,
                       softcap, dropout_p, seed, bool(deterministic))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

# F.scaled_dot_product_attention(..., enable_gqa=True) exists from torch 2.5
_SDPA_HAS_GQA = torch.__version__ >= (2, 5)     # a TorchVersion: PEP 440 comparisons


def _torch_sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """PyTorch's SDPA for the calls the fused kernels do not serve (scaled_dot_product_attention
    says which); before torch 2.5 (no enable_gqa) the key/value heads are repeated."""
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        hq, hkv = query.shape[-3], key.shape[-3]
        if hkv == 0 or hq % hkv or value.dim() < 3 or value.shape[-3] != hkv:
            raise ValueError(f"{fn}: the heads of query ({hq}) must be a multiple of the heads "
                             f"of key and value, got shapes {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        if _SDPA_HAS_GQA:
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)
        key, value = (x.repeat_interleave(hq // hkv, dim=-3) for x in (key, value))
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask,
                                                            dropout_p, is_causal, scale=scale)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    query ``(..., Hq, L, E)``, key/value ``(..., H, S, E)``, the batch dimensions ``...`` and,
    without ``enable_gqa``, the heads broadcasting as in PyTorch (a 3-D input's first dimension
    plays the heads' part, a 2-D one is a single head);
    ``attn_mask`` boolean (True = take part) or additive float, broadcastable to
    ``(..., Hq, L, S)``; ``is_causal`` is top-left aligned (query i sees keys j <= i) and cannot
    be combined with a mask, as in PyTorch. Dropout is applied whenever ``dropout_p > 0``, as in
    PyTorch (pass ``dropout_p if self.training else 0.0``). A query row with no visible key
    returns 0 (older PyTorch releases return NaN; a call served by PyTorch, below, gives
    its result). Calls outside the fused kernels' range are served by
    PyTorch's own ``scaled_dot_product_attention`` (as ``fastattn.nn.MultiheadAttention``
    serves its own such cases), so a drop-in never fails where PyTorch succeeds: a value head
    dim other than the query's, an ``attn_mask`` that requires grad while grad is enabled (a
    learned bias: the kernels give none to it), and ``dropout_p=1``.
    """
    fn = "scaled_dot_product_attention"
    if isinstance(query, Tensor):
        query, key, value = _autocast.cast(query.device.type, query, key, value)
    _check_float(fn, query=query, key=key, value=value)
    flag(fn, "is_causal", is_causal)
    flag(fn, "enable_gqa", enable_gqa)
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise ValueError(f"{fn}: query, key and value must have rank >= 2 "
                         f"(..., heads, seq, head_dim), got shapes {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if attn_mask is not None and is_causal:
        raise ValueError(f"{fn}: pass either attn_mask or is_causal=True, not both (as in PyTorch)")
    if attn_mask is not None:
        _check_mask(fn, "attn_mask", attn_mask, query.device)
    dropout_p = _check_dropout(fn, dropout_p, allow_one=True)
    if dropout_p == 1.0 or value.shape[-1] != query.shape[-1] == key.shape[-1] or (
            attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()):
        _check_scale(fn, scale, query.shape[-1])
        return _torch_sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale,
                           enable_gqa)
    shapes = tuple(tuple(x.shape) for x in (query, key, value))
    query, key, value = (x if x.dim() > 2 else x.unsqueeze(0) for x in (query, key, value))
    # Dimension -3 is the heads (the batch of a 3-D input); those before it (and without
    # enable_gqa the heads too) broadcast as in PyTorch and are flattened into one batch
    # dimension (a copy only where broadcast).
    shared = 3 if enable_gqa else 2
    try:
        lead = torch.broadcast_shapes(*(x.shape[:-shared] for x in (query, key, value)))
    except RuntimeError:
        heads_only = False
        if not enable_gqa:
            try:
                torch.broadcast_shapes(*(x.shape[:-3] for x in (query, key, value)))
                heads_only = True       # the batch dimensions broadcast: the heads do not
            except RuntimeError:
                pass
        raise ValueError(f"{fn}: the {'head' if heads_only else 'batch'} dimensions of query, "
                         f"key and value do not broadcast, got shapes {shapes[0]}, {shapes[1]}, "
                         f"{shapes[2]}" + (" (enable_gqa=True: fewer key/value heads)"
                                           if heads_only else "")) from None
    lead = tuple(lead)
    if enable_gqa:
        sizes = [lead + tuple(x.shape[-3:]) for x in (query, key, value)]
    else:
        lead, heads = lead[:-1], lead[-1]
        sizes = [lead + (heads,) + tuple(x.shape[-2:]) for x in (query, key, value)]
    batch = math.prod(lead)
    q, k, v = (x.expand(size).reshape((batch,) + size[len(lead):])
               for x, size in zip((query, key, value), sizes))
    _check_qkv4(fn, q, k, v, gqa=enable_gqa)
    scale = _check_scale(fn, scale, q.shape[-1])
    bias = None
    if attn_mask is not None:
        bias = _mask_to_bias(fn, attn_mask, q.device,
                             tuple(lead) + (q.shape[1], q.shape[2], k.shape[2]),
                             q.shape[:3] + (k.shape[2],))
    out, _ = _run_dense(q, k, v, bias, scale, 0, -1, 0 if is_causal else -1, 0.0, dropout_p)
    out = out.view(lead + tuple(out.shape[1:]))
    return out.squeeze(0) if max(len(shape) for shape in shapes) == 2 else out


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, window: Sequence[int] = (-1, -1),
                    softcap: float = 0.0, dropout_p: float = 0.0, return_lse: bool = False,
                    deterministic: bool = False):
    """Fused attention with FlashAttention's features, in the SDPA layout.

    q ``(B, H, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` with Hkv dividing H (GQA; MQA when
    Hkv = 1). ``causal``: bottom-right aligned like FlashAttention (query i sees keys
    j <= i + Sk - Sq; the same as PyTorch's top-left when Sq == Sk). ``window = (left, right)``:
    query i sees keys in [i + Sk - Sq - left, i + Sk - Sq + right], -1 meaning unbounded;
    ``causal`` sets right = 0. ``softcap > 0`` caps the scores to ``softcap * tanh(s / softcap)``
    (Gemma 2). ``dropout_p`` drops attention probabilities (counter-based RNG seeded from
    torch's generator; backward regenerates the mask). With ``return_lse`` returns
    ``(out, lse)``, lse ``(B, H, Sq)`` fp32 (natural log, -inf for rows that see no key),
    detached. ``deterministic``: every fastattn backward is deterministic by default; True
    also keeps this call's backward off the opt-in FASTATTN_TRITON_DQ=atomic variant of the
    Triton backward (as ``torch.use_deterministic_algorithms(True)`` does for every call).
    """
    fn = "flash_attention"
    if isinstance(q, Tensor):
        q, k, v = _autocast.cast(q.device.type, q, k, v)
    _check_qkv4(fn, q, k, v, gqa=True)
    for name, value in (("causal", causal), ("return_lse", return_lse),
                        ("deterministic", deterministic)):
        flag(fn, name, value)
    scale = _check_scale(fn, scale, q.shape[-1])
    dropout_p = _check_dropout(fn, dropout_p)
    try:
        left, right = (operator.index(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: window must be a pair of ints (left, right), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{fn}: window sizes must be >= 0, or -1 for unbounded, got {window!r}")
    if causal:
        right = 0
    # a window reaching past every key is unbounded (and must not overflow the kernels' index
    # arithmetic: i + (Sk - Sq) + right is computed in int64)
    reach = q.shape[2] + k.shape[2]
    left, right = (-1 if w >= reach else w for w in (left, right))
    softcap = real_number(fn, "softcap", softcap)
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"{fn}: softcap must be >= 0 (0 disables it), got {softcap}")
    out, lse = _run_dense(q, k, v, None, scale, k.shape[2] - q.shape[2], left, right, softcap,
                          dropout_p, deterministic)
    return (out, lse.detach()) if return_lse else out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: Optional[float] = None) -> Tensor:
    """Attention over packed sequences with no padding (FlashAttention's varlen interface).

    q ``(total_q, H, D)``, k and v ``(total_k, Hkv, D)``; ``cu_seqlens_q/k`` int32 ``(N + 1,)``
    prefix sums of the sequence lengths (starting at 0, ending at total), on q's device;
    ``max_seqlen_q/k`` the longest lengths. Sequence n's queries attend only to its own keys;
    ``causal`` is bottom-right aligned per sequence. Returns ``(total_q, H, D)``.
    """
    fn = "varlen_attention"
    if isinstance(q, Tensor):
        q, k, v = _autocast.cast(q.device.type, q, k, v)
    _check_float(fn, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, head_dim), got shape "
                             f"{tuple(t.shape)}")
    _check_qkv4(fn, q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                v.unsqueeze(0).transpose(1, 2), gqa=True, shown=(q, k, v))
    flag(fn, "causal", causal)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(f"{fn}: {name} must be an int32 tensor (num_seqs + 1,), got "
                            f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__} "
                            f"{tuple(cu.shape) if isinstance(cu, Tensor) else ''}")
        if cu.device != q.device:
            raise ValueError(f"{fn}: {name} must be on q's device ({q.device}), got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    # The kernels' grids follow max_seqlen: no sequence is longer than all of them together, so
    # a larger value (a padded batch's length, say) is cut to the token count instead of
    # launching empty blocks by the million.
    maxes = []
    for name, mx, total in (("max_seqlen_q", max_seqlen_q, q.shape[0]),
                            ("max_seqlen_k", max_seqlen_k, k.shape[0])):
        if isinstance(mx, bool):
            raise TypeError(f"{fn}: {name} must be an int, got bool")
        # (an int, symbolic under torch.compile, is taken as it is: index() would specialize
        # the compiled graph to its value, one compile per length)
        if not isinstance(mx, (int, torch.SymInt)):
            try:
                mx = operator.index(mx)
            except TypeError:
                raise TypeError(f"{fn}: {name} must be an int, got {type(mx).__name__}") from None
        if mx < 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {mx}")
        maxes.append(min(mx, total))   # (a guard mx <= total, not one per value)
    max_seqlen_q, max_seqlen_k = maxes
    # Cheap on the CPU; on a GPU it would cost a sync (callers own the values there), and in
    # a compiled graph it would be data-dependent control flow.
    if q.device.type == "cpu" and not _compiling():
        for name, cu, total, mx in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                    ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            lens = cu.diff()
            if cu[0] != 0 or cu[-1] != total or bool((lens < 0).any()):
                raise ValueError(f"{fn}: {name} must rise from 0 to the token count {total}, got "
                                 f"{cu.tolist()}")
            if int(lens.max()) > mx:
                raise ValueError(f"{fn}: max_seqlen ({mx}) is smaller than the longest sequence "
                                 f"in {name} ({int(lens.max())})")
    scale = _check_scale(fn, scale, q.shape[-1])
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out, _ = _eager.call(varlen_attention_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, scale, bool(causal))
    return out


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                     scale: Optional[float] = None, num_splits: int = 0) -> Tensor:
    """Attention of a few new query tokens against a KV cache (flash-decoding, split over the
    cache length so that a small batch still fills the GPU). Inference only: no autograd.

    q ``(B, H, Sq, D)``; ``k_cache``, ``v_cache`` ``(B, Hkv, S_max, D)`` with Hkv dividing H;
    ``cache_seqlens`` int32 ``(B,)``: the valid cache positions of each sequence, counting the
    Sq new tokens (already written to the cache), so Sq <= L_b <= S_max. New token i of sequence
    b sees positions ``j <= L_b - Sq + i``. ``num_splits`` 0 picks the split count from the
    device. On the CPU out-of-range lengths raise; on a GPU checking them would cost a sync,
    and under torch.compile it would be data-dependent control flow, so there the kernels
    clamp them to [0, S_max] (they never read outside the cache).
    """
    fn = "decode_attention"
    if isinstance(q, Tensor):
        q, k_cache, v_cache = _autocast.cast(q.device.type, q, k_cache, v_cache)
    _check_qkv4(fn, q, k_cache, v_cache, gqa=True)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 \
            or cache_seqlens.shape != (q.shape[0],):
        raise TypeError(f"{fn}: cache_seqlens must be an int32 tensor of shape ({q.shape[0]},), "
                        f"got {cache_seqlens.dtype if isinstance(cache_seqlens, Tensor) else type(cache_seqlens).__name__}"
                        f" {tuple(cache_seqlens.shape) if isinstance(cache_seqlens, Tensor) else ''}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"{fn}: cache_seqlens must be on q's device ({q.device}), got "
                         f"{cache_seqlens.device}")
    try:
        num_splits = operator.index(num_splits)
    except TypeError:
        raise TypeError(f"{fn}: num_splits must be an int (0 = automatic), got "
                        f"{type(num_splits).__name__} {num_splits!r}") from None
    if num_splits < 0:
        raise ValueError(f"{fn}: num_splits must be >= 0 (0 = automatic), got {num_splits}")
    if q.device.type == "cpu" and not _compiling() and cache_seqlens.numel():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < q.shape[2] or hi > k_cache.shape[2]:
            raise ValueError(f"{fn}: cache_seqlens must lie in [Sq, S_max] = [{q.shape[2]}, "
                             f"{k_cache.shape[2]}] (they count the new tokens), got "
                             f"{cache_seqlens.tolist()}")
    scale = _check_scale(fn, scale, q.shape[-1])
    q, k_cache, v_cache = (_last_contiguous(x) for x in (q, k_cache, v_cache))
    cache_seqlens = cache_seqlens.contiguous()
    out, _ = _eager.call(decode_attention_op, q, k_cache, v_cache, cache_seqlens, scale,
                         int(num_splits))
    return out
