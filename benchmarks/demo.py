"""`make demo`: the main job on an embedded default — until the reference GPT lands, the
cross-entropy benchmark on the CPU, printed side by side with PyTorch."""

import sys

import pytest


def main() -> int:
    return pytest.main(["benchmarks/bench_cross_entropy.py", "-q", "-p", "no:cacheprovider",
                        "-o", "python_files=bench_*.py",
                        "-k", "cross_entropy_fwd_bwd and not linear",
                        "--benchmark-columns=min,median,max", "--benchmark-sort=name"])


if __name__ == "__main__":
    sys.exit(main())
