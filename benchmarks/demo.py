"""`make demo`: the main job on the embedded default, on the CPU, in about 15 minutes (2 cores).

pretrain -> SFT -> DPO -> GRPO on the reference GPT (preset "tiny"), no download, no GPU:

1. pretrain on the embedded Shakespeare corpus twice from the same seed, on plain PyTorch (SDPA,
   eager MLP, F.cross_entropy, torch.optim.AdamW) and on fastattn, side by side;
2. SFT of the fastattn checkpoint on a small set of 2-digit additions ("Q:47+35=" -> "82");
3. DPO on pairs sampled from the SFT policy and scored by the verifier (never the gold answer);
4. GRPO from the SFT policy with the verifier as reward.

Each stage prints its held-out accuracy (greedy, prompts no stage trained on) and, for SFT, DPO
and GRPO, a side-by-side step benchmark of the torch and fastattn backends at the stage's own
sequence shapes (``fastattn-train bench --stage ...``: time and peak memory per phase). A table
ends the run. DEMO_STEPS sets the pretraining steps (default 300); DEMO_FAST=1 shortens every
stage (a smoke run, a minute or two, each benchmark in one process); DEMO_PPO=1 adds two stages
after GRPO (50-57 minutes more, measured): a reward model on pairs sampled from the SFT policy, and PPO
against it (the verifier only logged). Outputs under benchmarks/out/demo/ (DEMO_OUT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("DEMO_OUT", "benchmarks/out/demo"))
FAST = os.environ.get("DEMO_FAST", "0") == "1"
PPO = os.environ.get("DEMO_PPO", "0") == "1"       # + reward model and PPO (50-57 minutes)
VOCAB = int(os.environ.get("DEMO_VOCAB", "512"))     # BPE vocabulary of the pretraining


def _train(*argv: str) -> None:
    # the demo's folders are its own: a rerun replaces the last one's runs (--overwrite)
    overwrite = ["--overwrite"] if argv[0] != "bench" else []
    subprocess.run([sys.executable, "-m", "fastattn.train", *argv, *overwrite], check=True)


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def _pretrain(backend: str, steps: int) -> dict:
    """One pretraining run in its own process (so its peak memory is its own)."""
    out = OUT / "pretrain" / backend
    _train("pretrain", "--preset", "tiny", "--backend", backend, "--max-steps", str(steps),
           "--vocab-size", str(VOCAB), "--batch-size", "8", "--eval-every", str(steps),
           "--eval-iters", "5", "--seed", "0", "--device", "cpu", "--out", str(out),
           "--sample-tokens", "120" if backend == "fastattn" else "0", "--no-progress")
    return _summary(out)


def _bench(stage: str, *argv: str) -> dict:
    out = OUT / f"bench_{stage}"
    # Each variant runs in two processes of its own (times, then peak memory) on the CPU; a fast
    # smoke run measures both in this one process instead (~5 s of start-up a process saved).
    isolate = ["--isolate", "no"] if FAST else []
    _train("bench", "--stage", stage, "--preset", "tiny", "--vocab-size", str(VOCAB),
           "--device", "cpu", "--seed", "0",
           "--out", str(out), *isolate, *argv)
    return json.loads((out / "bench.json").read_text())


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths))) for r in rows)


def _count(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> int:
    t_start = time.perf_counter()
    steps = int(os.environ.get("DEMO_STEPS", "20" if FAST else "300"))
    # The later stages need their steps: from a ~38% SFT policy (11-28), DPO gained 1.6 points
    # in 200 steps and 6.4 in 600; GRPO ended within noise after 150 rounds (each run first dips
    # for ~250 rounds) and gained 5 points in 1000 at lr 3e-5 with a 60-step warm-up. PPO's greedy
    # gain was +0.8 to +2.0 after 1000 rounds against the demo's reward model and still rising:
    # +4.4 after 2000 (benchmarks/results/align-rm-ppo-*.md).
    stage_steps = (60, 10, 4, 4) if FAST else (1500, 600, 1000, 2000)
    sft_steps, dpo_steps, grpo_steps, ppo_steps = stage_steps
    bench_steps = ["--steps", "2", "--warmup", "1"] if FAST else ["--steps", "12", "--warmup", "3"]
    print(f"fastattn demo: preset tiny on {torch.get_num_threads()} CPU threads, torch "
          f"{torch.__version__}: pretrain ({steps} steps) -> SFT -> DPO -> GRPO"
          + (" -> reward model -> PPO" if PPO else ""), flush=True)

    print("\n== 1. pretrain: torch, then fastattn (same seed, same batches) ==", flush=True)
    pre = {b: _pretrain(b, steps) for b in ("torch", "fastattn")}
    base, ours = pre["torch"], pre["fastattn"]
    pre_speedup = base["step_time_median_s"] / ours["step_time_median_s"]
    print(_table([("", "torch", "fastattn", "fastattn / torch"),
                  ("median step ms", f"{1e3 * base['step_time_median_s']:.0f}",
                   f"{1e3 * ours['step_time_median_s']:.0f}", f"{pre_speedup:.2f}x faster"),
                  ("tokens/s, steps 2 on", f"{base['tokens_per_s']:,.0f}",
                   f"{ours['tokens_per_s']:,.0f}",
                   f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}x"),
                  ("final loss", f"{base['final_loss']:.4f}", f"{ours['final_loss']:.4f}", ""),
                  ("val loss", f"{base['val_loss']:.4f}", f"{ours['val_loss']:.4f}", ""),
                  ("process peak MB", f"{base['peak_memory_bytes'] / 2**20:,.0f}",
                   f"{ours['peak_memory_bytes'] / 2**20:,.0f}",
                   f"{ours['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x"),
                  ("page faults per step", _count(base.get("page_faults_per_step")),
                   _count(ours.get("page_faults_per_step")), "")]))
    if (base.get("page_faults_per_step") or 0) > 1000 and not base.get("allocator_env"):
        # (benchmarks/RESULTS.md, "Reading the CPU numbers: page faults")
        print("Part of torch's step is page faults: under the C library's default malloc the "
              "large blocks freed\nin a step go back to the OS and are mapped and zeroed again "
              "in the next. MALLOC_TRIM_THRESHOLD_\nand MALLOC_MMAP_THRESHOLD_ (or jemalloc) keep "
              "them, torch's THP_MEM_ALLOC_ENABLE=1 makes them\nrarer; benchmarks/RESULTS.md "
              "gives the ratios with each.", flush=True)

    # The addition task's shapes: prompt "Q:ab+cd=" (8 tokens), completion <= 5 tokens.
    task = ["--digits", "2", "--seed", "0", "--no-progress"]
    shapes = ["--prompt-len", "8", "--completion-len", "5"]
    stages = {}

    # The problem sets (kept in the checkpoints, so DPO and GRPO use the same ones): 1000 SFT
    # problems, 2000 prompts for pair building / GRPO (many: on a few hundred the later stages
    # learn those prompts, not addition), 500 held out. SFT's batch of 128 at lr 1e-3: at 32
    # sequences (~130 answer tokens a step) held-out accuracy was 7-20% after 2000-6000 steps
    # and, on runs that took off, up to 38% depending on float rounding; at 128 and lr 2e-3 two
    # runs reached 51-54% in 1500 steps and a third 14%; at lr 1e-3 the runs took off sooner
    # (benchmarks/results/sft-sensitivity-epyc2c-2026-11-30.md).
    sft_batch = "32" if FAST else "128"
    print("\n== 2. SFT on 1000 additions (fastattn) ==", flush=True)
    _train("sft", "--init", str(OUT / "pretrain" / "fastattn"), "--out", str(OUT / "sft"),
           "--n-train", "1000", "--n-pairs", "100" if FAST else "2000",
           "--n-eval", "50" if FAST else "500", "--batch-size", sft_batch,
           "--max-steps", str(sft_steps), "--lr", "1e-3", *task)
    stages["SFT"] = (_summary(OUT / "sft"),
                     _bench("sft", "--batch-size", sft_batch, *shapes, *bench_steps))

    print("\n== 3. DPO (+ NLL on the chosen, RPO) on pairs sampled from the SFT policy ==",
          flush=True)
    _train("dpo", "--init", str(OUT / "sft"), "--out", str(OUT / "dpo"),
           "--max-steps", str(dpo_steps), *task)
    stages["DPO"] = (_summary(OUT / "dpo"),
                     _bench("dpo", "--batch-size", "32", *shapes, *bench_steps))

    print("\n== 4. GRPO from the SFT policy, verifier reward ==", flush=True)
    _train("grpo", "--init", str(OUT / "sft"), "--out", str(OUT / "grpo"),
           "--max-steps", str(grpo_steps), "--lr", "3e-5", "--warmup-steps", "60", *task)
    stages["GRPO"] = (_summary(OUT / "grpo"),
                      _bench("grpo", "--batch-size", "16", "--group-size", "8", *shapes,
                             *bench_steps))

    if PPO:
        # A stronger reward model than the defaults give: every differently-scored pair of 16
        # samples on up to 8000 prompts (--n-pairs 8000: on the 2-digit task every problem that
        # neither SFT trained on nor the evaluation holds, 3550). Reward models trained this way
        # vary: 71-87% of held-out pairs ranked right, and PPO gained +0.4 on the weakest and
        # +4.8 ... +6.0 on the others (benchmarks/results/align-ppo-prompts-epyc2c-2026-11-30.md).
        print("\n== 5. reward model (Bradley-Terry) on pairs sampled from the SFT policy ==",
              flush=True)
        _train("rm", "--init", str(OUT / "sft"), "--out", str(OUT / "rm"),
               "--n-pairs", "200" if FAST else "8000", "--k", "16",
               "--max-steps", "10" if FAST else "3000", "--lr", "3e-4", *task)
        rm = _summary(OUT / "rm")
        print(f"reward model: {rm['pairs']} pairs; held-out pair accuracy "
              f"{_pct(rm['initial_pair_accuracy'])} -> {_pct(rm['pair_accuracy'])}; best of "
              f"{rm['k']} SFT samples on the held-out problems as it judges: "
              f"{_pct(rm['rm_best_of_k_accuracy'])} (a random sample: "
              f"{_pct(rm['eval_sample_accuracy'])})", flush=True)
        print("\n== 6. PPO from the SFT policy against the reward model ==", flush=True)
        # PPO's prompts: the reward model's 3550 (--n-pairs 8000), not only the 2000 pair
        # prompts of DPO and GRPO; from one SFT checkpoint against one reward model, +6.0
        # points held out after 2000 rounds on the 3550, +4.8 on the 2000 (one run each).
        _train("ppo", "--init", str(OUT / "sft"), "--reward-model", str(OUT / "rm"),
               "--out", str(OUT / "ppo"), "--max-steps", str(ppo_steps), "--lr", "3e-5",
               "--warmup-steps", "60", "--batch-size", "8" if FAST else "64",
               "--n-pairs", "200" if FAST else "8000", *task)
        stages["PPO"] = (_summary(OUT / "ppo"), None)

    sft_acc = stages["SFT"][0]["eval_accuracy"]
    rows = [("stage", "held-out acc", "vs SFT", "step: fastattn vs torch",
             "log-prob peak mem", "step ms torch / fastattn")]
    rows.append(("pretrain", "-", "", f"{pre_speedup:.2f}x", "-",
                 f"{1e3 * base['step_time_median_s']:.0f} / "
                 f"{1e3 * ours['step_time_median_s']:.0f}"))
    for name, (s, b) in stages.items():
        res = {r["variant"]: r for r in b["results"]} if b else {}
        t, f = res.get("torch eager", {}), res.get("fastattn", {})
        ok = "error" not in t and "error" not in f and t and f
        acc = s["eval_accuracy"]
        rows.append((name, _pct(acc),
                     "" if name == "SFT" else f"{100 * (acc - sft_acc):+.1f} pts",
                     f"{f['speedup_vs_baseline']:.2f}x" if ok else "failed" if b else "-",
                     (f"{f['logprob_phases_peak_ratio']:.2f}x"
                      if ok and f.get("logprob_phases_peak_ratio") else "-"),
                     (f"{1e3 * t['step_time_median_s']:.0f} / {1e3 * f['step_time_median_s']:.0f}"
                      if ok else "-")))
    print(f"\n== summary ({(time.perf_counter() - t_start) / 60:.1f} min) ==")
    print(f"SFT held-out accuracy {_pct(sft_acc)} (from "
          f"{_pct(stages['SFT'][0]['initial_eval_accuracy'])} after pretraining); "
          f"{stages['SFT'][0]['task']['n_eval']} held-out problems, greedy decoding")
    print(_table(rows))
    print("(step speedups: median step time, torch eager / fastattn, each backend in its own "
          "process, measured side by side in this run (SFT, DPO, GRPO: `fastattn-train bench "
          "--stage` at the stage's shapes); tokens/s over the pretraining run's steps after the "
          "first (which pays for warm-up), so later steps' warm-up still counts; process peak: "
          "each pretraining run's resident-set high-water mark in its own process (imports "
          "included; read before the fastattn run samples its text); log-prob "
          "peak mem: "
          "peak memory of the log-prob forward/backward phases, fastattn / torch. Summaries, "
          "logs and bench.json files under benchmarks/out/demo/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
