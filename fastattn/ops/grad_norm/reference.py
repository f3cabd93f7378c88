"""Pure-PyTorch total gradient norm and clipping scale: the oracle and the fallback.

Every backend (C++ CPU, CUDA, Triton, this file) implements ``grad_norm`` and ``scale_grads_``
with these positional signatures; ``fastattn.optim.clip_grad_norm_`` groups the gradients by
(device, dtype) and calls them.

    grad_norm(tensors, p)  = || concat(flatten(t) for t in tensors) ||_p
                           = (sum_t sum_i |t_i|^p)^(1/p),   max_t max_i |t_i| for p = inf
    computed in float32 (float64 for float64 tensors) whatever the storage dtype; returned as a
    0-dim tensor of that dtype on the tensors' device. A nan anywhere gives nan; an inf (and no
    nan) gives inf, as torch.linalg.vector_norm does.

    scale_grads_(tensors, max_norm, total_norm):
        coef = min(max_norm / (total_norm + 1e-6), 1)       (float32, on the device)
        t *= coef  for every t, in place, rounded once to t's dtype
    Always a multiply, never a branch on the host: reading total_norm on the host would
    synchronise a GPU stream. coef = 1 multiplies exactly; a nan/inf total_norm gives coef nan/0,
    which is what torch.nn.utils.clip_grad_norm_ writes too.

torch evaluates ``max_norm / x`` as ``x.reciprocal() * max_norm``; that order is kept so that
float32 results are bitwise those of torch.nn.utils.clip_grad_norm_.
Memory traffic: the norm reads every gradient once (4 B per fp32 element); the scale reads and
writes it once (8 B).
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

EPS = 1e-6


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_norm(tensors: List[Tensor], norm_type: float, upcast: bool = True) -> Tensor:
    """The p-norm of all ``tensors`` viewed as one vector (any p torch.linalg.vector_norm takes).

    ``upcast=False`` computes in the storage dtype, as torch does for each tensor's norm."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    acc = acc_dtype(tensors[0].dtype) if upcast else None
    norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors]
    # torch's formula: the norm of the per-tensor norms. For p != 0 that is the norm of the
    # concatenation; for p = 0 it counts the tensors that hold a nonzero (not the nonzeros).
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def clip_coef(max_norm: float, total_norm: Tensor) -> Tensor:
    """min(max_norm / (total_norm + 1e-6), 1) in float32 (float64 for a float64 norm)."""
    norm = total_norm.to(acc_dtype(total_norm.dtype))
    return torch.clamp((norm + EPS).reciprocal() * max_norm, max=1.0)


def scale_grads_(tensors: List[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Multiply every tensor in place by clip_coef(max_norm, total_norm)."""
    if not tensors:
        return
    coef = clip_coef(max_norm, total_norm)
    for t in tensors:
        t.mul_(coef.to(t.device))
