"""CPU benchmarks of the cross-entropy family against PyTorch eager and torch.compile.

Rates: cross-entropy moves 3 x logits bytes (read twice, gradient written once) whoever runs
it, so GB/s compares like with like; linear cross-entropy is 3 matmuls of 2*T*H*V FLOPs each
(forward logits, d input, d weight) -- also for chunk_over="vocab", which does a fourth (the
logits again), so its rate counts the work of the others, not its own.

Each row's loss (or log-probs) and gradients are checked against torch eager's before it is
timed (``outputs=`` of the measure fixture).
"""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import against

torch.set_num_threads(max(1, torch.get_num_threads()))

N, V = 4096, 32768                 # tokens x vocab for cross_entropy / token_logprobs
T, H = 4096, 512                   # tokens x hidden for linear_cross_entropy (vocab V)


def _ce_case():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, V, generator=g) * 2
    target = torch.randint(0, V, (N,), generator=g)
    return base, target


def _eager_ce(x, t):
    return F.cross_entropy(x, t)


_compiled_ce = torch.compile(_eager_ce)

CE_IMPLS = {
    "fastattn": fastattn.cross_entropy,
    "torch eager": _eager_ce,
    "torch.compile": _compiled_ce,
}


def _logits_case(measure, name, fn, reference, impl, weights=None):
    """forward+backward of a loss over the (N, V) logits: its output (``weights``: the
    per-token outputs summed with those weights, as DPO and PPO do) then backward."""
    base, target = _ce_case()

    def make_step(loss_fn):
        def step(x):
            out = loss_fn(x, target)
            (out if weights is None else (out * weights).sum()).backward()
            return out
        return step

    def setup():
        return (base.clone().requires_grad_(),)

    measure(f"{name} fwd+bwd {N}x{V} fp32", impl, make_step(fn), setup,
            work=3 * base.numel() * 4, unit="GB/s",
            outputs=against(make_step, fn, reference, setup))


@pytest.mark.parametrize("impl", list(CE_IMPLS))
def test_cross_entropy_fwd_bwd(measure, impl):
    _logits_case(measure, "cross_entropy", CE_IMPLS[impl], _eager_ce, impl)


def _eager_logprobs(x, t):
    return torch.log_softmax(x, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


LOGPROB_IMPLS = {
    "fastattn": fastattn.token_logprobs,
    "torch eager": _eager_logprobs,
    "torch.compile": torch.compile(_eager_logprobs),
}


@pytest.mark.parametrize("impl", list(LOGPROB_IMPLS))
def test_token_logprobs_fwd_bwd(measure, impl):
    weights = torch.randn(N, generator=torch.Generator().manual_seed(1))   # the same for each impl
    _logits_case(measure, "token_logprobs", LOGPROB_IMPLS[impl], _eager_logprobs, impl, weights)


def _eager_linear_ce(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def _vocab_chunked_linear_ce(h, w, t):
    return fastattn.linear_cross_entropy(h, w, t, chunk_over="vocab")


LINEAR_IMPLS = {
    "fastattn": fastattn.linear_cross_entropy,
    "fastattn (vocab chunks)": _vocab_chunked_linear_ce,
    "torch eager": _eager_linear_ce,
    "torch.compile": torch.compile(_eager_linear_ce),
}


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
def test_linear_cross_entropy_fwd_bwd(measure, impl):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    target = torch.randint(0, V, (T,), generator=g)

    def setup():
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def make_step(fn):
        def step(h, w):
            loss = fn(h, w, target)
            loss.backward()
            return loss
        return step

    measure(f"linear_cross_entropy fwd+bwd {T}x{H}->{V} fp32", impl, make_step(LINEAR_IMPLS[impl]),
            setup, work=3 * 2 * T * H * V, unit="TFLOP/s", rounds=3,
            outputs=against(make_step, LINEAR_IMPLS[impl], _eager_linear_ce, setup))
