"""fastattn.mlp / fastattn.swiglu on every backend against float64 references, forward and
every gradient, plus what autograd keeps for backward."""

import pytest
import torch

import fastattn
from fastattn.ops.ffn import reference as ref
from tests.helpers import ALL_BACKENDS, GPU

ACTS = list(ref.ACTIVATIONS)


def _tensors(shape_x, d, hidden, d_out, dtype, device, bias, seed=0, transposed_x=False):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)
    x = make(*shape_x[:-1], d)
    if transposed_x:  # a non-contiguous view with the same values
        x = x.transpose(0, -2).contiguous().transpose(0, -2)
    w1 = make(hidden, d, scale=max(d, 1) ** -0.5)
    w2 = make(d_out, hidden, scale=hidden ** -0.5)
    w3 = make(hidden, d, scale=max(d, 1) ** -0.5)
    b1 = make(hidden) if bias else None
    b2 = make(d_out) if bias else None
    b3 = make(hidden) if bias else None
    return x, w1, b1, w2, b2, w3, b3


def _grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def _compare(ours, exact, dtype, names, baseline):
    """fp32: within a fixed tolerance of the float64 reference. fp16/bf16: FlashAttention's rule,
    as for attention: our largest error at most twice that of PyTorch's own ops run in the same
    precision on the same device (``baseline``), plus half an ulp of the largest value (both
    round their outputs to the dtype). A fixed tolerance cannot do here: weight gradients sum
    over tokens products of values rounded to bf16, and PyTorch's error on them exceeds 5%."""
    for name, o, e, b in zip(names, ours, exact, baseline):
        if e is None:
            assert o is None, name
            continue
        o, e, b = o.double().cpu(), e.cpu(), b.double().cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(o, e, msg=name, rtol=2e-5, atol=2e-5)
            continue
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        err, base = (o - e).abs().max().item(), (b - e).abs().max().item()
        floor = torch.finfo(dtype).eps / 2 * e.abs().max().item()
        assert err <= 2 * base + floor, (
            f"{name}: error {err:.3g} > 2 x PyTorch's {base:.3g} + {floor:.3g} ({dtype})")


def _dtypes(device, backend):
    if device == "cpu" and backend == "triton":
        return [torch.float32]          # the interpreter: fp32 only (no bf16 tl.dot)
    if device == "cpu":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_matches_float64(device, backend, activation, bias):
    for dtype in _dtypes(device, backend):
        x, w1, b1, w2, b2, _, _ = _tensors((3, 5, 40), 40, 97, 40, dtype, device, bias,
                                           transposed_x=True)
        dout = torch.randn(3, 5, 40).to(device, dtype)
        tensors = (x, w1, b1, w2, b2)
        with fastattn.use_backend(backend):
            ours = _grads(lambda *t: fastattn.mlp(*t, activation=activation), tensors, dout)
        exact = _grads(lambda *t: ref.mlp(*t, activation=activation),
                       [t.double() if t is not None else None for t in tensors], dout.double())
        baseline = _grads(lambda *t: ref.mlp(*t, activation=activation), tensors, dout)
        _compare(ours, exact, dtype, ("out", "dx", "dw1", "db1", "dw2", "db2"), baseline)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_float64(device, backend, activation, bias):
    # 2-D x without bias, a non-contiguous 3-D x with bias
    shape = (3, 11, 64) if bias else (33, 64)
    for dtype in _dtypes(device, backend):
        x, wg, bg, wd, bd, wu, bu = _tensors(shape, 64, 130, 48, dtype, device, bias,
                                             transposed_x=bias)
        assert x.is_contiguous() != bias
        dout = torch.randn(*shape[:-1], 48).to(device, dtype)
        tensors = (x, wg, wu, wd, bg, bu, bd)

        def ours_fn(x, wg, wu, wd, bg, bu, bd):
            return fastattn.swiglu(x, wg, wu, wd, activation=activation, b_gate=bg, b_up=bu,
                                   b_down=bd)

        def ref_fn(x, wg, wu, wd, bg, bu, bd):
            return ref.swiglu(x, wg, wu, wd, activation, bg, bu, bd)
        with fastattn.use_backend(backend):
            ours = _grads(ours_fn, tensors, dout)
        exact = _grads(ref_fn, [t.double() if t is not None else None for t in tensors],
                       dout.double())
        baseline = _grads(ref_fn, tensors, dout)
        _compare(ours, exact, dtype, ("out", "dx", "dw_gate", "dw_up", "dw_down", "db_gate",
                                      "db_up", "db_down"), baseline)


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("block", ["mlp", "swiglu"])
def test_keeps_only_what_backward_cannot_recompute(block):
    t, d, hidden = 64, 32, 96
    x, w1, b1, w2, b2, w3, _ = _tensors((t, d), d, hidden, d, torch.float32, "cpu", True)
    for p in (x, w1, b1, w2, b2, w3):
        p.requires_grad_()
    if block == "mlp":
        ours, _ = _saved_bytes(lambda: fastattn.mlp(x, w1, b1, w2, b2))
        eager, _ = _saved_bytes(lambda: ref.mlp(x, w1, b1, w2, b2))
        inputs, hidden_tensors = (x, w1, w2), 1          # + h
    else:
        ours, _ = _saved_bytes(lambda: fastattn.swiglu(x, w1, w3, w2))
        eager, _ = _saved_bytes(lambda: ref.swiglu(x, w1, w3, w2))
        inputs, hidden_tensors = (x, w1, w3, w2), 2      # + g, u
    # the inputs (kept by reference, no copy) and the hidden tensors backward cannot recompute
    assert ours == sum(p.numel() * 4 for p in inputs) + hidden_tensors * t * hidden * 4
    assert ours < eager


@pytest.mark.parametrize("block", ["mlp", "swiglu"])
def test_cpu_backward_peak_holds_no_hidden_buffer_it_can_drop(block):
    """The memory torch's CPU allocator holds during forward+backward (the profiler's events,
    benchmarks.common.cpu_peak_mb), in (T, F) hidden buffers: MLP keeps h, and its backward
    holds d a -> dh (written in place) and the recomputed a: 3 at most; SwiGLU keeps g and u,
    then d m -> dg, du and m: 5. Holding a (or m) to the end, or dh beside d a, adds one."""
    from benchmarks.common import cpu_peak_mb
    t, d, hidden = 1024, 16, 1024                  # the (T, F) buffers dwarf everything else
    x, w1, b1, w2, b2, w3, _ = _tensors((t, d), d, hidden, d, torch.float32, "cpu", True)
    for p in (x, w1, w2, w3):
        p.requires_grad_()
    dout = torch.randn(t, d)
    with fastattn.use_backend("cpu"):
        def step():
            out = fastattn.mlp(x, w1, None, w2) if block == "mlp" else fastattn.swiglu(
                x, w1, w3, w2)
            out.backward(dout)
        step()
        peak = cpu_peak_mb(step)
    buffer_mb = t * hidden * 4 / 2**20
    small_mb = (4 * t * d + 6 * d * hidden) * 4 / 2**20    # x, out, dx parts, weight grads
    assert peak is not None
    assert peak <= (3 if block == "mlp" else 5) * buffer_mb + small_mb, (peak, buffer_mb)


def test_bad_inputs_give_clear_errors():
    x, w1, b1, w2, b2, w3, _ = _tensors((4, 8), 8, 16, 8, torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="unknown activation"):
        fastattn.mlp(x, w1, b1, w2, b2, activation="tanh")
    with pytest.raises(ValueError, match=r"x's features \(8, shape \(4, 8\)\) do not match "
                                         r"w1's in_features \(16, shape \(8, 16\)"):
        fastattn.mlp(x, w1.t(), b1, w2, b2)
    with pytest.raises(ValueError, match="w2 must be"):
        fastattn.mlp(x, w1, b1, w2[:, :5], b2)
    with pytest.raises(ValueError, match="b1 must be"):
        fastattn.mlp(x, w1, b1[:3], w2, b2)
    with pytest.raises(TypeError, match="dtype"):
        fastattn.mlp(x, w1.double(), b1, w2, b2)
    with pytest.raises(ValueError, match="device"):
        fastattn.mlp(x, w1.to("meta"), b1, w2, b2)
    with pytest.raises(ValueError, match="w_up must have"):
        fastattn.swiglu(x, w1, w1[:5], w2)
    with pytest.raises(TypeError, match="floating-point"):
        fastattn.mlp(x.long(), w1, b1, w2, b2)
    # checked before anything reads their shapes
    with pytest.raises(TypeError, match="w1 must be a tensor, got NoneType"):
        fastattn.mlp(x, None, b1, w2, b2)
    with pytest.raises(TypeError, match="w_gate must be a tensor, got NoneType"):
        fastattn.swiglu(x, None, w3, w2)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        fastattn.mlp(torch.tensor(1.0), w1, b1, w2, b2)
    # an input of the wrong width is named as such, with both shapes (not "w1 must be ...")
    with pytest.raises(ValueError, match=r"x's features \(7, shape \(4, 7\)\) do not match "
                                         r"w1's in_features \(8,"):
        fastattn.mlp(x[:, :7], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"x's features \(7, .* w_gate's in_features \(8,"):
        fastattn.nn.SwiGLU(8, 16)(x[:, :7])
    with pytest.raises(TypeError, match="x must be a dense"):
        fastattn.mlp(x.to_sparse(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="w1 must be a dense"):
        fastattn.mlp(x, w1.to_sparse(), b1, w2, b2)
    with pytest.raises(TypeError, match="b2 must be a dense"):
        fastattn.mlp(x, w1, b1, w2, b2.to_sparse())


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bf16_large(backend):
    x, w1, _, w2, _, w3, _ = _tensors((2048, 1024), 1024, 2816, 1024, torch.bfloat16, "cuda", False)
    dout = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    tensors = (x, w1, w3, w2)
    with fastattn.use_backend(backend):
        ours = _grads(lambda *t: fastattn.swiglu(*t), tensors, dout)
    exact = _grads(lambda *t: ref.swiglu(*t), [t.float() for t in tensors], dout.float())
    lowp = _grads(lambda *t: ref.swiglu(*t), tensors, dout)  # eager bf16: the rule's baseline
    for name, o, e, b in zip(("out", "dx", "dwg", "dwu", "dwd"), ours, exact, lowp):
        err = (o.float() - e).abs().max().item()
        base = (b.float() - e).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: {err} > 2 x eager bf16 {base}"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_zero_tokens(device, backend):
    x, w1, b1, w2, b2, w3, _ = _tensors((0, 8), 8, 16, 8, torch.float32, device, True)
    with fastattn.use_backend(backend):
        assert fastattn.mlp(x, w1, b1, w2, b2).shape == (0, 8)
        assert fastattn.swiglu(x, w1, w3, w2).shape == (0, 8)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_zero_features(device, backend):
    """D = 0 (x has no features): the hidden layer is its bias alone, as in torch."""
    x, w1, b1, w2, b2, w3, b3 = _tensors((3, 0), 0, 16, 8, torch.float32, device, True)
    with fastattn.use_backend(backend):
        out = _grads(lambda *t: fastattn.mlp(*t), (x, w1, b1, w2, b2), torch.ones(3, 8, device=device))
        glu = _grads(lambda *t: fastattn.swiglu(*t[:4], b_gate=t[4], b_up=t[5]),
                     (x, w1, w3, w2, b1, b3), torch.ones(3, 8, device=device))
    want = _grads(lambda *t: ref.mlp(*t), (x, w1, b1, w2, b2), torch.ones(3, 8, device=device))
    want_glu = _grads(lambda *t: ref.swiglu(*t[:4], b_gate=t[4], b_up=t[5]),
                      (x, w1, w3, w2, b1, b3), torch.ones(3, 8, device=device))
    for o, e in zip(out + glu, want + want_glu):
        torch.testing.assert_close(o, e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_nan_pre_activation_propagates(device, backend, activation):
    """A NaN in x reaches the output of its token as in PyTorch (tl.maximum dropped it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g).to(device)
    x[1, 2] = float("nan")
    w1, w2 = (torch.randn(*s, generator=g).to(device) * 0.3 for s in ((16, 8), (8, 16)))
    with fastattn.use_backend(backend):
        mlp = fastattn.mlp(x, w1, None, w2, None, activation=activation)
        glu = fastattn.swiglu(x, w1, w1.flip(0), w2, activation=activation) \
            if activation in ("silu", "gelu_tanh", "relu2") else mlp
    for y in (mlp, glu):
        assert y[1].isnan().all() and y[[0, 2]].isfinite().all()

