"""Drop-in ``torch.nn.MultiheadAttention`` whose attention runs on fastattn's fused kernels."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import _check_dropout, _check_mask, _float_mask_to_fp32, _run_dense


def _additive(mask: Tensor, what: str, device: torch.device) -> Tensor:
    """nn.MultiheadAttention's mask convention (bool: True = may NOT attend; float: added), as
    an additive float mask: fp32 for a bool mask, a float mask's own dtype otherwise (the sum of
    both masks is taken before the one conversion to the kernels' fp32)."""
    _check_mask("MultiheadAttention", what, mask, device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32,
                           device=mask.device).masked_fill(mask, float("-inf"))
    if mask.is_floating_point():
        return mask.detach()
    raise TypeError(f"MultiheadAttention: {what} must be bool or floating point, got {mask.dtype}")


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the attention itself on fastattn's kernels.

    Same constructor, parameters (``in_proj_weight``/``in_proj_bias``, or ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` when kdim/vdim differ from embed_dim, ``out_proj``),
    state_dict and forward. The fused path runs when ``need_weights=False``; with
    ``need_weights=True`` (PyTorch's default) the attention weights must be materialised, so
    the call is served by PyTorch's implementation, as are ``add_bias_kv`` and
    ``add_zero_attn``, a float ``attn_mask`` or ``key_padding_mask`` that requires grad (a
    learned bias: the fused kernels give no gradient to their bias), and ``dropout=1.0`` in
    training. Differences on the fused
    path: a query that may attend to no key returns 0 instead of NaN; ``is_causal=True`` (a hint
    in PyTorch that ``attn_mask`` is the causal mask) applies the top-left causal mask directly
    when there is no key padding mask; float masks are added in fp32 (the kernels' bias dtype),
    also for float64 inputs.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        learned_mask = torch.is_grad_enabled() and any(
            m is not None and m.requires_grad for m in (attn_mask, key_padding_mask))
        # dropout 1 (every weight dropped) is outside the kernels' range [0, 1)
        drop_all = self.training and self.dropout == 1.0
        if (need_weights or self.bias_k is not None or self.add_zero_attn or learned_mask
                or drop_all):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True is a hint that attn_mask is the "
                               "causal mask; pass the mask too (as torch.nn.MultiheadAttention "
                               "requires)")
        shapes = tuple(tuple(x.shape) for x in (query, key, value))
        if not (query.dim() == key.dim() == value.dim() and query.dim() in (2, 3)):
            raise ValueError(f"MultiheadAttention: query, key and value must all be 2-D "
                             f"(unbatched) or all 3-D, got shapes {shapes[0]}, {shapes[1]}, "
                             f"{shapes[2]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"MultiheadAttention: key and value must have the same sequence "
                             f"length and batch size, got shapes {shapes[1]} and {shapes[2]}")
        for name, x, want in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if x.shape[-1] != want:
                raise ValueError(f"MultiheadAttention: {name}'s last dimension must be "
                                 f"{'embed_dim' if name == 'query' else name[0] + 'dim'} {want}, "
                                 f"got shape {tuple(x.shape)}")
        kpm_shape = None if key_padding_mask is None else tuple(key_padding_mask.shape)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # internally (seq, batch, embed), like PyTorch
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        tgt_len, bsz, embed = query.shape
        src_len = key.shape[0]
        if key.shape[1] != bsz:
            raise ValueError(f"MultiheadAttention: query and key must have the same batch size, "
                             f"got shapes {shapes[0]} and {shapes[1]}"
                             + (" (batch_first=True)" if self.batch_first else ""))
        heads, head_dim = self.num_heads, self.head_dim

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        # (S, N, E) -> (N, heads, S, head_dim), a view of the projection's output
        q = F.linear(query, w_q, b_q).view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)

        causal = is_causal and key_padding_mask is None
        bias = None
        if attn_mask is not None and not causal:
            m = _additive(attn_mask, "attn_mask", q.device)
            if m.dim() == 2:
                if m.shape != (tgt_len, src_len):
                    raise ValueError(f"MultiheadAttention: a 2-D attn_mask must be "
                                     f"{(tgt_len, src_len)}, got {tuple(m.shape)}")
                m = m.view(1, 1, tgt_len, src_len)
            elif m.dim() == 3:
                if m.shape != (bsz * heads, tgt_len, src_len):
                    raise ValueError(f"MultiheadAttention: a 3-D attn_mask must be "
                                     f"{(bsz * heads, tgt_len, src_len)}, got {tuple(m.shape)}")
                m = m.view(bsz, heads, tgt_len, src_len)
            else:
                raise ValueError(f"MultiheadAttention: attn_mask must be 2-D or 3-D, got "
                                 f"{attn_mask.dim()}-D")
            bias = m
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                want = (src_len,) if unbatched else (bsz, src_len)
                raise ValueError(f"MultiheadAttention: key_padding_mask must be {want}, "
                                 f"got {kpm_shape}")
            kpm = _additive(key_padding_mask, "key_padding_mask", q.device).view(
                bsz, 1, 1, src_len)
            bias = kpm if bias is None else bias + kpm
        if bias is not None:
            bias = _float_mask_to_fp32(bias).expand(bsz, heads, tgt_len, src_len)

        dropout_p = (_check_dropout("MultiheadAttention", self.dropout, "dropout")
                     if self.training and self.dropout else 0.0)
        out, _ = _run_dense(q, k, v, bias, head_dim ** -0.5, 0, -1, 0 if causal else -1, 0.0,
                            dropout_p)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed)  # (L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None
