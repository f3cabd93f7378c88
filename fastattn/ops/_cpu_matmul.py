"""The matmuls of fastattn's CPU paths: oneDNN where it is the faster fp32 GEMM, ATen elsewhere.

PyTorch's CPU ``mm`` / ``F.linear`` call MKL's sgemm. The oneDNN inside the same torch wheel
(``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend fuses linear layers
into) runs its own JIT-generated AVX-512 / AVX2 kernels. On the 2-core AMD EPYC (Zen 4) the
CI runs on it measured 1.1-1.5x MKL on the two products a layer's forward and input gradient
make, ``x @ W^T`` and ``dY @ W`` (2048 tokens, 192-2048 features; the numbers, and the command,
are in the README's FFN section), and slower on the weight gradient ``dY^T @ X``, whose first
operand it would have to transpose in memory first. So:

- ``linear(x, w, b)`` = ``x @ w^T + b`` and ``mm(a, b)`` with ``b`` a weight read as (in, out)
  (``dY @ W``) run on oneDNN when the product is large enough for its per-call overhead (~15 us)
  not to show (M·N·K >= 2^22), the tensors are fp32, and oneDNN answered a smoke test at first
  use;
- everything else (a transposed first operand, small or empty products, other dtypes) runs on
  ATen, as eager PyTorch would.

The routing is on only inside ``with enabled(True)``, which an op's body enters when its
backend is "cpu" (fastattn's C++ kernels); the reference backend, and any caller outside such
a block, gets ATen's matmuls throughout.

Both are plain fp32 GEMMs (fp32 products and sums; the last bits differ from MKL's, as any
two BLAS's do); each library is deterministic run to run, and the choice depends only on the
shapes, dtypes and ``FASTATTN_CPU_MATMUL``, never on timing, so a run repeats exactly.
``FASTATTN_CPU_MATMUL=aten`` sends every product to ATen (read at first use).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

_MIN_MACS = 1 << 22
_state: dict = {}
_ENABLED = contextvars.ContextVar("fastattn_cpu_matmul_enabled", default=False)
_ATEN_ONLY = contextvars.ContextVar("fastattn_cpu_matmul_aten_only", default=False)


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Within the block, the functions below route to oneDNN where it is faster (``flag``) or
    never (``not flag``)."""
    token = _ENABLED.set(bool(flag))
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Within the block every product takes ATen, as with ``FASTATTN_CPU_MATMUL=aten`` (for a
    benchmark that measures what the routing buys, side by side in one process)."""
    token = _ATEN_ONLY.set(True)
    try:
        yield
    finally:
        _ATEN_ONLY.reset(token)


def onednn_status() -> tuple[bool, str]:
    """(whether the CPU paths use oneDNN, why not when they do not); decided once per process."""
    if "ok" not in _state:
        _state["ok"], _state["why"] = _probe()
    return _state["ok"], _state["why"]


def _probe() -> tuple[bool, str]:
    choice = os.environ.get("FASTATTN_CPU_MATMUL", "auto").strip().lower() or "auto"
    if choice not in ("auto", "aten"):
        raise ValueError(f"FASTATTN_CPU_MATMUL must be 'auto' (oneDNN where it is the faster "
                         f"GEMM) or 'aten' (ATen's everywhere), got "
                         f"{os.environ['FASTATTN_CPU_MATMUL']!r}")
    if choice == "aten":
        return False, "FASTATTN_CPU_MATMUL=aten"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN (mkldnn)"
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False, "this torch has no mkldnn::_linear_pointwise op"
    try:    # the layouts the routes pass: plain, row-padded (a slice) and transposed operands
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(7, 33, generator=gen)
        w = torch.randn(5, 33, generator=gen)
        b = torch.randn(5, generator=gen)
        cases = [(x, w, b), (x[:, :5], w[:, :5], None),
                 (x[:, :5], w[:, :5].t().contiguous().t(), None)]
        got = [op(xi, wi, bi, "none", [], "") for xi, wi, bi in cases]
    except Exception as err:    # a build whose oneDNN cannot run on this CPU
        return False, f"mkldnn::_linear_pointwise failed its smoke test: {err}"
    for (xi, wi, bi), g in zip(cases, got):
        want = torch.nn.functional.linear(xi, wi, bi)
        if g.shape != want.shape or not torch.allclose(g, want, rtol=1e-5, atol=1e-5):
            return False, "mkldnn::_linear_pointwise gave a wrong product in its smoke test"
    return True, ""


def takes(a: Tensor, n: int) -> bool:
    """Whether the (M, K) x (K, n) product with first operand ``a`` goes to oneDNN here (a's
    rows must be its products' rows: unit stride along K)."""
    if not _ENABLED.get() or _ATEN_ONLY.get() or a.dim() != 2 or a.stride(-1) != 1:
        return False
    m, k = a.shape
    return (a.dtype == torch.float32 and a.device.type == "cpu" and m * n * k >= _MIN_MACS
            and min(m, n, k) > 0 and torch.backends.mkldnn.enabled and onednn_status()[0])


def _onednn(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x @ w^T + b on oneDNN; w in nn.Linear layout or a transpose of one (the layouts the
    smoke test checked)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _unit_stride(w: Tensor) -> bool:
    return w.dim() == 2 and 1 in w.stride()


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """``x @ w^T + b`` for 2-D x (M, K), w (N, K) (nn.Linear layout), b (N,) or None."""
    if (takes(x, w.shape[0]) and _unit_stride(w) and w.dtype == torch.float32
            and (b is None or b.dtype == torch.float32)):
        return _onednn(x, w, b)
    return torch.nn.functional.linear(x, w, b)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D a (M, K), b (K, N). oneDNN when a is row-major (its rows the products'
    rows: forward and input-gradient products), ATen (MKL) when a is a transpose (weight
    gradients, ``dY^T @ X``), which oneDNN would first copy."""
    if takes(a, b.shape[1]) and _unit_stride(b) and b.dtype == torch.float32:
        return _onednn(a, b.t(), None)
    return a @ b


def addmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` (a new tensor), routed as ``mm``."""
    if takes(a, b.shape[1]) and _unit_stride(b) and b.dtype == torch.float32:
        return mm(a, b).add_(c)
    return torch.addmm(c, a, b)
