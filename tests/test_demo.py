"""`make demo` end to end, shortened (DEMO_FAST=1), with the optional reward-model and PPO stages
(DEMO_PPO=1): every stage runs and the table prints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_fast(tmp_path):
    env = dict(os.environ, DEMO_FAST="1", DEMO_PPO="1", DEMO_OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("pretrain", "SFT", "DPO", "GRPO", "PPO"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "failed" not in out.split("== summary")[1]
    for name in ("sft", "dpo", "grpo"):
        assert (tmp_path / name / "summary.json").exists()
        assert (tmp_path / f"bench_{name}" / "bench.json").exists()
    for name in ("rm", "ppo"):
        assert (tmp_path / name / "summary.json").exists()
    assert "reward model:" in out and "held-out pair accuracy" in out
    assert "page faults per step" in out.split("== 2.")[0]
