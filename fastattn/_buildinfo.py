"""Compiler flags and sources of the two extensions, shared by setup.py and the JIT loader.

Imported by path from setup.py (before the package is installed), so it must not import
fastattn itself or anything beyond the standard library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CPU_NAME = "fastattn._C"
CUDA_NAME = "fastattn._cuda"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def csrc_root() -> Path:
    """The csrc/ folder: next to the package in a source tree, inside it once installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError(f"fastattn: no csrc/ folder beside or inside {here}")


def sources(kind: str, root: Path | None = None) -> list[str]:
    root = root or csrc_root()
    folder = root / kind
    patterns = ("*.cpp",) if kind == "cpu" else ("*.cpp", "*.cu")
    return sorted(str(p) for pat in patterns for p in folder.glob(pat))


def cpu_cflags() -> list[str]:
    # -fopenmp makes at::parallel_for (header-only OpenMP) actually run in parallel.
    flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if sys.platform == "darwin":
        flags.remove("-fopenmp")
    return flags


def cpu_ldflags() -> list[str]:
    return [] if sys.platform == "darwin" else ["-fopenmp"]


def cuda_archs() -> list[str]:
    """FASTATTN_CUDA_ARCHS, e.g. "8.0;9.0a" (';' or ',' separated, optional '+PTX')."""
    raw = os.environ.get("FASTATTN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise ValueError(f"FASTATTN_CUDA_ARCHS={raw!r} names no architecture")
    return archs


def nvcc_flags() -> list[str]:
    # No -std flag: torch adds the standard its headers need (recent releases need C++20).
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    for arch in cuda_archs():
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        if not num.rstrip("a").isdigit():
            raise ValueError(f"FASTATTN_CUDA_ARCHS: cannot parse architecture {arch!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags
