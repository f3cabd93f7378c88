"""Where a GPT training step's time goes: torch.profiler over a few steps, per backend.

    python -m benchmarks.profile_step [--preset gpt2-124m] [--device cuda] [--batch-size 16]
        [--seq-len 1024] [--vocab 44532] [--steps 3] [--backends torch,fastattn] [--out DIR]

Synthetic tokens (no corpus), the step of `python -m fastattn.train bench` (bf16 autocast on
CUDA, clipping at 1.0, AdamW). For each backend it prints the wall time per step, the time the
device was busy (the kernels' own time, summed), the kernels that took most of it and the host
operators that took most CPU time; the full tables go to DIR/profile_<backend>.txt. A step whose
wall time is far above its device time waits on the host (launch overhead, a sync).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastattn.models.gpt import config as gpt_config
from fastattn.train.pretrain import _sync, bench_model, bench_step


def _device_time(evt) -> float:
    """An averaged event's own device time in microseconds (the name changed in torch 2.4+)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def run(backend: str, args) -> str:
    device = torch.device(args.device)
    cfg = gpt_config(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 1))
    # the bench's model, optimizer and clipping for this backend
    model, opt, clip, _ = bench_model(SimpleNamespace(seed=0, lr=3e-4, weight_decay=0.1), cfg,
                                      backend, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g).to(device)

    def step():   # (y is drawn in range: the loss may skip its target check)
        bench_step(model, opt, clip, x, y, device)

    for _ in range(args.warmup):
        step()
    _sync(device)
    walls = []
    for _ in range(args.steps):           # timed without the profiler's own overhead
        t0 = time.perf_counter()
        step()
        _sync(device)
        walls.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        _sync(device)
    avgs = prof.key_averages()
    # The kernels' rows: an operator's row repeats the time of the kernels it launched, and a
    # user annotation's row (Optimizer.step#..., on the device too) that of the ones inside it.
    kernels = [e for e in avgs if e.device_type == DeviceType.CUDA and _device_time(e) > 0
               and not getattr(e, "is_user_annotation", False)
               and not e.key.startswith(("Optimizer.", "ProfilerStep"))]
    busy_ms = sum(_device_time(e) for e in kernels) / 1e3 / args.steps
    wall_ms = statistics.median(walls) * 1e3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = (f"== {backend}: {args.preset}, batch {args.batch_size} x seq {args.seq_len}, vocab "
            f"{args.vocab}, {device} ({name}), "
            f"FASTATTN_AUTOTUNE={os.environ.get('FASTATTN_AUTOTUNE', '1')}\n"
            f"step wall {wall_ms:.1f} ms (median of {args.steps}); device busy "
            f"{busy_ms:.1f} ms per step ({busy_ms / wall_ms:.0%} of the wall)\n")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        dev_table = avgs.table(sort_by=key.replace("cuda", "device"), row_limit=args.rows)
    except (AttributeError, KeyError):
        dev_table = avgs.table(sort_by=key, row_limit=args.rows)
    cpu_table = avgs.table(sort_by="self_cpu_time_total", row_limit=args.rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile_{backend}.txt"), "w") as f:
            f.write(head + "\n-- by device time\n" + dev_table + "\n-- by host time\n" + cpu_table)
    # The short form: the kernels with most device time, one line each.
    lines = [head.rstrip("\n")]
    for e in sorted(kernels, key=_device_time, reverse=True)[:args.top]:
        t = _device_time(e) / 1e3 / args.steps
        lines.append(f"  {t:7.2f} ms {e.count // args.steps:5d}x  {e.key[:110]}")
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=44532, help="the BPE corpus's vocabulary size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backends", default="torch,fastattn")
    p.add_argument("--top", type=int, default=15, help="kernels printed per backend")
    p.add_argument("--rows", type=int, default=40, help="rows of the tables in --out")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(run(backend, args), flush=True)


if __name__ == "__main__":
    main()
