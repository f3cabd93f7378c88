"""Instructions per element in the vector loop of the CUDA FFN elementwise kernels, read off
their SASS (no GPU needed): nvcc compiles csrc/cuda/ffn.cu to a cubin, cuobjdump disassembles
it, and for each chosen kernel this counts the main loop's instructions (the loop that ends
with the back branch after its last 128-bit store) and those of its shortest pass, the one no
lane's slow path lengthens (gelu's normcdff below x = -3; a path through an unconditional
CALL, a division's special cases, counts as slow). Divided by the vector's elements:
the number to weigh against bytes moved (an H200 issues ~7 lane instructions per byte of HBM
bandwidth).

Why it exists: a bandwidth-bound kernel whose math costs more instructions than its bytes
allow is slower than its traffic says; the gelu kernels were (csrc/cuda/ffn.cu's header).
A static count of issued instructions (predicated-off ones included), not a timing.

Usage: python -m tests.tools.cuda_sass_loop [--source csrc/cuda/ffn.cu] [--arch sm_90a]
       [--kernels 'bfloat16.*Kind.0.*Act.0' ...]   (regexes on the demangled-ish names)
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import torch.utils.cpp_extension as cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Kind: 0 act_fwd, 1 act_bwd, 2 glu_fwd, 3 glu_bwd; Act: 0 gelu, 1 gelu_tanh, 2 relu,
# 3 relu2, 4 silu (the enums' order in ffn.cu). The mangled names spell them KindE<k>, ActE<a>.
DEFAULT = {
    "bf16 gelu act_fwd": r"bfloat16LNS0_4KindE0ELNS0_3ActE0E",
    "bf16 gelu act_bwd": r"bfloat16LNS0_4KindE1ELNS0_3ActE0E",
    "bf16 gelu glu_fwd": r"bfloat16LNS0_4KindE2ELNS0_3ActE0E",
    "bf16 gelu glu_bwd": r"bfloat16LNS0_4KindE3ELNS0_3ActE0E",
    "fp32 gelu act_fwd": r"kernelIfLNS0_4KindE0ELNS0_3ActE0E",
    "bf16 silu glu_fwd": r"bfloat16LNS0_4KindE2ELNS0_3ActE4E",
    "bf16 silu glu_bwd": r"bfloat16LNS0_4KindE3ELNS0_3ActE4E",
}
ELEMENTS = {"bf16": 8, "fp16": 8, "fp32": 4}   # per 16-byte vector


def _tool(name: str) -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if not found:
        sys.exit(f"cuda_sass_loop: no {name} (neither triton's bundled one nor on the PATH)")
    return found


def disassemble(source: str, arch: str) -> str:
    includes = [f"-I{p}" for p in cpp.include_paths(device_type="cuda")]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT}/csrc/cuda", f"-I{ROOT}/csrc"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run(["nvcc", "-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-arch={arch}",
                        "-cubin", "-o", cubin, *includes, source], check=True)
        return subprocess.run([_tool("cuobjdump"), "-sass", cubin], check=True,
                              capture_output=True, text=True).stdout


def functions(sass: str) -> dict:
    """name -> [(address, instruction)] for each function of the listing."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def loop_counts(ins: list) -> tuple:
    """(instructions in the vector loop, those of its shortest pass): the loop runs from the
    target of the back branch after the last 128-bit store to that branch; its shortest pass
    from start to back branch (a breadth-first walk, either way at each conditional branch) is
    the one no lane's slow path lengthens (gelu's normcdff; a path through an unconditional
    CALL, a division's special cases, is left out)."""
    branch = re.compile(r"BRA (?:!?U?P\d, )?0x([0-9a-f]+)")   # @P0 BRA 0x.., @P0 BRA !P2, 0x..
    store = max(a for a, t in ins if re.search(r"STG\.E\S*\.128", t))
    back = next((a, t) for a, t in ins if a > store and (m := branch.search(t))
                and int(m.group(1), 16) < a)
    lo, hi = int(branch.search(back[1]).group(1), 16), back[0]
    loop = [(a, t) for a, t in ins if lo <= a <= hi]
    addrs = [a for a, _ in loop]
    nxt, text_at = dict(zip(addrs, addrs[1:])), dict(loop)
    steps, frontier = {lo: 1}, [lo]
    while frontier and hi not in steps:
        following = []
        for a in frontier:
            text = text_at[a]
            target = branch.search(text)
            succ = []
            if target:
                succ.append(int(target.group(1), 16))
                if text.startswith("@"):  # conditional: it may fall through too
                    succ.append(nxt.get(a))
            elif text.startswith("CALL"):  # a subroutine (a slow path's): not the fast pass
                pass
            elif not text.startswith("EXIT"):
                succ.append(nxt.get(a))
            for b in succ:
                if b is not None and lo <= b <= hi and b not in steps:
                    steps[b] = steps[a] + 1
                    following.append(b)
        frontier = following
    return len(loop), steps[hi]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=os.path.join(ROOT, "csrc", "cuda", "ffn.cu"))
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--kernels", nargs="*", default=None,
                   help="regexes on the mangled kernel names (default: gelu and silu's)")
    args = p.parse_args(argv)
    wanted = {k: k for k in args.kernels} if args.kernels else DEFAULT
    funcs = functions(disassemble(args.source, args.arch))
    print(f"# {os.path.relpath(args.source, ROOT)}, {args.arch}: the vector loop's instructions "
          "(static), and its shortest pass (no slow branch), per element")
    for label, pattern in wanted.items():
        names = [n for n in funcs if re.search(pattern, n)]
        if not names:
            print(f"{label}: no kernel matches {pattern!r}")
            continue
        total, fast = loop_counts(funcs[names[0]])
        per = ELEMENTS.get(label.split()[0], 8)
        print(f"{label}: loop {total}, shortest pass {fast} = {fast / per:.1f} an element "
              f"({per} a vector)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
