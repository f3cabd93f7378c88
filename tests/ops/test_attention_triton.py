"""Triton FlashAttention kernels against a naive float64 implementation of the attention spec.

On a machine without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) with 16 x 16
tiles, so Sq = 97 gives seven tiles per row and exercises the edge/interior split of the masks.
"""

import math
import types

import pytest
import torch

from fastattn.ops.attention import triton as fa_triton
from tests.helpers import GPU, forced_tma

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M32 = 0xFFFFFFFF
TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


# ----------------------------------------------------------------------------- naive oracle


def _mul32(x, c):
    # (x * c) mod 2**32 in int64 without overflow: x = hi * 2**16 + lo, and only the low
    # 16 bits of hi * c survive the shift by 16.
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def keep_mask(B, H, Sq, Sk, p, seed):
    bh = torch.arange(B * H, dtype=torch.int64).view(B, H, 1, 1)
    key = _mix32(_mix32(bh ^ (seed >> 32)) ^ (seed & M32))
    idx = (torch.arange(Sq, dtype=torch.int64)[:, None] * Sk + torch.arange(Sk, dtype=torch.int64)[None, :]) & M32
    threshold = min(math.floor(p * 2**32), 2**32 - 1)
    return _mix32(_mix32(idx) ^ key) >= threshold


def naive(q, k, v, dout, bias=None, scale=None, diag=0, wl=-1, wr=-1, softcap=0.0, dropout_p=0.0, seed=0):
    """out, lse, dq, dk, dv in float64, by materialising the Sq x Sk scores (spec formulas)."""
    q, k, v, dout = (x.detach().double().cpu() for x in (q, k, v, dout))
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = D**-0.5 if scale is None else scale
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    raw = q @ kk.transpose(-1, -2) * scale
    t = torch.tanh(raw / softcap) if softcap > 0 else None
    s = softcap * t if softcap > 0 else raw
    if bias is not None:
        s = s + bias.double().cpu()
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    if wl >= 0:
        vis &= j >= i + diag - wl
    if wr >= 0:
        vis &= j <= i + diag + wr
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    z = keep_mask(B, H, Sq, Sk, dropout_p, seed).double() / (1 - dropout_p) if dropout_p > 0 else 1.0
    out = (p * z) @ vv
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * ((dout @ vv.transpose(-1, -2)) * z - delta)
    if softcap > 0:
        ds = ds * (1 - t * t)
    dq = scale * ds @ kk
    dk = (scale * ds.transpose(-1, -2) @ q).view(B, Hkv, g, Sk, D).sum(2)
    dv = ((p * z).transpose(-1, -2) @ dout).view(B, Hkv, g, Sk, D).sum(2)
    return out, lse, dq, dk, dv


# ----------------------------------------------------------------------------- helpers


def _check(name, got, ref, dtype):
    got = got.detach().double().cpu()
    assert got.shape == ref.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    bound = TOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _check_lse(got, ref):
    got = got.detach().double().cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "lse: -inf rows differ"
    fin = torch.isfinite(ref)
    assert torch.isfinite(got[fin]).all()
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)


def _qkv(B, H, Hkv, Sq, Sk, D, dtype, transposed=False):
    def make(h, s):
        if transposed:  # (B, S, H, D) storage seen as (B, H, S, D): strides (S*H*D, D, H*D, 1)
            return torch.randn(B, s, h, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        return torch.randn(B, h, s, D, dtype=dtype, device=DEVICE)

    return make(H, Sq), make(Hkv, Sk), make(Hkv, Sk), make(H, Sq)


def _run(q, k, v, dout, bias=None, scale=None, diag=0, wl=-1, wr=-1, softcap=0.0, dropout_p=0.0, seed=0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (bias, scale, diag, wl, wr, softcap, dropout_p, seed)
    out, lse = fa_triton.attention_fwd(q, k, v, *args)
    dq, dk, dv = fa_triton.attention_bwd(dout, q, k, v, out, lse, *args)
    return out, lse, dq, dk, dv


def _compare(got, ref, dtype):
    out, lse, dq, dk, dv = got
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):  # stored (B, S, H, D)
        b, h, s, d = t.shape
        assert t.stride() == (s * h * d, d, h * d, 1), (name, t.stride())
    assert lse.dtype == torch.float32 and out.dtype == dtype and dq.dtype == dtype
    _check("out", out, ref[0], dtype)
    _check_lse(lse, ref[1])
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:]):
        _check(name, g, r, dtype)


# ----------------------------------------------------------------------------- tests


def test_hash_matches_python_ints():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, M32]
    assert _mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [_mix32_int(x) for x in xs]


def test_keep_mask_matches_the_library_reference():
    # Two independent codings of the spec's hash: this file's and fastattn's reference.py.
    from fastattn.ops.attention import reference
    for seed in (0, 77, 2**33 + 5):
        assert torch.equal(keep_mask(2, 3, 9, 31, 0.3, seed).view(2, 3, 9, 31),
                           reference.dropout_keep(seed, 2, 3, 9, 31, 0.3))


def test_naive_gradients_match_autograd():
    # The oracle's hand-written backward (the spec's formulas) against autograd of its forward.
    torch.manual_seed(1)
    B, H, Hkv, Sq, Sk, D = 1, 4, 2, 9, 11, 8
    q, k, v, dout = (x.double().requires_grad_() for x in _qkv(B, H, Hkv, Sq, Sk, D, torch.float32))
    bias = torch.randn(1, H, Sq, Sk, dtype=torch.float64)
    kw = dict(bias=bias, scale=0.7, diag=2, wl=6, wr=1, softcap=2.0, dropout_p=0.25, seed=12345)
    out, lse, dq, dk, dv = naive(q, k, v, dout, **kw)

    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 2.0 * torch.tanh(q @ kk.transpose(-1, -2) * 0.7 / 2.0) + bias
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
    s = s.masked_fill(~((j >= i + 2 - 6) & (j <= i + 2 + 1)), float("-inf"))
    z = keep_mask(B, H, Sq, Sk, 0.25, 12345).double() / 0.75
    ref_out = (torch.softmax(s, -1) * z) @ vv
    ref_out.backward(dout.detach())
    torch.testing.assert_close(out, ref_out.detach())
    for got, leaf in ((dq, q), (dk, k), (dv, v)):
        torch.testing.assert_close(got, leaf.grad)


# (dtype, B, H, Hkv, Sq, Sk, D, transposed, mask kwargs)
CASES = {
    "plain_mha_d64": (torch.float32, 1, 2, 2, 97, 97, 64, False, {}),
    "causal_tl_gqa_sq_gt_sk_d40": (torch.float32, 2, 4, 2, 97, 17, 40, False, dict(diag=0, wr=0)),
    "causal_br_mqa_sq_lt_sk_d80_strided": (torch.float32, 1, 4, 1, 17, 97, 80, True, dict(diag=80, wr=0)),
    "window_softcap_d16": (torch.float32, 1, 2, 1, 97, 97, 16, False, dict(wl=20, wr=5, softcap=1.5, scale=1.0)),
    "left_window_only": (torch.float32, 1, 2, 2, 97, 40, 16, False, dict(diag=-30, wl=7)),
    "causal_br_sq_gt_sk_masked_rows": (torch.float32, 1, 2, 2, 97, 17, 16, False, dict(diag=17 - 97, wr=0)),
    "sq1_sk1": (torch.float32, 2, 2, 1, 1, 1, 16, False, {}),
    "sq1_sk97_causal_br": (torch.float32, 1, 4, 2, 1, 97, 40, False, dict(diag=96, wr=0)),
    "fp16_causal_br_gqa_d80_strided": (torch.float16, 1, 4, 2, 97, 97, 80, True, dict(diag=0, wr=0)),
    "fp16_window_softcap_d40": (torch.float16, 1, 2, 2, 17, 97, 40, False, dict(diag=80, wl=33, wr=3, softcap=3.0)),
    # the head dims of real models (96: padded to a 128-wide tile; 128; 256), short sequences
    "causal_br_gqa_d96": (torch.float32, 1, 2, 1, 17, 20, 96, False, dict(diag=3, wr=0)),
    "causal_tl_gqa_softcap_d128": (torch.float32, 1, 2, 1, 20, 17, 128, True, dict(diag=0, wr=0, softcap=2.0)),
    "plain_d256": (torch.float32, 1, 1, 1, 9, 13, 256, False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(case):
    dtype, B, H, Hkv, Sq, Sk, D, transposed, kw = CASES[case]
    q, k, v, dout = _qkv(B, H, Hkv, Sq, Sk, D, dtype, transposed)
    if transposed:
        assert not q.is_contiguous() and q.stride(-1) == 1
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), dtype)


def test_random_windows():
    # Tile-range arithmetic (skipped, edge and interior tiles) for arbitrary diag / window pairs,
    # including ones that leave whole rows or whole key tiles invisible.
    gen = torch.Generator().manual_seed(7)
    for _ in range(12):
        sq, sk = (int(x) for x in torch.randint(1, 70, (2,), generator=gen))
        diag = int(torch.randint(-sq, sk + 1, (1,), generator=gen))
        wl, wr = (int(x) - 1 for x in torch.randint(0, 40, (2,), generator=gen))
        q, k, v, dout = _qkv(1, 2, 1, sq, sk, 16, torch.float32)
        kw = dict(diag=diag, wl=wl, wr=wr)
        _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), torch.float32)


def test_bias_broadcast_with_masked_rows():
    B, H, Hkv, Sq, Sk, D = 2, 2, 1, 33, 97, 40
    q, k, v, dout = _qkv(B, H, Hkv, Sq, Sk, D, torch.float32)
    # (B, 1, Sq, Sk) seen through a head stride of 0, with scattered -inf, row 5 all -inf in
    # batch 0 and row 6 all -inf except one key that the causal mask hides.
    base = torch.randn(B, 1, Sq, Sk, device=DEVICE)
    base[torch.rand(B, 1, Sq, Sk, device=DEVICE) < 0.2] = float("-inf")
    base[0, 0, 5] = float("-inf")
    base[1, 0, 6] = float("-inf")
    base[1, 0, 6, Sk - 1] = 0.0
    bias = base.expand(B, H, Sq, Sk)
    assert bias.stride(1) == 0
    kw = dict(bias=bias, diag=Sk - Sq, wr=0)
    got = _run(q, k, v, dout, **kw)
    ref = naive(q, k, v, dout, **kw)
    assert torch.isneginf(ref[1][0, :, 5]).all() and torch.isneginf(ref[1][1, :, 6]).all()
    _compare(got, ref, torch.float32)
    assert (got[0][0, :, 5] == 0).all() and (got[2][0, :, 5] == 0).all()


def test_dropout_exact_mask_and_deterministic_backward():
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 97, 40, 32
    q, k, v, dout = _qkv(B, H, Hkv, Sq, Sk, D, torch.float32)
    kw = dict(dropout_p=0.3, seed=(0xABCDEF12 << 32) | 0x9ABCDEF1, diag=Sk - Sq, wr=0, wl=50)
    got = _run(q, k, v, dout, **kw)
    # A single flipped keep bit moves out by p_ij v_j / 0.7 (~1e-2 here): far above tolerance.
    _compare(got, naive(q, k, v, dout, **kw), torch.float32)
    args = (got[0], got[1], None, D**-0.5, Sk - Sq, 50, 0, 0.0, 0.3, kw["seed"])
    again = fa_triton.attention_bwd(dout, q, k, v, *args)
    for a, b in zip(got[2:], again):
        assert torch.equal(a, b)
    other = fa_triton.attention_fwd(q, k, v, None, D**-0.5, Sk - Sq, 50, 0, 0.0, 0.3, kw["seed"] + 1)[0]
    assert not torch.equal(other, got[0])


def _pack(xs):
    return torch.cat([x[0].transpose(0, 1) for x in xs], 0)  # (1, h, s, D) -> (total, h, D)


def _varlen_case(dtype, causal, lens_q, lens_k, D=40, poison=None):
    """Packed sequences against each one run alone; sequence ``poison`` (if given) is all NaN
    and not checked: a tile of a neighbour that reads into it poisons that neighbour."""
    H, Hkv = 4, 2
    seqs = [_qkv(1, H, Hkv, sq, sk, D, dtype) for sq, sk in zip(lens_q, lens_k)]
    if poison is not None:
        seqs[poison] = tuple(torch.full_like(t, float("nan")) for t in seqs[poison])
    q, k, v, dout = (_pack([s[n] for s in seqs]) for n in range(4))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    scale = D**-0.5
    meta = (cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
    out, lse = fa_triton.varlen_fwd(q, k, v, *meta)
    assert out.shape == q.shape and lse.shape == (H, q.shape[0])
    dq, dk, dv = fa_triton.varlen_bwd(dout, q, k, v, out, lse, *meta)
    for n, (sq, sk) in enumerate(zip(lens_q, lens_k)):
        if n == poison:
            continue
        kw = dict(diag=sk - sq, wr=0) if causal else {}
        ref = naive(*seqs[n], **kw)
        rq = slice(cu_q[n].item(), cu_q[n + 1].item())
        rk = slice(cu_k[n].item(), cu_k[n + 1].item())
        _check("out", out[rq].transpose(0, 1)[None], ref[0], dtype)
        _check_lse(lse[:, rq][None], ref[1])
        _check("dq", dq[rq].transpose(0, 1)[None], ref[2], dtype)
        _check("dk", dk[rk].transpose(0, 1)[None], ref[3], dtype)
        _check("dv", dv[rk].transpose(0, 1)[None], ref[4], dtype)


@pytest.mark.parametrize(
    "dtype,causal,lens_q,lens_k",
    [
        (torch.float32, True, (1, 17, 40), (5, 17, 29)),
        (torch.float16, False, (17, 1, 40), (17, 40, 1)),
    ],
)
def test_varlen_equals_per_sequence(dtype, causal, lens_q, lens_k):
    _varlen_case(dtype, causal, lens_q, lens_k)


@pytest.mark.parametrize("limit", [4, 5])
def test_batch_heads_past_the_grid_limit_spread_over_two_axes(monkeypatch, limit):
    """More (batch, head) pairs than CUDA's 65535 on a grid axis (varlen: 8192 sequences x 8
    heads) run over axes 1 and 2: here with the limit lowered to 4 (3 x 2 heads on 2 rows of
    4, two programs idle past the end) and 5 (GQA: 3 x 1 key/value heads in one row), dense
    GQA with dropout and varlen, forward and backward against the naive reference."""
    monkeypatch.setattr(fa_triton, "_GRID_YZ_MAX", limit)
    assert fa_triton._bh_grid(6) == ((4, 2) if limit == 4 else (5, 2))
    q, k, v, dout = _qkv(3, 2, 1, 17, 20, 16, torch.float32)
    kw = dict(diag=3, wr=0, dropout_p=0.25, seed=7)
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), torch.float32)
    _varlen_case(torch.float32, True, (1, 17, 9, 4), (5, 17, 9, 4))
    monkeypatch.setattr(fa_triton, "_GRID_YZ_MAX", 2)
    with pytest.raises(ValueError, match="pass the CUDA grid's 2\\^2 \\(or 2\\^31\\); split"):
        fa_triton._bh_grid(5)


@pytest.mark.skipif(not fa_triton.INTERPRET, reason="tile shapes are forced in the interpreter only")
@pytest.mark.parametrize("bm,bn", [(16, 32), (32, 16)])
def test_unequal_tiles(monkeypatch, bm, bn):
    """BLOCK_M != BLOCK_N, as the backward autotuning configs (32 x 128, 128 x 32) have on a GPU:
    the tile-range arithmetic of every kernel (skipped, edge and interior tiles) with windows,
    causal offsets and sequence lengths that are not multiples of either tile."""
    monkeypatch.setitem(fa_triton._INTERPRET_BLOCKS, "BLOCK_M", bm)
    monkeypatch.setitem(fa_triton._INTERPRET_BLOCKS, "BLOCK_N", bn)
    gen = torch.Generator().manual_seed(11)
    cases = [dict(diag=0, wr=0), dict(diag=-20, wr=0), dict(diag=30, wl=9, wr=4), {}]
    for kw in cases:
        sq, sk = (int(x) for x in torch.randint(20, 90, (2,), generator=gen))
        q, k, v, dout = _qkv(1, 4, 2, sq, sk, 16, torch.float32)
        _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), torch.float32)


# ----------------------------------------------------------------------------- atomic dQ
#
# FASTATTN_TRITON_DQ=atomic: the dK/dV programs add dQ into an fp32 buffer; no dQ launch.


@pytest.fixture
def atomic_dq(monkeypatch):
    monkeypatch.setattr(fa_triton, "DQ_MODE", "atomic")
    monkeypatch.setattr(fa_triton, "_warned_atomic", True)
    monkeypatch.setattr(fa_triton, "_bwd_dq_kernel", None)  # launching it would raise


def test_atomic_dq_warns_once_and_bad_mode_is_an_error(monkeypatch):
    q, k, v, dout = _qkv(1, 2, 1, 17, 17, 16, torch.float32)
    monkeypatch.setattr(fa_triton, "DQ_MODE", "atomic")
    monkeypatch.setattr(fa_triton, "_warned_atomic", False)
    with pytest.warns(RuntimeWarning, match="not bitwise reproducible"):
        _run(q, k, v, dout)
    monkeypatch.setattr(fa_triton, "DQ_MODE", "atomics")
    with pytest.raises(ValueError, match="FASTATTN_TRITON_DQ must be one of"):
        _run(q, k, v, dout)


def test_deterministic_requests_turn_atomic_dq_off(monkeypatch):
    import fastattn
    monkeypatch.setattr(fa_triton, "DQ_MODE", "atomic")
    monkeypatch.setattr(fa_triton, "_warned_atomic", True)
    chosen = []
    decide = fa_triton._atomic_dq
    monkeypatch.setattr(fa_triton, "_atomic_dq", lambda: chosen.append(decide()) or chosen[-1])
    q, k, v = (torch.randn(1, 2, 17, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    was_on, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with fastattn.use_backend("triton"):
            for det in (False, True):
                fastattn.flash_attention(q, k, v, causal=True, deterministic=det).sum().backward()
            fastattn.scaled_dot_product_attention(q, k, v).sum().backward()
            # the request is an argument of the ops, so a compiled graph's backward sees it too
            for det in (False, True):
                torch.compile(lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True, deterministic=det),
                              fullgraph=True, dynamic=False)(q, k, v).sum().backward()
            torch.use_deterministic_algorithms(True)
            fastattn.scaled_dot_product_attention(q, k, v).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)
    assert chosen == [True, False, True, True, False, False]


@pytest.mark.parametrize("case", ["causal_tl_gqa_sq_gt_sk_d40", "window_softcap_d16", "causal_br_sq_gt_sk_masked_rows",
                                  "sq1_sk97_causal_br", "fp16_causal_br_gqa_d80_strided"])
def test_atomic_dq_matches_naive(atomic_dq, case):
    dtype, B, H, Hkv, Sq, Sk, D, transposed, kw = CASES[case]
    q, k, v, dout = _qkv(B, H, Hkv, Sq, Sk, D, dtype, transposed)
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), dtype)


def test_atomic_dq_dropout_bias_varlen(atomic_dq):
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 33, 40, 16
    q, k, v, dout = _qkv(B, H, Hkv, Sq, Sk, D, torch.float32)
    bias = torch.randn(B, 1, Sq, Sk, device=DEVICE).expand(B, H, Sq, Sk)
    kw = dict(bias=bias, dropout_p=0.25, seed=5, diag=Sk - Sq, wr=0)
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), torch.float32)
    _varlen_case(torch.float32, True, (1, 17, 40), (5, 17, 29))


@GPU
@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dq_on_gpu_with_autotuning(monkeypatch, atomic_dq, causal):
    # Autotuning times several configs, each adding into the dQ buffer: it must be reset.
    monkeypatch.setattr(fa_triton, "AUTOTUNE", True)
    q, k, v, dout = _qkv(2, 4, 2, 300, 517, 128, torch.float16)
    kw = dict(diag=217, wr=0) if causal else {}
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), torch.float16)


# ----------------------------------------------------------------------------- the TMA path
#
# The Hopper path loads the interior tiles of each inner loop through tensor descriptors. On a
# CPU it runs under the interpreter when FASTATTN_TRITON_TMA=1 (the `tma` fixture), which is
# how these tests check its addressing; tests/test_triton_compile.py lowers it for sm_90.

needs_tma = pytest.mark.skipif(fa_triton.TensorDescriptor is None, reason="triton without host TMA descriptors")


@pytest.fixture
def tma(monkeypatch):
    """Forces the TMA path and records, per launch, whether it was taken."""
    yield from forced_tma(monkeypatch, fa_triton, "_tma_descriptors", lambda descs: descs is not None, DEVICE)


def _nan_padded(B, H, S, D, dtype, layout):
    """(B, H, S, D) random values inside a larger NaN buffer, so that a tile read past the
    sequence (into the padding, the next head or the next batch entry) poisons the result."""
    if layout == "bhsd":  # heads padded by 9 rows: a head's rows run into NaN, then the next head
        buf = torch.full((B, H, S + 9, D), float("nan"), dtype=dtype, device=DEVICE)
        x = buf[:, :, :S]
    elif layout == "bshd":  # (B, S, H, D) transposed, each batch entry padded by 5 rows
        buf = torch.full((B, S + 5, H, D), float("nan"), dtype=dtype, device=DEVICE)
        x = buf[:, :S].transpose(1, 2)
    else:  # "qkv": one head's slice of a packed (B, S, 3, H, D) projection
        buf = torch.full((B, S + 3, 3, H, D), float("nan"), dtype=dtype, device=DEVICE)
        x = buf[:, :S, 1].transpose(1, 2)
    x.copy_(torch.randn(x.shape, dtype=dtype, device=DEVICE))
    return x


TMA_CASES = {  # dtype, B, H, Hkv, Sq, Sk, D, layout, mask kwargs
    "bhsd_causal_gqa": (torch.float32, 2, 4, 2, 97, 130, 32, "bhsd", dict(diag=0, wr=0)),
    "bshd_full": (torch.float32, 2, 2, 2, 97, 70, 16, "bshd", {}),
    "qkv_window_softcap": (torch.float32, 1, 2, 1, 90, 97, 16, "qkv", dict(diag=7, wl=40, wr=20, softcap=2.0)),
    "bhsd_causal_br_dropout": (torch.float32, 1, 2, 2, 50, 97, 16, "bhsd", dict(diag=47, wr=0, dropout_p=0.2, seed=9)),
    "fp16_bshd_mqa_causal": (torch.float16, 1, 4, 1, 97, 97, 32, "bshd", dict(diag=0, wr=0)),
}


@needs_tma
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tma_path_matches_naive(tma, case):
    dtype, B, H, Hkv, Sq, Sk, D, layout, kw = TMA_CASES[case]
    q = _nan_padded(B, H, Sq, D, dtype, layout)
    k = _nan_padded(B, Hkv, Sk, D, dtype, layout)
    v = _nan_padded(B, Hkv, Sk, D, dtype, layout)
    dout = _nan_padded(B, H, Sq, D, dtype, layout)
    got = _run(q, k, v, dout, **kw)
    assert tma == [True, True, True], "a launch did not take the TMA path"
    _compare(got, naive(q, k, v, dout, **kw), dtype)


@needs_tma
def test_auto_takes_tma_only_where_it_measured_faster(monkeypatch):
    """FASTATTN_TRITON_TMA=auto on a Hopper GPU: the backward's launches ask for the path, the
    forward's does not (_FORWARD_TMA_IN_AUTO); "1" forces it everywhere, "0" nowhere. The GPU
    is simulated for the switch (a CUDA-looking tensor on a compute capability 9.0 device,
    outside the interpreter); the launches after it are real, on this machine's device."""
    from fastattn.ops import _triton_common

    monkeypatch.setattr(fa_triton.TMA, "failed", False)
    hopper = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    with monkeypatch.context() as m:   # the simulated device, for the switch alone
        m.setattr(_triton_common, "INTERPRET", False)
        m.setattr(_triton_common, "_capability", lambda index: (9, 0))
        for mode, want in (("auto", [True, False]), ("1", [True, True]), ("0", [False, False])):
            m.setattr(fa_triton.TMA, "mode", mode)
            assert [fa_triton.TMA.enabled(hopper, auto) for auto in (True, False)] == want, mode

    monkeypatch.setattr(fa_triton.TMA, "mode", "auto")
    monkeypatch.setattr(fa_triton, "DQ_MODE", "kernel")   # the backward's two launches
    asked, plan = [], fa_triton._tma_descriptors

    def spy(operands, n_b, block, auto=True):
        asked.append(auto)
        return plan(operands, n_b, block, auto)

    monkeypatch.setattr(fa_triton, "_tma_descriptors", spy)
    q = torch.randn(1, 2, 17, 16, device=DEVICE)
    _run(q, q, q, torch.randn_like(q))
    assert asked == [False, True, True] and not fa_triton._FORWARD_TMA_IN_AUTO


@GPU
@needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "qkv"])
def test_tma_path_on_gpu(tma, dtype, layout):
    # The GPU's own tiles (64 and 128): sequences long enough for interior tiles, not multiples
    # of them, inside NaN padding; causal GQA and a windowed softcap.
    for (B, H, Hkv, Sq, Sk, D), kw in (((2, 4, 2, 300, 517, 128), dict(diag=217, wr=0)),
                                       ((1, 2, 1, 517, 300, 64), dict(diag=0, wl=200, wr=90, softcap=3.0))):
        q = _nan_padded(B, H, Sq, D, dtype, layout)
        k = _nan_padded(B, Hkv, Sk, D, dtype, layout)
        v = _nan_padded(B, Hkv, Sk, D, dtype, layout)
        dout = _nan_padded(B, H, Sq, D, dtype, layout)
        got = _run(q, k, v, dout, **kw)
        _compare(got, naive(q, k, v, dout, **kw), dtype)
    assert tma and all(tma)


@GPU
@needs_tma
def test_tma_varlen_dropout_atomic_dq_on_gpu(tma, atomic_dq):
    # The GPU's tiles on the TMA path with dQ by atomics: packed sequences around a NaN one,
    # then dropout with a bias in NaN-padded (B, S, H, D) storage.
    _varlen_case(torch.float16, True, (300, 40, 517), (517, 40, 300), D=64, poison=1)
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 300, 517, 128
    q, k, v, dout = (_nan_padded(B, h, s, D, torch.float16, "bshd") for h, s in ((H, Sq), (Hkv, Sk), (Hkv, Sk), (H, Sq)))
    bias = torch.randn(B, 1, Sq, Sk, device=DEVICE).expand(B, H, Sq, Sk)
    kw = dict(bias=bias, dropout_p=0.1, seed=3, diag=Sk - Sq, wr=0)
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), torch.float16)
    assert tma and all(tma)


@needs_tma
def test_tma_path_with_atomic_dq(tma, atomic_dq):
    dtype, B, H, Hkv, Sq, Sk, D, layout, kw = TMA_CASES["bhsd_causal_gqa"]
    q, k, v, dout = (_nan_padded(B, h, s, D, dtype, layout) for h, s in ((H, Sq), (Hkv, Sk), (Hkv, Sk), (H, Sq)))
    _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), dtype)
    assert tma == [True, True]  # forward K/V, dK/dV's Q/dO (no dQ launch)


@needs_tma
@pytest.mark.skipif(not fa_triton.INTERPRET, reason="tile shapes are forced in the interpreter only")
@pytest.mark.parametrize("bm,bn", [(16, 32), (32, 16)])
def test_tma_path_unequal_tiles(tma, monkeypatch, bm, bn):
    # K/V descriptors hold BLOCK_N rows, Q/dO descriptors BLOCK_M: unequal tiles tell them apart.
    monkeypatch.setitem(fa_triton._INTERPRET_BLOCKS, "BLOCK_M", bm)
    monkeypatch.setitem(fa_triton._INTERPRET_BLOCKS, "BLOCK_N", bn)
    for case in ("bhsd_causal_gqa", "qkv_window_softcap"):
        dtype, B, H, Hkv, Sq, Sk, D, layout, kw = TMA_CASES[case]
        q, k, v, dout = (_nan_padded(B, h, s, D, dtype, layout) for h, s in ((H, Sq), (Hkv, Sk), (Hkv, Sk), (H, Sq)))
        _compare(_run(q, k, v, dout, **kw), naive(q, k, v, dout, **kw), dtype)
    assert tma and all(tma)


@needs_tma
def test_tma_path_varlen(tma):
    # Packed sequences: a descriptor row of sequence n + 1 follows the last of sequence n.
    _varlen_case(torch.float32, True, (40, 1, 33), (35, 17, 50), D=16)
    _varlen_case(torch.float16, False, (33, 20), (17, 40), D=16)
    # a NaN sequence after ragged ones (40 and 33 rows against 16-row tiles) on both sides
    _varlen_case(torch.float32, False, (40, 9, 33), (37, 9, 50), D=16, poison=1)
    _varlen_case(torch.float32, True, (33, 9, 40), (50, 9, 37), D=16, poison=1)
    assert tma and all(tma)


@needs_tma
def test_tma_descriptor_layouts():

    def desc(x, n_rows=None):
        strides = (x.stride(0), x.stride(1), x.stride(2))
        return fa_triton._tma_descriptor(x, strides, x.shape[0], x.shape[1], n_rows or x.shape[2], 16)

    d = desc(torch.zeros(2, 3, 5, 32))  # contiguous: one row per (b, h, s)
    assert list(d.shape) == [30, 32] and list(d.strides) == [32, 1] and list(d.block_shape) == [16, 32]
    d = desc(torch.zeros(2, 5, 3, 32).transpose(1, 2))  # (B, S, H, D): a row holds every head
    assert list(d.shape) == [10, 96] and list(d.strides) == [96, 1]
    assert desc(torch.zeros(2, 3, 5, 40)) is None  # head dim not a power of two
    assert desc(torch.zeros(1 + 2 * 3 * 5 * 32)[1:].view(2, 3, 5, 32)) is None  # base not 16-byte aligned
    assert desc(torch.zeros(2, 3, 5, 20, dtype=torch.float16)[..., :16]) is None  # 40-byte rows
    # Two heads overlapping inside one row (head stride D / 2): no single box per head.
    assert desc(torch.zeros(64).as_strided((1, 2, 2, 16), (64, 8, 16, 1))) is None
    # Batch entries that do not start on a row boundary.
    assert desc(torch.zeros(200).as_strided((2, 1, 3, 16), (56, 48, 16, 1))) is None


def test_tma_build_failure_falls_back_once(monkeypatch):
    from fastattn.ops import _triton_common
    monkeypatch.setattr(_triton_common, "INTERPRET", False)
    switch = _triton_common.TmaSwitch("attention")
    acc = torch.ones(3)
    calls = []

    def launch(operands, use_tma):
        calls.append((operands, use_tma))
        if use_tma:
            acc.add_(1.0)  # what an autotuner's earlier configs leave behind
            raise RuntimeError("PassManager::run failed")
        assert (acc == 0).all(), "the retry must start from zeroed accumulators"

    with pytest.warns(RuntimeWarning, match="TMA attention path failed to build"):
        switch.launch(launch, ("desc_k", "desc_v"), ("k", "v"), (acc,))
    assert calls == [(("desc_k", "desc_v"), True), (("k", "v"), False)]
    assert switch.failed and not switch.enabled(torch.empty(1))
    switch.launch(launch, None, ("k", "v"))
    assert calls[-1] == (("k", "v"), False)


def test_tma_errors_that_are_not_the_paths_own(monkeypatch):
    from fastattn.ops import _triton_common
    monkeypatch.setattr(_triton_common, "INTERPRET", False)
    switch = _triton_common.TmaSwitch("attention")

    def failing(error_type):
        def launch(operands, use_tma):
            raise error_type("bad input")
        return launch

    # the retry fails too: the error is not the TMA path's; it propagates, the path stays on
    with pytest.raises(ValueError, match="bad input"):
        switch.launch(failing(ValueError), ("d",), ("t",))
    # out of device memory: no retry at all
    calls = []

    def oom(operands, use_tma):
        calls.append(use_tma)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        switch.launch(oom, ("d",), ("t",))
    assert calls == [True]
    # too little shared memory for the TMA configs at this shape: pointer loads, this launch only
    calls.clear()

    def no_smem(operands, use_tma):
        calls.append(use_tma)
        if use_tma:
            raise _triton_common.OutOfResources(300000, 232448, "shared memory")

    switch.launch(no_smem, ("d",), ("t",))
    assert calls == [True, False] and not switch.failed


def test_fp32_runs_only_32x32_tiles():
    """fp32 products ("ieee") have no tensor cores: each tl.dot unrolls into FMAs, and ptxas
    takes ~4x longer on a 64 x 64 tile than on 32 x 32 (a GPU test once timed out compiling
    one). The pruning keeps 32 x 32 for fp32 at every head dim, and the usual tiles otherwise."""
    for kind in ("fwd", "dkdv", "dq"):
        prune, configs = fa_triton._prune(kind), fa_triton._configs(kind)
        for d in (16, 64, 128, 256):
            shape = dict(BLOCK_D=d, SQ_BUCKET=4096, SK_BUCKET=4096)
            fp32 = prune(configs, {}, **shape, PRECISION="ieee")
            assert fp32 and {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in fp32} == {(32, 32)}
            half = prune(configs, {}, **shape, PRECISION=None)
            if d < 256:
                assert (half[0].kwargs["BLOCK_M"], half[0].kwargs["BLOCK_N"]) != (32, 32)


def _kept(kind, d, stages=False, **shape):
    prune, configs = fa_triton._prune(kind), fa_triton._configs(kind)
    kept = prune(configs, {}, BLOCK_D=d, **{"SQ_BUCKET": 4096, "SK_BUCKET": 4096, **shape},
                 PRECISION=None)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)[:3 + stages]
            for c in kept]


@pytest.mark.parametrize("d", [64, 128])
def test_backward_configs_follow_the_register_table(d):
    """The backward's tuning space at the head dims the register table covers
    (benchmarks/results/triton-registers-sm90a-2026-11-30.txt, ptxas for sm_90a): no 4-warp
    config with a 128-wide tile where those spill (dK/dV; dQ with 128 query rows, and 64 x 128
    at head dim 128), dK/dV's first config (the FASTATTN_AUTOTUNE=0 pick) with 8 warps at head
    dim 128 (4 warps at 64 x 64 spill 2-4x more), but at head dim 64 both backward kernels' first
    config is the one the autotuner chose on an H200 (64 x 64, 4 warps, 3 stages: 2.1x faster
    there than the 8-warp dK/dV), and dQ free to tune the larger spill-free tiles."""
    dkdv, dq = _kept("dkdv", d), _kept("dq", d)
    assert not [c for c in dkdv if c[2] == 4 and 128 in c[:2]], dkdv
    assert not [c for c in dq if c[2] == 4 and c[0] == 128], dq
    assert ((64, 128, 4) in dq) == (d == 64), dq        # spill-free at 64 only
    if d == 64:
        assert _kept("dkdv", d, stages=True)[0] == _kept("dq", d, stages=True)[0] == (64, 64, 4, 3)
        assert (64, 64, 8) in _kept("dkdv", d)        # still timed against the 4-warp one
    else:
        assert _kept("dkdv", d)[0] == (64, 64, 8)
        assert (64, 64, 4) in _kept("dkdv", d)        # still timed against the 8-warp one
    assert {(128, 64, 8), (64, 128, 8)} <= set(_kept("dq", d))
    if d == 128:   # dK/dV spills 390-1200 B with any 128-wide tile but the 32 x 128 one
        assert {c[:2] for c in _kept("dkdv", d) if 128 in c[:2]} == {(32, 128)}
    # the forward is untouched by these rules
    assert _kept("fwd", d)[0] == (64, 64, 4)
