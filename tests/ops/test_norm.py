"""fastattn.layer_norm / rms_norm (with the fused residual add and output cast) against float64
F.layer_norm / F.rms_norm, forward and every gradient, on every backend."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import BackendError
from tests.helpers import CPU_BACKENDS, GPU, assert_close

# The norm has no CUDA-extension kernel: Triton is its GPU backend.
BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in CPU_BACKENDS] + [
    pytest.param("cuda", "triton", marks=GPU, id="cuda-triton")]


def _rms_norm64(s, shape, w, eps):
    dims = tuple(range(-len(shape), 0))
    y = s * torch.rsqrt(s.square().mean(dims, keepdim=True) + eps)
    return y if w is None else y * w


def _expected(x, r, w, b, eps, rms, shape, s_dtype):
    """float64 results on float64 leaves: y, and s = x + r rounded to s_dtype as the op rounds
    it (a straight-through rounding: its gradient is 1)."""
    s = x if r is None else x + r
    s = s + (s.to(s_dtype).double() - s).detach()
    if rms:
        return _rms_norm64(s, shape, w, eps), s
    return F.layer_norm(s, shape, w, b, eps), s


def check(device, backend, dtype, rms, residual_dtype, affine=True, lead=(3, 5), shape=(97,),
          out_dtype=None, eps=1e-5, transpose=False, grads=("y", "s"), scale=10.0):
    """Our outputs and gradients (grad_outputs != 1 for y and s) against float64."""
    g = torch.Generator().manual_seed(3)

    def rnd(*size, dtype=torch.float32, offset=0.0):
        return (torch.randn(*size, generator=g) * 2 + offset).to(dtype).to(device)

    if transpose:   # features not contiguous: (N, D) seen through a transpose
        x = rnd(*reversed(shape), *reversed(lead), dtype=dtype, offset=1.0).permute(
            *reversed(range(len(lead) + len(shape))))
    else:
        x = rnd(*lead, *shape, dtype=dtype, offset=1.0)
    r = None if residual_dtype is None else rnd(*lead, *shape, dtype=residual_dtype)
    w = rnd(*shape) if affine else None
    b = rnd(*shape) * 0.5 if affine and not rms else None
    leaves = {k: v.clone().requires_grad_() for k, v in (("x", x), ("r", r), ("w", w), ("b", b))
              if v is not None}
    with fastattn.use_backend(backend):
        fn = fastattn.rms_norm if rms else fastattn.layer_norm
        args = (leaves.get("w"),) if rms else (leaves.get("w"), leaves.get("b"))
        out = fn(leaves["x"], shape, *args, eps, residual=leaves.get("r"), out_dtype=out_dtype)
    y, s = out if r is not None else (out, None)
    s_dtype = dtype if r is None else torch.promote_types(dtype, residual_dtype)
    assert y.dtype == (out_dtype or s_dtype) and y.shape == x.shape
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y64, s64 = _expected(ref["x"], ref.get("r"), ref.get("w"), ref.get("b"), eps, rms, shape,
                         s_dtype)
    assert_close(y, y64, y.dtype, "y", scale=scale)
    outs, outs64 = [y], [y64]
    if s is not None:
        assert s.dtype == s_dtype and s.shape == x.shape
        assert_close(s, s64, s_dtype, "s")
        if "s" in grads:
            outs, outs64 = outs + [s], outs64 + [s64]
    if "y" not in grads:
        outs, outs64 = outs[1:], outs64[1:]
    gouts = [torch.linspace(-2, 1, o.numel(), device=device).reshape(o.shape).to(o.dtype)
             for o in outs]
    names = list(leaves)
    ours = torch.autograd.grad(outs, [leaves[k] for k in names], gouts, allow_unused=True)
    theirs = torch.autograd.grad(outs64, [ref[k] for k in names], [t.double() for t in gouts],
                                 allow_unused=True)
    for name, a, e in zip(names, ours, theirs):
        if e is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None and a.dtype == leaves[name].dtype, name
        assert_close(a, e, a.dtype, f"grad {name}", scale=scale)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [None, "same", "float32"])
def test_matches_float64(device, backend, rms, dtype, residual):
    res_dtype = {None: None, "same": dtype, "float32": torch.float32}[residual]
    check(device, backend, dtype, rms, res_dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("lead,shape", [((1,), (1,)), ((4,), (17,)), ((2, 3), (130,)),
                                        ((0,), (40,)), ((2,), (4, 6))],
                         ids=["1x1", "4x17", "6x130", "empty", "2d-shape"])
def test_shapes(device, backend, rms, lead, shape):
    check(device, backend, torch.float32, rms, torch.float32, lead=lead, shape=shape)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_no_affine_transposed_input_and_partial_grads(device, backend, rms):
    check(device, backend, torch.float32, rms, None, affine=False, transpose=True)
    # only the residual output, or only y, carries a gradient
    check(device, backend, torch.float32, rms, torch.float32, grads=("s",))
    check(device, backend, torch.float32, rms, torch.float32, grads=("y",))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_out_dtype_is_the_next_matmuls_cast(device, backend, rms):
    """out_dtype=bf16 from float32 rows (the GPT under autocast): y is the float32 result rounded
    once, and its gradient flows back into the float32 rows."""
    check(device, backend, torch.float32, rms, torch.bfloat16, out_dtype=torch.bfloat16)
    check(device, backend, torch.bfloat16, rms, torch.float32, out_dtype=torch.bfloat16)
    # a wider output than the rows (computed from the same rounded s, not rounded twice)
    check(device, backend, torch.bfloat16, rms, None, out_dtype=torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64(backend):
    for rms in (False, True):
        check("cpu", backend, torch.float64, rms, torch.float64, eps=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_weight_and_bias(device, backend):
    """Parameters that are views with a stride (a column of a matrix) are read as such."""
    g = torch.Generator().manual_seed(7)
    x, r = (torch.randn(5, 16, generator=g).to(device) for _ in range(2))
    w = torch.randn(16, 2, generator=g).to(device)[:, 0].requires_grad_()
    b = torch.randn(16, 3, generator=g).to(device)[:, 1]
    with fastattn.use_backend(backend):
        y, s = fastattn.layer_norm(x, 16, w, b, residual=r)
        z = fastattn.rms_norm(x, 16, w, 1e-5)
        (dw,) = torch.autograd.grad((y * z).sum(), w)
    w64, b64 = w.detach().double(), b.double()
    y64 = F.layer_norm((x + r).double(), (16,), w64, b64)
    z64 = _rms_norm64(x.double(), (16,), w64, 1e-5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-5)
    w64.requires_grad_()
    (dw64,) = torch.autograd.grad((F.layer_norm((x + r).double(), (16,), w64, b64)
                                   * _rms_norm64(x.double(), (16,), w64, 1e-5)).sum(), w64)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float16_and_bfloat16_round_once(backend):
    """Rows in one half dtype, output in the other: y is the float32 result rounded once."""
    g = torch.Generator().manual_seed(8)
    for rows, out in ((torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)):
        x = (torch.randn(6, 40, generator=g) * 3).to(rows)
        w = torch.rand(40, generator=g) * 100
        with fastattn.use_backend(backend):
            y = fastattn.layer_norm(x, 40, w, out_dtype=out)
        torch.testing.assert_close(y, F.layer_norm(x.float(), (40,), w).to(out), rtol=0, atol=0)


def test_defaults_follow_torch():
    """eps defaults as torch's (1e-5; for rms_norm the accumulation dtype's epsilon, current
    torch's rule); inside the CPU's autocast the output dtype is F.layer_norm's there (the
    input's)."""
    xb = (torch.randn(4, 64) * 0.01).bfloat16()
    y64 = xb.double() * torch.rsqrt(xb.double().square().mean(-1, keepdim=True)
                                    + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(fastattn.rms_norm(xb, 64), y64.bfloat16(), rtol=0, atol=0)
    x = torch.randn(4, 33, dtype=torch.bfloat16)
    w = torch.rand(33) + 0.5
    ours = fastattn.rms_norm(x.float(), [33], w)
    torch.testing.assert_close(ours, F.rms_norm(x.float(), [33], w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fastattn.layer_norm(x.float(), 33),
                               F.layer_norm(x.float(), [33]), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastattn.layer_norm(x, 33, w)
        y_torch = F.layer_norm(x, [33], w)
        y_bf16 = fastattn.layer_norm(x, 33, w, out_dtype=torch.bfloat16)
        y32 = fastattn.layer_norm(x.float(), 33, w)
    assert y.dtype == y_torch.dtype == y_bf16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    torch.testing.assert_close(y, y_torch, rtol=0, atol=0)
    torch.testing.assert_close(y_bf16, y_torch, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_propagates_to_its_row(device, backend):
    x = torch.randn(3, 20, device=device)
    x[1, 7] = float("nan")
    with fastattn.use_backend(backend):
        y = fastattn.layer_norm(x, 20)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_variance_past_fp32_is_nan_not_a_plausible_row(device, backend, dtype):
    # |s - mean| ~ 7.5e19: the fp32 variance overflows, and rstd = 0 would give a row of zeros
    # (plus the bias): a finite wrong answer. The row is NaN instead. (torch's own layer_norm
    # gives NaN without an affine weight and the bias with one, on CPU in 2.14.) RMS norm's
    # zeros there are F.rms_norm's too.
    x = torch.randn(3, 24, device=device).to(dtype)
    x[1, 5] = 1e20
    w, b = torch.randn(24, device=device).to(dtype), torch.randn(24, device=device).to(dtype)
    with fastattn.use_backend(backend):
        ys = [fastattn.layer_norm(x, 24, w, b), fastattn.layer_norm(x, 24)]
        y_rms = fastattn.rms_norm(x, 24, w)
    for y, ref in zip(ys, [torch.nn.functional.layer_norm(x, (24,), w, b),
                           torch.nn.functional.layer_norm(x, (24,))]):
        assert torch.isnan(y[1]).all()
        torch.testing.assert_close(y[[0, 2]], ref[[0, 2]])
    torch.testing.assert_close(y_rms, torch.nn.functional.rms_norm(x, (24,), w))


def test_cpu_weight_gradient_independent_of_threads():
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(513, 130, generator=g), torch.randn(513, 130, generator=g)
    w, b = torch.randn(130, generator=g).requires_grad_(), torch.randn(130, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with fastattn.use_backend("cpu"):
                wb = [w.detach().clone().requires_grad_(), b.clone().requires_grad_()]
                fastattn.layer_norm(x, 130, *wb).backward(dy)
            results.append([t.grad for t in wb])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_modules_are_torch_modules():
    """fastattn.nn.LayerNorm / RMSNorm load torch's state_dict and give torch's output; a
    residual makes them return (out, input + residual)."""
    torch.manual_seed(1)
    for ours, theirs in ((fastattn.nn.LayerNorm(24, eps=1e-6), torch.nn.LayerNorm(24, eps=1e-6)),
                         (fastattn.nn.RMSNorm(24, eps=1e-6), torch.nn.RMSNorm(24, eps=1e-6))):
        with torch.no_grad():
            for p in theirs.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict())
        assert isinstance(ours, type(theirs))
        x, r = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        y, s = ours(x, residual=r)
        torch.testing.assert_close(s, x + r, rtol=0, atol=0)
        torch.testing.assert_close(y, theirs(x + r), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x = torch.randn(4, 6)
    cases = [
        (lambda: fastattn.layer_norm(x.long(), 6), TypeError, "input must be a floating-point"),
        (lambda: fastattn.layer_norm(x, 5), ValueError, r"does not end with normalized_shape \(5,\)"),
        (lambda: fastattn.layer_norm(x, "6"), TypeError, "normalized_shape must be an int"),
        (lambda: fastattn.layer_norm(x, ()), ValueError, "at least one feature"),
        (lambda: fastattn.layer_norm(x, 6, torch.ones(5)), ValueError,
         r"weight must have shape normalized_shape \(6,\), got \(5,\)"),
        (lambda: fastattn.layer_norm(x, 6, None, torch.ones(6, dtype=torch.long)), TypeError,
         "bias must be a floating-point tensor"),
        (lambda: fastattn.layer_norm(x, 6, residual=torch.randn(4, 5)), ValueError,
         r"residual must have input's shape \(4, 6\), got \(4, 5\)"),
        (lambda: fastattn.layer_norm(x, 6, eps=-1.0), ValueError, "eps must be a finite"),
        (lambda: fastattn.rms_norm(x, 6, eps=float("nan")), ValueError, "eps must be a finite"),
        (lambda: fastattn.layer_norm(x, 6, out_dtype=torch.int32), TypeError,
         "out_dtype must be None or one of"),
        (lambda: fastattn.layer_norm(x, 6, torch.ones(6, device="meta")), ValueError,
         "weight must be on input's device"),
        (lambda: fastattn.layer_norm(x.to_sparse(), 6), TypeError,
         "input must be a dense .strided. tensor, got layout torch.sparse_coo"),
        (lambda: fastattn.rms_norm(x, 6, residual=x.to_sparse()), TypeError,
         "residual must be a dense"),
        (lambda: fastattn.layer_norm(x, 6, torch.ones(6).to_sparse()), TypeError,
         "weight must be a dense"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_triton_row_limit_is_an_error_when_asked_for():
    from fastattn.ops.norm.triton import MAX_D
    x = torch.randn(1, MAX_D + 1)
    with fastattn.use_backend("triton"), pytest.raises(BackendError, match=f"at most {MAX_D}"):
        fastattn.layer_norm(x, MAX_D + 1)


@GPU
def test_gpu_bf16_training_shape():
    """The GPT's shape (rows of 768, bf16 branch into a float32 residual stream, bf16 output)."""
    check("cuda", "triton", torch.bfloat16, False, torch.float32, lead=(2048,), shape=(768,),
          out_dtype=torch.bfloat16)
    check("cuda", "triton", torch.bfloat16, True, torch.float32, lead=(2048,), shape=(4096,),
          out_dtype=torch.bfloat16)


@GPU
def test_gpu_autocast_output_dtype_is_torchs():
    w = torch.rand(64, device="cuda") + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 64, device="cuda", dtype=dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours, theirs = fastattn.layer_norm(x, 64, w), F.layer_norm(x, [64], w)
            cast = fastattn.layer_norm(x, 64, w, out_dtype=torch.bfloat16)
        assert ours.dtype == theirs.dtype == torch.float32 and cast.dtype == torch.bfloat16
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@GPU
def test_gpu_wide_rows_take_the_reference_under_auto():
    from fastattn.ops.norm.triton import MAX_D
    x = torch.randn(2, MAX_D * 2, device="cuda")
    torch.testing.assert_close(fastattn.layer_norm(x, MAX_D * 2),
                               F.layer_norm(x, [MAX_D * 2]), rtol=1e-5, atol=1e-5)
