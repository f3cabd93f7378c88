"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict."""

import pytest
import torch

import fastattn
from tests.helpers import ALL_BACKENDS

# the interpreter is slow; the CUDA extension has no training-attention kernel
FAST_BACKENDS = [p for p in ALL_BACKENDS if p.id not in ("cpu-triton", "cuda-cuda")]


def _pair(embed, heads, device, **kw):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(embed, heads, **kw).to(device)
    ours = fastattn.nn.MultiheadAttention(embed, heads, **kw).to(device)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _run(mod, q, k, v, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, weights = mod(q, k, v, **kw)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.device))
    params = {n: p.grad.clone() for n, p in mod.named_parameters()}
    mod.zero_grad()
    return out.detach(), (q.grad, k.grad, v.grad), params, weights


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kvdim", [None, 24])
@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_bool", "attn_float_3d", "both",
                                   "causal"])
def test_matches_torch(device, backend, batch_first, kvdim, masks):
    embed, heads, n, lq, lk = 32, 4, 3, 7, 9
    if masks == "causal":
        lk = lq
    ours, theirs = _pair(embed, heads, device, batch_first=batch_first, kdim=kvdim, vdim=kvdim)
    g = torch.Generator().manual_seed(2)
    def seq(length, dim):
        x = torch.randn(n, length, dim, generator=g).to(device)
        return x if batch_first else x.transpose(0, 1)
    q, k, v = seq(lq, embed), seq(lk, kvdim or embed), seq(lk, kvdim or embed)
    kw = dict(need_weights=False)
    kpm = torch.zeros(n, lk, dtype=torch.bool, device=device)
    kpm[0, -3:] = True
    if masks in ("key_padding", "both"):
        kw["key_padding_mask"] = kpm
    if masks in ("attn_bool", "both"):
        m = torch.rand(lq, lk, generator=g) > 0.7
        m[:, 0] = False
        kw["attn_mask"] = m.to(device)
    if masks == "attn_float_3d":
        kw["attn_mask"] = torch.randn(n * heads, lq, lk, generator=g).to(device)
    if masks == "causal":
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(lq, device=device)
        kw["is_causal"] = True
    with fastattn.use_backend(backend):
        out, gin, gparams, w = _run(ours, q, k, v, **kw)
    t_out, t_gin, t_gparams, _ = _run(theirs, q, k, v, **kw)
    assert w is None
    torch.testing.assert_close(out, t_out, rtol=1e-4, atol=1e-5)
    for a, b in zip(gin, t_gin):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert gparams.keys() == t_gparams.keys()
    for name in gparams:
        torch.testing.assert_close(gparams[name], t_gparams[name], rtol=1e-4, atol=1e-5, msg=name)


def test_need_weights_and_unbatched_are_served():
    ours, theirs = _pair(16, 2, "cpu")
    x = torch.randn(5, 16)  # unbatched (L, E)
    a, wa = ours(x, x, x)   # need_weights=True by default: PyTorch's path
    b, wb = theirs(x, x, x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
    c, none = ours(x, x, x, need_weights=False)
    assert none is None
    torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(add_bias_kv=True), dict(add_zero_attn=True),
                                     dict(add_bias_kv=True, add_zero_attn=True)],
                         ids=lambda o: "+".join(o))
@pytest.mark.parametrize("average_attn_weights", [True, False])
def test_bias_kv_zero_attn_and_per_head_weights_are_torchs(options, average_attn_weights):
    """The options served by PyTorch's path give its outputs, weights and gradients (the
    parameters it adds, bias_k and bias_v, load from its state_dict)."""
    ours, theirs = _pair(16, 4, "cpu", batch_first=True, **options)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 5, 16)
    mask = torch.rand(2, 5) < 0.3
    mask[:, 0] = False
    for need_weights in (False, True):
        kw = dict(key_padding_mask=mask, need_weights=need_weights,
                  average_attn_weights=average_attn_weights)
        a, b = _run(ours, x, x, x, **kw), _run(theirs, x, x, x, **kw)
        torch.testing.assert_close(a[0], b[0])
        for ga, gb in zip(a[1], b[1]):
            torch.testing.assert_close(ga, gb)
        assert a[2].keys() == b[2].keys()
        for name in a[2]:
            torch.testing.assert_close(a[2][name], b[2][name], msg=name)
        if need_weights:    # over 5 keys, + 1 for bias_k, + 1 for the zero key
            keys = 5 + len(options)
            heads = () if average_attn_weights else (4,)
            assert a[3].shape == b[3].shape == (2, *heads, 5, keys)
            torch.testing.assert_close(a[3], b[3])


def test_state_dict_names_are_torchs():
    ours, theirs = _pair(16, 2, "cpu", kdim=8, vdim=12, bias=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "q_proj_weight" in ours.state_dict()


def test_dropout_one_drops_every_weight_as_torch_does():
    ours, theirs = _pair(8, 2, "cpu", dropout=1.0)
    x = torch.randn(3, 2, 8)
    a, _ = ours.train()(x, x, x, need_weights=False)
    b, _ = theirs.train()(x, x, x, need_weights=False)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ours.out_proj.bias.expand_as(a))


def test_dropout_in_training_only():
    ours, _ = _pair(16, 2, "cpu", dropout=0.5)
    x = torch.randn(4, 2, 16)
    ours.eval()
    a, _ = ours(x, x, x, need_weights=False)
    b, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(a, b)
    ours.train()
    c, _ = ours(x, x, x, need_weights=False)
    assert not torch.equal(a, c)


def test_is_causal_needs_a_mask_like_torch():
    ours, _ = _pair(16, 2, "cpu")
    x = torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, x, x, need_weights=False, is_causal=True)


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_a_learned_float_mask_gets_torchs_gradient(which):
    """A float mask that requires grad (a learned bias) is served by PyTorch's path, which
    differentiates it; the fused kernels would silently give it no gradient."""
    ours, theirs = _pair(8, 2, "cpu")
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(4, 3, 8, generator=g), torch.randn(6, 3, 8, generator=g)
    shape = (4, 6) if which == "attn_mask" else (3, 6)
    mask0 = torch.randn(shape, generator=g)
    grads, outs = [], []
    for mod in (ours, theirs):
        mask = mask0.clone().requires_grad_()
        out, _ = mod(q, kv, kv, need_weights=False, **{which: mask})
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(mask.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_float64_mask_at_float64_min_is_not_a_masked_row(which):
    """The kernels' bias is fp32: a float64 module's finfo(float64).min mask entries must not
    round to -inf (a dead row, output 0) where PyTorch's float64 softmax is uniform."""
    ours, theirs = _pair(8, 2, "cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    kv = torch.randn(6, 3, 8, generator=g, dtype=torch.float64)
    lowest = torch.finfo(torch.float64).min
    if which == "attn_mask":
        mask = torch.zeros(4, 6, dtype=torch.float64)
        mask[1] = lowest                      # query 1: every key at finfo.min
    else:
        mask = torch.zeros(3, 6, dtype=torch.float64)
        mask[2] = lowest                      # batch 2: every key at finfo.min
    with torch.no_grad():
        out = ours(q, kv, kv, need_weights=False, **{which: mask})[0]
        want = theirs(q, kv, kv, need_weights=False, **{which: mask})[0]
    assert out.abs().amax() > 0
    torch.testing.assert_close(out, want)


def test_a_mask_that_requires_grad_is_served_under_no_grad():
    """Inference with a learned bias (an nn.Parameter) under torch.no_grad needs no gradient,
    so the fused path takes it, as F.scaled_dot_product_attention does."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    bias = torch.nn.Parameter(torch.randn(5, 5, generator=g))
    with torch.no_grad():
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, want)
    # with grad enabled the bias is learned: PyTorch's SDPA serves the call and gives it its
    # gradient
    fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()
    got, bias.grad = bias.grad, None
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()
    torch.testing.assert_close(got, bias.grad)


@pytest.mark.parametrize("batch_first", [False, True])
def test_bad_shapes_name_the_tensors(batch_first):
    ours, _ = _pair(8, 2, "cpu", kdim=4, vdim=6, batch_first=batch_first)
    def seq(length, batch, dim):
        return torch.randn(batch, length, dim) if batch_first else torch.randn(length, batch, dim)
    q, k, v = seq(5, 3, 8), seq(6, 3, 4), seq(6, 3, 6)
    call = lambda *a, **kw: ours(*a, need_weights=False, **kw)
    with pytest.raises(ValueError, match="same sequence length and batch size"):
        call(q, k, seq(7, 3, 6))
    with pytest.raises(ValueError, match="same sequence length and batch size"):
        call(q, k, seq(6, 2, 6))
    with pytest.raises(ValueError, match="query and key must have the same batch size"):
        call(q, seq(6, 2, 4), seq(6, 2, 6))
    with pytest.raises(ValueError, match="key's last dimension must be kdim 4"):
        call(q, seq(6, 3, 8), v)
    with pytest.raises(ValueError, match="value's last dimension must be vdim 6"):
        call(q, k, seq(6, 3, 4))
    with pytest.raises(ValueError, match="query's last dimension must be embed_dim 8"):
        call(seq(5, 3, 4), k, v)
    with pytest.raises(ValueError, match="must all be 2-D .* or all 3-D"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(3, 6\)"):
        call(q, k, v, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    # unbatched: the message gives the shape the caller passed, not an internal one
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(6,\), got \(1, 6\)"):
        call(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0],
             v[0] if batch_first else v[:, 0], key_padding_mask=torch.zeros(1, 6, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_masks_on_another_device_and_bad_dropout_are_refused(backend):
    """A mask on another device used to run the op's fake kernel (uninitialised output); an
    out-of-range dropout gave NaN, zeros or a message naming neither module nor argument."""
    ours, _ = _pair(8, 2, "cpu")
    q = torch.randn(3, 2, 8)
    with fastattn.use_backend(backend):
        with pytest.raises(ValueError, match=r"attn_mask must be on the query's device \(cpu\), "
                                             r"got meta"):
            ours(q, q, q, need_weights=False, attn_mask=torch.zeros(3, 3, device="meta"))
        with pytest.raises(ValueError, match="key_padding_mask must be on the query's device"):
            ours(q, q, q, need_weights=False,
                 key_padding_mask=torch.zeros(2, 3, dtype=torch.bool, device="meta"))
        for p in (-0.5, 2.0, float("nan")):
            ours.dropout = p
            with pytest.raises(ValueError, match=r"MultiheadAttention: dropout must be in \[0, 1\)"):
                ours.train()(q, q, q, need_weights=False)
            ours.eval()(q, q, q, need_weights=False)       # not applied in eval: no error
