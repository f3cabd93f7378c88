"""_triton_common.CachedAutotune: a known call's config from a dict instead of Autotuner.run.

The attention and FFN Triton kernels launch through it on GPUs (under the interpreter the ops
launch their kernels undecorated), so its contract is checked here on a stand-in autotuner
that records what it is asked, and on a real ``triton.autotune`` of an interpreted kernel."""

import pytest
import torch

from fastattn.ops._triton_common import CachedAutotune, cdiv, next_power_of_2


class _Config:
    def __init__(self, block, pre_hook=None):
        self.kwargs, self.pre_hook = {"BLOCK": block}, pre_hook

    def all_kwargs(self):
        return {"BLOCK": self.kwargs["BLOCK"], "num_warps": 4}


class _Jit:
    def __init__(self):
        self.launches = []

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((args, grid, warmup, kwargs))
        return len(self.launches)


class _Tuner:
    """What CachedAutotune uses of triton's Autotuner: arg_names, keys, run (choosing and
    launching, setting best_config) and fn (the JIT function)."""
    arg_names = ["X", "N", "BUCKET", "FLAG"]
    keys = ["BUCKET", "FLAG"]

    def __init__(self, hooks):
        self.fn, self.tuned, self.hooks = _Jit(), [], hooks
        self.best_config = None

    def run(self, *args, grid, warmup, **kwargs):
        self.tuned.append((args, kwargs))
        config = _Config(64 if args[2] >= 32 else 16, pre_hook=self.hooks.append)
        self.best_config = config
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.all_kwargs())


def test_known_calls_skip_the_autotuner_and_launch_the_same():
    hooks = []
    tuner = _Tuner(hooks)
    kernel = CachedAutotune(tuner)
    x = torch.zeros(4)
    grid = (3,)
    kernel[grid](x, 5, 16, FLAG=True)        # new key: the autotuner chooses and launches
    kernel[grid](x, 7, 16, FLAG=True)        # N is not a key argument: the remembered config
    assert len(tuner.tuned) == 1 and len(tuner.fn.launches) == 2
    first, second = tuner.fn.launches
    assert first[3] == second[3] == {"FLAG": True, "BLOCK": 16, "num_warps": 4}
    assert second[0] == (x, 7, 16) and second[1] == grid and second[2] is False
    # the config's pre-hook sees every argument by name, as Autotuner.run hands it over
    assert hooks[-1] == {"X": x, "N": 7, "BUCKET": 16, "FLAG": True, "BLOCK": 16, "num_warps": 4}
    # a key argument, a keyword argument or a tensor dtype that differs: the autotuner again
    kernel[grid](x, 5, 32, FLAG=True)
    kernel[grid](x, 5, 16, FLAG=False)
    kernel[grid](x.double(), 5, 16, FLAG=True)
    assert len(tuner.tuned) == 4
    assert tuner.fn.launches[2][3]["BLOCK"] == 64 and tuner.fn.launches[3][3]["BLOCK"] == 16
    kernel[grid](x, 9, 32, FLAG=True)
    assert len(tuner.tuned) == 4 and tuner.fn.launches[-1][3]["BLOCK"] == 64


def test_key_arguments_by_index_as_in_triton_3_0():
    """triton 3.0's Autotuner names its key arguments by index (key_idx), not by name (keys)."""
    tuner = _Tuner([])
    tuner.keys = None
    tuner.key_idx = [2, 3]
    kernel = CachedAutotune(tuner)
    x = torch.zeros(2)
    for n, bucket in ((1, 16), (2, 16), (3, 32), (4, 32)):
        kernel[(1,)](x, n, bucket, FLAG=True)
    assert len(tuner.tuned) == 2 and [launch[3]["BLOCK"] for launch in tuner.fn.launches] == \
        [16, 16, 64, 64]


def test_tensor_keyword_arguments_are_never_kept():
    tuner = _Tuner([])
    kernel = CachedAutotune(tuner)
    for _ in range(3):
        kernel[(1,)](torch.zeros(2), 1, 16, FLAG=torch.zeros(1))
    assert len(tuner.tuned) == 3 and not kernel._chosen


def test_host_integer_helpers_match_triton():
    import triton
    for n in range(0, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d)


def test_real_autotuner_under_the_interpreter():
    import os

    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if os.environ.get("TRITON_INTERPRET") != "1" or not hasattr(InterpretedFunction, "run"):
        pytest.skip("needs the interpreter of triton >= 3.1 (kernels launched through .run)")

    @triton.jit
    def add(X, Y, Out, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(Out + offs, tl.load(X + offs, mask=mask) + tl.load(Y + offs, mask=mask), mask=mask)

    kernel = CachedAutotune(triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["N"])(add))
    for n in (37, 37, 5):
        x, y = torch.randn(n), torch.randn(n)
        out = torch.empty(n)
        kernel[lambda meta: (cdiv(n, meta["BLOCK"]),)](x, y, out, n)
        torch.testing.assert_close(out, x + y)
    assert len(kernel._chosen) == 2


def test_real_autotuner_choosing_among_configs():
    """Several configs (timed by a stand-in benchmark that prefers one per bucket), a config
    pre-hook, reset_to_zero and triton.heuristics under the autotuner: every launch gives the
    right numbers, a key seen before never reaches the autotuner again, and the config kept for
    each key is the one the autotuner chose for it."""
    import inspect
    import os

    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if os.environ.get("TRITON_INTERPRET") != "1" or not hasattr(InterpretedFunction, "run") \
            or "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("needs the interpreter and triton.autotune(do_bench=) (triton >= 3.3)")

    @triton.jit
    def scaled_add(X, Y, Out, N, NB, BLOCK: tl.constexpr, EVEN: tl.constexpr, SCALE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(Out + offs, (tl.load(X + offs, mask=mask) + tl.load(Y + offs, mask=mask)) * SCALE,
                 mask=mask)

    hooked = []
    timed = []

    def bench(fn, quantiles):
        fn()
        timed.append(1)
        return [float(len(timed) % 3 + 1)] * 3   # an order that differs from bucket to bucket

    heuristic = triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK"] == 0})(scaled_add)
    tuner = triton.autotune(
        configs=[triton.Config({"BLOCK": b}, num_warps=w, pre_hook=lambda n: hooked.append(n["BLOCK"]))
                 for b in (16, 32) for w in (1, 2)],
        key=["NB"], reset_to_zero=["Out"], do_bench=bench)(heuristic)
    kernel = CachedAutotune(tuner)
    runs = []
    real_run = tuner.run
    tuner.run = lambda *a, **k: (runs.append(a[4]), real_run(*a, **k))[1]
    for n in (37, 40, 37, 100, 37, 120):
        x, y = torch.randn(n), torch.randn(n)
        out = torch.full((n,), 7.0)
        kernel[lambda meta: (cdiv(n, meta["BLOCK"]),)](x, y, out, n, next_power_of_2(n), SCALE=2)
        torch.testing.assert_close(out, (x + y) * 2)
    assert runs == [64, 128]                   # one autotuner run per bucket of N
    assert {key[0]: chosen[0] for key, chosen in kernel._chosen.items()} == \
        {(nb,): config for (nb, *_), config in tuner.cache.items()}
    assert len(hooked) >= 6                    # the chosen config's pre-hook ran at every launch
