"""Bad input to the cross-entropy family: a clear error naming the argument, never a crash."""

import pytest
import torch

import fastattn

X = torch.randn(4, 10)
T = torch.tensor([1, 2, 3, 4])
W = torch.randn(10, 6)
H = torch.randn(4, 6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastattn.cross_entropy(X, T.float()), TypeError, "target must hold class indices"),
    (lambda: fastattn.cross_entropy(X.long(), T), TypeError, "input must be a floating-point"),
    (lambda: fastattn.cross_entropy(X, T[:3]), ValueError, r"target shape \(3,\) does not match"),
    (lambda: fastattn.cross_entropy(torch.tensor(1.0), T), ValueError, "class dimension"),
    (lambda: fastattn.cross_entropy(X, torch.tensor([1, 2, 10, 0])), ValueError,
     r"target\[2\] = 10 is out of range.*\[0, 10\)"),
    (lambda: fastattn.cross_entropy(X, torch.tensor([1, -5, 0, 0])), ValueError,
     r"target\[1\] = -5 is out of range"),
    (lambda: fastattn.cross_entropy(torch.randn(2, 10, 3), torch.tensor([[0, 1, 2], [3, 10, 0]])),
     ValueError, r"target\[1, 1\] = 10 is out of range"),
    (lambda: fastattn.linear_cross_entropy(torch.randn(2, 3, 6), W,
                                           torch.tensor([[0, 1, 2], [3, -4, 0]])),
     ValueError, r"target\[1, 1\] = -4 is out of range"),
    (lambda: fastattn.linear_token_logprobs(torch.randn(2, 3, 6), W,
                                            torch.tensor([[0, 1, 2], [3, 4, 10]])),
     ValueError, r"target\[1, 2\] = 10 is out of range"),
    (lambda: fastattn.token_logprobs(torch.randn(2, 3, 10), torch.tensor([[0, 1, 2], [3, 4, 10]])),
     ValueError, r"target\[1, 2\] = 10 is out of range"),
    (lambda: fastattn.cross_entropy(X, T, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: fastattn.cross_entropy(X, T, reduction=None), ValueError, "reduction must be one of"),
    (lambda: fastattn.linear_cross_entropy(H, W.t(), T, reduction=None), ValueError,
     "reduction must be one of"),
    (lambda: fastattn.cross_entropy(X, T, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: fastattn.cross_entropy(X, T, z_loss=-1.0), ValueError, "z_loss must be"),
    (lambda: fastattn.cross_entropy(X, T, weight=torch.ones(9)), ValueError,
     r"weight must have shape \(10,\)"),
    (lambda: fastattn.cross_entropy(X, T.to("meta")), ValueError, "target is on meta"),
    (lambda: fastattn.cross_entropy(X, T, ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (lambda: fastattn.linear_cross_entropy(H, W.t(), T), ValueError, "does not match weight"),
    (lambda: fastattn.linear_cross_entropy(H, W, T[:2]), ValueError, "target shape"),
    (lambda: fastattn.linear_cross_entropy(H, W.double(), T), TypeError, "must share a dtype"),
    (lambda: fastattn.linear_cross_entropy(H, W, T, torch.zeros(3)), ValueError, "bias must have"),
    (lambda: fastattn.linear_cross_entropy(H, W, T, chunk_size=0), ValueError, "chunk_size"),
    (lambda: fastattn.linear_cross_entropy(H, W, torch.tensor([0, 1, 2, 99])), ValueError,
     r"target\[3\] = 99 is out of range"),
    (lambda: fastattn.token_logprobs(X, T, temperature=0.0), ValueError, "temperature must be"),
    (lambda: fastattn.token_logprobs(X, T, temperature=torch.tensor(0.5)), TypeError,
     "temperature must be a Python number, got Tensor"),
    (lambda: fastattn.token_logprobs(X, T, temperature=True), TypeError,
     "temperature must be a Python number, got bool"),
    (lambda: fastattn.token_logprobs(X, T[:2]), ValueError, "target shape"),
    (lambda: fastattn.token_logprobs(X, torch.tensor([0, 0, 0, 10])), ValueError, "out of range"),
    (lambda: fastattn.linear_token_logprobs(H, W, T, temperature=-1), ValueError, "temperature"),
    # a reciprocal past float32's range (the kernels' scale): 1e-320's is inf even in float64
    (lambda: fastattn.token_logprobs(X, T, temperature=1e-320), ValueError,
     "temperature must be at least 2.94e-39"),
    (lambda: fastattn.linear_token_logprobs(H, W, T, temperature=1e-40), ValueError,
     "temperature must be at least 2.94e-39"),
    (lambda: fastattn.cross_entropy(X, T, label_smoothing="a"), TypeError,
     "label_smoothing must be a real number, got str"),
    (lambda: fastattn.cross_entropy(X, T, label_smoothing=None), TypeError,
     "label_smoothing must be a real number, got NoneType"),
    (lambda: fastattn.linear_cross_entropy(H, W, T, label_smoothing=None), TypeError,
     "label_smoothing must be a real number"),
    (lambda: fastattn.cross_entropy(X, T, z_loss=None), TypeError,
     "z_loss must be a real number, got NoneType"),
    (lambda: fastattn.token_logprobs(torch.tensor(1.0), torch.tensor(0)), ValueError,
     "logits must have at least 1 dimension"),
])
def test_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_integral_ignore_index_of_other_types_is_accepted_as_torch_does():
    np = pytest.importorskip("numpy")
    t = torch.tensor([1, 2, 3, 4])
    for ignore in (np.int64(2), np.int32(2)):
        torch.testing.assert_close(fastattn.cross_entropy(X, t, ignore_index=ignore),
                                   torch.nn.functional.cross_entropy(X, t, ignore_index=2))
        torch.testing.assert_close(
            fastattn.linear_cross_entropy(H, W, t, ignore_index=ignore),
            torch.nn.functional.cross_entropy(H @ W.t(), t, ignore_index=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_out_of_range_target_errors_on_every_backend(backend):
    with fastattn.use_backend(backend), pytest.raises(ValueError, match="out of range"):
        fastattn.cross_entropy(X, torch.tensor([0, 1, 2, 10]))


def test_weight_gradient_is_refused():
    with pytest.raises(NotImplementedError, match="weight"):
        fastattn.cross_entropy(X, T, weight=torch.ones(10, requires_grad=True))


@pytest.mark.parametrize("backend", ["triton"])
def test_kernel_backend_rejects_float64(backend):
    with fastattn.use_backend(backend), pytest.raises(fastattn.BackendError, match="float64"):
        fastattn.cross_entropy(X.double(), T)


def test_direct_kernel_calls_validate_inputs():
    """The compiled functions check their inputs too (they are reachable from Python)."""
    from fastattn import _ext
    C = _ext.load("cpu")
    with pytest.raises(RuntimeError, match="logits"):
        C.cross_entropy_fwd(torch.randn(4, 10, 2), T, None, None, None, -100, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="target"):
        C.cross_entropy_fwd(X, T.int(), None, None, None, -100, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="grad"):
        C.cross_entropy_fwd(X, T, None, torch.empty(4, 9), None, -100, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="weight"):     # float32 logits, float64 weights
        C.cross_entropy_fwd(X, T, torch.ones(10, dtype=torch.float64), None, None, -100, 0.0, 0.0)
    # a temperature <= 0 (inv_temperature <= 0): the kernels pivot on the row's max logit,
    # the max of the scaled scores only for a positive factor (it gave -inf / NaN)
    t, lse, grad_logp = T.clamp(min=0), torch.zeros(4), torch.ones(4)
    for inv_t in (-1.0, 0.0):
        with pytest.raises(RuntimeError, match="inv_temperature must be finite and > 0"):
            C.token_logprobs_fwd(X, t, -100, inv_t, False)
        with pytest.raises(RuntimeError, match="inv_temperature must be finite and > 0"):
            C.token_logprobs_bwd(X, t, lse, None, grad_logp, None, X.clone(), -100, inv_t)
        with pytest.raises(RuntimeError, match=r"inv_temperature \(> 0\)"):
            C.cross_entropy_slice_bwd(X, t, lse, None, grad_logp, None, X.clone(), inv_t, 1.0,
                                      0.0)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_strided_and_expanded_targets_and_inputs_work_like_torch(backend):
    """Valid torch tensors of any layout: a strided or expand()ed target, an expand()ed input
    with inplace_backward (its rows share memory: the gradient cannot reuse it), and inputs
    with no hidden features."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g)
    strided = torch.randint(0, 5, (8,), generator=g)[::2]
    expanded = torch.tensor([3]).expand(4)
    w = torch.randn(6, 3, generator=g)
    h = torch.randn(4, 3, generator=g)
    with fastattn.use_backend(backend):
        for t in (strided, expanded):
            torch.testing.assert_close(fastattn.cross_entropy(x, t), F.cross_entropy(x, t))
            torch.testing.assert_close(fastattn.token_logprobs(x, t),
                                       F.log_softmax(x, -1).gather(-1, t[:, None])[:, 0])
            torch.testing.assert_close(fastattn.linear_cross_entropy(h, w, t),
                                       F.cross_entropy(h @ w.t(), t))
            torch.testing.assert_close(
                fastattn.linear_token_logprobs(h, w, t),
                F.log_softmax(h @ w.t(), -1).gather(-1, t[:, None])[:, 0])
        row = torch.randn(1, 5, generator=g)
        for inplace in (False, True):
            leaf = row.clone().requires_grad_()
            loss = fastattn.cross_entropy(leaf.expand(4, 5), strided, inplace_backward=inplace)
            loss.backward()
            ref_leaf = row.clone().requires_grad_()
            F.cross_entropy(ref_leaf.expand(4, 5), strided).backward()
            torch.testing.assert_close(loss, F.cross_entropy(row.expand(4, 5), strided))
            torch.testing.assert_close(leaf.grad, ref_leaf.grad)
        # no hidden features: logits are the bias alone
        h0, w0, b0 = torch.randn(4, 0), torch.randn(6, 0), torch.randn(6, generator=g)
        t = torch.tensor([0, 5, 2, 1])
        torch.testing.assert_close(fastattn.linear_cross_entropy(h0, w0, t, bias=b0),
                                   F.cross_entropy(F.linear(h0, w0, b0), t))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_out_of_range_nd_target_is_named_in_its_shape_through_the_dispatcher(backend):
    # requires_grad inputs go through the dispatcher and autograd, not the direct eager call
    x = torch.randn(2, 10, 3, requires_grad=True)
    t = torch.tensor([[0, 1, 2], [3, 10, 0]])
    with fastattn.use_backend(backend), pytest.raises(ValueError, match=r"target\[1, 1\] = 10"):
        fastattn.cross_entropy(x, t)
    with fastattn.use_backend(backend), pytest.raises(ValueError, match=r"target\[1, 1\] = 10"):
        fastattn.cross_entropy(x, t, inplace_backward=True)
    h = torch.randn(2, 3, 6, requires_grad=True)
    with fastattn.use_backend(backend), pytest.raises(ValueError, match=r"target\[1, 1\] = 10"):
        fastattn.linear_cross_entropy(h, W, t)     # W: 10 classes


def test_out_of_range_target_raises_under_compile():
    @torch.compile(backend="eager", fullgraph=True)
    def loss(x, t):
        return fastattn.cross_entropy(x, t)

    with pytest.raises(Exception, match="out of range"):
        loss(torch.randn(2, 10, 3), torch.tensor([[0, 1, 2], [3, 10, 0]]))


# ---- trusted_targets: no range check (a host-device sync on CUDA) for known-valid targets ----

_FAMILY = {
    "cross_entropy": lambda x, w, t, **kw: fastattn.cross_entropy(x @ w.t(), t, reduction="none"),
    "token_logprobs": lambda x, w, t, **kw: fastattn.token_logprobs(x @ w.t(), t),
    "linear_cross_entropy": lambda x, w, t, **kw: fastattn.linear_cross_entropy(
        x, w, t, reduction="none", **kw),
    "linear_token_logprobs": lambda x, w, t, **kw: fastattn.linear_token_logprobs(x, w, t, **kw),
}


@pytest.mark.parametrize("name", list(_FAMILY))
def test_trusted_targets_keeps_the_cpu_check(name):
    # On the CPU the check costs no synchronisation, so a bad target is an error even here.
    with fastattn.trusted_targets():
        with pytest.raises(ValueError, match=r"target\[2\] = 12 is out of range"):
            _FAMILY[name](H, W, torch.tensor([1, 2, 12, 0]))


def test_trusted_targets_is_scoped():
    from fastattn.ops.cross_entropy import _TRUSTED
    assert not _TRUSTED.get()
    with fastattn.trusted_targets():
        assert _TRUSTED.get()
        with fastattn.trusted_targets(False):
            assert not _TRUSTED.get()
        assert _TRUSTED.get()
    assert not _TRUSTED.get()


# (vocabulary chunks: the linear functions' option)
_CHUNKINGS = [(n, "tokens") for n in _FAMILY] + [(n, "vocab") for n in _FAMILY if "linear" in n]


@pytest.mark.parametrize("name,chunk_over", _CHUNKINGS)
def test_unchecked_out_of_range_targets_give_nan_rows(name, chunk_over, monkeypatch):
    """What a trusted (unchecked) call computes for a bad target, on the C++ kernels (the CPU
    check switched off as trusted_targets switches off the CUDA one): NaN in that row's loss or
    log-prob and in its input gradient; every other row as with the bad row ignored. Over
    vocabulary chunks such a target lies in no chunk: without the NaN lse of _vocab_stats its
    loss would read as the row's log-sum-exp, a finite wrong number."""
    import fastattn.ops.cross_entropy as ce
    monkeypatch.setattr(ce, "_validate_targets", lambda *args: None)
    kw = {"chunk_over": chunk_over, "chunk_size": 4} if name.startswith("linear") else {}
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 6, generator=g), torch.randn(10, 6, generator=g)
    bad, ok = torch.tensor([1, 12, 3, -5, 0]), torch.tensor([1, -100, 3, -100, 0])
    results = []
    for t in (bad, ok):
        xg = x.clone().requires_grad_()
        with fastattn.use_backend("cpu"):
            out = _FAMILY[name](xg, w, t, **kw)
            out.sum().backward()
        results.append((out.detach(), xg.grad))
    (out, dx), (ref, ref_dx) = results
    rows = torch.tensor([False, True, False, True, False])
    assert torch.isnan(out[rows]).all() and torch.isnan(dx[rows]).all()
    torch.testing.assert_close(out[~rows], ref[~rows])
    torch.testing.assert_close(dx[~rows], ref_dx[~rows])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name,chunk_over", _CHUNKINGS)
def test_gpu_trusted_targets_do_not_sync(backend, name, chunk_over):
    kw = {"chunk_over": chunk_over} if name.startswith("linear") else {}
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=g).cuda().requires_grad_()
    w = torch.randn(1000, 32, generator=g).cuda().requires_grad_()
    t = torch.randint(0, 1000, (64,), generator=g).cuda()
    t[5], t[9] = 1000, -3   # out of range: NaN rows, no error

    def run():
        out = _FAMILY[name](x, w, t, **kw)
        out.sum().backward()
        return out

    with fastattn.use_backend(backend):
        with pytest.raises(ValueError, match="out of range"):   # the checked call: it syncs
            run()
        with fastattn.trusted_targets():   # compiles and autotunes (which syncs), not timed
            run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with fastattn.trusted_targets():
                out = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    bad = torch.zeros(64, dtype=torch.bool, device="cuda")
    bad[[5, 9]] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.isnan(x.grad[bad]).all() and torch.isfinite(x.grad[~bad]).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_double_backward_raises_instead_of_dropping_second_order_terms(backend, reduction, name):
    """The gradient comes from a tensor the forward kernel wrote (or a recomputing kernel):
    differentiated again, it would be a constant and the second-order terms silently 0."""
    logits, hidden = X.clone().requires_grad_(), H.clone().requires_grad_()
    with fastattn.use_backend(backend):
        if name == "cross_entropy":
            leaf, loss = logits, fastattn.cross_entropy(logits, T, reduction=reduction)
        else:
            leaf, loss = hidden, fastattn.linear_cross_entropy(hidden, W, T, reduction=reduction)
        loss = loss.sum()
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    # the gradient itself is right, and usable as a value
    ref_leaf = leaf.detach().double().requires_grad_()
    ref_logits = ref_leaf if name == "cross_entropy" else ref_leaf @ W.double().t()
    ref = torch.nn.functional.cross_entropy(ref_logits, T, reduction=reduction).sum()
    (ref_g,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(g.detach().double(), ref_g, rtol=2e-5, atol=2e-6)
    penalty = loss + (g ** 2).sum()
    for differentiate in (lambda: torch.autograd.grad(penalty, leaf, retain_graph=True),
                          lambda: penalty.backward()):   # the first follows paths to leaf only
        with pytest.raises(RuntimeError, match=f"fastattn.{name}: its gradient cannot be "
                                               "differentiated again"):
            differentiate()
    again = (X if name == "cross_entropy" else H).clone().requires_grad_()
    with fastattn.use_backend(backend):   # a plain backward is untouched
        out = (fastattn.cross_entropy(again, T, reduction=reduction) if name == "cross_entropy"
               else fastattn.linear_cross_entropy(again, W, T, reduction=reduction))
        out.sum().backward()
    torch.testing.assert_close(again.grad.double(), ref_g, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_float64_mean_gradients(backend, name):
    """float64 "mean": every target ignored gives zero gradients (as PyTorch; not 0 / 0), and
    otherwise the gradients are float64-accurate (the kernels take a float32 scale, so the
    division by the count happens after them)."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=g)
    weight = torch.randn(9, 6, dtype=torch.float64, generator=g)
    logits = hidden @ weight.t()
    # 3 valid targets: 1/3 is not exact in float32, as the old float32 count's scale was not
    for target in (torch.full((5,), -100), torch.tensor([1, -100, 3, 8, -100])):
        leaves = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
        with fastattn.use_backend(backend):
            if name == "cross_entropy":
                loss = fastattn.cross_entropy(leaves[0], target)
            else:
                loss = fastattn.linear_cross_entropy(leaves[1], leaves[2], target)
            loss.backward()
        refs = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
        ref_logits = refs[0] if name == "cross_entropy" else refs[1] @ refs[2].t()
        torch.nn.functional.cross_entropy(ref_logits, target).backward()
        used = [0] if name == "cross_entropy" else [1, 2]
        for i in used:
            assert leaves[i].grad.isfinite().all()
            torch.testing.assert_close(leaves[i].grad, refs[i].grad, rtol=1e-12, atol=1e-14)
    if name == "cross_entropy":    # valid targets of class weight 0 in all: NaN, as PyTorch's
        weight = torch.ones(9, dtype=torch.float64)
        weight[[1, 3]] = 0
        target = torch.tensor([1, -100, 3, 3, -100])
        leaf = logits.clone().requires_grad_()
        with fastattn.use_backend(backend):
            fastattn.cross_entropy(leaf, target, weight=weight).backward()
        ref = logits.clone().requires_grad_()
        torch.nn.functional.cross_entropy(ref, target, weight=weight).backward()
        assert ref.grad[0].isnan().all() and leaf.grad[0].isnan().all()


@pytest.mark.parametrize("call", [
    lambda i: fastattn.cross_entropy(X, T, ignore_index=i),
    lambda i: fastattn.linear_cross_entropy(H, W, T, ignore_index=i),
    lambda i: fastattn.token_logprobs(X, T, ignore_index=i),
    lambda i: fastattn.linear_token_logprobs(H, W, T, ignore_index=i),
])
def test_an_ignore_index_beyond_int64_is_named(call):
    with pytest.raises(ValueError, match="ignore_index must fit in int64, got " + str(2 ** 70)):
        call(2 ** 70)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_inplace_backward_never_overwrites_a_leaf(backend):
    """inplace_backward lends the logits' memory to their gradient: never a parameter's or a
    requires_grad leaf's (or a view of one), whose values would be lost with no error (autograd
    refuses in-place writes into those; the op writes from inside its Function). Those take the
    out-of-place path and get the right gradient; a non-leaf still lends its memory."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g)
    t = torch.randint(0, 10, (6,), generator=g)
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    with fastattn.use_backend(backend):
        for make in (lambda: x.clone().requires_grad_(), lambda: torch.nn.Parameter(x.clone())):
            leaf = make()
            for logits in (leaf, leaf[:, :], leaf.view(6, 10)):
                leaf.grad = None
                loss = fastattn.cross_entropy(logits, t, inplace_backward=True)
                assert torch.equal(leaf.detach(), x), "the leaf's values were overwritten"
                loss.backward()
                torch.testing.assert_close(leaf.grad, ref.grad)
        nonleaf = x.clone().requires_grad_() * 1.0
        fastattn.cross_entropy(nonleaf, t, inplace_backward=True)
        assert not torch.equal(nonleaf.detach(), x), "a non-leaf should lend its memory"


def test_switches_must_be_bools():
    calls = {
        "inplace_backward": lambda v: fastattn.cross_entropy(X.clone().requires_grad_() * 1, T,
                                                             inplace_backward=v),
        "return_entropy": lambda v: fastattn.token_logprobs(X, T, return_entropy=v),
        "return_entropy ": lambda v: fastattn.linear_token_logprobs(H, W, T, return_entropy=v),
    }
    for name, call in calls.items():
        for bad in ("False", 0, 1, None):
            with pytest.raises(TypeError, match=f"{name.strip()} must be a bool"):
                call(bad)
        call(False)


def test_sparse_inputs_are_named():
    with pytest.raises(TypeError, match="input must be a dense .strided. tensor"):
        fastattn.cross_entropy(X.to_sparse(), T)
    with pytest.raises(TypeError, match="target must be a dense"):
        fastattn.cross_entropy(X, T.to_sparse())
    with pytest.raises(TypeError, match="weight must be a dense"):
        fastattn.linear_cross_entropy(H, W.to_sparse(), T)


def test_integral_chunk_sizes_are_taken_like_python_ints():
    """As ignore_index: numpy integers for chunk_size."""
    import numpy as np
    import torch.nn.functional as F
    torch.testing.assert_close(fastattn.linear_cross_entropy(H, W, T, chunk_size=np.int64(2)),
                               F.cross_entropy(H @ W.t(), T))
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            fastattn.linear_cross_entropy(H, W, T, chunk_size=bad)
