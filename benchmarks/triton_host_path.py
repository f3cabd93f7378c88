"""Host time of fastattn's Triton attention launches, measured on a machine without a GPU.

    python -m benchmarks.triton_host_path [--calls 2000] [--rounds 5]

A GPU training step whose kernels are short waits for the host (gpt2-124m on an H200,
2026-11-30: 50 ms of kernels in a 56 ms step), and every Triton launch pays Python on the way:
fastattn's wrapper (strides, grid, TMA descriptors), the autotuner's lookup, and Triton's
``JITFunction.run`` (binding the ~55 arguments, the specialisation key, the launch arguments).
This times that path for the attention forward and backward at gpt2-124m's shape (bf16, B 16,
H 12, S 1024, D 64, causal, pointer loads) with a stand-in driver and a stand-in compiled kernel
placed in the JIT's cache, so nothing is compiled or launched: what is left out is Triton's C
launcher and the CUDA driver. It reports the path as fastattn runs it (``CachedAutotune``), the
same through ``triton.autotune``'s own ``Autotuner.run``, and the share of ``JITFunction.run``.
Needs triton >= 3.4 (``triton.knobs``); run it in a process of its own (it replaces the driver).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)     # the compiled path's launch code, not the interpreter
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")   # one config per shape: no timing runs

import torch  # noqa: E402
import triton  # noqa: E402


class _Driver:
    """What JITFunction.run and the autotuner ask of the active driver, answered without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):          # triton < 3.7 times even a single pruned config
        return lambda fn, quantiles=None, **kwargs: [1.0, 1.0, 1.0]

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass


class _Kernel:
    """A compiled kernel that launches nothing."""
    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass


def _stand_in_kernels(hook_args: dict) -> bool:
    """jit_cache_hook: instead of compiling, put a stand-in kernel under the key (the call that
    asked compiles nothing and launches nothing; the next finds it)."""
    jit = hook_args["fn"].jit_function
    jit.device_caches[hook_args["compile"]["device"]][0][hook_args["key"]] = _Kernel()
    return True


def _per_call_us(fn, calls: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    try:
        from triton import knobs
        from triton.runtime import driver
    except ImportError:
        sys.exit(f"triton {triton.__version__}: no triton.knobs (needs triton >= 3.4)")
    driver.set_active(_Driver())
    knobs.runtime.jit_cache_hook = lambda **kw: _stand_in_kernels(kw)
    from fastattn.ops.attention import triton as attn
    attn.TMA.mode = "0"

    B, H, S, D = 16, 12, 1024, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    out, lse = attn.attention_fwd(q, k, v, None, scale, 0, -1, 0, 0.0, 0.0, 0)
    dout = torch.randn_like(q)
    cases = {
        "forward (1 launch)": lambda: attn.attention_fwd(q, k, v, None, scale, 0, -1, 0, 0.0, 0.0, 0),
        "backward (3 launches)": lambda: attn.attention_bwd(dout, q, k, v, out, lse, None, scale, 0, -1, 0,
                                                            0.0, 0.0, 0),
    }
    tuned = {name: getattr(attn, name) for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")}
    print(f"# python -m benchmarks.triton_host_path: triton {triton.__version__}, torch {torch.__version__}, "
          f"gpt2-124m attention (bf16, {B}x{H}x{S}x{D}, causal), {args.calls} calls x {args.rounds} rounds, "
          f"medians, us per call; without Triton's C launcher and the CUDA driver")
    print("| call | fastattn (CachedAutotune) | through Autotuner.run | JITFunction.run's share |")
    print("| --- | ---: | ---: | ---: |")
    for name, fn in cases.items():
        for _ in range(2):
            fn()    # first calls: the autotuner's choice, the stand-in kernels put in place
        cached = _per_call_us(fn, args.calls, args.rounds)
        for attr, wrapper in tuned.items():       # triton's own autotuner, as before
            setattr(attn, attr, wrapper.fn)
        fn()
        plain = _per_call_us(fn, args.calls, args.rounds)
        jits = {attr: wrapper.fn.fn for attr, wrapper in tuned.items()}
        for attr, wrapper in tuned.items():       # the JIT's run replaced by nothing
            setattr(attn, attr, wrapper)
            wrapper.fn.fn = type("NoRun", (), {"run": lambda self, *a, **kw: None})()
        attn._bwd_preprocess.run = lambda *a, **kw: None   # the one launch not autotuned
        without_jit = _per_call_us(fn, args.calls, args.rounds)
        del attn._bwd_preprocess.run
        for attr, wrapper in tuned.items():
            wrapper.fn.fn = jits[attr]
        print(f"| {name} | {cached:.1f} | {plain:.1f} | {cached - without_jit:.1f} |", flush=True)


if __name__ == "__main__":
    main()
