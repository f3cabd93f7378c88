"""The reference GPT: both backends agree (outputs, losses, every gradient), share one
state_dict, the KV cache matches full recomputation, presets and errors."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.models import GPT, PRESETS, GPTConfig, config
from fastattn.models import gpt as gpt_module

# Small on purpose: odd vocab, odd sequence lengths, both norm/mlp/position kinds, GQA, tied
# and untied heads.
CONFIGS = {
    "gelu-learned-layernorm": GPTConfig(n_layer=2, n_head=4, d_model=64, vocab_size=97,
                                        max_seq_len=40, norm="layernorm", mlp="gelu",
                                        positions="learned", bias=True, tie_embeddings=True),
    "swiglu-rope-rmsnorm-gqa": GPTConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                         vocab_size=97, max_seq_len=40, norm="rmsnorm",
                                         mlp="swiglu", positions="rope", bias=False,
                                         tie_embeddings=False),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(cfg):
    """Two models with the same parameters, one per backend."""
    torch.manual_seed(0)
    a = GPT(cfg, backend="fastattn")
    b = GPT(cfg, backend="torch")
    b.load_state_dict(a.state_dict())
    return a, b


def _tokens(cfg, batch=3, seq=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def _close(got, want, tol=1e-5, msg=""):
    """fp32 agreement: |got - want| <= tol * max(1, max |want|) (sums over many tokens, such as
    bias gradients of size ~100, carry rounding relative to their scale)."""
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{msg}: max error {err:.3g} > {tol} * {scale:.3g}"


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_backends_same_logits_and_grads(name):
    cfg = CONFIGS[name]
    a, b = _pair(cfg)
    idx = _tokens(cfg)
    # grad_output != 1: a fixed random weighting of the logits
    w = torch.randn(idx.shape[0], idx.shape[1], cfg.vocab_size,
                    generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (a, b):
        logits = model(idx)
        assert logits.shape == (*idx.shape, cfg.vocab_size)
        (logits * w).sum().backward()
        outs.append((logits.detach(), _grads(model)))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    assert outs[0][1].keys() == outs[1][1].keys()
    for n in outs[0][1]:
        _close(outs[0][1][n], outs[1][1][n], msg=n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_norms_are_what_the_plain_ones_compute(name, monkeypatch):
    """The fastattn backend's norms with their residual adds fused in (the default) against the
    same model with plain ones (fused_norms=False): same loss and gradients; the fused model
    calls the norm op once per norm (2 per block, the final one), the plain one never."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    fused = GPT(cfg, backend="fastattn")
    plain = GPT(cfg, backend="fastattn", fused_norms=False)
    plain.load_state_dict(fused.state_dict())
    idx, tgt = _tokens(cfg), _tokens(cfg, seed=3)
    import fastattn.ops.norm as norm_ops
    calls = []
    real = norm_ops._norm
    monkeypatch.setattr(norm_ops, "_norm", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    res = []
    for model in (fused, plain):
        del calls[:]
        loss = model(idx, tgt)
        (1.5 * loss).backward()
        res.append((loss.detach(), _grads(model), len(calls)))
    assert res[0][2] == 2 * cfg.n_layer + 1 and res[1][2] == 0
    torch.testing.assert_close(res[0][0], res[1][0], **TOL)
    for n in res[0][1]:
        _close(res[0][1][n], res[1][1][n], msg=n)
    with pytest.raises(TypeError, match="fused_norms must be a bool"):
        GPT(cfg, fused_norms="yes")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_backends_same_loss_and_grads(name):
    cfg = CONFIGS[name]
    a, b = _pair(cfg)
    idx, tgt = _tokens(cfg), _tokens(cfg, seed=3)
    res = []
    for model in (a, b):
        loss = model(idx, tgt)
        assert loss.dim() == 0
        (2.5 * loss).backward()
        res.append((loss.detach(), _grads(model)))
    torch.testing.assert_close(res[0][0], res[1][0], **TOL)
    ref = F.cross_entropy(b(idx).reshape(-1, cfg.vocab_size), tgt.reshape(-1))
    torch.testing.assert_close(res[0][0], ref.detach(), **TOL)
    for n in res[0][1]:
        _close(res[0][1][n], res[1][1][n], msg=n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_against_float64(name):
    """Both fp32 backends are within fp32 error of the float64 model."""
    cfg = CONFIGS[name]
    a, b = _pair(cfg)
    oracle = GPT(cfg, backend="torch").double()
    oracle.load_state_dict(a.state_dict())
    idx, tgt = _tokens(cfg), _tokens(cfg, seed=4)
    with torch.no_grad():
        ref = oracle(idx, tgt)
        for model in (a, b):
            torch.testing.assert_close(model(idx, tgt).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_ignore_index(backend):
    cfg = CONFIGS["swiglu-rope-rmsnorm-gqa"]
    torch.manual_seed(0)
    model = GPT(cfg, backend=backend)
    idx, tgt = _tokens(cfg), _tokens(cfg, seed=5)
    tgt[0, :5] = -100
    tgt[2, 10:] = -100
    logits = model(idx).detach()
    keep = tgt != -100
    expected = F.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(model(idx, tgt), expected, **TOL)
    # another ignore_index value
    tgt7 = torch.where(keep, tgt, torch.full_like(tgt, 7))
    tgt7[keep & (tgt7 == 7)] = 8
    expected7 = F.cross_entropy(logits[keep], tgt7[keep])
    torch.testing.assert_close(model(idx, tgt7, ignore_index=7), expected7, **TOL)


def test_state_dict_identical_across_backends():
    for cfg in CONFIGS.values():
        a, b = _pair(cfg)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert sa[k].shape == sb[k].shape
            assert torch.equal(sa[k], sb[k])
        assert not any("cos" in k or "sin" in k for k in sa)  # rope tables are not state
        # set_backend switches kernels only
        before = {k: v.clone() for k, v in a.state_dict().items()}
        assert a.set_backend("torch") is a and a.backend == "torch"
        after = a.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("src,dst", [("fastattn", "torch"), ("torch", "fastattn")])
def test_checkpoint_across_backends(name, src, dst):
    cfg = CONFIGS[name]
    torch.manual_seed(11)
    model = GPT(cfg, backend=src)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(12)  # a different init, overwritten by the load
    other = GPT(cfg, backend=dst)
    other.load_state_dict(torch.load(buf, weights_only=True))
    idx, tgt = _tokens(cfg), _tokens(cfg, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(other(idx), model(idx), **TOL)
        torch.testing.assert_close(other(idx, tgt), model(idx, tgt), **TOL)
        other.set_backend(src)
        assert torch.equal(other(idx), model(idx))


def test_tied_embeddings():
    a, _ = _pair(CONFIGS["gelu-learned-layernorm"])
    assert a.lm_head.weight is a.wte.weight
    b, _ = _pair(CONFIGS["swiglu-rope-rmsnorm-gqa"])
    assert b.lm_head.weight is not b.wte.weight
    assert isinstance(a.lm_head, torch.nn.Linear) and a.lm_head.bias is None


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_hidden_states(backend):
    cfg = CONFIGS["gelu-learned-layernorm"]
    torch.manual_seed(0)
    model = GPT(cfg, backend=backend)
    idx = _tokens(cfg)
    h = model.hidden_states(idx)
    assert h.shape == (*idx.shape, cfg.d_model)
    torch.testing.assert_close(model.lm_head(h), model(idx))


def _greedy_by_recompute(model, idx, n):
    out = idx
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_generate_greedy_matches_recompute(name, backend):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(cfg, backend=backend)
    # sharper distributions than the 0.02 init, so argmax has clear winners
    with torch.no_grad():
        model.wte.weight.mul_(20)
    prompt = _tokens(cfg, batch=2, seq=5, seed=7)
    n = cfg.max_seq_len - prompt.shape[1]   # fills the context exactly
    got = model.generate(prompt, n, temperature=0)
    assert got.shape == (2, cfg.max_seq_len) and got.dtype == prompt.dtype
    assert torch.equal(got[:, :5], prompt)
    expected = _greedy_by_recompute(model, prompt, n)
    assert torch.equal(got, expected)


def test_generate_same_on_both_backends():
    cfg = CONFIGS["swiglu-rope-rmsnorm-gqa"]
    a, b = _pair(cfg)
    prompt = _tokens(cfg, batch=2, seq=3, seed=8)
    assert torch.equal(a.generate(prompt, 12, temperature=0), b.generate(prompt, 12, temperature=0))


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
def test_generate_seeded_reproducible(backend):
    cfg = CONFIGS["gelu-learned-layernorm"]
    torch.manual_seed(0)
    model = GPT(cfg, backend=backend).train()
    prompt = _tokens(cfg, batch=2, seq=4, seed=9)
    runs = [model.generate(prompt, 10, temperature=0.8, top_k=20,
                           generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    # it samples: another seed, another text, and not the greedy one (10 tokens of 2 rows
    # from the top 20 of a random model: a coincidence has odds below 1e-10)
    assert not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], model.generate(prompt, 10, temperature=0))
    assert runs[0].shape == (2, 14)
    assert ((runs[0] >= 0) & (runs[0] < cfg.vocab_size)).all()
    assert model.training  # restored after generating
    top1 = model.generate(prompt, 6, temperature=1.0, top_k=1,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, model.generate(prompt, 6, temperature=0))
    none = model.generate(prompt, 0)
    assert torch.equal(none, prompt) and none.data_ptr() != prompt.data_ptr()  # a new tensor
    # each module's own mode comes back, not the top-level one everywhere
    model.blocks[0].eval()
    model.generate(prompt, 2)
    assert model.training and not model.blocks[0].training
    assert all(m.training for m in model.blocks[1].modules())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("autocast", [False, True])
def test_generate_device_position_step_matches(name, autocast, monkeypatch):
    # generate()'s CUDA-graph step (positions, ids and cache lengths in device buffers), run
    # here without the capture: the same tokens as the plain decode step, greedy and sampled;
    # under autocast too (the step then casts without autocast's weight cache).
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(cfg, backend="fastattn")
    with torch.no_grad():
        model.wte.weight.mul_(20)
    prompt = _tokens(cfg, batch=3, seq=5, seed=11)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with amp:
        plain = [model.generate(prompt, 20, temperature=0),
                 model.generate(prompt, 20, temperature=0.9,
                                generator=torch.Generator().manual_seed(4))]
    steps = []
    real = gpt_module._DecodeStep

    def spy(*args):
        steps.append(real(*args))
        return steps[-1]
    monkeypatch.setattr(gpt_module, "_DecodeStep", spy)
    monkeypatch.setattr(GPT, "_graph_decode", lambda self, flag, idx: True)
    with amp:
        static = [model.generate(prompt, 20, temperature=0),
                  model.generate(prompt, 20, temperature=0.9,
                                 generator=torch.Generator().manual_seed(4))]
    assert len(steps) == 2 and not steps[0].capture        # taken, and not captured on a CPU
    for a, b in zip(plain, static):
        assert torch.equal(a, b)


def test_generate_cuda_graph_argument():
    cfg = CONFIGS["gelu-learned-layernorm"]
    prompt = _tokens(cfg, batch=1, seq=3)
    for backend in ("fastattn", "torch"):
        with pytest.raises(ValueError, match="cuda_graph=True needs the fastattn backend"):
            GPT(cfg, backend=backend).generate(prompt, 2, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be None or a bool"):
        GPT(cfg).generate(prompt, 2, cuda_graph="yes")
    out = GPT(cfg).generate(prompt, 2, cuda_graph=False)
    assert out.shape == (1, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_generate_cuda_graph_matches_plain_steps(name, dtype):
    # Prefill, then the same tokens through plain decode steps and through the captured and
    # replayed graph (its first call runs eagerly, the next ones replay): logits agree at each.
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(cfg, backend="fastattn").cuda().eval()
    prompt = _tokens(cfg, batch=3, seq=5, seed=11).cuda()
    B, T = prompt.shape
    make = lambda: [gpt_module.KVCache(B, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim)  # noqa: E731
                    for _ in range(cfg.n_layer)]
    plain_caches, graph_caches = make(), make()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype else dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                         enabled=dtype is not None), warnings.catch_warnings():
        warnings.simplefilter("error")      # a failed capture warns: fail the test
        logits = model.lm_head(model._hidden(prompt, 0, plain_caches)[:, -1])
        model._hidden(prompt, 0, graph_caches)
        step = gpt_module._DecodeStep(model, graph_caches, B, prompt.device, True)
        for i in range(6):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model.lm_head(model._hidden(nxt, T + i, plain_caches)[:, -1])
            torch.testing.assert_close(step(nxt, T + i).float(), logits.float(), **tol)
        assert step.graph is not None and step.capture
        # generate() itself: the default captures (>= GRAPH_MIN_TOKENS), same greedy tokens
        plain = model.generate(prompt, 12, temperature=0, cuda_graph=False)
        steps = []
        real = gpt_module._DecodeStep
        gpt_module._DecodeStep = lambda *a: steps.append(real(*a)) or steps[-1]
        try:
            default = model.generate(prompt, 12, temperature=0)
        finally:
            gpt_module._DecodeStep = real
        assert steps and steps[0].graph is not None
        if dtype is None:
            assert torch.equal(default, plain)
        else:   # bf16: near-tied logits may pick another token; the prompt and shape hold
            assert default.shape == plain.shape and torch.equal(default[:, :T], prompt)


@pytest.mark.gpu
def test_generate_cuda_graph_falls_back():
    # The reference backend's decode reads the lengths to the host: its capture fails, and
    # generate() warns, decodes without a graph, and leaves the thread on its own stream.
    cfg = CONFIGS["swiglu-rope-rmsnorm-gqa"]
    torch.manual_seed(0)
    model = GPT(cfg, backend="fastattn").cuda()
    prompt = _tokens(cfg, batch=2, seq=4, seed=3).cuda()
    with fastattn.use_backend("reference"):
        plain = model.generate(prompt, 10, temperature=0, cuda_graph=False)
        gpt_module._warned_capture = False
        with pytest.warns(RuntimeWarning, match="capturing the decode step in a CUDA graph failed"):
            graphed = model.generate(prompt, 10, temperature=0, cuda_graph=True)
    assert torch.equal(plain, graphed)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.equal(model.generate(prompt, 10, temperature=0, cuda_graph=False), plain)


def test_sampling_follows_the_softmax():
    """GPT._sample (inverse CDF): frequencies within 5 sigma of the softmax; top_k and -inf
    logits never sampled; seeded."""
    torch.manual_seed(0)
    logits = torch.randn(3, 12) * 1.5
    logits[:, 9:] = float("-inf")
    p = torch.softmax(logits, dim=-1)
    n = 40000
    g = torch.Generator().manual_seed(1)
    idx = GPT._sample(logits.repeat_interleave(n, dim=0), 1.0, None, g).view(3, n)
    freq = torch.stack([torch.bincount(row, minlength=12) for row in idx]).double() / n
    sigma = (p * (1 - p) / n).sqrt().double()
    assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all()
    assert freq[:, 9:].eq(0).all()
    top = GPT._sample(logits.repeat_interleave(500, dim=0), 0.7, 3, g).view(3, 500)
    allowed = logits.topk(3, dim=-1).indices
    assert all(set(row.tolist()) <= set(a.tolist()) for row, a in zip(top, allowed))
    a = GPT._sample(logits, 1.0, None, torch.Generator().manual_seed(5))
    assert torch.equal(a, GPT._sample(logits, 1.0, None, torch.Generator().manual_seed(5)))
    for bad, t in ((torch.full((1, 4), float("-inf")), 1.0),
                   (torch.tensor([[1.0, float("nan"), 0.0]]), 1.0),
                   (torch.tensor([[1.0, 2.0, 3.0]]), 1e-44)):
        with pytest.raises(ValueError, match="non-finite probabilities"):
            GPT._sample(bad, t, None, None)


def test_presets_build_and_sizes():
    assert set(PRESETS) >= {"tiny", "gpt2-124m", "llama-style-small"}
    with torch.device("meta"):  # no memory, no init time
        sizes = {name: GPT(config(name)) for name in PRESETS}
    gpt2 = sizes["gpt2-124m"]
    assert 123e6 < gpt2.num_params(non_embedding=False) < 125.5e6
    assert 84e6 < gpt2.num_params() < 86e6
    llama = config("llama-style-small")
    assert llama.norm == "rmsnorm" and llama.mlp == "swiglu" and llama.positions == "rope"
    assert llama.kv_heads < llama.n_head and not llama.bias
    assert 1e6 < sizes["tiny"].num_params(non_embedding=False) < 10e6
    # flops: 6N + 12 L d T with N the matmul weights (non-embedding + lm_head)
    c = gpt2.config
    n = gpt2.num_params() + c.vocab_size * c.d_model
    assert gpt2.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    tiny = GPT(config("tiny"))
    idx = torch.randint(0, tiny.config.vocab_size, (2, 16))
    assert tiny(idx, idx).isfinite()


def test_config_overrides_and_presets_untouched():
    cfg = config("tiny", n_layer=2, dropout=0.1)
    assert cfg.n_layer == 2 and cfg.dropout == 0.1
    assert PRESETS["tiny"].n_layer != 2 or PRESETS["tiny"].dropout == 0.0
    assert config("tiny") == PRESETS["tiny"] and config("tiny") is not PRESETS["tiny"]
    assert GPTConfig(mlp="swiglu", d_model=256).ffn_dim % 64 == 0
    assert GPTConfig(d_model=256).ffn_dim == 1024


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=100, n_head=3), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(positions="alibi"), "positions"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
    (dict(d_model=36, n_head=4, positions="rope"), "even head_dim"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_errors():
    with pytest.raises(ValueError, match="unknown GPT preset"):
        config("gpt5")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        config("tiny", n_layers=3)
    cfg = CONFIGS["gelu-learned-layernorm"]
    with pytest.raises(ValueError, match="unknown GPT backend"):
        GPT(cfg, backend="jax")
    model = GPT(cfg)
    with pytest.raises(ValueError, match="unknown GPT backend"):
        model.set_backend("cuda")
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="targets must be an int64"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape of idx"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 11)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, top_k=0)
    # ids outside the vocabulary, named (not the embedding's bare IndexError)
    v = cfg.vocab_size
    for call in (lambda: model(torch.tensor([[0, v]])), lambda: model(torch.tensor([[-1, 0]])),
                 lambda: model.hidden_states(torch.tensor([[0, v + 5]])),
                 lambda: model.generate(torch.tensor([[3, v]]), 2)):
        with pytest.raises(ValueError, match=r"idx holds token id (-1|\d+), outside the "
                                             rf"vocabulary \[0, {v}\)"):
            call()


@pytest.mark.parametrize("backend,cls", [("fastattn", fastattn.optim.AdamW),
                                         ("torch", torch.optim.AdamW)])
def test_configure_optimizer(backend, cls):
    cfg = CONFIGS["gelu-learned-layernorm"]
    model = GPT(cfg, backend=backend)
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied weight once
    idx = _tokens(cfg)
    before = model(idx, idx).item()
    for _ in range(3):
        opt.zero_grad()
        model(idx, idx).backward()
        opt.step()
    assert model(idx, idx).item() < before


def test_dropout_only_in_training():
    cfg = config("tiny", n_layer=1, d_model=32, vocab_size=50, max_seq_len=16, dropout=0.5)
    for backend in ("fastattn", "torch"):
        torch.manual_seed(0)
        model = GPT(cfg, backend=backend)
        idx = torch.randint(0, 50, (2, 9))
        model.eval()
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_autocast(name):
    """The GPU recipe (bf16 autocast), run on the CPU: fp32 loss, backends agree to bf16 error."""
    cfg = CONFIGS[name]
    a, b = _pair(cfg)
    idx, tgt = _tokens(cfg), _tokens(cfg, seed=10)
    losses = []
    for model in (a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, tgt)
            loss.backward()
            out = model.generate(idx[:, :4], 3, temperature=0)
        assert loss.dtype == torch.float32 and out.shape == (3, 7)
        assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all()
                   for p in model.parameters())
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2


def test_gqa_without_enable_gqa(monkeypatch):
    """torch < 2.5 has no enable_gqa: the torch backend repeats k/v heads instead."""
    import fastattn.models.gpt as gpt
    cfg = CONFIGS["swiglu-rope-rmsnorm-gqa"]
    a, b = _pair(cfg)
    idx = _tokens(cfg)
    monkeypatch.setattr(gpt, "_SDPA_HAS_GQA", False)
    with torch.no_grad():
        torch.testing.assert_close(b(idx), a(idx), **TOL)
    prompt = _tokens(cfg, batch=2, seq=3, seed=8)
    assert torch.equal(b.generate(prompt, 8, temperature=0), a.generate(prompt, 8, temperature=0))



def test_rope_tables_survive_casts_and_moves():
    """model.bfloat16() must not round the rotary tables for good: after .float() the model
    gives the logits it gave before the round trip; to_empty() + load_state_dict (meta-device
    initialisation) gives them as well."""
    cfg = CONFIGS["swiglu-rope-rmsnorm-gqa"]
    torch.manual_seed(0)
    model = GPT(cfg, backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():          # bf16-exact weights: the round trip keeps them
            p.copy_(p.bfloat16().float())
        idx = _tokens(cfg, seq=cfg.max_seq_len)
        want = model(idx)
        model.bfloat16().float()
        assert torch.equal(model(idx), want)
        state = model.state_dict()
        model.to_empty(device="cpu")
        model.load_state_dict(state)
        assert torch.equal(model(idx), want)
        model.bfloat16()
        assert all(m.cos.dtype == torch.float32 for m in model.modules() if hasattr(m, "cos"))
