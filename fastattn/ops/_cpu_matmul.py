"""The matmuls of fastattn's CPU paths: oneDNN where it is the faster fp32 GEMM, ATen elsewhere.

PyTorch's CPU ``mm`` / ``F.linear`` call MKL's sgemm, which on AMD processors runs its code
path for non-Intel CPUs. The oneDNN inside the same torch wheel
(``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend fuses linear layers
into) runs its own JIT-generated AVX-512 / AVX2 kernels, chosen by the CPU's instruction sets.
On the 2-core AMD EPYC (Zen 4) the CI runs on it measured 1.13-1.42x MKL on the two products a
layer's forward and input gradient make, ``x @ W^T`` and ``dY @ W``, at every shape of the
benchmarks (2048 tokens, 192-2048 features), and 0.56-1.34x on the weight gradient
``dY^T @ X``, whose first operand it has to transpose in memory first
(``python -m benchmarks.cpu_gemm_routes``; the numbers are in ``benchmarks/RESULTS.md``, CPU). So:

- ``linear(x, w, b)`` = ``x @ w^T + b`` and ``mm(a, b)`` (``dY @ W``, the weight read as
  (in, out)) run on oneDNN when: the routing is enabled (below), the CPU is an AMD x86-64 one
  (the only kind measured; ``FASTATTN_CPU_MATMUL=onednn`` takes the route on any CPU), the
  tensors are fp32 and laid out as oneDNN's optimised kernels take them (the first operand
  and the bias contiguous, the weight contiguous or the transpose of a contiguous tensor:
  other strides fall to its reference kernel, hundreds of times slower), the product has at
  least 2^26 multiply-adds (below that the gain is within a few percent either way, and
  oneDNN's per-call cost, ~15 us, shows on small ones), and oneDNN passed a smoke test at
  first use;
- everything else (weight gradients, small or empty products, other dtypes and layouts) runs
  on ATen, as eager PyTorch would.

The routing is on only inside ``with enabled(True)``, which an op's body enters when its
backend is "cpu" (fastattn's C++ kernels); the reference backend, and any caller outside such
a block, gets ATen's matmuls throughout.

Both are plain fp32 GEMMs (fp32 products and sums; the last bits differ from MKL's, as any
two BLAS's do); each library is deterministic run to run, and the choice depends only on the
CPU, shapes, dtypes, layouts and ``FASTATTN_CPU_MATMUL``, never on timing, so a run repeats
exactly. ``FASTATTN_CPU_MATMUL``: ``auto`` (the default), ``onednn`` or ``aten`` (every
product on ATen); read at each use (``fastattn.backends()`` keeps its first reading).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import platform
from typing import Iterator, Optional

import torch
from torch import Tensor

# Products below 2^26 multiply-adds stay on ATen: at 512 x 192 x 512 (50M) oneDNN measured
# 1.01-1.03x MKL, and a chunked log-prob loss at vocabulary 512 built on such products 0.95x
# (its fresh output tensors against ATen's reused buffer); from ~75M up (2048 x 192 x 192:
# 1.13x; 832 x 192 x 768 in an MLP: 1.12x) it gains. (By hand, 2026-12-02, interleaved.)
_MIN_MACS = 1 << 26
_CHOICES = ("auto", "onednn", "aten")
_state: dict = {}
_ENABLED = contextvars.ContextVar("fastattn_cpu_matmul_enabled", default=False)
_ATEN_ONLY = contextvars.ContextVar("fastattn_cpu_matmul_aten_only", default=False)


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Within the block, the functions below route to oneDNN where it is faster (``flag``) or
    never (``not flag``). With ``flag`` a bad ``FASTATTN_CPU_MATMUL`` raises here, whatever the
    sizes of the products that follow."""
    if flag:
        _choice()
    token = _ENABLED.set(bool(flag))
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Within the block every product takes ATen, as with ``FASTATTN_CPU_MATMUL=aten`` (for a
    benchmark that measures what the routing buys, side by side in one process). It covers
    what runs inside it: wrap forward and backward alike."""
    token = _ATEN_ONLY.set(True)
    try:
        yield
    finally:
        _ATEN_ONLY.reset(token)


def _choice() -> str:
    raw = os.environ.get("FASTATTN_CPU_MATMUL", "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"FASTATTN_CPU_MATMUL must be 'auto' (oneDNN for the products where it "
                         f"measured faster, on AMD x86-64 CPUs), 'onednn' (those products on "
                         f"any CPU) or 'aten' (ATen's GEMMs everywhere), got {raw!r}")
    return choice


def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...), or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_status() -> tuple[bool, str]:
    """(whether the CPU paths use oneDNN, why not when they do not); decided once per value of
    ``FASTATTN_CPU_MATMUL``, which raises ValueError when it is not one of auto, onednn, aten."""
    choice = _choice()
    if _state.get("choice") != choice:
        _state["ok"], _state["why"] = _probe(choice)
        _state["choice"] = choice
    return _state["ok"], _state["why"]


def _no_modes():
    """A context without the caller's dispatch modes (a FakeTensorMode under torch.export or
    make_fx would make the smoke test fail, and its verdict is kept for the process)."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:     # pragma: no cover - every torch from 2.4 on has it
        return contextlib.nullcontext()
    return _disable_current_modes()


def _probe(choice: str) -> tuple[bool, str]:
    if choice == "aten":
        return False, "FASTATTN_CPU_MATMUL=aten"
    if choice == "auto":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False, (f"oneDNN's GEMMs measured faster than MKL's only on AMD x86-64 "
                           f"CPUs; this is {platform.machine()} (FASTATTN_CPU_MATMUL=onednn "
                           f"takes them anyway)")
        vendor = cpu_vendor()
        if vendor != "AuthenticAMD":
            return False, (f"oneDNN's GEMMs measured faster than MKL's only on AMD CPUs; this "
                           f"one is {vendor or 'of unknown vendor'} (FASTATTN_CPU_MATMUL=onednn "
                           f"takes them anyway)")
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN (mkldnn)"
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False, "this torch has no mkldnn::_linear_pointwise op"
    # The layouts the routes pass (plain, and a transposed weight), with and without a bias,
    # against float64; outside any autocast, grad mode or default dtype/device the caller set.
    try:
        with _no_modes(), torch.autocast("cpu", enabled=False), torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float32, device="cpu")
                       for shape in ((7, 33), (5, 33), (5,)))
            w_t = w.t().contiguous().t()
            for wi, bi in ((w, b), (w_t, None)):
                got = op(x, wi, bi, "none", [], "")
                want = x.double() @ wi.double().t() + (0 if bi is None else bi.double())
                if (got.dtype != torch.float32 or got.shape != want.shape
                        or not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)):
                    return False, "mkldnn::_linear_pointwise gave a wrong product in its smoke test"
    except Exception as err:    # noqa: BLE001 - a build whose oneDNN cannot run on this CPU
        return False, f"mkldnn::_linear_pointwise failed its smoke test: {err}"
    return True, ""


def _enabled() -> bool:
    return _ENABLED.get() and not _ATEN_ONLY.get()


def _fits(a: Tensor, n: int) -> bool:
    """An fp32 CPU (M, K) first operand, contiguous, of a product with n columns that is large
    enough; and the process takes the route."""
    if a.dim() != 2 or a.dtype != torch.float32 or a.device.type != "cpu":
        return False
    m, k = a.shape
    return (m * n * k >= _MIN_MACS and min(m, n, k) > 0 and a.is_contiguous()
            and torch.backends.mkldnn.enabled and onednn_status()[0])


def _weight_layout(w: Tensor) -> bool:
    """fp32, and contiguous or the transpose of a contiguous tensor (oneDNN's fast kernels)."""
    return (w.dim() == 2 and w.dtype == torch.float32
            and (w.is_contiguous() or w.t().is_contiguous()))


def routes_linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> bool:
    """Whether ``linear(x, w, b)`` runs on oneDNN here."""
    return (_enabled() and _weight_layout(w) and _fits(x, w.shape[0])
            and (b is None or (b.dtype == torch.float32 and b.is_contiguous()
                               and b.shape == (w.shape[0],))))


def routes_mm(a: Tensor, b: Tensor) -> bool:
    """Whether ``mm(a, b)`` runs on oneDNN here."""
    return _enabled() and _weight_layout(b) and _fits(a, b.shape[1])


def _onednn(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x @ w^T + b on oneDNN (layouts as routes_linear checks)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """``x @ w^T + b`` for 2-D x (M, K), w (N, K) (nn.Linear layout), b (N,) or None."""
    if routes_linear(x, w, b):
        return _onednn(x, w, b)
    return torch.nn.functional.linear(x, w, b)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D a (M, K), b (K, N): oneDNN for a forward or input-gradient product
    (a contiguous), ATen otherwise (a weight gradient ``dY^T @ X``, whose transposed first
    operand oneDNN would copy)."""
    if routes_mm(a, b):
        return _onednn(a, b.t(), None)
    return a @ b


def addmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` (a new tensor), routed as ``mm``."""
    if routes_mm(a, b):
        return _onednn(a, b.t(), None).add_(c)
    return torch.addmm(c, a, b)
