"""Backend registry: which implementations exist here, which one an op call runs.

Backends: ``triton`` (GPU, or CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (the compiled
``fastattn._cuda``), ``cpu`` (the compiled ``fastattn._C``) and ``reference`` (pure PyTorch: the
test oracle and the fallback, runs everywhere). PyTorch's dispatcher already routes an op to its
CPU or CUDA registration; inside that, ``select`` picks the backend:

* ``auto`` (default): on CPU tensors ``cpu``, falling back to ``reference`` with a one-time
  warning if the C++ extension cannot be loaded or built; on CUDA tensors the op's preferred
  order (the faster measured kernel first); ``reference`` for dtypes no kernel supports.
* a name forced with ``use_backend(name)`` (a context manager, thread- and task-local) or the
  ``FASTATTN_BACKEND`` environment variable: that backend or a ``BackendError`` saying why not.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator, Mapping

import torch
from torch.torch_version import TorchVersion

from . import _ext

NAMES = ("triton", "cuda", "cpu", "reference")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastattn_backend", default=None)


class BackendError(RuntimeError):
    """A backend was asked for that cannot run this call; the message says why and what to do."""


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def __str__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def _triton_interpret() -> bool:
    # Triton reads the variable when a kernel is decorated; fastattn imports its Triton modules
    # lazily, at the first call that runs them, so the variable at call time is the one in force.
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.lru_cache(maxsize=None)
def _interpreter_problem(version: str, numpy_version: str) -> str | None:
    """Why this triton's interpreter cannot run with this numpy, if it cannot. Up to 3.1 it
    computes wrong numbers with numpy 2 (no error: attention outputs off by 1e37 were seen);
    up to 3.6 it takes loop bounds with int() of a one-element array, which numpy 2.4 made an
    error raised deep inside Triton. Both checked by hand against the reference."""
    triton_v, numpy_v = TorchVersion(version), TorchVersion(numpy_version)  # PEP 440 comparisons
    for fixed_in, numpy_limit in (((3, 2), (2,)), ((3, 7), (2, 4))):
        if triton_v < fixed_in and numpy_v >= numpy_limit:
            limit = ".".join(map(str, numpy_limit))
            return (f"the interpreter of triton {version} does not work with numpy {numpy_version} "
                    f"(triton < {'.'.join(map(str, fixed_in))} needs numpy < {limit}): "
                    f"pip install 'numpy<{limit}', or a newer triton")
    return None


@functools.lru_cache(maxsize=None)
def _cuda_device_name() -> str | None:
    # Asked on every kernel selection; the answer does not change within a process (and the
    # query costs microseconds of Python, which a decode step on a GPU pays per op).
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run on this machine, and why (not) — may build an extension."""
    _check_name(name, allow_auto=False)
    if name == "triton" and _triton_interpret():
        return _interpreter_status()
    return _status(name)


@functools.lru_cache(maxsize=None)
def _status(name: str) -> BackendStatus:
    # Asked on every kernel selection, so cached: outside the interpreter (which reads the
    # environment, and is for tests) nothing it depends on changes while the process runs.
    if name == "reference":
        return BackendStatus(True, "pure PyTorch; every device and dtype (slow)")
    if name == "triton":
        version = _triton_version()
        if version is None:
            return BackendStatus(False, "triton is not installed (pip install triton)")
        if (gpu := _cuda_device_name()) is not None:
            return BackendStatus(True, f"triton {version} on {gpu}")
        return BackendStatus(False, "no CUDA device; set TRITON_INTERPRET=1 before importing "
                                    "fastattn to run Triton kernels on CPU tensors (interpreter)")
    if name == "cuda" and _cuda_device_name() is None:
        return BackendStatus(False, "no CUDA device (torch.cuda.is_available() is False)")
    return _extension_status(name)


def _interpreter_status() -> BackendStatus:
    version = _triton_version()
    if version is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    import numpy

    if (problem := _interpreter_problem(version, numpy.__version__)) is not None:
        return BackendStatus(False, problem)
    return BackendStatus(True, f"triton {version} in the interpreter (TRITON_INTERPRET=1): "
                               "runs on CPU tensors, slowly; for tests")


@functools.lru_cache(maxsize=None)
def _extension_status(kind: str) -> BackendStatus:
    try:
        module = _ext.load(kind)
    except _ext.ExtensionUnavailable as exc:
        return BackendStatus(False, str(exc))
    where = getattr(module, "__file__", "?")
    if kind == "cpu":
        from .ops import _cpu_matmul
        try:
            onednn, why = _cpu_matmul.onednn_status()
        except ValueError as err:   # a bad FASTATTN_CPU_MATMUL: the GEMM ops raise it
            onednn, why = False, str(err)
        gemms = ("the composed ops' fp32 forward and input-gradient GEMMs on oneDNN where it "
                 "is the faster, the rest on ATen" if onednn else f"ATen's GEMMs ({why})")
        return BackendStatus(True, f"C++ kernels ({where}), {torch.get_num_threads()} threads; "
                                   f"{gemms}")
    return BackendStatus(True, f"CUDA kernels ({where}) on {_cuda_device_name()}")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is available here and why (not)."""
    return {name: status(name) for name in NAMES}


_VALID = NAMES + ("auto",)


def _check_name(name: str, allow_auto: bool = True) -> None:
    if name not in (_VALID if allow_auto else NAMES):
        valid = _VALID if allow_auto else NAMES
        raise ValueError(f"unknown fastattn backend {name!r}; expected one of {', '.join(valid)}")


def requested() -> str:
    """The backend asked for in this context: use_backend(), else $FASTATTN_BACKEND, else auto."""
    name = _override.get()
    if name is not None:
        return name
    raw = os.environ.get("FASTATTN_BACKEND")
    if raw is None:
        return "auto"
    name = raw.strip().lower() or "auto"
    if name not in _VALID:
        raise BackendError(f"FASTATTN_BACKEND={name!r} is not a backend; expected one of "
                           f"auto, {', '.join(NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastattn ops inside the block on backend ``name`` (or ``"auto"``).

    Raises ``BackendError`` at once if the backend cannot run on this machine at all.
    """
    _check_name(name)
    if name != "auto" and not (st := status(name)):
        raise BackendError(f"backend {name!r} is not available: {st.reason}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


class restored:
    """Re-enter a request recorded earlier (``requested()`` at forward time) — for backward
    passes, which PyTorch runs on its own threads for CUDA tensors, where the context of the
    forward's ``use_backend`` block is not set. (A class, not a generator: every backward of
    every op enters one, and this costs a fraction of a generator-based context manager.)"""

    __slots__ = ("name", "token")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self.token = _override.set(self.name)

    def __exit__(self, *exc) -> None:
        _override.reset(self.token)


_warned_fallback = False


def _runs_on(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can take tensors on ``device``, else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        return None if device.type == "cpu" else f"it takes CPU tensors, got {device.type} tensors"
    if name == "cuda":
        return None if device.type == "cuda" else f"it takes CUDA tensors, got {device.type} tensors"
    if device.type == "cuda" or (device.type == "cpu" and _triton_interpret()):
        return None
    return f"it takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type} tensors"


def select(op: str, device: torch.device, dtype: torch.dtype, *,
           cuda_order: tuple[str, ...], dtypes: Mapping[str, tuple[torch.dtype, ...]],
           dot: bool = False) -> str:
    """The backend that runs ``op`` on ``device``/``dtype`` under the current request.

    ``cuda_order`` is the op's preference on CUDA tensors; ``dtypes`` maps each kernel backend to
    the input dtypes it supports (``reference`` supports all). ``dot``: the op's Triton kernels
    multiply matrices of the input dtype (``tl.dot``), which the interpreter cannot do in bf16.
    """
    name = requested()
    if name != "auto":
        name = _check_forced(name, op, device, dtype, dtypes)
        if name == "triton" and dot and dtype == torch.bfloat16 and device.type == "cpu":
            # (the interpreter multiplies the raw bits: outputs off by 1e9, no error)
            raise BackendError(f"{op}: backend 'triton' cannot run this op's bfloat16 matrix "
                               "products in the Triton interpreter (TRITON_INTERPRET=1 on CPU "
                               "tensors: its bf16 tl.dot gives wrong numbers); use float16 or "
                               "float32 there, or a CUDA device")
        return name
    return _auto(device.type, dtype, cuda_order, dtypes)


def _auto(kind: str, dtype: torch.dtype, cuda_order: tuple[str, ...],
          dtypes: Mapping[str, tuple[torch.dtype, ...]]) -> str:
    if kind == "cpu":
        if dtype in dtypes.get("cpu", ()):
            if status("cpu"):
                return "cpu"
            _warn_fallback()
        return "reference"
    if kind == "cuda":
        for backend in cuda_order:
            if dtype in dtypes.get(backend, ()) and status(backend):
                return backend
    return "reference"


def _check_forced(name: str, op: str, device: torch.device, dtype: torch.dtype,
                  dtypes: Mapping[str, tuple[torch.dtype, ...]]) -> str:
    """``name``, asked for by the caller, if it can run this call; else a BackendError why not."""
    if not (st := status(name)):
        raise BackendError(f"{op}: backend {name!r} is not available: {st.reason}")
    if (why := _runs_on(name, device)) is not None:
        raise BackendError(f"{op}: backend {name!r} cannot run here: {why}; move the tensors "
                           f"or choose another backend (fastattn.backends() lists them)")
    if name != "reference" and name not in dtypes:
        have = ", ".join([*dtypes, "reference"])
        raise BackendError(f"{op}: backend {name!r} has no kernel for this op (backends "
                           f"with one: {have}); choose one of those, or 'auto'")
    if name != "reference" and dtype not in dtypes[name]:
        raise BackendError(f"{op}: backend {name!r} does not support {dtype} inputs "
                           f"(it supports {', '.join(map(str, dtypes[name]))}); "
                           f"cast the inputs or use backend 'reference'")
    return name


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this module's caller point at the first
    frame outside fastattn and torch (the user's call; between it and here lie torch's
    custom-op dispatch and a varying number of fastattn frames)."""
    skip = tuple(os.path.join(os.path.dirname(os.path.abspath(f)), "")    # (".../fastattn/")
                 for f in (__file__, torch.__file__))
    frame, level = sys._getframe(2), 2      # 1: the function calling warnings.warn
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"fastattn: C++ CPU kernels unavailable ({status('cpu').reason}); "
                      "falling back to the slow pure-PyTorch reference",
                      RuntimeWarning, stacklevel=_caller_stacklevel())


def implementation(name: str, package: str) -> ModuleType:
    """The module holding backend ``name``'s kernels for the op package ``package``."""
    module = _modules.get((name, package))
    if module is None:
        if name in ("reference", "triton"):
            module = importlib.import_module(f"{package}.{name}")
        else:
            module = _ext.load(name)
        _modules[(name, package)] = module   # (loaded: a failure raised above, uncached)
    return module


_modules: dict = {}
