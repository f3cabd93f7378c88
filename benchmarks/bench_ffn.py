"""CPU benchmarks of the fused FFN blocks against eager PyTorch and torch.compile, same run.

FLOPs, written out: an MLP is 2 matmuls of 2*T*D*F FLOPs forward and 4 backward (d input and
d weight of each): 12*T*D*F for forward+backward; SwiGLU has 3 matmuls: 18*T*D*F. "saved MB"
is what autograd keeps for backward (measured with saved_tensors_hooks, parameters excluded):
eager MLP keeps x, h and act(h); fastattn keeps x and h. Eager SwiGLU keeps x, g, act(g), u and
act(g)*u; fastattn keeps x, g and u. (torch.compile's saved tensors live inside its compiled
graph, out of the hooks' reach, so its column stays empty.) Each row's output and gradients
are checked against torch eager's before it is timed.
"""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import against
from fastattn.ops.ffn import reference as ref

T, D = 2048, 512
HIDDEN = {"mlp": 2048, "swiglu": 1376}


def _eager_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _eager_swiglu(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


IMPLS = {
    "mlp": {"fastattn": lambda x, w1, b1, w2, b2: fastattn.mlp(x, w1, b1, w2, b2),
            "torch eager": _eager_mlp, "torch.compile": torch.compile(_eager_mlp)},
    "swiglu": {"fastattn": lambda x, wg, wu, wd: fastattn.swiglu(x, wg, wu, wd),
               "torch eager": _eager_swiglu, "torch.compile": torch.compile(_eager_swiglu)},
}


def _params(block):
    g = torch.Generator().manual_seed(0)
    f = HIDDEN[block]
    x = torch.randn(T, D, generator=g)
    if block == "mlp":
        ps = [torch.randn(f, D, generator=g) * D ** -0.5, torch.randn(f, generator=g) * 0.1,
              torch.randn(D, f, generator=g) * f ** -0.5, torch.randn(D, generator=g) * 0.1]
    else:
        ps = [torch.randn(f, D, generator=g) * D ** -0.5, torch.randn(f, D, generator=g) * D ** -0.5,
              torch.randn(D, f, generator=g) * f ** -0.5]
    return x, [p.requires_grad_() for p in ps]


def _saved_mb(fn, x, params):
    """MB of the distinct tensors autograd keeps for backward, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, *params)
    return sum(kept.values()) / 2**20


# (impl first: pytest varies the upper one fastest, and a case's rows then run together)
@pytest.mark.parametrize("impl", ["fastattn", "torch eager", "torch.compile"])
@pytest.mark.parametrize("block", ["mlp", "swiglu"])
def test_ffn_fwd_bwd(measure, block, impl):
    x, params = _params(block)
    fn = IMPLS[block][impl]
    dout = torch.randn(T, D, generator=torch.Generator().manual_seed(1))   # the same for each impl
    flops = (12 if block == "mlp" else 18) * T * D * HIDDEN[block]

    def make_step(fn):
        def step(x):
            for p in params:
                p.grad = None
            out = fn(x, *params)
            out.backward(dout)
            return out
        return step

    def setup():
        return (x.clone().requires_grad_(),)

    label = "gelu MLP" if block == "mlp" else "SwiGLU"
    measure(f"{label} fwd+bwd {T}x{D}->{HIDDEN[block]} fp32", impl, make_step(fn), setup,
            work=flops, unit="GFLOP/s",
            outputs=against(make_step, fn, IMPLS[block]["torch eager"], setup, *params))
    if impl != "torch.compile":  # compiled graphs save inside the compiled region, not via hooks
        from benchmarks.conftest import _RESULTS
        _RESULTS[-1].extra["saved MB"] = round(_saved_mb(fn, x.clone().requires_grad_(), params), 1)
