"""Calling a custom op's own function where the dispatcher would add nothing but time.

Every fastattn op is a ``torch.library.custom_op``, so that torch.compile, export, FakeTensor,
``opcheck`` and the profiler see one named operator. Going through the dispatcher costs ~50 us
of Python per call (autograd wrapper, redispatch, alias checks; torch 2.14, measured with
``python -m benchmarks.host_overhead``), about what SDPA costs in all. For a kernel of a few
microseconds (a decode step, a small model's layer on a GPU) that overhead is the step.

``call(op, *args)`` runs the function ``op`` was made from, directly, when the dispatcher could
do nothing else with the call: plain eager execution (not compiling, not tracing, no
``TorchDispatchMode`` or ``TorchFunctionMode``, no functorch transform, no profiler) on plain
strided CPU or CUDA tensors (``torch.Tensor`` or ``nn.Parameter``, not FakeTensor, DTensor,
sparse, nested or other subclasses) with no gradient to record. Otherwise, and whenever in
doubt, it calls the op. The result is the same function's result either way; what the direct
path skips is the custom-op wrapper's own bookkeeping (its check that no output aliases an
input, which opcheck runs in the tests). ``FASTATTN_EAGER_DIRECT=0`` (read at import) turns
the direct path off.

Either way, a call with forward-mode AD tangents (``torch.func.jvp``, ``torch.autograd.forward_ad``)
raises: the ops have no forward-mode rule, and the dispatcher would return a zero tangent.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)
_FUNCTIONS: dict[int, tuple[str, Callable]] = {}


def custom_op(name: str, **kwargs) -> Callable:
    """``torch.library.custom_op(name, **kwargs)`` that also remembers the function, for call()."""
    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, **kwargs)(fn)
        _FUNCTIONS[id(op)] = (name, fn)
        return op
    return register


def _hook(name: str, default: Callable[[], Any]) -> Callable[[], Any]:
    """A torch._C query, or ``default`` where this torch has none (then: take the op path)."""
    return getattr(torch._C, name, default)


_dispatch_modes = _hook("_len_torch_dispatch_stack", lambda: 1)
_function_modes = _hook("_is_torch_function_mode_enabled", lambda: True)
_functorch_active = _hook("_are_functorch_transforms_active", lambda: True)
_tracing_state = _hook("_get_tracing_state", lambda: True)
_profiling = getattr(torch.autograd, "_profiler_enabled", lambda: True)
_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: True)


# Read once, at import (an environment lookup per call would cost what a check does).
ENABLED = os.environ.get("FASTATTN_EAGER_DIRECT", "1") != "0"


def _plain(t: Tensor, grad: bool) -> bool:
    return (type(t) in _PLAIN and (t.is_cpu or t.is_cuda) and t.layout is torch.strided
            and not t.is_nested and not (grad and t.requires_grad))


def direct_ok(args: tuple) -> bool:
    """Whether a call with these arguments may skip the dispatcher (see the module docstring)."""
    if (not ENABLED or _is_compiling() or _dispatch_modes() or _function_modes()
            or _functorch_active() or _profiling() or _tracing_state() is not None):
        return False
    grad = torch.is_grad_enabled()
    return all(_plain(t, grad) for t in _tensors(args))


def _tensors(args: tuple):
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _check_no_tangents(name: str, args: tuple) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no rule in these ops; the
    dispatcher would return outputs without tangents, i.e. a zero derivative, silently."""
    if _forward_ad._current_level >= 0 and any(
            _forward_ad.unpack_dual(t).tangent is not None for t in _tensors(args)):
        raise NotImplementedError(
            f"{name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
            f"supported; its tangents would be dropped. Use reverse mode (backward, "
            f"torch.func.vjp / jacrev), or PyTorch's own functions for this computation")


def call(op: Callable, *args):
    """``op(*args)``, without the dispatcher where that changes nothing (module docstring)."""
    name, fn = _FUNCTIONS.get(id(op), (None, None))
    if name is not None:
        _check_no_tangents(name, args)
    if fn is not None and direct_ok(args):
        return fn(*args)
    return op(*args)
