"""Calling a custom op's own function where the dispatcher would add nothing but time.

Every fastattn op is a ``torch.library.custom_op``, so that torch.compile, export, FakeTensor,
``opcheck`` and the profiler see one named operator. Going through the dispatcher costs 10-60 us
of Python per call without grad (autograd wrapper, redispatch, alias checks; torch 2.14 on a
CPU, 2.11 on an H200's host, measured with ``python -m benchmarks.host_overhead``), about what
SDPA costs in all. For a kernel of a few microseconds (a decode step, a small model's layer on
a GPU) that overhead is a good part of the step.

``call(op, *args)`` runs the function ``op`` was made from, directly, when the dispatcher could
do nothing else with the call: plain eager execution (not compiling, not tracing, no
``TorchDispatchMode`` or ``TorchFunctionMode``, no functorch transform, no profiler) on plain
strided CPU or CUDA tensors (``torch.Tensor`` or ``nn.Parameter``, not FakeTensor, DTensor,
sparse, nested or other subclasses) with no gradient to record. Otherwise, and whenever in
doubt, it calls the op. The result is the same function's result either way; what the direct
path skips is the custom-op wrapper's own bookkeeping (its check that no output aliases an
input, which opcheck runs in the tests). For an op that writes its arguments (the optimizer
step, gradient clipping) it does what the dispatcher's ADInplaceOrView kernel does: bump the
written tensors' version counters, here with one call for all of them (the wrapper makes a
Python call per tensor). A fastattn AdamW step over 148 small tensors: 895 us against 962
through the dispatcher, clip_grad_norm_ 361 against 388 (CPU, 1 thread, torch 2.14, by hand).
``FASTATTN_EAGER_DIRECT=0`` (read at import) turns the direct path off.

With a gradient to record, an op whose formula was given with ``register_autograd`` below runs
that same formula (its ``setup_context`` and ``backward``) as a plain ``torch.autograd.Function``
around the function: what the custom op's generated autograd wrapper does, without the
dispatcher's redispatch and the wrapper's per-call schema walk (~90 us per forward+backward of
flash_attention on the CPU, torch 2.14: ``python -m benchmarks.host_overhead``); its autograd
node is named after the op (``fastattn_attention_fwd_DirectBackward``). The backward ops those
formulas call go through ``call`` too (grad mode is off in a backward, unless
``create_graph=True``: then they take the op). Tensor-list arguments (which the custom op's
wrapper unpacks for autograd) always take the op.

Either way, a call with forward-mode AD tangents (``torch.func.jvp``, ``torch.autograd.forward_ad``)
raises: the ops have no forward-mode rule, and the dispatcher would return a zero tangent.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)
_FUNCTIONS: dict[int, tuple[str, Callable]] = {}
_AUTOGRAD: dict[int, tuple["_Formula", type]] = {}
_MUTATED: dict[int, tuple[int, ...]] = {}   # positions of the arguments an op writes


def custom_op(name: str, **kwargs) -> Callable:
    """``torch.library.custom_op(name, **kwargs)`` that also remembers the function, for call()."""
    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, **kwargs)(fn)
        _FUNCTIONS[id(op)] = (name, fn)
        written = tuple(i for i, a in enumerate(op._opoverload._schema.arguments)
                        if a.alias_info is not None and a.alias_info.is_write)
        if written:
            _MUTATED[id(op)] = written
        return op
    return register


def _bump_versions_each(tensors: tuple) -> None:
    for t in tensors:
        torch._C._increment_version(t)


def _bump_versions_at_once(tensors: tuple) -> None:
    torch._C._increment_version(tensors)


def _pick_bump() -> Callable[[tuple], None]:
    """torch._C._increment_version of a whole sequence where this torch takes one (2.5+: a
    C++ loop), else one call per tensor."""
    try:
        torch._C._increment_version((torch.empty(0),))
    except (TypeError, RuntimeError):
        return _bump_versions_each
    return _bump_versions_at_once


_bump_versions = _pick_bump()


def _mark_written(args: tuple, positions: tuple) -> None:
    """What the dispatcher's ADInplaceOrView kernel does for an op that writes its arguments:
    bump their version counters, so that autograd sees a saved tensor changed in place."""
    written = []
    for i in positions:
        a = args[i]
        if isinstance(a, Tensor):
            written.append(a)
        elif isinstance(a, (list, tuple)):
            written.extend(t for t in a if isinstance(t, Tensor))
    if written:
        _bump_versions(tuple(written))


def first_order(public_name: str) -> Callable[[Callable], Callable]:
    """Decorates a registered backward whose gradients are computed from tensors saved without
    a graph (a gradient the forward kernel already wrote, say): under create_graph=True such a
    gradient would come back as a constant, and a second derivative through it would be
    silently wrong. As with torch.autograd.function.once_differentiable, the backward then runs
    without recording and its gradients pass through a node that raises when differentiated.
    That node also takes the anchors ``keep_anchors`` stored in setup_context, so it lies on
    every path back to the op's inputs: ``autograd.grad(loss + penalty(g), x)``, which
    follows only the paths that reach x, meets it too (once_differentiable's node hangs off
    detached copies, which such a call never visits)."""
    message = (f"{public_name}: its gradient cannot be differentiated again (double backward, "
               "as through autograd.grad(..., create_graph=True), is not supported); compute "
               "this loss with torch's own ops where second derivatives are needed")

    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def run(ctx, *grads):
            recording = torch.is_grad_enabled() and not _is_compiling()
            with torch.no_grad():
                result = backward(ctx, *grads)
            if not recording:
                return result
            outputs = result if isinstance(result, tuple) else (result,)
            if not any(isinstance(o, Tensor) for o in outputs):
                return result
            anchors = getattr(ctx, "first_order_anchors", ())
            raise_later = torch._C._functions.DelayedError(message, len(outputs) + len(anchors))
            marked = raise_later(*[o.detach().requires_grad_() if isinstance(o, Tensor) else o
                                   for o in outputs], *anchors)
            marked = (marked if isinstance(marked, tuple) else (marked,))[:len(outputs)]
            return marked if isinstance(result, tuple) else marked[0]
        return run
    return wrap


def no_double_backward(op: Callable, public_name: str, instead: str) -> None:
    """Gives a backward op (norm_bwd, mlp_bwd, ...) a formula that refuses, with a message
    naming the public function and what to use instead: differentiating its gradients again
    (double backward) otherwise failed with the dispatcher's "no autograd formula was
    registered" for an op the user never called. The first-order path is unchanged: call()
    runs the op directly when nothing requires grad."""
    message = (f"{public_name}: its gradient cannot be differentiated again (double backward, "
               f"as through autograd.grad(..., create_graph=True), is not supported); use "
               f"{instead} where second derivatives are needed")

    def refuse(ctx, *grads):
        raise RuntimeError(message)

    def setup_context(ctx, inputs, output):
        pass

    op.register_autograd(refuse, setup_context=setup_context)


def keep_anchors(ctx, *tensors) -> None:
    """For ``first_order``, in setup_context: a one-element copy of each differentiable input,
    with the input's autograd history but not its memory (as_strided saves the geometry only)."""
    if _is_compiling():     # (compiled graphs have no double backward to guard)
        return
    with torch.enable_grad():   # setup_context runs inside the op's forward, unrecorded
        ctx.first_order_anchors = tuple(
            t.as_strided((), (), t.storage_offset()).clone() for t in tensors
            if isinstance(t, Tensor) and t.requires_grad and t.numel())


def register_autograd(op: Callable, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, also remembered for
    call()'s direct path with gradients."""
    op.register_autograd(backward, setup_context=setup_context)
    name, fn = _FUNCTIONS[id(op)]
    function = type(f"{name.replace('::', '_')}_Direct", (_Direct,), {})
    _AUTOGRAD[id(op)] = (_Formula(fn, backward, setup_context), function)


class _Formula:
    """What _Direct needs besides the inputs: not a Tensor, so autograd passes it through."""
    __slots__ = ("fn", "backward", "setup_context")

    def __init__(self, fn: Callable, backward: Callable, setup_context: Callable):
        self.fn, self.backward, self.setup_context = fn, backward, setup_context


class _Direct(torch.autograd.Function):
    """An op's function with its registered formula: the inputs first, then a _Formula (so that
    ``ctx.needs_input_grad[i]`` is input i's, as in the custom op's own wrapper)."""

    @staticmethod
    def forward(ctx, *args):
        formula, args = args[-1], args[:-1]
        output = formula.fn(*args)
        formula.setup_context(ctx, args, output)
        ctx.formula_backward = formula.backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        result = ctx.formula_backward(ctx, *grads)
        return (tuple(result) if isinstance(result, tuple) else (result,)) + (None,)


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


_STRIDED = torch.strided

# What _route decides for a call.
_OP, _DIRECT, _DIRECT_AUTOGRAD = 0, 1, 2


def _plain(t: Tensor) -> bool:
    return (type(t) in _PLAIN and t.layout is _STRIDED and (t.is_cpu or t.is_cuda)
            and not t.is_nested)


def _modes_off() -> bool:
    """Enabled, and nothing that needs the dispatcher is active (compiling, tracing, a mode, a
    functorch transform, the profiler)."""
    return (ENABLED and not _is_compiling() and not _dispatch_modes() and not _function_modes()
            and not _functorch_active() and not _profiling() and _tracing_state() is None)


def _route(args: tuple) -> int:
    """How a call with these arguments runs: _DIRECT (the function itself: nothing to record),
    _DIRECT_AUTOGRAD (the op's formula as an autograd.Function: some input requires grad, in
    grad mode, and no tensor sits inside a list) or _OP (the dispatcher). One pass over the
    arguments: this runs on every call."""
    if not _modes_off():
        return _OP
    grad = torch.is_grad_enabled()
    records = listed = False
    for a in args:
        if isinstance(a, Tensor):
            if not _plain(a):
                return _OP
            records = records or (grad and a.requires_grad)
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, Tensor):
                    if not _plain(t):
                        return _OP
                    listed = True
                    records = records or (grad and t.requires_grad)
    if not records:
        return _DIRECT
    return _OP if listed else _DIRECT_AUTOGRAD


def direct_ok(args: tuple) -> bool:
    """Whether a call with these arguments may skip the dispatcher (see the module docstring)."""
    return _route(args) == _DIRECT


def direct_autograd_ok(args: tuple) -> bool:
    """Whether a call that records a gradient may run its op's formula as an autograd.Function
    (the same conditions as direct_ok, with inputs that require grad allowed, and no tensors
    inside lists: autograd.Function sees only top-level tensor arguments)."""
    return _route(args) == _DIRECT_AUTOGRAD


def _tensors(args: tuple):
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _check_no_tangents(name: str, args: tuple) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no rule in these ops; the
    dispatcher would return outputs without tangents, i.e. a zero derivative, silently."""
    if any(_forward_ad.unpack_dual(t).tangent is not None for t in _tensors(args)):
        raise NotImplementedError(
            f"{name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
            f"supported; its tangents would be dropped. Use reverse mode (loss.backward(), "
            f"torch.autograd.grad: torch.func's grad / vjp / jacrev do not run through custom "
            f"ops' autograd either), or PyTorch's own functions for this computation")


def call(op: Callable, *args):
    """``op(*args)``, without the dispatcher where that changes nothing (module docstring)."""
    entry = _FUNCTIONS.get(id(op))
    if entry is None:
        return op(*args)
    if _forward_ad._current_level >= 0:   # inside a forward-AD level: any tangents?
        _check_no_tangents(entry[0], args)
    route = _route(args)
    if route == _DIRECT:
        written = _MUTATED.get(id(op))
        if written is not None:   # (before the call, as the dispatcher's kernel does)
            _mark_written(args, written)
        return entry[1](*args)
    if route == _DIRECT_AUTOGRAD:
        autograd = _AUTOGRAD.get(id(op))
        if autograd is not None:
            formula, function = autograd
            return function.apply(*args, formula)
    return op(*args)
