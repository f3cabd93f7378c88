"""Seconds Triton takes to compile the attention kernels for a GPU, and what the binary needs
(registers per thread, spilled bytes, shared memory), measured on this machine (no GPU needed):
one kernel at a time, no bias / softcap / dropout; with --ffn the FFN matmuls' configs.

Why it exists: fp32 attention multiplies with "ieee" products, which have no tensor-core
instruction, so every tl.dot unrolls into FMAs and the compile time grows with the tile; a GPU
test once ran past its 90 s limit compiling one (see attn._prune). The register report (ptxas
-v on Triton's PTX, with Triton's own ptxas, else the PATH's) shows which autotuning configs spill before a GPU
session times them.
Usage: python -m tests.tools.triton_compile_time [--dtype fp32] [--head-dim 40]
       [--tiles 64x64 32x32] [--warps 4] [--stages 2] [--tma] [--kernels fwd dkdv dq]
       [--capability 90]
       python -m tests.tools.triton_compile_time --ffn --dtype bf16 [--tma]   (the FFN matmuls)
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# A fresh cache, or a kernel compiled before (by CI's tests/test_triton_compile.py, say) takes 0 s.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_compile_time_")

import triton  # noqa: E402

from tests.tools import triton_aot as aot  # noqa: E402  clears TRITON_INTERPRET before the kernels' import

from fastattn.ops.attention import triton as attn  # noqa: E402  (after triton_aot)

KERNELS = {"fwd": attn._fwd_kernel, "dkdv": attn._bwd_dkdv_kernel, "dq": attn._bwd_dq_kernel}


def _ptxas(capability: int):
    """The ptxas Triton itself runs for this target (its bundled one, or TRITON_PTXAS_PATH),
    else the one on the PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(capability).path
    except Exception:   # older triton: no get_ptxas
        return shutil.which("ptxas")


def resources(ptx: str, capability: int) -> str:
    """ptxas's report for this PTX (as Triton runs ptxas: the PTX's own .maxntid bounds the
    registers): registers per thread and spilled bytes; empty without a ptxas."""
    ptxas = _ptxas(capability)
    if ptxas is None:
        return ""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", src + ".cubin"],
                              capture_output=True, text=True)
    report = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None:
        return f", ptxas failed: {report.strip()[-200:]}"
    return (f", {regs.group(1)} registers, spills {spill.group(1)} B stored / {spill.group(2)} B "
            f"loaded" if spill else f", {regs.group(1)} registers")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--tiles", nargs="+", default=["64x64", "32x32"], help="BLOCK_MxBLOCK_N")
    parser.add_argument("--warps", nargs="+", type=int, default=[4])
    parser.add_argument("--stages", nargs="+", type=int, default=[2])
    parser.add_argument("--tma", action="store_true",
                        help="the Hopper path: streamed tiles through TMA descriptors")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--mha", action="store_true",
                        help="one query head per kv head (GROUP = 1, which the JIT makes a "
                             "constant); without it GROUP is a runtime int, as under GQA")
    parser.add_argument("--ffn", action="store_true",
                        help="the FFN matmuls instead: each half-precision autotuning config of "
                             "the GEMM (epilogues act, act_grad, glu_grad) and GLU kernels, over A "
                             "and B as laid out (TMA with --tma)")
    args = parser.parse_args()
    dt, d = args.dtype, args.head_dim
    if args.ffn:
        return ffn(dt, args.tma, args.capability)
    if args.tma and (args.capability < 90 or d & (d - 1)):
        parser.error("--tma needs --capability >= 90 and a power-of-two head dim")
    pointers = {n: "*" + dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    pointers.update({"Bias": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "CuQ": "*i32",
                     "CuK": "*i32", "DQAcc": "*fp32"})
    print(f"triton {triton.__version__}, sm_{args.capability}, {dt}, head dim {d}"
          f"{', TMA' if args.tma else ', pointer loads'}, ptxas: "
          f"{_ptxas(args.capability) or 'none found (no register report)'}")
    for tiles in args.tiles:
        bm, bn = (int(x) for x in tiles.split("x"))
        flags = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), HAS_BIAS=False,
                     HAS_SOFTCAP=False, HAS_DROPOUT=False, IS_VARLEN=False, USE_TMA=args.tma,
                     ATOMIC_DQ=False, PRECISION="ieee" if dt == "fp32" else None, BLOCK_M=bm,
                     BLOCK_N=bn)
        for warps in args.warps:
            for stages in args.stages:
                for name in args.kernels:
                    kernel = KERNELS[name]
                    job = dict(module=aot.ATTENTION, kernel=aot._jit_function(kernel).__name__,
                               signature={**pointers,
                                          **aot._streamed_args(kernel, dt, d, flags, args.tma)},
                               constants=flags, options=dict(num_warps=warps, num_stages=stages),
                               capability=args.capability, label=f"{dt} d={d} {bm}x{bn}",
                               aligned=True, specialize={"GROUP": "1"} if args.mha else {})
                    t0 = time.perf_counter()
                    compiled = aot.compile_job(job, report=False)
                    took = time.perf_counter() - t0
                    print(f"  {bm}x{bn} {warps} warps {stages} stages {name}: {took:.1f} s, shared "
                          f"{compiled.metadata.shared} B{resources(compiled.asm['ptx'], args.capability)}",
                          flush=True)
    return 0


def ffn(dt: str, tma: bool, capability: int) -> int:
    from fastattn.ops.ffn import triton as ffn_triton

    print(f"triton {triton.__version__}, sm_{capability}, {dt}, FFN matmuls"
          f"{', TMA' if tma else ', pointer loads'}, ptxas: "
          f"{_ptxas(capability) or 'none found (no register report)'}")
    ptrs = {n: "*" + dt for n in ("A", "B", "Bias", "E1", "E2", "O1", "O2", "O3", "BG", "BU", "G",
                                  "U", "Mout")}
    jobs = [("_gemm_kernel", epi, c) for epi in ("act", "act_grad", "glu_grad")
            for c in ffn_triton._HALF_CONFIGS]
    jobs += [("_glu_kernel", "glu", c) for c in ffn_triton._GLU_HALF_CONFIGS]
    for kernel, epi, c in jobs:
        bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        flags = dict(c.kwargs, ACT="gelu" if kernel == "_gemm_kernel" else "silu",
                     HAS_BIAS=epi == "act", PRECISION=None, USE_TMA=tma, A_T=False, B_T=False,
                     EVEN_K=True, EPI=epi)
        sig = dict(ptrs)
        for name, rows in (("ADesc", bm), ("BDesc", bn), ("BGDesc", bn), ("BUDesc", bn)):
            sig[name] = f"tensordesc<{dt}[{rows},{bk}]>" if tma else "*" + dt
        # As the JIT specialises a launch on contiguous operands at LLM sizes: unit strides
        # along K (A, B, BG, BU) and along N (h, g, u) become constants, the sizes and the other
        # strides are multiples of 16.
        unit = ("stride_ak", "stride_bk", "stride_gk", "stride_uk", "stride_e1n", "stride_e2n")
        job = dict(module=aot.FFN, kernel=kernel, signature=sig, constants=flags,
                   options=dict(num_warps=c.num_warps, num_stages=c.num_stages),
                   capability=capability, label="", aligned=True,
                   specialize={**{n: "1" for n in unit}, "M": "D", "N": "D", "K": "D"})
        t0 = time.perf_counter()
        compiled = aot.compile_job(job, report=False)
        print(f"  {kernel} {epi} {bm}x{bn}x{bk} {c.num_warps} warps {c.num_stages} stages: "
              f"{time.perf_counter() - t0:.1f} s, shared {compiled.metadata.shared} B"
              f"{resources(compiled.asm['ptx'], capability)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
