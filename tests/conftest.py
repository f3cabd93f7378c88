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
