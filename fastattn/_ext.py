"""Loading the compiled extensions, building them on first use when they are missing.

``fastattn._C`` (C++ CPU kernels) and ``fastattn._cuda`` (CUDA kernels) are normally built by
``pip install``. When one cannot be imported (not built, built against another torch), it is
compiled with ``torch.utils.cpp_extension.load`` (ninja) into a cache folder
(``$FASTATTN_CACHE_DIR`` or ``~/.cache/fastattn``), once per torch/Python version; torch rebuilds
it there when a source changes. ``FASTATTN_JIT=0`` turns the JIT build off.

Nothing here raises at import: ``load`` raises ``ExtensionUnavailable`` with the reason, which
the backend registry turns into a fallback (CPU) or a clear error (a backend asked for by name).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from . import _buildinfo

KINDS = ("cpu", "cuda")
_MODULE = {"cpu": _buildinfo.CPU_NAME, "cuda": _buildinfo.CUDA_NAME}
_results: dict[str, ModuleType | BaseException] = {}
_lock = threading.Lock()


class ExtensionUnavailable(RuntimeError):
    """A compiled fastattn module could neither be imported nor built; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("FASTATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastattn"
    )
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(root) / tag


def _cuda_build_blocker() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _buildinfo.use_cuda_home() is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on the PATH)"
    return None


def _jit_build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    sources = _buildinfo.sources(kind)
    if not sources:
        raise ExtensionUnavailable(f"no {kind} sources under {_buildinfo.csrc_root()}")
    build_dir = cache_dir() / kind
    name = _MODULE[kind].replace(".", "_")
    built = build_dir / f"{name}.so"                  # (what torch's load names it)
    if not built.exists() or built.stat().st_mtime < _buildinfo.newest_source_mtime():
        # a compile is coming (torch's load decides per file; a cached build that is current
        # loads without a compiler)
        compiler = (os.environ.get("CXX") or "c++").split()[0]   # (CXX="ccache g++": ccache)
        if shutil.which(compiler) is None:
            raise ExtensionUnavailable(
                f"no C++ compiler: {compiler!r} is not on the PATH (install g++ or clang++, or "
                f"set CXX)")
        what = "rebuilding (its sources changed)" if built.exists() else "building"
        print(f"fastattn: {what} {_MODULE[kind]} into {build_dir} (a few minutes on a small "
              f"machine)", file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cpu":
        return cpp_extension.load(
            name=name, sources=sources, build_directory=str(build_dir),
            extra_cflags=_buildinfo.cpu_cflags(), extra_ldflags=_buildinfo.cpu_ldflags(),
        )
    return cpp_extension.load(
        name=name, sources=sources, build_directory=str(build_dir),
        extra_cflags=["-O3"], extra_cuda_cflags=_buildinfo.nvcc_flags(),
    )


def _import(kind: str) -> ModuleType:
    """The module built with the package, if it imports and is of this package's bindings."""
    module = importlib.import_module(_MODULE[kind])
    version = getattr(module, "API_VERSION", None)
    if version != _buildinfo.API_VERSION[kind]:
        raise ImportError(f"{module.__file__} has bindings version {version}, this fastattn "
                          f"needs {_buildinfo.API_VERSION[kind]} (built from older sources)")
    return module


def _load(kind: str) -> ModuleType:
    try:
        return _import(kind)
    except ImportError as exc:
        import_error = exc
    if kind == "cuda" and (blocker := _cuda_build_blocker()):
        raise ExtensionUnavailable(f"{_MODULE[kind]} is not built and cannot be: {blocker}")
    if os.environ.get("FASTATTN_JIT", "1") == "0":
        raise ExtensionUnavailable(
            f"{_MODULE[kind]} is not built ({import_error}) and FASTATTN_JIT=0 forbids building it"
            " on first use; run `pip install --no-build-isolation .` in the fastattn checkout"
        )
    try:
        return _jit_build(kind)
    except ExtensionUnavailable as exc:
        raise ExtensionUnavailable(f"{_MODULE[kind]} is not built ({import_error}) and {exc}") \
            from exc
    except Exception as exc:  # compile error, linker error, ...
        raise ExtensionUnavailable(
            f"{_MODULE[kind]} is not built ({import_error}) and building it failed: "
            f"{build_failure(exc)}"
        ) from exc


def build_failure(exc: BaseException) -> str:
    """The line of a failed build's output that says why (the first compiler error, a missing
    program or header), rather than its last ("ninja: build stopped: subcommand failed.")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # the specific first: a linker's "cannot find -lgomp" over collect2's "error: ld returned 1"
    for marker in ("undefined reference", "cannot find", "No such file", "not found", "error:"):
        for line in lines:
            if marker in line and not line.startswith("collect2:"):
                return line
    return lines[-1] if lines else type(exc).__name__


def load(kind: str) -> ModuleType:
    """The compiled module for ``kind`` ("cpu" or "cuda"), importing or building it once."""
    if kind not in KINDS:
        raise ValueError(f"extension kind must be one of {KINDS}, got {kind!r}")
    with _lock:
        if kind not in _results:
            try:
                _results[kind] = _load(kind)
            except ExtensionUnavailable as exc:
                _results[kind] = exc
        result = _results[kind]
    if isinstance(result, BaseException):
        raise result
    return result


def is_built(kind: str) -> bool:
    """Whether ``kind`` imports without building anything (cheap; used by ``backends()``)."""
    if isinstance(_results.get(kind), ModuleType):
        return True
    try:
        _import(kind)
        return True
    except ImportError:
        return False
