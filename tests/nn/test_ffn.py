"""fastattn.nn.MLP / SwiGLU against the eager modules they replace, same state_dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn


class LlamaStyleMLP(nn.Module):
    """The eager block SwiGLU replaces (transformers' LlamaMLP layout)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _run(mod, x):
    x = x.detach().clone().requires_grad_()
    out = mod(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = {n: p.grad.clone() for n, p in mod.named_parameters()}
    return out.detach(), x.grad, grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-5, atol=1e-5, msg=name)


# every CPU backend: the C++ kernels, the reference, and Triton's kernels under the interpreter
BACKENDS = ["cpu", "reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_loads_a_llama_mlp(backend, bias):
    torch.manual_seed(0)
    eager = LlamaStyleMLP(40, 97)
    if bias:        # the Llama layout with biases (some fine-tunes add them)
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(eager, name)
            setattr(eager, name, nn.Linear(lin.in_features, lin.out_features))
    ours = fastattn.nn.SwiGLU(40, 97, bias=bias)
    ours.load_state_dict(eager.state_dict())          # same names, strict
    x = torch.randn(2, 3, 40)
    with fastattn.use_backend(backend):
        _assert_same(_run(ours, x), _run(eager, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,fn", [
    ("gelu", F.gelu), ("relu", F.relu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
    ("relu2", lambda t: F.relu(t).square()), ("silu", F.silu)])
def test_mlp_matches_fc2_act_fc1(backend, activation, fn):
    torch.manual_seed(0)
    ours = fastattn.nn.MLP(40, 97, activation=activation)
    eager = nn.Module()
    eager.fc1, eager.fc2 = nn.Linear(40, 97), nn.Linear(97, 40)
    eager.load_state_dict(ours.state_dict())
    eager.forward = lambda x: eager.fc2(fn(eager.fc1(x)))
    x = torch.randn(3, 40)
    with fastattn.use_backend(backend):
        _assert_same(_run(ours, x), _run(eager, x))


def test_parameters_are_plain_linears():
    m = fastattn.nn.SwiGLU(8, 16, bias=True)
    assert all(isinstance(c, nn.Linear) for c in m.children())
    assert [n for n, _ in m.named_parameters()] == [
        "gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias",
        "down_proj.weight", "down_proj.bias"]
    assert [n for n, _ in fastattn.nn.MLP(8, 16).named_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_constructor_arguments_are_checked_where_they_are_given():
    with pytest.raises(ValueError, match="MLP: unknown activation 'swish'"):
        fastattn.nn.MLP(8, 16, "swish")
    with pytest.raises(TypeError, match="MLP: bias must be a bool, got 'relu'"):
        fastattn.nn.MLP(8, 16, "gelu", "relu")
    with pytest.raises(ValueError, match="SwiGLU: hidden_dim must be an int >= 1, got 0"):
        fastattn.nn.SwiGLU(8, 0)
    # SwiGLU(dim, hidden_dim, bias): the activation is keyword-only, a stray one is refused
    with pytest.raises(TypeError, match="SwiGLU: bias must be a bool, got 'gelu_tanh'"):
        fastattn.nn.SwiGLU(8, 16, "gelu_tanh")
    with pytest.raises(TypeError):
        fastattn.nn.SwiGLU(8, 16, False, "gelu_tanh")
    assert fastattn.nn.SwiGLU(8, 16, activation="gelu_tanh").activation == "gelu_tanh"
