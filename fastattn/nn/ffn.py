"""Drop-in FFN blocks whose parameters are plain nn.Linear modules (optimizers, FSDP and
checkpoints see nothing unusual), running fastattn's fused MLP / SwiGLU."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.ffn import mlp, swiglu
from ..ops.ffn.reference import ACTIVATIONS


def _check_args(cls: str, dim, hidden_dim, activation, bias) -> None:
    """At construction, not at the first forward: a swapped argument is named where it was made."""
    for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cls}: {name} must be an int >= 1, got {value!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{cls}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    if not isinstance(bias, bool):
        raise TypeError(f"{cls}: bias must be a bool, got {bias!r}")


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with the hidden activation recomputed in backward (only the
    pre-activation is kept). activation: "gelu", "gelu_tanh", "relu", "relu2" or "silu"."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        _check_args("MLP", dim, hidden_dim, activation, bias)
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                   activation=self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLU(nn.Module):
    """Llama's MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``, with the submodule names of
    transformers' LlamaMLP so its state_dict loads as is. ``activation="gelu_tanh"`` is GeGLU
    (keyword-only, like ``fastattn.swiglu``'s)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, *,
                 activation: str = "silu", device=None, dtype=None):
        super().__init__()
        _check_args("SwiGLU", dim, hidden_dim, activation, bias)
        self.activation = activation
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(dim, hidden_dim, **kw)
        self.up_proj = nn.Linear(dim, hidden_dim, **kw)
        self.down_proj = nn.Linear(hidden_dim, dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                      activation=self.activation, b_gate=self.gate_proj.bias,
                      b_up=self.up_proj.bias, b_down=self.down_proj.bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
