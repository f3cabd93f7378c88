"""Total gradient norm and norm clipping: registration and dispatch (the op's front door).

Two ops, so that the norm can be returned (and checked on the host when the user asks) between
them, exactly as torch.nn.utils.clip_grad_norm_ splits get_total_norm / clip_grads_with_norm_:

* ``fastattn::grad_norm(tensors, norm_type) -> Tensor``: the p-norm of all tensors as one
  vector, a float32 0-dim tensor on their device (float64 for float64 tensors). One fused pass:
  4 B read per fp32 element, partial sums per chunk then a fixed-order final reduction
  (bitwise reproducible run to run; no atomics).
* ``fastattn::scale_grads_(tensors, max_norm, total_norm) -> None``: multiplies every tensor
  in place by min(max_norm / (total_norm + 1e-6), 1), the coefficient computed on the device
  from ``total_norm`` (no host sync): 8 B moved per fp32 element.

A single fused "norm and scale" op could not save traffic (the scale needs the whole norm
first, so it is a second pass either way) and would hide the norm from error_if_nonfinite.

The kernels (cpu, cuda, triton) take contiguous float32/float16/bfloat16 tensors of one device
and dtype per call and norm_type 2 or inf. Everything else runs the pure-PyTorch reference,
whatever backend is requested: other p (a rare, non-hot path), float64, and non-contiguous
tensors (their share of the norm is computed with torch ops, their scale is a ``mul_``).
``fastattn.optim.clip_grad_norm_`` groups gradients by (device, dtype) and calls these.
"""

import math
from typing import List

import torch
from torch import Tensor

from ... import _backends, _eager
from . import reference

_PKG = __name__
_CUDA_ORDER = ("cuda", "triton")
_LOW = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = {"cpu": _LOW, "cuda": _LOW, "triton": _LOW}
KERNEL_NORMS = (2.0, math.inf)


def _check_group(tensors: List[Tensor], what: str) -> None:
    if not tensors:
        raise ValueError(f"{what}: needs at least one tensor (the result's device comes from "
                         "them); fastattn.optim.clip_grad_norm_ returns tensor(0.) for none")
    dev, dt = tensors[0].device, tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise ValueError(f"{what}: tensors[{i}] has layout {t.layout}; only dense (strided) "
                             "tensors are supported")
        if t.device != dev or t.dtype != dt:
            raise ValueError(f"{what}: all tensors of one call must share device and dtype "
                             f"(tensors[0] is {dt} on {dev}, tensors[{i}] is {t.dtype} on "
                             f"{t.device}); group them first (fastattn.optim.clip_grad_norm_ "
                             "does)")


def _backend(tensors: List[Tensor]) -> str:
    return _backends.select("grad_norm", tensors[0].device, tensors[0].dtype,
                            cuda_order=_CUDA_ORDER, dtypes=_DTYPES)


@_eager.custom_op("fastattn::grad_norm", mutates_args=(), device_types=("cpu", "cuda"))
def grad_norm(tensors: List[Tensor], norm_type: float) -> Tensor:
    """The norm_type-norm of all tensors viewed as one vector (see reference.py)."""
    _check_group(tensors, "grad_norm")
    p = float(norm_type)
    if p not in KERNEL_NORMS or tensors[0].dtype == torch.float64:
        return reference.grad_norm(tensors, p)
    dense = [t for t in tensors if t.is_contiguous()]
    if len(dense) == len(tensors):
        return _backends.implementation(_backend(tensors), _PKG).grad_norm(tensors, p)
    # Rare: a non-contiguous grad. Norm of norms (exact for every p) over the two parts.
    parts = [reference.grad_norm([t for t in tensors if not t.is_contiguous()], p)]
    if dense:
        parts.append(_backends.implementation(_backend(dense), _PKG).grad_norm(dense, p))
    return torch.linalg.vector_norm(torch.stack(parts), p)


@grad_norm.register_fake
def _(tensors, norm_type):
    return tensors[0].new_empty((), dtype=reference.acc_dtype(tensors[0].dtype))


@_eager.custom_op("fastattn::scale_grads_", mutates_args=("tensors",),
                         device_types=("cpu", "cuda"))
def scale_grads_(tensors: List[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """tensors *= min(max_norm / (total_norm + 1e-6), 1), in place (see reference.py)."""
    if not tensors:
        return
    _check_group(tensors, "scale_grads_")
    if total_norm.numel() != 1 or not total_norm.is_floating_point():
        raise ValueError("scale_grads_: total_norm must be a one-element floating tensor, got "
                         f"{total_norm.dtype} of shape {tuple(total_norm.shape)}")
    if tensors[0].dtype == torch.float64:
        return reference.scale_grads_(tensors, max_norm, total_norm)
    norm = total_norm.to(device=tensors[0].device, dtype=torch.float32)
    dense = [t for t in tensors if t.is_contiguous()]
    if len(dense) != len(tensors):
        reference.scale_grads_([t for t in tensors if not t.is_contiguous()], max_norm, norm)
    if dense:
        _backends.implementation(_backend(dense), _PKG).scale_grads_(dense, max_norm, norm)


@scale_grads_.register_fake
def _(tensors, max_norm, total_norm):
    return None
