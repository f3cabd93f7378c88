"""Batches of other sequence lengths and token counts reuse the compiled Triton kernels.

Triton compiles a kernel once per value class of each int argument it specialises (== 1,
divisible by 16, other). Attention and decode take the lengths of the batch as ints, so unless
those opt out (``do_not_specialize``), a run whose lengths vary from batch to batch (padded SFT,
packed DPO pairs, generate() prefills) compiles each kernel several times, tens of seconds each
on a GPU. (The FFN matmuls keep their sizes' specialisation, see the last test.) Each batch's
launches are recorded under the interpreter (tests/tools/triton_capture.py) and reduced to what
the JIT keys a compile on; the batches of other lengths must need no compile the first did not."""

import json
import os

import pytest
import torch

import fastattn

_INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="records launches under the Triton interpreter")


def _compile_keys(path) -> set:
    """What the JIT would key a compile on, for each launch recorded in ``path``."""
    keys = set()
    for line in open(path):
        job = json.loads(line)
        spec = {name: s for name, s in job["specialize"].items() if name not in job["opt_out"]}
        keys.add(json.dumps([job["module"], job["kernel"], job["signature"], job["constants"],
                             job["options"], spec], sort_keys=True))
    return keys


@pytest.fixture
def compiles(tmp_path, monkeypatch):
    """compiles(batch, sizes) -> [compile keys of batch(size) for each size], each recorded
    on its own."""
    from triton.runtime.interpreter import InterpretedFunction
    if not hasattr(InterpretedFunction, "run"):
        pytest.skip("triton 3.0's interpreter has no InterpretedFunction.run to record through")
    from tests.tools import triton_capture
    original = InterpretedFunction.run

    def run(batch, sizes):
        keys = []
        for i, size in enumerate(sizes):
            monkeypatch.setattr(InterpretedFunction, "run", original)  # restored after the test
            path = tmp_path / f"launches-{i}.jsonl"
            path.touch()
            triton_capture.record(str(path))
            batch(size)
            keys.append(_compile_keys(path))
        return keys
    return run


def _assert_no_new_compiles(keys, kernels):
    first = keys[0]
    launched = {json.loads(k)[1] for k in first}
    assert set(kernels) <= launched, f"not launched: {set(kernels) - launched}"
    for later in keys[1:]:
        new = sorted(later - first)
        assert not new, f"{len(new)} more compiles for another length, e.g. {new[0][:400]}"


def _randn(*shape):
    return torch.randn(*shape).requires_grad_()


@_INTERPRETER
def test_attention_lengths_do_not_recompile(compiles):
    def batch(lens):
        total = sum(lens)
        cu = torch.tensor([0, lens[0], total], dtype=torch.int32)
        q, k, v = _randn(total, 4, 32), _randn(total, 2, 32), _randn(total, 2, 32)
        fastattn.varlen_attention(q, k, v, cu, cu, max(lens), max(lens),
                                  causal=True).sum().backward()
        s = max(lens)
        q, k, v = _randn(2, 4, s, 32), _randn(2, 2, s, 32), _randn(2, 2, s, 32)
        fastattn.flash_attention(q, k, v, causal=True).sum().backward()

    with fastattn.use_backend("triton"):
        keys = compiles(batch, [(17, 23), (16, 32), (1, 2), (40, 9)])  # max 23, 32, 2, 40
    _assert_no_new_compiles(keys, ["_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel",
                                   "_bwd_dq_kernel"])


@_INTERPRETER
def test_decode_cache_lengths_do_not_recompile(compiles):
    def batch(s_max):
        q = torch.randn(2, 4, 1, 32)
        kc, vc = torch.randn(2, 2, s_max, 32), torch.randn(2, 2, s_max, 32)
        fastattn.decode_attention(q, kc, vc, torch.tensor([s_max, 7], dtype=torch.int32))

    # automatic split counts here: 2 for 128 positions, 1 (an int == 1) for the others
    with fastattn.use_backend("triton"), torch.no_grad():
        keys = compiles(batch, [128, 50, 64, 33])
    _assert_no_new_compiles(keys, ["_decode_split_kernel", "_decode_combine_kernel"])


@_INTERPRETER
def test_ffn_token_counts_of_one_class_do_not_recompile(compiles):
    # The FFN matmuls keep the specialisation of M, N, K (it proves the alignment of operands
    # contiguous along them), so a token count compiles once per class (== 1, a multiple of 16,
    # other; and EVEN_K where it is K); within a class the autotuning buckets, which differ
    # (8, 32, 64 here), must not add compiles.
    w = [torch.randn(32, 16), torch.randn(32), torch.randn(16, 32)]
    wg = [torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32)]

    def train(tokens):
        x = _randn(tokens, 16)
        fastattn.mlp(x, *(t.requires_grad_() for t in w), None).sum().backward()
        fastattn.swiglu(x, *(t.requires_grad_() for t in wg)).sum().backward()

    with fastattn.use_backend("triton"):
        keys = compiles(train, [40, 24, 56, 8])   # all 8 mod 16; buckets 64, 32, 64, 8
    _assert_no_new_compiles(keys, ["_gemm_kernel", "_glu_kernel"])


def _compiled(kernel) -> int:
    """How many binaries Triton's JIT holds for ``kernel`` (all devices)."""
    import triton
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # through the autotuner / heuristics wrappers
    caches = getattr(fn, "device_caches", None)
    if caches is not None:          # triton >= 3.2: (kernel cache, ...) per device
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(cache) for cache in fn.cache.values())


@pytest.mark.gpu
def test_attention_lengths_do_not_recompile_on_gpu():
    # The same on a GPU, with the JIT's own caches: packed bf16 batches whose lengths fall in
    # other classes (multiples of 16, 1, other) after the first must add no binary. Lengths stay
    # in one power-of-two bucket so that the autotuner's pruning picks the same tiles.
    from fastattn.ops.attention import triton as attn
    kernels = {"fwd": attn._fwd_kernel, "preprocess": attn._bwd_preprocess,
               "dkdv": attn._bwd_dkdv_kernel, "dq": attn._bwd_dq_kernel}

    def batch(lens):
        total = sum(lens)
        cu = torch.tensor([0, lens[0], total], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(total, h, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for h in (4, 2, 2))
        fastattn.varlen_attention(q, k, v, cu, cu, max(lens), max(lens),
                                  causal=True).float().sum().backward()
        torch.cuda.synchronize()

    with fastattn.use_backend("triton"):
        batch((130, 70))
        before = {name: _compiled(k) for name, k in kernels.items()}
        for lens in ((144, 96), (200, 33), (129, 1)):
            batch(lens)
        after = {name: _compiled(k) for name, k in kernels.items()}
    assert all(n >= 1 for n in before.values()), before
    assert after == before, f"binaries per kernel after the first batch {before}, after all {after}"
