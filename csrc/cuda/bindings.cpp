// The one pybind11 module of the CUDA extension (fastattn._cuda). Every function here validates
// its arguments with FA_CHECK (which argument, what was expected, what was given), allocates
// the outputs, puts a CUDAGuard on the inputs' device and calls the launcher from ops.h, which
// launches on the current stream. The GIL is released for the whole call (argument conversion
// and result conversion happen outside the call_guard, with the GIL held).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

// Column indices inside the kernels are int; keep well clear of 2^31.
constexpr int64_t kMaxClasses = int64_t{1} << 30;

void check_on_cuda(const char* op, const char* name, const at::Tensor& t) {
  FA_CHECK(t.is_cuda(), op, ": `", name, "` must be a CUDA tensor, got a tensor on ",
           t.device());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& logits) {
  check_on_cuda(op, name, t);
  FA_CHECK(t.device() == logits.device(), op, ": `", name, "` is on ", t.device(),
           " but `logits` is on ", logits.device());
}

void check_elem_aligned(const char* op, const char* name, const at::Tensor& t) {
  FA_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0,
           op, ": `", name, "` data pointer is not aligned to its element size (",
           t.element_size(), " bytes)");
}

// logits: CUDA, 2-D (R, C), fp32/fp16/bf16, class dimension contiguous.
void check_logits(const char* op, const at::Tensor& logits) {
  check_on_cuda(op, "logits", logits);
  FA_CHECK(logits.dim() == 2, op, ": `logits` must be 2-D (rows, classes), got shape ",
           logits.sizes());
  const auto dt = logits.scalar_type();
  FA_CHECK(dt != at::kDouble, op,
           ": float64 `logits` are not supported by the CUDA backend (float32, float16, "
           "bfloat16 only); use the reference backend or cast the logits");
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
           ": `logits` must be float32, float16 or bfloat16, got ", dt);
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  FA_CHECK(C >= 1, op, ": `logits` must have at least one class (size(1) >= 1), got shape ",
           logits.sizes());
  FA_CHECK(C < kMaxClasses, op, ": `logits` has ", C, " classes, more than the supported ",
           kMaxClasses - 1);
  FA_CHECK(R <= std::numeric_limits<int32_t>::max(), op, ": `logits` has ", R,
           " rows, more than the supported 2^31 - 1 (one thread block per row)");
  FA_CHECK(logits.stride(1) == 1 || C == 1, op,
           ": `logits` must have a contiguous class dimension (stride(1) == 1), got strides ",
           logits.strides());
  FA_CHECK(logits.stride(0) >= 0, op, ": `logits` has a negative row stride ",
           logits.stride(0));
  check_elem_aligned(op, "logits", logits);
}

// A per-row tensor: CUDA on the logits' device, `dtype`, shape (R,), contiguous.
void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t R,
                      at::ScalarType dtype, const at::Tensor& logits) {
  check_same_device(op, name, t, logits);
  FA_CHECK(t.scalar_type() == dtype, op, ": `", name, "` must be ", dtype, ", got ",
           t.scalar_type());
  FA_CHECK(t.dim() == 1 && t.size(0) == R, op, ": `", name, "` must have shape (", R,
           ",) (one value per row of `logits`), got shape ", t.sizes());
  FA_CHECK(t.stride(0) == 1 || R <= 1, op, ": `", name, "` must be contiguous, got stride ",
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
  FA_CHECK(grad.scalar_type() == logits.scalar_type(), op,
           ": `grad` must have the logits dtype ", logits.scalar_type(), ", got ",
           grad.scalar_type());
  FA_CHECK(grad.dim() == 2 && grad.sizes() == logits.sizes(), op,
           ": `grad` must have the shape of `logits` ", logits.sizes(), ", got ", grad.sizes());
  const int64_t R = grad.size(0);
  const int64_t C = grad.size(1);
  FA_CHECK(grad.stride(1) == 1 || C == 1, op,
           ": `grad` must have a contiguous class dimension (stride(1) == 1), got strides ",
           grad.strides());
  FA_CHECK(R <= 1 || grad.stride(0) >= C, op, ": `grad` rows overlap (stride(0) = ",
           grad.stride(0), " < ", C, " classes)");
  check_elem_aligned(op, "grad", grad);
  if (grad.numel() == 0) return;
  if (grad.data_ptr() == logits.data_ptr()) {
    FA_CHECK(R <= 1 || grad.stride(0) == logits.stride(0), op,
             ": `grad` shares its data pointer with `logits` but has row stride ",
             grad.stride(0), " instead of ", logits.stride(0),
             "; pass either the logits tensor itself (in-place) or a separate buffer");
  } else {
    const auto g = byte_span(grad);
    const auto l = byte_span(logits);
    FA_CHECK(g.second <= l.first || l.second <= g.first, op,
             ": `grad` partially overlaps `logits`; pass either the logits tensor itself "
             "(in-place) or a separate buffer");
  }
}

void check_inv_temperature(const char* op, double inv_temperature) {
  FA_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0.0, op,
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
    FA_CHECK(w.scalar_type() == at::kFloat, op, ": `weight` must be float32, got ",
             w.scalar_type());
    FA_CHECK(w.dim() == 1 && w.size(0) == C, op, ": `weight` must have shape (", C,
             ",) (one value per class), got shape ", w.sizes());
    FA_CHECK(w.is_contiguous(), op, ": `weight` must be contiguous, got stride ", w.strides());
  }
  if (grad.has_value()) check_grad(op, *grad, logits);
  if (grad_scale.has_value()) {
    const at::Tensor& s = *grad_scale;
    check_same_device(op, "grad_scale", s, logits);
    FA_CHECK(s.scalar_type() == at::kFloat, op, ": `grad_scale` must be float32, got ",
             s.scalar_type());
    FA_CHECK(s.numel() == 1, op, ": `grad_scale` must hold one value (a 0-dim tensor), got "
             "shape ", s.sizes());
  }
  FA_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
           ": `label_smoothing` must be in [0, 1], got ", label_smoothing);
  FA_CHECK(std::isfinite(z_loss), op, ": `z_loss` must be finite, got ", z_loss);

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
  FA_CHECK(entropy.has_value() == grad_entropy.has_value(), op,
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

void cross_entropy_slice_bwd(const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& row_scale,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad, double inv_temperature, double target_coef,
                             double smoothing) {
  const char* op = "cross_entropy_slice_bwd";
  check_logits(op, logits);
  const int64_t R = logits.size(0);
  check_row_vector(op, "target", target, R, at::kLong, logits);
  check_row_vector(op, "lse", lse, R, at::kFloat, logits);
  check_row_vector(op, "row_scale", row_scale, R, at::kFloat, logits);
  FA_CHECK(entropy.has_value() == grad_entropy.has_value(), op,
           ": `entropy` and `grad_entropy` must be both given or both None, got entropy ",
           entropy.has_value() ? "given" : "None", " and grad_entropy ",
           grad_entropy.has_value() ? "given" : "None");
  if (entropy.has_value()) {
    check_row_vector(op, "entropy", *entropy, R, at::kFloat, logits);
    check_row_vector(op, "grad_entropy", *grad_entropy, R, at::kFloat, logits);
  }
  check_grad(op, grad, logits);
  check_inv_temperature(op, inv_temperature);
  FA_CHECK(std::isfinite(target_coef) && std::isfinite(smoothing), op,
           ": `target_coef` and `smoothing` must be finite, got ", target_coef, " and ",
           smoothing);

  const c10::cuda::CUDAGuard guard(logits.device());
  fastattn::cross_entropy_slice_bwd_cuda(logits, target, lse, entropy, row_scale, grad_entropy,
                                         grad, inv_temperature, target_coef, smoothing);
}

// ---- FFN elementwise kernels ----------------------------------------------------------------

// t: CUDA on ref's device, 2-D, contiguous, fp32/fp16/bf16, ref's dtype and shape, aligned to
// its element size.
void check_ffn_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                      const char* ref_name) {
  check_on_cuda(op, name, t);
  FA_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `",
           ref_name, "` is on ", ref.device());
  FA_CHECK(t.dim() == 2, op, ": `", name, "` must be 2-D (T, F), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": `", name,
           "` must be float32, float16 or bfloat16, got ", dt);
  FA_CHECK(dt == ref.scalar_type(), op, ": `", name, "` must have the dtype of `", ref_name,
           "` (", ref.scalar_type(), "), got ", dt);
  FA_CHECK(t.sizes() == ref.sizes(), op, ": `", name, "` must have the shape of `", ref_name,
           "` ", ref.sizes(), ", got ", t.sizes());
  FA_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous, got strides ",
           t.strides());
  check_elem_aligned(op, name, t);
}

void check_activation(const char* op, const std::string& activation) {
  FA_CHECK(activation == "gelu" || activation == "gelu_tanh" || activation == "relu" ||
                  activation == "relu2" || activation == "silu",
           op, ": unknown activation '", activation,
           "'; valid: gelu, gelu_tanh, relu, relu2, silu");
}

at::Tensor act_fwd(const at::Tensor& h, const std::string& activation) {
  const char* op = "fastattn._cuda.act_fwd";
  check_ffn_tensor(op, "h", h, h, "h");
  check_activation(op, activation);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor a = at::empty_like(h);
  fastattn::act_fwd_cuda(h, activation, a);
  return a;
}

std::tuple<at::Tensor, at::Tensor> act_bwd(const at::Tensor& da, const at::Tensor& h,
                                           const std::string& activation) {
  const char* op = "fastattn._cuda.act_bwd";
  check_ffn_tensor(op, "h", h, h, "h");
  check_ffn_tensor(op, "da", da, h, "h");
  check_activation(op, activation);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor dh = at::empty_like(h);
  at::Tensor a = at::empty_like(h);
  fastattn::act_bwd_cuda(da, h, activation, dh, a);
  return {dh, a};
}

at::Tensor glu_fwd(const at::Tensor& g, const at::Tensor& u, const std::string& activation) {
  const char* op = "fastattn._cuda.glu_fwd";
  check_ffn_tensor(op, "g", g, g, "g");
  check_ffn_tensor(op, "u", u, g, "g");
  check_activation(op, activation);
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor m = at::empty_like(g);
  fastattn::glu_fwd_cuda(g, u, activation, m);
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dm, const at::Tensor& g,
                                                       const at::Tensor& u,
                                                       const std::string& activation) {
  const char* op = "fastattn._cuda.glu_bwd";
  check_ffn_tensor(op, "g", g, g, "g");
  check_ffn_tensor(op, "u", u, g, "g");
  check_ffn_tensor(op, "dm", dm, g, "g");
  check_activation(op, activation);
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor dg = at::empty_like(g);
  at::Tensor du = at::empty_like(g);
  at::Tensor m = at::empty_like(g);
  fastattn::glu_bwd_cuda(dm, g, u, activation, dg, du, m);
  return {dg, du, m};
}

// ---- adam_step ------------------------------------------------------------------------------

// Chunk indices inside the Adam kernel are int32 over 64K-element chunks.
constexpr int64_t kMaxAdamNumel = int64_t{1} << 46;

// A one-element float32 tensor on `device` (step, lr, inv_scale, found_inf): read by the kernel.
void check_device_scalar(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device) {
  check_on_cuda(op, name, t);
  FA_CHECK(t.device() == device, op, ": `", name, "` is on ", t.device(),
           " but the parameters are on ", device,
           " (it is read on the device, so it must live there)");
  FA_CHECK(t.scalar_type() == at::kFloat, op, ": `", name,
           "` must be a float32 tensor, got ", t.scalar_type());
  FA_CHECK(t.numel() == 1, op, ": `", name, "` must hold one value (a 0-dim tensor), got shape ",
           t.sizes());
}

// Element i of a tensor list: on `device`, `dtype`, the shape of params[i], contiguous, aligned.
void check_adam_tensor(const char* op, const char* list, size_t i, const at::Tensor& t,
                       const at::Tensor& param, at::ScalarType dtype, const at::Device& device) {
  FA_CHECK(t.is_cuda() && t.device() == device, op, ": `", list, "[", i, "]` is on ",
           t.device(), " but the parameters are on ", device);
  FA_CHECK(t.scalar_type() == dtype, op, ": `", list, "[", i, "]` must be ", dtype, ", got ",
           t.scalar_type());
  FA_CHECK(t.sizes() == param.sizes(), op, ": `", list, "[", i, "]` has shape ", t.sizes(),
           " but `params[", i, "]` has shape ", param.sizes());
  FA_CHECK(t.is_contiguous(), op, ": `", list, "[", i,
           "]` must be contiguous (the kernel walks it as a flat array), got strides ",
           t.strides());
  FA_CHECK(t.numel() == 0 ||
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0,
           op, ": `", list, "[", i, "]` data pointer is not aligned to its element size");
}

at::ScalarType check_adam_dtype(const char* op, const char* list, const at::Tensor& t,
                                bool allow_half) {
  const auto dt = t.scalar_type();
  FA_CHECK(dt != at::kDouble && !at::isComplexType(dt), op, ": ", dt, " `", list,
           "` are not supported by the CUDA backend (float32, float16 or bfloat16 params; "
           "float32 or bfloat16 moments); use the reference backend or view complex "
           "parameters as real");
  FA_CHECK(dt == at::kFloat || dt == at::kBFloat16 || (allow_half && dt == at::kHalf), op,
           ": `", list, "` must be float32", allow_half ? ", float16" : "", " or bfloat16, got ",
           dt);
  return dt;
}

void adam_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
               std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
               std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> masters,
               const at::Tensor& step, const at::Tensor& lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
               const std::optional<at::Tensor>& inv_scale,
               const std::optional<at::Tensor>& found_inf) {
  const char* op = "adam_step";
  const size_t n = params.size();
  FA_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, op,
           ": `grads`, `exp_avgs` and `exp_avg_sqs` must have one tensor per parameter (",
           n, "), got ", grads.size(), ", ", exp_avgs.size(), " and ", exp_avg_sqs.size());
  FA_CHECK(max_exp_avg_sqs.size() == (amsgrad ? n : 0), op, ": `max_exp_avg_sqs` must have ",
           amsgrad ? "one tensor per parameter" : "no tensors", " when amsgrad=",
           amsgrad ? "True" : "False", ", got ", max_exp_avg_sqs.size(), " for ", n,
           " parameters");
  FA_CHECK(masters.empty() || masters.size() == n, op,
           ": `masters` must be empty or have one tensor per parameter (", n, "), got ",
           masters.size());
  FA_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": `beta1` must be in [0, 1), got ", beta1);
  FA_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": `beta2` must be in [0, 1), got ", beta2);
  FA_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": `eps` must be finite and >= 0, got ", eps);
  FA_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, op,
           ": `weight_decay` must be finite and >= 0, got ", weight_decay);
  if (n == 0) return;

  check_on_cuda(op, "params[0]", params[0]);
  const at::Device device = params[0].device();
  const auto pdt = check_adam_dtype(op, "params", params[0], /*allow_half=*/true);
  const auto mdt = check_adam_dtype(op, "exp_avgs", exp_avgs[0], /*allow_half=*/false);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_adam_tensor(op, "params", i, p, p, pdt, device);
    FA_CHECK(p.numel() < kMaxAdamNumel, op, ": `params[", i, "]` has ", p.numel(),
             " elements, more than the supported 2^46");
    check_adam_tensor(op, "grads", i, grads[i], p, pdt, device);
    check_adam_tensor(op, "exp_avgs", i, exp_avgs[i], p, mdt, device);
    check_adam_tensor(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, mdt, device);
    if (amsgrad) check_adam_tensor(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, mdt, device);
    if (!masters.empty()) check_adam_tensor(op, "masters", i, masters[i], p, at::kFloat, device);
    FA_CHECK(p.numel() == 0 || (p.data_ptr() != grads[i].data_ptr() &&
                                   p.data_ptr() != exp_avgs[i].data_ptr() &&
                                   p.data_ptr() != exp_avg_sqs[i].data_ptr() &&
                                   exp_avgs[i].data_ptr() != exp_avg_sqs[i].data_ptr()),
             op, ": tensor ", i, " of `params`, `grads`, `exp_avgs`, `exp_avg_sqs` share "
             "memory; each must be its own buffer");
  }
  check_device_scalar(op, "step", step, device);
  check_device_scalar(op, "lr", lr, device);
  if (inv_scale.has_value()) check_device_scalar(op, "inv_scale", *inv_scale, device);
  if (found_inf.has_value()) check_device_scalar(op, "found_inf", *found_inf, device);

  const c10::cuda::CUDAGuard guard(device);
  fastattn::AdamLists lists{std::move(params),      std::move(grads),
                            std::move(exp_avgs),    std::move(exp_avg_sqs),
                            std::move(max_exp_avg_sqs), std::move(masters)};
  fastattn::adam_step_cuda(lists, step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                           maximize, inv_scale, found_inf);
}

// ---- decode_attention -----------------------------------------------------------------------

// k_cache / v_cache rows are read with 16-byte loads: base pointer and every stride must keep
// each row 16-byte aligned.
void check_decode_aligned(const char* op, const char* name, const at::Tensor& t) {
  const int64_t e = t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || (t.stride(d) * e) % 16 == 0);
  FA_CHECK(ok, op, ": `", name, "` rows must be 16-byte aligned (data pointer and strides ",
           t.strides(), " multiples of 16 bytes) for the vectorised cache loads; pass a "
           "contiguous cache or use the triton/reference backend");
}

std::vector<at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache,
                                         const at::Tensor& cache_seqlens, double scale,
                                         int64_t num_splits) {
  const char* op = "decode_attention";
  check_on_cuda(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache},
                                {"v_cache", v_cache},
                                {"cache_seqlens", cache_seqlens}}) {
    check_on_cuda(op, name, t);
    FA_CHECK(t.device() == q.device(), op, ": `", name, "` is on ", t.device(),
             " but `q` is on ", q.device());
  }
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
           ": `q` must be float32, float16 or bfloat16, got ", dt);
  FA_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, op,
           ": `k_cache` and `v_cache` must have q's dtype ", dt, ", got ",
           k_cache.scalar_type(), " and ", v_cache.scalar_type());
  FA_CHECK(q.dim() == 4, op, ": `q` must be 4-D (B, H, Sq, D), got shape ", q.sizes());
  FA_CHECK(k_cache.dim() == 4, op, ": `k_cache` must be 4-D (B, Hkv, S_max, D), got shape ",
           k_cache.sizes());
  FA_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": `v_cache` must have the shape of "
           "`k_cache` ", k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S_max = k_cache.size(2);
  FA_CHECK(k_cache.size(0) == B && k_cache.size(3) == D, op, ": `k_cache` ", k_cache.sizes(),
           " does not match `q` ", q.sizes(), " in batch (dim 0) or head dim (dim 3)");
  FA_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": the number of query heads H = ", H,
           " must be a multiple of the number of kv heads Hkv = ", Hkv);
  FA_CHECK(D % 8 == 0 && D >= 16 && D <= 256, op, ": head dim ", D,
           " is not supported by the CUDA kernel (multiples of 8 from 16 to 256); use the "
           "triton or reference backend");
  FA_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
           ": q, k_cache and v_cache must have stride(-1) == 1, got strides ", q.strides(),
           ", ", k_cache.strides(), ", ", v_cache.strides());
  for (const at::Tensor* t : {&q, &k_cache, &v_cache}) {
    for (int d = 0; d < 3; ++d) {
      FA_CHECK(t->stride(d) >= 0, op, ": negative strides are not supported, got ",
               t->strides());
    }
  }
  check_elem_aligned(op, "q", q);
  check_decode_aligned(op, "k_cache", k_cache);
  check_decode_aligned(op, "v_cache", v_cache);
  FA_CHECK(cache_seqlens.scalar_type() == at::kInt, op,
           ": `cache_seqlens` must be int32, got ", cache_seqlens.scalar_type());
  FA_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, op,
           ": `cache_seqlens` must have shape (", B, ",) (one length per batch), got ",
           cache_seqlens.sizes());
  FA_CHECK(cache_seqlens.stride(0) == 1 || B <= 1, op,
           ": `cache_seqlens` must be contiguous, got stride ", cache_seqlens.stride(0));
  FA_CHECK(std::isfinite(scale), op, ": `scale` must be finite, got ", scale);
  FA_CHECK(num_splits >= 0, op, ": `num_splits` must be >= 0 (0 = heuristic), got ",
           num_splits);
  const int64_t M = (H / Hkv) * Sq;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  // S_max <= 2^30: the kernel's int key arithmetic (chunk ends, start + per_split * step)
  // stays far from overflow.
  FA_CHECK(S_max <= (int64_t{1} << 30) && B * Hkv <= kIntMax && M <= 8 * int64_t{65535}, op,
           ": sizes out of range (S_max <= 2^30, B * Hkv < 2^31, (H / Hkv) * Sq <= 524280), "
           "got q ", q.sizes(), ", k_cache ", k_cache.sizes());

  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t splits =
      num_splits > 0 ? std::min(num_splits, fastattn::decode_attention_max_splits())
                     : fastattn::decode_attention_num_splits(B, H, Hkv, Sq, S_max);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, H, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, f32);
  at::Tensor o_part = at::empty({B * Hkv, splits, M, D}, f32);
  at::Tensor lse_part = at::empty({B * Hkv, splits, M}, f32);
  fastattn::decode_attention_cuda(q, k_cache, v_cache, cache_seqlens, scale, o_part, lse_part,
                                  out, lse);
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn CUDA kernels (math and conventions: fastattn/ops/<op>/reference.py)";
  // fastattn/_buildinfo.py API_VERSION["cuda"]: raise both when a binding below changes
  m.attr("API_VERSION") = 1;

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
  m.def("cross_entropy_slice_bwd", &cross_entropy_slice_bwd,
        "Writes the gradient of a softmax loss over a slice of the classes into `grad` (may be "
        "`logits` itself), from each row's whole lse and entropy (see reference.py).",
        py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("entropy"),
        py::arg("row_scale"), py::arg("grad_entropy"), py::arg("grad"),
        py::arg("inv_temperature"), py::arg("target_coef"), py::arg("smoothing"),
        py::call_guard<py::gil_scoped_release>());
  m.def("token_logprobs_bwd", &token_logprobs_bwd,
        "Writes d(sum g_logp * logp + g_entropy * entropy) / d logits into `grad` (may be "
        "`logits` itself).",
        py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("grad"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::call_guard<py::gil_scoped_release>());
  m.def("act_fwd", &act_fwd, "a = act(h), (T, F) in h's dtype (FFN kernel spec)",
        py::arg("h"), py::arg("activation"), py::call_guard<py::gil_scoped_release>());
  m.def("act_bwd", &act_bwd, "(dh, a) = (da * act'(h), act(h)) in one pass", py::arg("da"),
        py::arg("h"), py::arg("activation"), py::call_guard<py::gil_scoped_release>());
  m.def("glu_fwd", &glu_fwd, "m = act(g) * u", py::arg("g"), py::arg("u"),
        py::arg("activation"), py::call_guard<py::gil_scoped_release>());
  m.def("glu_bwd", &glu_bwd,
        "(dg, du, m) = (dm * u * act'(g), dm * act(g), act(g) * u) in one pass", py::arg("dm"),
        py::arg("g"), py::arg("u"), py::arg("activation"),
        py::call_guard<py::gil_scoped_release>());
  m.def("adam_step", &adam_step,
        "One Adam/AdamW step in place over lists of tensors (math: "
        "fastattn/ops/adam/reference.py); step, lr, inv_scale, found_inf are float32 0-dim "
        "device tensors read by the kernel (no host sync, CUDA-graph capturable).",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("masters"), py::arg("step"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"), py::arg("inv_scale"),
        py::arg("found_inf"), py::call_guard<py::gil_scoped_release>());
  // grad_norm / scale_grads_ validate their inputs themselves (csrc/cuda/grad_norm.cu).
  m.def("grad_norm", &fastattn::grad_norm_cuda,
        "Norm (2 or inf) of all tensors as one vector, float32 0-dim on their device "
        "(fastattn/ops/grad_norm/reference.py); deterministic, no host sync.",
        py::arg("tensors"), py::arg("norm_type"), py::call_guard<py::gil_scoped_release>());
  m.def("scale_grads_", &fastattn::scale_grads_cuda,
        "tensors *= min(max_norm / (total_norm + 1e-6), 1) in place; total_norm is read on the "
        "device (no host sync).",
        py::arg("tensors"), py::arg("max_norm"), py::arg("total_norm"),
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention,
        "KV-cache decode attention (flash-decoding: split-KV kernel + combine); returns "
        "[out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32]. num_splits 0 = heuristic. "
        "Contract: 'Decode' in the attention spec.",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
        py::arg("scale"), py::arg("num_splits"), py::call_guard<py::gil_scoped_release>());
}
