"""CPU benchmarks of attention against PyTorch's SDPA (eager and torch.compile), same run.

FLOPs, written out: forward = 4 * B * H * Sq * Sk * D (two products, 2 FLOPs per multiply-add),
halved when causal; backward = 2.5 x forward (five products instead of two), so
forward+backward = 3.5 x forward. Every implementation is credited with the same count.
Each row's output and gradients are checked against torch eager's before it is timed.
"""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import against

B, H, S, D = 4, 8, 512, 64
FWD_FLOPS = 4 * B * H * S * S * D / 2  # causal


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLS = {
    "fastattn": lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
    "torch eager": _sdpa,
    "torch.compile": torch.compile(_sdpa),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)], torch.randn(B, H, S, D, generator=g)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd_bwd(measure, impl):
    (q, k, v), dout = _inputs()

    def make_step(fn):
        def step(q, k, v):
            out = fn(q, k, v)
            out.backward(dout)
            return out
        return step

    def setup():
        return tuple(x.clone().requires_grad_() for x in (q, k, v))

    measure(f"attention fwd+bwd causal ({B},{H},{S},{D}) fp32", impl, make_step(IMPLS[impl]),
            setup, work=3.5 * FWD_FLOPS, unit="GFLOP/s",
            outputs=against(make_step, IMPLS[impl], _sdpa, setup))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd(measure, impl):
    (q, k, v), _ = _inputs()

    def make_step(fn):
        def step(q, k, v):
            with torch.no_grad():
                return fn(q, k, v)
        return step

    measure(f"attention fwd causal ({B},{H},{S},{D}) fp32", impl, make_step(IMPLS[impl]),
            lambda: (q, k, v), work=FWD_FLOPS, unit="GFLOP/s",
            outputs=against(make_step, IMPLS[impl], _sdpa, lambda: (q, k, v)))
