"""GPU benchmarks for `make gpu-check` (H200 targets in the issues): fastattn against PyTorch
eager and torch.compile, same process, same inputs, CUDA-event timing (triton.testing.do_bench).

Rates: memory-bound ops in GB/s against the device-to-device copy bandwidth measured here
(copy moves 2 x bytes: read + write); cross-entropy counts 3 x logits bytes (read, read,
write the gradient); linear cross-entropy counts 3 matmuls of 2*T*H*V FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import Result, environment, table, write


def bench_ms(fn, rep_ms=400):
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth() -> Result:
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")   # 2 GiB, far beyond L2
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
    x = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    w = torch.randn(n, device="cuda")
    impls = {
        "fastattn[cuda]": _backend_fn(fastattn_fn, "cuda"),
        "fastattn[triton]": _backend_fn(fastattn_fn, "triton"),
        "torch eager": eager_fn,
        "torch.compile": torch.compile(eager_fn),
    }
    for impl, fn in impls.items():
        def step():
            x.grad = None
            out = fn(x, t)
            (out * w).sum().backward() if weighted else out.backward()
        _record(results, f"{name} fwd+bwd {n}x{v} bf16", impl, step,
                3 * x.numel() * x.element_size(), "GB/s")


def _eager_logprobs(x, t):
    return torch.log_softmax(x.float(), -1).gather(-1, t[:, None]).squeeze(-1)


def linear_cross_entropy_cases(results, n=16384, h=4096, v=131072):
    x = (torch.randn(n, h, device="cuda")).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda") / h ** 0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    case = f"linear_cross_entropy fwd+bwd {n}x{h}->{v} bf16"
    eager = lambda x, w, t: F.cross_entropy(F.linear(x, w), t)      # noqa: E731
    impls = {
        "fastattn": fastattn.linear_cross_entropy,
        "torch eager": eager,
        "torch.compile": torch.compile(eager),
    }
    for name, fn in impls.items():
        def step():
            x.grad = w.grad = None
            fn(x, w, t).backward()
        _record(results, case, name, step, 3 * 2 * n * h * v, "TFLOP/s")


def adam_cases(results, total=1 << 30, n_tensors=200):
    """One AdamW step over ~1B parameters in n_tensors tensors of mixed sizes: fp32 params, and
    bf16 params with fp32 master weights. Bytes per parameter: fp32 28 (param, grad, m, v read;
    param, m, v written); bf16 + master 32 (bf16 param and grad 2+2 read, master/m/v 12 read,
    param 2 + master/m/v 12 written)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.rand(n_tensors, generator=g, device="cuda") + 0.1
    sizes = (weights / weights.sum() * total).long().clamp(min=1).tolist()
    numel = sum(sizes)
    for dtype, bytes_per, master in ((torch.float32, 28, False), (torch.bfloat16, 32, True)):
        params = [torch.randn(n, device="cuda", dtype=dtype, generator=g).requires_grad_()
                  for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        case = f"AdamW step {numel / 1e9:.2f}B params {str(dtype).split('.')[-1]}" + (
            " + fp32 master" if master else "")
        impls = {"fastattn": lambda ps: fastattn.optim.AdamW(ps, lr=1e-4, master_weights=master)}
        if not master:  # torch has no master-weight policy to compare with
            impls["torch fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
            impls["torch foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)
        for impl, make in impls.items():
            opt = make(params)
            _record(results, case, impl, opt.step, bytes_per * numel, "GB/s")
            del opt
        del params


def _record(results, case, impl, step, work, unit):
    try:
        step()                                   # compile / autotune outside the timing
        ms = bench_ms(step)
        mem = peak_mb(step)
        results.append(Result(case, impl, ms, work, unit, mem))
    except Exception as exc:  # report and go on: one failing impl must not hide the others
        traceback.print_exc()
        results.append(Result(case, f"{impl} FAILED: {type(exc).__name__}", float("nan")))
    finally:
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu"))
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new case after this many seconds (the rest is reported "
                             "as skipped)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    scale = 8 if args.quick else 1
    copy = copy_bandwidth()
    results: list[Result] = [copy]
    cases = [  # most important first: a run cut short by the budget still answers the issues
        ("cross_entropy", lambda: _logits_cases(results, "cross_entropy", fastattn.cross_entropy,
                                                F.cross_entropy, False, 16384 // scale, 131072)),
        ("linear_cross_entropy", lambda: linear_cross_entropy_cases(results, n=16384 // scale)),
        ("adamw", lambda: adam_cases(results, total=(1 << 30) // scale)),
        ("token_logprobs", lambda: _logits_cases(results, "token_logprobs",
                                                 fastattn.token_logprobs, _eager_logprobs, True,
                                                 16384 // scale, 131072)),
    ]
    for name, run in cases:
        if time.time() - t0 > args.budget_s:
            print(f"gpu_bench: skipped {name} (time budget of {args.budget_s:.0f} s spent)")
            continue
        run()
    env = environment()
    env["copy_GBps"] = round(copy.rate, 1)
    env["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write(results, "gpu_results", out_dir=args.out)
    (args.out / "gpu_env.json").write_text(json.dumps(env, indent=2))
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    for r in results:
        if r.unit == "GB/s" and r is not copy and r.work:
            r.extra["of_copy"] = r.rate / copy.rate
    print(table(results))
    for r in results:
        if "of_copy" in r.extra:
            print(f"  {r.case} [{r.impl}]: {100 * r.extra['of_copy']:.0f}% of copy bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
