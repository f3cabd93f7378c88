"""Every fastattn op passes torch.library.opcheck and compiles with fullgraph=True on CPU."""

import pytest
import torch
import torch.nn.functional as F

import fastattn

ops = torch.ops.fastattn

# torch 2.4 cannot compile an op that mutates a Tensor[] argument (AOTAutograd: "a custom
# operator whose output has alias annotations"), and its dynamo cannot trace an optimizer's
# step: there fastattn's optimizer ops run eagerly and trace with fake tensors, nothing more.
# torch 2.5 compiles both (checked by hand with 2.5.1; CI runs 2.4.1 and the newest).
LIST_MUTATION_COMPILES = torch.__version__ >= "2.5"
_LIST_MUTATING = ("adam", "scale_grads")


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 33, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (8,), generator=g)
    t[1] = -100
    w = torch.rand(33, generator=g) + 0.5
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    W = torch.randn(33, 16, generator=g, requires_grad=True)
    b = torch.randn(33, generator=g, requires_grad=True)
    r = torch.randn(8, generator=g)
    import fastattn.ops.adam  # noqa: F401  (registers fastattn::adam_step_)
    import fastattn.ops.grad_norm  # noqa: F401  (registers grad_norm, scale_grads_)
    ps = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]
    adam = ([p.clone() for p in ps], [torch.randn_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [], torch.tensor(1.0), torch.tensor(1e-3),
            0.9, 0.999, 1e-8, 0.01, True, True, False, torch.tensor(0.5), torch.tensor(0.0))
    q = torch.randn(2, 4, 9, 16, generator=g, requires_grad=True)
    kv = torch.randn(2, 2, 11, 16, generator=g, requires_grad=True)
    bias = torch.randn(1, 1, 9, 11, generator=g).expand(2, 4, 9, 11)
    out, lse = ops.attention_fwd(q.detach(), kv.detach(), kv.detach(), None, 0.25, 2, -1, 0, 0.0,
                                 0.0, 0, False)
    qv = torch.randn(12, 4, 16, generator=g, requires_grad=True)
    kvv = torch.randn(15, 2, 16, generator=g, requires_grad=True)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 15], dtype=torch.int32)
    cache = torch.randn(2, 2, 20, 16, generator=g)
    import fastattn.ops.ffn  # noqa: F401  (registers the FFN ops)
    fx = torch.randn(6, 8, generator=g, requires_grad=True)
    fw1 = torch.randn(12, 8, generator=g, requires_grad=True)
    fb1 = torch.randn(12, generator=g, requires_grad=True)
    fw2 = torch.randn(8, 12, generator=g, requires_grad=True)
    fw3 = torch.randn(12, 8, generator=g, requires_grad=True)
    fh = torch.randn(6, 12, generator=g)
    fdo = torch.randn(6, 8, generator=g)
    import fastattn.ops.norm  # noqa: F401  (registers the norm ops)
    nx = torch.randn(5, 24, generator=g, requires_grad=True)
    nr = torch.randn(5, 24, generator=g, requires_grad=True)
    nw = (torch.rand(24, generator=g) + 0.5).requires_grad_()
    nb = torch.randn(24, generator=g, requires_grad=True)
    _, ns, nmean, nrstd = ops.norm_fwd(nx.detach(), nr.detach(), None, None, 1e-5, False,
                                       torch.float32)
    return [
        ("norm_residual", ops.norm_fwd.default, (nx, nr, nw, nb, 1e-5, False, torch.float32)),
        ("norm_rms_bf16_out", ops.norm_fwd.default,
         (nx.detach().bfloat16().requires_grad_(), None, nw, None, 1e-6, True, torch.bfloat16)),
        ("norm_bwd", ops.norm_bwd.default,
         (torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g), ns, nw.detach(),
          nmean, nrstd, False, True, True, None)),
        ("norm_bwd_transposed_s_fp32_dx", ops.norm_bwd.default,
         (torch.randn(5, 24, generator=g), None, ns.t().contiguous().t(), nw.detach(), nmean,
          nrstd, False, True, False, torch.float32)),
        ("norm_bwd_bf16_dx", ops.norm_bwd.default,
         (torch.randn(5, 24, generator=g).bfloat16(), None, ns, None, nmean.new_empty(0), nrstd,
          True, False, False, torch.bfloat16)),
        ("mlp", ops.mlp_fwd.default, (fx, fw1, fb1, fw2, None, "gelu")),
        ("mlp_bwd", ops.mlp_bwd.default,
         (fdo, fx.detach(), fw1.detach(), fh, fw2.detach(), "silu", True, False)),
        ("swiglu", ops.swiglu_fwd.default, (fx, fw1, fw3, fw2, None, fb1, None, "silu")),
        ("swiglu_bwd", ops.swiglu_bwd.default,
         (fdo, fx.detach(), fw1.detach(), fw3.detach(), fw2.detach(), fh, fh * 2, "gelu_tanh",
          False, True, True)),
        ("attn", ops.attention_fwd.default, (q, kv, kv, None, 0.25, 2, -1, 0, 0.0, 0.0, 0, False)),
        ("attn_bias_window_softcap_dropout", ops.attention_fwd.default,
         (q, kv, kv, bias, 0.25, 0, 3, 2, 5.0, 0.2, 7, True)),
        ("attn_bwd", ops.attention_bwd.default,
         (torch.randn_like(out), q.detach(), kv.detach(), kv.detach(), out, lse, None, 0.25, 2,
          -1, 0, 0.0, 0.0, 0, False)),
        ("varlen", ops.varlen_attention_fwd.default, (qv, kvv, kvv, cu_q, cu_k, 7, 9, 0.25, True)),
        ("decode", ops.decode_attention.default,
         (q.detach()[:, :, :2], cache, cache, torch.tensor([7, 20], dtype=torch.int32), 0.25, 0)),
        ("adam", ops.adam_step_.default, adam),
        ("grad_norm", ops.grad_norm.default, ([p.clone() for p in ps], 2.0)),
        ("grad_norm_inf", ops.grad_norm.default, ([p.clone() for p in ps], float("inf"))),
        ("scale_grads", ops.scale_grads_.default, ([p.clone() for p in ps], 1.0, torch.tensor(9.0))),
        ("ce_mean", ops.cross_entropy_fwd.default, (x, t, None, -100, 0.1, 0.0, "mean", True)),
        ("ce_none_weight_z", ops.cross_entropy_fwd.default, (x, t, w, -100, 0.0, 1e-3, "none", True)),
        ("ce_fp16_weight_mean", ops.cross_entropy_fwd.default,
         (x.detach().half().requires_grad_(), t, w, -100, 0.1, 0.0, "mean", True)),
        ("ce_nograd", ops.cross_entropy_fwd.default, (x.detach(), t, None, -100, 0.0, 0.0, "sum", False)),
        ("ce_inplace", ops.cross_entropy_fwd_inplace.default,
         (x.detach().clone(), t, None, -100, 0.0, 0.0, "mean")),
        ("logprobs", ops.token_logprobs_fwd.default, (x, t, -100, 0.5, True)),
        ("logprobs_bwd", ops.token_logprobs_bwd.default,
         (r, r * 2, x.detach(), t, r.abs(), r.abs(), -100, 0.5)),
        ("lce_mean", ops.linear_cross_entropy_fwd.default,
         (h, W, t, b, -100, 0.0, "mean", 3, False, True, True, False)),
        # d weight and d bias summed in their own bf16 over the token chunks
        ("lce_own_dtype", ops.linear_cross_entropy_fwd.default,
         (h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_(), t,
          b.detach().bfloat16().requires_grad_(), -100, 0.0, "sum", 3, False, True, True, True)),
        ("lce_none", ops.linear_cross_entropy_fwd.default,
         (h, W, t, None, -100, 0.1, "none", 3, False, True, True, False)),
        ("lce_bwd", ops.linear_cross_entropy_bwd.default,
         (r, h.detach(), W.detach(), t, b.detach(), None, -100, 0.0, 3, True, True, False)),
        # float16 "mean": the gradients are left to backward (0-d grad_output / N there)
        ("lce_fp16_mean", ops.linear_cross_entropy_fwd.default,
         (h.detach().half().requires_grad_(), W.detach().half().requires_grad_(), t, None, -100,
          0.0, "mean", 3, False, True, True, False)),
        ("lce_bwd_scalar", ops.linear_cross_entropy_bwd.default,
         (r.sum() / 5, h.detach(), W.detach(), t, b.detach(), None, -100, 0.0, 3, True, True,
          False)),
        ("lce_vocab_mean", ops.linear_cross_entropy_fwd.default,
         (h, W, t, b, -100, 0.1, "mean", 7, True, True, True, False)),
        ("lce_vocab_none", ops.linear_cross_entropy_fwd.default,
         (h, W, t, None, -100, 0.1, "none", 7, True, True, True, False)),
        ("lce_vocab_bwd", ops.linear_cross_entropy_bwd.default,
         (r, h.detach(), W.detach(), t, b.detach(), r.abs() + 3, -100, 0.1, 7, True, True,
          False)),
        ("ltlp", ops.linear_token_logprobs_fwd.default, (h, W, t, b, -100, 1.0, True, 5, False,
                                                             False)),
        ("ltlp_bwd", ops.linear_token_logprobs_bwd.default,
         (r, None, h.detach(), W.detach(), t, None, r.abs(), r.new_empty(0), -100, 1.0, 5, False,
          False, True, True)),
        ("ltlp_vocab", ops.linear_token_logprobs_fwd.default,
         (h, W, t, b, -100, 0.5, True, 7, True, False)),
        ("ltlp_vocab_bwd", ops.linear_token_logprobs_bwd.default,
         (r, r * 2, h.detach(), W.detach(), t, b.detach(), r.abs() + 3, r.abs(), -100, 0.5, 7,
          True, True, True, True)),
    ]


# Eager backward scales the op's gradient output in its own memory (no second logits-sized
# buffer); with a scale other than 1 (float16's deferred 1/N) opcheck's AOT check, which reads
# that output again after backward, sees the scaled values. Compiled gradients are compared
# with eager's by test_compile_fp16_mean_matches_eager instead.
_SCALES_ITS_OUTPUT = {"ce_fp16_weight_mean"}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_opcheck(backend, case):
    name, op, args = case
    kw = {}
    if name in _LIST_MUTATING and not LIST_MUTATION_COMPILES:
        kw["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    if name in _SCALES_ITS_OUTPUT:
        kw["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    with fastattn.use_backend(backend):
        torch.library.opcheck(op, args, **kw)


def _loss_fn(x, h, W, t):
    return (fastattn.cross_entropy(x * 2, t, label_smoothing=0.1)
            + fastattn.cross_entropy(x, t, reduction="none").mean()
            + fastattn.cross_entropy(x - 1, t, inplace_backward=True)
            + fastattn.linear_cross_entropy(h, W, t)
            + fastattn.linear_cross_entropy(h, W, t, reduction="none").sum()
            + fastattn.linear_cross_entropy(h, W, t, chunk_over="vocab", chunk_size=10)
            + fastattn.linear_cross_entropy(h, W, t, reduction="none", chunk_over="vocab").sum()
            + fastattn.token_logprobs(x, t, temperature=0.5).sum()
            + fastattn.linear_token_logprobs(h, W, t, return_entropy=True)[1].sum()
            + fastattn.linear_token_logprobs(h, W, t, return_entropy=True, chunk_over="vocab",
                                             chunk_size=8)[1].sum())


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 33, generator=g, requires_grad=True)
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    W = torch.randn(33, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (8,), generator=g)
    eager = _loss_fn(x, h, W, t)
    grads = torch.autograd.grad(eager, (x, h, W))
    compiled = torch.compile(_loss_fn, fullgraph=True)(x, h, W, t)
    cgrads = torch.autograd.grad(compiled, (x, h, W))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


def test_compile_fp16_mean_matches_eager():
    """float16 "mean" defers the 1/N to backward (with class weights too, and for the linear
    loss by recomputing): compiled forward and gradients equal eager's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 33, generator=g).half().requires_grad_()
    h = torch.randn(8, 16, generator=g).half().requires_grad_()
    W = (torch.randn(33, 16, generator=g) / 4).half().requires_grad_()
    t = torch.randint(0, 33, (8,), generator=g)
    t[3] = -100
    w = torch.rand(33, generator=g) + 0.5

    def fn(x, h, W):
        return (fastattn.cross_entropy(x, t, w, label_smoothing=0.1).float()
                + fastattn.cross_entropy(x * 2, t).float()
                + fastattn.linear_cross_entropy(h, W, t, chunk_size=3).float()
                + fastattn.linear_cross_entropy(h, W, t, chunk_over="vocab",
                                                chunk_size=10).float())
    eager = fn(x, h, W)
    grads = torch.autograd.grad(eager * 100, (x, h, W))
    compiled = torch.compile(fn, fullgraph=True)(x, h, W)
    cgrads = torch.autograd.grad(compiled * 100, (x, h, W))
    # the compiler may keep each loss in fp32 where eager rounds it to fp16 before the sum
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


def test_compile_no_graph_break_counter():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.tensor([1, 2, 3, 4])
    fn = torch.compile(lambda x, t: fastattn.cross_entropy(F.gelu(x), t, z_loss=1e-4))
    fn(x, t).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_ffn_fullgraph_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w1, w3 = (torch.randn(12, 8, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(8, 12, generator=g, requires_grad=True)
    b1 = torch.randn(12, generator=g, requires_grad=True)

    def fn(x, w1, b1, w2, w3):
        return (fastattn.mlp(x, w1, b1, w2, activation="relu2").sum()
                + fastattn.swiglu(x, w1, w3, w2).sum())
    eager = fn(x, w1, b1, w2, w3)
    grads = torch.autograd.grad(eager, (x, w1, b1, w2, w3))
    compiled = torch.compile(fn, fullgraph=True)(x, w1, b1, w2, w3)
    cgrads = torch.autograd.grad(compiled, (x, w1, b1, w2, w3))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


def test_compile_transposed_weights_and_inputs_match_eager():
    """Weights stored transposed (GPT-2's Conv1D layout) and a transposed fp16 norm input: the
    ops' fake kernels must give the strides of their real outputs (contiguous gradients), which
    inductor checks when it runs the compiled graph (empty_like(weight) in a fake gave the
    weight's transposed strides: an AssertionError there, eager and aot_eager being fine)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w1 = torch.randn(8, 12, generator=g).t().requires_grad_()
    w2 = torch.randn(12, 8, generator=g).t().requires_grad_()
    w3 = torch.randn(8, 12, generator=g).t().requires_grad_()
    W = torch.randn(8, 33, generator=g).t().requires_grad_()
    t = torch.randint(0, 33, (6,), generator=g)
    xn = torch.randn(24, 5, generator=g).half().t().requires_grad_()

    def fn(x, w1, w2, w3, W, xn):
        return (fastattn.mlp(x, w1, None, w2).sum() + fastattn.swiglu(x, w1, w3, w2).sum()
                + fastattn.linear_cross_entropy(x, W, t)
                + fastattn.linear_cross_entropy(x, W, t, chunk_over="vocab", chunk_size=16)
                + fastattn.linear_token_logprobs(x, W, t).sum()
                + fastattn.rms_norm(xn, 24, out_dtype=torch.float32).square().sum())
    leaves = (x, w1, w2, w3, W, xn)
    eager = fn(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(fn, fullgraph=True)(*leaves)     # inductor
    cgrads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(torch.__version__ < "2.5", reason="torch 2.4's dynamo writes a guard it "
                    "cannot evaluate under dynamic=True (name 'FloatTrueDiv' is not defined): "
                    "every call recompiles, whatever the op")
def test_varlen_max_seqlen_stays_symbolic_under_dynamic_compile():
    """Packed batches change max_seqlen every step: compiled with dynamic=True, one graph
    serves them (operator.index on it specialized the graph to each value, and fullgraph hit
    the recompile limit at the ninth length)."""
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]     # (not cleared by reset())
    compiled_before = graphs["unique_graphs"]
    fn = torch.compile(lambda q, cu, m: fastattn.varlen_attention(q, q, q, cu, cu, m, m,
                                                                  causal=True),
                       fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(7)
    for m in range(3, 14):
        q = torch.randn(m + 2, 2, 8, generator=g)
        cu = torch.tensor([0, 2, m + 2], dtype=torch.int32)
        torch.testing.assert_close(
            fn(q, cu, m), fastattn.varlen_attention(q, q, q, cu, cu, m, m, causal=True))
    assert 1 <= graphs["unique_graphs"] - compiled_before <= 3, dict(graphs)


@pytest.mark.skipif(not hasattr(torch, "export") or torch.__version__ < "2.5",
                    reason="non-strict torch.export (the default) arrived in torch 2.5")
def test_export_with_a_dynamic_token_dimension():
    """The wrappers keep a symbolic token count symbolic (x.shape[:-1].numel() made it a
    constant outside dynamo: non-strict export refused the dynamic dimension)."""
    from torch.export import Dim, export
    g = torch.Generator().manual_seed(8)
    w1, w3 = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    w2, W = torch.randn(16, 24, generator=g), torch.randn(37, 16, generator=g)

    class M(torch.nn.Module):
        def forward(self, x, t):
            h = fastattn.mlp(x, w1, None, w2) + fastattn.swiglu(x, w1, w3, w2)
            return (fastattn.linear_cross_entropy(h, W, t)
                    + fastattn.linear_token_logprobs(h, W, t).sum())

    T = Dim("T", min=2, max=64)
    x, t = torch.randn(2, 10, 16, generator=g), torch.randint(0, 37, (2, 10), generator=g)
    ep = export(M(), (x, t), dynamic_shapes={"x": {1: T}, "t": {1: T}})
    x2, t2 = torch.randn(2, 13, 16, generator=g), torch.randint(0, 37, (2, 13), generator=g)
    torch.testing.assert_close(ep.module()(x2, t2), M()(x2, t2))


def test_compile_norm_fullgraph_matches_eager():
    """The norms with the residual add and a bf16 output, compiled with the eager glue around
    them (what a compiled GPT block does)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x, branch = (torch.randn(2, 5, 24, generator=g, requires_grad=True) for _ in range(2))
    w, b = torch.randn(24, generator=g, requires_grad=True), torch.randn(24, generator=g,
                                                                          requires_grad=True)

    def fn(x, branch, w, b):
        y, s = fastattn.layer_norm(branch * 2, 24, w, b, residual=x, out_dtype=torch.bfloat16)
        z, s2 = fastattn.rms_norm(y.float().relu(), 24, w, residual=s)
        # rows that are a transposed view (backward's d input is contiguous all the same)
        t = fastattn.layer_norm(s.reshape(10, 24).t().contiguous().t(), 24, w)
        return (z * s2).sum() + fastattn.layer_norm(s, [24]).square().sum() + t.square().sum()
    leaves = (x, branch, w, b)
    eager = fn(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(fn, fullgraph=True)(*leaves)
    cgrads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


def test_compile_dynamic_gpt_step_matches_eager():
    """dynamic=True makes module float attributes (a norm's eps) symbolic: the ops' argument
    checks must trace them (math.isfinite on one broke the graph)."""
    from fastattn.models.gpt import GPT, GPTConfig
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, d_model=64, vocab_size=97, max_seq_len=32),
                backend="fastattn")
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randint(0, 97, (2, 8), generator=g) for _ in range(2))
    params = list(model.parameters())
    compiled = torch.compile(model, fullgraph=True, dynamic=True)(x, y)
    cgrads = torch.autograd.grad(compiled, params)
    eager = model(x, y)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, torch.autograd.grad(eager, params)):
        torch.testing.assert_close(a, e)


def _attention_fn(q, k, v, mask, qv, kv, cu_q, cu_k):
    return (fastattn.flash_attention(q, k, v, causal=True, window=(5, -1), softcap=3.0).sum()
            + fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum()
            + fastattn.varlen_attention(qv, kv, kv, cu_q, cu_k, 7, 9, causal=True).sum())


def test_compile_attention_fullgraph_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 9, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 11, 16, generator=g, requires_grad=True)
    mask = torch.rand(9, 11, generator=g) > 0.2
    qv = torch.randn(12, 4, 16, generator=g, requires_grad=True)
    kv = torch.randn(15, 2, 16, generator=g, requires_grad=True)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 15], dtype=torch.int32)
    args = (q, k, v, mask, qv, kv, cu_q, cu_k)
    eager = _attention_fn(*args)
    grads = torch.autograd.grad(eager, (q, k, v, qv, kv))
    compiled = torch.compile(_attention_fn, fullgraph=True)(*args)
    cgrads = torch.autograd.grad(compiled, (q, k, v, qv, kv))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


def test_compile_decode_and_multihead_attention_fullgraph_match_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 16, generator=g)
    cache = torch.randn(2, 2, 12, 16, generator=g)
    lens = torch.tensor([5, 12], dtype=torch.int32)
    decode = lambda q, c, lens: fastattn.decode_attention(q, c, c, lens)       # noqa: E731
    torch.testing.assert_close(torch.compile(decode, fullgraph=True)(q, cache, lens),
                               decode(q, cache, lens))
    torch.manual_seed(0)
    mha = fastattn.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True

    def fn(x):
        return mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0].sum()
    eager = fn(x)
    grads = torch.autograd.grad(eager, (x, mha.in_proj_weight))
    compiled = torch.compile(fn, fullgraph=True)(x)
    cgrads = torch.autograd.grad(compiled, (x, mha.in_proj_weight))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(cgrads, grads):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(not LIST_MUTATION_COMPILES, reason=f"torch {torch.__version__} cannot compile a step")
@pytest.mark.parametrize("amsgrad,tensor_lr", [(False, False), (True, False), (False, True)])
def test_compile_optimizer_step_and_clip_fullgraph_match_torch(amsgrad, tensor_lr):
    """A compiled fastattn step and clip give torch.optim's eager numbers, over enough steps
    that a step recompiling each time would pass torch's recompile limit (8; fullgraph makes
    that an error): the compiled step is traced a bounded number of times, also when a
    parameter skips a step (its class of equal step counts splits) and rejoins."""
    torch._dynamo.reset()
    import fastattn.optim

    g = torch.Generator().manual_seed(3)
    ps = [torch.randn(5, 3, generator=g, requires_grad=True), torch.randn(7, generator=g, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = fastattn.optim.AdamW(ps, lr=torch.tensor(1e-2) if tensor_lr else 1e-2,
                               weight_decay=0.1, amsgrad=amsgrad)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    step = torch.compile(opt.step, fullgraph=True)
    clip = torch.compile(lambda: fastattn.optim.clip_grad_norm_(ps, 0.5), fullgraph=True)
    graphs = torch._dynamo.utils.counters["stats"]     # (not cleared by reset())
    compiled_before = graphs["unique_graphs"]
    for i in range(14):
        for p, r in zip(ps, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, r.grad = grad.clone(), grad.clone()
        if i == 6:        # the second parameter sits this step out
            ps[1].grad = ref[1].grad = None
        else:
            torch.testing.assert_close(clip(), torch.nn.utils.clip_grad_norm_(ref, 0.5))
        step()
        ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert opt.state[ps[0]]["step"].item() == 14 and opt.state[ps[1]]["step"].item() == 13
    assert 2 <= graphs["unique_graphs"] - compiled_before <= 8, dict(graphs)


@pytest.mark.skipif(not LIST_MUTATION_COMPILES, reason=f"torch {torch.__version__} cannot compile a step")
def test_compiled_and_eager_steps_alternate_without_recompiling():
    """Eager steps check each step count's version (one changed outside the optimizer is read
    again); compiled steps move the versions without recording them. Alternating the two must
    neither re-read the counts nor hand out new step-count keys (the compiled step guards on
    them: 12 switches would pass torch's recompile limit, an error under fullgraph)."""
    torch._dynamo.reset()
    import fastattn.optim

    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(6, generator=g, requires_grad=True) for _ in range(3)]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = fastattn.optim.AdamW(ps, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    graphs = torch._dynamo.utils.counters["stats"]     # (not cleared by reset())
    compiled_before = graphs["unique_graphs"]
    reads = []
    item = torch.Tensor.item

    def counted(t):
        reads.append(t)
        return item(t)
    for i in range(12):
        for p, r in zip(ps, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, r.grad = grad.clone(), grad.clone()
        if i % 2:
            step()
        else:       # (torch.Tensor.item patched only outside the traced step)
            torch.Tensor.item = counted
            try:
                opt.step()
            finally:
                torch.Tensor.item = item
        ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert reads == [], f"{len(reads)} step counts read back after compiled steps"
    assert graphs["unique_graphs"] - compiled_before == 1, dict(graphs)
