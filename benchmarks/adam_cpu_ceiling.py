"""How close a fused AdamW step is to the CPU's memory bandwidth: fastattn's and torch's
fused=True step against a plain streaming op, interleaved rounds in one process, medians.

    python -m benchmarks.adam_cpu_ceiling [--tensors 32 --numel 1048576 --rounds 25 --threads N]

A fused step reads param, grad, m, v and writes param, m, v: 28 bytes per fp32 parameter, the
least any implementation can move. The reference rate is that of a.add_(b) over the same number
of elements (12 bytes each: a and b read, a written in place, as the step writes what it read;
ATen's vectorised loop on the same threads): a step moving its 28 bytes at that rate or faster
is memory bound, and no kernel can then be much faster than another. The
per-round ratio is taken inside each round (both steps a few ms apart), which cancels most of
the drift a shared machine has between rounds; the order within a round rotates.
"""

import argparse
import platform
import statistics

import torch

import fastattn
from benchmarks.common import interleaved


def _params(n_tensors: int, numel: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(numel, generator=g).requires_grad_() for _ in range(n_tensors)]
    for p in ps:
        p.grad = torch.randn(numel, generator=g)
    return ps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=32)
    p.add_argument("--numel", type=int, default=1 << 20)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.tensors * args.numel
    ours = fastattn.optim.AdamW(_params(args.tensors, args.numel, 0), lr=1e-3)
    fused = torch.optim.AdamW(_params(args.tensors, args.numel, 0), lr=1e-3, fused=True)
    a, b = torch.randn(n), torch.randn(n)
    fns = {"fastattn": ours.step, "torch fused": fused.step,
           "add_ (bandwidth)": lambda: a.add_(b)}
    times = interleaved(fns, args.rounds, rotate=True)  # each op leads a third of the rounds
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    bandwidth = 12 * n / (med["add_ (bandwidth)"] * 1e-3) / 1e9
    ratio = [f / o for f, o in zip(times["torch fused"], times["fastattn"])]
    print(f"AdamW step {args.tensors} x {args.numel} fp32, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds")
    for k in ("fastattn", "torch fused"):
        rate = 28 * n / (med[k] * 1e-3) / 1e9
        print(f"  {k:12s} {med[k]:8.2f} ms  {rate:5.1f} GB/s  {rate / bandwidth:5.2f}x add_'s rate")
    print(f"  a.add_(b)    {med['add_ (bandwidth)']:8.2f} ms  {bandwidth:5.1f} GB/s (12 B x {n})")
    print(f"  torch fused / fastattn: median of per-round ratios {statistics.median(ratio):.3f} "
          f"(min {min(ratio):.3f}, max {max(ratio):.3f}); ratio of medians "
          f"{med['torch fused'] / med['fastattn']:.3f}")


if __name__ == "__main__":
    main()
