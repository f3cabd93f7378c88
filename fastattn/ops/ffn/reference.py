"""Pure-PyTorch FFN pieces: the oracle every kernel is tested against, and the fallback.

The math (see also ``__init__.py``)::

    MLP     h = x W1^T + b1,  a = act(h),  out = a W2^T + b2
            backward: da = dout W2;  dh = da * act'(h);  dW2 = dout^T a;  dW1 = dh^T x;
                      dx = dh W1;  db = column sums
    SwiGLU  g = x Wg^T,  u = x Wu^T,  m = act(g) * u,  out = m Wd^T
            backward: dm = dout Wd;  dg = dm * u * act'(g);  du = dm * act(g);
                      dWd = dout^T m;  dWg = dg^T x;  dWu = du^T x;  dx = dg Wg + du Wu

Only h (MLP) or g and u (SwiGLU) are kept for backward; a and m are recomputed there, in the
same pass that applies act'. The four elementwise functions below are the interface the C++
CPU and CUDA backends implement (the matmuls around them are ATen's: MKL / cuBLAS).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def act(x: Tensor, activation: str) -> Tensor:
    """act(x) in x's dtype (call it on fp32/fp64 for the accurate value)."""
    if activation == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * _INV_SQRT_2))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    if activation == "relu":
        return torch.relu(x)
    if activation == "relu2":
        return torch.relu(x) ** 2
    if activation == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


def act_grad(x: Tensor, activation: str) -> Tensor:
    """d act / dx, exactly (relu's derivative at 0 is 0, as in PyTorch)."""
    if activation == "gelu":  # Phi(x) + x phi(x)
        return 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
    if activation == "gelu_tanh":  # t = tanh(k (x + c x^3)): 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3c x^2)
        t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    if activation == "relu":
        return (x > 0).to(x.dtype)
    if activation == "relu2":
        return 2.0 * torch.relu(x)
    if activation == "silu":  # s (1 + x (1 - s))
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


# ---- the elementwise backend interface --------------------------------------------------------

def act_fwd(h: Tensor, activation: str) -> Tensor:
    return act(h.to(_acc_dtype(h.dtype)), activation).to(h.dtype)


def act_bwd(da: Tensor, h: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """(dh, a): dh = da * act'(h) and the recomputed a = act(h)."""
    acc = _acc_dtype(h.dtype)
    hf = h.to(acc)
    dh = da.to(acc) * act_grad(hf, activation)
    return dh.to(h.dtype), act(hf, activation).to(h.dtype)


def glu_fwd(g: Tensor, u: Tensor, activation: str) -> Tensor:
    acc = _acc_dtype(g.dtype)
    return (act(g.to(acc), activation) * u.to(acc)).to(g.dtype)


def glu_bwd(dm: Tensor, g: Tensor, u: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dg, du, m): dg = dm * u * act'(g), du = dm * act(g), m = act(g) * u."""
    acc = _acc_dtype(g.dtype)
    gf, uf, dmf = g.to(acc), u.to(acc), dm.to(acc)
    ag = act(gf, activation)
    dg = dmf * uf * act_grad(gf, activation)
    return dg.to(g.dtype), (dmf * ag).to(g.dtype), (ag * uf).to(g.dtype)


# ---- whole blocks, for tests and benchmarks (plain autograd, eager memory behaviour) -----------

def mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
        activation: str = "gelu") -> Tensor:
    return torch.nn.functional.linear(act(torch.nn.functional.linear(x, w1, b1), activation), w2, b2)


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str = "silu",
           b_gate: Tensor | None = None, b_up: Tensor | None = None,
           b_down: Tensor | None = None) -> Tensor:
    F = torch.nn.functional
    return F.linear(act(F.linear(x, w_gate, b_gate), activation) * F.linear(x, w_up, b_up),
                    w_down, b_down)
