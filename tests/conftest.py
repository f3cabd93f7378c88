"""Test setup: Triton on CPU tensors (interpreter) when there is no GPU; seeds; backend lists."""

import os

import torch

# Triton chooses interpreter or compiler when a kernel is decorated, i.e. when fastattn first
# imports a triton.py; that happens lazily, after this line.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # The few tests marked slow (minutes each: a build, the demo, a compile sweep) run first,
    # each followed by one quick test: `make test` hands tests to its pytest-xdist workers one
    # at a time (--maxschedchunk 1), and a worker holds two (the one it runs and the next), so
    # this gives each worker its own slow test from the start instead of leaving one running
    # alone at the end, or two queued behind each other on one worker.
    slow = [item for item in items if item.get_closest_marker("slow")]
    quick = [item for item in items if not item.get_closest_marker("slow")]
    items[:] = [x for pair in zip(slow, quick) for x in pair] + slow[len(quick):] + quick[len(slow):]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With FASTATTN_TEST_FAILURES set, append each failure's traceback to that file as it
    happens (under pytest-xdist too): a run cut off by a time limit, as `make gpu-check`'s can
    be, still tells why each test failed, not only that it did."""
    path = os.environ.get("FASTATTN_TEST_FAILURES")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return    # under xdist the controller gets every report too: write each failure once
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
