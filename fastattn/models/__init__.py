"""Reference models built on fastattn's kernels."""

from .gpt import GPT, PRESETS, GPTConfig, config

__all__ = ["GPT", "GPTConfig", "PRESETS", "config"]
