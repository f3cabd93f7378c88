"""The Triton attention kernels lower to a Hopper (sm_90) binary on this CPU-only machine:
catches what the interpreter cannot see (it runs the kernels' Python, never the compiler).
Other architectures: `python -m tests.tools.triton_aot 80`."""

import os
import subprocess
import sys

import pytest


def test_attention_kernels_compile_for_gpu(capability=90):
    pytest.importorskip("triton.backends.compiler", reason="triton without its GPU compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.tools.triton_aot", str(capability)],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all kernels compiled" in proc.stdout
