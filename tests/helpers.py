"""Shared test helpers: which (device, backend) pairs to test, tolerances, comparisons."""

import contextlib

import pytest
import torch

GPU = pytest.mark.gpu

# Every backend that can run on CPU tensors in CI (Triton through the interpreter). None of
# them is skipped: a backend that fails to build or import must fail the suite.
CPU_BACKENDS = [("cpu", "reference"), ("cpu", "cpu"), ("cpu", "triton")]
GPU_BACKENDS = [pytest.param("cuda", b, marks=GPU, id=f"cuda-{b}") for b in ("cuda", "triton")]
ALL_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d, b in CPU_BACKENDS] + GPU_BACKENDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Kernels do their math in float32 on inputs that are exact in every dtype; what differs between
# dtypes is the rounding of the outputs written in the input's dtype (one ulp there).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-4),
}


def assert_close(actual, expected, dtype, what, scale=1.0):
    """Compare with per-dtype tolerances; ``scale`` widens atol for values of larger magnitude."""
    tol = dict(TOL[dtype])
    tol["atol"] = tol["atol"] * scale
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               msg=lambda m: f"{what}: {m}", **tol)


def forced_tma(monkeypatch, module, planner, record, device):
    """Generator for a fixture: forces ``module``'s TMA path (FASTATTN_TRITON_TMA=1, which also
    runs it under the interpreter), wraps ``module.<planner>`` so that each launch appends
    ``record(plan)`` to the list it yields, and fails the test if a TMA launch fell back to
    pointer loads meanwhile. Skips where the device has no TMA."""
    monkeypatch.setattr(module.TMA, "mode", "1")
    monkeypatch.setattr(module.TMA, "failed", False)
    if not module.TMA.enabled(torch.empty(1, device=device)):
        pytest.skip("no TMA on this device")
    taken = []
    plan = getattr(module, planner)

    def spy(*args, **kwargs):
        result = plan(*args, **kwargs)
        taken.append(record(result))
        return result

    monkeypatch.setattr(module, planner, spy)
    yield taken
    assert not module.TMA.failed, "a TMA launch failed and fell back to pointer loads"



def stopped_closing_phase(signum: int):
    """A stand-in for the training loops' ``closing_phase``: the closing evaluation stops at
    once, as SIGINT (2) or SIGTERM (15) there would stop it."""
    from fastattn.train.pretrain import TrainingInterrupted

    @contextlib.contextmanager
    def closing_phase(path, step, enabled=True):
        raise TrainingInterrupted(f"signal {signum}: stopped in the closing evaluation ({step})",
                                  signum)
        yield
    return closing_phase
