"""Seconds Triton takes to compile the attention kernels for a GPU, measured on this machine
(no GPU needed): one kernel at a time, pointer loads, no bias / softcap / dropout.

Why it exists: fp32 attention multiplies with "ieee" products, which have no tensor-core
instruction, so every tl.dot unrolls into FMAs and the compile time grows with the tile; a GPU
test once ran past its 90 s limit compiling one (see attn._prune).
Usage: python -m tests.tools.triton_compile_time [--dtype fp32] [--head-dim 40]
       [--tiles 64x64 32x32] [--capability 90]
"""

import argparse
import os
import sys
import tempfile
import time

# A fresh cache, or a kernel compiled before (by CI's tests/test_triton_compile.py, say) takes 0 s.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_compile_time_")

import triton  # noqa: E402

from tests.tools import triton_aot as aot  # noqa: E402  clears TRITON_INTERPRET before the kernels' import

from fastattn.ops.attention import triton as attn  # noqa: E402  (after triton_aot)

KERNELS = {"fwd": attn._fwd_kernel, "dkdv": attn._bwd_dkdv_kernel, "dq": attn._bwd_dq_kernel}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--tiles", nargs="+", default=["64x64", "32x32"], help="BLOCK_MxBLOCK_N")
    parser.add_argument("--capability", type=int, default=90)
    args = parser.parse_args()
    dt, d = args.dtype, args.head_dim
    pointers = {n: "*" + dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    pointers.update({"Bias": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "CuQ": "*i32",
                     "CuK": "*i32", "DQAcc": "*fp32"})
    print(f"triton {triton.__version__}, sm_{args.capability}, {dt}, head dim {d}")
    for tiles in args.tiles:
        bm, bn = (int(x) for x in tiles.split("x"))
        flags = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), HAS_BIAS=False,
                     HAS_SOFTCAP=False, HAS_DROPOUT=False, IS_VARLEN=False, USE_TMA=False,
                     ATOMIC_DQ=False, PRECISION="ieee" if dt == "fp32" else None, BLOCK_M=bm,
                     BLOCK_N=bn)
        for name, kernel in KERNELS.items():
            job = dict(module=aot.ATTENTION, kernel=aot._jit_function(kernel).__name__,
                       signature={**pointers, **aot._streamed_args(kernel, dt, d, flags, False)},
                       constants=flags, options={}, capability=args.capability,
                       label=f"{dt} d={d} {bm}x{bn}")
            t0 = time.perf_counter()
            aot.compile_job(job)
            print(f"  {bm}x{bn} {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
