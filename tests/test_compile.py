"""Every fastattn op passes torch.library.opcheck and compiles with fullgraph=True on CPU."""

import pytest
import torch
import torch.nn.functional as F

import fastattn

ops = torch.ops.fastattn


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 33, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (8,), generator=g)
    t[1] = -100
    w = torch.rand(33, generator=g) + 0.5
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    W = torch.randn(33, 16, generator=g, requires_grad=True)
    b = torch.randn(33, generator=g, requires_grad=True)
    r = torch.randn(8, generator=g)
    import fastattn.ops.adam  # noqa: F401  (registers fastattn::adam_step_)
    ps = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]
    adam = ([p.clone() for p in ps], [torch.randn_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [], torch.tensor(1.0), torch.tensor(1e-3),
            0.9, 0.999, 1e-8, 0.01, True, True, False, torch.tensor(0.5), torch.tensor(0.0))
    return [
        ("adam", ops.adam_step_.default, adam),
        ("ce_mean", ops.cross_entropy_fwd.default, (x, t, None, -100, 0.1, 0.0, "mean", True)),
        ("ce_none_weight_z", ops.cross_entropy_fwd.default, (x, t, w, -100, 0.0, 1e-3, "none", True)),
        ("ce_nograd", ops.cross_entropy_fwd.default, (x.detach(), t, None, -100, 0.0, 0.0, "sum", False)),
        ("ce_inplace", ops.cross_entropy_fwd_inplace.default,
         (x.detach().clone(), t, None, -100, 0.0, 0.0, "mean")),
        ("logprobs", ops.token_logprobs_fwd.default, (x, t, -100, 0.5, True)),
        ("logprobs_bwd", ops.token_logprobs_bwd.default,
         (r, r * 2, x.detach(), t, r.abs(), r.abs(), -100, 0.5)),
        ("lce_mean", ops.linear_cross_entropy_fwd.default, (h, W, t, b, -100, 0.0, "mean", 3, True, True)),
        ("lce_none", ops.linear_cross_entropy_fwd.default, (h, W, t, None, -100, 0.1, "none", 3, True, True)),
        ("lce_bwd", ops.linear_cross_entropy_bwd.default,
         (r, h.detach(), W.detach(), t, b.detach(), -100, 0.0, 3, True, True)),
        ("ltlp", ops.linear_token_logprobs_fwd.default, (h, W, t, b, -100, 1.0, True, 5)),
        ("ltlp_bwd", ops.linear_token_logprobs_bwd.default,
         (r, None, h.detach(), W.detach(), t, None, r.abs(), r.new_empty(0), -100, 1.0, 5, True, True)),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_opcheck(backend, case):
    _, op, args = case
    with fastattn.use_backend(backend):
        torch.library.opcheck(op, args)


def _loss_fn(x, h, W, t):
    return (fastattn.cross_entropy(x * 2, t, label_smoothing=0.1)
            + fastattn.cross_entropy(x, t, reduction="none").mean()
            + fastattn.cross_entropy(x - 1, t, inplace_backward=True)
            + fastattn.linear_cross_entropy(h, W, t)
            + fastattn.linear_cross_entropy(h, W, t, reduction="none").sum()
            + fastattn.token_logprobs(x, t, temperature=0.5).sum()
            + fastattn.linear_token_logprobs(h, W, t, return_entropy=True)[1].sum())


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 33, generator=g, requires_grad=True)
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    W = torch.randn(33, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (8,), generator=g)
    eager = _loss_fn(x, h, W, t)
    grads = torch.autograd.grad(eager, (x, h, W))
    compiled = torch.compile(_loss_fn, fullgraph=True)(x, h, W, t)
    cgrads = torch.autograd.grad(compiled, (x, h, W))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


def test_compile_no_graph_break_counter():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.tensor([1, 2, 3, 4])
    fn = torch.compile(lambda x, t: fastattn.cross_entropy(F.gelu(x), t, z_loss=1e-4))
    fn(x, t).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
