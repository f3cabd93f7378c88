"""CPU benchmarks of the fused residual add + LayerNorm / RMSNorm against eager PyTorch and
torch.compile, same run.

The measured step is a pre-norm block's seam: s = x + branch, y = norm(s), forward and
backward with gradients arriving at both y and s (as in a transformer, where s goes on to the
next residual add). Bytes, written out (fp32, T x D elements each): forward reads x and branch
and writes s and y (4), backward reads dy, ds_in and s and writes d branch (one gradient serves
x and branch) (4): 8 * T * D * 4 bytes per step, whoever runs it. Each row's outputs and
gradients are checked against torch eager's before it is timed.
"""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import against

T, D = 8192, 768


def _eager_layer(x, branch, w, b):
    s = x + branch
    return F.layer_norm(s, (D,), w, b), s


def _eager_rms(x, branch, w, b):
    s = x + branch
    return F.rms_norm(s, (D,), w, 1e-5), s


IMPLS = {
    "layer": {"fastattn": lambda x, br, w, b: fastattn.layer_norm(br, D, w, b, residual=x),
              "torch eager": _eager_layer, "torch.compile": torch.compile(_eager_layer)},
    "rms": {"fastattn": lambda x, br, w, b: fastattn.rms_norm(br, D, w, 1e-5, residual=x),
            "torch eager": _eager_rms, "torch.compile": torch.compile(_eager_rms)},
}


# (impl first: pytest varies the upper one fastest, and a case's rows then run together)
@pytest.mark.parametrize("impl", ["fastattn", "torch eager", "torch.compile"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_add_norm_fwd_bwd(measure, kind, impl):
    g = torch.Generator().manual_seed(0)
    x, branch = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    w = (torch.rand(D, generator=g) + 0.5).requires_grad_()
    b = torch.randn(D, generator=g).requires_grad_()
    dy, ds = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    fn = IMPLS[kind][impl]

    def make_step(fn):
        def step(x, branch):
            w.grad = b.grad = None
            y, s = fn(x, branch, w, b)
            torch.autograd.backward((y, s), (dy, ds))
            return y, s
        return step

    def setup():
        return x.clone().requires_grad_(), branch.clone().requires_grad_()

    name = "add + LayerNorm" if kind == "layer" else "add + RMSNorm"
    measure(f"{name} fwd+bwd {T}x{D} fp32", impl, make_step(fn), setup,
            work=8 * T * D * 4, unit="GB/s",
            outputs=against(make_step, fn, IMPLS[kind]["torch eager"], setup, w, b))
