"""Compile fastattn's Triton kernels for a GPU architecture without a GPU.

The interpreter (how CI runs Triton) executes the kernels' Python but never lowers them, so an
error that only the compiler sees (types, layouts, shared memory) would first show on a GPU.
This lowers kernels through Triton's compiler to the target's binary and prints one line per
kernel variant:
- the attention kernels at the GPU's own tile sizes, for a spread of dtypes, head dims and
  features, and on sm_90 and newer their TMA variants (host descriptors for the streamed tiles);
- with --captured FILE, every launch that tests/tools/triton_capture.py recorded from the ops
  on small inputs under the interpreter: each kernel of every op (cross-entropy family,
  attention and decode, FFN, Adam, gradient clipping) with the argument types and constexprs
  the ops really pass.
Variants compile in parallel, one process per CPU.
Usage: python -m tests.tools.triton_aot [capability, default 90] [--captured FILE]
"""

import argparse
import concurrent.futures
import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' import

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastattn.ops._triton_common import TensorDescriptor  # noqa: E402
from fastattn.ops.attention import triton as attn  # noqa: E402

FLOAT_ARGS = ("scale", "softcap", "drop_scale")
ATTENTION = "fastattn.ops.attention.triton"
FFN = "fastattn.ops.ffn.triton"


def _jit_function(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # through the autotuner / heuristics wrappers
    return fn


def compile_job(job, report=True):
    """Lowers one kernel variant; returns its report line, or with ``report=False`` the compiled
    kernel (raises on a compiler error). ``job["aligned"]``: every pointer and stride that the
    kernel lets specialise is taken as 16-aligned, as the JIT finds them for contiguous
    operands with head dims that are multiples of 8 (without it, loads are compiled as for any
    alignment); a unit stride must be named in ``job["specialize"]`` ("1"), as the JIT makes
    it a constant."""
    fn = _jit_function(getattr(importlib.import_module(job["module"]), job["kernel"]))
    constants = {name: v for name, v in job["constants"].items() if name in fn.arg_names}
    # A recorded launch's specialisations, as the JIT would apply them (not on parameters
    # that opt out with do_not_specialize / do_not_specialize_on_alignment).
    attrs = {}
    for param in fn.params:
        spec = job.get("specialize", {}).get(param.name, "")
        if spec == "1" and not param.do_not_specialize:
            constants[param.name] = 1
        elif spec == "D" and not (param.do_not_specialize or param.do_not_specialize_on_alignment):
            attrs[(param.num,)] = [["tt.divisibility", 16]]
        elif (job.get("aligned") and param.name not in constants and not param.do_not_specialize
              and (job["signature"].get(param.name, "").startswith("*")
                   or param.name.startswith("stride_"))):
            attrs[(param.num,)] = [["tt.divisibility", 16]]
    signature = {name: "constexpr" if name in constants else job["signature"].get(
        name, "fp32" if name in FLOAT_ARGS else "i32") for name in fn.arg_names}
    options = {"num_warps": 4, "num_stages": 2, **job.get("options", {})}
    target = GPUTarget("cuda", job["capability"], 32)
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target, options=options)
    if not report:
        return compiled
    return f"sm_{job['capability']} {job['label']} {job['kernel']}: shared {compiled.metadata.shared} B"


def _streamed_args(kernel, dt, d, flags, tma):
    # The descriptor arguments of kernel: plain pointers on the pointer path, else descriptors
    # of the streamed tile (the operands attn._streamed names for it).
    kind = {"_fwd_kernel": "fwd", "_bwd_dq_kernel": "dq", "_bwd_dkdv_kernel": "dkdv"}
    names, block = attn._streamed(kind[_jit_function(kernel).__name__])
    kind_of = f"tensordesc<{dt}[{flags[block]},{d}]>" if tma else "*" + dt
    return {name: kind_of for name in names}


def attention_jobs(capability):
    """The attention kernels at GPU tile sizes (the interpreter runs them at 16 x 16)."""
    jobs = []

    def add(kernel, pointers, constants, label, **options):
        jobs.append(dict(module=ATTENTION, kernel=_jit_function(kernel).__name__, signature=pointers,
                         constants=constants, options=options, capability=capability, label=label))

    cases = [  # dtype, head dim, bias, softcap, dropout, varlen, atomic dQ
        ("fp16", 64, True, True, True, False, True),
        ("bf16", 80, False, False, False, True, False),
        ("fp16", 128, False, True, False, False, False),
        ("fp32", 40, False, False, False, False, False),   # fp32: 32 x 32 tiles (attn._prune)
        ("fp16", 256, False, False, False, False, False),  # last: the cases below reuse its flags
    ]
    for dt, d, bias, softcap, dropout, varlen, atomic in cases:
        tile = 32 if dt == "fp32" else 64
        pointers = {n: "*" + dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
        pointers.update({"Bias": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "CuQ": "*i32",
                         "CuK": "*i32", "DQAcc": "*fp32"})
        flags = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), HAS_BIAS=bias,
                     HAS_SOFTCAP=softcap, HAS_DROPOUT=dropout, IS_VARLEN=varlen, USE_TMA=False,
                     ATOMIC_DQ=atomic, PRECISION="ieee" if dt == "fp32" else None, BLOCK_M=tile,
                     BLOCK_N=tile)
        for kernel in (attn._fwd_kernel, attn._bwd_dkdv_kernel, attn._bwd_dq_kernel):
            add(kernel, {**pointers, **_streamed_args(kernel, dt, d, flags, False)}, flags, f"{dt} d={d}")
        add(attn._bwd_preprocess, pointers, dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
                                                 IS_VARLEN=varlen, BLOCK_M=64), f"{dt} d={d}")
    # the backward's unequal-tile autotuning configs (128 rows held, 32 streamed), head dim 128
    flags.update(HEAD_DIM=128, BLOCK_D=128, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False,
                 IS_VARLEN=False, ATOMIC_DQ=False, PRECISION=None)
    for kernel, bm, bn in ((attn._bwd_dkdv_kernel, 32, 128), (attn._bwd_dq_kernel, 128, 32)):
        tiles = {**flags, "BLOCK_M": bm, "BLOCK_N": bn}
        add(kernel, {**pointers, **_streamed_args(kernel, "fp16", 128, tiles, False)}, tiles,
            f"fp16 d=128 {bm}x{bn}", num_warps=8)
    if capability >= 90 and TensorDescriptor is not None:
        # The Hopper path at the shapes it is tuned for: bf16/fp16, head dims 64 and 128 (and
        # 256 with small tiles), causal-style features on, the largest tiles and stage counts.
        tma_cases = [  # dtype, head dim, BLOCK_M, BLOCK_N, warps, stages, softcap, dropout, varlen, atomic dQ
            ("bf16", 128, 128, 64, 8, 3, False, False, False, False),
            ("fp16", 64, 128, 128, 8, 3, True, True, False, False),
            ("bf16", 128, 64, 64, 4, 2, False, False, True, True),
            ("bf16", 128, 64, 128, 8, 2, False, False, False, True),
            ("bf16", 256, 64, 32, 4, 2, False, False, False, False),
            ("fp32", 64, 32, 32, 4, 1, False, False, False, False),
        ]
        for dt, d, bm, bn, warps, stages, softcap, dropout, varlen, atomic in tma_cases:
            tiles = dict(flags, HEAD_DIM=d, BLOCK_D=d, HAS_SOFTCAP=softcap, HAS_DROPOUT=dropout,
                         IS_VARLEN=varlen, USE_TMA=True, ATOMIC_DQ=atomic, BLOCK_M=bm, BLOCK_N=bn,
                         PRECISION="ieee" if dt == "fp32" else None)
            ptrs = {**pointers, **{n: "*" + dt for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}}
            for kernel in (attn._fwd_kernel, attn._bwd_dkdv_kernel, attn._bwd_dq_kernel):
                add(kernel, {**ptrs, **_streamed_args(kernel, dt, d, tiles, True)}, tiles,
                    f"TMA {dt} d={d} {bm}x{bn}{' atomic dQ' if atomic else ''}", num_warps=warps,
                    num_stages=stages)
    return jobs


def ffn_jobs(capability):
    """The FFN GEMMs at the GPU's largest tiles (the interpreter runs 16 x 16 x 16): the pointer
    path with each epilogue, and on sm_90+ the TMA path over every operand layout (A or A^T,
    B or B^T). The layout changes the loads and the epilogue the stores, independently, so each
    TMA layout compiles with one epilogue (one the ops launch it with: the SwiGLU backward's
    glu_grad with B^T), and the gate/up kernel, whose operands the forward passes
    untransposed, with that layout only."""
    jobs = []
    tma = capability >= 90 and TensorDescriptor is not None
    for dt, (bm, bn, bk, warps, stages) in (("bf16", (128, 256, 64, 8, 3)), ("fp32", (128, 128, 32, 8, 3))):
        layouts = [(False, False, False, ("act", "glu_grad"), True)]
        if tma:
            layouts += [(True, False, False, ("act",), True), (True, True, True, ("act",), False),
                        (True, False, True, ("glu_grad",), False), (True, True, False, ("act",), False)]
        for use_tma, a_t, b_t, epilogues, glu in layouts:
            a_desc = f"tensordesc<{dt}[{bk},{bm}]>" if a_t else f"tensordesc<{dt}[{bm},{bk}]>"
            b_desc = f"tensordesc<{dt}[{bk},{bn}]>" if b_t else f"tensordesc<{dt}[{bn},{bk}]>"
            ptrs = {n: "*" + dt for n in ("A", "B", "Bias", "E1", "E2", "O1", "O2", "O3", "BG", "BU", "G", "U",
                                          "Mout")}
            flags = dict(ACT="silu", HAS_BIAS=True, PRECISION="ieee" if dt == "fp32" else None, USE_TMA=use_tma,
                         A_T=a_t, B_T=b_t, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=False)
            label = f"{dt} {bm}x{bn}x{bk}" + (f" TMA A{'^T' if a_t else ''} B{'^T' if b_t else ''}" if use_tma else "")
            for epi in epilogues:
                sig = {**ptrs, "ADesc": a_desc if use_tma else "*" + dt, "BDesc": b_desc if use_tma else "*" + dt}
                jobs.append(dict(module=FFN, kernel="_gemm_kernel", signature=sig, constants=dict(flags, EPI=epi),
                                 options=dict(num_warps=warps, num_stages=stages), capability=capability,
                                 label=f"{label} {epi}"))
            if not glu:
                continue
            glu_tiles = dict(flags, EPI="glu", BLOCK_N=min(bn, 128))
            b_glu = b_desc.replace(f"{bn}", f"{glu_tiles['BLOCK_N']}")
            sig = {**ptrs, "ADesc": a_desc if use_tma else "*" + dt,
                   "BGDesc": b_glu if use_tma else "*" + dt, "BUDesc": b_glu if use_tma else "*" + dt}
            jobs.append(dict(module=FFN, kernel="_glu_kernel", signature=sig, constants=glu_tiles,
                             options=dict(num_warps=warps, num_stages=stages), capability=capability,
                             label=f"{label} glu"))
    return jobs


def captured_jobs(path, capability):
    jobs = []
    with open(path) as f:
        for n, line in enumerate(f):
            job = json.loads(line)
            if capability < 90 and any(t.startswith("tensordesc") for t in job["signature"].values()):
                continue  # TMA descriptors exist from sm_90 on
            jobs.append(dict(job, capability=capability, label=f"captured #{n}"))
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("capability", nargs="?", type=int, default=90)
    parser.add_argument("--captured", default=None, help="JSON lines from tests.tools.triton_capture")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    jobs = attention_jobs(args.capability) + ffn_jobs(args.capability)
    if args.captured:
        jobs += captured_jobs(args.captured, args.capability)
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(compile_job, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                print(future.result(), flush=True)
            except Exception as error:  # report every variant that fails, then fail
                failures += 1
                print(f"FAILED sm_{job['capability']} {job['label']} {job['module']}.{job['kernel']} "
                      f"constants={job['constants']}: {type(error).__name__}: {error}", file=sys.stderr)
    if failures:
        print(f"{failures} of {len(jobs)} kernel variants did not compile", file=sys.stderr)
        return 1
    print(f"all kernels compiled ({len(jobs)} variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
