"""Elementwise FFN kernels (act_fwd / act_bwd / glu_fwd / glu_bwd, FFN kernel spec) of the C++
CPU and CUDA extensions against float64 torch: F.gelu, F.gelu(approximate="tanh"), relu,
relu^2, F.silu, derivatives by torch.autograd in float64 on the same (dtype-rounded) inputs."""

import pytest
import torch
import torch.nn.functional as F

from fastattn import _ext

ACTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 3 * 1013 = 3039 elements: not a multiple of any vector width (4, 8, 16, 32 lanes).
SHAPES = [(1, 1), (1, 17), (97, 130), (3, 1013)]
# The results are the float32 math rounded once to the dtype: half an ulp of the dtype plus a
# few float32 ulp (CUDA's fp16/bf16 gelu adds up to ~5e-5 relative near x = -3, where it takes
# Phi as 0.5 + 0.5 erf(x / sqrt 2): csrc/cuda/ffn.cu). atol covers results that underflow (and
# gelu_tanh's float32 z, whose rounding moves sigmoid(z) by ~|z| * 1e-7 relative where the
# value is already < 1e-4).
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-9),
    torch.float16: dict(rtol=1e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-7),
}
# Derivatives have zeros where two O(1) terms cancel (gelu' = Phi(x) + x phi(x) at x = -0.75,
# silu' at -1.28): there the error is a few float32 ulp of those terms, not of the result.
GRAD_ATOL = 5e-7
SPECIALS = [0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30, 1e-3, -1e-3, 1.0, -1.0, 5.0, -5.0, 10.0,
            -10.0, 20.0, -20.0, 0.5, -0.5, 3.0, -3.0, 8.0, -8.0]


def _inputs(shape, dtype, n_in):
    """n_in tensors: the pre-activation first (wide range, specials in front), then gradients /
    u as N(0, 1) (!= 1)."""
    n = shape[0] * shape[1]
    x = torch.randn(n, dtype=torch.float64) * 6
    spec = torch.tensor(SPECIALS, dtype=torch.float64)[:n]
    x[: spec.numel()] = spec
    out = [x.view(shape).to(dtype)]
    out += [torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(n_in - 1)]
    return out


def _ref(act, x):
    """(act(x), act'(x)) in float64 from a tensor of any dtype."""
    xd = x.detach().double().requires_grad_(True)
    y = ACTS[act](xd)
    (d,) = torch.autograd.grad(y.sum(), xd)
    return y.detach(), d


def _close(got, want, dtype, what, grad=False):
    assert got.dtype == dtype, what
    tol = dict(TOL[dtype])
    if grad:
        tol["atol"] = max(tol["atol"], GRAD_ATOL)
    torch.testing.assert_close(got.double(), want, equal_nan=True,
                               msg=lambda m: f"{what}: {m}", **tol)


def _check_all(mod, device, act, dtype, shape):
    x, da, u = _inputs(shape, dtype, 3)
    a_ref, d_ref = _ref(act, x)
    dad, ud = da.double(), u.double()
    xdev, dadev, udev = x.to(device), da.to(device), u.to(device)

    _close(mod.act_fwd(xdev, act).cpu(), a_ref, dtype, "act_fwd a")
    dh, a = mod.act_bwd(dadev, xdev, act)
    _close(dh.cpu(), dad * d_ref, dtype, "act_bwd dh", grad=True)
    _close(a.cpu(), a_ref, dtype, "act_bwd a")

    # glu with g = x, u, dm = da
    _close(mod.glu_fwd(xdev, udev, act).cpu(), a_ref * ud, dtype, "glu_fwd m")
    dg, du, m = mod.glu_bwd(dadev, xdev, udev, act)
    _close(dg.cpu(), dad * ud * d_ref, dtype, "glu_bwd dg", grad=True)
    _close(du.cpu(), dad * a_ref, dtype, "glu_bwd du")
    _close(m.cpu(), a_ref * ud, dtype, "glu_bwd m")


def _check_sweep(mod, device, act, dtype):
    """Every activation over a dense sweep of [-30, 30] (value and derivative)."""
    x = torch.linspace(-30, 30, 6001, dtype=torch.float64).to(dtype).view(1, -1)
    ones = torch.ones_like(x)
    a_ref, d_ref = _ref(act, x)
    dh, a = mod.act_bwd(ones.to(device), x.to(device), act)
    _close(a.cpu(), a_ref, dtype, "sweep a")
    _close(dh.cpu(), d_ref, dtype, "sweep act'", grad=True)


def _check_nonfinite(mod, device, act, dtype):
    """NaN propagates like torch; +-inf give torch's float64 values (derivatives at inf are
    checked for relu / relu2 only: torch's autograd gives NaN for the others)."""
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -1.0, float("nan")] * 3
    x = torch.tensor(vals, dtype=dtype).view(1, -1)   # 21: vectors, then a scalar tail
    da = torch.full_like(x, 0.75)
    a_ref, d_ref = _ref(act, x)
    dh, a = mod.act_bwd(da.to(device), x.to(device), act)
    _close(mod.act_fwd(x.to(device), act).cpu(), a_ref, dtype, "act_fwd nonfinite")
    _close(a.cpu(), a_ref, dtype, "act_bwd a nonfinite")
    finite_or_nan = ~torch.isinf(x.double()) if act not in ("relu", "relu2") else torch.ones_like(
        x, dtype=torch.bool)
    _close(dh.cpu()[finite_or_nan], (0.75 * d_ref)[finite_or_nan], dtype, "act_bwd dh nonfinite",
           grad=True)
    dg, du, m = mod.glu_bwd(da.to(device), x.to(device), torch.ones_like(x).to(device), act)
    nan = torch.isnan(x)
    assert torch.isnan(m.cpu()[nan]).all() and torch.isnan(du.cpu()[nan]).all()
    if act != "relu":  # torch's relu backward passes the gradient through at NaN
        assert torch.isnan(dg.cpu()[nan]).all()


def _check_gelu_below_minus_3(mod, device):
    """bf16 gelu where x < -3, which CUDA computes with normcdff (the erff form of Phi would be
    4% off at -5 and 0 from -6 on: atol=0 sees it, the sweeps' 1e-7 does not), in every position
    of an 8-element vector, with all of a vector's elements below -3, mixed, and in the scalar
    tail. bf16 only: fp16 results this small are subnormal, their rounding coarser than rtol.
    Down to -7: below that the C++ kernel's Phi loses its relative accuracy (gelu(-9) = -1e-18
    comes out 0), an absolute error under 1e-16."""
    vectors = []
    for i in range(8):   # one element below -3 at position i
        vectors.append([1.0] * i + [-5.5] + [1.0] * (7 - i))
    vectors.append([-5.0, -5.5, -6.0, -6.5, -7.0, -4.0, -3.5, -3.0078125])
    vectors.append([-6.0, 0.5, -3.0, -7.0, 2.0, -0.0, -5.5, 1.0])
    tail = [-6.0, -7.0, 1.0, -6.5, -5.5]
    x = torch.tensor(sum(vectors, []) + tail, dtype=torch.bfloat16).view(1, -1)
    u = torch.full_like(x, 1.5)
    da = torch.full_like(x, 0.75)
    a_ref, d_ref = _ref("gelu", x)
    tol = dict(rtol=8e-3, atol=0.0)
    xd, ud, dad = x.to(device), u.to(device), da.to(device)

    def close(got, want, what):
        torch.testing.assert_close(got.cpu().double(), want, msg=lambda m: f"{what}: {m}", **tol)

    close(mod.act_fwd(xd, "gelu"), a_ref, "act_fwd")
    dh, a = mod.act_bwd(dad, xd, "gelu")
    close(a, a_ref, "act_bwd a")
    close(dh, 0.75 * d_ref, "act_bwd dh")
    close(mod.glu_fwd(xd, ud, "gelu"), 1.5 * a_ref, "glu_fwd m")
    dg, du, m = mod.glu_bwd(dad, xd, ud, "gelu")
    close(m, 1.5 * a_ref, "glu_bwd m")
    close(du, 0.75 * a_ref, "glu_bwd du")
    close(dg, 0.75 * 1.5 * d_ref, "glu_bwd dg")


# ---- CPU ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_mod():
    return _ext.load("cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_cpu_kernels(cpu_mod, act, dtype, shape):
    _check_all(cpu_mod, "cpu", act, dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_cpu_sweep(cpu_mod, act, dtype):
    _check_sweep(cpu_mod, "cpu", act, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_cpu_nonfinite(cpu_mod, act, dtype):
    _check_nonfinite(cpu_mod, "cpu", act, dtype)


def test_cpu_gelu_below_minus_3(cpu_mod):
    _check_gelu_below_minus_3(cpu_mod, "cpu")


def test_cpu_relu_derivative_at_zero(cpu_mod):
    x = torch.tensor([[0.0, -0.0, 1e-38, -1e-38]])
    dh, _ = cpu_mod.act_bwd(torch.ones_like(x), x, "relu")
    assert dh.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    dh, _ = cpu_mod.act_bwd(torch.ones_like(x), x, "relu2")
    assert dh[0, :2].tolist() == [0.0, 0.0]


def test_cpu_multithreaded_large(cpu_mod):
    """A size that spans several parallel_for chunks, with a ragged end."""
    x, da, u = _inputs((7, 33333), torch.bfloat16, 3)
    a_ref, d_ref = _ref("silu", x)
    dg, du, m = cpu_mod.glu_bwd(da, x, u, "silu")
    _close(dg, da.double() * u.double() * d_ref, torch.bfloat16, "dg", grad=True)
    _close(m, a_ref * u.double(), torch.bfloat16, "m")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_cpu_backward_written_over_the_incoming_gradient(cpu_mod, act, dtype):
    """overwrite_da / overwrite_dm (the FFN backward's own d a / d m buffer): the same values
    as the out-of-place call, dh / dg in that buffer; its memory must not be an input's."""
    x, da, u = _inputs((7, 33333), dtype, 3)
    want_dh, want_a = cpu_mod.act_bwd(da, x, act)
    buf = da.clone()
    dh, a = cpu_mod.act_bwd(buf, x, act, overwrite_da=True)
    assert dh.data_ptr() == buf.data_ptr() and torch.equal(dh, want_dh) and torch.equal(a, want_a)
    want = cpu_mod.glu_bwd(da, x, u, act)
    buf = da.clone()
    got = cpu_mod.glu_bwd(buf, x, u, act, overwrite_dm=True)
    assert got[0].data_ptr() == buf.data_ptr()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(RuntimeError, match="overwrite_da=True needs da in memory of its own"):
        cpu_mod.act_bwd(x, x, act, overwrite_da=True)
    with pytest.raises(RuntimeError, match="overwrite_dm=True needs dm in memory of its own"):
        cpu_mod.glu_bwd(u, x, u, act, overwrite_dm=True)


def _bad_calls(mod, device):
    x = torch.randn(4, 6, device=device)
    return [
        (lambda: mod.act_fwd(x, "tanh"), "valid: gelu, gelu_tanh, relu, relu2, silu"),
        (lambda: mod.act_fwd(x.double(), "gelu"), "float32, float16 or bfloat16"),
        (lambda: mod.act_fwd(x.view(-1), "gelu"), "2-D"),
        (lambda: mod.act_fwd(x.t(), "gelu"), "contiguous"),
        (lambda: mod.act_bwd(x[:3], x, "gelu"), "shape"),
        (lambda: mod.act_bwd(x.half(), x, "gelu"), "dtype"),
        (lambda: mod.glu_fwd(x, x.half(), "silu"), "dtype"),
        (lambda: mod.glu_bwd(x, x, x[:, :5].contiguous(), "silu"), "shape"),
        (lambda: mod.glu_bwd(x, x, x, "swish"), "valid"),
    ]


def test_cpu_errors(cpu_mod):
    for call, match in _bad_calls(cpu_mod, "cpu"):
        with pytest.raises(RuntimeError, match=match):
            call()
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CPU tensor"):
            cpu_mod.act_fwd(torch.randn(2, 2, device="cuda"), "gelu")


def test_cpu_error_messages_format_numbers(cpu_mod):
    """The extensions build their check messages without iostreams (csrc/check.h: streaming a
    number crashed the H200 builds); integers, shapes, dtypes and floats read as TORCH_CHECK
    would have printed them."""
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"h must be 2-D \(T, F\), got shape \[24\]"):
        cpu_mod.act_fwd(x.reshape(-1), "gelu")
    with pytest.raises(RuntimeError, match=r"got strides \[1, 6\]"):
        cpu_mod.act_fwd(x.t(), "gelu")
    target = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"target must have shape \(4,\), got \[3\]"):
        cpu_mod.cross_entropy_fwd(x, target, None, None, None, -100, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"must have dtype Long, got Int"):
        cpu_mod.cross_entropy_fwd(x, target.int(), None, None, None, -100, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\], got 1\.5$"):
        cpu_mod.cross_entropy_fwd(x, torch.zeros(4, dtype=torch.long), None, None, None, -100,
                                  1.5, 0.0)
    with pytest.raises(RuntimeError, match=r"z_loss must be finite, got inf$"):
        cpu_mod.cross_entropy_fwd(x, torch.zeros(4, dtype=torch.long), None, None, None, -100,
                                  0.0, float("inf"))


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(len(_bad_calls(None, "cpu"))),
                         ids=[m for _, m in _bad_calls(None, "cpu")])
def test_cpu_errors_on_the_gpu_machine(cpu_mod, i):
    """The same checks of the C++ CPU extension as built on the GPU machine: tells whether a
    crash in the CUDA extension's checks (seen on the first H200 run) is that extension's or
    every extension's built there."""
    call, match = _bad_calls(cpu_mod, "cpu")[i]
    with pytest.raises(RuntimeError, match=match):
        call()


# ---- CUDA --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_mod():
    return _ext.load("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_cuda_kernels(cuda_mod, act, dtype, shape):
    _check_all(cuda_mod, "cuda", act, dtype, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_cuda_sweep(cuda_mod, act, dtype):
    _check_sweep(cuda_mod, "cuda", act, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_cuda_nonfinite(cuda_mod, act, dtype):
    _check_nonfinite(cuda_mod, "cuda", act, dtype)


@pytest.mark.gpu
def test_cuda_gelu_below_minus_3(cuda_mod):
    _check_gelu_below_minus_3(cuda_mod, "cuda")


@pytest.mark.gpu
def test_cuda_unaligned(cuda_mod):
    """Inputs starting one element past a 16-byte boundary take the scalar path."""
    for dtype in DTYPES:
        base = [t.cuda() for t in _inputs((1, 3 * 1013 + 1), dtype, 2)]   # then sliced on the GPU
        aligned = [t.view(-1)[:-1].view(3, 1013) for t in base]
        shifted = [t.view(-1)[1:].view(3, 1013) for t in base]           # storage offset 1
        for x, u in ((shifted[0], shifted[1]), (aligned[0], shifted[1]), (shifted[0], aligned[1])):
            assert x.data_ptr() % 16 or u.data_ptr() % 16
            a_ref, _ = _ref("gelu", x.cpu())
            _close(cuda_mod.glu_fwd(x, u, "gelu").cpu(), a_ref * u.cpu().double(), dtype,
                   "unaligned")
            _close(cuda_mod.act_fwd(x, "gelu").cpu(), a_ref, dtype, "unaligned")


# One test per bad call: on the first H200 run a failing argument check crashed the worker
# (segfault) at the third call instead of raising; separate tests tell which checks do that.
@pytest.mark.gpu
@pytest.mark.parametrize("i", range(len(_bad_calls(None, "cpu")) + 1),
                         ids=[m for _, m in _bad_calls(None, "cpu")] + ["CPU tensor"])
def test_cuda_errors(cuda_mod, i):
    calls = _bad_calls(cuda_mod, "cuda") + [
        (lambda: cuda_mod.act_fwd(torch.randn(2, 2), "gelu"), "CUDA tensor")]
    call, match = calls[i]
    with pytest.raises(RuntimeError, match=match):
        call()
