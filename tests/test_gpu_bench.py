"""`make gpu-check`'s benchmark cases, run on the CPU at toy sizes with the timing stubbed out.

A GPU session is short and drawn by chance; a case group that fails on its first line there
costs its numbers until the next one. Here every group's code runs once (fp16 instead of bf16:
the Triton interpreter has no bf16 dot; torch.compile replaced by the eager function, since its
compiles would only cost time), and every row a CPU can run must come back with a time.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from benchmarks import common, gpu_bench

# Rows that need a CUDA device whatever the inputs: fastattn's CUDA extension, SDPA's cuDNN and
# memory-efficient kernels (its flash kernel has a CPU implementation).
CUDA_ONLY = ("[cuda]", "sdpa cudnn", "sdpa efficient")
# FlexAttention's CPU path refuses inputs that require grad (forward included) in some torch
# versions (2.14); others (2.9) run it.
CPU_FLEX_FAILURE = "flex_attention FAILED: NotImplementedError"

INF = math.inf
GROUPS = {
    "attention": lambda r: gpu_bench.attention_cases(r, INF, [(16, 32)], tokens=64,
                                                     model_dim=32),
    "decode_attention": lambda r: gpu_bench.decode_cases(r, INF, batch=2, heads=4, kv_heads=2,
                                                         d=32, cache_lens=(48,)),
    "decode_generation": lambda r: gpu_bench.decode_cases(r, INF, batch=2, heads=4, kv_heads=4,
                                                          d=32, cache_lens=(48,)),
    "ffn": lambda r: gpu_bench.ffn_cases(r, INF, tokens=24, swiglu=(32, 48), mlp=(16, 40)),
    "norm": lambda r: gpu_bench.norm_cases(r, tokens=24),
    "cross_entropy": lambda r: gpu_bench._logits_cases(
        r, "cross_entropy", fastattn.cross_entropy, F.cross_entropy, False, 24, 300),
    "linear_cross_entropy": lambda r: gpu_bench.linear_cross_entropy_cases(r, n=24, h=32, v=300),
    "adamw": lambda r: gpu_bench.adam_cases(r, total=5000, n_tensors=6),
    "clip_grad_norm": lambda r: gpu_bench.clip_grad_norm_cases(r, total=5000, n_tensors=6),
    "token_logprobs": lambda r: gpu_bench._logits_cases(
        r, "token_logprobs", fastattn.token_logprobs, gpu_bench._eager_logprobs, True, 24, 300),
    "attention_variants": lambda r: gpu_bench.attention_cases(r, INF, [(16, 32)], tokens=64,
                                                              model_dim=32, variants=True),
    "ffn_variants": lambda r: gpu_bench.ffn_cases(r, INF, tokens=24, variants=True,
                                                  swiglu=(32, 48), mlp=(16, 40)),
    "ffn_gemm": lambda r: gpu_bench.gemm_cases(r, INF, tokens=24, d=32, f=48),
    "optim_compiled": lambda r: (gpu_bench.adam_cases(r, total=5000, n_tensors=6, compiled=True),
                                 gpu_bench.clip_grad_norm_cases(r, total=5000, n_tensors=6,
                                                                compiled=True)),
    "flex_attention": lambda r: gpu_bench.attention_cases(r, INF, [(32, 64)], tokens=128,
                                                          model_dim=64, flex=((32, 64),),
                                                          others=False),
    "attention_sweep": lambda r: gpu_bench.attention_cases(r, INF, [(16, 24), (32, 16)],
                                                           tokens=32, model_dim=32),
}


def test_every_case_group_has_a_toy_run():
    assert set(GROUPS) == set(gpu_bench.CASE_GROUPS)


def _eager_compile(fn=None, **_):
    return fn if fn is not None else (lambda f: f)


def _fake_peak_mb(fn, grads_of=()):
    """peak_mb's stand-in (no torch.cuda memory stats here): runs the step as peak_mb does and
    returns for how many of the tensors it was told the step makes gradients the step made them
    afresh (peak_mb drops them first, so that they count in the peak)."""
    for t in grads_of:
        t.grad = None
    fn()
    return float(sum(t.grad is not None for t in grads_of))


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_bench, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_bench, "DTYPE", torch.float16)
    monkeypatch.setattr(gpu_bench, "bench_ms", lambda fn, rep_ms=400: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_bench, "bench_graph_ms", lambda fns: ([f() for f in fns], 1.0)[1])
    monkeypatch.setattr(gpu_bench, "peak_mb", _fake_peak_mb)    # (torch.cuda memory stats)
    monkeypatch.setattr(gpu_bench, "_held_after_forward_mb",
                        lambda fn, x, params: (fn(x, *params), 0.0)[1])
    monkeypatch.setattr(torch, "compile", _eager_compile)


@pytest.mark.filterwarnings("ignore:fastattn. FASTATTN_TRITON_DQ=atomic")
@pytest.mark.parametrize("group", list(GROUPS))
def test_case_group_runs(on_cpu, group, capsys):
    results = []
    # fastattn's attention rows take the default backend, which is the C++ one on CPU tensors:
    # Triton's here, as on the GPU (the variants set module switches of the Triton kernels).
    with fastattn.use_backend("triton") if "attention" in group else contextlib.nullcontext():
        GROUPS[group](results)
    if group == "ffn_variants":   # the no-TMA rows exist only where the default takes TMA
        assert not results
        return
    if group == "flex_attention" and gpu_bench._flex_fn() is None:
        pytest.skip("this torch has no FlexAttention")
    assert results, f"{group}: no rows"
    failed = [f"{r.case} [{r.impl}]" for r in results
              if r.median_ms != r.median_ms and not any(c in r.impl for c in CUDA_ONLY)
              and r.impl != CPU_FLEX_FAILURE]
    assert not failed, f"{group}: rows failed on the CPU:\n" + "\n".join(failed) + "\n" + \
        capsys.readouterr().err[-4000:]
    if group == "flex_attention":   # each row ran, or got as far as FlexAttention's CPU check
        assert {r.impl for r in results} <= {"flex_attention", CPU_FLEX_FAILURE}, results
        return
    if group == "ffn":    # the activation memory each block keeps for backward, beside its time
        assert all("saved MB" in r.extra for r in results
                   if "fwd+bwd" in r.case and r.median_ms == r.median_ms), results
        # and eager's bound: its GEMMs alone
        bounds = [r.extra.get("bound vs eager") for r in results
                  if "fwd+bwd" in r.case and r.impl == "torch eager"]
        assert len(bounds) == 2 and all(b == 1.0 for b in bounds), results  # (1 ms / 1 ms here)
    # a step that makes gradients has them counted in its peak: peak_mb is told which tensors
    # they belong to (the stub's "peak" is how many of them got one); other steps make none
    for r in results:
        if r.median_ms == r.median_ms and r.peak_mb is not None:
            assert (r.peak_mb > 0) == ("fwd+bwd" in r.case), (r.case, r.impl, r.peak_mb)
    if group.startswith("decode"):   # replayed rows are compared among themselves only
        assert {r.case.endswith("(CUDA graph)") for r in results} == {True, False}, results
        assert not any("graph" in r.impl for r in results), results
    cases = {r.case for r in results}
    timed = {r.case for r in results if r.median_ms == r.median_ms}
    assert cases == timed, f"{group}: cases with no successful row: {sorted(cases - timed)}"
    # every row that ran had its outputs checked against PyTorch's, and they agreed
    ran = [r for r in results if r.median_ms == r.median_ms]
    unchecked = [f"{r.case} [{r.impl}]: {r.extra}" for r in ran
                 if "err" not in r.extra or "check" in r.extra]
    assert not unchecked, f"{group}: rows unchecked or off the reference:\n" + "\n".join(unchecked)


def _scaled_cross_entropy(x, t):    # a wrong kernel: the right shape, the wrong numbers
    return F.cross_entropy(x * 1.1, t)


@pytest.mark.parametrize("wrong", [_scaled_cross_entropy,
                                   lambda x, t: F.cross_entropy(x, t).detach().requires_grad_(),
                                   lambda x, t: F.cross_entropy(x, t) * float("nan")])
def test_a_row_whose_outputs_are_off_is_timed_but_marked_and_gets_no_ratio(on_cpu, wrong):
    from benchmarks.common import ratios, table
    results = []
    gpu_bench._logits_cases(results, "cross_entropy", wrong, F.cross_entropy, False, 24, 300)
    rows = {r.impl: r for r in results if "[cuda]" not in r.impl}
    assert rows["fastattn[triton]"].median_ms == 1.0                   # timed all the same
    assert rows["fastattn[triton]"].extra["check"] == "FAILED"
    assert rows["fastattn[triton]"].extra["err"] > common.TOLERANCE[torch.float16]
    assert "check" not in rows["torch eager"].extra
    assert rows["torch eager"].extra["err"] == 0.0
    speedups = ratios(results)
    assert [results[i].impl for i in speedups] == ["torch eager", "torch.compile"]
    assert "FAILED" in table(results)


def test_relative_errors():
    a = torch.tensor([1.0, -2.0, 4.0])
    assert common.relative_errors([a], [a]) == [0.0]
    assert common.relative_errors([a + 0.4], [a]) == [pytest.approx(0.1)]
    assert common.relative_errors([a, None], [a, None]) == [0.0, 0.0]
    assert common.relative_errors([None], [a]) == [math.inf]
    assert common.relative_errors([a], [a[:2]]) == [math.inf]
    assert common.relative_errors([a * float("nan")], [a]) == [math.inf]
    assert common.relative_errors([a], [a, a]) == [math.inf]
    assert common.relative_errors([torch.ones(2)], [torch.zeros(2)]) == [math.inf]


class _AdamWithoutDecay(torch.optim.AdamW):
    """A wrong optimizer the AdamW check must catch: right moments, no weight decay."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["weight_decay"] = 0.0
        return super().step(closure)


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True)])
def test_the_adamw_check_passes_fastattn_and_catches_a_missing_weight_decay(dtype, master):
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=g) * common.ADAM_CHECK_SCALE for n in (1000, 37)]
    steps = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(3)]
    reference = common.adam_updates(lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
                                    start, steps, dtype, master, reference=True)
    good = common.check(lambda: common.adam_updates(
        lambda ps: fastattn.optim.AdamW(ps, lr=1e-4, master_weights=master), start, steps,
        dtype, master), reference)
    assert "check" not in good and good["err"] < 1e-4, good
    if not master:      # (torch has no master weights to build a wrong one from)
        bad = common.check(lambda: common.adam_updates(
            lambda ps: _AdamWithoutDecay(ps, lr=1e-4), start, steps, dtype, master), reference)
        assert bad["check"] == "FAILED", bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_clip_check_passes_torch_and_fastattn_and_catches_a_clip_that_does_not_scale(dtype):
    def fresh():
        g = torch.Generator().manual_seed(0)
        params = [torch.empty(n, dtype=dtype).requires_grad_() for n in (300, 7, 50, 1, 20)]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 10).to(dtype)
        return params

    def norm_only(ps, max_norm):
        return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in ps]))

    for fn in (fastattn.optim.clip_grad_norm_, torch.nn.utils.clip_grad_norm_, norm_only):
        params = fresh()
        verdict = common.check(lambda: common.clip_check(fn, params, [p.grad for p in params]))
        assert ("check" in verdict) == (fn is norm_only), (fn, verdict)


def test_the_mlp_gemm_bound_issues_the_gemms_of_eagers_backward():
    """The FFN bound (``_mlp_gemms``) computes the products eager's forward and backward compute
    for a GELU MLP, with the activation left out: for a block with no activation they are its
    output and its x and weight gradients. The SwiGLU bound, whose gate and up share dh, has
    eager's shapes."""
    g = torch.Generator().manual_seed(0)
    x, w1, b1, w2, b2 = (torch.randn(*s, generator=g, dtype=torch.float64)
                         for s in ((7, 5), (11, 5), (11,), (5, 11), (5,)))
    dout = torch.randn(7, 5, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, w1, w2)]
    out = F.linear(F.linear(x, w1, b1), w2, b2)
    out.backward(dout)
    with torch.no_grad():
        got = gpu_bench._mlp_gemms(x, w1, b1, w2, b2, dout)
    for a, b in zip(got, (out, *(t.grad for t in leaves))):
        torch.testing.assert_close(a, b)
    wg, wu, wd = (torch.randn(*s, generator=g) for s in ((11, 5), (11, 5), (5, 11)))
    xs, douts = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    out, dx, dwg, dwu, dwd, _ = gpu_bench._swiglu_gemms(xs, wg, wu, wd, douts)
    assert [t.shape for t in (out, dx, dwg, dwu, dwd)] == \
        [xs.shape, xs.shape, wg.shape, wu.shape, wd.shape]
