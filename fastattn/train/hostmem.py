"""The host memory a process maps as it runs, and what sets it: for reading CPU timings.

Under glibc's default malloc a large block (above the mmap threshold, adjusted at run time up to
32 MB on 64-bit Linux) gets a mapping of its own that is unmapped when it is freed, so a step
that allocates and frees large tensors maps them again on every step, and the kernel zeroes
each page on its first touch (a minor page fault). The benchmarks count them and record the
allocator's settings beside their times. No dependency beyond the standard library, so that
the GPU benchmark's environment record can use it on a bare machine.
"""

from __future__ import annotations

import os
import resource


def minor_page_faults() -> int:
    """The process's minor page faults so far (getrusage): each one a fresh page of memory
    mapped and zeroed by the kernel on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# What sets how a process gets its host memory (glibc malloc's MALLOC_* tunables, jemalloc's
# MALLOC_CONF, a preloaded jemalloc / tcmalloc, torch's transparent-huge-page switch for CPU
# tensors): a CPU result is read with them. (Device memory: torch.cuda's own statistics.)
_ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "TCMALLOC_", "THP_MEM_ALLOC_ENABLE")


def allocator_env() -> dict:
    """The environment variables of this process that change how memory is allocated."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ALLOCATOR_ENV)}


def describe_allocator(env: dict) -> str:
    """``allocator_env()``'s record as one line of a result table."""
    return ", ".join(f"{k}={v}" for k, v in env.items()) or "the C library's defaults"
