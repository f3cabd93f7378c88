"""The reference GPT: one file, read top to bottom (config, presets, blocks, model, generation).

Two backends run the same parameters:

* ``"fastattn"``: attention through ``fastattn.flash_attention`` (``fastattn.decode_attention``
  for the KV-cache decode step), the FFN through the fused forward of ``fastattn.nn.MLP`` /
  ``fastattn.nn.SwiGLU``, the loss through ``fastattn.linear_cross_entropy`` (the
  ``tokens x vocab`` logits are never held), ``fastattn.optim.AdamW``.
* ``"torch"``: ``F.scaled_dot_product_attention``, the same FFN submodules called eagerly,
  ``F.cross_entropy(F.linear(...))``, ``torch.optim.AdamW``.

The norms run ``fastattn.layer_norm`` / ``rms_norm`` with the residual add before them fused
in (``add_norm``), or the plain modules; rotary embeddings are plain PyTorch on both.
``set_backend`` switches kernels only: the state_dict is the same, so a checkpoint of one
backend loads into the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import _autocast, _eager
from fastattn.nn import MLP, SwiGLU

BACKENDS = ("fastattn", "torch")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
ROPE_BASE = 10000.0
NORM_EPS = 1e-5


def _torch_at_least(major: int, minor: int) -> bool:
    return torch.__version__ >= (major, minor)  # a TorchVersion: PEP 440 comparisons


# F.scaled_dot_product_attention(..., enable_gqa=True) exists from torch 2.5.
_SDPA_HAS_GQA = _torch_at_least(2, 5)


# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None   # None = n_head; fewer = grouped-query attention
    d_model: int = 256
    d_ff: Optional[int] = None        # None = 4*d_model (gelu), 8/3*d_model up to a multiple of 64
    vocab_size: int = 8192
    max_seq_len: int = 256
    norm: str = "layernorm"           # "layernorm" | "rmsnorm"
    mlp: str = "gelu"                 # "gelu" | "swiglu"
    positions: str = "learned"        # "learned" | "rope"
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self):
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # same parameter count as 4*d with three matrices (Llama)
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def validate(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")

        for name in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len"):
            positive_int(name)
        for name in ("n_kv_head", "d_ff"):
            if getattr(self, name) is not None:
                positive_int(name)
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                choices = ", ".join(map(repr, allowed))
                raise ValueError(f"GPTConfig.{name} must be one of {choices}, "
                                 f"got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model ({self.d_model}) must be divisible by n_head "
                             f"({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be divisible by n_kv_head "
                             f"({self.kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got d_model / n_head = "
                             f"{self.head_dim}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("tie_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")


PRESETS: dict[str, GPTConfig] = {
    # 3.4M parameters (1.6M of them the tied embedding, 8192 x 192): trains on 2 CPU cores in minutes.
    "tiny": GPTConfig(n_layer=4, n_head=4, d_model=192, max_seq_len=256, vocab_size=8192),
    # GPT-2 small (vocab 50257 padded to a multiple of 64): 124M parameters, 85M non-embedding.
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                           vocab_size=50304, norm="layernorm", mlp="gelu", positions="learned",
                           bias=True),
    # Llama's block at small scale: RMSNorm, SwiGLU, RoPE, 8 query heads sharing 2 kv heads.
    "llama-style-small": GPTConfig(n_layer=8, n_head=8, n_kv_head=2, d_model=512,
                                   max_seq_len=1024, vocab_size=8192, norm="rmsnorm",
                                   mlp="swiglu", positions="rope", bias=False),
}


def config(preset: str, **overrides) -> GPTConfig:
    """A copy of ``PRESETS[preset]`` with fields replaced by ``overrides`` (validated)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {', '.join(unknown)}; fields are "
                         f"{', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown GPT backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention)
# --------------------------------------------------------------------------------------------

class Rotary(nn.Module):
    """Rotates each (x_i, x_{i+D/2}) pair of a head by angle pos * base^(-2i/D):
    x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2])."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = ROPE_BASE):
        super().__init__()
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, base
        cos, sin = self._tables(None)
        # Not persistent: derived from the config, so the state_dict stays parameters only.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device) -> tuple[Tensor, Tensor]:
        D = self.head_dim
        inv_freq = 1.0 / self.base ** (torch.arange(0, D, 2, dtype=torch.float32,
                                                    device=device) / D)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device),
                             inv_freq)
        angles = torch.cat((angles, angles), dim=-1)                      # (S, D)
        return angles.cos(), angles.sin()

    def _apply(self, fn, recurse=True):
        # The tables stay fp32 and exact whatever the model is moved or cast to: cast with it,
        # model.bfloat16() would round them for good (a later .float() would not restore them),
        # and to_empty() would leave them uninitialised. They are rebuilt on the new device.
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, x: Tensor, pos) -> Tensor:
        """x (B, H, T, D) at positions pos .. pos + T - 1 (``pos`` an int), or at the positions
        in ``pos`` (a (T,) tensor: packed sequences, each counting from 0)."""
        if isinstance(pos, Tensor):
            cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        else:
            T = x.shape[-2]
            cos = self.cos[pos:pos + T].to(x.dtype)
            sin = self.sin[pos:pos + T].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

@dataclass
class Packed:
    """Sequences packed back to back with no padding (``GPT.packed_hidden_states``):
    ``cu_seqlens`` int32 (N + 1,) their boundaries, ``max_seqlen`` the longest, ``positions``
    (total,) each token's position within its own sequence.

    Shared prefixes (``GPT.shared_prefix_hidden_states``): with ``kv_index`` (total_k,), the
    keys and values of segment n are the packed tokens ``kv_index[cu_seqlens_k[n]:
    cu_seqlens_k[n + 1]]`` (a prefix segment's tokens, then the segment's own), and its
    queries the last ones among them (bottom-right causal)."""
    cu_seqlens: Tensor
    max_seqlen: int
    positions: Tensor
    kv_index: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_k: Optional[int] = None

    def keys(self) -> tuple[Tensor, int]:
        if self.kv_index is None:
            return self.cu_seqlens, self.max_seqlen
        return self.cu_seqlens_k, self.max_seqlen_k

    def block_causal_mask(self) -> Tensor:
        """(total, total_k) bool: query i of segment n sees key j iff j is one of segment n's
        keys and at most as far into them as i is into its queries, counted from the end."""
        total = self.positions.shape[0]
        cu_k, _ = self.keys()
        lens_q, lens_k = self.cu_seqlens.diff().long(), cu_k.diff().long()
        segs = torch.arange(lens_q.numel(), device=lens_q.device)
        seg_q = torch.repeat_interleave(segs, lens_q, output_size=total)
        total_k = total if self.kv_index is None else self.kv_index.shape[0]
        seg_k = torch.repeat_interleave(segs, lens_k, output_size=total_k)
        pos_q = torch.arange(total, device=segs.device) - self.cu_seqlens.long()[seg_q]
        pos_k = torch.arange(seg_k.numel(), device=segs.device) - cu_k.long()[seg_k]
        last = pos_q + (lens_k - lens_q)[seg_q]          # the furthest key each query sees
        return (seg_q[:, None] == seg_k[None, :]) & (pos_k[None, :] <= last[:, None])


class KVCache:
    """One layer's keys and values, (B, Hkv, S_max, D), filled left to right by generate().
    ``lengths``: the valid positions of each row as an int32 (B,) device tensor, set by the
    decode step whose positions live on the device (generate()'s CUDA-graph step)."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int):
        self.shape = (batch, n_kv_head, max_len, head_dim)
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.lengths: Optional[Tensor] = None

    def write(self, k: Tensor, v: Tensor, pos) -> None:
        """k, v (B, Hkv, T, D) at positions pos .. pos + T - 1 (``pos`` an int), or at the
        positions in ``pos`` (a (T,) int64 tensor, written without a host value)."""
        if self.k is None:  # allocated on first use: dtype as produced (autocast or not)
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        if isinstance(pos, Tensor):
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return
        self.k[:, :, pos:pos + k.shape[2]] = k
        self.v[:, :, pos:pos + v.shape[2]] = v


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False,
          attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """F.scaled_dot_product_attention with k/v of fewer heads (GQA: query head h reads kv head
    h // (H / Hkv))."""
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, backend: str, rotary: Optional[Rotary], pos: int = 0,
                cache: Optional[KVCache] = None, packed: Optional[Packed] = None) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split((q_dim, kv_dim, kv_dim), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)       # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)    # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rotary is not None:
            where = packed.positions if packed is not None else pos
            q, k = rotary(q, where), rotary(k, where)
        p = self.dropout if self.training else 0.0

        if packed is not None:
            # B == 1: the sequences side by side, each attending causally to itself only.
            if p > 0:
                raise ValueError("GPT: attention dropout on packed sequences is not supported "
                                 "(varlen_attention has none); use padded batches or "
                                 "dropout=0")
            if packed.kv_index is not None:      # each segment's keys: a shared prefix + own
                k, v = k[:, :, packed.kv_index], v[:, :, packed.kv_index]
            if backend == "fastattn":
                cu_k, max_k = packed.keys()
                y = fastattn.varlen_attention(
                    q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                    packed.cu_seqlens, cu_k, packed.max_seqlen, max_k,
                    causal=True).unsqueeze(0).transpose(1, 2)
            else:
                y = _sdpa(q, k, v, attn_mask=packed.block_causal_mask())
        elif isinstance(pos, Tensor):
            # Decode at positions held on the device (pos (T,)): nothing here depends on their
            # values, so generate() can capture the step in a CUDA graph and replay it.
            if backend != "fastattn" or cache is None or cache.k is None or cache.lengths is None:
                raise ValueError("GPT: positions as a tensor are for the decode step of the "
                                 "fastattn backend, after the prefill, with KVCache.lengths set")
            cache.write(k, v, pos)
            y = fastattn.decode_attention(q, cache.k, cache.v, cache.lengths)
        elif cache is None or pos == 0:
            # Training, or the prefill of generate(): the new tokens only see each other.
            if cache is not None:
                cache.write(k, v, pos)
            if backend == "fastattn":
                y = fastattn.flash_attention(q, k, v, causal=True, dropout_p=p)
            else:
                y = _sdpa(q, k, v, is_causal=True, dropout_p=p)
        else:
            # Decode: the T new tokens against the filled cache (positions < pos + T).
            cache.write(k, v, pos)
            length = pos + T
            if backend == "fastattn":
                seqlens = torch.full((B,), length, dtype=torch.int32, device=q.device)
                y = fastattn.decode_attention(q, cache.k, cache.v, seqlens)
            else:
                k_all, v_all = cache.k[:, :, :length], cache.v[:, :, :length]
                mask = None
                if T > 1:  # new token i sees keys j <= pos + i (bottom-right causal)
                    mask = torch.ones(T, length, dtype=torch.bool, device=q.device).tril(pos)
                y = _sdpa(q, k_all, v_all, attn_mask=mask)

        y = y.transpose(1, 2).reshape(B, T, q_dim)
        return self.resid_drop(self.proj(y))


# --------------------------------------------------------------------------------------------
# Feed-forward: the fastattn.nn modules own the parameters on both backends
# --------------------------------------------------------------------------------------------

def feed_forward(ffn: nn.Module, x: Tensor, backend: str) -> Tensor:
    if backend == "torch":  # eager, through the same nn.Linear submodules
        if isinstance(ffn, SwiGLU):
            return ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
        return ffn.fc2(F.gelu(ffn.fc1(x)))
    return ffn(x)  # the fused op (it follows torch.autocast itself)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=NORM_EPS)
    return nn.LayerNorm(cfg.d_model, eps=NORM_EPS, bias=cfg.bias)


def add_norm(norm: nn.Module, x: Tensor, branch: Optional[Tensor], backend: str,
             cast: bool = True) -> tuple[Tensor, Tensor]:
    """(norm(s), s) for the residual stream s = x + branch (branch None: s = x).

    fastattn: one pass of fastattn.layer_norm / rms_norm that adds, normalizes and, with
    ``cast`` inside torch.autocast, writes the normalized rows in the autocast dtype, which is
    what the matmul after the norm would cast them to (the same rounding). torch: the add and
    the module, as written."""
    if backend == "torch":
        s = x if branch is None else x + branch
        return norm(s), s
    autocast = _autocast.dtype(x.device.type) if cast else None
    if isinstance(norm, nn.RMSNorm):
        fn, params = fastattn.rms_norm, (norm.weight,)
    else:
        fn, params = fastattn.layer_norm, (norm.weight, norm.bias)
    if branch is None:
        return fn(x, norm.normalized_shape, *params, norm.eps, out_dtype=autocast), x
    return fn(branch, norm.normalized_shape, *params, norm.eps, residual=x, out_dtype=autocast)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``forward`` takes and returns the residual stream as ``(x, branch)``, the stream being
    ``x + branch``: the block's last add (its MLP output) is left to the next norm, so that on
    the fastattn backend every residual add runs inside a norm's pass (``add_norm``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ffn_dim, activation="gelu", bias=cfg.bias)
        self.mlp_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, branch: Optional[Tensor], backend: str,
                rotary: Optional[Rotary], pos: int = 0, cache: Optional[KVCache] = None,
                packed: Optional[Packed] = None,
                norms: Optional[str] = None) -> tuple[Tensor, Tensor]:
        norms = norms or backend     # the norms' backend (add_norm)
        h, x = add_norm(self.norm1, x, branch, norms)
        h, x = add_norm(self.norm2, x, self.attn(h, backend, rotary, pos, cache, packed), norms)
        return x, self.mlp_drop(feed_forward(self.mlp, h, backend))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def _check_1d(fn: str, name: str, t, dtypes: tuple, device, what: str = "",
              min_numel: int = 0) -> None:
    """TypeError unless ``t`` is a 1-D tensor of one of ``dtypes`` with >= min_numel entries;
    ValueError unless it is on ``device`` (None: any)."""
    if not isinstance(t, Tensor) or t.dtype not in dtypes or t.dim() != 1 \
            or t.numel() < min_numel:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{fn}: {name} must be a 1-D {names} tensor{what}, got {got}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} must be on ids' device ({device}), got {t.device}")


def _check_shared_layout(fn: str, total: int, cu_q: list, kv: list,
                         cu_k: list) -> tuple[int, int]:
    """The shared-prefix layout's contract on host values; returns the longest segment and key
    list. Each segment's keys end with its own tokens."""
    def short(xs):
        return str(xs) if len(xs) <= 12 else \
            f"[{', '.join(map(str, xs[:6]))}, ..., {xs[-1]}] ({len(xs)} entries)"
    if len(cu_q) != len(cu_k) or len(cu_q) < 2 or cu_q[0] != 0 \
            or cu_q[-1] != total or cu_k[0] != 0 or cu_k[-1] != len(kv):
        raise ValueError(f"{fn}: inconsistent layout: {total} ids, "
                         f"{len(kv)} kv_index entries, cu_seqlens {short(cu_q)}, cu_seqlens_k "
                         f"{short(cu_k)} (one of each per segment plus one, from 0 to len(ids) "
                         f"and to len(kv_index))")
    max_q = max_k = 0
    for n in range(len(cu_q) - 1):
        lq, lk = cu_q[n + 1] - cu_q[n], cu_k[n + 1] - cu_k[n]
        if lq < 1 or lk < lq:
            raise ValueError(f"{fn}: segment {n} has {lq} tokens and {lk} keys (needs >= 1 "
                             f"token and at least as many keys as tokens)")
        if kv[cu_k[n + 1] - lq:cu_k[n + 1]] != list(range(cu_q[n], cu_q[n + 1])):
            raise ValueError(f"{fn}: segment {n}'s keys must end with its own tokens "
                             f"{cu_q[n]}..{cu_q[n + 1] - 1}, got "
                             f"{short(kv[cu_k[n + 1] - lq:cu_k[n + 1]])}")
        max_q, max_k = max(max_q, lq), max(max_k, lk)
    if kv and (min(kv) < 0 or max(kv) >= total):
        raise ValueError(f"{fn}: kv_index must index ids (0 <= i < {total})")
    return max_q, max_k


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "fastattn", *, fused_norms: bool = True):
        """``fused_norms=False``: the fastattn backend runs its norms as the torch backend does
        (a plain add, then the module), for measuring what the fused ones buy."""
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        if not isinstance(fused_norms, bool):
            raise TypeError(f"GPT: fused_norms must be a bool, got {fused_norms!r}")
        config.validate()
        self.config = config
        self.backend = _check_backend(backend)
        self.fused_norms = fused_norms

        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model) \
            if config.positions == "learned" else None
        self.rotary = Rotary(config.head_dim, config.max_seq_len) \
            if config.positions == "rope" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

        # GPT-2 init: N(0, 0.02) everywhere; the projections that write into the residual
        # stream get 0.02 / sqrt(2 n_layer), so the stream's variance stays O(1) with depth
        # (each block adds two such terms).
        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            out = block.mlp.down_proj if config.mlp == "swiglu" else block.mlp.fc2
            for lin in (block.attn.proj, out):
                nn.init.normal_(lin.weight, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_backend(self, name: str) -> "GPT":
        """Switch kernels (the parameters are untouched). Returns self."""
        self.backend = _check_backend(name)
        return self

    # ---- forward ---------------------------------------------------------------------------

    def _check_idx(self, idx, name: str = "idx", pos: int = 0, values: bool = False) -> None:
        """Type, shape and length of the token ids; their range too where that costs no device
        sync (CPU tensors, outside torch.compile) or ``values`` asks for it (generate's prompt:
        an id past the vocabulary would otherwise be a bare IndexError on the CPU, a
        device-side assert that ends the process on a GPU)."""
        if not isinstance(idx, Tensor):
            raise TypeError(f"GPT: {name} must be a torch.Tensor of token ids, got "
                            f"{type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"GPT: {name} must hold int64 (or int32) token ids, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"GPT: {name} must be 2-D (batch, seq_len), got shape "
                             f"{tuple(idx.shape)}")
        if idx.shape[1] < 1:
            raise ValueError(f"GPT: {name} must hold at least one token per row, got shape "
                             f"{tuple(idx.shape)}")
        if pos + idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"GPT: sequence length {pos + idx.shape[1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if idx.numel() and (values or (idx.device.type == "cpu"
                                       and not _eager._is_compiling())):
            low, high = idx.min().item(), idx.max().item()
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"GPT: {name} holds token id {bad}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")

    def _hidden(self, idx: Tensor, pos: int = 0, caches: Optional[list[KVCache]] = None,
                packed: Optional[Packed] = None) -> Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            if packed is not None:
                where = packed.positions
            elif isinstance(pos, Tensor):   # the positions themselves (decode, see forward)
                where = pos
            else:
                where = torch.arange(pos, pos + idx.shape[1], device=idx.device)
            x = x + self.wpe(where)
        x, branch = self.drop(x), None
        norms = self.backend if self.fused_norms else "torch"
        for i, block in enumerate(self.blocks):
            x, branch = block(x, branch, self.backend, self.rotary, pos,
                              None if caches is None else caches[i], packed, norms)
        # Not cast: the hidden states keep the dtype they have on the torch backend.
        return add_norm(self.norm_f, x, branch, norms, cast=False)[0]

    def hidden_states(self, idx: Tensor) -> Tensor:
        """(B, T, d_model) after the final norm: the input of lm_head (for log-prob losses)."""
        self._check_idx(idx)
        return self._hidden(idx)

    def packed_hidden_states(self, ids: Tensor, cu_seqlens: Tensor,
                             max_seqlen: Optional[int] = None) -> Tensor:
        """Hidden states of sequences packed back to back with no padding: ``ids`` (total,) the
        sequences' tokens one after another, ``cu_seqlens`` int32 (N + 1,) on ids' device the
        prefix sums of their lengths (0 first, total last), ``max_seqlen`` the longest length
        (computed from cu_seqlens, a device sync, when None). Returns (total, d_model): each
        sequence's rows equal ``hidden_states`` of that sequence alone.

        The fastattn backend attends with ``fastattn.varlen_attention`` (no compute or memory
        spent on padding); the torch backend with SDPA and a block-diagonal causal mask (total^2
        memory: meant for checking, plain PyTorch trains on padded batches)."""
        fn = "GPT.packed_hidden_states"
        _check_1d(fn, "ids", ids, (torch.int64, torch.int32), None, " of token ids")
        _check_1d(fn, "cu_seqlens", cu_seqlens, (torch.int32,), ids.device, " (num_seqs + 1,)",
                  min_numel=2)
        total = ids.shape[0]
        lens = cu_seqlens.diff()
        if max_seqlen is None or ids.device.type == "cpu":   # host values: free on the CPU
            cu_host = cu_seqlens.tolist()
            lens_host = [b - a for a, b in zip(cu_host, cu_host[1:])]
            if cu_host[0] != 0 or cu_host[-1] != total or min(lens_host) < 1:
                raise ValueError(f"GPT.packed_hidden_states: cu_seqlens must rise strictly from "
                                 f"0 to len(ids) = {total}, got {cu_host}")
            longest = max(lens_host)
            if max_seqlen is None:
                max_seqlen = longest
            elif max_seqlen < longest:
                raise ValueError(f"GPT.packed_hidden_states: max_seqlen {max_seqlen} is less "
                                 f"than the longest sequence ({longest})")
        if max_seqlen > self.config.max_seq_len:
            raise ValueError(f"GPT: sequence length {max_seqlen} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens.long(), output_size=total)
        packed = Packed(cu_seqlens, int(max_seqlen),
                        torch.arange(total, device=ids.device) - starts)
        return self._hidden(ids.unsqueeze(0), packed=packed)[0]

    def shared_prefix_hidden_states(self, ids: Tensor, cu_seqlens: Tensor,
                                    kv_index: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen: Optional[int] = None,
                                    max_seqlen_k: Optional[int] = None) -> Tensor:
        """Hidden states of packed segments that may continue a shared prefix, each prefix
        computed once: the alignment loops' layout for K completions of one prompt.

        ``ids`` (total,) the segments' tokens back to back, ``cu_seqlens`` int32 (N + 1,) the
        segments' boundaries;
        segment n attends to the packed tokens ``kv_index[cu_seqlens_k[n]:cu_seqlens_k[n+1]]``
        (int64 ``kv_index``, int32 ``cu_seqlens_k``), which end with its own tokens (causal,
        aligned at the end). A prompt is a segment whose keys are itself; a completion one whose
        keys are its prompt's tokens followed by its own; a token's position is its place
        among its segment's keys (a completion's continue its prompt's). ``max_seqlen`` / ``max_seqlen_k``: the longest segment and key list (read
        from the index tensors, a device sync on a GPU, when None). Returns (total, d_model),
        each row equal to ``hidden_states`` of its full sequence at that position. The layout
        is checked in full on the CPU (host values are free there) or when a maximum is not
        given."""
        fn = "GPT.shared_prefix_hidden_states"
        _check_1d(fn, "ids", ids, (torch.int64, torch.int32), None)
        for name, t, dtypes in (("cu_seqlens", cu_seqlens, (torch.int32,)),
                                ("kv_index", kv_index, (torch.int64,)),
                                ("cu_seqlens_k", cu_seqlens_k, (torch.int32,))):
            _check_1d(fn, name, t, dtypes, ids.device)
        if max_seqlen is None or max_seqlen_k is None or ids.device.type == "cpu":
            max_q, max_k = _check_shared_layout(fn, ids.shape[0], cu_seqlens.tolist(),
                                                kv_index.tolist(), cu_seqlens_k.tolist())
            max_seqlen = max_q if max_seqlen is None else max_seqlen
            max_seqlen_k = max_k if max_seqlen_k is None else max_seqlen_k
            if max_seqlen < max_q or max_seqlen_k < max_k:
                raise ValueError(f"{fn}: max_seqlen {max_seqlen} / max_seqlen_k {max_seqlen_k} "
                                 f"are less than the longest segment ({max_q}) / key list "
                                 f"({max_k})")
        if max_seqlen_k > self.config.max_seq_len:
            raise ValueError(f"GPT: sequence length {max_seqlen_k} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        # position = place among the segment's keys: its index in the segment plus the keys
        # before its own (the prompt's, for a completion); no host sync
        total = ids.shape[0]
        lens_q, lens_k = cu_seqlens.diff().long(), cu_seqlens_k.diff().long()
        seg = torch.repeat_interleave(torch.arange(lens_q.numel(), device=ids.device), lens_q,
                                      output_size=total)
        positions = (torch.arange(total, device=ids.device) - cu_seqlens.long()[seg]
                     + (lens_k - lens_q)[seg])
        packed = Packed(cu_seqlens, int(max_seqlen), positions, kv_index, cu_seqlens_k,
                        int(max_seqlen_k))
        return self._hidden(ids.unsqueeze(0), packed=packed)[0]

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, *,
                ignore_index: int = -100) -> Tensor:
        """Logits (B, T, vocab) without targets; with targets (B, T), the mean cross-entropy
        over the tokens whose target is not ``ignore_index``."""
        self._check_idx(idx)
        if targets is not None:
            if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
                got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
                raise TypeError(f"GPT: targets must be an int64 (or int32) tensor, got {got}")
            if targets.shape != idx.shape:
                raise ValueError(f"GPT: targets must have the shape of idx {tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape)}")
        h = self._hidden(idx)
        if targets is None:
            return self.lm_head(h)
        h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1).long()
        if self.backend == "fastattn":  # never materialises the (tokens x vocab) logits
            return fastattn.linear_cross_entropy(h2, self.lm_head.weight, t2,
                                                 ignore_index=ignore_index)
        return F.cross_entropy(F.linear(h2, self.lm_head.weight), t2,
                               ignore_index=ignore_index)

    # ---- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cuda_graph: Optional[bool] = None) -> Tensor:
        """Append ``max_new_tokens`` tokens to idx (B, T): the prompt is prefilled into a KV
        cache of size T + max_new_tokens, then each new token is one decode step.
        temperature 0 is greedy; top_k keeps the k most likely tokens; ``generator`` seeds the
        sampling. ``cuda_graph``: capture the decode step in a CUDA graph once and replay it
        for each token (see ``_DecodeStep``); None (default) does so on the fastattn backend
        with CUDA inputs from GRAPH_MIN_TOKENS new tokens on, and falls back to plain steps,
        with a warning, if capture fails."""
        self._check_idx(idx, values=True)
        use_graph = self._graph_decode(cuda_graph, idx) and (
            cuda_graph or (isinstance(max_new_tokens, int) and max_new_tokens >= GRAPH_MIN_TOKENS))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be an int >= 0, got "
                             f"{max_new_tokens!r}")
        B, T = idx.shape
        total = T + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"GPT.generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) = "
                             f"{total} exceeds max_seq_len {self.config.max_seq_len}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0
                and math.isfinite(temperature)):
            raise ValueError(f"GPT.generate: temperature must be a finite number >= 0, got "
                             f"{temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise ValueError(f"GPT.generate: top_k must be None or an int >= 1, got {top_k!r}")
        if max_new_tokens == 0:
            return idx.clone()  # a new tensor, as for every other length

        modes = {m: m.training for m in self.modules()}  # each module's own, restored after
        self.eval()  # no dropout while sampling
        try:
            cfg = self.config
            caches = [KVCache(B, cfg.kv_heads, total, cfg.head_dim) for _ in range(cfg.n_layer)]
            decode = _DecodeStep(self, caches, B, idx.device, idx.is_cuda) if use_graph else None
            out = [idx]
            logits = self.lm_head(self._hidden(idx, 0, caches)[:, -1])            # prefill
            for step in range(max_new_tokens):
                nxt = self._sample(logits, temperature, top_k, generator).to(idx.dtype)
                out.append(nxt)
                if step + 1 < max_new_tokens:                                     # decode
                    if decode is not None:
                        logits = decode(nxt, T + step)
                    else:
                        logits = self.lm_head(self._hidden(nxt, T + step, caches)[:, -1])
            return torch.cat(out, dim=1)
        finally:
            for m, mode in modes.items():
                m.training = mode

    def _graph_decode(self, cuda_graph: Optional[bool], idx: Tensor) -> bool:
        """Whether generate() runs its decode steps through _DecodeStep."""
        possible = self.backend == "fastattn" and idx.is_cuda
        if cuda_graph is None:
            return (possible and not torch.compiler.is_compiling()
                    and not torch.cuda.is_current_stream_capturing())
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"GPT.generate: cuda_graph must be None or a bool, got {cuda_graph!r}")
        if cuda_graph and not possible:
            raise ValueError(f"GPT.generate: cuda_graph=True needs the fastattn backend (its "
                             f"decode_attention takes the cache lengths on the device) and CUDA "
                             f"inputs; got backend {self.backend!r}, ids on {idx.device}")
        if cuda_graph and torch.cuda.is_current_stream_capturing():
            raise ValueError("GPT.generate: cuda_graph=True inside a CUDA-graph capture (a "
                             "graph cannot be captured within another); pass cuda_graph=False")
        return cuda_graph

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> Tensor:
        """logits (B, V) -> next token ids (B, 1)."""
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        # Inverse-CDF sampling: one uniform number per row (torch.multinomial draws one
        # exponential per vocabulary entry, which dominates a small model's decode step).
        # The sum is in float64 so that tokens of tiny probability keep their share.
        cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
        total = cdf[:, -1:].contiguous()
        if logits.device.type == "cpu" and not bool(torch.isfinite(total).all()):
            raise ValueError("GPT.generate: the logits give non-finite probabilities (NaN or "
                             "inf logits, or a temperature so small that logits/temperature "
                             "overflows)")
        u = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device,
                       dtype=cdf.dtype) * total
        idx = torch.searchsorted(cdf, u, right=True)
        # u rounded up to the total: the last token of nonzero probability; never past the
        # vocabulary (non-finite rows on a GPU, which is not checked there: a sync per token)
        last = torch.searchsorted(cdf, total)
        return torch.minimum(idx, last).clamp_max(logits.shape[-1] - 1)

    # ---- training helpers ------------------------------------------------------------------

    def configure_optimizer(self, lr: float, weight_decay: float,
                            betas: tuple = (0.9, 0.95)) -> torch.optim.Optimizer:
        """AdamW with weight decay on the >= 2-D weights (matmuls, embeddings) and none on
        biases and norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if self.backend == "fastattn":
            return fastattn.optim.AdamW(groups, lr=lr, betas=betas)
        on_cuda = bool(params) and params[0].device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if on_cuda else None)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied lm_head counted once). non_embedding drops the token and
        position embeddings and an untied lm_head (the output embedding)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L d T, where
        N counts the weights used in matmuls: the non-embedding parameters plus the lm_head
        (vocab x d_model), and 12 L d T is the attention score and value matmuls (T = seq_len,
        not halved for the causal mask)."""
        cfg = self.config
        n = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * seq_len


# --------------------------------------------------------------------------------------------
# generate()'s decode step in a CUDA graph
# --------------------------------------------------------------------------------------------

_warned_capture = False
# Fewest new tokens for which generate(cuda_graph=None) captures: the capture costs about one
# more eager step plus the graph's instantiation, each replay saves a step's host time (a guess
# until a GPU run measures both).
GRAPH_MIN_TOKENS = 8


class _DecodeStep:
    """generate()'s decode step with every input in a fixed device buffer (the token ids, their
    position, each row's valid cache length), so that no shape and no host value depends on the
    step. On CUDA the step is captured once in a CUDA graph and replayed for each token: a small
    model's decode step on a GPU is mostly the host's Python and kernel launches, which the
    replay leaves out. Only the fastattn backend can: decode_attention reads the cache lengths
    from the device, where SDPA would need the cache sliced to a host-known length.
    ``capture=False`` runs the same step eagerly (how the CPU tests check it)."""

    def __init__(self, model: GPT, caches: list, batch: int, device: torch.device,
                 capture: bool):
        self.model, self.caches, self.capture = model, caches, capture
        self.idx = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        for cache in caches:    # every layer reads the step's lengths from this one buffer
            cache.lengths = self.lengths
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[Tensor] = None

    def _step(self) -> Tensor:
        # Under autocast a captured step must not use or fill autocast's cache of cast weights
        # (PyTorch's CUDA-graph notes): the casts are part of the step.
        dtype = fastattn._autocast.dtype(self.idx.device.type)
        ctx = (torch.autocast(self.idx.device.type, dtype=dtype, cache_enabled=False)
               if dtype is not None else contextlib.nullcontext())
        with ctx:
            self.lengths.copy_((self.pos + 1).to(torch.int32).expand(self.lengths.shape[0]))
            return self.model.lm_head(self.model._hidden(self.idx, self.pos, self.caches)[:, -1])

    def __call__(self, ids: Tensor, pos: int) -> Tensor:
        """Logits (B, V) of tokens ``ids`` (B, 1) at position ``pos``; a replayed graph's logits
        live in its own buffer, which the next call overwrites."""
        self.idx.copy_(ids)
        self.pos.fill_(pos)
        if not self.capture:
            return self._step()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._warm_up_and_capture()

    def _warm_up_and_capture(self) -> Tensor:
        """The first decode step, run eagerly on a side stream (its logits are this step's; it
        also initialises cuBLAS there and compiles any kernel), then the same step captured on
        that stream for the next calls. Not torch.cuda.graph: its synchronize() / empty_cache()
        on entry would flush the allocator of the whole process on every generate(), and after
        a failed capture it would leave this thread on its capture stream. Capture errors are
        thread-local (other threads' CUDA calls, a DataLoader's pinning thread, stay legal)."""
        global _warned_capture
        device = self.idx.device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.device(device), torch.cuda.stream(side):
            logits = self._step()
            side.synchronize()  # an error of the eager step surfaces here, not as "capture failed"
            graph = torch.cuda.CUDAGraph()
            try:
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    static = self._step()
                finally:
                    graph.capture_end()
                self.graph, self.logits = graph, static
            except Exception as exc:   # any failure to capture: the next steps without a graph
                self.capture = False
                if not _warned_capture:
                    _warned_capture = True
                    warnings.warn(f"GPT.generate: capturing the decode step in a CUDA graph "
                                  f"failed ({type(exc).__name__}: {exc}); decoding without one "
                                  f"(cuda_graph=False skips the attempt)", RuntimeWarning,
                                  stacklevel=4)
        current.wait_stream(side)
        logits.record_stream(current)
        return logits
