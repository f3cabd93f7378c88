"""The CPU ceiling of FFN fusion: GELU MLP (or SwiGLU) forward+backward, eager and fastattn,
against its six (nine) GEMMs alone, interleaved rounds in one process, medians.

    python -m benchmarks.ffn_cpu_ceiling [--block mlp|swiglu] [--tokens 2048 --dim 512
        --hidden 2048 --rounds 15]

Fusion can only remove what eager spends outside its GEMMs, so eager / GEMMs bounds the speedup
any fused FFN can reach with eager's GEMMs (ATen's: MKL). fastattn's CPU backend runs the
forward and input-gradient GEMMs on oneDNN where that is the faster (fastattn/ops/_cpu_matmul.py):
the rows "fastattn (ATen GEMMs)" and "GEMMs alone, oneDNN where faster" separate what the
routing buys from what the fusion does.
"""

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F

import fastattn
from benchmarks.common import interleaved
from fastattn.ops import _cpu_matmul


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", choices=("mlp", "swiglu"), default="mlp")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=None,
                   help="default: 2048 for the MLP, 1376 for SwiGLU (make bench's shapes)")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    mlp = args.block == "mlp"
    T, D = args.tokens, args.dim
    H = args.hidden or (2048 if mlp else 1376)
    torch.manual_seed(0)
    x = torch.randn(T, D, requires_grad=True)
    dy = torch.randn(T, D)
    h, a = torch.randn(T, H), torch.randn(T, H)
    if mlp:
        w1 = (torch.randn(H, D) / D**0.5).requires_grad_()
        b1 = torch.zeros(H, requires_grad=True)
        w2 = (torch.randn(D, H) / H**0.5).requires_grad_()
        b2 = torch.zeros(D, requires_grad=True)
        params = (w1, b1, w2, b2)
    else:
        wg, wu = ((torch.randn(H, D) / D**0.5).requires_grad_() for _ in range(2))
        wd = (torch.randn(D, H) / H**0.5).requires_grad_()
        params = (wg, wu, wd)

    def eager():
        if mlp:
            F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).backward(dy)
        else:
            F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd).backward(dy)

    def fused():
        if mlp:
            fastattn.mlp(x, w1, b1, w2, b2, activation="gelu").backward(dy)
        else:
            fastattn.swiglu(x, wg, wu, wd).backward(dy)

    def fused_aten():
        with _cpu_matmul.aten_only():
            fused()

    def gemms():  # the forward (addmm / mm) and backward GEMMs, nothing else
        with torch.no_grad():
            if mlp:
                torch.addmm(b1, x, w1.t()), torch.addmm(b2, a, w2.t())
                dy @ w2, dy.t() @ a, h @ w1, h.t() @ x
            else:
                x @ wg.t(), x @ wu.t(), a @ wd.t()
                dy @ wd, dy.t() @ a, h @ wg, h.t() @ x, h @ wu, h.t() @ x

    def gemms_routed():  # the same, as fastattn's CPU backend routes them
        with torch.no_grad(), _cpu_matmul.enabled():
            mm = _cpu_matmul.mm
            if mlp:
                _cpu_matmul.linear(x, w1, b1), _cpu_matmul.linear(a, w2, b2)
                mm(dy, w2), dy.t() @ a, mm(h, w1), h.t() @ x
            else:
                _cpu_matmul.linear(x, wg), _cpu_matmul.linear(x, wu), _cpu_matmul.linear(a, wd)
                mm(dy, wd), dy.t() @ a, mm(h, wg), h.t() @ x, mm(h, wu), h.t() @ x

    fns = {"eager": eager, "fastattn": fused, "fastattn (ATen GEMMs)": fused_aten,
           "GEMMs alone": gemms, "GEMMs alone, oneDNN where faster": gemms_routed}

    def clear_grads():
        for t in (x, *params):
            t.grad = None

    times = interleaved(fns, args.rounds, before=clear_grads)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{'GELU MLP' if mlp else 'SwiGLU'} fwd+bwd {T}x{D}->{H} fp32, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, median of {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:34s} {v:8.1f} ms")
    onednn, why = _cpu_matmul.onednn_status()
    routed = med["GEMMs alone"] / med["GEMMs alone, oneDNN where faster"]
    print(f"  eager / GEMMs alone {med['eager'] / med['GEMMs alone']:.3f} (the fusion ceiling "
          f"with ATen's GEMMs), eager / fastattn {med['eager'] / med['fastattn']:.3f}, "
          f"eager / fastattn (ATen GEMMs) {med['eager'] / med['fastattn (ATen GEMMs)']:.3f}; "
          f"GEMMs alone / routed {routed:.3f}" + ("" if onednn else f" (oneDNN not used: {why})"))


if __name__ == "__main__":
    main()
