"""Triton helpers shared by several ops' kernels (imported only by the ops' triton.py): device
functions, and the switch of the Hopper (TMA) paths.

No `from __future__ import annotations` here: Triton 3.0's interpreter needs real annotations.
"""

import contextlib
import functools
import os
import threading
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: triton >= 3.4 (older versions keep the pointer loads)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None
try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - depends on the installed triton
    OutOfResources = MemoryError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr_function
# wrappers in triton >= 3.5, about 2 us a call each, and the launch paths call them several
# times per launch; these compute the same values (next_power_of_2(0) is 0, as triton's).
def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device), 0 for other devices."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 0


class TmaSwitch:
    """Whether one op family's kernels load their operands through TMA descriptors.

    mode (FASTATTN_TRITON_TMA): "auto" (default) on NVIDIA GPUs of compute capability 9.0 and
    newer, for the launches whose kernels measured faster with it (``enabled(x, auto=False)``
    marks one that did not); "0" never; "1" for every launch, also under TRITON_INTERPRET
    (how the CPU tests check the path).
    A triton that cannot build a TMA variant on the device (its compiler raises) turns the
    path off for the process with a warning, once the same launch has worked without it.
    """

    MODES = ("auto", "0", "1")

    def __init__(self, what: str):
        self.what = what
        self.mode = os.environ.get("FASTATTN_TRITON_TMA", "auto")
        self.failed = False

    def enabled(self, x: torch.Tensor, auto: bool = True) -> bool:
        """Whether a launch on x takes the path; ``auto=False``: only when forced ("1")."""
        if self.mode not in self.MODES:
            raise ValueError(f"FASTATTN_TRITON_TMA must be one of {self.MODES}, got {self.mode!r}")
        if TensorDescriptor is None or self.mode == "0" or self.failed:
            return False
        if self.mode == "auto" and not auto:
            return False
        if INTERPRET:
            return self.mode == "1"
        return x.is_cuda and torch.version.hip is None and _capability(x.device.index or 0)[0] >= 9

    def launch(self, launch, descs, fallback, accumulators=()):
        """launch(descs, True) with the descriptors, or launch(fallback, False) with the plain
        tensors when there are none.

        When the TMA launch raises, the pointer-load launch is tried (from zeroed accumulators:
        an autotuner may have run other configs before the failing one). Only if that one works
        is the failure the TMA variant's: the path is then off for the process, with a
        warning. An error the retry repeats propagates and leaves the path on; so does a CUDA
        out-of-memory error, which is not retried. Too little shared memory for every TMA
        config at this shape (OutOfResources) falls back for this launch only."""
        if descs is None:
            return launch(fallback, False)
        try:
            return launch(descs, True)
        except torch.cuda.OutOfMemoryError:
            raise
        except OutOfResources:
            for acc in accumulators:
                acc.zero_()
            return launch(fallback, False)
        except Exception as error:  # noqa: BLE001 - a compiler failure of the TMA variant?
            if INTERPRET:
                raise
            for acc in accumulators:
                acc.zero_()
            result = launch(fallback, False)
            self.failed = True
            warnings.warn(
                f"fastattn: the Triton TMA {self.what} path failed to build ({type(error).__name__}: {error}); "
                "using pointer loads from now on (set FASTATTN_TRITON_TMA=0 to skip it)",
                RuntimeWarning,
                stacklevel=3,
            )
            return result


class CachedAutotune:
    """``kernel[grid](*args, **kwargs)`` for a ``triton.autotune``'d kernel that skips the
    Autotuner's per-call bookkeeping once a call's config is known.

    ``Autotuner.run`` rebuilds its key on every launch: dicts of all the arguments, a list
    membership test per argument (quadratic in their number: the attention kernels take ~55),
    ``str(dtype)`` of each tensor. 27 us per launch of the attention forward on this project's
    CPU (triton 3.8, the launch itself stubbed), 4 autotuned launches per layer per training
    step. Here a call's key (the values of the autotuner's key arguments, every keyword
    argument, the dtypes of the tensor arguments: at least as fine as the autotuner's own) is
    looked up in a dict; a new key goes through ``Autotuner.run`` (pruning, timing, its own
    cache) once, and its ``best_config`` is remembered. A known key runs the config's pre-hook
    and the kernel as ``Autotuner.run`` would (``fn.run`` with the config's keyword arguments).
    ``fn`` is the autotuner, for tools that walk ``.fn`` down to the JIT function.
    """

    def __init__(self, autotuner):
        self.fn = autotuner
        self._chosen: dict = {}
        self._key_positions: dict = {}   # number of positional args -> indices of key args
        # A miss reads the autotuner's best_config after its run: a launch from another thread
        # in between would change it, and the wrong config would be kept for good.
        self._miss = threading.RLock()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._run(grid, args, kwargs)

    def _key(self, args: tuple, kwargs: dict) -> Optional[tuple]:
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return None     # (keyword tensors: not a key to keep; the autotuner decides)
        positions = self._key_positions.get(len(args))
        if positions is None:
            names = self.fn.arg_names
            keys = set(getattr(self.fn, "keys", None) or [names[i] for i in self.fn.key_idx])
            positions = self._key_positions[len(args)] = tuple(
                i for i in range(len(args)) if names[i] in keys)
        tensor = torch.Tensor
        return (tuple([args[i] for i in positions]), tuple(kwargs.items()),
                tuple([a.dtype for a in args if isinstance(a, tensor)]))

    def _run(self, grid, args: tuple, kwargs: dict):
        key = self._key(args, kwargs)
        chosen = None if key is None else self._chosen.get(key)
        tuner = self.fn
        if chosen is None:
            with self._miss:
                result = tuner.run(*args, grid=grid, warmup=False, **kwargs)
                if key is not None:
                    config = tuner.best_config
                    self._chosen[key] = (config, config.all_kwargs())
            return result
        config, extra = chosen
        if config.pre_hook is not None:
            nargs = dict(zip(tuner.arg_names, args))
            nargs.update(kwargs)
            nargs.update(extra)
            config.pre_hook(nargs)
        return tuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **extra)


@triton.jit
def cast_for(x, ptr):
    # fp32 -> the element type of ptr, round-to-nearest-even as torch's .to() does. For bf16
    # the rounding is done here on the bits (add 0x7fff plus the lowest kept bit, clear the
    # low half; inf survives) so that the final cast is exact: the GPU's cvt.rn would round
    # the same way, but the interpreter truncates fp32 -> bf16. NaN becomes the quiet NaN
    # 0x7fc00000 first: the bit rounding carries a NaN with a full payload, such as the GPU's
    # canonical 0x7fffffff, into the sign bit (-0.0) and wraps 0xffffffff to +0.0, and the
    # interpreter's truncation turns a payload in the low half only (0x7f800001) into inf.
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = (bits >> 16) << 16
        x = tl.where(x != x, float("nan"), bits.to(tl.float32, bitcast=True))
    return x.to(ptr.dtype.element_ty)


@triton.jit
def tanh(x):
    # |x| >= 0.125: tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1], which cannot
    # overflow; 1 - e cancels as |x| -> 0 (at 0.125 it costs about 3 bits), so below that the
    # odd Taylor series to x^9 is used instead (its truncation error there is ~1e-13 relative).
    a = tl.abs(x)
    e = tl.exp2(-2.0 * 1.4426950408889634 * a)
    big = (1.0 - e) / (1.0 + e)
    z = a * a
    small = a * (1.0 + z * (-1.0 / 3.0 + z * (2.0 / 15.0 + z * (-17.0 / 315.0 + z * (62.0 / 2835.0)))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(x < 0.0, -t, t)
