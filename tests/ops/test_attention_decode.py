"""KV-cache decode attention kernels (Triton split-KV + combine, and the CUDA twin) against a
float64 implementation of the spec ("Decode" in the attention contract) written out below.

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py)
on CPU tensors; bf16 is left to the GPU test (the interpreter has no bf16 tl.dot).
"""

import math

import pytest
import torch

from fastattn.ops.attention import triton_decode
from fastattn.ops.attention.triton_decode import decode_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (out atol, lse atol) against float64 on inputs already rounded to the dtype. Half precision:
# p is rounded to the input dtype before the p @ v product (as FlashAttention does), ~2^-11
# (fp16) / 2^-8 (bf16) relative on each term; the softmax statistics stay fp32.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-5),
    torch.bfloat16: (1.6e-2, 2e-5),
}


def decode_reference(q, k_cache, v_cache, cache_seqlens, scale):
    """The spec, in float64: query i of batch b sees j iff j < L_b and j <= i + L_b - Sq,
    L_b = clamp(cache_seqlens[b], 0, S_max); a query that sees nothing gets out 0, lse -inf."""
    B, H, Sq, _ = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    k = k_cache.double().repeat_interleave(H // Hkv, dim=1)  # query head h -> kv head h // G
    v = v_cache.double().repeat_interleave(H // Hkv, dim=1)
    s = q.double() @ k.transpose(-1, -2) * scale
    L = cache_seqlens.to(torch.int64).clamp(0, S_max).view(B, 1, 1, 1).to(q.device)
    i = torch.arange(Sq, device=q.device).view(1, 1, Sq, 1)
    j = torch.arange(S_max, device=q.device).view(1, 1, 1, S_max)
    s = s.masked_fill(~((j < L) & (j <= i + L - Sq)), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # fully masked rows: -inf - -inf -> 0
    return p @ v, lse


def make_inputs(B, H, Hkv, Sq, D, S_max, seqlens, dtype, padded=False):
    """q, k_cache, v_cache in `dtype` on DEVICE. padded: q is a transposed (B, Sq, H, D) view and
    the caches are slices of larger buffers (stride(-1) == 1, other strides padded)."""
    if padded:
        q = torch.randn(B, Sq, H, D + 8, dtype=dtype, device=DEVICE)[..., :D].transpose(1, 2)
        kbuf = torch.randn(B, Hkv + 1, S_max + 5, D + 24, dtype=dtype, device=DEVICE)
        vbuf = torch.randn(B, S_max + 3, Hkv, D + 8, dtype=dtype, device=DEVICE)
        k = kbuf[:, 1:, 2:S_max + 2, 8:D + 8]
        v = vbuf[:, :S_max, :, :D].transpose(1, 2)
    else:
        q = torch.randn(B, H, Sq, D, dtype=dtype, device=DEVICE)
        k = torch.randn(B, Hkv, S_max, D, dtype=dtype, device=DEVICE)
        v = torch.randn(B, Hkv, S_max, D, dtype=dtype, device=DEVICE)
    sl = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    return q, k, v, sl


def check(fn, q, k, v, sl, scale, **kw):
    out, lse = fn(q, k, v, sl, scale, **kw)
    ref_out, ref_lse = decode_reference(q, k, v, sl, scale)
    B, H, Sq, D = q.shape
    assert out.shape == (B, H, Sq, D) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any()
    atol_o, atol_l = TOL[q.dtype]
    # lse: -inf exactly where the reference has -inf (same masks), close elsewhere.
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse).cpu())
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=atol_l, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=atol_o, rtol=0)
    return out, lse


# ---- Triton (interpreter on CPU) --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [16, 40, 64, 80])
@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_triton_decode_shapes(H, Hkv, Sq, D, dtype):
    # B = 3: one batch with L == Sq (only the new tokens), one full cache (several splits and
    # several BLOCK_N blocks per split), one in between that ends inside a block.
    S_max = 160  # 3 splits of 2 x 32-position blocks under the interpreter
    seqlens = [Sq, S_max, 97]
    q, k, v, sl = make_inputs(3, H, Hkv, Sq, D, S_max, seqlens, dtype)
    check(decode_fwd, q, k, v, sl, D ** -0.5)


@pytest.mark.parametrize("num_splits", [0, 1, 2, 3, 7, 64])
def test_triton_decode_num_splits_batch1(num_splits):
    # More splits than BLOCK_N blocks (7, 64) leaves splits empty: they must combine as nothing.
    q, k, v, sl = make_inputs(1, 4, 2, 2, 32, 160, [131], torch.float32)
    check(decode_fwd, q, k, v, sl, 0.3, num_splits=num_splits)


def test_triton_decode_heuristic_splits_on_cpu():
    if DEVICE != "cpu":
        pytest.skip("the CPU heuristic only")
    assert triton_decode.pick_num_splits(1, 1, 1, 1024, torch.device("cpu")) > 1
    assert triton_decode.pick_num_splits(1, 1, 1, 16, torch.device("cpu")) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode_noncontiguous(dtype):
    q, k, v, sl = make_inputs(3, 4, 2, 3, 40, 130, [130, 5, 64], dtype, padded=True)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    check(decode_fwd, q, k, v, sl, 40 ** -0.5)


def test_triton_decode_empty_and_short_caches():
    # L = 0: nothing visible anywhere -> out 0, lse -inf, no NaN. L = 1 < Sq = 3: queries 0 and 1
    # see nothing, query 2 sees position 0 (out = v_0). L beyond S_max and negative L are clamped.
    q, k, v, sl = make_inputs(4, 4, 2, 3, 16, 70, [0, 1, 1000, -5], torch.float32)
    out, lse = check(decode_fwd, q, k, v, sl, 0.25)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    assert torch.all(out[1, :, :2] == 0) and torch.all(lse[1, :, :2] == -math.inf)
    torch.testing.assert_close(out[1, :, 2], v[1, :, 0].repeat_interleave(2, 0), atol=1e-6, rtol=0)
    assert torch.all(out[3] == 0) and torch.all(lse[3] == -math.inf)


def test_triton_decode_large_scores():
    # Scores of magnitude ~100 on a long cache: exp must be taken relative to the running max
    # (and the split lse relative to their max in the combine), or it overflows.
    q, k, v, sl = make_inputs(2, 2, 1, 1, 16, 200, [200, 150], torch.float32)
    check(decode_fwd, q * 10, k * 10, v, sl, 1.0, num_splits=4)


def test_triton_decode_many_rows():
    # G * Sq = 16 * 12 = 192 rows > one M tile (128 at D <= 64): several M blocks per kv head.
    q, k, v, sl = make_inputs(1, 16, 1, 12, 16, 64, [40], torch.float32)
    check(decode_fwd, q, k, v, sl, 0.25)


def _check_nonfinite(fn, dtype):
    """A NaN the queries can see reaches their output (as in PyTorch), in any split; NaN / inf
    in cache positions past cache_seqlens is never read into a result."""
    q, k, v, sl = make_inputs(2, 4, 2, 1, 16, 96, [90, 60], dtype)
    k[0, 1, 70] = float("nan")         # visible to batch 0 (kv head 1 = q heads 2, 3), split 3/4
    k[1, 1, 70] = float("nan")         # past batch 1's 60 positions: not visible
    v[1, :, 60:] = float("inf")
    q[1, 0, 0, 3] = float("nan")       # batch 1, query head 0
    for splits in (1, 4):
        out, lse = fn(q, k, v, sl, 0.25, num_splits=splits)
        nan = torch.zeros(2, 4, 1, dtype=torch.bool)
        nan[0, 2:] = nan[1, 0] = True
        assert torch.equal(out.isnan().all(-1).cpu(), nan) and torch.equal(lse.isnan().cpu(), nan)
        assert out[~nan.to(out.device)].isfinite().all() and lse[~nan.to(lse.device)].isfinite().all()
        k_ok, v_ok = k.clone(), v.clone()
        k_ok[1, 1, 70], v_ok[1, :, 60:] = 0, 0
        ref_out, ref_lse = decode_reference(q, k_ok, v_ok, sl, 0.25)
        keep = ~nan.to(out.device)
        torch.testing.assert_close(out[keep].double(), ref_out[keep], atol=TOL[dtype][0], rtol=0)
        torch.testing.assert_close(lse[keep].double(), ref_lse[keep], atol=TOL[dtype][1], rtol=1e-5)


def test_triton_decode_nonfinite():
    _check_nonfinite(decode_fwd, torch.float32)


def test_triton_decode_rejects_bad_inputs():
    q, k, v, sl = make_inputs(1, 4, 2, 1, 16, 8, [8], torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        decode_fwd(q[:, :3], k, v, sl, 1.0)
    with pytest.raises(ValueError, match="int32"):
        decode_fwd(q, k, v, sl.long(), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        decode_fwd(q, k.half(), v, sl, 1.0)


def test_decode_backward_says_it_has_none():
    """Inference only: a query that requires grad gives an output whose backward names the op
    and the way out (not autograd's message that no formula was registered); under no_grad
    nothing is recorded, and with grad enabled the forward itself still runs."""
    import fastattn
    q, k, v, sl = make_inputs(1, 4, 2, 1, 16, 8, [8], torch.float32)
    q = q.cpu().requires_grad_()
    k, v, sl = k.cpu(), v.cpu(), sl.cpu()
    out = fastattn.decode_attention(q, k, v, sl)
    ref, _ = decode_reference(q.detach(), k, v, sl, 1 / math.sqrt(16))
    torch.testing.assert_close(out.detach(), ref.float())
    with pytest.raises(RuntimeError, match="decode_attention has no backward.*flash_attention"):
        out.sum().backward()
    with torch.no_grad():
        assert not fastattn.decode_attention(q, k, v, sl).requires_grad


# ---- GPU: CUDA kernel and compiled Triton -----------------------------------------------------

def _cuda_decode():
    from fastattn import _ext

    return _ext.load("cuda").decode_attention


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 256, 80])
@pytest.mark.parametrize("H,Hkv,Sq", [(8, 8, 1), (32, 8, 1), (8, 1, 4), (16, 2, 16)])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_gpu(backend, H, Hkv, Sq, D, dtype):
    S_max = 4100
    seqlens = [Sq, S_max, 1000, 4097]
    q, k, v, sl = make_inputs(4, H, Hkv, Sq, D, S_max, seqlens, dtype)
    if backend == "cuda":
        cuda_fn = _cuda_decode()

        def fn(q, k, v, sl, scale, num_splits=0):
            return cuda_fn(q, k, v, sl, scale, num_splits)
    else:
        fn = decode_fwd
    check(fn, q, k, v, sl, D ** -0.5)
    check(fn, q, k, v, sl, D ** -0.5, num_splits=1)
    check(fn, q, k, v, sl, D ** -0.5, num_splits=7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_gpu_edge_cases(backend):
    q, k, v, sl = make_inputs(4, 8, 2, 3, 128, 300, [0, 1, 1000, -5], torch.bfloat16,
                              padded=True)
    if backend == "cuda":
        cuda_fn = _cuda_decode()
        out, lse = check(lambda *a, **kw: cuda_fn(*a, kw.get("num_splits", 0)), q, k, v, sl, 0.1)
    else:
        out, lse = check(decode_fwd, q, k, v, sl, 0.1)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    assert torch.all(out[3] == 0) and torch.all(lse[3] == -math.inf)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_gpu_nonfinite(backend, dtype):
    if backend == "cuda":
        cuda_fn = _cuda_decode()
        _check_nonfinite(lambda *a, num_splits=0: cuda_fn(*a, num_splits), dtype)
    else:
        _check_nonfinite(decode_fwd, dtype)


# One test per bad call: on the first H200 run a failing argument check crashed the worker
# (segfault) instead of raising; separate tests tell which checks do that.
_BAD_DECODE_CALLS = {
    "head_dim": (lambda q, k, v, sl: (q[..., :60], k[..., :60], v[..., :60], sl), "head dim"),
    "seqlens_dtype": (lambda q, k, v, sl: (q, k, v, sl.long()), "cache_seqlens"),
    "heads": (lambda q, k, v, sl: (q[:, :3], k, v, sl), "Hkv"),
    "q_on_cpu": (lambda q, k, v, sl: (q.cpu(), k, v, sl), "CUDA"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("bad", list(_BAD_DECODE_CALLS))
def test_decode_cuda_rejects_bad_inputs(bad):
    fn = _cuda_decode()
    q, k, v, sl = make_inputs(1, 4, 2, 1, 64, 8, [8], torch.float16)
    make_args, match = _BAD_DECODE_CALLS[bad]
    with pytest.raises(RuntimeError, match=match):
        fn(*make_args(q, k, v, sl), 1.0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("s_max,asked,expected", [(8192, "auto", "cuda"), (32768, "auto", "triton"),
                                                  (32768, "cuda", "cuda")])
def test_auto_backend_picks_by_cache_length(monkeypatch, s_max, asked, expected):
    """Unasked, decode runs the CUDA kernel on short caches and, on Hopper, the Triton one from
    32768 positions (where it measured faster); asked for CUDA, CUDA. Same answer each way."""
    import fastattn
    from fastattn.ops import attention as attn
    if not fastattn.backends()["cuda"]:
        pytest.skip("no CUDA extension")
    if expected == "triton" and torch.cuda.get_device_capability() < attn._TRITON_DECODE_CAPABILITY:
        expected = "cuda"                  # measured on an H200 only: other GPUs keep CUDA
    ran = []
    real = triton_decode.decode_fwd
    monkeypatch.setattr(triton_decode, "decode_fwd", lambda *a: ran.append("triton") or real(*a))
    q, k, v, sl = make_inputs(1, 4, 2, 1, 64, s_max, [s_max - 5], torch.bfloat16)
    with fastattn.use_backend(asked):
        out = fastattn.decode_attention(q, k, v, sl)
    assert (ran == ["triton"]) == (expected == "triton") and attn._TRITON_DECODE_FROM == 32768
    ref, _ = decode_reference(*(t.double() for t in (q, k, v)), sl, 64 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=TOL[torch.bfloat16][0], rtol=0)
