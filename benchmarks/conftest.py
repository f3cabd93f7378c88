"""Collects benchmark results; prints the side-by-side table and writes CSV + PNG at the end."""

import pytest
import torch

from benchmarks.common import Result, cpu_peak_mb, environment, table, write
from fastattn.train.hostmem import minor_page_faults

_RESULTS: list[Result] = []


@pytest.fixture
def measure(benchmark):
    """measure(case, impl, fn, setup, work, unit, rounds): time fn(*setup()) (setup returns a
    tuple of fresh arguments, built outside the timed region) with
    pytest-benchmark, then its peak memory and page faults on one more call, and record the
    result."""

    def run(case, impl, fn, setup, work=0.0, unit="", rounds=5):
        benchmark.group = case
        benchmark.name = impl
        benchmark.pedantic(lambda args: fn(*args), setup=lambda: ((setup(),), {}),
                           rounds=rounds, warmup_rounds=3)
        args = setup()
        extra = {}
        if torch.cuda.is_available():
            peak = None
        else:
            # the same call's minor page faults: memory the OS maps and zeroes for it (with
            # glibc's default malloc, every large tensor it allocates; see the README)
            f0 = minor_page_faults()
            peak = cpu_peak_mb(lambda: fn(*args))
            extra["page faults"] = minor_page_faults() - f0
        _RESULTS.append(Result(case, impl, benchmark.stats.stats.median * 1e3, work, unit, peak,
                               extra))

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    csv_path, png_path = write(_RESULTS, "cpu_benchmarks")
    env = environment()
    terminalreporter.write_sep("=", "fastattn vs PyTorch (same run)")
    terminalreporter.write_line(", ".join(f"{k}: {v}" for k, v in env.items()))
    terminalreporter.write_line(table(_RESULTS))
    terminalreporter.write_line(f"written: {csv_path}  {png_path}")
