"""fastattn's Triton kernels lower to a Hopper (sm_90) binary on this CPU-only machine:
catches what the interpreter cannot see (it runs the kernels' Python, never the compiler).
Every kernel variant the ops launch on small inputs is recorded under the interpreter
(tests/tools/triton_capture.py) and compiled, with the attention kernels at the GPU's own
tile sizes and their TMA variants (tests/tools/triton_aot.py).
Other architectures: `python -m tests.tools.triton_aot 80`."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_kernel_compiles_for_gpu(tmp_path, capability=90):
    pytest.importorskip("triton.backends.compiler", reason="triton without its GPU compiler")
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    if not hasattr(InterpretedFunction, "run"):  # triton 3.0; `make test` runs the newest triton
        pytest.skip(f"triton {triton.__version__}'s interpreter has no InterpretedFunction.run "
                    "for tests/tools/triton_capture.py to record the launches through")
    captured = tmp_path / "launches.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tests.tools.triton_capture", str(captured)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = {line.split('"kernel": "')[1].split('"')[0] for line in captured.read_text().splitlines()}
    # one of each op family at least: the capture must not silently miss a backend
    for name in ("_cross_entropy_fwd_kernel", "_token_logprobs_bwd_kernel", "_cross_entropy_slice_bwd_kernel",
                 "_fwd_kernel", "_bwd_dq_kernel",
                 "_decode_split_kernel", "_gemm_kernel", "_glu_kernel", "_adam_kernel", "_scale_kernel",
                 "_norm_fwd_kernel", "_norm_bwd_kernel"):
        assert name in kernels, f"{name} was not launched by the capture workload"

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.tools.triton_aot", str(capability), "--captured",
                           str(captured)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all kernels compiled" in proc.stdout


def test_compile_time_tool_runs():
    """tests/tools/triton_compile_time.py (the numbers behind attn._prune: fp32 tiles, register
    spills) runs, here on small fp16 tiles."""
    pytest.importorskip("triton.backends.compiler", reason="triton without its GPU compiler")
    from triton.runtime.interpreter import InterpretedFunction
    if not hasattr(InterpretedFunction, "run"):  # the triton 3.0 of test-oldest: as above
        pytest.skip("triton 3.0: tests/tools/triton_aot.py targets the newer compiler API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.tools.triton_compile_time", "--dtype", "fp16",
                           "--head-dim", "16", "--tiles", "32x32"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == \
        [f"32x32 4 warps 2 stages {k}" for k in ("fwd", "dkdv", "dq")], proc.stdout
    if "ptxas: none found" not in proc.stdout.splitlines()[0]:   # the register report
        # (the numbers behind attn._prune's order)
        assert all(re.search(r", \d+ registers, spills \d+ B stored", line) for line in lines), proc.stdout


_NORM_FIT = r"""
import json, re
from tests.tools import triton_aot as aot
from tests.tools.triton_compile_time import resources
from fastattn.ops.norm import triton as norm
rows = []
for block, per_sm in norm._BWD_PROGRAMS_PER_SM.items():
    warps = norm._warps(block)
    for dy, st, rms in (("bf16", "fp32", False), ("fp32", "fp32", False), ("bf16", "bf16", True)):
        sig = dict(DY="*" + dy, DSUM="*" + st, S="*" + st, W="*fp32", Mean="*fp32", Rstd="*fp32",
                   DS="*" + st, DX="*bf16", DW_PART="*fp32", DB_PART="*fp32")
        flags = dict(HAS_DSUM=True, HAS_W=True, RMS=rms, HAS_DX=st == "fp32", WANT_DW=True,
                     WANT_DB=not rms, BLOCK_D=block)
        job = dict(module="fastattn.ops.norm.triton", kernel="_norm_bwd_kernel", signature=sig,
                   constants=flags, options=dict(num_warps=warps, num_stages=2), capability=90,
                   label="", aligned=True, specialize={"D": "D", "N": "D"})
        report = resources(aot.compile_job(job, report=False).asm["ptx"], 90)
        found = re.search(r"(\d+) registers", report)
        rows.append((block, per_sm, warps, dy, st, rms, int(found.group(1)) if found else None))
print(json.dumps(rows))
"""


def test_norm_backward_programs_fit_on_an_sm():
    """ops/norm/triton._BWD_PROGRAMS_PER_SM launches no more backward programs per SM than stay
    resident together on sm_90 (64K registers, 64 warps): one more would run as a second wave
    that costs a whole program's time. Registers from ptxas on the kernel lowered here."""
    pytest.importorskip("triton.backends.compiler", reason="triton without its GPU compiler")
    from triton.runtime.interpreter import InterpretedFunction
    if not hasattr(InterpretedFunction, "run"):  # the triton 3.0 of test-oldest: as above
        pytest.skip("triton 3.0: tests/tools/triton_aot.py targets the newer compiler API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _NORM_FIT], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    rows = json.loads(proc.stdout.splitlines()[-1])
    if any(r[-1] is None for r in rows):
        pytest.skip("no ptxas to report registers")
    for block, per_sm, warps, dy, st, rms, regs in rows:
        per_warp = -(-regs * 32 // 256) * 256          # registers are allocated per warp, by 256
        fit = min(65536 // (per_warp * warps), 64 // warps)
        assert per_sm <= fit, (f"block {block} ({dy} dy, {st} rows, {'rms' if rms else 'layer'} "
                               f"norm): {regs} registers fit {fit} programs per SM, the table "
                               f"launches {per_sm}")
