"""ATen's (MKL's) fp32 GEMM against torch's oneDNN on the three products of a linear layer, at the
shapes fastattn's CPU benchmarks run: the evidence for fastattn/ops/_cpu_matmul.py's routing.

    python -m benchmarks.cpu_gemm_routes [--tokens 2048] [--rounds 7] [--shapes D:F,...]

For x (T, D), W (F, D), dY (T, F): forward ``x @ W^T`` (ATen: ``F.linear``), input gradient
``dY @ W`` (ATen: ``mm``), weight gradient ``dY^T @ x`` (ATen: ``mm`` of a transposed view;
oneDNN: ``(x^T dY)^T`` with x^T copied, the layout it needs). Interleaved rounds in one
process, the median of each row's per-round best of 3 calls; ratio > 1: oneDNN faster.
"""

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved

# (D, F): make bench's FFN (512 -> 2048 / 1376, and back) and the tiny GPT's layers
# (d_model 192: qkv 576, attention projection 192, MLP 768, lm head 8192)
DEFAULT_SHAPES = "512:2048,2048:512,512:1376,1376:512,192:576,192:192,192:768,768:192,192:8192"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="D:F pairs, comma-separated")
    args = p.parse_args()
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        raise SystemExit("this torch has no oneDNN linear (mkldnn::_linear_pointwise) to compare")
    lp = torch.ops.mkldnn._linear_pointwise
    T = args.tokens
    print(f"fp32 GEMMs, T = {T} tokens, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; ms, median "
          f"of {args.rounds} interleaved rounds (best of 3 calls each)")
    print("| D -> F | product | ATen ms | oneDNN ms | ATen / oneDNN |")
    print("| --- | --- | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    for pair in args.shapes.split(","):
        D, Fo = (int(v) for v in pair.split(":"))
        x, w, dy = (torch.randn(*s, generator=g) for s in ((T, D), (Fo, D), (T, Fo)))
        products = {
            "forward x W^T": (lambda: F.linear(x, w), lambda: lp(x, w, None, "none", [], "")),
            "input grad dY W": (lambda: dy @ w, lambda: lp(dy, w.t(), None, "none", [], "")),
            "weight grad dY^T x": (lambda: dy.t() @ x, lambda: lp(
                x.t().contiguous(), dy.t(), None, "none", [], "").t()),
        }
        for name, (aten, onednn) in products.items():
            torch.testing.assert_close(onednn(), aten(), rtol=1e-4, atol=1e-3)
            times = interleaved({"aten": aten, "onednn": onednn}, args.rounds, best_of=3)
            a, o = (statistics.median(t) * 1e3 for t in times.values())
            print(f"| {D} -> {Fo} | {name} | {a:.2f} | {o:.2f} | {a / o:.2f} |", flush=True)


if __name__ == "__main__":
    main()
