"""Build fastattn: the C++ CPU extension always, the CUDA extension when nvcc and a CUDA torch exist.

Environment: FASTATTN_CUDA=0|1|auto (default auto), FASTATTN_CUDA_ARCHS (default "8.0+PTX;9.0a"),
MAX_JOBS (parallel compile jobs, read by torch's ninja builder).
Install into an environment that already has torch: pip install --no-build-isolation .
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_buildinfo", ROOT / "fastattn" / "_buildinfo.py")
info = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(info)
info.use_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda() -> bool:
    mode = os.environ.get("FASTATTN_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"FASTATTN_CUDA must be 0, 1 or auto, got {mode!r}")
    have = torch.version.cuda is not None and info.cuda_home() is not None
    if mode == "1" and not have:
        raise SystemExit(
            "FASTATTN_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={info.cuda_home()} "
            "(install a CUDA build of torch and put nvcc on the PATH)"
        )
    return have if mode == "auto" else mode == "1"


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


ext_modules = [
    cpp_extension.CppExtension(
        info.CPU_NAME,
        _rel(info.sources("cpu", ROOT / "csrc")),
        extra_compile_args={"cxx": info.cpu_cflags()},
        extra_link_args=info.cpu_ldflags(),
    )
]
if _want_cuda():
    ext_modules.append(
        cpp_extension.CUDAExtension(
            info.CUDA_NAME,
            _rel(info.sources("cuda", ROOT / "csrc")),
            extra_compile_args={"cxx": ["-O3"], "nvcc": info.nvcc_flags()},
        )
    )


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so a missing extension can be JIT-built after install."""

    def run(self):
        super().run()
        if not self.editable_mode:
            dst = Path(self.build_lib) / "fastattn" / "csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ROOT / "csrc", dst)


setup(
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=ext_modules,
    cmdclass={
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True),
        "build_py": BuildPyWithSources,
    },
)
