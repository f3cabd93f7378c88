"""fastattn.cross_entropy on every backend against float64 PyTorch (forward and gradient)."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from tests.helpers import ALL_BACKENDS, DTYPES, assert_close

# (rows, classes): vocab 1 and 17, an odd middle size, GPT-2's 50257 (kept to few rows so the
# Triton interpreter stays quick), and a larger batch.
SHAPES = [(1, 1), (5, 17), (33, 97), (3, 50257)]
# Option presets, so every backend sees every feature without a full cross product.
OPTIONS = {
    "plain": dict(),
    "smooth+weight": dict(label_smoothing=0.1, weight=True),
    "zloss+ignore": dict(z_loss=1e-3, ignore=True),
    "all": dict(label_smoothing=0.25, weight=True, z_loss=2e-4, ignore=True),
}


def oracle(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           z_loss=0.0):
    """float64 PyTorch cross-entropy plus the z-loss term, differentiable: the z-loss is
    unweighted, and "mean" averages it over the non-ignored tokens (the cross-entropy part over
    their summed class weight)."""
    x64 = x.detach().to(torch.float64).requires_grad_(x.requires_grad)
    w64 = None if weight is None else weight.to(torch.float64)
    loss = F.cross_entropy(x64, target, w64, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    z = torch.zeros_like(loss)
    if z_loss:
        lse = torch.logsumexp(x64, dim=1 if x64.dim() > 1 else 0)
        z = z_loss * lse.square() * valid
    if reduction == "sum":
        return x64, (loss + z).sum()
    if reduction == "mean":
        denom = valid.sum() if w64 is None else (w64[target.clamp(min=0)] * valid).sum()
        return x64, loss.sum() / denom + z.sum() / valid.sum()
    return x64, loss + z


def make_case(rows, classes, dtype, device, options, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=g) * 3).to(dtype).to(device)
    target = torch.randint(0, classes, (rows,), generator=g).to(device)
    if options.get("ignore") and rows > 1:
        target[::3] = -100
    weight = (torch.rand(classes, generator=g) + 0.5).to(device) if options.get("weight") else None
    return x, target, weight


def run_both(x, target, weight, reduction, label_smoothing=0.0, z_loss=0.0, **kw):
    """(ours, grad ours, oracle, grad oracle) with a grad_output that is not 1."""
    xg = x.clone().requires_grad_(True)
    loss = fastattn.cross_entropy(xg, target, weight, reduction=reduction,
                                  label_smoothing=label_smoothing, z_loss=z_loss, **kw)
    x64, ref = oracle(xg, target, weight, reduction=reduction, label_smoothing=label_smoothing,
                      z_loss=z_loss)
    g = torch.rand(ref.shape, dtype=torch.float64, device=x.device) + 0.5
    (grad,) = torch.autograd.grad(loss, xg, g.to(loss.dtype))
    (ref_grad,) = torch.autograd.grad(ref, x64, g.to(loss.dtype).to(torch.float64))
    return loss, grad, ref, ref_grad


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("preset", list(OPTIONS))
def test_matches_float64(device, backend, dtype, shape, reduction, preset):
    opts = OPTIONS[preset]
    x, target, weight = make_case(*shape, dtype, device, opts)
    with fastattn.use_backend(backend):
        loss, grad, ref, ref_grad = run_both(
            x, target, weight, reduction, opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0))
    assert loss.dtype == dtype and grad.dtype == dtype
    assert loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss", scale=10)
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64_on_cpu(backend):
    x, target, weight = make_case(9, 31, torch.float64, "cpu", OPTIONS["all"])
    with fastattn.use_backend(backend):
        loss, grad, ref, ref_grad = run_both(x, target, weight, "mean", 0.25, 2e-4)
    assert_close(loss, ref, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_class_weights_stay_float64(backend, reduction):
    """float64 logits with float64 class weights that float32 cannot hold: loss and gradient
    equal float64 F.cross_entropy to float64 precision (the weights were rounded to float32
    on the way to the kernels: 1.6e-10 relative error)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(9, 31, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 31, (9,), generator=g)
    target[::3] = -100
    weight = torch.rand(31, generator=g, dtype=torch.float64) + 0.5
    assert not torch.equal(weight.float().double(), weight)
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(x, target, weight, reduction=reduction,
                                      label_smoothing=0.1)
    ref = F.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-14)
    gout = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(torch.autograd.grad(loss, x, gout)[0],
                               torch.autograd.grad(ref, x, gout)[0], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_uniform_class_weights_change_nothing_with_z_loss(device, backend):
    """A weighted "mean" is invariant to scaling all class weights (F.cross_entropy's), with
    the z-loss too: it is averaged over tokens, not over the summed weights."""
    x, target, _ = make_case(12, 23, torch.float32, device, OPTIONS["zloss+ignore"])
    results = []
    with fastattn.use_backend(backend):
        for weight in (None, torch.full((23,), 10.0, device=device)):
            xg = x.clone().requires_grad_(True)
            loss = fastattn.cross_entropy(xg, target, weight, z_loss=0.05, label_smoothing=0.1)
            loss.backward()
            results.append((loss.detach(), xg.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fp16_mean_gradient_under_a_loss_scale(device, backend, inplace, weighted):
    """fp16 + "mean" with a GradScaler-sized grad_output: the 1/N is applied with the scale in
    backward, not stored in fp16 first, where p / N underflowed (at N = 8192, 43% of the
    entries were 0 against torch's 0.1%; with class weights, until they were deferred too,
    84%): the error stays within 2x PyTorch's fp16 error."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(512, 64, generator=g) * 4).half().to(device)
    target = torch.randint(0, 64, (512,), generator=g).to(device)
    target[::7] = -100
    weight = (torch.rand(64, generator=g) + 0.5).half().to(device) if weighted else None
    scale = 2.0 ** 14
    xg = x.clone().requires_grad_(True)
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(xg, target, weight, inplace_backward=inplace)
    (loss * scale).backward()
    xt = x.clone().requires_grad_(True)
    (F.cross_entropy(xt, target, weight) * scale).backward()
    x64, ref = oracle(x.requires_grad_(True), target, weight)
    (ref * scale).backward()
    ours = (xg.grad.double() - x64.grad).norm()
    theirs = (xt.grad.double() - x64.grad).norm()
    assert ours <= 2 * theirs, (ours, theirs)
    # p itself is stored in fp16 (p < 6e-8 flushes where torch keeps p * scale / N): a few more
    # zeros than torch's, not most of the row
    assert (xg.grad == 0).sum() <= 1.3 * (xt.grad == 0).sum()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("smoothing", [False, True])
def test_a_large_common_offset_costs_no_precision(device, backend, offset, smoothing):
    """Logits offset + N(0, 1): the loss is (max - z_t) + log(sum), not lse - z_t (lse rounds
    at ulp(offset): 5e-4 off at 1e4, 8.0 for 4.6 at 1e8), p is exp(z - max) / sum, and label
    smoothing's sum_j w_j (lse - z_j) is W log(sum) - sum_j w_j (z_j - max). PyTorch's fp32
    error here is ~1e-7 on the loss and ~3e-8 relative on the gradient."""
    g = torch.Generator().manual_seed(0)
    x = (offset + torch.randn(6, 300, generator=g)).to(device)
    target = torch.randint(0, 300, (6,), generator=g).to(device)
    opts = dict(label_smoothing=0.1, weight=(torch.rand(300, generator=g) + 0.5).to(device)) \
        if smoothing else {}
    xg = x.clone().requires_grad_(True)
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(xg, target, reduction="none", **opts)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
        logp = fastattn.token_logprobs(x, target)
    x64, ref = oracle(x.double().requires_grad_(True), target, reduction="none", **opts)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-7)
    if not smoothing:
        torch.testing.assert_close(logp.double(), -ref, rtol=0, atol=2e-6)
        with fastattn.use_backend(backend):     # and the entropy (temperature 1: z / T exact)
            _, ent = fastattn.token_logprobs(x, target, return_entropy=True)
        logp64 = torch.log_softmax(x.double(), -1)
        torch.testing.assert_close(ent.double(), -(logp64.exp() * logp64).sum(-1),
                                   rtol=0, atol=4e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_returns_a_float32_loss(device, backend, reduction, dtype):
    """Inside torch.autocast F.cross_entropy returns the loss in float32 (an fp32-list op), so
    a half-precision sum does not overflow; fastattn's does the same, and the gradient keeps the
    logits' dtype. The values are checked against float64: on CUDA (torch 2.11, H200) torch's
    autocast loss carries half-precision rounding of each row's loss (its sums are whole
    numbers for bf16), fastattn's is the fp32 result."""
    x, target, _ = make_case(40, 97, dtype, device, {"ignore": True})
    x = (x * 100).requires_grad_(True)       # losses of hundreds: coarse in half precision
    with torch.autocast(device, dtype=dtype), fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(x, target, reduction=reduction)
        ref = F.cross_entropy(x, target, reduction=reduction)
    assert loss.dtype == ref.dtype == torch.float32 and loss.isfinite().all()
    ref64 = F.cross_entropy(x.double(), target, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    (ref_grad,) = torch.autograd.grad(ref64.sum(), x)   # float64 math, rounded to x's dtype
    assert grad.dtype == dtype
    assert_close(loss, ref64, torch.float32, "loss", scale=100)
    assert_close(grad, ref_grad, dtype, "grad")
    with fastattn.use_backend(backend):     # outside autocast: input's dtype, as before
        assert fastattn.cross_entropy(x, target, reduction=reduction).dtype == dtype


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_all_rows_ignored(device, backend, reduction, dtype, inplace):
    # PyTorch: mean of nothing is nan, sum is 0; the gradient is 0 either way.
    x = torch.randn(4, 11, device=device).to(dtype).requires_grad_(True)
    target = torch.full((4,), -100, device=device)
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(x.clone() if inplace else x, target, reduction=reduction,
                                      inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    ref = F.cross_entropy(x.detach(), target, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, backend, reduction):
    x = torch.randn(0, 7, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(x, target, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    ref = F.cross_entropy(x.detach(), target, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert grad.shape == (0, 7)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_plain_backward_grad_output_one(device, backend):
    # loss.backward() with grad_output exactly 1 takes the no-scale path.
    x, target, _ = make_case(6, 40, torch.float32, device, {"ignore": True})
    xg = x.clone().requires_grad_(True)
    with fastattn.use_backend(backend):
        fastattn.cross_entropy(xg, target).backward()
    x64, ref = oracle(x.clone().requires_grad_(True), target)
    ref.backward()
    assert_close(xg.grad, x64.grad, torch.float32, "grad")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row-strided", "spatial", "unbatched"])
def test_layouts(device, backend, layout):
    """Non-contiguous logits, (N, C, d1, d2) inputs and a single (C,) sample."""
    if layout == "transposed":
        x = torch.randn(23, 6, device=device).t()          # (6, 23), class stride 6
        target = torch.randint(0, 23, (6,), device=device)
    elif layout == "row-strided":
        x = torch.randn(6, 40, device=device)[:, 3:26]      # (6, 23), row stride 40
        target = torch.randint(0, 23, (6,), device=device)
    elif layout == "spatial":
        x = torch.randn(2, 23, 3, 4, device=device)
        target = torch.randint(0, 23, (2, 3, 4), device=device)
        target[0, 1, 2] = -100
    else:
        x = torch.randn(23, device=device)
        target = torch.tensor(5, device=device)
    for reduction in ("mean", "none"):
        with fastattn.use_backend(backend):
            loss, grad, ref, ref_grad = run_both(x, target, None, reduction, 0.1)
        assert loss.shape == ref.shape
        assert_close(loss, ref, torch.float32, f"{layout} loss")
        assert_close(grad, ref_grad, torch.float32, f"{layout} grad")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_no_grad_path_writes_no_gradient(device, backend):
    x, target, _ = make_case(5, 33, torch.float32, device, {})
    before = x.clone()
    with fastattn.use_backend(backend):
        with torch.no_grad():
            loss = fastattn.cross_entropy(x.requires_grad_(True), target, inplace_backward=True)
        # the op itself returns an empty gradient when asked not to compute one
        _, grad = torch.ops.fastattn.cross_entropy_fwd(x.detach(), target, None, -100, 0.0, 0.0,
                                                       "mean", False)
    assert grad.numel() == 0
    assert torch.equal(x.detach(), before), "no-grad call must not touch the logits"
    assert_close(loss, oracle(x, target)[1], torch.float32, "loss")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(device, backend, reduction):
    x, target, weight = make_case(7, 50, torch.float32, device, OPTIONS["all"])
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0          # a non-leaf the caller no longer needs
    ptr = logits.data_ptr()
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(logits, target, weight, reduction=reduction,
                                      label_smoothing=0.25, z_loss=2e-4, inplace_backward=True)
    g = torch.rand(loss.shape, device=device) + 0.5
    (grad,) = torch.autograd.grad(loss, leaf, g)
    x64, ref = oracle(x.clone().requires_grad_(True), target, weight, reduction=reduction,
                      label_smoothing=0.25, z_loss=2e-4)
    (ref_grad,) = torch.autograd.grad(ref, x64, g.double())
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
    assert logits.data_ptr() == ptr and torch.allclose(logits.detach(), grad / 1.0), \
        "the gradient must live in the logits' memory"


def test_caller_logits_untouched_by_default():
    x = torch.randn(4, 9, requires_grad=True)
    before = x.detach().clone()
    loss = fastattn.cross_entropy(x, torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert torch.equal(x.detach(), before)


def test_large_vocab_cpu_kernel_full_shape():
    """The C++ kernel at a training-like shape (the interpreter only sees small ones)."""
    x, target, weight = make_case(64, 50257, torch.bfloat16, "cpu", OPTIONS["all"], seed=3)
    with fastattn.use_backend("cpu"):
        loss, grad, ref, ref_grad = run_both(x, target, weight, "mean", 0.25, 2e-4)
    assert_close(loss, ref, torch.bfloat16, "loss", scale=10)
    assert_close(grad, ref_grad, torch.bfloat16, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_vocab_and_misaligned_rows(backend, dtype):
    # vocab 131072 and a padded row stride that breaks 16-byte alignment of every other row
    base = (torch.randn(8, 131072 + 3, device="cuda") * 4).to(dtype)
    x = base[:, 1:131073]
    target = torch.randint(0, 131072, (8,), device="cuda")
    target[3] = -100
    with fastattn.use_backend(backend):
        loss, grad, ref, ref_grad = run_both(x, target, None, "mean", 0.1, 1e-4)
    assert_close(loss, ref, dtype, "loss", scale=10)
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.gpu
def test_gpu_backends_agree_bf16():
    x = (torch.randn(64, 32000, device="cuda") * 2).bfloat16()
    target = torch.randint(0, 32000, (64,), device="cuda")
    out = {}
    for backend in ("cuda", "triton", "reference"):
        torch.manual_seed(1)        # run_both draws the grad_output: the same one for each
        with fastattn.use_backend(backend):
            loss, grad, _, _ = run_both(x, target, None, "mean")
        out[backend] = (loss.float(), grad.float())
    for backend in ("cuda", "triton"):
        torch.testing.assert_close(out[backend][0], out["reference"][0], rtol=1e-2, atol=1e-3,
                                   msg=lambda m: f"{backend} loss: {m}")
        torch.testing.assert_close(out[backend][1], out["reference"][1], rtol=1.6e-2, atol=1e-6,
                                   msg=lambda m: f"{backend} grad: {m}")
