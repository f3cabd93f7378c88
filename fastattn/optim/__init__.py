"""Drop-in fused optimizers: same constructors, steps and state_dicts as torch.optim."""

from .adam import Adam, AdamW
from .clip import clip_grad_norm_

__all__ = ["Adam", "AdamW", "clip_grad_norm_"]
