"""Calling a custom op's own function where the dispatcher would add nothing but time.

Every fastattn op is a ``torch.library.custom_op``, so that torch.compile, export, FakeTensor,
``opcheck`` and the profiler see one named operator. Going through the dispatcher costs ~50 us
of Python per call (autograd wrapper, redispatch, alias checks; torch 2.14, measured with
``python -m benchmarks.host_overhead``), about what SDPA costs in all. For a kernel of a few
microseconds (a decode step, a small model's layer on a GPU) that overhead is the step.

``call(op, *args)`` runs the function ``op`` was made from, directly, when the dispatcher could
do nothing else with the call: plain eager execution (not compiling, not tracing, no
``TorchDispatchMode``, no functorch transform, no profiler) on plain CPU or CUDA tensors
(``torch.Tensor`` or ``nn.Parameter``, not FakeTensor, DTensor or other subclasses) with no
gradient to record. Otherwise, and whenever in doubt, it calls the op. The result is the same
function's result either way. ``FASTATTN_EAGER_DIRECT=0`` (read at import) turns the direct path off.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)
_FUNCTIONS: dict[int, Callable] = {}


def custom_op(name: str, **kwargs) -> Callable:
    """``torch.library.custom_op(name, **kwargs)`` that also remembers the function, for call()."""
    def register(fn: Callable):
        op = torch.library.custom_op(name, **kwargs)(fn)
        _FUNCTIONS[id(op)] = fn
        return op
    return register


def _hook(name: str, default: Callable[[], Any]) -> Callable[[], Any]:
    """A torch._C query, or ``default`` where this torch has none (then: take the op path)."""
    return getattr(torch._C, name, default)


_dispatch_modes = _hook("_len_torch_dispatch_stack", lambda: 1)
_functorch_active = _hook("_are_functorch_transforms_active", lambda: True)
_tracing_state = _hook("_get_tracing_state", lambda: True)
_profiling = getattr(torch.autograd, "_profiler_enabled", lambda: True)
_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: True)


# Read once, at import (an environment lookup per call would cost what a check does).
ENABLED = os.environ.get("FASTATTN_EAGER_DIRECT", "1") != "0"


def _plain(t: Tensor, grad: bool) -> bool:
    return type(t) in _PLAIN and (t.is_cpu or t.is_cuda) and not (grad and t.requires_grad)


def direct_ok(args: tuple) -> bool:
    """Whether a call with these arguments may skip the dispatcher (see the module docstring)."""
    if (not ENABLED or _is_compiling() or _dispatch_modes() or _functorch_active()
            or _profiling() or _tracing_state() is not None):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor):
            if not _plain(a, grad):
                return False
        elif isinstance(a, (list, tuple)):
            if not all(_plain(t, grad) for t in a if isinstance(t, Tensor)):
                return False
    return True


def call(op: Callable, *args):
    """``op(*args)``, without the dispatcher where that changes nothing (see the module docstring)."""
    fn = _FUNCTIONS.get(id(op))
    if fn is not None and direct_ok(args):
        return fn(*args)
    return op(*args)
