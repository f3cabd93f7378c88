"""fastattn: fused Triton, CUDA and C++ kernels for training transformers.

Public API re-exports only; each op lives in ``fastattn/ops/<op>/``.
"""

from ._backends import BackendError, BackendStatus, backends, use_backend
from .ops.attention import (
    decode_attention,
    flash_attention,
    scaled_dot_product_attention,
    varlen_attention,
)
from .ops.ffn import mlp, swiglu
from .ops.norm import layer_norm, rms_norm
from .ops.cross_entropy import (
    cross_entropy,
    linear_cross_entropy,
    linear_token_logprobs,
    token_logprobs,
    trusted_targets,
)
from . import nn, optim  # noqa: E402  (after the ops they wrap)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendStatus",
    "backends",
    "use_backend",
    "scaled_dot_product_attention",
    "flash_attention",
    "varlen_attention",
    "decode_attention",
    "mlp",
    "swiglu",
    "layer_norm",
    "rms_norm",
    "cross_entropy",
    "linear_cross_entropy",
    "token_logprobs",
    "linear_token_logprobs",
    "trusted_targets",
    "nn",
    "optim",
]
