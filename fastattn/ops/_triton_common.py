"""Triton helpers shared by several ops' kernels (imported only by the ops' triton.py): device
functions, and the switch of the Hopper (TMA) paths.

No `from __future__ import annotations` here: Triton 3.0's interpreter needs real annotations.
"""

import contextlib
import functools
import os
import warnings

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
    newer, "0" never, "1" also under TRITON_INTERPRET (how the CPU tests check the path).
    A triton that cannot build a TMA variant on the device (its compiler raises) turns the
    path off for the process with a warning, once the same launch has worked without it.
    """

    MODES = ("auto", "0", "1")

    def __init__(self, what: str):
        self.what = what
        self.mode = os.environ.get("FASTATTN_TRITON_TMA", "auto")
        self.failed = False

    def enabled(self, x: torch.Tensor) -> bool:
        if self.mode not in self.MODES:
            raise ValueError(f"FASTATTN_TRITON_TMA must be one of {self.MODES}, got {self.mode!r}")
        if TensorDescriptor is None or self.mode == "0" or self.failed:
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


@triton.jit
def cast_for(x, ptr):
    # fp32 -> the element type of ptr, round-to-nearest-even as torch's .to() does. For bf16
    # the rounding is done here on the bits (add 0x7fff plus the lowest kept bit, clear the
    # low half; NaN and inf survive) so that the final cast is exact: the GPU's cvt.rn would
    # round the same way, but the interpreter truncates fp32 -> bf16.
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = (bits >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
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
