"""Host time per call of fastattn's ops on tiny inputs, next to the PyTorch call they replace.

    python -m benchmarks.host_overhead [--device cpu|cuda] [--calls 2000] [--rounds 7]

At these sizes the kernels take a few microseconds, so the time per call is what Python and the
dispatcher spend: the cost of a decode step or of a small model's layer on a GPU, where the
device waits for the host. Each op runs three ways in interleaved rounds (medians): fastattn
with its direct eager path (fastattn._eager, the default), fastattn through the dispatcher
(FASTATTN_EAGER_DIRECT=0), and the PyTorch equivalent. On CUDA the calls are queued back to back
and the device synchronised once per round, so the figure is the host's rate when the kernels
are shorter than their launch.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn import _eager


def cases(device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    B, H, Hkv, D, L = 2, 4, 2, 32, 64
    q1, kc, vc = rand(B, H, 1, D), rand(B, Hkv, L, D), rand(B, Hkv, L, D)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    q, k, v = rand(B, H, 16, D), rand(B, H, 16, D), rand(B, H, 16, D)
    x, w1, b1, w2, b2 = rand(8, 64), rand(256, 64), rand(256), rand(64, 256), rand(64)
    wg, wu, wd = rand(172, 64), rand(172, 64), rand(64, 172)
    wv, tgt = rand(512, 64), torch.randint(0, 512, (8,), generator=g).to(device)
    logits = rand(8, 512)
    rep = H // Hkv
    try:    # torch >= 2.5 reads the grouped cache as it is, as the op does
        F.scaled_dot_product_attention(q1, kc, vc, enable_gqa=True)
        sdpa_decode = lambda: F.scaled_dot_product_attention(q1, kc, vc,  # noqa: E731
                                                             enable_gqa=True)
    except TypeError:
        sdpa_decode = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q1, kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1))
    qg, kg, vg, xg, w1g, w2g = (t.clone().requires_grad_() for t in (q, k, v, x, w1, w2))
    found = {
        "decode_attention (B=2, H=4/2, L=64, D=32)": (
            lambda: fastattn.decode_attention(q1, kc, vc, lens), sdpa_decode),
        "flash_attention causal, no grad (B=2, H=4, S=16, D=32)": (
            lambda: fastattn.flash_attention(q, k, v, causal=True),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "mlp gelu, no grad (8 x 64 -> 256)": (
            lambda: fastattn.mlp(x, w1, b1, w2, b2, activation="gelu"),
            lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
        "swiglu, no grad (8 x 64 -> 172)": (
            lambda: fastattn.swiglu(x, wg, wu, wd),
            lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)),
        "linear_token_logprobs, no grad (8 x 64 -> 512)": (
            lambda: fastattn.linear_token_logprobs(x, wv, tgt),
            lambda: torch.log_softmax(F.linear(x, wv).float(), -1).gather(-1, tgt[:, None])),
        "cross_entropy, no grad (8 x 512)": (
            lambda: fastattn.cross_entropy(logits, tgt),
            lambda: F.cross_entropy(logits, tgt)),
        "layer_norm + residual, no grad (8 x 64)": (
            lambda: fastattn.layer_norm(x, 64, b2, b2, residual=logits[:, :64]),
            lambda: (lambda s: (F.layer_norm(s, (64,), b2, b2), s))(x + logits[:, :64])),
        # with a gradient to record: forward and backward (what a training step pays)
        "flash_attention causal, forward+backward (B=2, H=4, S=16, D=32)": (
            lambda: fastattn.flash_attention(qg, kg, vg, causal=True).sum().backward(),
            lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward(),
            GRAD),
        "layer_norm + residual, forward+backward (8 x 64)": (
            lambda: torch.autograd.backward(
                fastattn.layer_norm(xg, 64, b2, b2, residual=logits[:, :64]), (x, x)),
            lambda: torch.autograd.backward(
                (lambda s: (F.layer_norm(s, (64,), b2, b2), s))(xg + logits[:, :64]), (x, x)),
            GRAD),
        "mlp gelu, forward+backward (8 x 64 -> 256)": (
            lambda: fastattn.mlp(xg, w1g, b1, w2g, b2, activation="gelu").sum().backward(),
            lambda: F.linear(F.gelu(F.linear(xg, w1g, b1)), w2g, b2).sum().backward(),
            GRAD),
    }
    if device == "cuda":
        # Where flash_attention's host time goes on a GPU (the public call above: its checks,
        # kernel selection and autograd wiring, then this): the Triton kernel entry alone
        # (fastattn.ops.attention.triton.attention_fwd, no causal mask), as configured (pointer
        # loads: the forward takes the Hopper path only when forced) and with the Hopper path's
        # TMA descriptors (FASTATTN_TRITON_TMA=1), whose host side the backward pays.
        from fastattn.ops.attention import triton as fa_triton

        def entry():
            return fa_triton.attention_fwd(q, k, v, None, D ** -0.5, 0, -1, -1, 0.0, 0.0, 0)

        def entry_tma():
            mode, fa_triton.TMA.mode = fa_triton.TMA.mode, "1"
            try:
                return entry()
            finally:
                fa_triton.TMA.mode = mode

        sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        found.update({
            "Triton attention kernel entry only, no grad (same shape, no mask)": (entry, sdpa),
            "the same with TMA descriptors (FASTATTN_TRITON_TMA=1)": (entry_tma, sdpa),
        })
    return found


GRAD = "grad"   # a case's third entry: run with grad mode on


def step_cases(device: str) -> dict:
    """Whole training steps of a GPT too small for its kernels to matter (12 layers as in
    gpt2-124m, width 32, 8 tokens): forward with the loss, backward, clipping and the optimizer,
    the bench's step (`python -m fastattn.train bench`, bf16 autocast on CUDA). The host's cost
    of a step, which on a GPU is what the device waits for when its kernels are short."""
    from types import SimpleNamespace

    from fastattn.models.gpt import GPTConfig
    from fastattn.train.pretrain import bench_model, bench_step

    cfg = GPTConfig(n_layer=12, n_head=2, d_model=32, vocab_size=64, max_seq_len=16)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (1, 8), generator=g).to(dev)
    tgt = torch.randint(0, 64, (1, 8), generator=g).to(dev)

    def make(backend: str, plain_norms: bool = False):
        model, opt, clip, _ = bench_model(SimpleNamespace(seed=0, lr=1e-3, weight_decay=0.1), cfg,
                                          backend, dev, plain_norms=plain_norms)

        return lambda: bench_step(model, opt, clip, idx, tgt, dev)

    torch_step = make("torch")
    return {
        "gpt training step (12 layers, width 32, 8 tokens)": (make("fastattn"), torch_step, GRAD),
        "the same, fastattn with plain norms (fused_norms=False)": (
            make("fastattn", plain_norms=True), torch_step, GRAD),
    }


def per_call_us(fn, calls: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: the host path alone, no thread hand-off)")
    p.add_argument("--no-steps", action="store_true",
                   help="leave out the whole training steps (run --calls / 100 times each)")
    p.add_argument("--profile", default=None, metavar="TEXT",
                   help="instead of the table: cProfile --calls calls of each case whose name "
                        "contains TEXT (fastattn's direct path) and print where the host time "
                        "goes, the 25 functions with most time of their own")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile is not None:
        return profile_cases(args)
    env = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
           f"device {args.device}"
           + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"# python -m benchmarks.host_overhead --device {args.device}: {env}, "
          f"{args.calls} calls x {args.rounds} rounds, medians (us per call)")
    print("| op | fastattn | fastattn via dispatcher | torch | fastattn / torch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    saved = _eager.ENABLED
    try:
        every = [(name, case, args.calls) for name, case in cases(args.device).items()]
        if not args.no_steps:   # a step costs about a hundred op calls
            every += [(name, case, max(1, args.calls // 100))
                      for name, case in step_cases(args.device).items()]
        for name, (fa, ref, *grad), calls in every:
            with torch.set_grad_enabled(bool(grad)):
                runs = {"direct": [], "dispatcher": [], "torch": []}
                for _ in range(args.rounds):
                    for key, fn, direct in (("direct", fa, True), ("dispatcher", fa, False),
                                            ("torch", ref, True)):
                        _eager.ENABLED = direct
                        fn()  # warm (first call: kernel selection, compilation)
                        runs[key].append(per_call_us(fn, calls, args.device))
            med = {k: statistics.median(v) for k, v in runs.items()}
            print(f"| {name} | {med['direct']:.1f} | {med['dispatcher']:.1f} | "
                  f"{med['torch']:.1f} | {med['direct'] / med['torch']:.2f}x |", flush=True)
    finally:
        _eager.ENABLED = saved


def profile_cases(args) -> None:
    import cProfile
    import pstats

    found = {k: (v, args.calls) for k, v in cases(args.device).items() if args.profile in k}
    found.update({k: (v, max(1, args.calls // 100))
                  for k, v in step_cases(args.device).items() if args.profile in k})
    if not found:
        raise SystemExit(f"--profile: no case name contains {args.profile!r}")
    for name, ((fa, _, *grad), calls) in found.items():
        with torch.set_grad_enabled(bool(grad)):
            fa()
            per_call_us(fa, 10, args.device)  # warm
            prof = cProfile.Profile()
            prof.enable()
            per_call_us(fa, calls, args.device)
            prof.disable()
        print(f"## {name}: cProfile of {calls} calls, {args.device}, "
              f"torch {torch.__version__}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
