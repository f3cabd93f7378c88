"""Collects benchmark results; prints the side-by-side table and writes CSV + PNG at the end."""

import pytest
import torch

from benchmarks.common import Result, check, cpu_peak_mb, environment, table, write
from fastattn.train.hostmem import minor_page_faults

_RESULTS: list[Result] = []
_REFERENCE: dict[str, list] = {}    # the current case's reference outputs (one case at a time)


@pytest.fixture
def measure(benchmark):
    """measure(case, impl, fn, setup, work, unit, rounds, outputs): time fn(*setup()) (setup
    returns a tuple of fresh arguments, built outside the timed region) with pytest-benchmark,
    then its peak memory and its page faults on two more calls, and record the result.

    ``outputs`` = (mine, reference), two zero-argument callables returning this implementation's
    outputs and gradients and those of the case's PyTorch reference (computed at the case's
    first row), or one callable returning both as a pair: they are compared before the timing
    (``benchmarks.common.check``); a row off the reference is recorded, marked, given no ratio,
    and fails its test. (The timed calls' results are dropped at once: a loss kept until the
    next round would keep its inputs and gradients alive through that round.)"""

    def run(case, impl, fn, setup, work=0.0, unit="", rounds=5, outputs=None):
        verdict = {}
        if callable(outputs):
            verdict = check(outputs)
        elif outputs is not None:
            mine, reference = outputs
            if case not in _REFERENCE:
                _REFERENCE.clear()
                _REFERENCE[case] = reference()
            verdict = check(mine, _REFERENCE[case])
        benchmark.group = case
        benchmark.name = impl
        benchmark.pedantic(lambda args: (fn(*args), None)[1], setup=lambda: ((setup(),), {}),
                           rounds=rounds, warmup_rounds=3)
        args = setup()
        extra = dict(verdict)
        if torch.cuda.is_available():
            peak = None
        else:
            peak = cpu_peak_mb(lambda: (fn(*args), None)[1])
            # one more call's minor page faults: memory the OS maps and zeroes for it (with
            # glibc's default malloc, every large tensor it allocates; see benchmarks/RESULTS.md), out of
            # the profiler (whose own buffers would fault too)
            args = setup()
            f0 = minor_page_faults()
            fn(*args)
            extra["page faults"] = minor_page_faults() - f0
        _RESULTS.append(Result(case, impl, benchmark.stats.stats.median * 1e3, work, unit, peak,
                               extra))
        assert "check" not in verdict, (
            f"{case} [{impl}]: outputs off the reference's ({verdict}); see benchmarks.common.check")

    return run


def pytest_sessionstart(session):
    # fastattn's rows take its default backend, the C++ one on CPU tensors; without it they
    # would time the pure-PyTorch reference under fastattn's name (with one warning)
    import fastattn
    if not (cpu := fastattn.backends()["cpu"]):
        pytest.exit(f"make bench: fastattn's C++ CPU backend is unavailable ({cpu.reason}); "
                    "build it first (make build)", returncode=2)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    csv_path, png_path = write(_RESULTS, "cpu_benchmarks")
    env = environment()
    terminalreporter.write_sep("=", "fastattn vs PyTorch (same run)")
    terminalreporter.write_line(", ".join(f"{k}: {v}" for k, v in env.items()))
    terminalreporter.write_line(table(_RESULTS))
    terminalreporter.write_line(f"written: {csv_path}  {png_path}")
