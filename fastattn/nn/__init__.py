"""Drop-in modules: same constructors and calls as their torch.nn counterparts."""

from .attention import MultiheadAttention
from .ffn import MLP, SwiGLU
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "MLP", "MultiheadAttention", "SwiGLU"]
