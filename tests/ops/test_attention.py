"""fastattn attention front doors (SDPA, flash_attention, varlen, decode) on every backend.

Numerics follow FlashAttention's rule: against a float64 reference, a backend's error is at most
twice the error of plain PyTorch math in the same precision (plus a tiny atol for fp32), for the
output and for dq, dk, dv, with a random output gradient. Kernel-level Triton tests live in
test_attention_triton.py / test_attention_decode.py.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops import attention as attn_ops
from fastattn.ops.attention import reference as ref
from tests.helpers import ALL_BACKENDS, GPU

# Training attention has no CUDA-extension kernel (Triton is the GPU training path; the CUDA
# extension serves decode_attention, tested over ALL_BACKENDS below).
DENSE_BACKENDS = [p for p in ALL_BACKENDS if p.id != "cuda-cuda"]
# The interpreter is slow: Triton gets the smaller cases here, all of them on a GPU.
FAST_BACKENDS = [p for p in DENSE_BACKENDS if p.id != "cpu-triton"]


def _dev(device):
    return torch.device(device)


def _qkv(b, h, hkv, sq, sk, d, dtype, device, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    def make(heads, s):
        if transposed:  # (B, S, H, D) memory viewed as (B, H, S, D): non-contiguous
            return torch.randn(b, s, heads, d, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(b, heads, s, d, generator=g).to(device, dtype)
    return make(h, sq), make(hkv, sk), make(hkv, sk)


def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _reference(q, k, v, dout, upcast=True, **kw):
    """Outputs and gradients of reference.attention_fwd (float64 when given float64)."""
    params = dict(bias=None, diag=0, window_left=-1, window_right=-1, softcap=0.0,
                  dropout_p=0.0, seed=0, scale=q.shape[-1] ** -0.5)
    params.update(kw)

    def fn(q, k, v):
        return ref.attention_fwd(q, k, v, params["bias"], params["scale"], params["diag"],
                                 params["window_left"], params["window_right"],
                                 params["softcap"], params["dropout_p"], params["seed"],
                                 upcast=upcast)[0]
    return _grads(fn, q, k, v, dout)


def _check_fa_rule(ours, exact, baseline, dtype, what):
    """Each of ours vs exact (float64) within 2x baseline's error (+ a floor for fp32)."""
    names = ("out", "dq", "dk", "dv")
    for name, o, e, b in zip(names, ours, exact, baseline):
        o, e, b = o.double(), e.double(), b.double()
        assert torch.isfinite(o).all(), f"{what} {name}: non-finite values"
        err = (o - e).abs().max().item()
        base = (b - e).abs().max().item()
        floor = 1e-5 * max(1.0, e.abs().max().item()) if dtype == torch.float32 else 1e-6
        assert err <= 2 * base + floor, f"{what} {name}: error {err:.3g} > 2 x PyTorch's {base:.3g}"


CASES = [
    # b, h, hkv, sq, sk, d, causal, window, softcap
    (1, 1, 1, 1, 1, 16, False, (-1, -1), 0.0),
    (3, 8, 2, 17, 97, 40, True, (-1, -1), 0.0),       # GQA 8:2, bottom-right causal
    (1, 8, 1, 97, 17, 80, True, (-1, -1), 0.0),       # MQA; Sq > Sk: early rows fully masked
    (1, 2, 2, 130, 130, 64, False, (32, 8), 0.0),     # sliding window
    (3, 2, 1, 97, 130, 128, False, (-1, -1), 30.0),   # softcap
    (1, 4, 2, 130, 97, 16, True, (40, -1), 5.0),      # causal + window + softcap
    (3, 8, 8, 97, 130, 128, False, (-1, -1), 0.0),    # head dim 128, Sq < Sk
]


def _fa_params():
    """Every (backend, dtype, case), except on the Triton interpreter: no bf16 there (it cannot
    run a bf16 tl.dot) and only the small cases (it is slow); the GPU runs all of them."""
    out = []
    for bp in DENSE_BACKENDS:
        device, backend = bp.values
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for i, case in enumerate(CASES):
                b, h, hkv, sq, sk, d = case[:6]
                if device == "cpu" and backend == "triton" and (
                        dtype == torch.bfloat16 or sq * sk * d > 17 * 97 * 64):
                    continue
                out.append(pytest.param(device, backend, dtype, case, marks=bp.marks,
                                        id=f"{bp.id}-{str(dtype)[6:]}-case{i}"))
    return out


def _assert_stored_bshd(name, t):
    """t (B, H, S, D) lies in memory as (B, S, H, D), as PyTorch's flash attention returns it."""
    b, h, s, d = t.shape
    assert t.stride() == (s * h * d, d, h * d, 1), f"{name}: strides {t.stride()} for {tuple(t.shape)}"


@pytest.mark.parametrize("device,backend,dtype,case", _fa_params())
def test_flash_attention_matches_reference(device, backend, dtype, case):
    b, h, hkv, sq, sk, d, causal, window, softcap = case
    torch.manual_seed(1)
    q, k, v = _qkv(b, h, hkv, sq, sk, d, dtype, device, transposed=(case[0] == 3))
    dout = torch.randn(b, h, sq, d).to(device, dtype)
    left, right = window
    kw = dict(diag=sk - sq, window_left=left, window_right=0 if causal else right,
              softcap=softcap)
    with fastattn.use_backend(backend):
        ours = _grads(lambda q, k, v: fastattn.flash_attention(
            q, k, v, causal=causal, window=window, softcap=softcap), q, k, v, dout)
    _assert_stored_bshd("out", ours[0])  # (the grads: see test_a_fused_qkv_projection_...)
    exact = _reference(*(x.double() for x in (q, k, v, dout)), **kw)
    if dtype == torch.float32:
        for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
            torch.testing.assert_close(o.double(), e, rtol=2e-5, atol=2e-5, msg=name)
    else:
        # PyTorch's error in the same precision, on the same device (FlashAttention's rule);
        # everything is compared on the CPU in float64.
        baseline = _reference(q, k, v, dout, upcast=False, **kw)
        _check_fa_rule(*([x.cpu() for x in xs] for xs in (ours, exact, baseline)), dtype,
                       f"{backend} {dtype}")
        if device == "cpu" and window == (-1, -1) and not softcap and not (causal and sq > sk):
            # and within twice the error of PyTorch's own SDPA in this precision (its fused
            # CPU kernel accumulates in fp32, as ours do: a tighter baseline than the plain
            # reference's; measured at up to 1.14x it). Not where some row sees no key: SDPA
            # gives NaN there.
            sdpa = _grads(lambda q, k, v: F.scaled_dot_product_attention(
                q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                attn_mask=(torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
                           if causal else None)), q, k, v, dout)
            _check_fa_rule(ours, exact, sdpa, dtype, f"{backend} {dtype} against SDPA")


@pytest.mark.parametrize("case", [
    # b, h, hkv, sq, sk, d, causal, window, softcap, dropout
    (1, 1, 1, 300, 500, 64, True, (-1, -1), 0.0, 0.0),
    (1, 2, 1, 257, 130, 32, True, (-1, -1), 0.0, 0.0),     # GQA; Sq > Sk: rows that see nothing
    (1, 1, 1, 200, 700, 40, False, (-1, -1), 0.0, 0.0),
    (1, 1, 1, 333, 333, 64, True, (30, -1), 20.0, 0.0),     # sliding window, softcap
    (1, 1, 1, 260, 260, 32, True, (-1, -1), 0.0, 0.3),      # dropout: the same mask both ways
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_split_by_blocks(case, dtype):
    """With few (batch, head) pairs for the threads the C++ backward splits by key blocks (dK,
    dV) and query blocks (dQ) instead of by head (csrc/cpu/attention.cpp): the gradients equal
    the per-head path's (one thread) and float64's. In bf16 each task converts only the rows it
    reads, so a wrong row range reads unconverted memory."""
    b, h, hkv, sq, sk, d, causal, window, softcap, dropout = case
    torch.manual_seed(1)
    q, k, v = _qkv(b, h, hkv, sq, sk, d, dtype, "cpu")
    dout = torch.randn(b, h, sq, d).to(dtype)

    def fn(q, k, v):
        torch.manual_seed(7)   # the dropout seed is drawn from torch's generator
        return fastattn.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap,
                                        dropout_p=dropout)
    saved = torch.get_num_threads()
    try:
        with fastattn.use_backend("cpu"):
            torch.set_num_threads(1)
            per_head = _grads(fn, q, k, v, dout)
            torch.set_num_threads(4)    # 7 b h < 5 threads: the split path (run_backward)
            assert torch.get_num_threads() == 4 and 7 * b * h < 5 * 4
            split = _grads(fn, q, k, v, dout)
    finally:
        torch.set_num_threads(saved)
    # the same fp32 arithmetic either way; in bf16 a sum that lands on a rounding boundary
    # may round one ulp apart
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for name, a, c in zip(("out", "dq", "dk", "dv"), per_head, split):
        torch.testing.assert_close(c, a, msg=name, **tol)
    if dropout == 0 and dtype == torch.float32:
        left, right = window
        exact = _reference(*(x.double() for x in (q, k, v, dout)), diag=sk - sq,
                           window_left=left, window_right=0 if causal else right,
                           softcap=softcap)
        for name, o, e in zip(("out", "dq", "dk", "dv"), split, exact):
            torch.testing.assert_close(o.double(), e, rtol=2e-5, atol=2e-5, msg=name)


def test_cpu_varlen_backward_split_by_blocks():
    # 3 packed sequences x 2 heads = 6 pairs, 16 threads (7 x 6 < 5 x 16): the block split,
    # over sequences of other lengths than the longest (tasks past a sequence's end do nothing)
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 70, 400, 410], dtype=torch.int32)
    q, k, v = torch.randn(410, 2, 32, generator=g), torch.randn(410, 1, 32, generator=g), \
        torch.randn(410, 1, 32, generator=g)
    dout = torch.randn(410, 2, 32, generator=g)

    def fn(q, k, v):
        return fastattn.varlen_attention(q, k, v, cu, cu, 330, 330, causal=True)
    saved = torch.get_num_threads()
    try:
        with fastattn.use_backend("cpu"):
            torch.set_num_threads(1)
            per_head = _grads(fn, q, k, v, dout)
            torch.set_num_threads(16)
            split = _grads(fn, q, k, v, dout)
    finally:
        torch.set_num_threads(saved)
    for name, a, c in zip(("out", "dq", "dk", "dv"), per_head, split):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_a_fused_qkv_projection_round_trips_without_copies(device, backend, hkv):
    # A GPT block: q, k, v are views of one projection, the output goes back to (B, S, H*D).
    # Out, dq, dk, dv stored (B, S, H, D) make both reshapes views (no activation-sized
    # copies), and the gradients still agree with the same code through the reference.
    B, S, H, D = 2, 9, 4, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, (H + 2 * hkv) * D, generator=g).to(device)
    dy = torch.randn(B, S, H * D, generator=g).to(device)

    def block(x, backend):
        x = x.detach().requires_grad_()
        q, k, v = x.split((H * D, hkv * D, hkv * D), dim=-1)
        q, k, v = (t.view(B, S, -1, D).transpose(1, 2) for t in (q, k, v))
        seen = {}
        for name, t in (("dq", q), ("dk", k), ("dv", v)):
            t.register_hook(lambda grad, name=name: seen.__setitem__(name, grad))
        with fastattn.use_backend(backend):
            out = fastattn.flash_attention(q, k, v, causal=True)
        y = out.transpose(1, 2).reshape(B, S, H * D)
        y.backward(dy)
        return out, y, seen, x.grad

    out, y, seen, dx = block(x, backend)
    assert y.data_ptr() == out.data_ptr() and y.is_contiguous(), "the output reshape copied"
    for name, grad in seen.items():
        _assert_stored_bshd(name, grad)
        assert grad.transpose(1, 2).is_contiguous(), name   # ViewBackward's reshape is a view
    _, _, _, dx_ref = block(x, "reference")
    torch.testing.assert_close(dx, dx_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
def test_the_output_takes_in_place_changes(device, backend):
    # Stored (B, S, H, D) but not a view: an autograd output that is a view (of a transposed
    # buffer) refuses in-place ops on it and on its reshape, such as F.dropout(inplace=True),
    # which PyTorch's attention allows; changing it before backward is then caught at backward
    # (it is saved), as with PyTorch's flash attention.
    B, S, H, D = 2, 5, 3, 16
    q, k, v = (torch.randn(B, H, S, D, device=device, requires_grad=True) for _ in range(3))
    with fastattn.use_backend(backend):
        out = fastattn.flash_attention(q, k, v, causal=True)
    assert out._base is None
    y = out.transpose(1, 2).reshape(B, S, H * D)
    torch.nn.functional.dropout(y, 0.5, training=True, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
def test_lse_and_fully_masked_rows(device, backend):
    # Sq > Sk, bottom-right causal: queries 0..Sq-Sk-1 see no key.
    q, k, v = _qkv(2, 4, 2, 20, 7, 16, torch.float32, device)
    with fastattn.use_backend(backend):
        out, lse = fastattn.flash_attention(q, k, v, causal=True, return_lse=True)
    exp_out, exp_lse = ref.attention_fwd(q.double(), k.double(), v.double(), None, 0.25, -13, -1,
                                         0, 0.0, 0.0, 0)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 20) and not lse.requires_grad
    assert torch.isneginf(lse[:, :, :13]).all() and (out[:, :, :13] == 0).all()
    torch.testing.assert_close(out.double(), exp_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), exp_lse, rtol=2e-5, atol=2e-5)
    # and zero gradients for them, never NaN
    q.requires_grad_()
    with fastattn.use_backend(backend):
        fastattn.flash_attention(q, k, v, causal=True).sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, :13] == 0).all()


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
def test_head_dim_1_with_any_stride_there(device, backend):
    # A head_dim of 1 is passed on uncopied whatever its stride (never used to step), and
    # .sum().backward() gives dout strides of 0: every kernel must take both.
    g = torch.Generator().manual_seed(5)
    q = torch.randn(70, generator=g).as_strided((1, 2, 5, 1), (70, 35, 7, 7)).to(device)
    k, v = (torch.randn(1, 2, 6, 1, generator=g).to(device) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastattn.use_backend(backend):
        out = fastattn.flash_attention(*leaves, causal=True)
        out.sum().backward()
    exp = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exp_out = torch.nn.functional.scaled_dot_product_attention(
        *exp, attn_mask=torch.ones(5, 6, dtype=torch.bool, device=device).tril(1))
    exp_out.sum().backward()
    torch.testing.assert_close(out.double(), exp_out, rtol=1e-5, atol=1e-5)
    for t, e in zip(leaves, exp):
        torch.testing.assert_close(t.grad.double(), e.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
def test_nan_input_propagates(device, backend):
    q, k, v = _qkv(1, 2, 2, 17, 17, 16, torch.float32, device)
    q[0, 1, 3, 0] = float("nan")
    with fastattn.use_backend(backend):
        out = fastattn.flash_attention(q, k, v, causal=True)
    assert torch.isnan(out[0, 1, 3]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :3]).all()


# ---- scaled_dot_product_attention: the drop-in ----------------------------------------------

def _sdpa_masks(b, h, sq, sk, device):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    keep[..., 0] = True  # every row keeps a key: PyTorch would give NaN rows otherwise
    padding = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    padding[0, ..., sk // 2:] = False
    return {
        "bool-broadcast": keep.to(device),
        "additive-2d": torch.randn(sq, sk, generator=g).to(device),
        "key-padding": padding.to(device),
        "additive-full": torch.randn(b, h, sq, sk, generator=g).to(device),
    }


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
@pytest.mark.parametrize("mask", ["none", "causal", "bool-broadcast", "additive-2d",
                                  "key-padding", "additive-full"])
def test_sdpa_matches_torch(device, backend, mask):
    b, h, sq, sk, d = 2, 3, 17, 33, 16
    q, k, v = _qkv(b, h, h, sq, sk, d, torch.float32, device, transposed=True)
    dout = torch.randn(b, h, sq, d).to(device)
    kw = {}
    if mask == "causal":
        kw["is_causal"] = True
    elif mask != "none":
        kw["attn_mask"] = _sdpa_masks(b, h, sq, sk, device)[mask]
    with fastattn.use_backend(backend):
        ours = _grads(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, **kw),
                      q, k, v, dout)
    theirs = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), q, k, v, dout)
    for name, o, t in zip(("out", "dq", "dk", "dv"), ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
def test_sdpa_gqa_scale_and_3d(device, backend):
    q, k, v = _qkv(2, 8, 2, 9, 12, 16, torch.float32, device)
    expect = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                            scale=0.3)
    with fastattn.use_backend(backend):
        got = fastattn.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
        # 3-D inputs: (N, L, E), one head
        got3 = fastattn.scaled_dot_product_attention(q[:, 0], q[:, 1], q[:, 2], is_causal=True)
    torch.testing.assert_close(
        got3, F.scaled_dot_product_attention(q[:, 0], q[:, 1], q[:, 2], is_causal=True),
        rtol=1e-4, atol=1e-5)


def _sdpa_and_grads(fn, q, k, v, mask=None, **kwargs):
    """fn's output and the gradients of q, k, v (and of ``mask`` if it requires grad) for an
    all-ones output gradient."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, attn_mask=mask, **kwargs)
    out.backward(torch.ones_like(out))
    return out, [x.grad for x in leaves] + ([mask.grad] if mask is not None else [])


def test_sdpa_serves_what_the_kernels_do_not_through_torch():
    """A value head dim of its own, a learned (requires-grad) additive mask and dropout_p=1
    are valid SDPA calls outside the fused kernels' range: the drop-in gives PyTorch's results
    and gradients (the mask's included) instead of an error."""
    ours, theirs = fastattn.scaled_dot_product_attention, F.scaled_dot_product_attention
    q, k, v = _qkv(2, 4, 4, 5, 7, 16, torch.float32, "cpu")

    v24 = torch.randn(2, 4, 7, 24)          # value head dim 24, the query's 16
    for got, want in zip(_sdpa_and_grads(ours, q, k, v24), _sdpa_and_grads(theirs, q, k, v24)):
        torch.testing.assert_close(got, want)
    # with GQA: k and v of 2 heads (torch repeats them to 4 itself from torch 2.5)
    k2, v2 = k[:, :2], torch.randn(2, 2, 7, 24)
    out, grads = _sdpa_and_grads(ours, q, k2, v2, enable_gqa=True)
    expect, expect_grads = _sdpa_and_grads(theirs, q, k2.repeat_interleave(2, 1),
                                           v2.repeat_interleave(2, 1))
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(grads[0], expect_grads[0])
    for got, want in zip(grads[1:], expect_grads[1:]):
        torch.testing.assert_close(got, want.view(2, 2, 2, 7, -1).sum(2))

    bias = torch.randn(5, 7)
    out, grads = _sdpa_and_grads(ours, q, k, v, bias.clone().requires_grad_())
    expect, expect_grads = _sdpa_and_grads(theirs, q, k, v, bias.clone().requires_grad_())
    torch.testing.assert_close(out, expect)
    assert grads[3] is not None and grads[3].abs().sum() > 0
    for got, want in zip(grads, expect_grads):
        torch.testing.assert_close(got, want)

    for got, want in zip(_sdpa_and_grads(ours, q, k, v, dropout_p=1.0),
                         _sdpa_and_grads(theirs, q, k, v, dropout_p=1.0)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        ours(q, k, v, dropout_p=1.5)
    # the served calls' arguments are checked as the fused path's are
    with pytest.raises(ValueError, match="scale must be finite, got inf"):
        ours(q, k, v24, scale=math.inf)
    with pytest.raises(ValueError, match=r"heads of query \(4\) must be a multiple"):
        ours(q, k[:, :3], torch.randn(2, 3, 7, 24), enable_gqa=True)


def test_sdpa_served_by_torch_before_its_enable_gqa(monkeypatch):
    """Before torch 2.5 F.scaled_dot_product_attention has no enable_gqa: the served call
    repeats the key/value heads itself."""
    import fastattn.ops.attention as attention
    monkeypatch.setattr(attention, "_SDPA_HAS_GQA", False)
    q, k, _ = _qkv(2, 4, 2, 5, 7, 16, torch.float32, "cpu")
    v = torch.randn(2, 2, 7, 24)
    out, grads = _sdpa_and_grads(fastattn.scaled_dot_product_attention, q, k, v,
                                 enable_gqa=True)
    expect, expect_grads = _sdpa_and_grads(F.scaled_dot_product_attention, q,
                                           k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(grads[0], expect_grads[0])
    for got, want in zip(grads[1:], expect_grads[1:]):
        torch.testing.assert_close(got, want.view(2, 2, 2, 7, -1).sum(2))


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
def test_sdpa_fully_masked_row_is_zero(device, backend):
    q, k, v = _qkv(1, 2, 2, 5, 6, 16, torch.float32, device)
    mask = torch.ones(5, 6, dtype=torch.bool, device=device)
    mask[2] = False
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 2] == 0).all()
    torch.testing.assert_close(out[:, :, [0, 1, 3, 4]],
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, [0, 1, 3, 4]])


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
def test_huge_finite_mask_values_match_torch(device, backend):
    """Masks built the HF way put finfo.min on masked keys: -3.4e38 (or -1e9) on every key of a
    row is a uniform softmax in PyTorch, not a masked row, and +3e38 on one key selects it.
    Gradients are compared with dO = 0 on the rows whose every score is huge (padding rows):
    the kernels recompute their p from an lse that fp32 rounds to the row max, as PyTorch's
    flash kernels do; the reference (the oracle) gets those right too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv(1, 2, 2, 6, 7, 16, torch.float32, device)
    lo = torch.finfo(torch.float32).min
    mask = torch.zeros(6, 7)
    mask[1], mask[2, 3], mask[4, 2:], mask[5] = lo, 3e38, lo, -1e9
    mask = mask.to(device)
    dout = torch.randn(1, 2, 6, 16).to(device)
    if backend != "reference":
        dout[:, :, [1, 5]] = 0
    with sdpa_kernel(SDPBackend.MATH):      # the math backend: p from the scores themselves
        theirs = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                        q, k, v, dout)
    with fastattn.use_backend(backend):
        ours = _grads(lambda q, k, v: fastattn.scaled_dot_product_attention(
            q, k, v, attn_mask=mask), q, k, v, dout)
    assert ours[0].isfinite().all()
    for name, o, t in zip(("out", "dq", "dk", "dv"), ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
@pytest.mark.parametrize("softcap", [0.05, 1e4])
def test_softcap_far_from_the_scores(device, backend, softcap):
    """tanh(x) for small x (a softcap far above the scores) keeps fp32's relative precision:
    (1 - e) / (1 + e) cancelled there (1e-4 off at softcap 1e4 in the Triton kernel)."""
    q, k, v = _qkv(1, 2, 2, 9, 11, 16, torch.float32, device)
    with fastattn.use_backend(backend):
        out = fastattn.flash_attention(q, k, v, softcap=softcap)
    exact, _ = ref.attention_fwd(q.double(), k.double(), v.double(), None, 0.25, 0, -1, -1,
                                 softcap, 0.0, 0)
    torch.testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-6)


def test_float64_mask_at_float64_min_is_not_a_masked_row():
    """The kernels' bias is fp32: a float64 finfo.min must not become -inf there (a masked
    row, output 0) where PyTorch computes a uniform softmax."""
    q, k, v = _qkv(1, 1, 1, 3, 4, 8, torch.float64, "cpu")
    mask = torch.zeros(3, 4, dtype=torch.float64)
    mask[1] = torch.finfo(torch.float64).min
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


# ---- dropout --------------------------------------------------------------------------------

def test_dropout_keep_mask_statistics():
    keep = ref.dropout_keep(123456789, 2, 3, 64, 96, 0.25)
    frac = keep.double().mean().item()
    assert abs(frac - 0.75) < 0.01
    # different seeds and heads give different masks
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep, ref.dropout_keep(123456790, 2, 3, 64, 96, 0.25))


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
def test_dropout_matches_reference_mask(device, backend):
    q, k, v = _qkv(2, 2, 1, 17, 40, 16, torch.float32, device)
    dout = torch.randn(2, 2, 17, 16).to(device)
    seed, p = 2 ** 40 + 12345, 0.3
    args = (None, 0.25, 23, -1, 0, 0.0, p, seed, False)

    def run(q, k, v):
        return attn_ops.attention_fwd(q, k, v, *args)[0]
    with fastattn.use_backend(backend):
        ours = _grads(run, q, k, v, dout)
    exact = _reference(*(x.double() for x in (q, k, v, dout)), scale=0.25, diag=23,
                       window_right=0, dropout_p=p, seed=seed)
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(o.double(), e, rtol=2e-5, atol=2e-5, msg=name)


def test_dropout_seeded_by_torch_generator():
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    torch.manual_seed(5)
    a = fastattn.flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    b = fastattn.flash_attention(q, k, v, dropout_p=0.5)
    c = fastattn.flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- determinism and the large CPU case -----------------------------------------------------

def test_cpu_backward_is_deterministic_across_thread_counts():
    q, k, v = _qkv(2, 4, 2, 70, 70, 32, torch.float32, "cpu")
    dout = torch.randn(2, 4, 70, 32)
    fn = lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        first = _grads(fn, q, k, v, dout)
        torch.set_num_threads(1)
        second = _grads(fn, q, k, v, dout)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backward_is_bitwise_deterministic(dtype):
    q, k, v = _qkv(2, 8, 2, 1000, 1000, 128, dtype, "cuda")
    dout = torch.randn_like(q)
    fn = lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True, deterministic=True)  # noqa: E731
    first, second = _grads(fn, q, k, v, dout), _grads(fn, q, k, v, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_kernel_at_benchmark_shape():
    q, k, v = _qkv(4, 8, 8, 512, 512, 64, torch.float32, "cpu")
    dout = torch.randn(4, 8, 512, 64)
    with fastattn.use_backend("cpu"):
        ours = _grads(lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True), q, k, v, dout)
    exact = _reference(*(x.double() for x in (q, k, v, dout)), window_right=0)
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(o.double(), e, rtol=1e-4, atol=5e-5, msg=name)


def test_cpu_kernel_without_blas(monkeypatch):
    """The loop-product fallback (for torch builds that export no sgemm)."""
    monkeypatch.setenv("FASTATTN_CPU_BLAS", "0")
    q, k, v = _qkv(1, 2, 1, 33, 40, 24, torch.float32, "cpu")
    dout = torch.randn(1, 2, 33, 24)
    with fastattn.use_backend("cpu"):
        ours = _grads(lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True, softcap=3.0),
                      q, k, v, dout)
    exact = _reference(*(x.double() for x in (q, k, v, dout)), diag=7, window_right=0, softcap=3.0)
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(o.double(), e, rtol=2e-5, atol=2e-5, msg=name)


# ---- varlen and decode ----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_separate_sequences(device, backend, causal):
    lens_q, lens_k = [1, 17, 40], [5, 17, 33]
    h, hkv, d = 4, 2, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(sum(lens_q), h, d, generator=g).to(device)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(device)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(device)
    dout = torch.randn_like(q)
    cu_q = torch.tensor([0, 1, 18, 58], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5, 22, 55], dtype=torch.int32, device=device)
    with fastattn.use_backend(backend):
        got = _grads(lambda q, k, v: fastattn.varlen_attention(q, k, v, cu_q, cu_k, 40, 33,
                                                               causal=causal), q, k, v, dout)
    qs = q.split(lens_q)
    ks, vs, dos = k.split(lens_k), v.split(lens_k), dout.split(lens_q)
    for n in range(3):
        one = [x.transpose(0, 1).unsqueeze(0) for x in (qs[n], ks[n], vs[n], dos[n])]
        exp = _reference(*(x.double() for x in one), diag=lens_k[n] - lens_q[n],
                         window_right=0 if causal else -1)
        exp = [x[0].transpose(0, 1) for x in exp]
        parts = [got[0].split(lens_q)[n], got[1].split(lens_q)[n], got[2].split(lens_k)[n],
                 got[3].split(lens_k)[n]]
        for name, o, e in zip(("out", "dq", "dk", "dv"), parts, exp):
            torch.testing.assert_close(o.double(), e, rtol=2e-5, atol=2e-5, msg=f"seq{n} {name}")


# The C++ varlen kernel: empty and one-token sequences on either side, lengths on both sides of
# the 64-query and 128-key blocks, Sq > Sk (leading rows fully masked when causal) and Sq < Sk.
VARLEN_LENS_Q = [0, 1, 63, 64, 65, 130, 1, 7, 3]
VARLEN_LENS_K = [5, 1, 65, 0, 64, 130, 0, 140, 1]


def _varlen_inputs(h, hkv, d, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(VARLEN_LENS_Q), sum(VARLEN_LENS_K)
    q, k, v = (torch.randn(t, n, d, generator=g).to(dtype) for t, n in ((tq, h), (tk, hkv), (tk, hkv)))
    dout = torch.randn(tq, h, d, generator=g).to(dtype)
    cu = [torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
          for lens in (VARLEN_LENS_Q, VARLEN_LENS_K)]
    return q, k, v, dout, cu[0], cu[1]


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _varlen_grads(q, k, v, dout, cu_q, cu_k, causal, backend="cpu", upcast=None):
    """(out, dq, dk, dv) of varlen_attention on a backend, or of the reference's per-sequence
    loop over reference.attention_fwd (upcast True/False) when upcast is given."""
    mq, mk = max(VARLEN_LENS_Q), max(VARLEN_LENS_K)
    if upcast is None:
        with fastattn.use_backend(backend):
            return _grads(lambda q, k, v: fastattn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk,
                                                                   causal=causal), q, k, v, dout)
    dense = lambda *a: ref.attention_fwd(*a, upcast=upcast)  # noqa: E731
    # One thread: the reference's many tiny ops would spend seconds synchronising on a busy box.
    with _threads(1):
        return _grads(lambda q, k, v: ref.varlen_fwd(q, k, v, cu_q, cu_k, mq, mk,
                                                     q.shape[-1] ** -0.5, causal,
                                                     dense_fwd=dense)[0], q, k, v, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_varlen_kernel_matches_reference(dtype, h, hkv, causal):
    q, k, v, dout, cu_q, cu_k = _varlen_inputs(h, hkv, 24, dtype)
    ours = _varlen_grads(q, k, v, dout, cu_q, cu_k, causal)
    exact = _varlen_grads(*(x.double() for x in (q, k, v, dout)), cu_q, cu_k, causal, upcast=True)
    if dtype == torch.float32:
        for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
            torch.testing.assert_close(o.double(), e, rtol=2e-5, atol=2e-5, msg=name)
    else:
        baseline = _varlen_grads(q, k, v, dout, cu_q, cu_k, causal, upcast=False)
        _check_fa_rule(ours, exact, baseline, dtype, f"varlen {dtype}")
    # Rows with no visible key: out 0, lse -inf, dq 0; keys no query sees: dk = dv = 0.
    out, lse = attn_ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, max(VARLEN_LENS_Q),
                                             max(VARLEN_LENS_K), q.shape[-1] ** -0.5, causal)
    with _threads(1):
        _, exp_lse = ref.varlen_fwd(*(x.double() for x in (q, k, v)), cu_q, cu_k, 0, 0,
                                    q.shape[-1] ** -0.5, causal)
    assert lse.dtype == torch.float32 and lse.shape == (h, q.shape[0])
    torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-5, atol=1e-5)
    masked = exp_lse[0] == float("-inf")
    assert masked.any() and (lse[:, masked] == float("-inf")).all()
    assert (out[masked] == 0).all() and (ours[1][masked] == 0).all()
    unseen = torch.zeros(k.shape[0], dtype=torch.bool)
    for n, (lq, lk) in enumerate(zip(VARLEN_LENS_Q, VARLEN_LENS_K)):
        if lq == 0:
            unseen[int(cu_k[n]):int(cu_k[n + 1])] = True
    assert unseen.any() and (ours[2][unseen] == 0).all() and (ours[3][unseen] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_varlen_is_deterministic_across_thread_counts(dtype):
    q, k, v, dout, cu_q, cu_k = _varlen_inputs(4, 2, 32, dtype, seed=5)
    with _threads(2):
        first = _varlen_grads(q, k, v, dout, cu_q, cu_k, causal=True)
    with _threads(1):
        second = _varlen_grads(q, k, v, dout, cu_q, cu_k, causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


def test_cpu_varlen_kernel_checks_its_arguments():
    """The C++ entry points index memory through cu_seqlens, so they validate it themselves."""
    from fastattn import _C
    q = torch.randn(5, 4, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        _C.varlen_attention_fwd(q, q, q, cu.long(), cu, 3, 3, 0.25, False)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be non-decreasing"):
        _C.varlen_attention_fwd(q, q, q, cu, torch.tensor([0, 6, 5], dtype=torch.int32), 3, 6,
                                0.25, False)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must rise from 0 to the token count 5"):
        _C.varlen_attention_fwd(q, q, q, torch.tensor([0, 2, 4], dtype=torch.int32), cu, 3, 3,
                                0.25, False)
    with pytest.raises(RuntimeError, match=r"max_seqlen \(2\) is smaller"):
        _C.varlen_attention_fwd(q, q, q, cu, cu, 2, 3, 0.25, False)
    with pytest.raises(RuntimeError, match="same number of sequences"):
        _C.varlen_attention_fwd(q, q, q, cu, torch.tensor([0, 5], dtype=torch.int32), 3, 5,
                                0.25, False)
    with pytest.raises(RuntimeError, match="q must be 3-D"):
        _C.varlen_attention_fwd(q[None], q, q, cu, cu, 3, 3, 0.25, False)
    with pytest.raises(RuntimeError, match="float64 runs on the reference|float32, float16"):
        _C.varlen_attention_fwd(q.double(), q.double(), q.double(), cu, cu, 3, 3, 0.25, False)
    out, lse = _C.varlen_attention_fwd(q, q, q, cu, cu, 3, 3, 0.25, True)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(H, total_q\)"):
        _C.varlen_attention_bwd(out, q, q, q, out, lse.t(), cu, cu, 3, 3, 0.25, True)
    with pytest.raises(RuntimeError, match="dout must have q's shape"):
        _C.varlen_attention_bwd(out[:4], q, q, q, out, lse, cu, cu, 3, 3, 0.25, True)


DECODE_BACKENDS = ALL_BACKENDS


@pytest.mark.parametrize("device,backend", DECODE_BACKENDS)
@pytest.mark.parametrize("sq", [1, 3])
def test_decode_equals_full_attention_over_the_cache(device, backend, sq):
    # lengths: a run of equal ones (rows 2-3), a repeat apart from its twin (rows 1 and 5)
    b, h, hkv, s_max, d = 6, 4, 2, 80, 32
    q, kc, vc = _qkv(b, h, hkv, sq, s_max, d, torch.float32, device)
    lens = torch.tensor([sq, 80, 41, 41, 7, 80], dtype=torch.int32, device=device)
    with fastattn.use_backend(backend):
        got = fastattn.decode_attention(q, kc, vc, lens)
    for i, length in enumerate(lens.tolist()):
        exp = ref.attention_fwd(q[i:i + 1].double(), kc[i:i + 1, :, :length].double(),
                                vc[i:i + 1, :, :length].double(), None, d ** -0.5,
                                length - sq, -1, 0, 0.0, 0.0, 0)[0]
        torch.testing.assert_close(got[i:i + 1].double(), exp, rtol=2e-5, atol=2e-5)


# ---- errors ---------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    q, k, v = _qkv(2, 4, 2, 5, 6, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q must be 4-D"):
        fastattn.flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        fastattn.flash_attention(q, k[..., :8], v[..., :8])
    # k's head_dim off q's, v's right: the message names k, not v
    with pytest.raises(ValueError, match=r"k must have q's head_dim 16, got 8"):
        fastattn.scaled_dot_product_attention(q, k[..., :8], v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"v must have the shape of k .* value head_dim"):
        fastattn.flash_attention(q, k, v[..., :8])
    with pytest.raises(TypeError, match="dtype of q"):
        fastattn.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="device"):
        fastattn.flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="multiple of the heads"):
        fastattn.flash_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        fastattn.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(5, 7, dtype=torch.bool),
                                              enable_gqa=True)
    with pytest.raises(TypeError, match="bool or floating"):
        fastattn.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(5, 6, dtype=torch.int64),
                                              enable_gqa=True)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        fastattn.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(5, 6, dtype=torch.bool),
                                              is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="window"):
        fastattn.flash_attention(q, k, v, window=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        fastattn.flash_attention(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fastattn.flash_attention(q.long(), k.long(), v.long())
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qv = torch.randn(5, 4, 16)
    with pytest.raises(TypeError, match="int32"):
        fastattn.varlen_attention(qv, qv, qv, cu.long(), cu, 3, 3)
    with pytest.raises(ValueError, match="rise from 0"):
        fastattn.varlen_attention(qv, qv, qv, torch.tensor([0, 2, 4], dtype=torch.int32), cu, 3, 3)
    with pytest.raises(ValueError, match="max_seqlen"):
        fastattn.varlen_attention(qv, qv, qv, cu, cu, 2, 3)
    with pytest.raises(TypeError, match="cache_seqlens"):
        fastattn.decode_attention(q, k, v, torch.tensor([3, 4]))
    lens = torch.tensor([3, 4], dtype=torch.int32)
    for bad in (1.5, "2", None):
        with pytest.raises(TypeError, match="num_splits must be an int"):
            fastattn.decode_attention(q, k, v, lens, num_splits=bad)
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        fastattn.decode_attention(q, k, v, lens, num_splits=-1)
    with pytest.raises(TypeError, match="k must be a dense"):
        fastattn.flash_attention(q, k.to_sparse(), v)


def test_switches_must_be_bools():
    """A string or a number for a switch would be truthy (is_causal="False" would mask):
    refused, as torch's own SDPA refuses it."""
    q, k, v = _qkv(1, 2, 2, 4, 4, 16, torch.float32, "cpu")
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = {
        "is_causal": lambda x: fastattn.scaled_dot_product_attention(q, k, v, is_causal=x),
        "enable_gqa": lambda x: fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=x),
        "causal": lambda x: fastattn.flash_attention(q, k, v, causal=x),
        "return_lse": lambda x: fastattn.flash_attention(q, k, v, return_lse=x),
        "deterministic": lambda x: fastattn.flash_attention(q, k, v, deterministic=x),
        "causal ": lambda x: fastattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                                       v[0].transpose(0, 1), cu, cu, 4, 4,
                                                       causal=x),
    }
    for name, call in calls.items():
        for bad in ("False", 0, 1, None):
            with pytest.raises(TypeError, match=f"{name.strip()} must be a bool"):
                call(bad)
        call(False)
    assert fastattn.flash_attention(q, k, v, causal=True).shape == q.shape


def test_forced_cuda_backend_for_dense_attention_says_why():
    q, k, v = _qkv(1, 2, 2, 4, 4, 16, torch.float32, "cpu")
    with pytest.raises(fastattn.BackendError):
        with fastattn.use_backend("cuda"):
            fastattn.flash_attention(q, k, v)


@GPU
def test_cuda_extension_has_no_training_attention_and_says_so():
    q, k, v = _qkv(1, 2, 2, 4, 4, 16, torch.float16, "cuda")
    with pytest.raises(fastattn.BackendError, match="no kernel for this op.*triton"):
        with fastattn.use_backend("cuda"):
            fastattn.flash_attention(q, k, v)


@pytest.mark.parametrize("device,backend", DENSE_BACKENDS)
@pytest.mark.parametrize("b,sq,sk", [(0, 4, 4), (1, 0, 4), (1, 4, 0)])
def test_empty_shapes(device, backend, b, sq, sk):
    q = torch.randn(b, 2, sq, 16, device=device, requires_grad=True)
    k = torch.randn(b, 2, sk, 16, device=device, requires_grad=True)
    with fastattn.use_backend(backend):
        out = fastattn.flash_attention(q, k, k)
        out.sum().backward()
    assert out.shape == (b, 2, sq, 16) and (out == 0).all()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("q_shape,kv_shape", [
    ((2, 3, 5, 8), (1, 3, 7, 8)),       # batch broadcast
    ((2, 2, 3, 5, 8), (1, 3, 7, 8)),    # 5-D query, 4-D key/value
    ((3, 5, 8), (1, 7, 8)),             # 3-D, broadcast first dimension
    ((2, 4, 5, 8), (2, 1, 7, 8)),       # one kv head: broadcasting, no enable_gqa needed
    ((2, 3, 5, 8), (2, 3, 0, 8)),       # no keys
    ((2, 3, 0, 8), (2, 3, 4, 8)),       # no queries
    ((2, 0, 5, 8), (2, 0, 4, 8)),       # no heads
])
def test_sdpa_broadcasting_and_empty_like_torch(q_shape, kv_shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(q_shape, generator=g)
    k, v = torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
    mask = torch.rand(q_shape[-2], kv_shape[-2], generator=g) > 0.3
    mask[:, :1] = True
    expected = torch.broadcast_shapes(q_shape[:-2], kv_shape[:-2]) + (q_shape[-2], kv_shape[-1])
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}):
        ours = fastattn.scaled_dot_product_attention(q, k, v, **kw)
        assert ours.shape == expected
        if 0 in q_shape[:-2]:
            # No heads: nothing to compare, and PyTorch's own CPU SDPA dies of SIGFPE on this
            # shape in some releases (torch 2.11.0; not 2.4.1 or 2.14.1).
            continue
        theirs = F.scaled_dot_product_attention(q, k, v, **kw)
        assert ours.shape == theirs.shape
        if kv_shape[-2] > 0:  # with no keys PyTorch returns NaN, fastattn 0 (documented)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_strided_length_tensors(device, backend):
    """cu_seqlens / cache_seqlens given as non-contiguous views are read correctly."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(58, 2, 16, generator=g).to(device)
    cu = torch.tensor([[0, 9], [1, 9], [18, 9], [58, 9]], dtype=torch.int32, device=device)[:, 0]
    if backend != "cuda":      # no CUDA-extension varlen kernel; its decode kernel is below
        with fastattn.use_backend(backend):
            got = fastattn.varlen_attention(q, q, q, cu, cu, 40, 40, causal=True)
        with fastattn.use_backend("reference"):
            exp = fastattn.varlen_attention(q, q, q, cu.contiguous(), cu.contiguous(), 40, 40,
                                            causal=True)
        torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-5)
    qd, kc = _qkv(3, 2, 2, 1, 40, 16, torch.float32, device)[:2]
    lens = torch.tensor([[10, 99], [25, 99], [40, 99]], dtype=torch.int32, device=device)[:, 0]
    with fastattn.use_backend(backend):
        got = fastattn.decode_attention(qd, kc, kc, lens)
    with fastattn.use_backend("reference"):
        exp = fastattn.decode_attention(qd, kc, kc, lens.contiguous())
    torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-5)


def test_decode_lengths_out_of_range_raise_on_cpu():
    q, kc = _qkv(2, 2, 2, 2, 10, 16, torch.float32, "cpu")[:2]
    for bad in ([1, 5], [5, 11]):
        with pytest.raises(ValueError, match="cache_seqlens must lie in"):
            fastattn.decode_attention(q, kc, kc, torch.tensor(bad, dtype=torch.int32))


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
@pytest.mark.parametrize("which", ["q", "kv"])
def test_rows_that_share_memory_match_torch(device, backend, which):
    """q/k/v whose sequence stride is below head_dim (expand()ed over the sequence: stride 0)
    are valid torch tensors; the CPU kernel's BLAS calls cannot take such a leading dimension
    and must not be handed one (they once returned wrong values, with only an MKL warning)."""
    g = torch.Generator().manual_seed(7)
    b, h, s, d = 1, 2, 70, 16
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    if which == "q":
        q = torch.randn(b, h, 1, d, generator=g).expand(b, h, s, d)
    else:
        k = torch.randn(b, h, 1, d, generator=g).expand(b, h, s, d)
        v = v[:, :, :1].expand(b, h, s, d)
    q, k, v = (x.to(device) for x in (q, k, v))
    dout = torch.randn(b, h, s, d, generator=g).to(device)
    with fastattn.use_backend(backend):
        ours = _grads(lambda *a: fastattn.scaled_dot_product_attention(*a, is_causal=True),
                      q, k, v, dout)
    exact = _grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True),
                   *(x.double() for x in (q, k, v)), dout.double())
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(o.double(), e, rtol=1e-4, atol=1e-5, msg=name)

    # varlen over the same rows (tokens, heads, D) and decode against an expanded cache
    cu = torch.tensor([0, 30, s], dtype=torch.int32, device=device)
    tq, tk, tv = (x[0].transpose(0, 1) for x in (q, k, v))
    with fastattn.use_backend(backend):
        packed = fastattn.varlen_attention(tq, tk, tv, cu, cu, 40, 40, causal=True)
    for lo, hi in ((0, 30), (30, s)):
        want = F.scaled_dot_product_attention(q[:, :, lo:hi].double(), k[:, :, lo:hi].double(),
                                              v[:, :, lo:hi].double(), is_causal=True)
        torch.testing.assert_close(packed[lo:hi].transpose(0, 1).double(), want[0],
                                   rtol=1e-4, atol=1e-5)
    lens = torch.tensor([s], dtype=torch.int32, device=device)
    with fastattn.use_backend(backend):
        dec = fastattn.decode_attention(q[:, :, -1:], k, v, lens)
    want = F.scaled_dot_product_attention(q[:, :, -1:].double(), k.double(), v.double())
    torch.testing.assert_close(dec.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
def test_a_window_past_every_key_is_unbounded(device, backend):
    q, k, v = (x.to(device) for x in _qkv(1, 2, 2, 9, 13, 16, torch.float32, "cpu"))
    with fastattn.use_backend(backend):
        want = fastattn.flash_attention(q, k, v, causal=True)
        for w in (13 + 9, 2 ** 40, 2 ** 63 - 3):
            got = fastattn.flash_attention(q, k, v, causal=True, window=(w, w))
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(w))
        full = fastattn.flash_attention(q, k, v)
        torch.testing.assert_close(fastattn.flash_attention(q, k, v, window=(-1, 2 ** 63 - 3)),
                                   full, rtol=0, atol=0)


def test_window_and_varlen_messages_name_what_was_passed():
    q, k, v = _qkv(1, 2, 2, 4, 4, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="pair of ints"):
        fastattn.flash_attention(q, k, v, window=(1.5, 2))
    cu_q = torch.tensor([0, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 11], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"v must have the shape of k \(12, 2, 8\), got \(11, 2, 8\)"):
        fastattn.varlen_attention(torch.randn(12, 2, 8), torch.randn(12, 2, 8),
                                  torch.randn(11, 2, 8), cu_q, cu_q, 12, 12)
    with pytest.raises(ValueError, match=r"head_dim must be at least 1, got shape \(11, 2, 0\)"):
        fastattn.varlen_attention(*(torch.randn(11, 2, 0) for _ in range(3)), cu_k, cu_k, 11, 11)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_varlen_max_seqlen_past_the_token_count_is_cut_to_it(backend):
    """The kernels' grids follow max_seqlen: 2**20 for 7 tokens once launched a million empty
    Triton blocks (a hang in the interpreter), 2**40 overflowed int32 inside the kernel."""
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    with fastattn.use_backend(backend):
        want = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 4, 5, causal=True)
        for big in (2 ** 20, 2 ** 40):
            got = fastattn.varlen_attention(q, k, v, cu_q, cu_k, big, big, causal=True)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int, got NoneType"):
        fastattn.varlen_attention(q, k, v, cu_q, cu_k, None, 5)
    with pytest.raises(ValueError, match="max_seqlen_k must be >= 0, got -1"):
        fastattn.varlen_attention(q, k, v, cu_q, cu_k, 4, -1)


def test_ops_run_on_meta_tensors():
    """Shape inference on the meta device (as models built there use it): autocast's device
    query used to fail on "meta"."""
    q = torch.randn(2, 4, 16, 8, device="meta", requires_grad=True)
    out = fastattn.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.shape == q.shape and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape
    _, lse = fastattn.flash_attention(q, q, q, return_lse=True)
    assert lse.shape == (2, 4, 16) and lse.dtype == torch.float32


@pytest.mark.parametrize("shapes", [
    ((5, 8), (7, 8), (7, 8)),                      # 2-D: one head
    ((2, 1, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8)),    # one query head against four: broadcast
    ((3, 5, 8), (1, 7, 8), (3, 7, 8)),             # 3-D, key heads broadcast
    ((5, 8), (3, 7, 8), (3, 7, 8)),                # 2-D query against 3-D keys
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sdpa_broadcasts_heads_and_takes_2d_inputs_as_torch(shapes, backend):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(s, generator=g).requires_grad_() for s in shapes)
    with fastattn.use_backend(backend):
        ours = fastattn.scaled_dot_product_attention(q, k, v)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-5)
    dout = torch.randn(ref.shape, generator=g)
    with fastattn.use_backend(backend):
        grads = torch.autograd.grad(ours, (q, k, v), dout)
    for name, a, e in zip("qkv", grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5, msg=name)


def test_sdpa_heads_that_do_not_broadcast_name_enable_gqa():
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"head dimensions .*\(enable_gqa=True: fewer key/value"):
        fastattn.scaled_dot_product_attention(q, k, k)
    assert fastattn.scaled_dot_product_attention(q, k, k, enable_gqa=True).shape == q.shape
    with pytest.raises(ValueError, match=r"batch dimensions .*16\)$"):     # no head hint
        fastattn.scaled_dot_product_attention(torch.randn(2, 8, 4, 16),
                                              *[torch.randn(3, 8, 4, 16)] * 2)


@pytest.mark.parametrize("name", ["scale", "softcap", "dropout_p"])
def test_number_arguments_of_the_wrong_type_are_named(name):
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(TypeError, match=f"flash_attention: {name} must be a real number, "
                                        "got str 'a'"):
        fastattn.flash_attention(q, q, q, **{name: "a"})
    with pytest.raises(TypeError, match=f"scaled_dot_product_attention: scale must be a real "
                                        r"number, got list \[1.0\]"):
        fastattn.scaled_dot_product_attention(q, q, q, scale=[1.0])
