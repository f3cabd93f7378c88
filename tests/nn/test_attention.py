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


def test_state_dict_names_are_torchs():
    ours, theirs = _pair(16, 2, "cpu", kdim=8, vdim=12, bias=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "q_proj_weight" in ours.state_dict()


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
