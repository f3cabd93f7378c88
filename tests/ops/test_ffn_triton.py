"""Triton FFN GEMM kernels (fastattn/ops/ffn/triton.py) against float64 PyTorch.

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) with 16 x 16 x 16 tiles:
(3, 40) -> 97 has a ragged M, N and K (K = 40 takes the masked K loop), (33, 64) -> 130 has
ragged M and N and an exact K (the unmasked EVEN_K loop). Activation derivatives come from
torch.autograd on float64, so the kernels' hand-written derivatives are checked independently.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.torch_version import TorchVersion

from fastattn.ops.ffn import triton as ffn_triton
from tests.helpers import forced_tma

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = ["gelu", "gelu_tanh", "relu", "relu2", "silu"]
DTYPES = [torch.float32, torch.float16]
# Values are O(1) to O(10); fp16 results are rounded once to a 2^-11 relative step.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2)}


# ----------------------------------------------------------------------------- float64 oracle


def act64(name, x):
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x) ** 2
    if name == "silu":
        return F.silu(x)
    raise AssertionError(name)


def act_vjp64(name, x, grad):
    """(act(x), grad * act'(x)) in float64, the derivative by autograd."""
    x = x.detach().double().cpu().requires_grad_(True)
    y = act64(name, x)
    (dx,) = torch.autograd.grad(y, x, grad.double().cpu())
    return y.detach(), dx


def d64(t):
    return t.detach().double().cpu()


# ----------------------------------------------------------------------------- inputs


def make(rows, cols, dtype, layout, scale=1.0):
    """(rows, cols) tensor with the given memory layout:
    contiguous; transposed (a .t() view, unit stride on dim 0); sliced (row stride > cols)."""
    if layout == "transposed":
        t = (torch.randn(cols, rows) * scale).to(dtype).t()
    elif layout == "sliced":
        t = (torch.randn(rows, cols + 7) * scale).to(dtype)[:, 3 : 3 + cols]
    else:
        t = (torch.randn(rows, cols) * scale).to(dtype)
    return t.to(DEVICE)


def check(out, ref, dtype):
    assert out.dtype == dtype
    assert out.is_contiguous()
    torch.testing.assert_close(d64(out), ref, **TOL[dtype])


# (T, D, F, layout, bias): ragged everything, then exact K, both with a view each.
CASES = [
    pytest.param(3, 40, 97, "contiguous", True, id="3x40-97-contig-bias"),
    pytest.param(33, 64, 130, "transposed", False, id="33x64-130-transposed"),
    pytest.param(33, 64, 130, "sliced", True, id="33x64-130-sliced-bias"),
]
GRAD_CASES = [
    pytest.param(3, 40, 97, "contiguous", id="3x40-97-contig"),
    pytest.param(33, 64, 130, "transposed", id="33x64-130-transposed"),
    pytest.param(17, 48, 33, "sliced", id="17x48-33-sliced"),
]


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("T,D,Fh,layout,with_bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None] + ACTS)
def test_linear_act(T, D, Fh, layout, with_bias, dtype, activation):
    x = make(T, D, dtype, layout)
    w = make(Fh, D, dtype, layout, scale=D**-0.5)
    bias = make(1, Fh, dtype, "contiguous").view(Fh) if with_bias else None
    h, a = ffn_triton.linear_act(x, w, bias, activation)
    h_ref = d64(x) @ d64(w).T + (d64(bias) if with_bias else 0.0)
    check(h, h_ref, dtype)
    if activation is None:
        assert a is None
    else:
        check(a, act64(activation, h_ref), dtype)
        # a is act of the stored h: the backward's recomputation from the saved h matches it.
        # (to one rounding step of a: the fp32 erf / exp differ from float64 in the last bits).
        step = dict(atol=1e-4, rtol=2.0**-10) if dtype == torch.float16 else dict(atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(d64(a), act64(activation, d64(h)).to(dtype).double(), **step)


@pytest.mark.parametrize("T,D,Fh,layout,_", CASES[:2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_linear_glu(T, D, Fh, layout, _, dtype, activation):
    x = make(T, D, dtype, layout)
    wg = make(Fh, D, dtype, layout, scale=D**-0.5)
    wu = make(Fh, D, dtype, "sliced" if layout == "transposed" else layout, scale=D**-0.5)
    g, u, m = ffn_triton.linear_glu(x, wg, wu, activation)
    g_ref = d64(x) @ d64(wg).T
    u_ref = d64(x) @ d64(wu).T
    check(g, g_ref, dtype)
    check(u, u_ref, dtype)
    check(m, act64(activation, g_ref) * u_ref, dtype)


# ----------------------------------------------------------------------------- backward epilogues


@pytest.mark.parametrize("T,D,Fh,layout", GRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_matmul_act_grad(T, D, Fh, layout, dtype, activation):
    dout = make(T, D, dtype, layout)  # grad_output != 1
    w2 = make(D, Fh, dtype, layout, scale=Fh**-0.5)
    h = make(T, Fh, dtype, layout, scale=2.0)
    h[0, :5] = 0.0  # relu / relu2 derivative at exactly 0
    dh, a = ffn_triton.matmul_act_grad(dout, w2, h, activation)
    da = d64(dout) @ d64(w2)
    a_ref, dh_ref = act_vjp64(activation, h, da)
    check(dh, dh_ref, dtype)
    check(a, a_ref, dtype)


@pytest.mark.parametrize("T,D,Fh,layout", GRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_matmul_glu_grad(T, D, Fh, layout, dtype, activation):
    dout = make(T, D, dtype, layout)
    wd = make(D, Fh, dtype, layout, scale=Fh**-0.5)
    g = make(T, Fh, dtype, layout, scale=2.0)
    g[0, :5] = 0.0
    u = make(T, Fh, dtype, "contiguous")
    dg, du, m = ffn_triton.matmul_glu_grad(dout, wd, g, u, activation)
    dm = d64(dout) @ d64(wd)
    g64 = d64(g).requires_grad_(True)
    u64 = d64(u).requires_grad_(True)
    m_ref = act64(activation, g64) * u64
    dg_ref, du_ref = torch.autograd.grad(m_ref, (g64, u64), dm)
    check(dg, dg_ref, dtype)
    check(du, du_ref, dtype)
    check(m, m_ref.detach(), dtype)


@pytest.mark.parametrize("block_n", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_on_column_slices(monkeypatch, dtype, block_n):
    """Tiles wider than SLICE_N run their epilogue slice by slice (2, 4 and 8 slices of 16 here),
    in both kernels; each slice must take its own columns of the product, bias, h, g and u (a
    slice paired with another's columns or offsets fails), the last tile ragged in N."""
    if not ffn_triton.INTERPRET:
        pytest.skip("tile shapes are forced in the interpreter only")
    assert ffn_triton.SLICE_N == 16 and block_n > ffn_triton.SLICE_N
    monkeypatch.setattr(ffn_triton, "_INTERPRET_CONFIG",
                        {**ffn_triton._INTERPRET_CONFIG, "BLOCK_N": block_n})
    T, D, Fh = 19, 40, 2 * block_n + 7
    x, w = make(T, D, dtype, "contiguous"), make(Fh, D, dtype, "contiguous", scale=D**-0.5)
    bias = make(1, Fh, dtype, "contiguous").view(Fh)
    h, a = ffn_triton.linear_act(x, w, bias, "gelu")                     # EPI "act" + bias
    h_ref = d64(x) @ d64(w).T + d64(bias)
    check(h, h_ref, dtype)
    check(a, act64("gelu", h_ref), dtype)
    dout, w2 = make(T, D, dtype, "contiguous"), make(D, Fh, dtype, "contiguous", scale=Fh**-0.5)
    hh = make(T, Fh, dtype, "contiguous", scale=2.0)
    dh, a2 = ffn_triton.matmul_act_grad(dout, w2, hh, "gelu")            # EPI "act_grad"
    a_ref, dh_ref = act_vjp64("gelu", hh, d64(dout) @ d64(w2))
    check(dh, dh_ref, dtype)
    check(a2, a_ref, dtype)
    g, u = make(T, Fh, dtype, "contiguous", scale=2.0), make(T, Fh, dtype, "contiguous")
    dg, du, m = ffn_triton.matmul_glu_grad(dout, w2, g, u, "silu")       # EPI "glu_grad"
    dm = d64(dout) @ d64(w2)
    g64, u64 = d64(g).requires_grad_(True), d64(u).requires_grad_(True)
    m_ref = act64("silu", g64) * u64
    dg_ref, du_ref = torch.autograd.grad(m_ref, (g64, u64), dm)
    check(dg, dg_ref, dtype)
    check(du, du_ref, dtype)
    check(m, m_ref.detach(), dtype)
    check(ffn_triton.matmul(dout, w2.t()), d64(dout) @ d64(w2), dtype)  # EPI "none", whole
    wg, wu = (make(Fh, D, dtype, "contiguous", scale=D**-0.5) for _ in range(2))
    g2, u2, m2 = ffn_triton.linear_glu(x, wg, wu, "silu")                # the GLU kernel
    g_ref, u_ref = d64(x) @ d64(wg).T, d64(x) @ d64(wu).T
    check(g2, g_ref, dtype)
    check(u2, u_ref, dtype)
    check(m2, act64("silu", g_ref) * u_ref, dtype)


# ----------------------------------------------------------------------------- plain matmul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["dW", "dx", "sliced", "ragged-k"])
def test_matmul(dtype, case):
    T, D, Fh = 33, 40, 97
    dh = make(T, Fh, dtype, "contiguous", scale=0.5)
    if case == "dW":  # dW1 = dh^T x: both operands are transposed views
        x = make(T, D, dtype, "contiguous")
        a, b_t = dh.t(), x.t()
    elif case == "dx":  # dx = dh W1: W1 (F, D) seen as b_t = W1^T (D, F)
        w1 = make(Fh, D, dtype, "contiguous", scale=D**-0.5)
        a, b_t = dh, w1.t()
    elif case == "sliced":
        a, b_t = make(T, Fh, dtype, "sliced"), make(D, Fh, dtype, "sliced")
    else:
        a, b_t = make(5, 23, dtype, "transposed"), make(70, 23, dtype, "contiguous")
    c = ffn_triton.matmul(a, b_t)
    check(c, d64(a) @ d64(b_t).T, dtype)


def test_full_mlp_backward_matches_autograd():
    """The five launchers chained as the front door does reproduce autograd's MLP gradients."""
    T, D, Fh = 9, 40, 97
    x = make(T, D, torch.float32, "contiguous")
    w1 = make(Fh, D, torch.float32, "contiguous", D**-0.5)
    b1 = make(1, Fh, torch.float32, "contiguous").view(Fh)
    w2, dout = make(D, Fh, torch.float32, "contiguous", Fh**-0.5), make(T, D, torch.float32, "contiguous")
    h, _ = ffn_triton.linear_act(x, w1, b1, "silu")
    dh, a = ffn_triton.matmul_act_grad(dout, w2, h, "silu")
    grads = dict(
        dw2=ffn_triton.matmul(dout.t(), a.t()),
        dw1=ffn_triton.matmul(dh.t(), x.t()),
        dx=ffn_triton.matmul(dh, w1.t()),
    )
    x64, w164, b164, w264 = (d64(t).requires_grad_(True) for t in (x, w1, b1, w2))
    out = F.linear(F.silu(F.linear(x64, w164, b164)), w264)
    dx, dw1, dw2 = torch.autograd.grad(out, (x64, w164, w264), d64(dout))
    for name, ref in (("dx", dx), ("dw1", dw1), ("dw2", dw2)):
        torch.testing.assert_close(d64(grads[name]), ref, atol=1e-4, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- edges and errors


def test_zero_tokens():
    x = torch.empty(0, 40, device=DEVICE)
    w = torch.randn(97, 40, device=DEVICE)
    h, a = ffn_triton.linear_act(x, w, None, "gelu")
    assert h.shape == (0, 97) and a.shape == (0, 97)
    g, u, m = ffn_triton.linear_glu(x, w, w, "silu")
    assert g.shape == u.shape == m.shape == (0, 97)


def test_errors():
    x = torch.randn(3, 40, device=DEVICE)
    w = torch.randn(97, 40, device=DEVICE)
    with pytest.raises(ValueError, match="valid: gelu, gelu_tanh, relu, relu2, silu"):
        ffn_triton.linear_act(x, w, None, "tanh")
    with pytest.raises(ValueError, match="dtype"):
        ffn_triton.linear_act(x, w.half(), None, "gelu")
    with pytest.raises(ValueError, match="shape"):
        ffn_triton.linear_act(x, w[:, :39], None, "gelu")
    with pytest.raises(ValueError, match="valid"):
        ffn_triton.matmul_act_grad(x, w.t(), torch.randn(3, 97, device=DEVICE), None)


# ----------------------------------------------------------------------------- GPU, bf16


def _close_as_pytorch(ours, pytorch, ref, name):
    """Our max error <= 2x PyTorch's (same bf16 inputs, same precision) + 1% of a bf16 step."""
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item()
    err_pt = (pytorch.double() - ref).abs().max().item()
    slack = 2.0**-8 * 0.01 * ref.abs().max().item()
    assert err <= 2 * err_pt + slack, f"{name}: error {err:.3g} vs PyTorch {err_pt:.3g}"


def _vjp(activation, x, grad):
    x = x.detach().requires_grad_(True)
    y = act64(activation, x)
    (dx,) = torch.autograd.grad(y, x, grad.to(x.dtype))
    return y.detach(), dx


GPU_SHAPE = (2048, 1024, 2816)  # (T, D, F): many 128 x 256 tiles, ragged in no dimension


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu2", "silu"])
def test_bf16_large_gpu(activation):
    """bf16 at an LLM-like shape (compiled kernels, autotuned configs): each output's error
    against float64 (from the same bf16 inputs) is at most twice eager PyTorch's in bf16."""
    T, D, Fh = GPU_SHAPE
    bf = torch.bfloat16
    x = make(T, D, bf, "contiguous")
    w1 = make(Fh, D, bf, "contiguous", D**-0.5)
    wu = make(Fh, D, bf, "contiguous", D**-0.5)
    b1 = make(1, Fh, bf, "contiguous").view(Fh)
    w2 = make(D, Fh, bf, "transposed", Fh**-0.5)
    dout = make(T, D, bf, "contiguous")
    x64, w164, wu64, b164, w264, dout64 = (t.double() for t in (x, w1, wu, b1, w2, dout))

    h, a = ffn_triton.linear_act(x, w1, b1, activation)
    h_pt = F.linear(x, w1, b1)
    _close_as_pytorch(h, h_pt, x64 @ w164.T + b164, "h")
    _close_as_pytorch(a, act64(activation, h), act64(activation, h.double()), "a")

    dh, a2 = ffn_triton.matmul_act_grad(dout, w2, h, activation)
    assert torch.equal(a, a2)
    _, dh_pt = _vjp(activation, h, dout @ w2)
    _, dh_ref = _vjp(activation, h.double(), dout64 @ w264)
    _close_as_pytorch(dh, dh_pt, dh_ref, "dh")

    for name, (p, q) in {"dW1": (dh.t(), x.t()), "dx": (dh, w1.t()), "dW2": (dout.t(), a.t())}.items():
        _close_as_pytorch(ffn_triton.matmul(p, q), p @ q.t(), p.double() @ q.double().t(), name)

    g, u, m = ffn_triton.linear_glu(x, w1, wu, activation)
    _close_as_pytorch(g, x @ w1.t(), x64 @ w164.T, "g")
    _close_as_pytorch(u, x @ wu.t(), x64 @ wu64.T, "u")
    _close_as_pytorch(m, act64(activation, g) * u, act64(activation, g.double()) * u.double(), "m")

    dg, du, m2 = ffn_triton.matmul_glu_grad(dout, w2, g, u, activation)
    assert torch.equal(m, m2)
    dm_pt, dm_ref = dout @ w2, dout64 @ w264
    ag_pt, dg_pt = _vjp(activation, g, dm_pt * u)
    ag_ref, dg_ref = _vjp(activation, g.double(), dm_ref * u.double())
    _close_as_pytorch(dg, dg_pt, dg_ref, "dg")
    _close_as_pytorch(du, dm_pt * ag_pt, dm_ref * ag_ref, "du")


# ----------------------------------------------------------------------------- the TMA path
#
# On sm_90+ the K loop's tiles arrive through TMA descriptors (over an operand, or over its
# transpose for a .t() view). Under the interpreter FASTATTN_TRITON_TMA=1 forces the path (the
# `tma` fixture); every operand here sits inside NaN padding, so a tile read outside its
# operand (a wrong descriptor shape or stride) poisons the result.

needs_tma = pytest.mark.skipif(ffn_triton.TensorDescriptor is None, reason="triton without host TMA descriptors")
# triton 3.4 and 3.5's interpreter checks a descriptor's strides in elements instead of bytes
# (3.6 fixed it): rows of 40 or 104 elements here are 16-byte aligned, not 16-element.
interpreter_checks_bytes = pytest.mark.skipif(
    ffn_triton.TensorDescriptor is not None and DEVICE == "cpu"
    and TorchVersion(triton.__version__) < (3, 6),
    reason=f"triton {triton.__version__}'s interpreter checks TMA strides in elements, not bytes")


@pytest.fixture
def tma(monkeypatch):
    """Forces the TMA path and records, per launch, (A_T, B_T), or None for pointer loads."""
    yield from forced_tma(monkeypatch, ffn_triton, "_tma_plan", lambda plan: plan if plan is None else plan[1:],
                          DEVICE)


def padded(rows, cols, dtype, transposed=False, scale=1.0):
    """(rows, cols) values in a NaN buffer with 16-byte aligned rows (TMA's rule): a slice of
    a wider, taller buffer, or the .t() view of one."""
    r, c = (cols, rows) if transposed else (rows, cols)
    buf = torch.full((r + 3, (c + 12) // 8 * 8), float("nan"), dtype=dtype, device=DEVICE)
    t = buf[:r, :c]
    t.copy_(torch.randn(r, c) * scale)
    return t.t() if transposed else t


@needs_tma
@interpreter_checks_bytes
@pytest.mark.parametrize("T,D,Fh,tiles", [
    # ragged M, N, K against 16-wide tiles; then unequal tiles, so that a descriptor given the
    # wrong one of BLOCK_M / BLOCK_N / BLOCK_K (or ignoring A_T / B_T) cannot match its tile
    pytest.param(33, 40, 104, None, id="interpreter-tiles"),
    pytest.param(33, 40, 104, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64), id="unequal-tiles"),
    pytest.param(1000, 520, 1400, None, id="gpu-tiles", marks=pytest.mark.gpu),  # ragged against 64..256
])
@pytest.mark.parametrize("x_layout", ["rows", "columns"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tma_path_mlp_and_glu(tma, monkeypatch, dtype, x_layout, T, D, Fh, tiles):
    if tiles is not None:
        if not ffn_triton.INTERPRET:
            pytest.skip("tile shapes are forced in the interpreter only")
        monkeypatch.setattr(ffn_triton, "_INTERPRET_CONFIG", {**ffn_triton._INTERPRET_CONFIG, **tiles})
    # x (T, D) row-major, or column-major (the .t() of a (D, T) buffer): A over A^T
    x = padded(T, D, dtype, transposed=x_layout == "columns")
    w1 = padded(Fh, D, dtype, scale=D**-0.5)
    w2, dout = padded(D, Fh, dtype, scale=Fh**-0.5), padded(T, D, dtype)
    h, a = ffn_triton.linear_act(x, w1, None, "gelu")
    h_ref = d64(x) @ d64(w1).T
    check(h, h_ref, dtype)
    check(a, act64("gelu", h_ref), dtype)
    dh, a2 = ffn_triton.matmul_act_grad(dout, w2, h, "gelu")            # B = w2^T: over B^T
    _, dh_ref = act_vjp64("gelu", d64(h), d64(dout) @ d64(w2))
    check(dh, dh_ref, dtype)
    check(ffn_triton.matmul(dh.t(), x.t()), d64(dh).T @ d64(x), dtype)  # dW1: A over A^T
    check(ffn_triton.matmul(dh, w1.t()), d64(dh) @ d64(w1), dtype)      # dx: B over B^T
    wg, wu = padded(Fh, D, dtype, scale=D**-0.5), padded(Fh, D, dtype, scale=D**-0.5)
    g, u, m = ffn_triton.linear_glu(x, wg, wu, "silu")
    g_ref, u_ref = d64(x) @ d64(wg).T, d64(x) @ d64(wu).T
    check(g, g_ref, dtype)
    check(u, u_ref, dtype)
    dg, du, m2 = ffn_triton.matmul_glu_grad(dout, w2, g, u, "silu")
    dm = d64(dout) @ d64(w2)
    ag, dag = act_vjp64("silu", d64(g), dm * d64(u))
    check(dg, dag, dtype)
    check(du, dm * ag, dtype)
    # every launch took the path, over A / B as laid out: (A_T, B_T) per launch
    cols = x_layout == "columns"
    assert tma == [(cols, False), (False, True), (True, not cols), (False, True), (cols, False), (False, True)]


@needs_tma
def test_tma_operand_layouts():
    def desc(t):
        plan = ffn_triton._operand_desc(t)
        return plan and (list(plan[0].shape), list(plan[0].strides), plan[1])

    assert desc(torch.zeros(24, 16)) == ([24, 16], [16, 1], False)
    assert desc(torch.zeros(16, 24).t()) == ([16, 24], [24, 1], True)
    assert desc(torch.zeros(24, 20)[:, :16]) == ([24, 16], [20, 1], False)
    assert desc(torch.zeros(1, 16).expand(24, 16)) is None        # expanded rows (stride 0)
    assert desc(torch.zeros(24, 1).expand(24, 16)) is None
    assert desc(torch.zeros(112).as_strided((24, 16), (4, 1))) is None  # overlapping rows
    assert desc(torch.zeros(24, 10)) is None                      # 40-byte rows
    assert desc(torch.zeros(24 * 16 + 1)[1:].view(24, 16)) is None  # base not 16-byte aligned
