"""fastattn._eager: an op's own function called without the dispatcher, only where that changes
nothing but the time; the dispatcher everywhere else."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import _eager


def _inputs(leaves=None):
    """The calls, on seeded inputs; with a list ``leaves``, every floating-point input requires
    grad and is appended to it."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        t = torch.randn(*shape, generator=g)
        if leaves is not None:
            leaves.append(t.requires_grad_())
        return t
    q1, kc, vc = r(2, 4, 1, 16), r(2, 2, 24, 16), r(2, 2, 24, 16)
    lens = torch.tensor([24, 9], dtype=torch.int32)
    q, k, v = r(2, 4, 10, 16), r(2, 2, 10, 16), r(2, 2, 10, 16)
    x = r(5, 12)
    w1, b1, w2, b2 = r(20, 12), r(20), r(12, 20), r(12)
    wv, tgt = r(33, 12), torch.tensor([0, 5, -100, 32, 7])
    logits = r(5, 33)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    qv, kv = r(10, 4, 16), r(10, 2, 16)
    branch, nw, nb = r(5, 12), r(12), r(12)
    return {
        "decode_attention": lambda: fastattn.decode_attention(q1, kc, vc, lens),
        "flash_attention": lambda: fastattn.flash_attention(q, k, v, causal=True),
        "scaled_dot_product_attention": lambda: fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True),
        "varlen_attention": lambda: fastattn.varlen_attention(qv, kv, kv, cu, cu, 7, 7,
                                                              causal=True),
        "mlp": lambda: fastattn.mlp(x, w1, b1, w2, b2, activation="gelu_tanh"),
        "swiglu": lambda: fastattn.swiglu(x, w1, w1 * 0.5, w2),
        "cross_entropy": lambda: fastattn.cross_entropy(logits, tgt, label_smoothing=0.1),
        "linear_cross_entropy": lambda: fastattn.linear_cross_entropy(x, wv, tgt),
        "token_logprobs": lambda: fastattn.token_logprobs(logits, tgt, return_entropy=True),
        "linear_token_logprobs": lambda: fastattn.linear_token_logprobs(x, wv, tgt,
                                                                        return_entropy=True),
        "layer_norm": lambda: fastattn.layer_norm(branch, 12, nw, nb, residual=x),
        "rms_norm": lambda: fastattn.rms_norm(x, 12, nw),
    }


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _FunctionRecorder(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(str(func))
        return func(*args, **(kwargs or {}))


def _fastattn_ops(fn):
    with _OpRecorder() as rec:
        fn()
    return [op for op in rec.ops if op.startswith("fastattn.")]


@pytest.mark.parametrize("name", list(_inputs()))
def test_direct_path_equals_dispatcher_path(name, monkeypatch):
    fn = _inputs()[name]
    taken = []
    real = _eager._route

    def spy(args):
        route = real(args)
        taken.append(route == _eager._DIRECT)
        return route

    monkeypatch.setattr(_eager, "_route", spy)
    with torch.no_grad():
        direct = fn()
        assert taken and all(taken), "the direct path was not taken"
        monkeypatch.setattr(_eager, "ENABLED", False)
        taken.clear()
        through = fn()
        assert taken and not any(taken)
    direct = direct if isinstance(direct, tuple) else (direct,)
    through = through if isinstance(through, tuple) else (through,)
    assert len(direct) == len(through)
    for a, b in zip(direct, through):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(_inputs()))
def test_dispatch_modes_see_the_op(name):
    # Under a TorchDispatchMode (FakeTensorMode, FlopCounterMode, profilers of this kind) the
    # call goes through the dispatcher, so the mode sees fastattn's op by name.
    assert _fastattn_ops(_inputs()[name]), "the op bypassed an active TorchDispatchMode"


@pytest.mark.parametrize("name", ["decode_attention", "mlp", "cross_entropy"])
def test_function_modes_see_the_op(name):
    with _FunctionRecorder() as rec:
        _inputs()[name]()
    assert any(f.startswith("fastattn.") for f in rec.funcs), rec.funcs[-5:]


def test_conditions_that_keep_the_dispatcher(monkeypatch):
    t = torch.randn(3)
    assert _eager.direct_ok((t, 1.0, None, [t, t]))
    assert _eager.direct_ok((torch.nn.Parameter(t),)) is False  # requires grad, grad mode on
    with torch.no_grad():
        assert _eager.direct_ok((torch.nn.Parameter(t),))          # a plain Parameter is fine
    assert not _eager.direct_ok((t.requires_grad_(),))
    t = t.detach()
    assert not _eager.direct_ok(([t, t.clone().requires_grad_()],))  # a tensor in a list
    assert not _eager.direct_ok((torch.empty(3, device="meta"),))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(t)
    assert not _eager.direct_ok((fake,))
    with _OpRecorder():
        assert not _eager.direct_ok((t,))
    with _FunctionRecorder():
        assert not _eager.direct_ok((t,))
    assert not _eager.direct_ok((t.to_sparse(),))
    assert not _eager.direct_ok((torch.nested.nested_tensor([t, t[:2]]),))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not _eager.direct_ok((t,))
    seen = []
    torch.func.vmap(lambda row: seen.append(_eager.direct_ok((row,))) or row)(torch.randn(2, 3))
    assert seen == [False]
    monkeypatch.setattr(_eager, "ENABLED", False)
    assert not _eager.direct_ok((t,))


def test_profiler_names_the_op():
    # The profiler is on: the dispatcher path, so the op's name is in the trace.
    q1, kc = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 8, 8)
    lens = torch.tensor([8], dtype=torch.int32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fastattn.decode_attention(q1, kc, kc, lens)
    assert any("fastattn::decode_attention" in e.name for e in prof.events())


@pytest.mark.parametrize("name", ["mlp", "linear_token_logprobs", "flash_attention"])
def test_direct_autograd_some_inputs_frozen(name, monkeypatch):
    """Only some inputs require grad (frozen features, or a frozen query): the formulas read
    ctx.needs_input_grad, which must be each input's own on the direct path as through the
    dispatcher; the same gradients, and None where no gradient is asked for."""
    g = torch.Generator().manual_seed(2)
    x, w1, w2 = torch.randn(5, 12, generator=g), torch.randn(20, 12, generator=g), \
        torch.randn(12, 20, generator=g)
    wv, bv, tgt = torch.randn(33, 12, generator=g), torch.randn(33, generator=g), \
        torch.tensor([0, 5, 1, 32, 7])
    q, k = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    calls = {
        "mlp": ((x, w1, w2), (1, 2), lambda x, w1, w2: fastattn.mlp(x, w1, None, w2, None)),
        "linear_token_logprobs": ((x, wv, bv), (1, 2), lambda x, w, b:
                                  fastattn.linear_token_logprobs(x, w, tgt, b,
                                                                 return_entropy=True)),
        "flash_attention": ((q, k, k.clone()), (1,), lambda q, k, v: fastattn.flash_attention(
            q, k, v, causal=True)),
    }
    inputs, trained, fn = calls[name]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_eager, "ENABLED", enabled)
        leaves = [t.detach().clone().requires_grad_(i in trained) for i, t in enumerate(inputs)]
        out = fn(*leaves)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        results.append([t.grad for t in leaves])
    for i, (a, b) in enumerate(zip(*results)):
        assert (a is None) == (b is None) == (i not in trained), (i, a is None, b is None)
        if a is not None:
            assert torch.equal(a, b)


def _formula_node(t):
    """The name of the autograd node of the op's formula behind ``t`` (through views)."""
    node = t.grad_fn
    while type(node).__name__.startswith(("View", "Unsqueeze", "Squeeze", "Reshape", "Select")):
        node = node.next_functions[0][0]
    return type(node).__name__


def test_gradients_flow_through_either_path(monkeypatch):
    # requires_grad with grad mode on: the op's autograd formula, as an autograd.Function
    # (direct) or through the dispatcher (FASTATTN_EAGER_DIRECT=0); the same gradients.
    x = torch.randn(4, 6, requires_grad=True)
    w1, w2 = torch.randn(8, 6), torch.randn(6, 8)
    ref = x.detach().requires_grad_()
    F.linear(F.relu(F.linear(ref, w1)), w2).sum().backward()
    for enabled, grad_fn in ((True, "fastattn_mlp_fwd_DirectBackward"),
                             (False, "GeneratedBackwardFor")):
        monkeypatch.setattr(_eager, "ENABLED", enabled)
        x.grad = None
        out = fastattn.mlp(x, w1, None, w2, None, activation="relu")
        assert _formula_node(out).startswith(grad_fn), _formula_node(out)
        out.sum().backward()
        torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("name", [n for n in _inputs() if n != "decode_attention"])
def test_direct_autograd_equals_dispatcher_autograd(name, monkeypatch):
    """With gradients to record, the direct path (the op's registered formula run as an
    autograd.Function, its backward op called without the dispatcher) gives bitwise the outputs
    and gradients of the dispatcher's path."""
    called = []
    real_call = _eager.call
    monkeypatch.setattr(_eager, "call", lambda op, *args: called.append(
        _eager._FUNCTIONS[id(op)][0]) or real_call(op, *args))

    def run(enabled):
        monkeypatch.setattr(_eager, "ENABLED", enabled)
        leaves = []
        result = _inputs(leaves)[name]()
        outs = [t for t in (result if isinstance(result, tuple) else (result,))
                if t.requires_grad]
        weights = [torch.linspace(-1, 1, o.numel()).reshape(o.shape) for o in outs]
        grads = torch.autograd.grad(outs, leaves, weights, allow_unused=True)
        return outs, grads, {_formula_node(o) for o in outs}

    direct, direct_grads, direct_fns = run(True)
    assert len(direct_fns) == 1 and direct_fns.pop().endswith("_DirectBackward"), direct_fns
    if name not in ("cross_entropy", "linear_cross_entropy"):  # those only scale in backward
        assert any(c.endswith("_bwd") for c in called), called  # the backward op, via call()
    through, through_grads, through_fns = run(False)
    assert all(f.startswith("GeneratedBackwardFor") for f in through_fns), through_fns
    assert any(g is not None for g in direct_grads)
    for a, b in zip(direct + list(direct_grads), through + list(through_grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("name", ["flash_attention", "mlp", "linear_token_logprobs"])
def test_forward_mode_ad_raises(name):
    # No forward-mode rule: a clear error, not the zero tangent the dispatcher would give.
    import torch.autograd.forward_ad as fwAD
    x, w1, w2 = torch.randn(5, 12), torch.randn(20, 12), torch.randn(12, 20)
    q = torch.randn(1, 2, 6, 8)
    call = {
        "flash_attention": lambda t: fastattn.flash_attention(t, q, q),
        "mlp": lambda t: fastattn.mlp(t, w1, None, w2, None),
        "linear_token_logprobs": lambda t: fastattn.linear_token_logprobs(
            t, torch.randn(33, 12), torch.tensor([0, 5, 1, 32, 7])),
    }[name]
    primal = q if name == "flash_attention" else x
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(call, (primal,), (torch.ones_like(primal),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        call(fwAD.make_dual(primal, torch.ones_like(primal)))
    with fwAD.dual_level():     # inputs without tangents: runs as usual
        call(primal)


def _optimizer_calls():
    """The ops that write their arguments (the optimizer step, gradient clipping), called as
    fastattn.optim calls them; each returns the tensors it wrote."""
    from fastattn.ops import adam as adam_op
    from fastattn.ops import grad_norm as grad_norm_op
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(7, generator=g), torch.randn(3, 4, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    step, lr = torch.ones(()), torch.tensor(1e-2)

    def adam():
        _eager.call(adam_op.adam_step_, params, grads, m, v, [], [], step, lr, 0.9, 0.999, 1e-8,
                    0.01, True, False, False, None, None)
        return params + m + v

    def clip():
        norm = _eager.call(grad_norm_op.grad_norm, grads, 2.0)
        _eager.call(grad_norm_op.scale_grads_, grads, 0.5, norm)
        return grads
    return {"adam_step_": adam, "scale_grads_": clip}


@pytest.mark.parametrize("name", ["adam_step_", "scale_grads_"])
def test_written_arguments_get_new_versions_on_either_path(name, monkeypatch):
    """An op that writes its arguments bumps their version counters on the direct path as the
    dispatcher does (autograd's check that a saved tensor was not changed in place relies on it),
    and writes the same numbers."""
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_eager, "ENABLED", enabled)
        call = _optimizer_calls()[name]
        with torch.no_grad():
            written = call()                 # the first call: the state as the call leaves it
            before = [t._version for t in written]
            written = call()
        assert all(t._version > b for t, b in zip(written, before)), (enabled, before)
        results.append([t.clone() for t in written])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_in_place_step_on_a_saved_parameter_is_caught():
    # The autograd error a version bump exists for: a parameter saved for backward, stepped
    # in place before the backward (the direct path: no grad mode, plain tensors).
    from fastattn.ops import adam as adam_op
    w = torch.randn(3, requires_grad=True)
    loss = (w * w).sum()                      # saves w
    with torch.no_grad():
        _eager.call(adam_op.adam_step_, [w], [torch.ones(3)], [torch.zeros(3)],
                    [torch.zeros(3)], [], [], torch.ones(()), torch.tensor(0.1), 0.9, 0.999,
                    1e-8, 0.0, True, False, False, None, None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


_SECOND_ORDER = {
    "layer_norm": lambda x: fastattn.layer_norm(x, 16),
    "rms_norm": lambda x: fastattn.rms_norm(x, 16, residual=x.detach()),
    "mlp": lambda x: fastattn.mlp(x, torch.randn(40, 16), torch.randn(40), torch.randn(16, 40)),
    "swiglu": lambda x: fastattn.swiglu(x, torch.randn(40, 16), torch.randn(40, 16),
                                        torch.randn(16, 40)),
    "flash_attention": lambda x: fastattn.flash_attention(*(x.view(1, 2, 3, 8),) * 3, causal=True),
    "varlen_attention": lambda x: fastattn.varlen_attention(
        *(x.view(6, 1, 8),) * 3, torch.tensor([0, 2, 6], dtype=torch.int32),
        torch.tensor([0, 2, 6], dtype=torch.int32), 4, 4),
    "token_logprobs": lambda x: fastattn.token_logprobs(x, torch.tensor([1, 2, 3])),
    "linear_token_logprobs": lambda x: fastattn.linear_token_logprobs(
        x, torch.randn(20, 16), torch.tensor([1, 2, 3])),
}


@pytest.mark.parametrize("name", sorted(_SECOND_ORDER))
def test_double_backward_is_refused_by_name(name):
    """Differentiating these ops' gradients again is not supported: it must say so, naming
    the function called (not a backward op the user never called), with what to use instead."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, requires_grad=True)
    out = _SECOND_ORDER[name](x)
    out = out[0] if isinstance(out, tuple) else out
    g, = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name}.*cannot be differentiated again.*use "):
        g.sum().backward()
