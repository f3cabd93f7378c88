"""Drop-in fused optimizers: same constructors, steps and state_dicts as torch.optim."""

from .adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
