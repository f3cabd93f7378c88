"""Record every Triton kernel launch of fastattn's ops on small inputs, under the interpreter.

Each launch becomes one JSON line: the kernel (module and name), the type of each runtime
argument as Triton's compiler spells it ("*bf16", "i32", "fp32", "tensordesc<fp16[16,32]>"),
what a GPU launch would specialise it on ("1" for an int equal to 1, "D" for an int or a
pointer divisible by 16; "opt_out" lists the parameters whose do_not_specialize turns that off),
the value of each constexpr and the launch options. tests/tools/triton_aot.py then lowers each
distinct one for a GPU architecture: every kernel variant the ops really launch, with the
argument types they really pass, compiled without a GPU.
Usage: python -m tests.tools.triton_capture OUT.jsonl
"""

import inspect
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' import

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastattn  # noqa: E402
from fastattn.ops._triton_common import TensorDescriptor  # noqa: E402
from fastattn.ops.attention import triton as attn_triton  # noqa: E402
from fastattn.ops.ffn import triton as ffn_triton  # noqa: E402

TORCH_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
               torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TYPES[value.dtype]
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        block = ",".join(str(b) for b in value.block_shape)
        return f"tensordesc<{TORCH_TYPES[value.base.dtype]}[{block}]>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a runtime argument of type {type(value).__name__}")


def _specialization(value):
    # What Triton's JIT keys a compile on (unless the parameter opts out): ints equal to 1
    # become constants, ints and pointers divisible by 16 carry a divisibility hint.
    if isinstance(value, torch.Tensor):
        return "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, int) and not isinstance(value, bool):
        return "1" if value == 1 else "D" if value % 16 == 0 else ""
    return ""


def _constant(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a constexpr of type {type(value).__name__}")


def record(path):
    seen = set()
    run = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = inspect.signature(fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        signature, constants, specialize = {}, {}, {}
        for name, param in params.items():
            value = bound.get(name, param.default)
            if param.annotation is tl.constexpr:
                constants[name] = _constant(value)
            elif value is None:
                constants[name] = None
            else:
                signature[name] = _arg_type(value)
                specialize[name] = _specialization(value)
        # the parameters that opt out of the int specialisations (names or positions)
        opt_out = [p if isinstance(p, str) else list(params)[p]
                   for p in (getattr(self, "kwargs", {}).get("do_not_specialize") or ())]
        entry = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                 "constants": constants, "specialize": specialize, "opt_out": sorted(opt_out),
                 "options": {k: kwargs[k] for k in OPTIONS if k in kwargs}}
        line = json.dumps(entry, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = spy


def workload():
    """Every op on its Triton backend, forward and backward, over the features that pick
    different kernel variants (dtypes, flags, reductions, layouts)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    with fastattn.use_backend("triton"):
        # cross-entropy family (fp32 and fp16 logits; bf16 runs the same kernels' casts)
        for dtype in (torch.float32, torch.bfloat16):
            logits = randn(6, 37, dtype=dtype)
            target = torch.tensor([0, 5, -100, 36, 2, 1])
            fastattn.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4).backward()
            fastattn.cross_entropy(logits, target, weight=torch.rand(37), reduction="sum").backward()
            with torch.no_grad():
                fastattn.cross_entropy(logits, target, reduction="none")
            lp, ent = fastattn.token_logprobs(logits, target, temperature=0.7, return_entropy=True)
            (lp.sum() + ent.sum()).backward()
            x, w = randn(6, 16, dtype=dtype), randn(37, 16, dtype=dtype)
            fastattn.linear_cross_entropy(x, w, target, chunk_size=4).backward()
            fastattn.linear_cross_entropy(x, w, target, chunk_size=16, chunk_over="vocab").backward()
            lp, ent = fastattn.linear_token_logprobs(x, w, target, chunk_size=16, chunk_over="vocab",
                                                     return_entropy=True)
            (lp.sum() + ent.sum()).backward()
            fastattn.linear_token_logprobs(x, w, target, chunk_size=4).sum().backward()
        fastattn.cross_entropy(randn(2, 11, 3, dtype=torch.float16), torch.randint(0, 11, (2, 3))).backward()

        # attention: dense features, the masked path, varlen, decode; the TMA path too
        for tma in ("0", "1") if TensorDescriptor is not None else ("0",):
            attn_triton.TMA.mode = tma
            for dtype in (torch.float32, torch.float16):
                q, k, v = randn(1, 4, 40, 32, dtype=dtype), randn(1, 2, 40, 32, dtype=dtype), randn(1, 2, 40, 32, dtype=dtype)
                fastattn.flash_attention(q, k, v, causal=True).sum().backward()
                fastattn.flash_attention(q, k, v, window=(8, 2), softcap=5.0, dropout_p=0.1).sum().backward()
                cu = torch.tensor([0, 17, 40], dtype=torch.int32)
                fastattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                          cu, cu, 23, 23, causal=True).sum().backward()
            attn_triton.DQ_MODE, attn_triton._warned_atomic = "atomic", True
            fastattn.flash_attention(q, k, v, causal=True, dropout_p=0.1).sum().backward()
            attn_triton.DQ_MODE = "kernel"
            q, k, v = randn(2, 2, 33, 40), randn(2, 2, 33, 40), randn(2, 2, 33, 40)
            mask = torch.rand(2, 1, 33, 33, generator=gen) > 0.2
            fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        attn_triton.TMA.mode = "auto"
        with torch.no_grad():
            for dtype in (torch.float32, torch.float16):
                q, kc, vc = randn(2, 4, 1, 32, dtype=dtype), randn(2, 2, 50, 32, dtype=dtype), randn(2, 2, 50, 32, dtype=dtype)
                fastattn.decode_attention(q, kc, vc, torch.tensor([50, 7], dtype=torch.int32))

        # FFN: every activation of the MLP, both gated forms, with and without biases; the TMA
        # path (every operand layout the backward's transposed views give) too
        x = randn(5, 16)
        for act in ("gelu", "gelu_tanh", "relu", "relu2", "silu"):
            fastattn.mlp(x, randn(32, 16), randn(32), randn(16, 32), randn(16), activation=act).sum().backward()
        fastattn.mlp(x, randn(32, 16), None, randn(16, 32), None).sum().backward()
        for tma in ("0", "1") if TensorDescriptor is not None else ("0",):
            ffn_triton.TMA.mode = tma
            fastattn.swiglu(x, randn(32, 16), randn(32, 16), randn(16, 32)).sum().backward()
            fastattn.swiglu(x, randn(32, 16), randn(32, 16), randn(16, 32), activation="gelu_tanh",
                            b_gate=randn(32), b_up=randn(32), b_down=randn(16)).sum().backward()
            xh = randn(5, 16, dtype=torch.float16)
            fastattn.swiglu(xh, *(randn(*s, dtype=torch.float16) for s in ((32, 16), (32, 16), (16, 32)))).sum().backward()
            fastattn.mlp(xh, randn(32, 16, dtype=torch.float16), randn(32, dtype=torch.float16),
                         randn(16, 32, dtype=torch.float16), None, activation="relu2").sum().backward()
            x_cols = randn(16, 8).t()  # column-major x: A over A^T forward, B not transposed in dW1
            fastattn.mlp(x_cols, randn(32, 16), None, randn(16, 32), None).sum().backward()
        ffn_triton.TMA.mode = "auto"

        # norms: layer/RMS, with and without weight and bias, a residual, a cast, fp16 rows,
        # every gradient the backward can be asked for
        for rms in (False, True):
            norm = fastattn.rms_norm if rms else fastattn.layer_norm
            xn, res = randn(6, 40), randn(6, 40)
            w, b = randn(40), randn(40)
            extra = {} if rms else dict(bias=b)
            y, s = norm(xn, 40, w, residual=res, **extra)
            (y.sum() + s.square().sum()).backward()
            norm(xn, 40).sum().backward()
            norm(randn(6, 40, dtype=torch.float16), 40, out_dtype=torch.float32).sum().backward()
            norm(xn.detach(), 40, w.detach())      # no gradient wanted

        # optimizers and clipping: fp32 and bf16 parameters, master weights, amsgrad
        for dtype, kw in ((torch.float32, {}), (torch.bfloat16, dict(master_weights=True)),
                          (torch.float32, dict(amsgrad=True, maximize=True))):
            params = [torch.nn.Parameter(torch.randn(7, 3, generator=gen).to(dtype)),
                      torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype))]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            for norm in (2.0, float("inf")):
                fastattn.optim.clip_grad_norm_(params, 1.0, norm_type=norm)
            fastattn.optim.AdamW(params, lr=1e-2, **kw).step()
            fastattn.optim.Adam(params, lr=1e-2, weight_decay=0.1, **kw).step()


def main() -> int:
    path = sys.argv[1]
    open(path, "w").close()
    record(path)
    workload()
    with open(path) as f:
        kernels = {json.loads(line)["kernel"] for line in f}
    print(f"recorded {sum(1 for _ in open(path))} launches of {len(kernels)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
