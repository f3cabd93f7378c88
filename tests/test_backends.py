"""Backend registry: availability report, selection, overrides, fallbacks and their errors."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import _backends


def test_backends_reports_every_backend_with_a_reason():
    report = fastattn.backends()
    assert set(report) == {"triton", "cuda", "cpu", "reference"}
    for name, st in report.items():
        assert isinstance(st, fastattn.BackendStatus) and st.reason, name
    assert report["reference"] and report["cpu"], report
    if not torch.cuda.is_available():
        assert not report["cuda"] and "no CUDA device" in report["cuda"].reason


def test_use_backend_is_scoped_and_validated():
    assert _backends.requested() == "auto"
    with fastattn.use_backend("reference"):
        assert _backends.requested() == "reference"
        with fastattn.use_backend("cpu"):
            assert _backends.requested() == "cpu"
        assert _backends.requested() == "reference"
    assert _backends.requested() == "auto"
    with pytest.raises(ValueError, match="unknown fastattn backend 'fast'"):
        with fastattn.use_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_impossible_backend_raises_at_once():
    with pytest.raises(fastattn.BackendError, match="'cuda' is not available: no CUDA device"):
        with fastattn.use_backend("cuda"):
            pass


@pytest.mark.parametrize("triton_version,numpy_version,works,fix", [
    ("3.0.0", "2.3.5", False, "numpy<2"),   # silently wrong numbers: the worst case
    ("3.1.0", "2.0.0", False, "numpy<2"),
    ("3.1.0", "1.26.4", True, None),
    ("3.2.0", "2.3.5", True, None),
    ("3.6.0", "2.4.0", False, "numpy<2.4"),  # the interpreter int()s one-element arrays
    ("3.6.0", "2.3.5", True, None),
    ("3.7.0", "2.4.0", True, None),          # fixed in triton 3.7
    ("3.10.0+git1a2b", "2.4.0", True, None),  # versions compare as numbers, not strings
])
def test_interpreter_refused_with_a_numpy_it_cannot_use(monkeypatch, triton_version, numpy_version,
                                                        works, fix):
    """triton <= 3.1's interpreter computes wrong numbers with numpy 2, triton <= 3.6's fails
    deep inside Triton with numpy >= 2.4; the backend report says so, with the fix."""
    import numpy

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backends, "_triton_version", lambda: triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    st = _backends.status("triton")
    assert bool(st) is works, st
    if not works:
        assert f"triton {triton_version}" in st.reason and f"'{fix}'" in st.reason, st
        with pytest.raises(fastattn.BackendError, match=fix):
            with fastattn.use_backend("triton"):
                pass


def test_backend_for_wrong_device_raises(monkeypatch):
    # pretend the CUDA backend exists: asking it to run CPU tensors must still fail clearly
    monkeypatch.setattr(_backends, "status", lambda name: _backends.BackendStatus(True, "test"))
    with _backends_override("cuda"), pytest.raises(fastattn.BackendError, match="takes CUDA tensors"):
        fastattn.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_backend_without_a_kernel_for_the_op_says_which_have_one():
    dtypes = {"triton": (torch.float32,)}           # an op with a Triton kernel only
    with _backends_override("cpu"), pytest.raises(
            fastattn.BackendError, match=r"toy_op: backend 'cpu' has no kernel for this op "
                                         r"\(backends with one: triton, reference\)"):
        _backends.select("toy_op", torch.device("cpu"), torch.float32, cuda_order=("triton",),
                         dtypes=dtypes)
    with _backends_override("reference"):     # the reference serves every op
        assert _backends.select("toy_op", torch.device("cpu"), torch.float32,
                                cuda_order=("triton",), dtypes=dtypes) == "reference"


@pytest.mark.skipif(not _backends._triton_interpret() or not _backends.status("triton"),
                    reason="needs triton's interpreter (TRITON_INTERPRET=1, as tests/conftest.py sets)")
def test_bf16_matrix_products_are_refused_in_the_interpreter():
    """The interpreter's bf16 tl.dot multiplies raw bits (outputs off by ~1e9, no error): the ops
    whose Triton kernels multiply bf16 matrices refuse it there; the others run bf16."""
    q = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    x, w1, w2 = (torch.randn(*s, dtype=torch.bfloat16) for s in ((3, 8), (16, 8), (8, 16)))
    with fastattn.use_backend("triton"):
        for call in (lambda: fastattn.flash_attention(q, q, q),
                     lambda: fastattn.decode_attention(q[:, :, :1], q, q,
                                                       torch.tensor([5], dtype=torch.int32)),
                     lambda: fastattn.mlp(x, w1, None, w2),
                     lambda: fastattn.swiglu(x, w1, w1, w2)):
            with pytest.raises(fastattn.BackendError, match="bfloat16 matrix products in the "
                                                            "Triton interpreter"):
                call()
        # no tl.dot in these: bf16 runs (and matches the reference)
        logits, target = torch.randn(4, 9, dtype=torch.bfloat16), torch.tensor([0, 3, 8, 1])
        torch.testing.assert_close(fastattn.cross_entropy(logits, target),
                                   torch.nn.functional.cross_entropy(logits.float(), target).bfloat16())
        fastattn.layer_norm(x, 8)
        # fp16 dot kernels run
        fastattn.flash_attention(q.half(), q.half(), q.half())


def _backends_override(name):
    token = _backends._override.set(name)

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            _backends._override.reset(token)
    return _Ctx()


def test_auto_picks_cpu_kernel_on_cpu(monkeypatch):
    seen = []
    real = _backends.implementation
    monkeypatch.setattr(_backends, "implementation",
                        lambda name, pkg: seen.append(name) or real(name, pkg))
    fastattn.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert seen == ["cpu"]


def _run(code, prelude="", **env):
    import os
    full_env = {**os.environ, **env}
    source = textwrap.dedent(prelude) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          env=full_env, timeout=900)


def test_env_override_and_bad_value():
    ok = _run("""
        import torch, fastattn
        from fastattn import _backends
        assert _backends.requested() == "reference", _backends.requested()
        print(fastattn.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1])).item())
    """, FASTATTN_BACKEND="reference")
    assert ok.returncode == 0, ok.stderr
    bad = _run("""
        import torch, fastattn
        fastattn.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    """, FASTATTN_BACKEND="gpu")
    assert bad.returncode != 0 and "FASTATTN_BACKEND='gpu' is not a backend" in bad.stderr


BLOCK_C = """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fastattn._C":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, Block())
"""


def test_missing_extension_without_jit_falls_back_with_one_warning():
    res = _run(prelude=BLOCK_C, code="""
        import warnings, torch, fastattn
        import torch.nn.functional as F
        print(fastattn.backends()["cpu"])
        x, t = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fastattn.cross_entropy(x, t)
            b = fastattn.cross_entropy(x, t)
        msgs = [str(w.message) for w in caught if "fastattn" in str(w.message)]
        assert len(msgs) == 1 and "falling back" in msgs[0], msgs
        where = [w.filename for w in caught if "fastattn" in str(w.message)]
        assert where == ["<string>"], where     # the user's call, not a frame inside fastattn
        torch.testing.assert_close(a, F.cross_entropy(x, t))
        try:
            with fastattn.use_backend("cpu"):
                pass
        except fastattn.BackendError as e:
            print("ERR", e)
    """, FASTATTN_JIT="0")
    assert res.returncode == 0, res.stderr
    assert "unavailable" in res.stdout and "FASTATTN_JIT=0" in res.stdout
    assert "ERR backend 'cpu' is not available" in res.stdout


@pytest.mark.slow
def test_missing_extension_is_built_on_first_use(tmp_path):
    """With fastattn._C not importable, the first CPU call compiles csrc/cpu into the cache and
    says so; a later process loads the cached build without saying it builds anything. (The
    compiler is the machine's, called through a wrapper that appends -O0: what is tested is the
    build on first use, not the optimised code, which the suite's other tests run from the
    extension `make build` made; unoptimised, the build takes a fraction of the time.)"""
    wrapper = tmp_path / "bin" / "g++"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {os.environ.get("CXX") or "c++"} "$@" -O0\n')
    wrapper.chmod(0o755)
    code = """
        import torch, fastattn
        import torch.nn.functional as F
        from fastattn import _ext
        x, t = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
        with fastattn.use_backend("cpu"):
            a = fastattn.cross_entropy(x, t)
        torch.testing.assert_close(a, F.cross_entropy(x, t))
        print("MODULE", _ext.load("cpu").__file__)
    """
    cache = tmp_path / "cache"
    res = _run(prelude=BLOCK_C, code=code, FASTATTN_CACHE_DIR=str(cache), MAX_JOBS="2",
               CXX=str(wrapper))
    assert res.returncode == 0, res.stderr
    assert f"MODULE {cache}" in res.stdout, res.stdout
    assert "fastattn: building fastattn._C into" in res.stderr, res.stderr
    again = _run(prelude=BLOCK_C, code=code, FASTATTN_CACHE_DIR=str(cache), CXX=str(wrapper))
    assert again.returncode == 0, again.stderr
    assert f"MODULE {cache}" in again.stdout and "building" not in again.stderr, again.stderr


def test_a_module_built_from_older_bindings_is_not_used():
    """fastattn._C of another bindings version (an editable install's build before a pull that
    changed a binding) is refused like a missing one: rebuilt on first use, or here, with the
    JIT off, the reference with the reason."""
    res = _run("""
        from fastattn import _buildinfo
        _buildinfo.API_VERSION["cpu"] += 1
        import fastattn
        print("CPU", fastattn.backends()["cpu"])
    """, FASTATTN_JIT="0")
    assert res.returncode == 0, res.stderr
    assert "has bindings version" in res.stdout and "built from older sources" in res.stdout, \
        res.stdout


def test_no_compiler_falls_back_and_says_so(tmp_path):
    res = _run(prelude=BLOCK_C, code="""
        import warnings, torch, fastattn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fastattn.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
        print([str(w.message) for w in caught])
        print("CPU", fastattn.backends()["cpu"])
    """, CXX="/nonexistent/c++", FASTATTN_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "no C++ compiler: '/nonexistent/c++' is not on the PATH" in res.stdout, res.stdout
    assert "falling back" in res.stdout and not any(tmp_path.iterdir())


def test_a_failed_build_reports_its_cause_not_ninjas_last_line():
    from fastattn._ext import build_failure
    log = ("Error building extension 'fastattn__C':\n[1/3] c++ -MMD -c adam.cpp\n"
           "FAILED: adam.o\nadam.cpp:38:10: fatal error: ops.h: No such file or directory\n"
           "compilation terminated.\nninja: build stopped: subcommand failed.")
    assert build_failure(RuntimeError(log)) == (
        "adam.cpp:38:10: fatal error: ops.h: No such file or directory")
    assert build_failure(RuntimeError("Ninja is required to load C++ extensions")) == (
        "Ninja is required to load C++ extensions")
    assert build_failure(RuntimeError("")) == "RuntimeError"


def test_backward_on_another_thread_keeps_the_forward_backend(monkeypatch):
    """CUDA backward runs on autograd's worker threads, outside the forward's use_backend block;
    the backend asked for at forward time must still be the one that runs backward."""
    import threading
    seen = []
    real = _backends.implementation
    monkeypatch.setattr(_backends, "implementation",
                        lambda name, pkg: seen.append(name) or real(name, pkg))
    x = torch.randn(3, 11, requires_grad=True)
    t = torch.tensor([0, 4, 9])
    with fastattn.use_backend("reference"):
        logp = fastattn.token_logprobs(x, t)
    errors = []

    def run_backward():
        try:
            logp.sum().backward()
        except Exception as exc:  # surfaced below
            errors.append(exc)
    worker = threading.Thread(target=run_backward)
    worker.start()
    worker.join()
    assert not errors, errors
    assert seen == ["reference", "reference"], seen


def test_autocast_runs_the_ops_in_the_autocast_dtype():
    """Inside torch.autocast the fused ops get their matmul inputs in the autocast dtype (custom
    ops get no autocast treatment of their own); losses stay fp32 as autocast's policy says."""
    import fastattn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, 16, generator=g, requires_grad=True)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    w1 = torch.randn(32, 16, generator=g, requires_grad=True)
    w2 = torch.randn(16, 32, generator=g, requires_grad=True)
    head = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.flash_attention(q, q, q, causal=True)
        y = fastattn.mlp(x, w1, None, w2)
        s = fastattn.swiglu(x, w1, w1, w2)
        loss = fastattn.linear_cross_entropy(y, head, t)
        logp = fastattn.linear_token_logprobs(y, head, t)
    assert out.dtype == y.dtype == s.dtype == torch.bfloat16
    assert loss.dtype == logp.dtype == torch.float32
    expect = torch.nn.functional.cross_entropy(y.float() @ head.bfloat16().float().t(), t)
    torch.testing.assert_close(loss, expect, rtol=2e-2, atol=2e-2)
    (loss + out.float().sum() + s.float().sum()).backward()
    assert q.grad.dtype == x.grad.dtype == w1.grad.dtype == head.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not autocast-eligible
        assert fastattn.mlp(x.double(), w1.double(), None, w2.double()).dtype == torch.float64
    # outside autocast the loss is in the input's dtype, as F.cross_entropy's
    assert fastattn.linear_cross_entropy(x.bfloat16(), head.bfloat16(), t).dtype == torch.bfloat16
