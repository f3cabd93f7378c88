"""The stand-alone CPU benchmark scripts run end to end at toy sizes and print their results
(their numbers are for the README, not asserted here: timing belongs in benchmarks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, expect", [
    (["benchmarks.adam_cpu_ceiling", "--tensors", "3", "--numel", "1000", "--rounds", "3",
      "--threads", "1"],
     ["fastattn", "torch fused", "a.add_(b)", "median of per-round ratios"]),
    (["benchmarks.ffn_cpu_ceiling", "--tokens", "16", "--dim", "8", "--hidden", "32",
      "--rounds", "2"],
     ["eager", "fastattn", "GEMMs alone", "the fusion ceiling", "fastattn (ATen GEMMs)",
      "oneDNN where faster"]),
    (["benchmarks.ffn_cpu_ceiling", "--block", "swiglu", "--tokens", "16", "--dim", "8",
      "--hidden", "32", "--rounds", "2"],
     ["SwiGLU fwd+bwd 16x8->32", "GEMMs alone / routed"]),
    pytest.param(["benchmarks.cpu_gemm_routes", "--tokens", "16", "--rounds", "1", "--shapes",
                  "8:24"], ["| 8 -> 24 | forward x W^T |", "| 8 -> 24 | weight grad dY^T x |"],
                 marks=pytest.mark.skipif(
                     not (torch.backends.mkldnn.is_available()
                          and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                     reason="this torch has no oneDNN linear")),
    (["benchmarks.host_overhead", "--calls", "5", "--rounds", "1"],
     ["| decode_attention", "| cross_entropy", "fastattn via dispatcher", "forward+backward",
      "| gpt training step", "plain norms"]),
    (["benchmarks.host_overhead", "--calls", "3", "--profile", "mlp gelu, forward"],
     ["## mlp gelu, forward+backward", "cProfile of 3 calls", "tottime"]),
    (["benchmarks.profile_step", "--preset", "tiny", "--device", "cpu", "--batch-size", "1",
      "--seq-len", "16", "--vocab", "64", "--steps", "1", "--warmup", "1", "--top", "3"],
     ["== torch: tiny", "== fastattn: tiny", "step wall"]),
    (["benchmarks.attention_logit_precision"],
     ["| max logit | grad | torch fp32 | cpu | triton |", "| dk |"]),
])
def test_script_runs(args, expect):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for word in expect:
        assert word in proc.stdout, (word, proc.stdout)


def test_triton_host_path_runs():
    """benchmarks/triton_host_path.py (the Triton attention launches' host path without a GPU:
    a stand-in driver and stand-in compiled kernels) runs; it needs triton.knobs (>= 3.4)."""
    pytest.importorskip("triton.knobs", reason="triton < 3.4: no triton.knobs")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.triton_host_path", "--calls", "5",
                           "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for word in ("| forward (1 launch)", "| backward (3 launches)", "through Autotuner.run"):
        assert word in proc.stdout, (word, proc.stdout)


def test_bench_table_page_faults_and_allocator(tmp_path, monkeypatch):
    """make bench's table and CSV carry each call's page faults and the allocator's settings
    (CPU times of calls that allocate large tensors depend on both)."""
    from benchmarks.common import Result, environment, table, write
    from fastattn.train.hostmem import allocator_env
    for key in allocator_env():
        monkeypatch.delenv(key)
    assert environment()["allocator"] == "the C library's defaults"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")
    assert environment()["allocator"] == ("MALLOC_TRIM_THRESHOLD_=4294967296, "
                                          "THP_MEM_ALLOC_ENABLE=1")
    results = [Result("ce", "torch eager", 3.0, extra={"page faults": 393219}),
               Result("ce", "fastattn", 1.0, extra={"page faults": 7})]
    text = table(results)
    assert "page faults 393219" in text and "page faults 7" in text and "3.00x" in text
    csv_path, _ = write(results, "faults", tmp_path)
    rows = csv_path.read_text().splitlines()
    assert rows[0].endswith(",allocator") or ",allocator," in rows[0]
    assert "MALLOC_TRIM_THRESHOLD_=4294967296, THP_MEM_ALLOC_ENABLE=1" in rows[1]
    assert "page faults 7" in rows[2]


def test_interleaved_rounds_order_setup_and_best_of(monkeypatch):
    """benchmarks.common.interleaved: every round calls each function (rotated on request),
    runs ``before`` ahead of every call, keeps the fastest of ``best_of`` calls."""
    from benchmarks import common
    clock = iter(range(10_000))
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    spans = {"a": iter([0, 0, 5, 1, 7, 9, 2, 4]), "b": iter([0, 0, 3, 3, 3, 3, 3, 3])}

    def make(name):
        def fn():
            calls.append(name)
            for _ in range(next(spans[name])):   # each call lasts that many clock ticks + 1
                next(clock)
        return fn

    times = common.interleaved({"a": make("a"), "b": make("b")}, 3, best_of=2, rotate=True,
                               before=lambda: calls.append("-"))
    timed = [c for c in calls if c != "-"][4:]          # after two untimed warm-up calls each
    assert timed == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert calls.count("-") == 16                        # before every call, warm-ups included
    assert times == {"a": [2.0, 8.0, 3.0], "b": [4.0, 4.0, 4.0]}
    with pytest.raises(ValueError, match="rounds"):
        common.interleaved({"a": make("a")}, 0)


def test_a_case_without_torch_eager_is_compared_with_its_fastest_pytorch_row():
    """Attention against the SDPA backends, GEMMs against cuBLAS: the speedup is against the
    fastest PyTorch implementation measured (a failed one, NaN, never counts)."""
    from benchmarks.common import Result, ratios
    results = [Result("attn", "fastattn[triton]", 2.0), Result("attn", "sdpa flash", 3.0),
               Result("attn", "sdpa cudnn", 1.6), Result("attn", "sdpa efficient FAILED: X",
                                                           float("nan")),
               Result("ce", "torch eager", 4.0), Result("ce", "torch.compile", 1.0),
               Result("ce", "fastattn", 2.0)]
    assert ratios(results) == {0: 0.8, 1: 1.6 / 3.0, 2: 1.0, 4: 1.0, 5: 4.0, 6: 2.0}


@pytest.mark.parametrize("env", [
    {},                                                                  # glibc's defaults
    {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"},  # kept
])
def test_cpu_peak_counts_what_a_call_allocates_whatever_the_allocator_keeps(env):
    """The op benchmarks' CPU peak after a warm-up (a fresh process each: glibc reads its
    settings at start-up): a call holding 64 MiB, then another 64 MiB after freeing the first,
    peaks at 64 MiB; one holding both at once at 128 -- also where freed blocks stay resident
    and the RSS would not rise."""
    from fastattn.train.hostmem import allocator_env
    if "LD_PRELOAD" in os.environ:
        pytest.skip("a preloaded allocator would decide for every case")
    clean = {k: v for k, v in os.environ.items() if k not in allocator_env()}
    code = """if True:
        import torch
        from benchmarks.common import cpu_peak_mb
        def one_after_another():
            for _ in range(2):
                torch.ones(16 << 20).sum()
        def both():
            a, b = torch.ones(16 << 20), torch.ones(16 << 20)
            return float(a.sum() + b.sum())
        for _ in range(4):
            one_after_another(), both()
        print("PEAKS", cpu_peak_mb(one_after_another), cpu_peak_mb(both))
    """
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**clean, **env}, timeout=300)
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()
    sequential, together = (float(w) for w in words[words.index("PEAKS") + 1:][:2])
    assert 64 <= sequential < 65 and 128 <= together < 129, res.stdout
