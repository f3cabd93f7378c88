"""``fastattn-train bench --stage sft|dpo|grpo``: one alignment step, phase by phase, with the torch
and the fastattn backend side by side.

    python -m fastattn.train bench --stage grpo --preset tiny --batch-size 8 --group-size 8
    python -m fastattn.train bench --stage dpo --preset gpt2-124m --device cuda \\
        --prompt-len 256 --completion-len 256

Each variant runs the training loops' own step functions (``align.dpo_step``,
``align.grpo_step``) on a freshly initialised model of the preset, with a frozen copy as the
reference, on synthetic sequences of random token ids (token 0 is the end-of-text token), so
the numbers depend on shapes only, not on a corpus or a checkpoint:

* SFT: ``--batch-size`` sequences, prompt and completion lengths as for DPO.
* DPO: ``--batch-size`` pairs; prompts of uniform random length in [P/2, P], chosen and
  rejected completions in [C/4, C] (P, C: ``--prompt-len``, ``--completion-len``). The reference
  log-probs are computed on the fly (the ``ref_logprobs`` phase; the training loop computes
  them once before it starts, so its steps skip that phase).
* GRPO: ``--batch-size`` prompts of length P, ``--group-size`` samples each, generated with the
  KV cache for C new tokens; each completion is then cut to a uniform random length in [C/4, C]
  (as if it had sampled end-of-text there) and given a uniform random reward. Reference
  log-probs once, then ``--ppo-epochs`` updates (the first one's log-probs are the old ones).

Phases (``align.Phases``): wall time with the device synchronised at both ends, and peak memory
above the memory in use when the phase starts: CUDA ``max_memory_allocated`` (one run); CPU the
process's resident-set high-water mark, measured in a second, shorter run of each variant in
its own process with glibc told to return blocks over 64 KiB to the system on free
(``MALLOC_MMAP_THRESHOLD_``), so that the RSS follows the live tensors (that slows allocation,
so the times come from the first run, with the default allocator). Times are medians over the
timed steps; peaks their maximum. The step's peak is the timed steps' too, above the memory in
use before the model was built (``peak_memory_with_warmup_bytes``: the warm-up steps included,
with their one-time memory: Triton's autotuning, first-call caches). Autocast bf16 on CUDA, fp32
on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .hostmem import allocator_env, describe_allocator, minor_page_faults

STAGES = ("sft", "dpo", "grpo")
VARIANTS = ("torch eager", "fastattn")      # the first is the baseline of the ratios
PHASES = {"sft": ("policy_logprobs", "backward", "optimizer"),
          "dpo": ("ref_logprobs", "policy_logprobs", "backward", "optimizer"),
          "grpo": ("generation", "ref_logprobs", "policy_logprobs", "backward", "optimizer")}
LOGPROB_PHASES = ("old_logprobs", "ref_logprobs", "policy_logprobs", "backward")
EOS = 0


def _config(args):
    from ..models.gpt import PRESETS, config as make_config
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = dict(args.overrides)
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    cfg = make_config(args.preset, **overrides)
    need = args.prompt_len + args.completion_len
    if need > cfg.max_seq_len:
        raise ValueError(f"--prompt-len + --completion-len = {need} exceeds max_seq_len "
                         f"{cfg.max_seq_len} of preset {args.preset!r} (raise it with --set "
                         f"max_seq_len=N)")
    return cfg


def check_args(args) -> None:
    for name in ("batch_size", "prompt_len", "completion_len", "group_size", "ppo_epochs",
                 "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    if args.prompt_len < 2 or args.completion_len < 4:
        raise ValueError("bench --stage needs --prompt-len >= 2 and --completion-len >= 4")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    _config(args)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def run_variant(args, name: str, memory: bool = True) -> dict:
    """The timed steps of one variant in this process; ``memory``: measure the phases' peaks
    too."""
    from . import align
    from .pretrain import _autocast, bench_model, resolve_device
    backend = {"torch eager": "torch", "fastattn": "fastattn"}[name]
    device = resolve_device(args.device)
    cfg = _config(args)
    P, C, V = args.prompt_len, args.completion_len, cfg.vocab_size
    model, opt, clip_grad_norm_, base = bench_model(args, cfg, backend, device)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    phases = align.Phases(device, memory=memory)

    def update(loss):
        with torch.autocast(device.type, enabled=False):   # the step runs under autocast
            with phases("backward"):
                loss.backward()
            with phases("optimizer"):
                if args.clip > 0:
                    clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return args.lr

    rng = random.Random(f"bench/{args.stage}/{args.seed}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    grpo_args = SimpleNamespace(group_size=args.group_size, temperature=1.0,
                                ppo_epochs=args.ppo_epochs, clip_eps=0.2, beta=args.beta)

    def score(comps):
        out = []
        for cs in comps:
            row = []
            for c in cs:
                c = list(c[:-1]) if c and c[-1] == EOS else list(c)    # sampled end-of-text
                n = rng.randint(max(1, C // 4), C)
                row.append(c[:n - 1] + [EOS])
            out.append(row)
        return out, torch.tensor([[rng.random() for _ in cs] for cs in comps])

    steps = []
    warm_peak = 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup and base is not None:
            # the timed steps' peak apart: the warm-up's one-time memory (Triton autotuning,
            # first-call caches) is not the step's
            warm_peak = _run_peak(phases, device, base, memory)
            phases.restart_high_water_mark()
        phases.reset()
        with _autocast(device):
            t0 = _now(device)
            f0 = minor_page_faults()
            if args.stage in ("sft", "dpo"):
                seqs, starts = [], []
                for _ in range(args.batch_size):
                    prompt = _tokens(rng, rng.randint(max(1, P // 2), P), V)
                    seqs.append(prompt + _tokens(rng, rng.randint(C // 4, C) - 1, V) + [EOS])
                    starts.append(len(prompt))
                if args.stage == "dpo":
                    for k in range(args.batch_size):   # the rejected completions, same prompts
                        prompt = seqs[k][:starts[k]]
                        seqs.append(prompt + _tokens(rng, rng.randint(C // 4, C) - 1, V) + [EOS])
                    starts = starts * 2
                batch = align.make_batch(seqs, starts, EOS, device, align.PAD_MULTIPLE)
                if args.stage == "sft":
                    rec = align.sft_step(model, batch, update, phases)
                else:
                    rec = align.dpo_step(model, batch, None, None, args.beta, update, phases,
                                         ref=ref)
            else:
                prompts = [_tokens(rng, P, V) for _ in range(args.batch_size)]
                rec = align.grpo_step(model, ref, prompts, score, grpo_args, max_new=C,
                                      eos=EOS, generator=gen, update=update, phases=phases)
            step_s = _now(device) - t0
            faults = minor_page_faults() - f0
        if i >= args.warmup:
            steps.append({"step_s": step_s, "faults": faults, "times": dict(phases.times),
                          "peaks": dict(phases.peaks), "loss": rec["loss"],
                          "tokens": rec["tokens"]})
    peak = _run_peak(phases, device, base, memory)
    names = PHASES[args.stage]
    return {"variant": name, "backend": backend, "memory_measured": memory,
            "step_time_median_s": statistics.median(s["step_s"] for s in steps),
            # host memory mapped afresh per step (see the pretraining bench)
            "page_faults_per_step": statistics.median(s["faults"] for s in steps),
            "phase_time_median_s": {n: statistics.median(s["times"].get(n, 0.0) for s in steps)
                                    for n in names},
            "phase_peak_bytes": {n: max(s["peaks"].get(n, 0) for s in steps) for n in names},
            "peak_memory_bytes": peak,
            "peak_memory_with_warmup_bytes": None if peak is None else max(peak, warm_peak),
            "losses": [s["loss"] for s in steps],
            "tokens_per_step": steps[-1]["tokens"], "params": model.num_params()}


def _run_peak(phases, device, base, memory: bool):
    """The peak above ``base`` since the model was built, or since the last restart. Phases
    reset the device's peak counter at every phase: with ``memory`` the run's peak is their
    running maximum."""
    from .pretrain import peak_since
    if memory and base is not None:
        peak = phases.high_water_mark() - base
        return peak if device.type == "cuda" else max(0, peak)
    return peak_since(device, base)


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _run_child(args, name: str, out: Path, memory: bool) -> dict:
    """``run_variant`` in a fresh process (its peak memory is its own). The memory pass runs
    with glibc returning every block over 64 KiB to the system on free, so the RSS follows the
    live tensors (that slows allocation down, hence a separate pass for the times)."""
    from .pretrain import run_variant_process
    fd, result = tempfile.mkstemp(prefix=".bench_", suffix=".json", dir=out)
    os.close(fd)
    env = dict(os.environ)
    fields = {k: v for k, v in vars(args).items() if k not in ("run", "given_options")}
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        fields.update(steps=min(args.steps, 2), warmup=min(args.warmup, 1))
    payload = json.dumps({**fields, "variant_name": name, "result": result, "memory": memory})
    return run_variant_process([sys.executable, "-m", "fastattn.train.align_bench", payload],
                               result, env)


def bench_stage(args) -> dict:
    from .pretrain import _versions, check_bench_results, resolve_device, run_bench_variants
    check_args(args)
    device = resolve_device(args.device)
    cfg = _config(args)
    names = [n.strip() for n in (args.variants or ",".join(VARIANTS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"--variants for --stage {args.stage}: unknown {unknown or 'empty list'}"
                         f"; choose from {', '.join(VARIANTS)}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def run_one(name: str) -> dict:
        if not isolate:
            return run_variant(args, name)
        r = _run_child(args, name, out, memory=False)
        mem = _run_child(args, name, out, memory=True)
        r.update(phase_peak_bytes=mem["phase_peak_bytes"],
                 peak_memory_bytes=mem["peak_memory_bytes"],
                 peak_memory_with_warmup_bytes=mem["peak_memory_with_warmup_bytes"],
                 memory_measured=True)
        return r

    results = run_bench_variants(names, run_one, f"bench --stage {args.stage}")
    base = results[0]
    for r in results:
        if "error" in r or "error" in base:
            continue
        r["phase_speedup"] = {n: (base["phase_time_median_s"][n] / t if t > 0 else None)
                              for n, t in r["phase_time_median_s"].items()}
        r["phase_memory_ratio"] = {n: (p / base["phase_peak_bytes"][n]
                                       if base["phase_peak_bytes"][n] > 0 else None)
                                   for n, p in r["phase_peak_bytes"].items()}
        lp = [n for n in LOGPROB_PHASES if n in r["phase_peak_bytes"]]
        ours = max(r["phase_peak_bytes"][n] for n in lp)
        theirs = max(base["phase_peak_bytes"][n] for n in lp)
        r["logprob_phases_peak_ratio"] = ours / theirs if theirs > 0 else None
    report = {
        "stage": args.stage, "preset": args.preset, "config": dataclasses.asdict(cfg),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "group_size": args.group_size if args.stage == "grpo" else None,
        "ppo_epochs": args.ppo_epochs if args.stage == "grpo" else None,
        "prompt_len": args.prompt_len, "completion_len": args.completion_len,
        "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "memory": ("torch.cuda.max_memory_allocated above the phase's starting allocation"
                   if device.type == "cuda" else
                   "rise of the process RSS high-water mark over the phase (clear_refs + "
                   "VmHWM)" + (", in a separate run of each variant in its own process with "
                               "glibc's mmap threshold at 64 KiB" if isolate else "")),
        "baseline": names[0], "results": results,
        "allocator_env": allocator_env(),   # of the timed runs (the memory pass sets its own)
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    check_bench_results(results, f"bench --stage {args.stage}")
    return report


def format_table(report: dict) -> str:
    stage = report["stage"]
    what = (f"{report['batch_size']} sequences" if stage == "sft" else
            f"{report['batch_size']} pairs" if stage == "dpo" else
            f"{report['batch_size']} prompts x {report['group_size']} samples, "
            f"{report['ppo_epochs']} updates")
    lines = [f"bench --stage {stage}: preset {report['preset']}, {what}, prompt <= "
             f"{report['prompt_len']} + completion <= {report['completion_len']} tokens, "
             f"{report['steps']} timed steps after {report['warmup']} warm-up, "
             f"{report['device']} ({report['device_name']}, {report['threads']} threads), "
             f"torch {report['torch']}, {report['date']}",
             f"peak memory per phase: {report['memory']}"]
    ok = [r for r in report["results"] if "error" not in r]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['variant']}: failed: {r['error'][:300]}")
    if len(ok) < 2:
        return "\n".join(lines)
    base, ours = ok[0], ok[-1]
    lines += ["", f"| {'phase':<16} | {base['variant'] + ' ms':>15} | {ours['variant'] + ' ms':>12}"
              f" | {'speedup':>7} | {base['variant'] + ' MB':>15} | "
              f"{ours['variant'] + ' MB':>12} | {'memory':>6} |",
              "| " + " | ".join(["-" * 16, "-" * 14 + ":", "-" * 11 + ":", "-" * 6 + ":",
                                "-" * 14 + ":", "-" * 11 + ":", "-" * 5 + ":"]) + " |"]

    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    for n in PHASES[stage]:
        tb, to = base["phase_time_median_s"][n], ours["phase_time_median_s"][n]
        mb, mo = base["phase_peak_bytes"][n], ours["phase_peak_bytes"][n]
        lines.append(f"| {n:<16} | {1e3 * tb:>15.1f} | {1e3 * to:>12.1f} | "
                     f"{ratio(tb / to if to > 0 else None):>7} | {mb / 2**20:>15.1f} | "
                     f"{mo / 2**20:>12.1f} | {ratio(mo / mb if mb > 0 else None):>6} |")
    pb, po = base["peak_memory_bytes"], ours["peak_memory_bytes"]
    lines.append(f"| {'step':<16} | {1e3 * base['step_time_median_s']:>15.1f} | "
                 f"{1e3 * ours['step_time_median_s']:>12.1f} | "
                 f"{ratio(ours.get('speedup_vs_baseline')):>7} | "
                 f"{(pb or 0) / 2**20:>15.1f} | {(po or 0) / 2**20:>12.1f} | "
                 f"{ratio(po / pb if pb and po else None):>6} |")
    lines.append(f"(step MB: the timed steps' peak above the memory before the model was built,"
                 f" the warm-up's apart (peak_memory_with_warmup_bytes); "
                 f"log-prob phases' peak, fastattn / torch: "
                 f"{ratio(ours.get('logprob_phases_peak_ratio'))})")
    if "page_faults_per_step" in base and "page_faults_per_step" in ours:
        lines.append(f"page faults per step (median): {base['variant']} "
                     f"{base['page_faults_per_step']:,.0f}, {ours['variant']} "
                     f"{ours['page_faults_per_step']:,.0f}; allocator: "
                     + describe_allocator(report.get("allocator_env") or {}))
    return "\n".join(lines)


def _child_main(payload: str) -> int:
    d = json.loads(payload)
    args = SimpleNamespace(**d)
    args.overrides = [tuple(x) for x in args.overrides]
    result = run_variant(args, d["variant_name"], memory=d["memory"])
    Path(d["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
