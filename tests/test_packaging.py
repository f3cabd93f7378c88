"""The source distribution: what `pip install fastattn-*.tar.gz` builds from must hold every file
the build reads (setuptools alone packs only the extension sources it is handed: no headers,
and the CUDA sources only when the sdist is made on a machine with nvcc; MANIFEST.in grafts
csrc/ whole)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (its tracked files are the sdist's expected content)")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def test_sdist_holds_every_source_the_build_reads(tmp_path):
    tracked = _tracked()
    src = tmp_path / "src"
    for rel in tracked:                 # a copy: sdist writes an egg-info beside setup.py
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "-d",
                          str(tmp_path / "dist")], cwd=src, capture_output=True, text=True,
                         env={**os.environ, "FASTATTN_CUDA": "0"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (tarball,) = (tmp_path / "dist").glob("fastattn-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [rel for rel in tracked if rel.startswith(("csrc/", "fastattn/", "tests/"))
              and not rel.endswith((".png", ".csv"))]
    needed += ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
               "benchmarks/RESULTS.md"]      # (the README links to it)
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {len(missing)} files: {missing[:20]}"
    assert any(n.endswith(".cu") for n in names) and "csrc/check.h" in names
