"""token_logprobs / linear_token_logprobs against float64 log_softmax, with entropy."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from tests.helpers import ALL_BACKENDS, DTYPES, GPU, assert_close


def oracle(logits, target, temperature, ignore_index=-100):
    s = logits / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    valid = target != ignore_index
    logp = logp_all.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


def make(shape, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype).to(device)
    target = torch.randint(0, vocab, shape, generator=g).to(device)
    target.view(-1)[1::5] = -100
    return logits, target


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 17, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
def test_matches_float64(device, backend, dtype, vocab, temperature, grads):
    logits, target = make((2, 6), vocab, dtype, device)
    leaf = logits.clone().requires_grad_()
    with fastattn.use_backend(backend):
        logp, ent = fastattn.token_logprobs(leaf, target, temperature=temperature,
                                            return_entropy=True)
    ref_leaf = logits.double().requires_grad_()
    ref_logp, ref_ent = oracle(ref_leaf, target, temperature)
    assert logp.dtype == torch.float32 and logp.shape == target.shape
    assert_close(logp, ref_logp, torch.float32, "logp", scale=20)
    assert_close(ent, ref_ent, torch.float32, "entropy", scale=20)
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_logp)
    ours = {"logp": (logp * g1.float()).sum(), "entropy": (ent * g2.float()).sum()}
    theirs = {"logp": (ref_logp * g1).sum(), "entropy": (ref_ent * g2).sum()}
    keys = ["logp", "entropy"] if grads == "both" else [grads]
    with fastattn.use_backend(backend):
        (grad,) = torch.autograd.grad(sum(ours[k] for k in keys), leaf)
    (ref_grad,) = torch.autograd.grad(sum(theirs[k] for k in keys), ref_leaf)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, dtype, "grad", scale=10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("rows,vocab", [(0, 17), (1, 1), (1, 17), (3, 50257)],
                         ids=lambda v: str(v))
def test_edge_sizes_match_float64(device, backend, rows, vocab):
    """No tokens, one token, one class, GPT-2's vocabulary; logits and gradient against
    float64, and a column-major (non-contiguous) logits view."""
    logits, target = make((rows,), vocab, torch.float32, device, seed=5)
    for layout in ("contiguous", "column-major"):
        x = logits if layout == "contiguous" else logits.t().contiguous().t()
        leaf = x.clone() if layout == "contiguous" else x.detach().t().clone().t()
        leaf.requires_grad_()
        with fastattn.use_backend(backend):
            logp, ent = fastattn.token_logprobs(leaf, target, temperature=0.9,
                                                return_entropy=True)
            (grad,) = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), leaf)
        ref_leaf = logits.double().requires_grad_()
        ref_logp, ref_ent = oracle(ref_leaf, target, 0.9)
        (ref_grad,) = torch.autograd.grad(ref_logp.sum() + 0.5 * ref_ent.sum(), ref_leaf)
        assert logp.shape == ent.shape == (rows,) and grad.shape == (rows, vocab)
        assert_close(logp, ref_logp, torch.float32, f"logp ({layout})", scale=20)
        assert_close(ent, ref_ent, torch.float32, f"entropy ({layout})", scale=20)
        assert_close(grad, ref_grad, torch.float32, f"grad ({layout})", scale=10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("tokens,vocab", [(0, 17), (1, 1), (1, 17), (3, 50257)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("chunk_over", ["tokens", "vocab"])
def test_linear_edge_sizes_match_float64(device, backend, tokens, vocab, chunk_over):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, 16, generator=g).to(device)
    w = (torch.randn(vocab, 16, generator=g) / 4).to(device)
    t = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    leaves = [v.clone().requires_grad_() for v in (x, w)]
    with fastattn.use_backend(backend):
        logp, ent = fastattn.linear_token_logprobs(*leaves, t, return_entropy=True,
                                                   chunk_over=chunk_over)
        ours = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), leaves)
    ref_leaves = [v.double().requires_grad_() for v in (x, w)]
    ref_logp, ref_ent = oracle(F.linear(*ref_leaves), t, 1.0)
    theirs = torch.autograd.grad(ref_logp.sum() + 0.5 * ref_ent.sum(), ref_leaves)
    assert logp.shape == (tokens,)
    assert_close(logp, ref_logp, torch.float32, "logp", scale=20)
    assert_close(ent, ref_ent, torch.float32, "entropy", scale=20)
    for name, a, e in zip("xw", ours, theirs):
        assert_close(a, e, torch.float32, f"grad {name}", scale=10)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [1e-3, 1e-10])
def test_low_temperature_is_finite_and_nonpositive(device, backend, temperature):
    """s = z / T is huge at a low temperature: the row max must still sit at exactly 0 in exp's
    argument. (Formed as z * (1/T) - max with the product fused into the subtraction, the C++
    kernels gave inf / NaN at T = 1e-10 and log-probs of +3e-8 at T = 1e-3.) Beyond that, the
    gradient from the saved lse carries its rounding, |s|max * 2^-24 on every p."""
    logits, target = make((64,), 33, torch.float32, device, seed=4)
    leaf = logits.clone().requires_grad_()
    with fastattn.use_backend(backend):
        logp, ent = fastattn.token_logprobs(leaf, target, temperature=temperature,
                                            return_entropy=True)
        (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), leaf)
    ref_leaf = logits.double().requires_grad_()
    ref_logp, ref_ent = oracle(ref_leaf, target, temperature)
    (ref_grad,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), ref_leaf)
    for name, t in (("logp", logp), ("entropy", ent), ("grad", grad)):
        assert t.isfinite().all(), name
    assert (logp <= 0).all() and (ent >= 0).all()
    ulp = 2.0 ** -24 * float(logits.abs().max()) / temperature     # of the largest |s|
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=8 * ulp)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-6, atol=8 * ulp)
    # in units of 1/T (a gradient of p): each p errs by up to ~ulp, and never by more than 1
    torch.testing.assert_close(grad.double() * temperature, ref_grad * temperature, rtol=0,
                               atol=min(8 * ulp, 1e-2))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_without_entropy_and_strided(device, backend):
    base, target = make((3,), 64, torch.float32, device)
    logits = torch.randn(3, 100, device=device)[:, 10:74]      # row stride 100
    leaf = logits.clone().requires_grad_()
    with fastattn.use_backend(backend):
        logp = fastattn.token_logprobs(leaf[:, :], target)
        logp.sum().backward()
    ref_leaf = logits.double().requires_grad_()
    ref_logp, _ = oracle(ref_leaf, target, 1.0)
    ref_logp.sum().backward()
    assert_close(logp, ref_logp, torch.float32, "logp")
    assert_close(leaf.grad, ref_leaf.grad, torch.float32, "grad")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("chunk_over,chunk_size", [("tokens", 1), ("tokens", 4), ("tokens", None),
                                                   ("vocab", 1), ("vocab", 10), ("vocab", None)])
def test_linear_matches_float64(device, backend, chunk_over, chunk_size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 16, generator=g).to(device)
    w = (torch.randn(53, 16, generator=g) / 4).to(device)
    b = (torch.randn(53, generator=g) * 0.1).to(device)
    t = torch.randint(0, 53, (2, 7), generator=g).to(device)
    t[1, 2] = -100
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    with fastattn.use_backend(backend):
        logp, ent = fastattn.linear_token_logprobs(*leaves[:2], t, leaves[2], temperature=0.8,
                                                   return_entropy=True, chunk_size=chunk_size,
                                                   chunk_over=chunk_over)
    ref_leaves = [v.double().requires_grad_() for v in (x, w, b)]
    ref_logp, ref_ent = oracle(F.linear(*ref_leaves), t, 0.8)
    assert_close(logp, ref_logp, torch.float32, "logp")
    assert_close(ent, ref_ent, torch.float32, "entropy")
    g1, g2 = torch.randn_like(ref_logp), torch.randn_like(ref_logp)
    with fastattn.use_backend(backend):
        ours = torch.autograd.grad((logp * g1.float()).sum() + (ent * g2.float()).sum(), leaves)
    theirs = torch.autograd.grad((ref_logp * g1).sum() + (ref_ent * g2).sum(), ref_leaves)
    for name, a, e in zip("xwb", ours, theirs):
        assert_close(a, e, torch.float32, f"grad {name}", scale=10)


@pytest.mark.parametrize("chunk_over", ["tokens", "vocab"])
def test_linear_frozen_weight_only_input_grad(chunk_over):
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(19, 8)
    t = torch.randint(0, 19, (5,))
    fastattn.linear_token_logprobs(x, w, t, chunk_size=6, chunk_over=chunk_over).sum().backward()
    x64 = x.detach().double().requires_grad_()
    oracle(F.linear(x64, w.double()), t, 1.0)[0].sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "grad x")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_linear_vocab_chunks_entropy_only_gradient(device, backend):
    """Only the entropy receives a gradient (grad_logp is zero for every row): the slice kernel
    must not take those rows for ignored ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 12, generator=g).to(device).requires_grad_()
    w = (torch.randn(29, 12, generator=g) / 3).to(device).requires_grad_()
    t = torch.randint(0, 29, (6,), generator=g).to(device)
    t[2] = -100
    with fastattn.use_backend(backend):
        _, ent = fastattn.linear_token_logprobs(x, w, t, return_entropy=True, chunk_size=8,
                                                chunk_over="vocab")
        ours = torch.autograd.grad(ent.sum(), [x, w])
    x64, w64 = (v.detach().double().requires_grad_() for v in (x, w))
    theirs = torch.autograd.grad(oracle(F.linear(x64, w64), t, 1.0)[1].sum(), [x64, w64])
    for name, a, e in zip("xw", ours, theirs):
        assert_close(a, e, torch.float32, f"grad {name}", scale=10)
    assert torch.count_nonzero(ours[0][2]) == 0        # the ignored token: no gradient at all


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_linear_vocab_chunks_peaked_and_masked(device, backend):
    """Entropy merged over many vocabulary chunks stays as accurate as over token chunks for
    peaked distributions (logits x 30: entropies ~1e-4, which a cancelling merge turns
    negative), and chunks masked whole by a -inf bias contribute nothing (no NaN)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(24, 16, generator=g) * 30).to(device).requires_grad_()
    w = (torch.randn(600, 16, generator=g) / 3).to(device).requires_grad_()
    b = torch.zeros(600)
    b[100:200] = float("-inf")
    b = b.to(device)
    t = torch.randint(0, 100, (24,), generator=g).to(device)
    with fastattn.use_backend(backend):
        logp, ent = fastattn.linear_token_logprobs(x, w, t, b, return_entropy=True,
                                                   chunk_size=50, chunk_over="vocab")
        ours = torch.autograd.grad(logp.sum() + ent.sum(), [x, w])
    assert (ent >= 0).all()
    # the float64 oracle over the unmasked classes only (a masked class has p = 0 and adds
    # nothing; through it, autograd would take 0 * inf = NaN)
    keep = torch.cat([torch.arange(100), torch.arange(200, 600)]).to(device)
    x64, w64 = (v.detach().double().requires_grad_() for v in (x, w[keep]))
    ls = torch.log_softmax(F.linear(x64, w64), -1)
    ref_ent = torch.special.entr(ls.exp()).sum(-1)
    ref_logp = ls.gather(-1, t[:, None]).squeeze(-1)
    theirs = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), [x64, w64])
    assert_close(logp, ref_logp, torch.float32, "logp", scale=100)
    assert_close(ent, ref_ent, torch.float32, "entropy", scale=10)
    assert_close(ours[0], theirs[0], torch.float32, "grad x", scale=100)
    assert_close(ours[1][keep], theirs[1], torch.float32, "grad w", scale=100)
    assert torch.count_nonzero(ours[1][100:200]) == 0


def test_linear_chunk_over_is_checked():
    x, w, t = torch.randn(2, 4), torch.randn(9, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_over must be 'tokens' or 'vocab', got 'x'"):
        fastattn.linear_token_logprobs(x, w, t, chunk_over="x")


def test_cpu_kernel_training_shape():
    logits, target = make((96,), 32000, torch.bfloat16, "cpu", seed=4)
    leaf = logits.clone().requires_grad_()
    with fastattn.use_backend("cpu"):
        logp, ent = fastattn.token_logprobs(leaf, target, return_entropy=True)
        (logp.sum() - 0.01 * ent.sum()).backward()
    ref_leaf = logits.double().requires_grad_()
    ref_logp, ref_ent = oracle(ref_leaf, target, 1.0)
    (ref_logp.sum() - 0.01 * ref_ent.sum()).backward()
    assert_close(logp, ref_logp, torch.float32, "logp", scale=20)
    assert_close(ent, ref_ent, torch.float32, "entropy", scale=20)
    assert_close(leaf.grad, ref_leaf.grad, torch.bfloat16, "grad")


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_vocab(backend):
    logits, target = make((16,), 131072, torch.bfloat16, "cuda")
    leaf = logits.clone().requires_grad_()
    with fastattn.use_backend(backend):
        logp, ent = fastattn.token_logprobs(leaf, target, temperature=0.9, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
    ref_leaf = logits.double().requires_grad_()
    ref_logp, ref_ent = oracle(ref_leaf, target, 0.9)
    (ref_logp.sum() + ref_ent.sum()).backward()
    assert_close(logp, ref_logp, torch.float32, "logp", scale=50)
    assert_close(ent, ref_ent, torch.float32, "entropy", scale=50)
    assert_close(leaf.grad, ref_leaf.grad, torch.bfloat16, "grad")


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("chunk_over", ["tokens", "vocab"])
def test_gpu_linear_bf16(backend, chunk_over):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 128, generator=g).to(torch.bfloat16).cuda().requires_grad_()
    w = (torch.randn(20000, 128, generator=g) / 12).to(torch.bfloat16).cuda().requires_grad_()
    t = torch.randint(0, 20000, (512,), generator=g).cuda()
    t[::7] = -100
    with fastattn.use_backend(backend):
        logp, ent = fastattn.linear_token_logprobs(x, w, t, temperature=0.9, return_entropy=True,
                                                   chunk_over=chunk_over)
        ours = torch.autograd.grad(logp.sum() + 0.1 * ent.sum(), [x, w])
    x64, w64 = (v.detach().double().requires_grad_() for v in (x, w))
    ref_logp, ref_ent = oracle(F.linear(x64, w64), t, 0.9)
    theirs = torch.autograd.grad(ref_logp.sum() + 0.1 * ref_ent.sum(), [x64, w64])
    assert_close(logp, ref_logp, torch.bfloat16, "logp", scale=10)
    assert_close(ent, ref_ent, torch.bfloat16, "entropy", scale=10)
    for name, a, e in zip("xw", ours, theirs):
        assert_close(a, e, torch.bfloat16, f"grad {name}", scale=10)
