"""Triton kernels of the total gradient norm and the clipping scale (math in reference.py).

Multi-tensor: one launch covers every tensor of a call. The host cuts each tensor into chunks
of CHUNK elements and writes a chunk table of (start, length) pairs, where start is the
chunk's element offset from the first tensor's data pointer (all tensors share a dtype, so
every address difference is a whole number of elements; it may be negative). Program i
handles chunk i, BLOCK elements per step, and writes one partial (sum of squares, or max |x|)
to partials[i]; a second one-program launch reduces the partials in a fixed order. No
atomics: the norm is bitwise the same run to run.

Traffic: the norm reads 4 B per fp32 element (2 B fp16/bf16) plus 4 B per 64K-element chunk;
the scale reads and writes each element once. BLOCK = 4096 with 8 warps gives each thread 16
elements (four or two 16-byte loads) in flight per step; CHUNK = 16 * BLOCK amortises the
table read and keeps the grid at ~16K programs for 1B elements.

The table goes to the GPU from pinned memory with a non-blocking copy and total_norm is read
through a pointer, so neither op synchronises the host with the stream.
The inf-norm is a max over the magnitude bits (fp32 pattern with the sign cleared, as int32):
IEEE patterns order like magnitudes and NaN sorts above inf, so it propagates NaN exactly.
"""

# No `from __future__ import annotations`: it turns `tl.constexpr` annotations into strings.
import collections
import math
import threading
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_common import INTERPRET
from .._triton_common import on_device as _on_device
from .._triton_common import cast_for as _cast_for


BLOCK = 4096
CHUNK = 16 * BLOCK
NUM_WARPS = 8
FINAL_BLOCK = 1024


@triton.jit
def _load_tile(ptrs, idx, full, length):
    # A mask on a runtime length defeats Triton's 16-byte vectorisation (it cannot prove the
    # mask constant over 4 lanes), so tiles wholly inside the chunk load unmasked; only the
    # last tile of a tensor takes the masked path.
    if full:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=idx < length, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _partials_kernel(base_ptr, table_ptr, partial_ptr, INF_NORM: tl.constexpr,
                     BLOCK: tl.constexpr, STEPS: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(table_ptr + 2 * pid)
    if ALIGNED:  # every chunk starts on a 16-element boundary: lets Triton emit 16-byte loads
        start = tl.multiple_of(start, 16)
    length = tl.load(table_ptr + 2 * pid + 1)
    lanes = tl.arange(0, BLOCK)
    if INF_NORM:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(STEPS):
        idx = s * BLOCK + lanes
        x = _load_tile(base_ptr + start + idx, idx, s * BLOCK + BLOCK <= length, length)
        if INF_NORM:
            acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        else:
            acc += x * x
    if INF_NORM:
        tl.store(partial_ptr + pid, tl.max(acc, axis=0).to(tl.float32, bitcast=True))
    else:
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _final_kernel(partial_ptr, out_ptr, n_partials, INF_NORM: tl.constexpr,
                  BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    if INF_NORM:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    for s in range(0, n_partials, BLOCK):
        idx = s + lanes
        x = tl.load(partial_ptr + idx, mask=idx < n_partials, other=0.0)
        if INF_NORM:
            acc = tl.maximum(acc, x.to(tl.int32, bitcast=True))
        else:
            acc += x.to(tl.float64)
    if INF_NORM:
        tl.store(out_ptr, tl.max(acc, axis=0).to(tl.float32, bitcast=True))
    else:
        tl.store(out_ptr, tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32))


@triton.jit
def _scale_kernel(base_ptr, table_ptr, norm_ptr, max_norm, BLOCK: tl.constexpr,
                  STEPS: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(table_ptr + 2 * pid)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
    length = tl.load(table_ptr + 2 * pid + 1)
    # torch: clamp((norm + 1e-6).reciprocal() * max_norm, max=1); a NaN coefficient stays NaN.
    norm = tl.load(norm_ptr).to(tl.float32)
    # div_rn: Triton's fp32 `/` is the approximate div.full (2 ulp); torch's reciprocal is
    # correctly rounded.
    one = tl.full([], 1.0, tl.float32)
    coef = tl.math.div_rn(one, norm + 1e-6) * max_norm
    coef = tl.where(coef > 1.0, 1.0, coef)
    lanes = tl.arange(0, BLOCK)
    for s in range(STEPS):
        idx = s * BLOCK + lanes
        ptrs = base_ptr + start + idx
        full = s * BLOCK + BLOCK <= length
        x = _load_tile(ptrs, idx, full, length)
        if full:
            tl.store(ptrs, _cast_for(x * coef, base_ptr))
        else:
            tl.store(ptrs, _cast_for(x * coef, base_ptr), mask=idx < length)


def _check(tensors: List[Tensor], op: str) -> None:
    dt, dev = tensors[0].dtype, tensors[0].device
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op} (triton): tensors must be float32, float16 or bfloat16, got {dt}")
    for i, t in enumerate(tensors):
        if t.dtype != dt or t.device != dev:
            raise ValueError(f"{op} (triton): tensors[{i}] is {t.dtype} on {t.device}, "
                             f"tensors[0] is {dt} on {dev}: one dtype and device per call")
        if not t.is_contiguous():
            raise ValueError(f"{op} (triton): tensors[{i}] must be contiguous, got strides "
                             f"{tuple(t.stride())}")


def _chunk_table(tensors: List[Tensor]):
    """(base tensor, int64 (n_chunks, 2) table on the device, whether every chunk start is a
    multiple of 16 elements from a 16-byte aligned base), or (None, None, False) if all empty.

    Built with a few vectorised CPU ops: a Python loop over the chunks (16K of them for 1B
    elements) cost ~15 ms a call, which made the whole op host-bound (H200, 2026-11-29: 33 ms
    against 3.6 ms for the CUDA kernel, the same for fp32 and bf16). The last few tables are
    kept (see _TABLES)."""
    live = [t for t in tensors if t.numel() > 0]
    if not live:
        return None, None, False
    base = live[0]
    device = base.device
    cuda = device.type == "cuda"
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    # The table depends only on the addresses, sizes and dtype; the stream is in the key so
    # that a table copied on one stream is never read on another without ordering.
    key = (device, base.dtype, torch.cuda.current_stream(device).cuda_stream if cuda else None,
           tuple((t.data_ptr(), t.numel()) for t in live))
    if not capturing:
        with _TABLES_LOCK:
            hit = _TABLES.get(key)
            if hit is not None:
                _TABLES.move_to_end(key)
                return (base, *hit)
    size = base.element_size()
    cpu = torch.device("cpu")   # whatever torch.set_default_device says
    offsets = torch.tensor([(t.data_ptr() - base.data_ptr()) // size for t in live],
                           dtype=torch.int64, device=cpu)
    numels = torch.tensor([t.numel() for t in live], dtype=torch.int64, device=cpu)
    aligned = base.data_ptr() % 16 == 0 and bool((offsets % 16 == 0).all())
    counts = (numels + CHUNK - 1) // CHUNK
    owner = torch.repeat_interleave(torch.arange(len(live), device=cpu), counts)
    first = torch.cumsum(counts, 0) - counts              # each tensor's first chunk row
    within = (torch.arange(owner.numel(), device=cpu) - first[owner]) * CHUNK  # offset in its tensor
    table = torch.stack((offsets[owner] + within,
                         torch.clamp(numels[owner] - within, max=CHUNK)), 1)
    if cuda:
        table = table.pin_memory().to(device, non_blocking=True)
    if not capturing:  # a graph must own its table: none of these may be freed under it
        with _TABLES_LOCK:
            _TABLES[key] = (table, aligned)
            while len(_TABLES) > _TABLES_KEPT:
                _TABLES.popitem(last=False)
    return base, table, aligned


# The last few chunk tables: clip_grad_norm_ asks for each (device, dtype) group's norm table,
# then for the same tables for the scale; gradients the allocator puts at the same addresses
# step after step get theirs back too. A few entries, not one: two groups interleave.
_TABLES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_TABLES_KEPT = 4
_TABLES_LOCK = threading.Lock()


def grad_norm(tensors: List[Tensor], norm_type: float) -> Tensor:
    """Norm 2 or inf of all tensors as one vector: float32 0-dim on their device."""
    inf_norm = math.isinf(norm_type) and norm_type > 0
    if not inf_norm and norm_type != 2.0:
        raise ValueError(f"grad_norm (triton): norm_type must be 2 or inf, got {norm_type}")
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    _check(tensors, "grad_norm")
    dev = tensors[0].device
    out = torch.zeros((), dtype=torch.float32, device=dev)
    base, table, aligned = _chunk_table(tensors)
    if base is None:
        return out
    n = table.shape[0]
    partials = torch.empty(n, dtype=torch.float32, device=dev)
    with _on_device(tensors[0]):
        _partials_kernel[(n,)](base, table, partials, INF_NORM=inf_norm, BLOCK=BLOCK,
                               STEPS=CHUNK // BLOCK, ALIGNED=aligned, num_warps=NUM_WARPS)
        _final_kernel[(1,)](partials, out, n, INF_NORM=inf_norm, BLOCK=FINAL_BLOCK,
                            num_warps=4)
    return out


def scale_grads_(tensors: List[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """tensors *= min(max_norm / (total_norm + 1e-6), 1), in place; total_norm float32 0-dim."""
    if not tensors:
        return
    _check(tensors, "scale_grads_")
    if total_norm.dtype != torch.float32 or total_norm.numel() != 1:
        raise ValueError("scale_grads_ (triton): total_norm must be a float32 one-element "
                         f"tensor, got {total_norm.dtype} of shape {tuple(total_norm.shape)}")
    base, table, aligned = _chunk_table(tensors)
    if base is None:
        return
    with _on_device(base):
        _scale_kernel[(table.shape[0],)](base, table, total_norm, float(max_norm), BLOCK=BLOCK,
                                         STEPS=CHUNK // BLOCK, ALIGNED=aligned,
                                         num_warps=NUM_WARPS)
