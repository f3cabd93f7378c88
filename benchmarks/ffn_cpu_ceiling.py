"""The CPU ceiling of FFN fusion: GELU MLP forward+backward (eager, fastattn) against its six
GEMMs alone, interleaved rounds in one process, medians.

    python -m benchmarks.ffn_cpu_ceiling [--tokens 2048 --dim 512 --hidden 2048 --rounds 15]

Fusion can only remove what eager spends outside its GEMMs, so eager / GEMMs bounds the speedup
any fused FFN can reach with eager's GEMMs (ATen's: MKL). fastattn's CPU backend runs the
forward and input-gradient GEMMs on oneDNN where that is the faster (fastattn/ops/_cpu_matmul.py):
the rows "fastattn (ATen GEMMs)" and "GEMMs alone, oneDNN where faster" separate what the
routing buys from what the fusion does.
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops import _cpu_matmul


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    T, D, H = args.tokens, args.dim, args.hidden
    torch.manual_seed(0)
    x = torch.randn(T, D, requires_grad=True)
    w1 = (torch.randn(H, D) / D**0.5).requires_grad_()
    b1 = torch.zeros(H, requires_grad=True)
    w2 = (torch.randn(D, H) / H**0.5).requires_grad_()
    b2 = torch.zeros(D, requires_grad=True)
    dy = torch.randn(T, D)
    h, a = torch.randn(T, H), torch.randn(T, H)

    def eager():
        F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).backward(dy)

    def fused():
        fastattn.mlp(x, w1, b1, w2, b2, activation="gelu").backward(dy)

    def fused_aten():
        with _cpu_matmul.aten_only():
            fused()

    def gemms():  # the two forward addmms and the four backward GEMMs, nothing else
        with torch.no_grad():
            torch.addmm(b1, x, w1.t()), torch.addmm(b2, a, w2.t())
            dy @ w2, dy.t() @ a, h @ w1, h.t() @ x

    def gemms_routed():  # the same six as fastattn's CPU backend routes them
        with torch.no_grad(), _cpu_matmul.enabled():
            _cpu_matmul.linear(x, w1, b1), _cpu_matmul.linear(a, w2, b2)
            _cpu_matmul.mm(dy, w2), dy.t() @ a, _cpu_matmul.mm(h, w1), h.t() @ x

    fns = {"eager": eager, "fastattn": fused, "fastattn (ATen GEMMs)": fused_aten,
           "GEMMs alone": gemms, "GEMMs alone, oneDNN where faster": gemms_routed}
    for f in fns.values():
        f(), f()
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            for t in (x, w1, b1, w2, b2):
                t.grad = None
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"GELU MLP fwd+bwd {T}x{D}->{H} fp32, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:34s} {v:8.1f} ms")
    onednn, why = _cpu_matmul.onednn_status()
    print(f"  eager / GEMMs alone {med['eager'] / med['GEMMs alone']:.3f} (the fusion ceiling "
          f"with ATen's GEMMs), eager / fastattn {med['eager'] / med['fastattn']:.3f}, "
          f"eager / fastattn (ATen GEMMs) {med['eager'] / med['fastattn (ATen GEMMs)']:.3f}; "
          f"GEMMs alone / routed {med['GEMMs alone'] / med['GEMMs alone, oneDNN where faster']:.3f}"
          + ("" if onednn else f" (oneDNN not used: {why})"))


if __name__ == "__main__":
    main()
