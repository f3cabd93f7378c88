"""Drop-in modules: same constructors and calls as their torch.nn counterparts."""

from .loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
