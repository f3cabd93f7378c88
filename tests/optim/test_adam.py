"""fastattn.optim.Adam/AdamW against torch.optim on every backend: 20 steps, every flag."""

import copy
import itertools

import pytest
import torch

import fastattn
from tests.helpers import ALL_BACKENDS, GPU

SIZES = [(1,), (17,), (33, 65)]


def _params(device, dtype=torch.float32, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()
            for s in sizes]


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype)


def _run(opt, params, steps=20, start=0):
    for i in range(start, start + steps):
        _grads(params, i)
        opt.step()


# every combination of the flags (the lr as a tensor is one), and other betas and eps
FLAGS = [
    {k: v for k, v, on in (("weight_decay", 0.1, wd), ("amsgrad", True, ams),
                           ("maximize", True, mx), ("lr", torch.tensor(3e-3), lr)) if on}
    for wd, ams, mx, lr in itertools.product((False, True), repeat=4)
] + [dict(betas=(0.8, 0.95), eps=1e-6, amsgrad=True, maximize=True, weight_decay=0.02)]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f) or "default")
def test_matches_torch_fp32(device, backend, cls, flags):
    ours_p = _params(device)
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    kwargs = {"lr": 1e-2, **flags}
    ours = getattr(fastattn.optim, cls)(ours_p, **kwargs)
    ref = getattr(torch.optim, cls)(ref_p, foreach=False, **copy.deepcopy(kwargs))
    with fastattn.use_backend(backend):
        _run(ours, ours_p)
    _run(ref, ref_p)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours_p, ref_p):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)
        assert ours.state[p]["step"].item() == ref.state[q]["step"].item() == 20


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_closure_and_add_param_group_as_torch(device, backend):
    """step(closure) returns the closure's loss (evaluated with grad enabled); a group added
    after some steps starts its own state, as in torch."""
    a, b = _params(device, sizes=[(6,), (4,)])
    ra, rb = (p.detach().clone().requires_grad_() for p in (a, b))
    ours, ref = (fastattn.optim.AdamW([a], lr=1e-2),
                 torch.optim.AdamW([ra], lr=1e-2, foreach=False))
    with fastattn.use_backend(backend):
        for i in range(6):
            if i == 3:
                ours.add_param_group({"params": [b], "lr": 0.05, "amsgrad": True})
                ref.add_param_group({"params": [rb], "lr": 0.05, "amsgrad": True})
            losses = []
            for o, ps in ((ours, (a, b)), (ref, (ra, rb))):
                def closure(ps=ps, o=o):
                    o.zero_grad()
                    loss = sum((p * p).sum() for p in ps) + ps[0].sum()
                    loss.backward()
                    return loss
                losses.append(o.step(closure))
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for x, y in zip((a, b), (ra, rb)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert ours.state[b]["step"].item() == 3 and "max_exp_avg_sq" in ours.state[b]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_param_groups_and_missing_grads(device, backend):
    a, b, c = _params(device, sizes=[(5,), (7,), (3,)])
    ra, rb, rc = [p.detach().clone().requires_grad_() for p in (a, b, c)]
    groups = lambda x, y, z: [{"params": [x, y]}, {"params": [z], "lr": 0.1, "weight_decay": 0.3}]
    ours = fastattn.optim.AdamW(groups(a, b, c), lr=1e-2)
    ref = torch.optim.AdamW(groups(ra, rb, rc), lr=1e-2, foreach=False)
    with fastattn.use_backend(backend):
        for i in range(6):
            for o, ps in ((ours, (a, b, c)), (ref, (ra, rb, rc))):
                _grads(ps, i)
                if i % 2:
                    ps[1].grad = None   # b skips odd steps: its step count falls behind
                o.step()
    for x, y in zip((a, b, c), (ra, rb, rc)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert ours.state[b]["step"].item() == 3


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("flags", [dict(), dict(weight_decay=0.1, amsgrad=True, maximize=True)],
                         ids=["default", "wd-amsgrad-maximize"])
def test_master_weights_are_an_fp32_adamw(device, backend, dtype, flags):
    """bf16/fp16 parameters with fp32 master weights: the master follows torch's fp32 AdamW fed
    the same (low-precision) gradients, to fp32 rounding; the parameter is the master rounded
    to its dtype after every step."""
    fp32 = _params(device, sizes=[(257,), (3, 5)])
    low = [p.detach().to(dtype).requires_grad_() for p in fp32]
    for p, q in zip(fp32, low):     # the same starting point: the master starts from the param
        p.data.copy_(q.float())
    ref = torch.optim.AdamW(fp32, lr=1e-2, foreach=False, **flags)
    ours = fastattn.optim.AdamW(low, lr=1e-2, master_weights=True, **flags)
    with fastattn.use_backend(backend):
        for i in range(20):
            _grads(low, i)
            for p, q in zip(low, fp32):
                q.grad = p.grad.float()
            ref.step()
            ours.step()
            for p, q in zip(low, fp32):
                master = ours.state[p]["master_param"]
                assert master.dtype == torch.float32
                torch.testing.assert_close(master, q.detach(), rtol=1e-6, atol=1e-7)
                assert torch.equal(p.detach(), master.to(dtype))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bf16_moments(device, backend):
    params = _params(device, sizes=[(300,)])
    ref_p = [p.detach().clone().requires_grad_() for p in params]
    ours = fastattn.optim.Adam(params, lr=1e-2, moment_dtype=torch.bfloat16)
    ref = torch.optim.Adam(ref_p, lr=1e-2, foreach=False)
    with fastattn.use_backend(backend):
        _run(ours, params, steps=10)
    _run(ref, ref_p, steps=10)
    assert ours.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(params[0], ref_p[0], rtol=0, atol=5e-3)


@pytest.mark.parametrize("src,dst", [("torch", "fastattn"), ("fastattn", "torch")])
def test_state_dict_round_trip_resumes_identically(src, dst):
    make = {"torch": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, foreach=False),
            "fastattn": lambda ps: fastattn.optim.AdamW(ps, lr=1e-2, amsgrad=True)}
    first = _params("cpu")
    opt = make[src](first)
    _run(opt, first, steps=5)
    sd = copy.deepcopy(opt.state_dict())
    # a twin of each side resumes from the same checkpoint; both must take the same next steps
    resumed = [p.detach().clone().requires_grad_() for p in first]
    twin = [p.detach().clone().requires_grad_() for p in first]
    opt_b = make[dst](resumed)
    opt_b.load_state_dict(sd)
    opt_t = make[src](twin)
    opt_t.load_state_dict(copy.deepcopy(sd))
    _run(opt_b, resumed, steps=3, start=5)
    _run(opt_t, twin, steps=3, start=5)
    for a, b in zip(resumed, twin):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    keys = set(opt_b.state_dict()["state"][0])
    assert {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} <= keys


def test_grad_scaler_skips_inf_step_and_lowers_scale():
    params = _params("cpu", sizes=[(9,)])
    before = params[0].detach().clone()
    opt = fastattn.optim.Adam(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    loss = (params[0] * torch.tensor(float("inf"))).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(params[0].detach(), before)
    assert scaler.get_scale() < 2.0 ** 8
    assert opt.state[params[0]]["step"].item() == 0
    # a finite step afterwards equals torch's unscaled step
    ref_p = [params[0].detach().clone().requires_grad_()]
    ref = torch.optim.Adam(ref_p, lr=1e-2, foreach=False)
    opt.zero_grad()
    (params[0] * 3).sum().mul(scaler.get_scale()).backward()
    scaler.step(opt)
    (ref_p[0] * 3).sum().backward()
    ref.step()
    torch.testing.assert_close(params[0], ref_p[0], rtol=1e-6, atol=1e-7)


def test_odd_sizes_and_noncontiguous_grads():
    params = _params("cpu", sizes=[(1,), (17,), (2 ** 20 + 3,)])
    ref_p = [p.detach().clone().requires_grad_() for p in params]
    ours = fastattn.optim.AdamW(params, lr=1e-3)
    ref = torch.optim.AdamW(ref_p, lr=1e-3, foreach=False)
    for i in range(3):
        for o, ps in ((ours, params), (ref, ref_p)):
            _grads(ps, i)
            o.step()
    big = torch.randn(4, 17)
    params[1].grad = big.t()[:, 1]          # a strided view of another tensor
    ref_p[1].grad = big.t()[:, 1].contiguous()
    for p, q in zip((params[0], params[2]), (ref_p[0], ref_p[2])):
        p.grad = q.grad = None
    ours.step()
    ref.step()
    for a, b in zip(params, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad,match", [
    (lambda p: setattr(p, "grad", p.detach().to_sparse()), "sparse gradients"),
])
def test_clear_errors(bad, match):
    p = torch.zeros(4, requires_grad=True)
    opt = fastattn.optim.Adam([p])
    bad(p)
    with pytest.raises(RuntimeError, match=match):
        opt.step()


def test_constructor_errors():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="learning rate"):
        fastattn.optim.Adam(p, lr=-1)
    for lr in (torch.tensor(-1e-3), torch.tensor(float("nan")), float("nan")):
        with pytest.raises(ValueError, match="invalid learning rate"):   # as torch.optim
            fastattn.optim.AdamW(p, lr=lr)
    with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"):
        fastattn.optim.Adam(p, betas=(0.9,))
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        fastattn.optim.Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="moment_dtype"):
        fastattn.optim.Adam(p, moment_dtype=torch.float16)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        fastattn.optim.AdamW(p, foreach=True, fused=True)     # as torch.optim


def test_hyperparameters_the_kernels_cannot_use_are_refused_up_front():
    """Non-finite eps or weight_decay, and values of the wrong type, get an error naming them
    at construction, when a group is added, and at a step for a group edited since, before that
    step changes anything (the step counts included)."""
    p = [torch.zeros(2, requires_grad=True)]
    inf = float("inf")
    for kwargs, error, match in [
            (dict(eps=inf), ValueError, "invalid eps inf"),
            (dict(eps=float("nan")), ValueError, "invalid eps nan"),
            (dict(weight_decay=inf), ValueError, "invalid weight_decay inf"),
            (dict(lr=inf), ValueError, "invalid learning rate inf"),
            (dict(lr="0.1"), TypeError, "learning rate must be a real number, got str"),
            (dict(lr=None), TypeError, "learning rate must be a real number, got NoneType"),
            (dict(betas=0.9), ValueError, r"betas must be a pair \(beta1, beta2\), got 0.9"),
            (dict(betas=(0.9, "0.99")), TypeError, "beta parameter at index 1 must be a real")]:
        with pytest.raises(error, match=match):
            fastattn.optim.AdamW(p, **kwargs)
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"invalid weight_decay inf in param_groups\[1\]"):
        fastattn.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": inf}])
    opt = fastattn.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt.param_groups[1]["eps"] = inf
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    with pytest.raises(ValueError, match=r"invalid eps inf in param_groups\[1\]"):
        opt.step()
    assert torch.equal(a, torch.zeros(3)) and not opt.state       # nothing stepped
    opt.param_groups[1]["eps"] = 1e-8
    opt.step()
    ref_a, ref_b = (torch.zeros(n, requires_grad=True) for n in (3, 4))
    ref = torch.optim.AdamW([ref_a, ref_b], lr=0.1)
    ref_a.grad, ref_b.grad = torch.ones(3), torch.ones(4)
    ref.step()
    torch.testing.assert_close(a, ref_a)
    torch.testing.assert_close(b, ref_b)
    assert opt.state[b]["step"].item() == 1


def test_a_parameter_listed_twice_in_a_group_is_refused():
    """torch.optim warns and steps it twice; one fused call would read and write its memory
    as two tensors at once."""
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"lists the same parameter twice \(at 0 and 2\)"):
        fastattn.optim.Adam([p, q, p])
    opt = fastattn.optim.Adam([p])
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [q, q]})
    opt = fastattn.optim.Adam(x for x in (p, q))     # a generator is read once, fully
    assert opt.param_groups[0]["params"] == [p, q]


def test_a_sparse_gradient_fails_the_step_before_any_group_steps():
    first, second = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = fastattn.optim.AdamW([{"params": [first]}, {"params": [second]}], lr=0.1)
    first.grad = torch.ones(3)
    second.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(first, torch.zeros(3)) and not opt.state    # nothing stepped


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("flags", [{}, dict(weight_decay=0.1, amsgrad=True, maximize=True),
                                   dict(lr=torch.tensor(3e-3), weight_decay=0.05)],
                         ids=["defaults", "wd-amsgrad-maximize", "tensor-lr"])
def test_float64_and_complex_parameters_step_as_torch(cls, dtype, flags):
    """The kernels compute in float32 on real numbers: float64 and complex parameters go
    through torch.optim's own arithmetic, beside float32 parameters of the same group that the
    kernels step, and their state round-trips through a state_dict."""
    ours_p = _params("cpu", dtype, [(5,), (3, 4)], seed=3) + _params("cpu", sizes=[(7,)])
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = getattr(fastattn.optim, cls)(ours_p, **flags)
    ref = getattr(torch.optim, cls)(ref_p, foreach=False, **flags)
    _run(ours, ours_p, steps=3)
    _run(ref, ref_p, steps=3)
    for a, b in zip(ours_p, ref_p):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        assert ours.state[ours_p[0]][key].dtype == dtype
        torch.testing.assert_close(ours.state[ours_p[0]][key], ref.state[ref_p[0]][key])
    again_p = [p.detach().clone().requires_grad_() for p in ours_p]
    again = getattr(fastattn.optim, cls)(again_p, **flags)
    again.load_state_dict(copy.deepcopy(ours.state_dict()))
    for opt, ps in ((again, again_p), (ref, ref_p)):
        _run(opt, ps, steps=2, start=3)
    for a, b in zip(again_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_float64_parameters_under_grad_scaler_steps():
    """GradScaler hands the scale and the inf flag to step(); torch's single-tensor Adam takes
    neither, so the float64 path unscales and skips itself."""
    ours_p = _params("cpu", torch.float64, [(6,)], seed=4)
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours, ref = fastattn.optim.AdamW(ours_p, lr=0.1), torch.optim.AdamW(ref_p, lr=0.1,
                                                                        foreach=False)
    for inf in (0.0, 1.0, 0.0):
        _grads(ours_p, 0, scale=8.0)
        _grads(ref_p, 0)
        ours.grad_scale, ours.found_inf = torch.tensor(8.0), torch.tensor(inf)
        ours.step()
        if not inf:
            ref.step()
        torch.testing.assert_close(ours_p[0], ref_p[0], rtol=1e-12, atol=1e-12)
    assert ours.state[ours_p[0]]["step"].item() == 2


def test_adamw_keeps_decoupled_weight_decay_after_loading_an_adam_checkpoint():
    """As torch.optim.AdamW: an Adam state dict (decoupled_weight_decay False in its groups)
    loaded into AdamW does not turn it into Adam with L2 regularisation."""
    start = torch.randn(5)
    sd = torch.optim.Adam([start.clone().requires_grad_()], lr=0.1, weight_decay=0.5).state_dict()
    results = []
    for cls in (torch.optim.AdamW, fastattn.optim.AdamW):
        p = start.clone().requires_grad_()
        opt = cls([p], lr=0.1, weight_decay=0.5)
        opt.load_state_dict(copy.deepcopy(sd))
        # (torch 2.4: AdamW is its own class, always decoupled, without the flag)
        assert opt.param_groups[0].get("decoupled_weight_decay", True) is True
        for _ in range(3):
            p.grad = torch.ones(5)
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


@GPU
def test_gpu_step_has_no_host_sync():
    params = _params("cuda", sizes=[(1 << 20,), (4097,)])
    opt = fastattn.optim.AdamW(params, lr=1e-3)
    _grads(params, 0)
    opt.step()                       # state init reads nothing back either
    _grads(params, 1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@GPU
@pytest.mark.parametrize("lr", ["float", "cuda tensor", "cpu tensor"])
def test_gpu_grad_scaler_step_has_no_host_sync(lr):
    """GradScaler hands its scale and inf flag to the step (_step_supports_amp_scaling): the
    unscaling, the skip test and the step count stay on the device, whatever the lr's kind."""
    params = _params("cuda", sizes=[(1 << 16,), (4097,)])
    lr = {"float": 1e-3, "cuda tensor": torch.tensor(1e-3, device="cuda"),
          "cpu tensor": torch.tensor(1e-3)}[lr]
    opt = fastattn.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler("cuda")
    for i in range(3):
        loss = sum((p * p).sum() for p in params)
        scaler.scale(loss).backward()
        if i:       # the first step creates the state
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt.zero_grad()
    assert opt.state[params[0]]["step"].item() == 3


def test_found_inf_flag_summed_over_devices_skips_cleanly():
    """GradScaler sums per-device inf flags: a 2.0 must skip once, not roll the count back twice."""
    params = _params("cpu", sizes=[(5,)])
    opt = fastattn.optim.Adam(params, lr=1e-2)
    _grads(params, 0)
    opt.step()
    before = params[0].detach().clone()
    opt.found_inf = torch.tensor(2.0)
    _grads(params, 1)
    opt.step()
    del opt.found_inf
    assert torch.equal(params[0].detach(), before)
    assert opt.state[params[0]]["step"].item() == 1
    _grads(params, 2)
    opt.step()
    assert torch.isfinite(params[0]).all() and opt.state[params[0]]["step"].item() == 2


def test_params_with_different_histories_never_share_a_step_count():
    """A skipped (inf) step and missing grads can leave params with equal numbers of attempted
    steps but different true step counts; each must use its own bias correction."""
    a, b = _params("cpu", sizes=[(4,), (4,)])
    ra, rb = [p.detach().clone().requires_grad_() for p in (a, b)]
    ours = fastattn.optim.Adam([a, b], lr=1e-2)
    ref = torch.optim.Adam([ra, rb], lr=1e-2, foreach=False)
    # step 1: only a has a grad, and the step is skipped (inf) -> a: 0 steps
    a.grad = torch.ones(4)
    ours.found_inf = torch.tensor(1.0)
    ours.step()
    del ours.found_inf
    # step 2: only b has a grad -> b: 1 step; step 3: both -> a: 1, b: 2
    a.grad, b.grad = None, torch.ones(4)
    ours.step()
    rb.grad = torch.ones(4)
    ref.step()
    a.grad, b.grad = torch.full((4,), 0.5), torch.full((4,), -2.0)
    ra.grad, rb.grad = torch.full((4,), 0.5), torch.full((4,), -2.0)
    ours.step()
    ref.step()
    assert ours.state[a]["step"].item() == 1 and ours.state[b]["step"].item() == 2
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change", ["replace", "zero in place", "delete"])
def test_a_step_count_changed_outside_the_optimizer_is_read_again(change):
    """Resetting one parameter's state mid-training (say after re-initialising a layer) must
    not change the others' bias correction: equal counts are remembered, not re-read, so a
    count replaced or changed in place since the last step has to be noticed."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    ra, rb = (p.detach().clone().requires_grad_() for p in (a, b))
    ours = fastattn.optim.AdamW([a, b], lr=0.1)
    ref = torch.optim.AdamW([ra, rb], lr=0.1, foreach=False)
    for i in range(6):
        for opt, x, y in ((ours, a, b), (ref, ra, rb)):
            opt.zero_grad()
            ((x * (i + 1)).sum() + (y ** 2).sum()).backward()
            opt.step()
            if i == 2:
                if change == "replace":
                    opt.state[x] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(4),
                                    "exp_avg_sq": torch.zeros(4)}
                elif change == "zero in place":
                    for v in opt.state[x].values():
                        v.zero_()
                else:
                    del opt.state[x]
    assert ours.state[a]["step"].item() == 3 and ours.state[b]["step"].item() == 6
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)


def test_load_state_dict_keeps_what_its_hooks_do():
    if not hasattr(torch.optim.Optimizer, "register_load_state_dict_pre_hook"):
        pytest.skip("this torch has no optimizer load_state_dict hooks")
    results = []
    for cls in (fastattn.optim.AdamW, torch.optim.AdamW):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p])
        p.grad = torch.ones(3)
        opt.step()

        def hook(optimizer, sd):
            sd = copy.deepcopy(sd)
            for st in sd["state"].values():
                st["exp_avg"].zero_()
                st["step"].fill_(100.0)
            sd["param_groups"][0]["lr"] = 0.5
            return sd
        def post_hook(optimizer):
            for st in optimizer.state.values():
                st["exp_avg_sq"].fill_(4.0)
        opt.register_load_state_dict_pre_hook(hook)
        opt.register_load_state_dict_post_hook(post_hook)
        opt.load_state_dict(opt.state_dict())
        st = opt.state[p]
        results.append((st["step"].item(), st["exp_avg"].abs().sum().item(),
                        st["exp_avg_sq"].sum().item(), opt.param_groups[0]["lr"]))
    assert results[0] == results[1] == (100.0, 0.0, 12.0, 0.5)


def test_grad_scaler_leaves_the_grads_as_torchs_fused_optimizer_does():
    """After scaler.step the grads are unscaled, as torch.optim leaves them (its unscale_, or the
    fused kernels' write-back); a skipped step leaves them as they were, scaled, as torch's
    fused AdamW does (its single-tensor one, unscaled by GradScaler beforehand, leaves the
    finite ones unscaled: compared for the parameters only). Step 1 overflows in one parameter
    only, so that the others' gradients are finite and tell the two behaviours apart."""
    ours_p = _params("cpu", sizes=[(5,), (3, 4)])
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    fused_p = [p.detach().clone().requires_grad_() for p in ours_p]
    runs = [(fastattn.optim.AdamW(ours_p, lr=1e-2), ours_p),
            (torch.optim.AdamW(ref_p, lr=1e-2, foreach=False), ref_p)]
    try:
        runs.append((torch.optim.AdamW(fused_p, lr=1e-2, fused=True), fused_p))
    except RuntimeError:    # a torch without the fused CPU AdamW
        fused_p = None
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in runs]
    for step in range(3):
        for (opt, ps), scaler in zip(runs, scalers):
            opt.zero_grad()
            loss = (ps[0] * ps[0]).sum() * (float("inf") if step == 1 else 1.0) + \
                (ps[1] * ps[1]).sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert torch.isfinite(ours_p[0].grad).all() == (step != 1)
        assert torch.isfinite(ours_p[1].grad).all()
        unscaled = 2 * ours_p[1].detach()
        if step == 1:     # skipped: as the backward left it, scaled by 2^10
            torch.testing.assert_close(ours_p[1].grad, unscaled * 2.0 ** 10, rtol=1e-6, atol=0)
            torch.testing.assert_close(ref_p[1].grad, unscaled, rtol=1e-6, atol=0)
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            if step != 1:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            if fused_p is not None:
                torch.testing.assert_close(a.grad, fused_p[i].grad, rtol=1e-6, atol=0,
                                           equal_nan=True)
                torch.testing.assert_close(a, fused_p[i], rtol=1e-6, atol=1e-7)
        assert len({s.get_scale() for s in scalers}) == 1


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided_slice"])
def test_non_contiguous_parameters_step_like_torch(layout):
    g = torch.Generator().manual_seed(5)
    if layout == "channels_last":
        base = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        base = torch.randn(6, 7, generator=g).t()
    else:
        base = torch.randn(6, 8, generator=g)[:, ::2]  # a view into a larger tensor
    ours_p = [base.requires_grad_()]
    ref_p = [ours_p[0].detach().clone().requires_grad_()]
    assert not ours_p[0].is_contiguous()
    ours = fastattn.optim.AdamW(ours_p, lr=1e-2, amsgrad=True)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, amsgrad=True, foreach=False)
    strides = ours_p[0].stride()
    _run(ours, ours_p, steps=4)
    _run(ref, ref_p, steps=4)
    assert ours_p[0].stride() == strides  # stepped in place: the caller's tensor, its layout
    torch.testing.assert_close(ours_p[0], ref_p[0], rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        torch.testing.assert_close(ours.state[ours_p[0]][key], ref.state[ref_p[0]][key],
                                   rtol=1e-6, atol=1e-7)


def test_checkpoints_of_older_torch_releases_load():
    """torch < 1.12 saved `step` as a number, < 1.11 groups without `maximize`: torch.optim
    loads such checkpoints, so this optimizer must too."""
    first = _params("cpu")
    opt = torch.optim.Adam(first, lr=1e-2, foreach=False)
    _run(opt, first, steps=3)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    for group in sd["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable", "fused",
                    "decoupled_weight_decay"):
            group.pop(key, None)
    ours_p = [p.detach().clone().requires_grad_() for p in first]
    ref_p = [p.detach().clone().requires_grad_() for p in first]
    ours = fastattn.optim.Adam(ours_p, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(sd))
    ref = torch.optim.Adam(ref_p, lr=1e-2, foreach=False)
    ref.load_state_dict(copy.deepcopy(sd))
    _run(ours, ours_p, steps=2, start=3)
    _run(ref, ref_p, steps=2, start=3)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ours.state[ours_p[0]]["step"].item() == 5


@pytest.mark.parametrize("case", ["into an fp32 model", "master_weights off"])
def test_a_master_copy_the_group_does_not_keep_is_dropped(case):
    """A master_param in the state of a parameter whose group keeps none (an fp32 parameter,
    or a group whose master_weights was turned off after loading) must not be stepped from:
    the parameter is the weights."""
    params = _params("cpu", dtype=torch.bfloat16, sizes=[(64,)])
    first = fastattn.optim.AdamW(params, lr=1e-2, master_weights=True)
    _run(first, params, steps=3)
    sd = copy.deepcopy(first.state_dict())
    dtype = torch.float32 if case == "into an fp32 model" else torch.bfloat16
    q = [torch.zeros(64, dtype=dtype).requires_grad_()]
    r = [torch.zeros(64, dtype=dtype).requires_grad_()]
    keep = case == "into an fp32 model"
    ours = fastattn.optim.AdamW(q, lr=1e-2, master_weights=keep)
    ours.load_state_dict(copy.deepcopy(sd))
    # expected: the same checkpoint without the master
    ref = fastattn.optim.AdamW(r, lr=1e-2, master_weights=keep)
    ref.load_state_dict({**copy.deepcopy(sd), "state": {0: {
        k: v for k, v in copy.deepcopy(sd)["state"][0].items() if k != "master_param"}}})
    for opt in (ours, ref):     # (the loaded groups' options are the checkpoint's)
        opt.param_groups[0]["master_weights"] = keep
    _run(ours, q, steps=2, start=3)
    _run(ref, r, steps=2, start=3)
    assert q[0].abs().max() < 0.1                 # (the master holds weights of magnitude ~1)
    assert torch.equal(q[0], r[0])
    assert "master_param" not in ours.state[q[0]]
    if case == "into an fp32 model":              # and that is torch's step
        t = [torch.zeros(64).requires_grad_()]
        torch_opt = torch.optim.AdamW(t, lr=1e-2, foreach=False)
        torch_opt.load_state_dict({**copy.deepcopy(sd), "state": {0: {
            k: v for k, v in copy.deepcopy(sd)["state"][0].items() if k != "master_param"}}})
        _run(torch_opt, t, steps=2, start=3)
        torch.testing.assert_close(q[0], t[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_a_one_element_lr_and_a_0_dim_parameter(device, backend):
    """lr as a (1,)-shaped tensor steps a 0-dim parameter as that lr does (no broadcast to
    (1,))."""
    ours_p = [torch.tensor(1.0, device=device).requires_grad_(),
              torch.randn(3, device=device).requires_grad_()]
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = fastattn.optim.AdamW(ours_p, lr=torch.tensor([0.1]))
    # (torch 2.4's own step broadcasts as the reference backend did: its lr is 0-dim)
    ref = torch.optim.AdamW(ref_p, lr=torch.tensor(0.1), foreach=False)
    with fastattn.use_backend(backend):
        _run(ours, ours_p, steps=3)
    _run(ref, ref_p, steps=3)
    for a, b in zip(ours_p, ref_p):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b.to(a.device), rtol=1e-6, atol=1e-7)
    assert ours.state[ours_p[0]]["step"].item() == 3


def test_a_checkpoint_without_amsgrad_loads_as_into_torch():
    first = _params("cpu")
    opt = torch.optim.Adam(first, lr=1e-2, foreach=False)
    _run(opt, first, steps=2)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["amsgrad"]
    ours_p = [p.detach().clone().requires_grad_() for p in first]
    ref_p = [p.detach().clone().requires_grad_() for p in first]
    ours, ref = fastattn.optim.Adam(ours_p), torch.optim.Adam(ref_p, foreach=False)
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(copy.deepcopy(sd))
    _run(ours, ours_p, steps=2, start=2)
    _run(ref, ref_p, steps=2, start=2)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_master_copy_that_no_longer_matches_its_parameter_is_reseeded():
    """A bf16 checkpoint that went through torch.optim (no master weights: it steps the bf16
    parameter and carries `master_param` along untouched) must not pull the parameter back to
    the stale master; a master that still rounds to its parameter is kept at full precision."""
    params = _params("cpu", dtype=torch.bfloat16, sizes=[(64,)])
    ours = fastattn.optim.AdamW(params, lr=1e-2, master_weights=True)
    _run(ours, params, steps=3)
    sd = copy.deepcopy(ours.state_dict())
    master = sd["state"][0]["master_param"].clone()
    assert not torch.equal(master, params[0].detach().float())  # it holds more than bf16

    # the same checkpoint, the same parameter: the master is kept (resume is exact)
    twin = [params[0].detach().clone().requires_grad_()]
    resumed = fastattn.optim.AdamW(twin, lr=1e-2, master_weights=True)
    resumed.load_state_dict(copy.deepcopy(sd))
    _run(resumed, twin, steps=1, start=3)
    _run(ours, params, steps=1, start=3)
    assert torch.equal(twin[0], params[0])
    assert torch.equal(resumed.state[twin[0]]["master_param"], ours.state[params[0]]["master_param"])

    # through torch.optim: five bf16 steps, then back; loaded before the model's weights
    moved = [params[0].detach().clone().requires_grad_()]
    torch_opt = torch.optim.AdamW(moved, lr=1e-2, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(ours.state_dict()))
    _run(torch_opt, moved, steps=5, start=4)
    fresh = [torch.zeros_like(moved[0]).requires_grad_()]
    back = fastattn.optim.AdamW(fresh, lr=1e-8, master_weights=True)
    back.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for group in back.param_groups:
        group["lr"] = 1e-8
    with torch.no_grad():
        fresh[0].copy_(moved[0])  # the model's weights loaded after the optimizer's state
    fresh[0].grad = torch.zeros_like(fresh[0])
    back.step()
    torch.testing.assert_close(fresh[0], moved[0], rtol=0, atol=0)
    assert torch.equal(back.state[fresh[0]]["master_param"].to(torch.bfloat16), moved[0].detach())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("master", [False, True], ids=["fp32-amsgrad", "bf16-master"])
def test_many_tensors_across_launches(backend, master):
    """150 tensors, 125 of them non-empty (the CUDA kernel launches at most 56 at a time: three
    launches, a multi-chunk tensor last in the first and first in the second), sizes on both
    sides of the kernels' 65536-element chunks: each tensor and its moments step like torch's
    own AdamW."""
    sizes = [(65537,), (0,), (3 * 65536 - 5,), (1,), (200_003,), (65536,)] * 25
    assert sum(n > 0 for (n,) in sizes) > 2 * 56
    dtype = torch.bfloat16 if master else torch.float32
    ours_p = _params("cuda", dtype, sizes, seed=5)
    ref_p = [p.detach().float().clone().requires_grad_() for p in ours_p]
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=not master)
    ours = fastattn.optim.AdamW(ours_p, master_weights=master, **kwargs)
    ref = torch.optim.AdamW(ref_p, foreach=False, **kwargs)
    for i in range(3):
        _grads(ours_p, i)
        for p, q in zip(ours_p, ref_p):
            q.grad = p.grad.float()
        with fastattn.use_backend(backend):
            ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        got = ours.state[p]["master_param"] if master else p
        torch.testing.assert_close(got, q.detach(), rtol=1e-6, atol=1e-7)
        if master:   # the bf16 parameter is its master copy rounded
            assert torch.equal(p, got.to(torch.bfloat16))
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if not master else ())
        for key in keys:
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)
