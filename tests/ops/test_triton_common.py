"""Device functions of fastattn/ops/_triton_common.py, run under the Triton interpreter."""

import pytest
import torch

import fastattn

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from fastattn.ops._triton_common import cast_for  # noqa: E402


def _bits_to_f32(*bits: int) -> torch.Tensor:
    return torch.tensor(list(bits), dtype=torch.int64).to(torch.int32).view(torch.float32)


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, cast_for(x, out_ptr), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cast_for_keeps_every_nan_and_rounds_as_torch(dtype):
    """NaN with any payload -- the GPU's canonical 0x7fffffff, a negative 0xffffffff, x86's
    0x7fc00000 -- stays NaN (the bf16 bit rounding carried 0x7fffffff into the sign, -0.0, and
    wrapped 0xffffffff to 0.0); inf, ties to even and ordinary values round as torch's .to()."""
    specials = _bits_to_f32(0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFF800000,
                            0x7F800000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF)
    x = torch.cat([specials, torch.randn(200, generator=torch.Generator().manual_seed(0)) * 1e3])
    out = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(1,)](x, out, x.numel(), BLOCK=256)
    expected = x.to(dtype)
    assert torch.equal(out.isnan(), x.isnan()), out[:10]
    finite = ~x.isnan()
    assert torch.equal(out[finite], expected[finite])


def test_triton_bf16_norm_outputs_keep_a_gpu_nan():
    """A row holding the GPU's NaN (bits 0x7fffffff) gives a NaN row in a bf16 layer_norm
    output, as torch's, not a row of -0.0 (the GPU's own arithmetic makes NaNs of those bits;
    the interpreter keeps an input's), and so does the bf16 residual sum of rms_norm."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    x[1, 5] = _bits_to_f32(0x7FFFFFFF)[0]
    with fastattn.use_backend("triton"):
        y = fastattn.layer_norm(x, 64, out_dtype=torch.bfloat16)
        _, s = fastattn.rms_norm(x.bfloat16(), 64, residual=torch.zeros(3, 64) + x)
    assert y[1].isnan().all(), y[1]
    assert s[1, 5].isnan(), s[1]
    torch.testing.assert_close(y[[0, 2]].float(),
                               torch.nn.functional.layer_norm(x[[0, 2]], (64,)),
                               atol=2e-2, rtol=2e-2)
