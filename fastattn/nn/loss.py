"""Loss modules backed by fastattn's fused cross-entropy kernels."""

from typing import Optional

import torch
from torch import Tensor

from ..ops.cross_entropy import (check_accum_dtype, check_chunk_over, cross_entropy,
                                 linear_cross_entropy)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` on the fused kernel (class-index targets).

    Same constructor, buffers and call; a subclass, so ``isinstance`` checks and state_dicts keep
    working. Extra keyword arguments: ``z_loss`` (PaLM's ``z_loss * logsumexp**2`` per token) and
    ``inplace_backward`` (the gradient overwrites the logits; see ``fastattn.cross_entropy``).
    Class-probability targets (a floating-point target shaped like the input: mixup,
    distillation) are computed by ``torch.nn.functional.cross_entropy``, as the parent class
    would; ``z_loss`` and ``inplace_backward`` do not apply to them (an error if set).
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if isinstance(target, Tensor) and target.is_floating_point():
            if self.z_loss or self.inplace_backward:
                raise ValueError("CrossEntropyLoss: z_loss and inplace_backward apply to "
                                 "class-index targets only, got class-probability targets "
                                 f"(a {target.dtype} target)")
            return super().forward(input, target)
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """``CrossEntropyLoss()(F.linear(input, weight, bias), target)`` without the full logits.

    Called as ``loss_fn(input, weight, target, bias=None)`` with ``input`` ``(..., hidden)`` and
    the output projection's ``weight`` ``(vocab, hidden)`` — typically ``model.lm_head.weight``.
    The module owns no parameters. See ``fastattn.linear_cross_entropy`` (``chunk_size``,
    ``chunk_over`` and ``accum_dtype`` are its keyword arguments of those names).
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, chunk_size: Optional[int] = None,
                 chunk_over: str = "tokens",
                 accum_dtype: Optional[torch.dtype] = torch.float32) -> None:
        super().__init__()
        check_chunk_over("LinearCrossEntropyLoss", chunk_over)
        if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
            # (a dtype is checked against the weight's at the call)
            check_accum_dtype("LinearCrossEntropyLoss", accum_dtype)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.chunk_over = chunk_over
        self.accum_dtype = accum_dtype

    def forward(self, input: Tensor, weight: Tensor, target: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    chunk_size=self.chunk_size, chunk_over=self.chunk_over,
                                    accum_dtype=self.accum_dtype)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}, "
                f"chunk_over={self.chunk_over!r}, accum_dtype={self.accum_dtype}")
