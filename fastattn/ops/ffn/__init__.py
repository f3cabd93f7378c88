"""Fused FFN blocks (MLP and SwiGLU): registration, autograd and dispatch (the op's front door).

Eager PyTorch keeps the pre-activation h and the activation a = act(h) of an MLP for backward
(and for SwiGLU the gate g, act(g), the up projection u and their product m). Here only h (or
g and u) is kept; a (or m) is recomputed in backward in the same pass that applies act', so the
saved activation memory of the hidden layer halves. The math is in ``reference.py``.

Backends: ``cpu`` and ``cuda`` run library matmuls around fused elementwise kernels (bias is
folded into the matmul; act, act' and the GLU product run in one vectorised pass each): cuBLAS
on the GPU, and on the CPU oneDNN for the forward and input-gradient products and MKL for the
weight gradients (``ops/_cpu_matmul.py`` says why); ``triton`` runs matmul kernels with the
activation fused into their epilogues; ``reference`` is the same composition in plain PyTorch.

Custom ops: ``fastattn::mlp_fwd`` / ``mlp_bwd`` and ``fastattn::swiglu_fwd`` / ``swiglu_bwd``
on 2-D inputs (the public functions flatten leading dimensions).
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op reads the annotations
# of the functions it registers and rejects them as strings.
import math
from typing import Optional

import torch
from torch import Tensor

from ... import _autocast, _backends, _eager
from .. import _cpu_matmul as matmuls
from .._args import dense
from . import reference
from .reference import ACTIVATIONS

_PKG = __name__
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = {"cpu": _FLOAT, "cuda": _FLOAT, "triton": _FLOAT}
# cuBLAS + fused elementwise first: the Triton matmul must prove itself faster per shape
# (benchmarks/gpu_bench.py) before it becomes the default.
_CUDA_ORDER = ("cuda", "triton")


def _impl(op: str, x: Tensor):
    name = _backends.select(op, x.device, x.dtype, cuda_order=_CUDA_ORDER, dtypes=_DTYPES,
                            dot=True)
    return name, _backends.implementation(name, _PKG)


def _colsum(t: Tensor) -> Tensor:
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32)).to(t.dtype)


def _maybe(flag: bool, make, like: Tensor) -> Tensor:
    """make() or, for an absent bias, an empty placeholder (custom ops return tensors only)."""
    return make() if flag else like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# MLP: out = act(x W1^T + b1) W2^T + b2
# ---------------------------------------------------------------------------------------------

@_eager.custom_op("fastattn::mlp_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def mlp_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            activation: str) -> tuple[Tensor, Tensor]:
    """(out, h): the block's output and the pre-activation h saved for backward."""
    name, impl = _impl("mlp", x)
    if name == "triton":
        h, a = impl.linear_act(x, w1, b1, activation)
        out, _ = impl.linear_act(a, w2, b2, None)
    else:
        with matmuls.enabled(name == "cpu"):
            h = matmuls.linear(x, w1, b1)
            a = impl.act_fwd(h, activation)
            out = matmuls.linear(a, w2, b2)
    return out, h


@mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, activation):
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


@_eager.custom_op("fastattn::mlp_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def mlp_bwd(dout: Tensor, x: Tensor, w1: Tensor, h: Tensor, w2: Tensor, activation: str,
            has_b1: bool, has_b2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2); an absent bias gets an empty tensor."""
    name, impl = _impl("mlp", x)
    dout = dout.contiguous()
    # The recomputed activation a is dropped as soon as dw2 is made, and on the CPU dh is
    # written over d a (a product of our own, read once): two (T, F) buffers less at the
    # backward's peak than holding all three to the end.
    if name == "triton":
        dh, a = impl.matmul_act_grad(dout, w2, h, activation)
        dw2 = impl.matmul(dout.t(), a.t())
        del a
        dw1 = impl.matmul(dh.t(), x.t())
        dx = impl.matmul(dh, w1.t())
    else:
        extra = {"overwrite_da": True} if name == "cpu" else {}
        with matmuls.enabled(name == "cpu"):
            dh, a = impl.act_bwd(matmuls.mm(dout, w2), h, activation, **extra)
            dw2 = dout.t() @ a
            del a
            dw1 = dh.t() @ x
            dx = matmuls.mm(dh, w1)
    return (dx, dw1, _maybe(has_b1, lambda: _colsum(dh), dout), dw2,
            _maybe(has_b2, lambda: _colsum(dout), dout))


@mlp_bwd.register_fake
def _(dout, x, w1, h, w2, activation, has_b1, has_b2):
    # contiguous, as the matmuls that make them (empty_like would copy a transposed x's or
    # weight's strides, and inductor checks the real outputs against these)
    return (x.new_empty(x.shape), w1.new_empty(w1.shape),
            w1.new_empty(w1.shape[0]) if has_b1 else dout.new_empty(0), w2.new_empty(w2.shape),
            w2.new_empty(w2.shape[0]) if has_b2 else dout.new_empty(0))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation = inputs
    ctx.save_for_backward(x, w1, output[1], w2)
    ctx.activation, ctx.has_b1, ctx.has_b2 = activation, b1 is not None, b2 is not None
    ctx.backend = _backends.requested()
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, dout, dh_unused):
    if dout is None:
        return (None,) * 6
    x, w1, h, w2 = ctx.saved_tensors
    with _backends.restored(ctx.backend):
        dx, dw1, db1, dw2, db2 = _eager.call(mlp_bwd, dout, x, w1, h, w2, ctx.activation,
                                             ctx.has_b1, ctx.has_b2)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, None)


_eager.register_autograd(mlp_fwd, _mlp_backward, setup_context=_mlp_setup)
_eager.no_double_backward(mlp_bwd, "fastattn.mlp", "torch's own linear layers and activation")


# ---------------------------------------------------------------------------------------------
# SwiGLU: out = (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd
# ---------------------------------------------------------------------------------------------

def _elementwise(name: str, impl):
    """The module with act_fwd / act_bwd / glu_fwd / glu_bwd for a composed (ATen matmul) path."""
    return reference if name in ("triton", "reference") else impl


@_eager.custom_op("fastattn::swiglu_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def swiglu_fwd(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor],
               b_up: Optional[Tensor], b_down: Optional[Tensor],
               activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, g, u): the output and the gate / up projections saved for backward."""
    name, impl = _impl("swiglu", x)
    if name == "triton" and b_gate is None and b_up is None:
        g, u, m = impl.linear_glu(x, w_gate, w_up, activation)
        out, _ = impl.linear_act(m, w_down, b_down, None)
        return out, g, u
    with matmuls.enabled(name == "cpu"):
        g = matmuls.linear(x, w_gate, b_gate)
        u = matmuls.linear(x, w_up, b_up)
        m = _elementwise(name, impl).glu_fwd(g, u, activation)
        return matmuls.linear(m, w_down, b_down), g, u


@swiglu_fwd.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation):
    hidden = (x.shape[0], w_gate.shape[0])
    return x.new_empty((x.shape[0], w_down.shape[0])), x.new_empty(hidden), x.new_empty(hidden)


@_eager.custom_op("fastattn::swiglu_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def swiglu_bwd(dout: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, g: Tensor,
               u: Tensor, activation: str, has_b_gate: bool, has_b_up: bool,
               has_b_down: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down); absent biases get empty tensors."""
    name, impl = _impl("swiglu", x)
    dout = dout.contiguous()
    # (as in mlp_bwd: m dropped once dw_down is made; on the CPU dg written over d m)
    if name == "triton":
        dg, du, m = impl.matmul_glu_grad(dout, w_down, g, u, activation)
        dw_down = impl.matmul(dout.t(), m.t())
        del m
        dw_gate = impl.matmul(dg.t(), x.t())
        dw_up = impl.matmul(du.t(), x.t())
        dx = impl.matmul(dg, w_gate.t()) + impl.matmul(du, w_up.t())
    else:
        extra = {"overwrite_dm": True} if name == "cpu" else {}
        with matmuls.enabled(name == "cpu"):
            dm = matmuls.mm(dout, w_down)
            dg, du, m = _elementwise(name, impl).glu_bwd(dm, g, u, activation, **extra)
            del dm    # (on the CPU, dg's memory)
            dw_down = dout.t() @ m
            del m
            dw_gate = dg.t() @ x
            dw_up = du.t() @ x
            dx = matmuls.addmm(matmuls.mm(dg, w_gate), du, w_up)
    return (dx, dw_gate, dw_up, dw_down, _maybe(has_b_gate, lambda: _colsum(dg), dout),
            _maybe(has_b_up, lambda: _colsum(du), dout),
            _maybe(has_b_down, lambda: _colsum(dout), dout))


@swiglu_bwd.register_fake
def _(dout, x, w_gate, w_up, w_down, g, u, activation, has_b_gate, has_b_up, has_b_down):
    def bias(flag, w):
        return w.new_empty(w.shape[0]) if flag else dout.new_empty(0)
    return (x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape),
            w_down.new_empty(w_down.shape), bias(has_b_gate, w_gate), bias(has_b_up, w_up),
            bias(has_b_down, w_down))    # contiguous, as in mlp_bwd's fake


def _swiglu_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation = inputs
    ctx.save_for_backward(x, w_gate, w_up, w_down, output[1], output[2])
    ctx.activation = activation
    ctx.has = (b_gate is not None, b_up is not None, b_down is not None)
    ctx.backend = _backends.requested()
    ctx.set_materialize_grads(False)


def _swiglu_backward(ctx, dout, dg_unused, du_unused):
    if dout is None:
        return (None,) * 8
    x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
    with _backends.restored(ctx.backend):
        dx, dwg, dwu, dwd, dbg, dbu, dbd = _eager.call(swiglu_bwd, dout, x, w_gate, w_up,
                                                       w_down, g, u, ctx.activation, *ctx.has)
    has_g, has_u, has_d = ctx.has
    return (dx, dwg, dwu, dwd, dbg if has_g else None, dbu if has_u else None,
            dbd if has_d else None, None)


_eager.register_autograd(swiglu_fwd, _swiglu_backward, setup_context=_swiglu_setup)
_eager.no_double_backward(swiglu_bwd, "fastattn.swiglu", "torch's own linear layers and activation")


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def _check(fn: str, x: Tensor, activation: str, weights: dict, biases: dict) -> None:
    """weights: name -> (w, "x" or the name of the weight whose outputs w takes as inputs)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    dense(fn, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension (..., features), got a scalar")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    for name, (w, source) in weights.items():
        if not isinstance(w, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(w).__name__}")
        dense(fn, name, w)
        in_features = x.shape[-1] if source == "x" else weights[source][0].shape[0]
        if source == "x" and w.dim() == 2 and w.shape[1] != in_features:
            raise ValueError(f"{fn}: x's features ({in_features}, shape {tuple(x.shape)}) do "
                             f"not match {name}'s in_features ({w.shape[1]}, shape "
                             f"{tuple(w.shape)}; nn.Linear layout (out_features, in_features))")
        if w.dim() != 2 or w.shape[1] != in_features:
            raise ValueError(f"{fn}: {name} must be (out_features, {in_features}) (nn.Linear "
                             f"layout), got shape {tuple(w.shape)}")
    for name, (b, w) in biases.items():
        if b is not None and (not isinstance(b, Tensor) or b.shape != (w.shape[0],)):
            raise ValueError(f"{fn}: {name} must be a ({w.shape[0]},) tensor or None, got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if b is not None:
            dense(fn, name, b)
    for name, t in [*((n, w) for n, (w, _) in weights.items()),
                    *((n, b) for n, (b, _) in biases.items() if b is not None)]:
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")


def mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor] = None,
        activation: str = "gelu") -> Tensor:
    """``F.linear(act(F.linear(x, w1, b1)), w2, b2)`` keeping only the pre-activation for backward.

    x ``(..., D)``; w1 ``(F, D)``, w2 ``(D_out, F)`` in nn.Linear layout; biases optional.
    activation: "gelu" (erf), "gelu_tanh", "relu", "relu2" (squared ReLU) or "silu".
    """
    if isinstance(x, Tensor):
        x, w1, b1, w2, b2 = _autocast.cast(x.device.type, x, w1, b1, w2, b2)
    _check("mlp", x, activation, {"w1": (w1, "x"), "w2": (w2, "w1")},
           {"b1": (b1, w1), "b2": (b2, w2)})
    lead = x.shape[:-1]
    out, _ = _eager.call(mlp_fwd, x.reshape(math.prod(lead), x.shape[-1]), w1, b1, w2, b2,
                         activation)
    return out.view(*lead, w2.shape[0])


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, *, activation: str = "silu",
           b_gate: Optional[Tensor] = None, b_up: Optional[Tensor] = None,
           b_down: Optional[Tensor] = None) -> Tensor:
    """``F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)`` (Llama's MLP) keeping
    only the gate and up projections for backward. ``activation="gelu_tanh"`` gives GeGLU.

    x ``(..., D)``; w_gate, w_up ``(F, D)``; w_down ``(D_out, F)``; optional biases.
    """
    if isinstance(x, Tensor):
        x, w_gate, w_up, w_down, b_gate, b_up, b_down = _autocast.cast(
            x.device.type, x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    _check("swiglu", x, activation,
           {"w_gate": (w_gate, "x"), "w_up": (w_up, "x"), "w_down": (w_down, "w_gate")},
           {"b_gate": (b_gate, w_gate), "b_up": (b_up, w_up), "b_down": (b_down, w_down)})
    if w_up.shape != w_gate.shape:
        raise ValueError(f"swiglu: w_up must have w_gate's shape {tuple(w_gate.shape)}, got "
                         f"{tuple(w_up.shape)}")
    lead = x.shape[:-1]
    out, _, _ = _eager.call(swiglu_fwd, x.reshape(math.prod(lead), x.shape[-1]), w_gate, w_up,
                            w_down, b_gate, b_up, b_down, activation)
    return out.view(*lead, w_down.shape[0])
