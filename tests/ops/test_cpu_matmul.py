"""The CPU backend's matmul routing (fastattn/ops/_cpu_matmul.py): oneDNN for the forward and
input-gradient products large enough, ATen for the rest; each route against float64, and the
ops that use it (FFN, linear cross-entropy, linear token log-probs) at shapes that take it."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops import _cpu_matmul
from fastattn.ops.ffn import reference as ffn_ref

_MIN_MACS_IN_USE = _cpu_matmul._MIN_MACS
# whether this torch's oneDNN runs here (on any CPU: the tests take the route by
# FASTATTN_CPU_MATMUL=onednn, so they do not depend on the CPU's vendor)
_ONEDNN_OK, _ONEDNN_WHY = _cpu_matmul._probe("onednn")
needs_onednn = pytest.mark.skipif(not _ONEDNN_OK, reason=f"no oneDNN here: {_ONEDNN_WHY}")


@pytest.fixture(autouse=True)
def routing_here(monkeypatch):
    """The route on any CPU with oneDNN (FASTATTN_CPU_MATMUL=onednn), from 2^20 multiply-adds
    (2^26 in use: the tests' shapes stay small; test_threshold checks the real one)."""
    monkeypatch.setattr(_cpu_matmul, "_MIN_MACS", 1 << 20)
    monkeypatch.setenv("FASTATTN_CPU_MATMUL", "onednn")
    monkeypatch.setattr(_cpu_matmul, "_state", {})
    yield
    _clear_backend_status()     # (a report made under this module's setting)


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


@needs_onednn
def test_threshold(monkeypatch):
    """The products routed in use: 2^26 multiply-adds and up."""
    monkeypatch.setattr(_cpu_matmul, "_MIN_MACS", _MIN_MACS_IN_USE)
    assert _MIN_MACS_IN_USE == 1 << 26
    x, w_below, w_at = torch.empty(1024, 256), torch.empty(255, 256), torch.empty(256, 256)
    with _cpu_matmul.enabled():
        assert not _cpu_matmul.routes_linear(x, w_below) and _cpu_matmul.routes_linear(x, w_at)


@pytest.mark.parametrize("case", ["disabled", "small", "float64", "empty", "padded weight",
                                  "strided bias", "expanded bias", "0-d bias",
                                  "padded input"])
def test_other_products_stay_on_aten(calls, case):
    """Products oneDNN's fast kernels do not take (or that are too small to gain) go to ATen,
    and give ATen's answer: a padded weight would run oneDNN's reference kernel (hundreds of
    times slower), and a strided bias would be read as if it were contiguous."""
    x, w, b = _rand(256, 160, seed=1), _rand(192, 160, seed=2), None
    if case == "small":
        x, w = x[:8], w[:8]
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "empty":
        x = x[:0]
    elif case == "padded weight":
        w = _rand(192, 320, seed=2)[:, :160]
    elif case == "strided bias":
        b = _rand(384, seed=3)[::2]
    elif case == "expanded bias":
        b = _rand(1, seed=3).expand(192)
    elif case == "0-d bias":
        b = _rand(1, seed=3)[0]
    elif case == "padded input":
        x = _rand(256, 320, seed=1)[:, :160]
    with _cpu_matmul.enabled(case != "disabled"):
        got = _cpu_matmul.linear(x, w, b)
        got_mm = _cpu_matmul.mm(x, w.t()) if b is None else None   # (mm takes no bias)
    assert calls == []
    torch.testing.assert_close(got, F.linear(x, w, b))
    if got_mm is not None:
        torch.testing.assert_close(got_mm, x @ w.t())


@needs_onednn
def test_transposed_weight_routes(calls):
    """A weight given as the transpose of a contiguous tensor (lm heads passed as ``W.t()``)
    is a layout oneDNN's fast kernels take."""
    x, w_t = _rand(256, 160, seed=1), _rand(160, 192, seed=2).t()
    with _cpu_matmul.enabled():
        got = _cpu_matmul.linear(x, w_t)
    assert calls == [((256, 160), (192, 160))]
    _close(got, F.linear(x.double(), w_t.double()))


def _clear_backend_status():
    """Forget the cached backend reports (whose "cpu" line holds the GEMM routing's)."""
    fastattn._backends._status.cache_clear()
    fastattn._backends._extension_status.cache_clear()


def _fresh_status(monkeypatch, choice="onednn", vendor=None):
    monkeypatch.setattr(_cpu_matmul, "_state", {})
    monkeypatch.setenv("FASTATTN_CPU_MATMUL", choice)
    if vendor is not None:
        monkeypatch.setattr(_cpu_matmul, "cpu_vendor", lambda: vendor)


def test_aten_override_and_bad_value(monkeypatch, calls):
    _fresh_status(monkeypatch, "aten")
    assert _cpu_matmul.onednn_status() == (False, "FASTATTN_CPU_MATMUL=aten")
    with _cpu_matmul.enabled():
        _cpu_matmul.linear(_rand(256, 160), _rand(192, 160))
    assert calls == []
    _fresh_status(monkeypatch, "mkl")
    with pytest.raises(ValueError, match="FASTATTN_CPU_MATMUL must be 'auto'.*got 'mkl'"):
        _cpu_matmul.onednn_status()
    # the backend report says so instead of raising; the GEMM ops raise it, whatever the
    # size of their products (here below the threshold in use)
    monkeypatch.setattr(_cpu_matmul, "_MIN_MACS", _MIN_MACS_IN_USE)
    _clear_backend_status()
    try:
        assert "FASTATTN_CPU_MATMUL must be" in fastattn.backends()["cpu"].reason
        with pytest.raises(ValueError, match="FASTATTN_CPU_MATMUL"), \
                fastattn.use_backend("cpu"):
            fastattn.mlp(_rand(30, 16), _rand(20, 16), None, _rand(16, 20), None)
    finally:
        _clear_backend_status()


@pytest.mark.skipif(_cpu_matmul.cpu_vendor() == "", reason="no /proc/cpuinfo vendor here")
def test_auto_takes_the_route_only_on_amd(monkeypatch):
    _fresh_status(monkeypatch, "auto", vendor="GenuineIntel")
    ok, why = _cpu_matmul.onednn_status()
    assert not ok and "only on AMD CPUs; this one is GenuineIntel" in why
    if torch.backends.mkldnn.is_available():
        _fresh_status(monkeypatch, "onednn", vendor="GenuineIntel")
        assert _cpu_matmul.onednn_status()[0] == hasattr(torch.ops.mkldnn, "_linear_pointwise")


@needs_onednn
def test_failed_smoke_test_falls_back(monkeypatch, calls):
    def broken(*args):
        raise RuntimeError("could not create a primitive")
    _fresh_status(monkeypatch)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    ok, why = _cpu_matmul.onednn_status()
    assert not ok and "failed its smoke test: could not create a primitive" in why
    x, w = _rand(256, 160), _rand(192, 160)
    with _cpu_matmul.enabled():
        torch.testing.assert_close(_cpu_matmul.linear(x, w), F.linear(x, w))
    assert calls == []


@needs_onednn
def test_smoke_test_outside_dispatch_modes(monkeypatch):
    """A first use under a FakeTensorMode (torch.export, make_fx) does not fail the smoke
    test, whose verdict is kept for the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    _fresh_status(monkeypatch)
    with FakeTensorMode():
        assert _cpu_matmul.onednn_status() == (True, "")


@needs_onednn
@pytest.mark.parametrize("setting", ["autocast", "float64 default dtype"])
def test_smoke_test_ignores_the_callers_settings(monkeypatch, setting):
    """The first use may come under autocast or another default dtype: the smoke test runs
    in fp32 regardless, and passes (it once raised under autocast, for every CPU op)."""
    _fresh_status(monkeypatch)
    _clear_backend_status()
    try:
        if setting == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert fastattn.backends()["cpu"].available    # (runs the smoke test)
                assert _cpu_matmul.onednn_status() == (True, "")
                out = fastattn.mlp(_rand(300, 96), _rand(200, 96), None, _rand(96, 200), None)
            assert out.dtype == torch.bfloat16
        else:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                _cpu_matmul.onednn_status()
            finally:
                torch.set_default_dtype(previous)
        assert _cpu_matmul.onednn_status() == (True, "")
    finally:
        _clear_backend_status()


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
@pytest.mark.parametrize("op, reduction", [("linear_cross_entropy", "none"),
                                           ("linear_cross_entropy", "mean"),
                                           ("linear_cross_entropy", "sum"),
                                           ("linear_token_logprobs", None)])
@pytest.mark.parametrize("chunk_over", ["tokens", "vocab"])
def test_linear_losses_cpu_backend_on_onednn(calls, op, reduction, chunk_over):
    """Loss (or log-probs) and every gradient on the oneDNN route: "mean"/"sum" make the
    gradients in the forward's pass, "none" and the log-probs recompute the chunks in
    backward; then a no-grad call (the forward-only loop)."""
    T, H, V = 520, 64, 1100    # chunks of 512 tokens (and one of 8) / of 512 vocabulary columns
    x, w = _rand(T, H, seed=1), _rand(V, H, seed=2) / 8
    b = _rand(V, seed=3) * 0.1
    t = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(4))
    t[::5] = -100
    g = _rand(T, seed=5) + 0.5 if reduction in ("none", None) else torch.tensor(1.3)

    def ours(x, w, b):
        if op == "linear_cross_entropy":
            return fastattn.linear_cross_entropy(x, w, t, b, reduction=reduction,
                                                 chunk_size=512, chunk_over=chunk_over)
        return fastattn.linear_token_logprobs(x, w, t.clamp(min=0), b, chunk_size=512,
                                              chunk_over=chunk_over)

    def ref(x, w, b):
        logits = F.linear(x, w, b)
        if op == "linear_cross_entropy":
            return F.cross_entropy(logits, t, reduction=reduction)
        return logits.log_softmax(-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    with fastattn.use_backend("cpu"):
        out, grads = _grads(ours, [x, w, b], g)
    want, want_grads = _grads64(ref, [x, w, b], g)
    # the logits of the first chunk, on oneDNN (the last token chunk, 8 rows, on ATen)
    first = ((512, H), (V, H)) if chunk_over == "tokens" else ((T, H), (512, H))
    assert first in calls, calls
    if chunk_over == "tokens":     # d x of a 512-token chunk: dlogits @ W
        assert ((512, V), (H, V)) in calls, calls
    _close(out, want)
    for got, exp in zip(grads, want_grads):
        _close(got, exp)
    calls.clear()
    with fastattn.use_backend("cpu"), torch.no_grad():
        _close(ours(x, w, b), want.detach())
    assert first in calls, calls


@needs_onednn
def test_aten_only_covers_forward_and_backward(calls):
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
