"""GPU benchmarks for `make gpu-check` (H200 targets in the issues): fastattn against PyTorch
eager and torch.compile, same process, same inputs, CUDA-event timing (triton.testing.do_bench).

Rates: memory-bound ops in GB/s against the device-to-device copy bandwidth measured here
(copy moves 2 x bytes: read + write); cross-entropy counts 3 x logits bytes (read, read,
write the gradient); linear cross-entropy counts 3 matmuls of 2*T*H*V FLOPs (also for
chunk_over="vocab", which does 4: its rate is of the same work as the others').

Every row's outputs and gradients are compared with a PyTorch reference's on the same inputs
once, before its timing (``err``: the greatest absolute difference over each output, relative
to the reference output's greatest magnitude, the worst over the outputs). A row past its
dtype's tolerance is timed all the same but marked ``check FAILED``, gets no speedup ratio and
fails the run: a fast wrong kernel is not a result.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import (ADAM_CHECK_SCALE, Result, adam_updates, check, clip_check,
                               environment, outputs, table, write)


# Where and in which half precision the cases run: an H200 in bf16 for `make gpu-check`; the
# CPU test of this module (tests/test_gpu_bench.py) runs every case at toy sizes on the CPU in
# fp16 (the Triton interpreter has no bf16 dot), so that no case group reaches a GPU session
# untried.
DEVICE = "cuda"
DTYPE = torch.bfloat16


def _dt() -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(DTYPE, str(DTYPE))


def bench_ms(fn, rep_ms=400):
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def bench_graph_ms(fns, calls=20, replays=25):
    """Milliseconds per call replayed from a CUDA graph of ``calls`` back-to-back calls, taking
    the callables of the list ``fns`` in turn (the same call on copies of its inputs, so that a
    call does not find the last one's in L2, as do_bench's flush ensures for the eager rows;
    median over ``replays``): the device's time alone, without the host's per-call cost, which
    is how a decode step runs in a serving loop (and in GPT.generate). Warm-up and capture run on
    a side stream, as graph capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            for fn in fns:
                fn()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            for i in range(calls):
                fns[i % len(fns)]()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def peak_mb(fn, grads_of=()) -> float:
    """MiB: the peak of the bytes allocated during ``fn()`` above those held before it. The
    ``.grad`` of each tensor in ``grads_of`` (those ``fn`` makes afresh: its steps start by
    dropping them) is dropped before the base is taken, so that the gradients the call produces
    count in its peak, as the CPU's profiler counts them (``benchmarks.common.cpu_peak_mb``);
    left in the base, the call's first act of freeing them would hide as much of its peak."""
    for t in grads_of:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _l2_bytes() -> int:
    """The device's L2 cache in bytes (50 MiB on an H100/H200; 64 MiB where torch does not
    say)."""
    if DEVICE == "cuda":
        size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        if size:
            return size
    return 64 << 20


def copy_bandwidth() -> Result:
    src = torch.empty(2**31, dtype=torch.uint8, device=DEVICE)   # 2 GiB, far beyond L2
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return Result("device copy 2 GiB", "torch copy_", ms, 2 * src.numel(), "GB/s")


def _backend_fn(fn, backend):
    def run(*args):
        with fastattn.use_backend(backend):
            return fn(*args)
    return run


def _logits_cases(results, name, fastattn_fn, eager_fn, weighted, n, v):
    """fwd+bwd of a per-token loss over (n, v) bf16 logits, every implementation on the same
    tensors; ``weighted`` sums the per-token outputs with random weights (as DPO/PPO do)."""
    x = (torch.randn(n, v, device=DEVICE) * 2).to(DTYPE).requires_grad_()
    t = torch.randint(0, v, (n,), device=DEVICE)
    w = torch.randn(n, device=DEVICE)
    impls = {
        "fastattn[cuda]": _backend_fn(fastattn_fn, "cuda"),
        "fastattn[triton]": _backend_fn(fastattn_fn, "triton"),
        "torch eager": eager_fn,
        "torch.compile": torch.compile(eager_fn),
    }
    def make_step(fn):
        def step():
            x.grad = None
            out = fn(x, t)
            (out * w).sum().backward() if weighted else out.backward()
            return out
        return step
    reference = outputs(make_step(eager_fn), x)
    for impl, fn in impls.items():
        step = make_step(fn)
        _record(results, f"{name} fwd+bwd {n}x{v} {_dt()}", impl, step,
                3 * x.numel() * x.element_size(), "GB/s",
                extra=check(lambda: outputs(step, x), reference), grads_of=(x,))
    del reference


def _eager_logprobs(x, t):
    return torch.log_softmax(x.float(), -1).gather(-1, t[:, None]).squeeze(-1)


def linear_cross_entropy_cases(results, n=16384, h=4096, v=131072):
    x = (torch.randn(n, h, device=DEVICE)).to(DTYPE).requires_grad_()
    w = (torch.randn(v, h, device=DEVICE) / h ** 0.5).to(DTYPE).requires_grad_()
    t = torch.randint(0, v, (n,), device=DEVICE)
    case = f"linear_cross_entropy fwd+bwd {n}x{h}->{v} {_dt()}"
    eager = lambda x, w, t: F.cross_entropy(F.linear(x, w), t)      # noqa: E731
    impls = {
        "fastattn": fastattn.linear_cross_entropy,
        # two passes over the vocabulary: a fourth GEMM, no float32 (vocab, hidden) buffer
        "fastattn (vocab chunks)": functools.partial(fastattn.linear_cross_entropy,
                                                     chunk_over="vocab"),
        # token chunks of about n*h/v rows (a chunk of logits the size of x: 512 at the
        # default shape) whose d weight adds up in itself, in bf16, as Liger-Kernel does: no
        # float32 (vocab, hidden) buffer, one rounding of d weight per chunk
        "fastattn (bf16 d weight)": functools.partial(
            fastattn.linear_cross_entropy, accum_dtype=None,
            chunk_size=max(1, min(n, -(-n * h // v)))),
        "torch eager": eager,
        "torch.compile": torch.compile(eager),
    }
    def make_step(fn):
        def step():
            x.grad = w.grad = None
            loss = fn(x, w, t)
            loss.backward()
            return loss
        return step
    reference = outputs(make_step(eager), x, w)
    for name, fn in impls.items():
        step = make_step(fn)
        _record(results, case, name, step, 3 * 2 * n * h * v, "TFLOP/s",
                extra=check(lambda: outputs(step, x, w), reference), grads_of=(x, w))
    del reference


def _compiled_adamw(params):
    """torch.optim.AdamW with its step compiled, PyTorch's "compiling the optimizer" recipe: lr
    as a tensor (a new lr is no recompile), the default step inside torch.compile."""
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4))
    opt.step = torch.compile(opt.step)
    return opt


def adam_cases(results, total=1 << 30, n_tensors=200, compiled=False):
    """One AdamW step over ~1B parameters in n_tensors tensors of mixed sizes: fp32 params, and
    bf16 params with fp32 master weights. Bytes per parameter: fp32 28 (param, grad, m, v read;
    param, m, v written); bf16 + master 28 (bf16 grad 2 and master/m/v 12 read: the master is
    read instead of the bf16 param; param 2 + master/m/v 12 written; csrc/cuda/adam.cu). ``compiled``: only torch.compile's fp32 step (its compile
    over 200 tensors takes long, so it runs as a later case group)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    weights = torch.rand(n_tensors, generator=g, device=DEVICE) + 0.1
    sizes = (weights / weights.sum() * total).long().clamp(min=1).tolist()
    numel = sum(sizes)
    policies = ((torch.float32, 28, False),) if compiled else (
        (torch.float32, 28, False), (torch.bfloat16, 28, True))
    for dtype, bytes_per, master in policies:
        params = [torch.randn(n, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
                  for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        case = f"AdamW step {numel / 1e9:.2f}B params {str(dtype).split('.')[-1]}" + (
            " + fp32 master" if master else "")
        impls = {"fastattn": lambda ps: fastattn.optim.AdamW(ps, lr=1e-4, master_weights=master)}
        if compiled:
            impls = {"torch.compile": _compiled_adamw}
        elif not master:  # torch has no master-weight policy to compare with
            impls["torch fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
            impls["torch foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)
        start = [params[i].detach().float() * ADAM_CHECK_SCALE for i in range(min(4, len(params)))]
        steps = [[torch.randn_like(p) for p in start] for _ in range(3)]
        reference = adam_updates(lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
                                  start, steps, dtype, master, reference=True)
        for impl, make in impls.items():
            verdict = check(lambda: adam_updates(make, start, steps, dtype, master), reference)
            opt = make(params)
            _record(results, case, impl, opt.step, bytes_per * numel, "GB/s", extra=verdict)
            del opt
        del params, start, steps, reference


def clip_grad_norm_cases(results, total=1 << 30, n_tensors=200, compiled=False):
    """clip_grad_norm_ (2-norm, clipping) over ~1B fp32 and bf16 grads in n_tensors tensors of
    mixed sizes. Bytes per element: 3 x element size (the norm reads the grad; the scale reads
    and writes it). The grads are reused: after the first call the coefficient is ~1, the
    traffic the same, and the Triton kernels find their chunk table already built (as within a
    training step's norm and scale). ``compiled``: only torch.compile of torch's clip_grad_norm_."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    weights = torch.rand(n_tensors, generator=g, device=DEVICE) + 0.1
    sizes = (weights / weights.sum() * total).long().clamp(min=1).tolist()
    numel = sum(sizes)
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.empty(n, device=DEVICE, dtype=dtype).requires_grad_() for n in sizes]
        for p in params:
            p.grad = torch.randn(p.shape, device=DEVICE, dtype=dtype, generator=g)
        case = f"clip_grad_norm_ {numel / 1e9:.2f}B {str(dtype).split('.')[-1]} grads"
        impls = {
            "fastattn[cuda]": _backend_fn(fastattn.optim.clip_grad_norm_, "cuda"),
            "fastattn[triton]": _backend_fn(fastattn.optim.clip_grad_norm_, "triton"),
            "torch foreach": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
        }
        if compiled:
            impls = {"torch.compile": torch.compile(torch.nn.utils.clip_grad_norm_)}
        grads = [p.grad for p in params]
        for impl, fn in impls.items():
            # the row's first call is its check: the norm of gradients 100x those the last
            # row's calls left (of norm ~1), clipped back to 1 (a coefficient of ~0.01 to check)
            torch._foreach_mul_(grads, 100.0)
            verdict = check(lambda: clip_check(fn, params, grads))
            _record(results, case, impl, lambda: fn(params, 1.0),
                    3 * torch.tensor([], dtype=dtype).element_size() * numel, "GB/s",
                    extra=verdict)
        del params, grads


def _sdpa_backend_fn(backend_name):
    """F.scaled_dot_product_attention restricted to one of its kernels (None if unknown)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _flex_fn():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    import torch._dynamo

    # One compiled graph per shape, causality and grad mode: raise dynamo's recompile limit so
    # that none of them falls back to the unfused eager path (which holds the S x S scores).
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v, causal):
        if not causal:
            return compiled(q, k, v)
        key = (q.shape[2], k.shape[2])
        if key not in masks:
            masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, *key,
                                           device=q.device)
        return compiled(q, k, v, block_mask=masks[key])
    return run


def attention_cases(results, deadline, shapes, tokens=16384, model_dim=2048, flex=(),
                    others=True, variants=False):
    """Training attention, bf16, batch x seq = tokens, heads = model_dim / head_dim (the shapes
    of FlashAttention's own benchmark). FLOPs: forward 4*B*H*S*S*D, halved when causal;
    backward 2.5 x forward (5 products instead of 2); the backward time is fwd+bwd - fwd.
    ``shapes`` lists (head dim, seq len), each run causal and not; FlexAttention only at the
    shapes in ``flex`` (each shape and grad mode is a fresh compile, ~20 s); ``others=False``
    times FlexAttention alone (the fastattn and SDPA rows of those shapes come from an earlier
    call, so that its compiles do not hold up the other ops); ``variants=True`` times fastattn's
    alternative kernels (see below) and its default beside them."""
    from fastattn.ops.attention import triton as fa_triton

    impls = {}
    # Module settings of fastattn's Triton attention per row (none: the defaults); the variants
    # are the pointer-load kernels where the default takes the TMA path (its backward): "no
    # TMA", FASTATTN_TRITON_TMA=0; the TMA path in the forward as well: "TMA forward",
    # FASTATTN_TRITON_TMA=1; and dQ by atomics in the dK/dV kernel (FASTATTN_TRITON_DQ=atomic).
    settings = {}
    fastattn_fn = _backend_fn(lambda q, k, v, causal: (
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)), "triton")
    if variants:
        # the default again, next to its variants (at a shape the main group may not time, and
        # timed moments before them)
        impls["fastattn[triton]"] = fastattn_fn
        if fa_triton.TMA.enabled(torch.empty(1, device=DEVICE)):
            impls["fastattn[triton, no TMA]"] = fastattn_fn
            settings["fastattn[triton, no TMA]"] = [(fa_triton.TMA, "mode", "0")]
            impls["fastattn[triton, TMA forward]"] = fastattn_fn
            # (a failed build of the forward's TMA variant turns the path off for the
            # process: the row's end puts the flag back for the backward of the later rows)
            settings["fastattn[triton, TMA forward]"] = [(fa_triton.TMA, "mode", "1"),
                                                          (fa_triton.TMA, "failed", False)]
        impls["fastattn[triton, atomic dQ]"] = fastattn_fn
        settings["fastattn[triton, atomic dQ]"] = [(fa_triton, "DQ_MODE", "atomic")]
    elif others:
        impls["fastattn[triton]"] = fastattn_fn
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            fn = _sdpa_backend_fn(name)
            if fn is not None:
                impls[f"sdpa {name.split('_')[0].lower()}"] = fn
    if flex and (flex_fn := _flex_fn()) is not None:
        impls["flex_attention"] = flex_fn
    if not impls:
        print("gpu_bench: no attention implementation to time (FlexAttention unavailable?)")
        return
    for d, s in shapes:
        for causal in (False, True):
            if time.time() > deadline:
                print(f"gpu_bench: skipped attention d={d} s={s} causal={causal} (budget)")
                continue
            b, h = max(1, tokens // s), model_dim // d
            q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=DTYPE)
                       .requires_grad_() for _ in range(3))
            dout = torch.randn_like(q)
            fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
            case = f"attention d={d} s={s}{' causal' if causal else ''} {_dt()}"

            def make_fwd_bwd(fn):
                def fwd_bwd():
                    q.grad = k.grad = v.grad = None
                    out = fn(q, k, v, causal)
                    out.backward(dout)
                    return out
                return fwd_bwd
            # the reference: SDPA with the kernel torch picks (on an H200 in bf16, its flash)
            reference = outputs(make_fwd_bwd(lambda q, k, v, causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal)), q, k, v)
            for impl, fn in impls.items():
                if impl == "flex_attention" and (d, s) not in flex:
                    continue
                def fwd():
                    with torch.no_grad():
                        return fn(q, k, v, causal)

                fwd_bwd = make_fwd_bwd(fn)
                n = len(results)
                changes = settings.get(impl, [])
                saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
                for obj, name, value in changes:
                    setattr(obj, name, value)
                try:
                    # the forward without grad (its own path) against the reference's output;
                    # forward+backward (and the backward row) against output and gradients
                    _record(results, f"{case} fwd", impl, fwd, fwd_flops, "TFLOP/s",
                            extra=check(lambda: outputs(fwd), reference[:1]))
                    verdict = check(lambda: outputs(fwd_bwd, q, k, v), reference)
                    _record(results, f"{case} fwd+bwd", impl, fwd_bwd, 3.5 * fwd_flops,
                            "TFLOP/s", extra=verdict, grads_of=(q, k, v))
                finally:
                    for obj, name, value in saved:
                        setattr(obj, name, value)
                if len(results) == n + 2 and all(r.median_ms == r.median_ms for r in results[-2:]):
                    bwd_ms = results[-1].median_ms - results[-2].median_ms
                    results.append(Result(f"{case} bwd", impl, bwd_ms, 2.5 * fwd_flops,
                                          "TFLOP/s", extra=_difference_check(results[-2:])))
            del q, k, v, dout, reference


def decode_cases(results, deadline, batch=8, heads=32, kv_heads=8, d=128,
                 cache_lens=(8192, 32768)):
    """One decode step (Sq = 1) against a bf16 KV cache, every sequence at the same length L so
    SDPA can run the same problem. GB/s counts the K and V cache bytes read:
    2 * B * Hkv * L * D * 2 (the queries and outputs are negligible)."""
    for length in cache_lens:
        if time.time() > deadline:
            print(f"gpu_bench: skipped decode L={length} (budget)")
            continue
        q = torch.randn(batch, heads, 1, d, device=DEVICE, dtype=DTYPE)
        kc, vc = (torch.randn(batch, kv_heads, length, d, device=DEVICE, dtype=DTYPE)
                  for _ in range(2))
        lens = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
        work = 2 * batch * kv_heads * length * d * 2
        case = f"decode B={batch} H={heads}/{kv_heads} L={length} d={d} {_dt()}"
        rep = heads // kv_heads
        impls = {   # each a function of (q, k cache, v cache)
            "fastattn[cuda]": _backend_fn(
                lambda q, kc, vc: fastattn.decode_attention(q, kc, vc, lens), "cuda"),
            "fastattn[triton]": _backend_fn(
                lambda q, kc, vc: fastattn.decode_attention(q, kc, vc, lens), "triton"),
            "sdpa (repeat kv)": lambda q, kc, vc: F.scaled_dot_product_attention(
                q, kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1)),
        }
        try:  # torch >= 2.5 reads the cache without repeating it
            F.scaled_dot_product_attention(q[:1], kc[:1, :, :16], vc[:1, :, :16], enable_gqa=True)
            impls["sdpa enable_gqa"] = lambda q, kc, vc: F.scaled_dot_product_attention(
                q, kc, vc, enable_gqa=True)
        except TypeError:
            pass
        reference = outputs(functools.partial(impls["sdpa (repeat kv)"], q, kc, vc))
        verdicts = {impl: check(lambda: outputs(functools.partial(fn, q, kc, vc)), reference)
                    for impl, fn in impls.items()}
        for impl, fn in impls.items():
            _record(results, case, impl, functools.partial(fn, q, kc, vc), work, "GB/s",
                    extra=verdicts[impl])
        # The same calls replayed from a CUDA graph: the kernels' own bandwidth. At these sizes
        # a call's host time (Python, argument checks, launches) can exceed the kernel's. A case
        # of their own: the eager rows' speedups are against an eager baseline, these against a
        # replayed one (``_baselines`` takes the case's fastest PyTorch row). A cache smaller
        # than ~4x L2 is replayed from copies, taken in turn, so that every call reads HBM.
        caches = [(kc, vc)] + [(kc.clone(), vc.clone())
                               for _ in range(min(19, -(-4 * _l2_bytes() // work) - 1))]
        for impl, fn in impls.items():
            _record(results, f"{case} (CUDA graph)", impl, functools.partial(fn, q, kc, vc), work,
                    "GB/s", graph=[functools.partial(fn, q, k, v) for k, v in caches],
                    extra=verdicts[impl])
        del q, kc, vc, reference, caches


def norm_cases(results, tokens=16384):
    """A pre-norm block's seam under autocast: s = x + branch (x the fp32 residual stream, branch
    a bf16 matmul output), y = norm(s) in bf16 for the next matmul, forward and backward with
    gradients into y and s. GPT-2's rows (LayerNorm, 768) and Llama's (RMSNorm, 4096). Bytes
    per element, whoever runs it: forward reads branch (2) and x (4), writes s (4) and y (2);
    backward reads dy (2), ds (4) and s (4), writes d x (4) and d branch (2): 28."""
    for kind, d in (("LayerNorm", 768), ("RMSNorm", 4096)):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.randn(tokens, d, device=DEVICE, generator=g).requires_grad_()
        branch = torch.randn(tokens, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
        w = (torch.rand(d, device=DEVICE, generator=g) + 0.5).requires_grad_()
        b = torch.randn(d, device=DEVICE, generator=g).requires_grad_()
        dy = torch.randn(tokens, d, device=DEVICE, generator=g).to(DTYPE)
        ds = torch.randn(tokens, d, device=DEVICE, generator=g)
        rms = kind == "RMSNorm"

        def eager(x, branch, w, b, rms=rms, d=d):   # what autocast runs: the norm in fp32,
            s = x + branch                           # then the next matmul's cast
            y = F.rms_norm(s, (d,), w, 1e-5) if rms else F.layer_norm(s, (d,), w, b)
            return y.to(DTYPE), s

        def ours(x, branch, w, b, rms=rms, d=d):
            if rms:
                return fastattn.rms_norm(branch, d, w, 1e-5, residual=x, out_dtype=DTYPE)
            return fastattn.layer_norm(branch, d, w, b, residual=x, out_dtype=DTYPE)

        impls = {"fastattn": ours, "torch eager": eager, "torch.compile": torch.compile(eager)}

        def make_step(fn):
            def step():
                for t in (x, branch, w, b):
                    t.grad = None
                out = fn(x, branch, w, b)
                torch.autograd.backward(out, (dy, ds))
                return out
            return step
        reference = outputs(make_step(eager), x, branch, w, b)
        for impl, fn in impls.items():
            step = make_step(fn)
            _record(results, f"add + {kind} fwd+bwd {tokens}x{d} {_dt()} (fp32 stream)", impl,
                    step, 28 * tokens * d, "GB/s",
                    extra=check(lambda: outputs(step, x, branch, w, b), reference),
                    grads_of=(x, branch, w) if rms else (x, branch, w, b))
        del reference


def ffn_cases(results, deadline, tokens=16384, variants=False, swiglu=(4096, 11008),
              mlp=(1024, 4096)):
    """SwiGLU 4096 -> 11008 and GELU MLP 1024 -> 4096 (dim, hidden), bf16. FLOPs: 2*T*D*F per matmul; an MLP
    has 2 matmuls forward and 4 backward, SwiGLU 3 and 6. Backward time = fwd+bwd - fwd.
    ``variants=True`` times only the Triton kernels with pointer loads where their default is
    the TMA path (FASTATTN_TRITON_TMA=0), for rows next to the default's."""
    from fastattn.ops.ffn import triton as ffn_triton

    if variants and not ffn_triton.TMA.enabled(torch.empty(1, device=DEVICE)):
        print("gpu_bench: FFN variants: the default is not the TMA path here; nothing to compare")
        return
    def eager_swiglu(x, wg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def eager_mlp(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    blocks = [
        ("SwiGLU", *swiglu, 3, eager_swiglu, fastattn.swiglu, False, _swiglu_gemms),
        ("gelu MLP", *mlp, 2, eager_mlp,
         lambda x, w1, b1, w2, b2: fastattn.mlp(x, w1, b1, w2, b2), True, _mlp_gemms),
    ]
    for label, d, f, n_mm, eager, ours, bias, gemms in blocks:
        if time.time() > deadline:
            print(f"gpu_bench: skipped {label} (budget)")
            continue
        g = torch.Generator(device=DEVICE).manual_seed(0)

        def w(*shape, fan_in):
            return (torch.randn(*shape, device=DEVICE, generator=g) * fan_in ** -0.5).to(
                DTYPE).requires_grad_()
        x = torch.randn(tokens, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
        if bias:
            params = [w(f, d, fan_in=d), w(f, fan_in=1e4), w(d, f, fan_in=f), w(d, fan_in=1e4)]
        else:
            params = [w(f, d, fan_in=d), w(f, d, fan_in=d), w(d, f, fan_in=f)]
        dout = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE)
        fwd_flops = n_mm * 2 * tokens * d * f
        case = f"{label} {tokens}x{d}->{f} {_dt()}"
        if variants:
            impls = {"fastattn[triton, no TMA]": _backend_fn(ours, "triton")}
        else:
            impls = {"fastattn[cuda]": _backend_fn(ours, "cuda"),
                     "fastattn[triton]": _backend_fn(ours, "triton"),
                     "torch eager": eager, "torch.compile": torch.compile(eager)}
        saved_mode = ffn_triton.TMA.mode

        def make_fwd_bwd(fn):
            def fwd_bwd():
                for p in (x, *params):
                    p.grad = None
                out = fn(x, *params)
                out.backward(dout)
                return out
            return fwd_bwd
        reference = outputs(make_fwd_bwd(eager), x, *params)
        for impl, fn in impls.items():
            def fwd():
                with torch.no_grad():
                    return fn(x, *params)

            fwd_bwd = make_fwd_bwd(fn)
            n = len(results)
            ffn_triton.TMA.mode = "0" if variants else saved_mode
            try:
                # the forward without grad (its own path) against the reference's output;
                # forward+backward (and the backward row) against output and every gradient
                _record(results, f"{case} fwd", impl, fwd, fwd_flops, "TFLOP/s",
                        extra=check(lambda: outputs(fwd), reference[:1]))
                verdict = check(lambda: outputs(fwd_bwd, x, *params), reference)
                _record(results, f"{case} fwd+bwd", impl, fwd_bwd, 3 * fwd_flops, "TFLOP/s",
                        extra=verdict, grads_of=(x, *params))
            finally:
                ffn_triton.TMA.mode = saved_mode
            if len(results) == n + 2 and results[-1].median_ms == results[-1].median_ms:
                # the memory target: the activations kept for backward
                try:
                    results[-1].extra["saved MB"] = round(_held_after_forward_mb(fn, x, params), 1)
                except Exception:  # the row's time stands without it
                    traceback.print_exc()
            if len(results) == n + 2 and all(r.median_ms == r.median_ms for r in results[-2:]):
                results.append(Result(f"{case} bwd", impl,
                                      results[-1].median_ms - results[-2].median_ms,
                                      2 * fwd_flops, "TFLOP/s",
                                      extra=_difference_check(results[-2:])))
        eager_row = [r for r in results
                     if r.case == f"{case} fwd+bwd" and r.impl == "torch eager"]
        if eager_row and eager_row[0].median_ms == eager_row[0].median_ms:
            try:
                with torch.no_grad():
                    ms = bench_ms(lambda: gemms(x, *params, dout))
                eager_row[0].extra["GEMMs alone ms"] = round(ms, 3)
                eager_row[0].extra["bound vs eager"] = round(eager_row[0].median_ms / ms, 3)
                print(f"result: {case}: its GEMMs alone {ms:.3f} ms: a cuBLAS-GEMM FFN can be "
                      f"at most {eager_row[0].median_ms / ms:.3f}x eager", flush=True)
            except Exception:  # the rows stand without it
                traceback.print_exc()
        del x, params, dout, reference


# The bound of any FFN built on cuBLAS's GEMMs (eager's, fastattn's CUDA path): the block's
# matmuls alone, as eager's forward and autograd issue them (torch.mm / addmm, the weight
# gradient as dY^T X), with the activation and its derivative left out (h stands in for
# act(h), dh for both d gate and d up) and no bias gradients. eager / this is the most any
# path that keeps cuBLAS's GEMMs can gain over eager at the shape; its time goes into the eager
# fwd+bwd row's notes ("GEMMs alone ms", "bound vs eager"), not a row of its own (it
# computes no FFN, so it has no reference to be checked against).
def _swiglu_gemms(x, wg, wu, wd, dout):
    g, u = x @ wg.t(), x @ wu.t()
    out = g @ wd.t()
    dwd, dh = dout.t() @ g, dout @ wd
    dwg, dwu = dh.t() @ x, dh.t() @ x
    dx = torch.addmm(dh @ wg, dh, wu)
    return out, dx, dwg, dwu, dwd, u


def _mlp_gemms(x, w1, b1, w2, b2, dout):
    h = torch.addmm(b1, x, w1.t())
    out = torch.addmm(b2, h, w2.t())
    dw2, dh = dout.t() @ h, dout @ w2
    return out, dh @ w1, dh.t() @ x, dw2


def _difference_check(rows) -> dict:
    """The check entries of a row timed as the difference of ``rows`` (fwd, fwd+bwd): the
    forward+backward row's error, failed if either row failed."""
    extra = {k: v for k, v in rows[-1].extra.items() if k in ("err", "check")}
    for r in rows:
        if "check" in r.extra:
            extra["check"] = r.extra["check"]
    return extra


def _held_after_forward_mb(fn, x, params) -> float:
    """MB of device memory a forward leaves allocated for its backward (the saved activations),
    its output excluded: memory_allocated after minus before. Unlike saved_tensors_hooks it also
    sees what a torch.compile graph keeps. Call after a warm-up (no autotuning, no workspace
    allocated for the first time)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn(x, *params)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    del out
    return held / 2**20


def gemm_cases(results, deadline, tokens=16384, d=4096, f=11008):
    """The three GEMMs of an FFN layer (SwiGLU's 4096 -> 11008, bf16) on their own: forward
    x W^T, data gradient dH W, weight gradient dH^T x (operands as the backward passes them,
    transposed views included). fastattn's Triton matmul, with and without its TMA loads,
    against cuBLAS (torch.matmul): the issue asks the Triton matmul to match cuBLAS."""
    from fastattn.ops.ffn import triton as ffn_triton

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, d, device=DEVICE, generator=g).to(DTYPE)
    w = (torch.randn(f, d, device=DEVICE, generator=g) * d ** -0.5).to(DTYPE)
    dh = torch.randn(tokens, f, device=DEVICE, generator=g).to(DTYPE)
    shapes = {  # name: (a, b_t) with c = a @ b_t^T
        f"gemm fwd {tokens}x{d}->{f}": (x, w),
        f"gemm dgrad {tokens}x{f}->{d}": (dh, w.t()),
        f"gemm wgrad {f}x{tokens}->{d}": (dh.t(), x.t()),
    }
    impls = {"fastattn[triton]": ffn_triton.TMA.mode, "cuBLAS": None}
    if ffn_triton.TMA.enabled(x):
        impls["fastattn[triton, no TMA]"] = "0"
    saved_mode = ffn_triton.TMA.mode
    for case, (a, b_t) in shapes.items():
        if time.time() > deadline:
            print(f"gpu_bench: skipped {case} (budget)")
            continue
        flops = 2 * a.shape[0] * a.shape[1] * b_t.shape[0]
        reference = [torch.matmul(a, b_t.t())]
        for impl, mode in impls.items():
            if mode is None:
                step = lambda: torch.matmul(a, b_t.t())  # noqa: E731
            else:
                step = lambda: ffn_triton.matmul(a, b_t)  # noqa: E731
            ffn_triton.TMA.mode = saved_mode if mode is None else mode
            try:
                _record(results, f"{case} {_dt()}", impl, step, flops, "TFLOP/s",
                        extra=check(lambda: outputs(step), reference))
            finally:
                ffn_triton.TMA.mode = saved_mode
        del reference
    del x, w, dh


def _record(results, case, impl, step, work, unit, graph=None, extra=None, grads_of=()):
    """Times ``step`` (``graph``: replayed from a CUDA graph instead, ``bench_graph_ms`` of these
    callables, ``step`` on copies of its inputs) and appends
    its row, with ``extra`` (its output check, see ``check``) in its notes, and its peak memory
    (``peak_mb``: ``grads_of`` lists the tensors whose gradients the step makes); a failure is a
    row of NaN with the exception's name, and the run goes on."""
    try:
        step()                                   # compile / autotune outside the timing
        ms = bench_graph_ms(graph) if graph else bench_ms(step)
        mem = peak_mb(step, grads_of)
        results.append(Result(case, impl, ms, work, unit, mem, dict(extra or {})))
        r = results[-1]
        verdict = "".join(f", {k} {v:.2g}" if isinstance(v, float) else f", {k} {v}"
                          for k, v in r.extra.items())
        print(f"result: {case} [{impl}]: {ms:.3f} ms, {r.rate:.1f} {unit}, peak {mem:.0f} MiB"
              f"{verdict}", flush=True)  # as it comes: a run cut off by its time limit says this
    except Exception as exc:  # report and go on: one failing impl must not hide the others
        traceback.print_exc()
        results.append(Result(case, f"{impl} FAILED: {type(exc).__name__}", float("nan")))
    finally:
        torch.cuda.empty_cache()


CASE_GROUPS = ("attention", "decode_attention", "decode_generation", "cross_entropy",
               "linear_cross_entropy", "adamw", "clip_grad_norm", "token_logprobs", "ffn", "norm",
               "attention_variants", "ffn_variants", "ffn_gemm", "optim_compiled", "flex_attention",
               "attention_sweep")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu"))
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new case after this many seconds (the rest is reported "
                             "as skipped)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case groups to run (default: all), e.g. attention,ffn")
    args = parser.parse_args()
    known = CASE_GROUPS
    wanted = {c.strip() for c in args.cases.split(",") if c.strip()} if args.cases else set(known)
    if unknown := wanted - set(known):
        parser.error(f"--cases: unknown {sorted(unknown)}; known: {', '.join(known)}")
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    if not (triton_status := fastattn.backends()["triton"]):
        # the rows that take fastattn's default backend (norm, AdamW, linear cross-entropy)
        # would time the pure-PyTorch reference under fastattn's name
        print(f"gpu_bench: fastattn's Triton backend is unavailable ({triton_status.reason})",
              file=sys.stderr)
        return 2
    t0 = time.time()
    scale = 8 if args.quick else 1
    copy = copy_bandwidth()
    results: list[Result] = [copy]
    deadline = t0 + args.budget_s
    failed: list[str] = []
    cases = [  # most important first: a run cut short by the budget still answers the issues
        ("attention", lambda: attention_cases(results, deadline, [(128, 4096)],
                                              tokens=16384 // scale)),
        ("decode_attention", lambda: decode_cases(results, deadline)),
        # gpt2-124m's generation in GRPO (8 prompts x 8 samples, 12 heads, d 64, 128 + 128
        # positions), eager and from a CUDA graph: which kernel a captured decode step (as
        # generate() runs it) should take, where the host's cost per call does not count
        ("decode_generation", lambda: decode_cases(results, deadline, batch=64, heads=12,
                                                   kv_heads=12, d=64, cache_lens=(256,))),
        ("cross_entropy", lambda: _logits_cases(results, "cross_entropy", fastattn.cross_entropy,
                                                F.cross_entropy, False, 16384 // scale, 131072)),
        ("linear_cross_entropy", lambda: linear_cross_entropy_cases(results, n=16384 // scale)),
        ("adamw", lambda: adam_cases(results, total=(1 << 30) // scale)),
        ("clip_grad_norm", lambda: clip_grad_norm_cases(results, total=(1 << 30) // scale)),
        ("token_logprobs", lambda: _logits_cases(results, "token_logprobs",
                                                 fastattn.token_logprobs, _eager_logprobs, True,
                                                 16384 // scale, 131072)),
        # the FFN after the memory-bound ops: its torch.compile rows take long to compile, and
        # on 2026-11-29 it used the last of a budget the build had shortened, so that no
        # cross-entropy, AdamW or clipping number came back
        ("ffn", lambda: ffn_cases(results, deadline, tokens=16384 // scale)),
        ("norm", lambda: norm_cases(results, tokens=16384 // scale)),
        # fastattn's alternative attention kernels at the headline shape, beside its default,
        # and at gpt2-124m's head dim and length (the TMA-forward choice was measured at 128 only)
        ("attention_variants", lambda: attention_cases(results, deadline, [(128, 4096), (64, 1024)],
                                                       tokens=16384 // scale, variants=True)),
        ("ffn_variants", lambda: ffn_cases(results, deadline, tokens=16384 // scale, variants=True)),
        ("ffn_gemm", lambda: gemm_cases(results, deadline, tokens=16384 // scale)),
        # torch.compile of torch's AdamW step and clip_grad_norm_ (long compiles over 200 tensors)
        ("optim_compiled", lambda: (adam_cases(results, total=(1 << 30) // scale, compiled=True),
                                    clip_grad_norm_cases(results, total=(1 << 30) // scale,
                                                         compiled=True))),
        # FlexAttention at the headline shape (its compiles take ~40 s), then the rest of the
        # attention sweep (head dims 64 and 128, sequence 1k to 16k) last: the headline case of
        # every op first, so that a short run still answers every issue
        ("flex_attention", lambda: attention_cases(results, deadline, [(128, 4096)],
                                                   tokens=16384 // scale, flex=((128, 4096),),
                                                   others=False)),
        ("attention_sweep", lambda: attention_cases(
            results, deadline, [(128, 16384), (128, 1024), (64, 4096), (64, 16384), (64, 1024)]
            if not args.quick else [(128, 1024), (64, 1024)], tokens=16384 // scale)),
    ]
    assert [name for name, _ in cases] == list(known), "keep `known` in step with `cases`"
    cases = [(name, run) for name, run in cases if name in wanted]
    for name, run in cases:
        if time.time() - t0 > args.budget_s:
            print(f"gpu_bench: skipped {name} (time budget of {args.budget_s:.0f} s spent)")
            continue
        try:
            run()
        except Exception:  # one broken kernel must not cost the numbers of all the others
            print(f"gpu_bench: {name} failed:", file=sys.stderr)
            traceback.print_exc()
            failed.append(name)
    env = environment()
    # The Hopper (TMA) paths of the Triton kernels' default rows: "on", "off" (not this GPU,
    # triton or FASTATTN_TRITON_TMA), or "failed" when a TMA build failed during the run and
    # later rows fell back to pointer loads (see the warnings above); the attention forward
    # takes it only when forced (FASTATTN_TRITON_TMA=1).
    try:
        from fastattn.ops.attention import triton as fa_triton
        from fastattn.ops.ffn import triton as ffn_triton
        probe = torch.empty(1, device=DEVICE)

        def tma_state(mod, auto=True):
            return "failed" if mod.TMA.failed else "on" if mod.TMA.enabled(probe, auto) else "off"

        env["triton_tma"] = {
            "attention backward": tma_state(fa_triton),
            "attention forward": tma_state(fa_triton, fa_triton._FORWARD_TMA_IN_AUTO),
            "ffn": tma_state(ffn_triton),
        }
    except Exception as error:  # the results must be written whatever this says
        env["triton_tma"] = f"unknown ({type(error).__name__})"
    env["copy_GBps"] = round(copy.rate, 1)
    env["seconds"] = round(time.time() - t0, 1)
    env["failed_cases"] = failed
    wrong = [f"{r.case} [{r.impl}]" for r in results if "check" in r.extra]
    env["failed_checks"] = wrong
    for r in results:       # (before the CSV is written, so that it holds them too)
        if r.unit == "GB/s" and r is not copy and r.work:
            r.extra["of_copy"] = r.rate / copy.rate
    args.out.mkdir(parents=True, exist_ok=True)
    write(results, "gpu_results", out_dir=args.out)
    (args.out / "gpu_env.json").write_text(json.dumps(env, indent=2))
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    print(table(results))
    for r in results:
        if "of_copy" in r.extra:
            print(f"  {r.case} [{r.impl}]: {100 * r.extra['of_copy']:.0f}% of copy bandwidth")
    if failed:
        print(f"gpu_bench: failed cases: {', '.join(failed)}")
    if wrong:
        print("gpu_bench: outputs off the reference (timed, no ratio): " + "; ".join(wrong))
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
