"""CPU benchmark: one AdamW step over 32 tensors of 1M fp32 parameters against torch.optim.AdamW
(fused=True, foreach=True, the for-loop, and the step compiled with torch.compile), same run.
Rate: 28 bytes per parameter (param, grad, m, v read; param, m, v written) over the step time.
Each AdamW row is checked against torch's foreach AdamW (three steps' updates of four tensors
like the case's) before it is timed; each clip_grad_norm_ row on its first call (the norm it
returns and the gradients it clips, against their float32 computation)."""

import pytest
import torch

import fastattn
from benchmarks.common import ADAM_CHECK_SCALE, adam_updates, clip_check

N_TENSORS, NUMEL = 32, 1 << 20


def _setup(make):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(NUMEL, generator=g).requires_grad_() for _ in range(N_TENSORS)]
    for p in params:
        p.grad = torch.randn(NUMEL, generator=g)
    opt = make(params)
    opt.step()  # state allocation (and the compile) outside the timing
    return (opt,)


class _CompiledStep:
    """torch.optim.AdamW with its step compiled, as PyTorch's "compiling the optimizer" recipe
    does it: lr as a tensor (a new lr is not a recompile), the default (foreach) step inside
    torch.compile."""

    def __init__(self, params):
        self.opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3))
        self.param_groups = self.opt.param_groups
        self.step = torch.compile(self.opt.step)


IMPLS = {
    "fastattn": lambda ps: fastattn.optim.AdamW(ps, lr=1e-3),
    "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "torch.compile": _CompiledStep,
}


def _adam_outputs(make):
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(NUMEL, generator=g) * ADAM_CHECK_SCALE for _ in range(4)]
    steps = [[torch.randn(NUMEL, generator=g) for _ in start] for _ in range(3)]
    return lambda: adam_updates(make, start, steps, torch.float32, False)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_adamw_step(measure, impl):
    state = _setup(IMPLS[impl])
    measure(f"AdamW step {N_TENSORS}x{NUMEL} fp32", impl, lambda opt: opt.step(),
            lambda: state, work=28 * N_TENSORS * NUMEL, unit="GB/s", rounds=10,
            outputs=(_adam_outputs(IMPLS[impl]), _adam_outputs(IMPLS["torch foreach"])))


# clip_grad_norm_ over the same 32 x 1M fp32 grads. Rate: 12 bytes per element (the norm reads
# the grad, 4 B; the scale reads and writes it, 8 B). max_norm = 1 clips (the norm is ~5800),
# so every implementation does both passes; the grads are reused across rounds (after the first
# round the coefficient is ~1, the work the same).
_compiled_clip = torch.compile(torch.nn.utils.clip_grad_norm_)
CLIP_IMPLS = {
    "fastattn": lambda ps: fastattn.optim.clip_grad_norm_(ps, 1.0),
    "torch foreach": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True),
    "torch for-loop": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=False),
    "torch.compile": lambda ps: _compiled_clip(ps, 1.0),
}


@pytest.mark.parametrize("impl", list(CLIP_IMPLS))
def test_clip_grad_norm(measure, impl):
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(NUMEL).requires_grad_() for _ in range(N_TENSORS)]
    for p in params:
        p.grad = torch.randn(NUMEL, generator=g)
    fn = CLIP_IMPLS[impl]
    measure(f"clip_grad_norm_ {N_TENSORS}x{NUMEL} fp32", impl, fn,
            lambda: (params,), work=12 * N_TENSORS * NUMEL, unit="GB/s", rounds=10,
            outputs=lambda: clip_check(lambda ps, max_norm: fn(ps), params,
                                       [p.grad for p in params]))
