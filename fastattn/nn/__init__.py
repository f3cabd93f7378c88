"""Drop-in modules: same constructors and calls as their torch.nn counterparts."""

from .attention import MultiheadAttention
from .ffn import MLP, SwiGLU
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .norm import LayerNorm, RMSNorm

__all__ = ["CrossEntropyLoss", "LayerNorm", "LinearCrossEntropyLoss", "MLP", "MultiheadAttention",
           "RMSNorm", "SwiGLU"]
