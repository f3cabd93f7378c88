"""Attention gradients' error against float64 as the logits grow, per backend, beside PyTorch's
fp32 math SDPA (the README's numerics note). The Triton backward recomputes p from the saved
natural-log lse scaled to base 2, so its error grows with |lse|.

    TRITON_INTERPRET=1 PYTHONPATH=. python -m benchmarks.attention_logit_precision
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastattn  # noqa: E402


def _grads(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _math_sdpa(q, k, v):
    """softmax(q k^T / sqrt(d)) v in the inputs' dtype, as PyTorch's math SDPA computes it."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def main() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, s, d = 1, 2, 32, 64
    status = fastattn.backends()
    backends = [n for n in ("cpu", "triton") if status[n]]
    print(f"torch {torch.__version__}, B={b} H={h} S={s} D={d}, fp32 inputs; max |error| "
          "against float64")
    print("| max logit | grad | torch fp32 | " + " | ".join(backends) + " |")
    for mult in (1.0, 3.0, 6.0, 12.0):
        q, k = (torch.randn(b, h, s, d, generator=g) * mult for _ in range(2))
        v, dout = (torch.randn(b, h, s, d, generator=g) for _ in range(2))
        logit = (q @ k.transpose(-1, -2) * d ** -0.5).abs().max().item()
        exact = _grads(_math_sdpa, q.double(), k.double(), v.double(), dout.double())
        rows = {"torch fp32": _grads(_math_sdpa, q, k, v, dout)}
        for name in backends:
            with fastattn.use_backend(name):
                rows[name] = _grads(lambda *t: fastattn.flash_attention(*t), q, k, v, dout)
        for i, grad in enumerate(("dq", "dk", "dv"), start=1):
            errs = [(r[i].double() - exact[i]).abs().max().item() for r in rows.values()]
            print(f"| {logit:9.1f} | {grad} | " + " | ".join(f"{e:.2g}" for e in errs) + " |")


if __name__ == "__main__":
    main()
