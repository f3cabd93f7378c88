"""The CPU backend's matmul routing (fastattn/ops/_cpu_matmul.py): oneDNN for the forward and
input-gradient products large enough, ATen for the rest; each route against float64, and the
ops that use it (FFN, linear cross-entropy, linear token log-probs) at shapes that take it."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops import _cpu_matmul
from fastattn.ops.ffn import reference as ffn_ref

needs_onednn = pytest.mark.skipif(not _cpu_matmul.onednn_status()[0],
                                  reason=f"oneDNN not used here: {_cpu_matmul.onednn_status()[1]}")


@pytest.fixture
def calls(monkeypatch):
    """The shapes (x, w) of every product sent to oneDNN while the test runs."""
    seen = []
    real = _cpu_matmul._onednn

    def spy(x, w, b):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b)
    monkeypatch.setattr(_cpu_matmul, "_onednn", spy)
    return seen


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(got, want64):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_linear_routes_large_fp32_to_onednn(calls, bias):
    x, w = _rand(256, 160, seed=1), _rand(192, 160, seed=2) / 13
    b = _rand(192, seed=3) if bias else None
    with _cpu_matmul.enabled():
        got = _cpu_matmul.linear(x, w, b)
    assert calls == [((256, 160), (192, 160))]
    _close(got, F.linear(x.double(), w.double(), None if b is None else b.double()))


@needs_onednn
def test_mm_and_addmm_route_row_major_products(calls):
    dy, w = _rand(256, 192, seed=1), _rand(192, 160, seed=2) / 13   # dY @ W (input gradient)
    c = _rand(256, 160, seed=3)
    with _cpu_matmul.enabled():
        got = _cpu_matmul.mm(dy, w)
        got_add = _cpu_matmul.addmm(c, dy, w)
        # a transposed first operand (a weight gradient, dY^T @ X) stays on ATen
        got_t = _cpu_matmul.mm(dy.t(), _rand(256, 96, seed=4))
    assert calls == [((256, 192), (160, 192))] * 2
    _close(got, dy.double() @ w.double())
    _close(got_add, c.double() + dy.double() @ w.double())
    _close(got_t, dy.double().t() @ _rand(256, 96, seed=4).double())


@pytest.mark.parametrize("case", ["disabled", "small", "float64", "empty", "strided weight"])
def test_other_products_stay_on_aten(calls, case):
    x, w = _rand(256, 160, seed=1), _rand(192, 160, seed=2)
    if case == "small":
        x, w = x[:8], w[:8]
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "empty":
        x = x[:0]
    elif case == "strided weight":
        w = _rand(192, 320, seed=2)[:, ::2]
    with _cpu_matmul.enabled(case != "disabled"):
        got = _cpu_matmul.linear(x, w)
    assert calls == []
    torch.testing.assert_close(got, F.linear(x, w))


def test_aten_override_and_bad_value(monkeypatch, calls):
    monkeypatch.setattr(_cpu_matmul, "_state", {})
    monkeypatch.setenv("FASTATTN_CPU_MATMUL", "aten")
    assert _cpu_matmul.onednn_status() == (False, "FASTATTN_CPU_MATMUL=aten")
    with _cpu_matmul.enabled():
        _cpu_matmul.linear(_rand(256, 160), _rand(192, 160))
    assert calls == []
    monkeypatch.setattr(_cpu_matmul, "_state", {})
    monkeypatch.setenv("FASTATTN_CPU_MATMUL", "mkl")
    with pytest.raises(ValueError, match="FASTATTN_CPU_MATMUL must be 'auto'.*got 'mkl'"):
        _cpu_matmul.onednn_status()


def test_failed_smoke_test_falls_back(monkeypatch, calls):
    def broken(*args):
        raise RuntimeError("could not create a primitive")
    monkeypatch.setattr(_cpu_matmul, "_state", {})
    monkeypatch.delenv("FASTATTN_CPU_MATMUL", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    ok, why = _cpu_matmul.onednn_status()
    assert not ok and "failed its smoke test: could not create a primitive" in why
    x, w = _rand(256, 160), _rand(192, 160)
    with _cpu_matmul.enabled():
        torch.testing.assert_close(_cpu_matmul.linear(x, w), F.linear(x, w))
    assert calls == []


# ------------------------------------------------------------------------------------------
# The ops on the "cpu" backend at shapes whose products take oneDNN
# ------------------------------------------------------------------------------------------

def _grads64(fn, inputs, dout):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.double())
    return out, grads


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
    return out, grads


@needs_onednn
@pytest.mark.parametrize("block", ["mlp", "swiglu"])
def test_ffn_cpu_backend_on_onednn(calls, block):
    T, D, H = 300, 96, 200     # 300 * 96 * 200 = 5.8M multiply-adds per product
    x = _rand(T, D, seed=1)
    if block == "mlp":
        inputs = [x, _rand(H, D, seed=2) / D ** 0.5, _rand(H, seed=3) * 0.1,
                  _rand(D, H, seed=4) / H ** 0.5, _rand(D, seed=5) * 0.1]

        def ours(x, w1, b1, w2, b2):
            return fastattn.mlp(x, w1, b1, w2, b2, activation="gelu")

        def ref(x, w1, b1, w2, b2):
            return ffn_ref.mlp(x, w1, b1, w2, b2, "gelu")
    else:
        inputs = [x, _rand(H, D, seed=2) / D ** 0.5, _rand(H, D, seed=3) / D ** 0.5,
                  _rand(D, H, seed=4) / H ** 0.5]

        def ours(x, wg, wu, wd):
            return fastattn.swiglu(x, wg, wu, wd)

        def ref(x, wg, wu, wd):
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    dout = _rand(T, D, seed=9)
    with fastattn.use_backend("cpu"):
        out, grads = _grads(ours, inputs, dout)
    want, want_grads = _grads64(ref, inputs, dout)
    # forward: 2 (MLP) or 3 (SwiGLU) products; backward: d(hidden) and d x, 2 or 3
    assert len(calls) == (4 if block == "mlp" else 6), calls
    _close(out, want)
    for g, w in zip(grads, want_grads):
        _close(g, w)


@needs_onednn
def test_reference_backend_never_takes_onednn(calls):
    x, w1, w2 = _rand(300, 96), _rand(200, 96) / 10, _rand(96, 200) / 14
    with fastattn.use_backend("reference"):
        _grads(lambda *t: fastattn.mlp(*t[:2], None, t[2], None), [x, w1, w2], _rand(300, 96))
        fastattn.linear_cross_entropy(_rand(512, 64), _rand(1024, 64), torch.zeros(512,
                                      dtype=torch.long))
    assert calls == []


@needs_onednn
@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_token_logprobs"])
@pytest.mark.parametrize("chunk_over", ["tokens", "vocab"])
def test_linear_losses_cpu_backend_on_onednn(calls, op, chunk_over):
    T, H, V = 520, 64, 1100    # chunks of 512 tokens (and one of 8) / of 512 vocabulary columns
    x, w = _rand(T, H, seed=1), _rand(V, H, seed=2) / 8
    b = _rand(V, seed=3) * 0.1
    t = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(4))
    t[::5] = -100
    g = _rand(T, seed=5) + 0.5

    def ours(x, w, b):
        if op == "linear_cross_entropy":
            return fastattn.linear_cross_entropy(x, w, t, b, reduction="none", chunk_size=512,
                                                 chunk_over=chunk_over)
        return fastattn.linear_token_logprobs(x, w, t.clamp(min=0), b, chunk_size=512,
                                              chunk_over=chunk_over)

    def ref(x, w, b):
        logits = F.linear(x, w, b)
        if op == "linear_cross_entropy":
            return F.cross_entropy(logits, t, reduction="none")
        return logits.log_softmax(-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    with fastattn.use_backend("cpu"):
        out, grads = _grads(ours, [x, w, b], g)
    want, want_grads = _grads64(ref, [x, w, b], g)
    assert calls, "no product went to oneDNN"
    _close(out, want)
    for got, exp in zip(grads, want_grads):
        _close(got, exp)


@needs_onednn
def test_aten_only_holds_through_backward(calls):
    x, w1, w2 = _rand(300, 96), _rand(200, 96) / 10, _rand(96, 200) / 14
    with fastattn.use_backend("cpu"), _cpu_matmul.aten_only():
        out, grads = _grads(lambda *t: fastattn.mlp(t[0], t[1], None, t[2], None),
                            [x, w1, w2], _rand(300, 96, seed=7))
    assert calls == []
    want, want_grads = _grads64(lambda *t: ffn_ref.mlp(t[0], t[1], None, t[2], None, "gelu"),
                                [x, w1, w2], _rand(300, 96, seed=7))
    _close(out, want)
    for g, w in zip(grads, want_grads):
        _close(g, w)
