"""fastattn.nn loss modules are drop-ins for their torch counterparts."""

import pytest
import torch
import torch.nn.functional as F

import fastattn


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(reduction="sum", ignore_index=3),
    dict(reduction="none", label_smoothing=0.2),
    dict(weight=torch.rand(12) + 0.5, label_smoothing=0.1),
])
def test_cross_entropy_loss_is_a_drop_in(kwargs):
    ours = fastattn.nn.CrossEntropyLoss(**kwargs)
    theirs = torch.nn.CrossEntropyLoss(**kwargs)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 12, 5, requires_grad=True)
    t = torch.randint(0, 12, (2, 5))
    a, b = ours(x, t), theirs(x, t)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.sum(), x)[0]
    gb = torch.autograd.grad(b.sum(), x)[0]
    torch.testing.assert_close(ga, gb)


def test_cross_entropy_loss_extras():
    x = torch.randn(6, 9)
    t = torch.randint(0, 9, (6,))
    z = fastattn.nn.CrossEntropyLoss(z_loss=1e-2)(x, t)
    expected = F.cross_entropy(x, t) + 1e-2 * torch.logsumexp(x, 1).square().mean()
    torch.testing.assert_close(z, expected)
    assert "z_loss=0.01" in repr(fastattn.nn.CrossEntropyLoss(z_loss=1e-2))


@pytest.mark.parametrize("chunk_over", ["tokens", "vocab"])
def test_linear_cross_entropy_loss(chunk_over):
    head = torch.nn.Linear(16, 50)
    h = torch.randn(3, 4, 16, requires_grad=True)
    t = torch.randint(0, 50, (3, 4))
    loss_fn = fastattn.nn.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=5,
                                                 chunk_over=chunk_over)
    assert not list(loss_fn.parameters())
    assert f"chunk_over={chunk_over!r}" in repr(loss_fn)
    a = loss_fn(h, head.weight, t, head.bias)
    b = F.cross_entropy(head(h).reshape(-1, 50), t.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (h, head.weight, head.bias))
    gb = torch.autograd.grad(b, (h, head.weight, head.bias))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_linear_cross_entropy_loss_checks_chunk_over():
    with pytest.raises(ValueError, match="chunk_over must be 'tokens' or 'vocab', got 'cols'"):
        fastattn.nn.LinearCrossEntropyLoss(chunk_over="cols")


@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.1, weight=torch.rand(5) + 0.5),
                                dict(reduction="none")], ids=["plain", "smoothing-weight", "none"])
def test_class_probability_targets_work_as_in_torch(kw):
    """A drop-in takes what the parent takes: soft targets (mixup, distillation) run through
    torch's own cross-entropy."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    probs = torch.softmax(torch.randn(6, 5, generator=g), -1)
    ours = fastattn.nn.CrossEntropyLoss(**kw)(x, probs)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.nn.CrossEntropyLoss(**kw)(ref_x, probs)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    with pytest.raises(ValueError, match="class-index targets only"):
        fastattn.nn.CrossEntropyLoss(z_loss=1e-4)(x, probs)
