"""Compile fastattn's Triton attention kernels for a GPU architecture without a GPU.

The interpreter (how CI runs Triton) executes the kernels' Python but never lowers them, so an
error that only the compiler sees (types, layouts, shared memory) would first show on a GPU.
This lowers every kernel of fastattn/ops/attention/triton.py through Triton's compiler to the
target's binary for a spread of dtypes, head dims and features, and prints one line per kernel.
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


def compile_kernel(kernel, pointers, constants, target, num_warps=4):
    fn = _jit_function(kernel)
    signature = {name: "constexpr" if name in constants else pointers.get(
        name, "fp32" if name in FLOAT_ARGS else "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constants), target=target,
                          options={"num_warps": num_warps, "num_stages": 2})


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
                     HAS_SOFTCAP=softcap, HAS_DROPOUT=dropout, IS_VARLEN=varlen,
                     PRECISION="ieee" if dt == "fp32" else None, BLOCK_M=64, BLOCK_N=64)
        for kernel in (attn._fwd_kernel, attn._bwd_dkdv_kernel, attn._bwd_dq_kernel):
            compiled = compile_kernel(kernel, pointers, flags, target)
            print(f"sm_{capability} {dt} d={d} {_jit_function(kernel).__name__}: "
                  f"shared {compiled.metadata.shared} B")
        compile_kernel(attn._bwd_preprocess, pointers,
                       dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), IS_VARLEN=varlen,
                            BLOCK_M=64), target)
    # the backward's unequal-tile autotuning configs (128 rows held, 32 streamed), head dim 128
    flags.update(HEAD_DIM=128, BLOCK_D=128, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False,
                 IS_VARLEN=False, PRECISION=None)
    for kernel, bm, bn in ((attn._bwd_dkdv_kernel, 32, 128), (attn._bwd_dq_kernel, 128, 32)):
        compiled = compile_kernel(kernel, pointers, {**flags, "BLOCK_M": bm, "BLOCK_N": bn},
                                  target, num_warps=8)
        print(f"sm_{capability} fp16 d=128 {bm}x{bn} {_jit_function(kernel).__name__}: "
              f"shared {compiled.metadata.shared} B")
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
