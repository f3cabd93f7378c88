"""fastattn.linear_cross_entropy against float64 F.linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.cross_entropy import default_chunk_size
from tests.helpers import ALL_BACKENDS, GPU, assert_close


def make(tokens, hidden, vocab, dtype=torch.float32, device="cpu", bias=True, lead=()):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, tokens, hidden, generator=g).to(dtype).to(device)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype).to(device)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).to(device) if bias else None
    t = torch.randint(0, vocab, (*lead, tokens), generator=g).to(device)
    t.view(-1)[::4] = -100
    return x, w, b, t


def compare(x, w, b, t, reduction, label_smoothing=0.0, chunk_size=None, dtype=torch.float32,
            grads=("x", "w", "b")):
    leaves = {"x": x.clone().requires_grad_("x" in grads),
              "w": w.clone().requires_grad_("w" in grads),
              "b": None if b is None else b.clone().requires_grad_("b" in grads)}
    loss = fastattn.linear_cross_entropy(leaves["x"], leaves["w"], t, leaves["b"],
                                         reduction=reduction, label_smoothing=label_smoothing,
                                         chunk_size=chunk_size)
    ref_leaves = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad)
                  for k, v in leaves.items()}
    logits = F.linear(ref_leaves["x"], ref_leaves["w"], ref_leaves["b"])
    ref = F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), reduction=reduction,
                          label_smoothing=label_smoothing)
    if reduction == "none":
        ref = ref.reshape(t.shape)
    assert loss.shape == ref.shape and loss.dtype == x.dtype
    assert_close(loss, ref, dtype, "loss", scale=10)
    g = torch.rand(ref.shape, dtype=torch.float64, device=x.device) + 0.5
    names = [k for k in grads if leaves[k] is not None]
    ours = torch.autograd.grad(loss, [leaves[k] for k in names], g.to(loss.dtype))
    theirs = torch.autograd.grad(ref, [ref_leaves[k] for k in names], g.to(loss.dtype).double())
    for name, a, e in zip(names, ours, theirs):
        assert a.dtype == leaves[name].dtype
        assert_close(a, e, dtype, f"grad {name}", scale=10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, None, 1000])
def test_matches_float64(device, backend, reduction, chunk_size):
    x, w, b, t = make(13, 24, 97, device=device)
    with fastattn.use_backend(backend):
        compare(x, w, b, t, reduction, label_smoothing=0.1, chunk_size=chunk_size)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_no_bias_3d_input_partial_grads(device, backend):
    x, w, _, t = make(7, 16, 41, device=device, bias=False, lead=(2,))
    with fastattn.use_backend(backend):
        compare(x, w, None, t, "mean", chunk_size=4)
        compare(x, w, None, t, "sum", chunk_size=4, grads=("x",))       # frozen lm_head
        compare(x, w, None, t, "none", chunk_size=4, grads=("w",))      # frozen features


def test_cpu_kernel_training_shape():
    x, w, b, t = make(256, 128, 8192)
    with fastattn.use_backend("cpu"):
        compare(x, w, b, t, "mean", label_smoothing=0.05)


def test_no_grad_returns_loss_only():
    x, w, b, t = make(9, 8, 30)
    with torch.no_grad():
        loss = fastattn.linear_cross_entropy(x, w.requires_grad_(), t, b)
    ref = F.cross_entropy(F.linear(x, w, b).double(), t)
    assert_close(loss, ref, torch.float32, "loss")
    assert loss.grad_fn is None


def test_default_chunk_bounds_memory():
    # a chunk of logits is about the size of the hidden states, never below 512 rows
    assert default_chunk_size(4096, 512, 32768) == 512
    assert default_chunk_size(16384, 4096, 131072) == 512
    assert default_chunk_size(65536, 4096, 32000) == 8389
    assert default_chunk_size(10, 512, 32768) == 10
    # on a GPU at least 2048 rows (the weight-gradient GEMM's accumulator traffic)
    assert default_chunk_size(16384, 4096, 131072, "cuda") == 2048
    assert default_chunk_size(65536, 4096, 32000, "cuda") == 8389
    assert default_chunk_size(1000, 512, 32768, "cuda") == 1000


def test_default_chunk_follows_the_device(monkeypatch):
    """linear_cross_entropy and linear_token_logprobs ask for the default chunk of their
    weight's device type (GPUs get a higher floor)."""
    import fastattn.ops.cross_entropy as ce
    asked = []
    real = ce.default_chunk_size
    monkeypatch.setattr(ce, "default_chunk_size", lambda *a: asked.append(a) or real(*a))
    x, w, b, t = make(6, 8, 16)
    fastattn.linear_cross_entropy(x, w, t, b)
    fastattn.linear_token_logprobs(x, w, t.clamp(min=0), b)
    fastattn.linear_cross_entropy(x, w, t, b, chunk_size=3)      # given: not asked
    assert asked == [(6, 8, 16, "cpu")] * 2


def test_empty_tokens():
    x, w, b, _ = make(0, 8, 30)
    t = torch.zeros(0, dtype=torch.long)
    xg = x.requires_grad_()
    loss = fastattn.linear_cross_entropy(xg, w, t, b, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and xg.grad.shape == (0, 8)


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bf16(backend):
    x, w, b, t = make(1024, 256, 8192, dtype=torch.bfloat16, device="cuda")
    with fastattn.use_backend(backend):
        compare(x, w, b, t, "mean", dtype=torch.bfloat16, chunk_size=256)
        # the default chunk on a GPU: 2048 rows, 4 of them
        x, w, b, t = make(8192, 128, 4096, dtype=torch.bfloat16, device="cuda")
        assert default_chunk_size(8192, 128, 4096, "cuda") == 2048
        compare(x, w, b, t, "mean", dtype=torch.bfloat16)
