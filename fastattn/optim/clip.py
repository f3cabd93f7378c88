"""Drop-in fused ``torch.nn.utils.clip_grad_norm_``.

Same arguments, result and side effects: returns the total norm of all gradients (as one
vector) as a 0-dim tensor on the first gradient's device, in the dtype torch returns (the
promotion of the gradient dtypes), and multiplies every gradient in place by
min(max_norm / (total_norm + 1e-6), 1). The multiply always happens, so there is no host sync
unless ``error_if_nonfinite=True`` (which has to read the norm). For fp16/bf16 gradients the
norm is accumulated in fp32 (torch rounds per-tensor norms to the gradient dtype first), so it
can differ from torch's in the last bits of that dtype: it is the more accurate of the two.

Gradients are grouped by (device, dtype) as torch groups them; each group costs one
``fastattn::grad_norm`` and one ``fastattn::scale_grads_`` call (one fused pass each, see
fastattn/ops/grad_norm). norm_type 2 and inf run the kernels; any other p runs the pure-PyTorch
reference. Sparse or complex gradients, and FSDP2's sharded (DTensor) ones, are clipped by
torch's own implementation.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from .. import _eager
from ..ops import grad_norm as _op
from .adam import _is_dtensor
from ..ops.grad_norm import reference as _ref

_KERNEL_DEVICES = ("cpu", "cuda")


def _as_list(parameters, name: str) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        return [parameters]
    is_generator = isinstance(parameters, types.GeneratorType)
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(f"{name}: parameters must be a Tensor or an iterable of Tensors, got "
                        f"{type(parameters).__name__}") from None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}: parameters[{i}] must be a Tensor, got {type(p).__name__}")
    if is_generator and not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return params


def _number(value, what: str, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str):      # 'inf', as torch accepts
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: {what} must be a number or 'inf', got {value!r}") from None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: {what} must be a real number, got {value!r}")
    return float(value)


def _groups(grads: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def _group_norm(device: torch.device, tensors: list[Tensor], p: float) -> Tensor:
    if device.type in _KERNEL_DEVICES:
        return _eager.call(_op.grad_norm, tensors, p)
    return _ref.grad_norm(tensors, p)


def _group_scale(device: torch.device, tensors: list[Tensor], max_norm: float,
                 total: Tensor) -> None:
    if device.type in _KERNEL_DEVICES:
        _eager.call(_op.scale_grads_, tensors, max_norm, total)
    else:
        _ref.scale_grads_(tensors, max_norm, total)


@torch.no_grad()
def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float,
                    norm_type: Union[float, str] = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None) -> Tensor:
    """Fused ``torch.nn.utils.clip_grad_norm_``: clips the gradients of ``parameters`` in place
    to total norm ``max_norm`` and returns the total norm before clipping.

    ``foreach`` is accepted for signature compatibility and ignored (this is always fused).
    """
    name = "clip_grad_norm_"
    params = _as_list(parameters, name)
    max_norm = _number(max_norm, "max_norm", name)
    p = _number(norm_type, "norm_type", name)
    if math.isnan(p):
        raise ValueError(f"{name}: norm_type must not be nan")
    if math.isnan(max_norm):
        raise ValueError(f"{name}: max_norm must not be nan")
    grads = [q.grad for q in params if q.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if any(g.layout != torch.strided or g.is_complex() or _is_dtensor(g) for g in grads):
        # Sparse and complex gradients, which the kernels do not take, and FSDP2 shards, whose
        # norm needs a reduction across ranks that DTensor's own ops do: torch's implementation
        # runs as is.
        return torch.nn.utils.clip_grad_norm_(params, max_norm, p, error_if_nonfinite)
    first = grads[0].device
    out_dtype = grads[0].dtype
    for g in grads[1:]:
        out_dtype = torch.promote_types(out_dtype, g.dtype)
    if math.isinf(p) and any(g.numel() == 0 and (p < 0 or g.device.type != "cuda")
                             for g in grads):
        # as torch raises (from the norm of that gradient), where it does: its CUDA foreach
        # norm takes an empty tensor's +inf norm as 0, and so do the kernels
        raise RuntimeError(f"{name}: the {'-' if p < 0 else ''}inf norm of an empty gradient "
                           "is undefined (a parameter with no elements has a grad); "
                           "leave such parameters out, or use another norm_type")
    groups = _groups(grads)
    norms = [_group_norm(dev, ts, p) for (dev, _), ts in groups.items()]
    if len(norms) == 1:
        total = norms[0]
    elif p == 0:    # each group's "norm" counts its tensors with a nonzero gradient: they add
        total = torch.stack([n.to(first) for n in norms]).sum()
    else:           # the norm of the groups' norms (as of the tensors' norms, torch's formula)
        total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), p)
    total = total.to(out_dtype)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`")
    for (dev, _), ts in groups.items():
        _group_scale(dev, ts, max_norm, total)
    return total
