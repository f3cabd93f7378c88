"""fastattn.optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ on every backend."""

import math

import pytest
import torch

import fastattn
from fastattn.ops import grad_norm as grad_norm_op
from tests.helpers import ALL_BACKENDS, DTYPES, GPU, TOL, assert_close

INF = math.inf
SIZES = [(1,), (17,), (97,), (33, 65), (4099,)] + [(int(n),) for n in range(3, 60, 7)]


def _params(device, dtype, sizes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in sizes:
        p = torch.zeros(s, device=device, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(s, generator=g) * scale).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _clone(params):
    if isinstance(params, torch.Tensor):
        return _clone([params])[0]
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def _compare(ours, ref, ours_params, ref_params, what, norm_tol=None):
    assert ours.shape == () and ours.dtype == ref.dtype and ours.device == ref.device, \
        (ours.shape, ours.dtype, ours.device, ref.dtype, ref.device)
    assert_close(ours, ref, norm_tol or ref.dtype, f"{what}: total norm")
    for i, (p, q) in enumerate(zip(ours_params, ref_params)):
        if q.grad is None:
            assert p.grad is None
        else:
            assert_close(p.grad, q.grad, norm_tol or q.grad.dtype, f"{what}: grad {i}")


def _check(device, backend, params, max_norm, norm_type, norm_tol=None, **kw):
    ref_params = _clone(params)
    with fastattn.use_backend(backend):
        ours = fastattn.optim.clip_grad_norm_(params, max_norm, norm_type, **kw)
    ref = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type, **kw)
    if isinstance(params, torch.Tensor):
        params, ref_params = [params], [ref_params]
    _compare(ours, ref, params, ref_params, f"{backend} p={norm_type} max_norm={max_norm}",
             norm_tol)
    return ours


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0, 3.0], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("clips", [True, False], ids=["clip", "noclip"])
def test_matches_torch(device, backend, dtype, norm_type, clips):
    params = _params(device, dtype, SIZES, seed=int(norm_type if norm_type != INF else 7))
    # The 2-norm of these grads is ~70, the inf-norm ~4, the 1-norm ~4000.
    max_norm = 0.5 if clips else 1e5
    _check(device, backend, params, max_norm, norm_type)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, INF], ids=lambda p: f"p{p}")
def test_large_and_odd_sizes(device, backend, norm_type):
    params = _params(device, torch.float32, [(2**20 + 3,), (1,), (17,)], seed=3)
    _check(device, backend, params, 1.0, norm_type)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_many_tensors_and_missing_grads(device, backend):
    params = _params(device, torch.float32, [(int(n),) for n in range(1, 300, 3)], seed=4)
    for p in params[::5]:
        p.grad = None
    _check(device, backend, params, 1.0, 2.0)
    params.append(torch.zeros(3, device=device, requires_grad=True))  # never had a grad
    _check(device, backend, params, 1.0, INF)


@pytest.mark.parametrize("device,backend",
                         [p for p in ALL_BACKENDS if p.values != ("cpu", "triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_tensors_than_a_launch_takes(device, backend, dtype):
    # The CUDA kernels take up to 128 whole tensors a launch, a block per 65536-element chunk:
    # 140 tensors, multi-chunk ones on both sides of the 128th, so that the second launch starts
    # inside the list and the blocks' tensor lookup meets chunks 0 to 3 of several tensors.
    # (Not the Triton kernel under the interpreter, 45 s here: its own chunk table has
    # test_triton_chunk_table_covers_every_element_once.)
    sizes = [(int(n),) for n in range(1, 600, 3)][:140]
    for i in (0, 126, 127, 128, 139):
        sizes[i] = (3 * 2**16 + 5 + i,)
    params = _params(device, dtype, sizes, seed=11)
    _check(device, backend, params, 1.0, 2.0)
    _check(device, backend, _params(device, dtype, sizes, seed=12), 1.0, INF)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_mixed_dtypes_are_grouped(device, backend):
    params = (_params(device, torch.float32, [(17,), (33,)], seed=5)
              + _params(device, torch.bfloat16, [(40,)], seed=6)
              + _params(device, torch.float16, [(9,)], seed=7))
    # torch rounds each group's norm to the group's dtype (bf16 here) before combining them;
    # fastattn keeps them in float32, so the two differ by up to a bf16 rounding.
    ours = _check(device, backend, params, 1.0, 2.0, norm_tol=torch.bfloat16)
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm_type", [0.0, 1.0, -1.0, -INF], ids=lambda p: f"p{p}")
def test_mixed_dtypes_every_norm_type(device, backend, norm_type):
    """Across dtype groups the norms combine by torch's formula, the norm of the per-tensor
    norms; for p = 0 that counts the tensors with a nonzero gradient, group sizes added."""
    params = (_params(device, torch.float32, [(17,), (33,)], seed=5)
              + _params(device, torch.bfloat16, [(40,)], seed=6)
              + _params(device, torch.float16, [(9,)], seed=7))
    params[2].grad.zero_()    # (a group that p = 0 does not count, beside one that counts 2)
    ours = _check(device, backend, params, 1e9, norm_type, norm_tol=torch.bfloat16)
    if norm_type == 0:
        assert ours.item() == 3


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm_type", [INF, -INF], ids=["inf", "-inf"])
def test_the_inf_norm_of_an_empty_gradient_as_in_torch(device, backend, norm_type):
    """An error where torch raises one (the -inf norm; the inf norm except on CUDA, whose
    foreach norm takes an empty tensor's as 0), else torch's norm."""
    params = _params(device, torch.float32, [(0,), (5,)], seed=3)
    if norm_type > 0 and device == "cuda":
        _check(device, backend, params, 1.0, norm_type)
        return
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(_clone(params), 1.0, norm_type)
    with fastattn.use_backend(backend), pytest.raises(
            RuntimeError, match="inf norm of an empty gradient is undefined"):
        fastattn.optim.clip_grad_norm_(params, 1.0, norm_type)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_single_tensor_noncontiguous_and_empty(device, backend):
    (p,) = _params(device, torch.float32, [(12, 9)], seed=8)
    _check(device, backend, p, 0.1, 2.0)            # a single Tensor, not a list
    p.grad = p.grad.t().contiguous().t()            # non-contiguous grad
    assert not p.grad.is_contiguous()
    q = _params(device, torch.float32, [(30,)], seed=9)[0]
    _check(device, backend, [p, q], 0.1, INF)
    with fastattn.use_backend(backend):
        empty = fastattn.optim.clip_grad_norm_([], 1.0)
        none = fastattn.optim.clip_grad_norm_([torch.zeros(3, device=device, requires_grad=True)],
                                              1.0)
        with pytest.warns(UserWarning, match="empty generator"):
            fastattn.optim.clip_grad_norm_((x for x in []), 1.0)
    for r in (empty, none):
        assert r.shape == () and r.item() == 0.0 and r.dtype == torch.float32


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("norm_type", [2.0, INF], ids=lambda p: f"p{p}")
def test_nonfinite_grads(device, backend, bad, norm_type):
    params = _params(device, torch.float32, [(17,), (5000,)], seed=10)
    params[1].grad[4321] = bad
    ref_params = _clone(params)
    with fastattn.use_backend(backend):
        ours = fastattn.optim.clip_grad_norm_(params, 1.0, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(ref_params, 1.0, norm_type)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert math.isnan(ours.item()) == math.isnan(bad)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
    params = _params(device, torch.float32, [(17,), (5000,)], seed=10)
    params[1].grad[4321] = bad
    before = [p.grad.clone() for p in params]
    with fastattn.use_backend(backend), pytest.raises(RuntimeError, match="non-finite"):
        fastattn.optim.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    for p, b in zip(params, before):   # raised before touching the grads, as torch does
        torch.testing.assert_close(p.grad, b, equal_nan=True)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_norm_is_deterministic(device, backend):
    grads = [g.grad for g in _params(device, torch.float32, [(2**18 + 5,), (777,)], seed=11)]
    with fastattn.use_backend(backend):
        first = grad_norm_op.grad_norm(grads, 2.0)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            again = grad_norm_op.grad_norm(grads, 2.0)
        finally:
            torch.set_num_threads(threads)
    assert first.dtype == torch.float32 and first.shape == ()
    assert torch.equal(first, again)


def _sparse_and_complex():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    z = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.tensor([3 + 4j, 1j, -2, 0.5], dtype=torch.complex64)
    return [emb.weight, z]


@pytest.mark.parametrize("pick", [[0], [1], [0, 1]], ids=["sparse", "complex", "both"])
def test_sparse_and_complex_gradients_are_clipped_as_torch_clips_them(pick):
    ours, ref = ([params[i] for i in pick] for params in (_sparse_and_complex(),
                                                          _sparse_and_complex()))
    try:
        expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    except (RuntimeError, NotImplementedError) as e:    # torch 2.4: no norm of sparse grads
        with pytest.raises(type(e)):
            fastattn.optim.clip_grad_norm_(ours, 0.5)
        return
    total = fastattn.optim.clip_grad_norm_(ours, 0.5)
    torch.testing.assert_close(total, expected)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense())


def test_bad_inputs():
    with pytest.raises(TypeError, match="parameters\\[1\\] must be a Tensor"):
        fastattn.optim.clip_grad_norm_([torch.zeros(2), "w"], 1.0)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        fastattn.optim.clip_grad_norm_(3, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        fastattn.optim.clip_grad_norm_([torch.zeros(2)], "big")
    with pytest.raises(ValueError, match="norm_type"):
        fastattn.optim.clip_grad_norm_([torch.zeros(2)], 1.0, math.nan)
    q = torch.zeros(3, requires_grad=True)
    q.grad = torch.ones(3)
    assert fastattn.optim.clip_grad_norm_([q], 1.0, "inf").item() == 1.0
    with pytest.raises(ValueError, match="share device and dtype"):
        grad_norm_op.grad_norm([torch.ones(2), torch.ones(2, dtype=torch.float16)], 2.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        fastattn._ext.load("cpu").grad_norm([torch.ones(4, 4).t()], 2.0)
    with pytest.raises(RuntimeError, match="norm_type 2 and inf"):
        fastattn._ext.load("cpu").grad_norm([torch.ones(4)], 1.0)


def test_float64_runs_reference_on_every_backend():
    params = _params("cpu", torch.float64, [(17,), (40,)], seed=12)
    for backend in ("cpu", "reference"):
        _check("cpu", backend, _clone(params), 1.0, 2.0)


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("norm_type", [2.0, INF], ids=lambda p: f"p{p}")
def test_no_host_sync(backend, norm_type):
    params = _params("cuda", torch.bfloat16, [(1,), (17,), (2**20 + 3,)] * 20, seed=13)
    ref_params = _clone(params)
    with fastattn.use_backend(backend):
        fastattn.optim.clip_grad_norm_(params, 1.0, norm_type)   # warm up: compile, autotune
        params = _clone(ref_params)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours = fastattn.optim.clip_grad_norm_(params, 1.0, norm_type)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ref = torch.nn.utils.clip_grad_norm_(ref_params, 1.0, norm_type)
    _compare(ours, ref, params, ref_params, f"{backend} no-sync")


def test_triton_chunk_table_covers_every_element_once():
    """The Triton kernels' (start, length) table, built with vectorised ops, against the plain
    per-chunk loop it replaces: views of one buffer at odd offsets, sizes around CHUNK, an
    empty tensor among them (offsets are element counts from the first live tensor)."""
    from fastattn.ops.grad_norm import triton as gn_triton
    chunk = gn_triton.CHUNK
    flat = torch.zeros(8 * chunk)
    cuts = [(5 * chunk, 3), (0, chunk), (chunk + 3, 0), (chunk + 17, chunk + 1),
            (3 * chunk + 32, 2 * chunk - 40), (7 * chunk, 1)]
    tensors = [flat[s:s + n] for s, n in cuts]
    base, table, aligned = gn_triton._chunk_table(tensors)
    assert base is tensors[0] and not aligned            # CHUNK + 17 - 5 * CHUNK: not 16k
    expected = [(s - cuts[0][0] + b, min(chunk, n - b)) for s, n in cuts for b in range(0, n, chunk)]
    assert table.tolist() == [list(r) for r in expected]
    covered = torch.zeros_like(flat, dtype=torch.int64)
    for start, length in table.tolist():
        covered[cuts[0][0] + start:cuts[0][0] + start + length] += 1
    want = torch.zeros_like(covered)
    for s, n in cuts:
        want[s:s + n] = 1
    assert torch.equal(covered, want)
    again = gn_triton._chunk_table([flat[s:s + n] for s, n in cuts])  # same buffers: remembered
    assert again[1] is table
    flat2 = flat.clone()                                 # same sizes elsewhere: a new table
    moved = gn_triton._chunk_table([flat2[s:s + n] for s, n in cuts])
    assert moved[1] is not table and torch.equal(moved[1], table)
    # two groups interleaved (each group's norm, then each group's scale) both get theirs back
    group_b = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.bfloat16)]
    table_b = gn_triton._chunk_table(group_b)[1]
    assert gn_triton._chunk_table([flat2[s:s + n] for s, n in cuts])[1] is moved[1]
    assert gn_triton._chunk_table(group_b)[1] is table_b
    assert gn_triton._chunk_table([flat[:0]]) == (None, None, False)
    _, _, aligned = gn_triton._chunk_table([flat[16:48], flat[:16]])
    assert aligned
