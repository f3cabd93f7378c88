"""Compiler flags and sources of the two extensions, shared by setup.py and the JIT loader.

Imported by path from setup.py (before the package is installed), so it must not import
fastattn itself or anything beyond the standard library.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CPU_NAME = "fastattn._C"
CUDA_NAME = "fastattn._cuda"
# The version of each module's Python-facing functions (their names and arguments), which the
# module exports as API_VERSION (csrc/*/bindings.cpp): raise both together whenever a binding
# changes, so that a module built from older sources (an editable install before a pull) is
# rebuilt on first use instead of failing at its first changed call.
API_VERSION = {"cpu": 3, "cuda": 1}
# sm_80 code + its PTX (which the driver JIT-compiles for newer GPUs) and Hopper-specific sm_90a.
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"


def csrc_root() -> Path:
    """The csrc/ folder: next to the package in a source tree, inside it once installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError(f"fastattn: no csrc/ folder beside or inside {here}")


def newest_source_mtime(root: Path | None = None) -> float:
    """The latest modification time of any file under csrc/ (sources and headers)."""
    root = root or csrc_root()
    return max((p.stat().st_mtime for p in root.rglob("*") if p.is_file()), default=0.0)


# Compiled first: ninja starts the sources in the order given, and norm.cpp (its clones of every
# dtype and variant) takes as long to compile as the other CPU files together (~90 s of ~170 s
# on a 2-core machine): started last, it ran alone at the end of a 2-job build.
_SLOWEST = {"cpu": ("norm.cpp",), "cuda": ()}


def sources(kind: str, root: Path | None = None) -> list[str]:
    root = root or csrc_root()
    folder = root / kind
    patterns = ("*.cpp",) if kind == "cpu" else ("*.cpp", "*.cu")
    found = (p for pat in patterns for p in folder.glob(pat))
    return [str(p) for p in sorted(found, key=lambda p: (p.name not in _SLOWEST[kind], p))]


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME or $CUDA_PATH, else the folder above the nvcc on the
    PATH if it holds the toolkit's headers, else /usr/local/cuda. torch guesses from the PATH
    alone, which fails when that nvcc is a wrapper script living outside the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").is_file() and (root / "bin" / "nvcc").exists():
            return str(root)
    return None


def use_cuda_home() -> str | None:
    """Point torch.utils.cpp_extension at ``cuda_home()`` (before or after its import)."""
    home = cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
        ext = sys.modules.get("torch.utils.cpp_extension")
        if ext is not None and getattr(ext, "CUDA_HOME", None) != home:
            ext.CUDA_HOME = home
    return home


def cpu_cflags() -> list[str]:
    # -fopenmp makes at::parallel_for (header-only OpenMP) actually run in parallel.
    # -fno-trapping-math (clang's default; results are unchanged, only FP exception flags are
    # not honoured) lets GCC if-convert selects whose arms do float arithmetic, e.g. the
    # branch-free float16 <-> float32 conversions: without it those loops do not vectorise
    # below AVX-512 (measured 6-10x slower on AVX2). -fno-math-errno (clang's default on macOS and
    # the BSDs; results unchanged, nothing here reads errno) lets sqrtf become the vector sqrt
    # instruction: with errno GCC guards each call with a branch to libm, which keeps a loop
    # scalar (the CPU AdamW step used an arithmetic sqrt instead: 1.4x slower on one thread).
    # No -march: ISA-specific code paths are chosen at run time (target_clones), so the build
    # stays portable (wheels).
    flags = [
        "-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas",
    ]
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
