// The one pybind11 module of the CUDA extension (fastattn._cuda). Every function here validates
// its arguments with TORCH_CHECK (which argument, what was expected, what was given), allocates
// the outputs, puts a CUDAGuard on the inputs' device and calls the launcher from ops.h, which
// launches on the current stream. The GIL is released for the whole call (argument conversion
// and result conversion happen outside the call_guard, with the GIL held).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "ops.h"

namespace py = pybind11;

namespace {

// Column indices inside the kernels are int; keep well clear of 2^31.
constexpr int64_t kMaxClasses = int64_t{1} << 30;

void check_on_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": `", name, "` must be a CUDA tensor, got a tensor on ",
              t.device());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& logits) {
  check_on_cuda(op, name, t);
  TORCH_CHECK(t.device() == logits.device(), op, ": `", name, "` is on ", t.device(),
              " but `logits` is on ", logits.device());
}

void check_elem_aligned(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0,
              op, ": `", name, "` data pointer is not aligned to its element size (",
              t.element_size(), " bytes)");
}

// logits: CUDA, 2-D (R, C), fp32/fp16/bf16, class dimension contiguous.
void check_logits(const char* op, const at::Tensor& logits) {
  check_on_cuda(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2, op, ": `logits` must be 2-D (rows, classes), got shape ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt != at::kDouble, op,
              ": float64 `logits` are not supported by the CUDA backend (float32, float16, "
              "bfloat16 only); use the reference backend or cast the logits");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": `logits` must be float32, float16 or bfloat16, got ", dt);
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  TORCH_CHECK(C >= 1, op, ": `logits` must have at least one class (size(1) >= 1), got shape ",
              logits.sizes());
  TORCH_CHECK(C < kMaxClasses, op, ": `logits` has ", C, " classes, more than the supported ",
              kMaxClasses - 1);
  TORCH_CHECK(R <= std::numeric_limits<int32_t>::max(), op, ": `logits` has ", R,
              " rows, more than the supported 2^31 - 1 (one thread block per row)");
  TORCH_CHECK(logits.stride(1) == 1 || C == 1, op,
              ": `logits` must have a contiguous class dimension (stride(1) == 1), got strides ",
              logits.strides());
  TORCH_CHECK(logits.stride(0) >= 0, op, ": `logits` has a negative row stride ",
              logits.stride(0));
  check_elem_aligned(op, "logits", logits);
}

// A per-row tensor: CUDA on the logits' device, `dtype`, shape (R,), contiguous.
void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t R,
                      at::ScalarType dtype, const at::Tensor& logits) {
  check_same_device(op, name, t, logits);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": `", name, "` must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == R, op, ": `", name, "` must have shape (", R,
              ",) (one value per row of `logits`), got shape ", t.sizes());
  TORCH_CHECK(t.stride(0) == 1 || R <= 1, op, ": `", name, "` must be contiguous, got stride ",
              t.stride(0));
}

// Byte range [begin, end) spanned by a 2-D tensor with non-negative strides and stride(1) == 1.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t last = (t.size(0) - 1) * t.stride(0) + t.size(1);  // elements up to the end
  return {begin, begin + static_cast<uintptr_t>(last) * t.element_size()};
}

// grad: same device/dtype/shape as logits, class dimension contiguous, rows that do not overlap
// (each row is written by one thread block), and either exactly the logits tensor (in-place:
// same pointer, same row stride) or memory disjoint from it.
void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& logits) {
  check_same_device(op, "grad", grad, logits);
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), op,
              ": `grad` must have the logits dtype ", logits.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.dim() == 2 && grad.sizes() == logits.sizes(), op,
              ": `grad` must have the shape of `logits` ", logits.sizes(), ", got ", grad.sizes());
  const int64_t R = grad.size(0);
  const int64_t C = grad.size(1);
  TORCH_CHECK(grad.stride(1) == 1 || C == 1, op,
              ": `grad` must have a contiguous class dimension (stride(1) == 1), got strides ",
              grad.strides());
  TORCH_CHECK(R <= 1 || grad.stride(0) >= C, op, ": `grad` rows overlap (stride(0) = ",
              grad.stride(0), " < ", C, " classes)");
  check_elem_aligned(op, "grad", grad);
  if (grad.numel() == 0) return;
  if (grad.data_ptr() == logits.data_ptr()) {
    TORCH_CHECK(R <= 1 || grad.stride(0) == logits.stride(0), op,
                ": `grad` shares its data pointer with `logits` but has row stride ",
                grad.stride(0), " instead of ", logits.stride(0),
                "; pass either the logits tensor itself (in-place) or a separate buffer");
  } else {
    const auto g = byte_span(grad);
    const auto l = byte_span(logits);
    TORCH_CHECK(g.second <= l.first || l.second <= g.first, op,
                ": `grad` partially overlaps `logits`; pass either the logits tensor itself "
                "(in-place) or a separate buffer");
  }
}

void check_inv_temperature(const char* op, double inv_temperature) {
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0.0, op,
              ": `inv_temperature` must be finite and > 0, got ", inv_temperature);
}

at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                             double label_smoothing, double z_loss) {
  const char* op = "cross_entropy_fwd";
  check_logits(op, logits);
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  check_row_vector(op, "target", target, R, at::kLong, logits);
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_same_device(op, "weight", w, logits);
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": `weight` must be float32, got ",
                w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, op, ": `weight` must have shape (", C,
                ",) (one value per class), got shape ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), op, ": `weight` must be contiguous, got stride ", w.strides());
  }
  if (grad.has_value()) check_grad(op, *grad, logits);
  if (grad_scale.has_value()) {
    const at::Tensor& s = *grad_scale;
    check_same_device(op, "grad_scale", s, logits);
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": `grad_scale` must be float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.numel() == 1, op, ": `grad_scale` must hold one value (a 0-dim tensor), got "
                "shape ", s.sizes());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": `label_smoothing` must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss), op, ": `z_loss` must be finite, got ", z_loss);

  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss = at::empty({R}, logits.options().dtype(at::kFloat));
  fastattn::cross_entropy_fwd_cuda(logits, target, weight, grad, grad_scale, ignore_index,
                                   label_smoothing, z_loss, loss);
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& target,
                                                                  int64_t ignore_index,
                                                                  double inv_temperature,
                                                                  bool with_entropy) {
  const char* op = "token_logprobs_fwd";
  check_logits(op, logits);
  const int64_t R = logits.size(0);
  check_row_vector(op, "target", target, R, at::kLong, logits);
  check_inv_temperature(op, inv_temperature);

  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({R}, opts);
  at::Tensor entropy = at::empty({with_entropy ? R : 0}, opts);
  at::Tensor lse = at::empty({R}, opts);
  fastattn::token_logprobs_fwd_cuda(logits, target, ignore_index, inv_temperature, with_entropy,
                                    logp, entropy, lse);
  return {logp, entropy, lse};
}

void token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                        const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                        const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad,
                        int64_t ignore_index, double inv_temperature) {
  const char* op = "token_logprobs_bwd";
  check_logits(op, logits);
  const int64_t R = logits.size(0);
  check_row_vector(op, "target", target, R, at::kLong, logits);
  check_row_vector(op, "lse", lse, R, at::kFloat, logits);
  check_row_vector(op, "grad_logp", grad_logp, R, at::kFloat, logits);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(), op,
              ": `entropy` and `grad_entropy` must be both given or both None, got entropy ",
              entropy.has_value() ? "given" : "None", " and grad_entropy ",
              grad_entropy.has_value() ? "given" : "None");
  if (entropy.has_value()) {
    check_row_vector(op, "entropy", *entropy, R, at::kFloat, logits);
    check_row_vector(op, "grad_entropy", *grad_entropy, R, at::kFloat, logits);
  }
  check_grad(op, grad, logits);
  check_inv_temperature(op, inv_temperature);

  const c10::cuda::CUDAGuard guard(logits.device());
  fastattn::token_logprobs_bwd_cuda(logits, target, lse, entropy, grad_logp, grad_entropy, grad,
                                    ignore_index, inv_temperature);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn CUDA kernels (math and conventions: fastattn/ops/<op>/reference.py)";

  m.def("cross_entropy_fwd", &cross_entropy_fwd,
        "Per-row cross-entropy loss (R,) fp32; with `grad`, also writes d loss / d logits * "
        "grad_scale into it (grad may be `logits` itself).",
        py::arg("logits"), py::arg("target"), py::arg("weight"), py::arg("grad"),
        py::arg("grad_scale"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::call_guard<py::gil_scoped_release>());
  m.def("token_logprobs_fwd", &token_logprobs_fwd,
        "(logp, entropy, lse) per row for s = logits * inv_temperature; entropy is an empty "
        "(0,) tensor unless with_entropy.",
        py::arg("logits"), py::arg("target"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::arg("with_entropy"),
        py::call_guard<py::gil_scoped_release>());
  m.def("token_logprobs_bwd", &token_logprobs_bwd,
        "Writes d(sum g_logp * logp + g_entropy * entropy) / d logits into `grad` (may be "
        "`logits` itself).",
        py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("grad"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::call_guard<py::gil_scoped_release>());
}
