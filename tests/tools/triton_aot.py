"""Compile fastattn's Triton attention kernels for a GPU architecture without a GPU.

The interpreter (how CI runs Triton) executes the kernels' Python but never lowers them, so an
error that only the compiler sees (types, layouts, shared memory) would first show on a GPU.
This lowers every kernel of fastattn/ops/attention/triton.py through Triton's compiler to the
target's binary for a spread of dtypes, head dims and features, and prints one line per kernel.
On sm_90 and newer it also lowers the TMA variants (host descriptors for the streamed tiles).
Usage: python -m tests.tools.triton_aot [capability, default 90]
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' import

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastattn.ops.attention import triton as attn  # noqa: E402

FLOAT_ARGS = ("scale", "softcap", "drop_scale")


def _jit_function(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # through the autotuner / heuristics wrappers
    return fn


def compile_kernel(kernel, pointers, constants, target, num_warps=4, num_stages=2):
    fn = _jit_function(kernel)
    signature = {name: "constexpr" if name in constants else pointers.get(
        name, "fp32" if name in FLOAT_ARGS else "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constants), target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _streamed_args(kernel, dt, d, flags, tma):
    # The descriptor arguments of kernel: plain pointers on the pointer path, else descriptors
    # of the streamed tile (the operands attn._streamed names for it).
    kind = {"_fwd_kernel": "fwd", "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv"}
    names, block = attn._streamed(kind[_jit_function(kernel).__name__])
    kind_of = f"tensordesc<{dt}[{flags[block]},{d}]>" if tma else "*" + dt
    return {name: kind_of for name in names}


def main() -> int:
    capability = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    target = GPUTarget("cuda", capability, 32)
    cases = [  # dtype, head dim, bias, softcap, dropout, varlen
        ("fp16", 64, True, True, True, False),
        ("bf16", 80, False, False, False, True),
        ("fp16", 128, False, True, False, False),
        ("fp16", 256, False, False, False, False),
    ]
    for dt, d, bias, softcap, dropout, varlen in cases:
        pointers = {n: "*" + dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
        pointers.update({"Bias": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "CuQ": "*i32",
                         "CuK": "*i32"})
        flags = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), HAS_BIAS=bias,
                     HAS_SOFTCAP=softcap, HAS_DROPOUT=dropout, IS_VARLEN=varlen, USE_TMA=False,
                     PRECISION="ieee" if dt == "fp32" else None, BLOCK_M=64, BLOCK_N=64)
        for kernel in (attn._fwd_kernel, attn._bwd_dkdv_kernel, attn._bwd_dq_kernel):
            compiled = compile_kernel(kernel, {**pointers, **_streamed_args(kernel, dt, d, flags, False)},
                                      flags, target)
            print(f"sm_{capability} {dt} d={d} {_jit_function(kernel).__name__}: "
                  f"shared {compiled.metadata.shared} B")
        compile_kernel(attn._bwd_preprocess, pointers,
                       dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), IS_VARLEN=varlen,
                            BLOCK_M=64), target)
    # the backward's unequal-tile autotuning configs (128 rows held, 32 streamed), head dim 128
    flags.update(HEAD_DIM=128, BLOCK_D=128, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False,
                 IS_VARLEN=False, PRECISION=None)
    for kernel, bm, bn in ((attn._bwd_dkdv_kernel, 32, 128), (attn._bwd_dq_kernel, 128, 32)):
        tiles = {**flags, "BLOCK_M": bm, "BLOCK_N": bn}
        compiled = compile_kernel(kernel, {**pointers, **_streamed_args(kernel, "fp16", 128, tiles, False)},
                                  tiles, target, num_warps=8)
        print(f"sm_{capability} fp16 d=128 {bm}x{bn} {_jit_function(kernel).__name__}: "
              f"shared {compiled.metadata.shared} B")
    if capability >= 90 and attn.TensorDescriptor is not None:
        # The Hopper path at the shapes it is tuned for: bf16/fp16, head dims 64 and 128 (and
        # 256 with small tiles), causal-style features on, the largest tiles and stage counts.
        tma_cases = [  # dtype, head dim, BLOCK_M, BLOCK_N, warps, stages, softcap, dropout, varlen
            ("bf16", 128, 128, 64, 8, 3, False, False, False),
            ("fp16", 64, 128, 128, 8, 3, True, True, False),
            ("bf16", 128, 64, 64, 4, 2, False, False, True),
            ("bf16", 256, 64, 32, 4, 2, False, False, False),
        ]
        for dt, d, bm, bn, warps, stages, softcap, dropout, varlen in tma_cases:
            tiles = dict(flags, HEAD_DIM=d, BLOCK_D=d, HAS_SOFTCAP=softcap, HAS_DROPOUT=dropout,
                         IS_VARLEN=varlen, USE_TMA=True, BLOCK_M=bm, BLOCK_N=bn)
            ptrs = {**pointers, **{n: "*" + dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}}
            for kernel in (attn._fwd_kernel, attn._bwd_dkdv_kernel, attn._bwd_dq_kernel):
                compiled = compile_kernel(kernel, {**ptrs, **_streamed_args(kernel, dt, d, tiles, True)},
                                          tiles, target, num_warps=warps, num_stages=stages)
                print(f"sm_{capability} TMA {dt} d={d} {bm}x{bn} {_jit_function(kernel).__name__}: "
                      f"shared {compiled.metadata.shared} B")
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
