// The one pybind11 binding file of fastattn._C (C++ CPU kernels).
//
// Every function exposed here validates its inputs with FA_CHECK (these functions are
// callable directly, not only through the ops' front doors), then calls the kernel declared in
// ops.h with the GIL released. Messages name the argument, what was expected and what was given.

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

std::string shape_str(const at::Tensor& t) {
  return fastattn::check_detail::message(t.sizes());  // "[4, 6]", without an ostream (check.h)
}

void check_cpu(const at::Tensor& t, const char* name) {
  FA_CHECK(t.device().is_cpu(), "fastattn._C: ", name, " must be a CPU tensor, got device ",
           t.device());
}

// A 1-D contiguous (n,) tensor of the given dtype on the CPU.
void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n) {
  check_cpu(t, name);
  FA_CHECK(t.scalar_type() == dtype, "fastattn._C: ", name, " must have dtype ", dtype,
           ", got ", t.scalar_type());
  FA_CHECK(t.dim() == 1 && t.size(0) == n, "fastattn._C: ", name, " must have shape (", n,
           ",), got ", shape_str(t));
  FA_CHECK(t.is_contiguous(), "fastattn._C: ", name, " must be contiguous, got strides ",
           t.strides());
}

// logits: 2-D (R, C), C >= 1, a floating dtype the kernels handle, class dimension contiguous.
void check_logits(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  FA_CHECK(logits.dim() == 2, "fastattn._C: logits must be 2-D (rows, classes), got shape ",
           shape_str(logits));
  const auto dt = logits.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
           "fastattn._C: logits must be float32, float16, bfloat16 or float64, got ", dt);
  FA_CHECK(logits.size(1) >= 1, "fastattn._C: logits must have at least 1 class, got shape ",
           shape_str(logits));
  FA_CHECK(logits.stride(1) == 1 || logits.size(1) == 1,
           "fastattn._C: logits must be contiguous along the class dimension (stride(1) == 1), "
           "got strides ",
           logits.strides());
}

// grad: (R, C) in the logits dtype, class dimension contiguous, rows not overlapping (rows are
// written in parallel). It may be logits itself.
void check_grad(const at::Tensor& grad, const at::Tensor& logits) {
  check_cpu(grad, "grad");
  FA_CHECK(grad.scalar_type() == logits.scalar_type(), "fastattn._C: grad must have the "
           "logits dtype ", logits.scalar_type(), ", got ", grad.scalar_type());
  FA_CHECK(grad.sizes() == logits.sizes(), "fastattn._C: grad must have the logits shape ",
           shape_str(logits), ", got ", shape_str(grad));
  FA_CHECK(grad.stride(1) == 1 || grad.size(1) == 1,
           "fastattn._C: grad must be contiguous along the class dimension (stride(1) == 1), "
           "got strides ",
           grad.strides());
  FA_CHECK(grad.size(0) <= 1 || grad.stride(0) >= grad.size(1),
           "fastattn._C: grad rows must not overlap (stride(0) >= classes = ", grad.size(1),
           "), got strides ", grad.strides());
  // In place is supported only as the very same view: a kernel reads each row of logits
  // before writing the same row of grad, which says nothing about a row shifted against it.
  const bool same_view = grad.data_ptr() == logits.data_ptr() &&
                         (grad.size(0) <= 1 || grad.stride(0) == logits.stride(0));
  if (!same_view && grad.numel() > 0) {
    const auto span = [](const at::Tensor& t) {
      const auto* lo = static_cast<const char*>(t.data_ptr());
      const int64_t n = (t.size(0) - 1) * t.stride(0) + t.size(1);
      return std::make_pair(lo, lo + n * static_cast<int64_t>(t.element_size()));
    };
    const auto g = span(grad), l = span(logits);
    FA_CHECK(g.second <= l.first || l.second <= g.first,
             "fastattn._C: grad must be either logits itself (same data pointer and strides, "
             "for an in-place backward) or not overlap it in memory; got grad strides ",
             grad.strides(), " and logits strides ", logits.strides(),
             " over overlapping memory");
  }
}

at::ScalarType acc_dtype_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                             double label_smoothing, double z_loss) {
  check_logits(logits);
  const int64_t R = logits.size(0), C = logits.size(1);
  check_vector(target, "target", at::kLong, R);
  // class weights in the accumulation dtype: float64 for float64 logits, else float32
  if (weight.has_value())
    check_vector(*weight, "weight",
                 logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, C);
  if (grad.has_value()) check_grad(*grad, logits);
  if (grad_scale.has_value()) {
    check_cpu(*grad_scale, "grad_scale");
    FA_CHECK(grad_scale->scalar_type() == at::kFloat,
             "fastattn._C: grad_scale must have dtype float32, got ",
             grad_scale->scalar_type());
    FA_CHECK(grad_scale->numel() == 1,
             "fastattn._C: grad_scale must be a 0-dim (one-element) tensor, got shape ",
             shape_str(*grad_scale));
  }
  FA_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
           "fastattn._C: label_smoothing must be in [0, 1], got ", label_smoothing);
  FA_CHECK(std::isfinite(z_loss), "fastattn._C: z_loss must be finite, got ", z_loss);
  return fastattn::cpu::cross_entropy_fwd(logits, target, weight, grad, grad_scale, ignore_index,
                                          label_smoothing, z_loss);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& target,
                                                                  int64_t ignore_index,
                                                                  double inv_temperature,
                                                                  bool with_entropy) {
  check_logits(logits);
  check_vector(target, "target", at::kLong, logits.size(0));
  FA_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
           "fastattn._C: inv_temperature must be finite and > 0, got ", inv_temperature);
  return fastattn::cpu::token_logprobs_fwd(logits, target, ignore_index, inv_temperature,
                                           with_entropy);
}

void token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                        const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                        const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad,
                        int64_t ignore_index, double inv_temperature) {
  check_logits(logits);
  const int64_t R = logits.size(0);
  const auto acc = acc_dtype_of(logits);
  check_vector(target, "target", at::kLong, R);
  check_vector(lse, "lse", acc, R);
  check_vector(grad_logp, "grad_logp", acc, R);
  FA_CHECK(entropy.has_value() == grad_entropy.has_value(),
           "fastattn._C: entropy and grad_entropy must be both given or both None, got "
           "entropy ",
           entropy.has_value() ? "given" : "None", " and grad_entropy ",
           grad_entropy.has_value() ? "given" : "None");
  if (entropy.has_value()) {
    check_vector(*entropy, "entropy", acc, R);
    check_vector(*grad_entropy, "grad_entropy", acc, R);
  }
  check_grad(grad, logits);
  FA_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
           "fastattn._C: inv_temperature must be finite and > 0, got ", inv_temperature);
  fastattn::cpu::token_logprobs_bwd(logits, target, lse, entropy, grad_logp, grad_entropy, grad,
                                    ignore_index, inv_temperature);
}

void cross_entropy_slice_bwd(const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& row_scale,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad, double inv_temperature, double target_coef,
                             double smoothing) {
  check_logits(logits);
  const int64_t R = logits.size(0);
  const auto acc = acc_dtype_of(logits);
  check_vector(target, "target", at::kLong, R);
  check_vector(lse, "lse", acc, R);
  check_vector(row_scale, "row_scale", acc, R);
  FA_CHECK(entropy.has_value() == grad_entropy.has_value(),
           "fastattn._C: entropy and grad_entropy must be both given or both None, got "
           "entropy ",
           entropy.has_value() ? "given" : "None", " and grad_entropy ",
           grad_entropy.has_value() ? "given" : "None");
  if (entropy.has_value()) {
    check_vector(*entropy, "entropy", acc, R);
    check_vector(*grad_entropy, "grad_entropy", acc, R);
  }
  check_grad(grad, logits);
  FA_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0 && std::isfinite(target_coef) &&
               std::isfinite(smoothing),
           "fastattn._C: inv_temperature (> 0), target_coef and smoothing must be finite, got ",
           inv_temperature, ", ", target_coef, ", ", smoothing);
  fastattn::cpu::cross_entropy_slice_bwd(logits, target, lse, entropy, row_scale, grad_entropy,
                                         grad, inv_temperature, target_coef, smoothing);
}

// ---- FFN elementwise kernels ---------------------------------------------------------------

// t: CPU, 2-D, contiguous, float32/float16/bfloat16, the dtype and shape of ref (ref itself
// when t is ref).
void check_ffn_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  check_cpu(t, name);
  FA_CHECK(t.dim() == 2, "fastattn._C: ", name, " must be 2-D (T, F), got shape ",
           shape_str(t));
  const auto dt = t.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastattn._C: ", name,
           " must be float32, float16 or bfloat16, got ", dt);
  FA_CHECK(dt == ref.scalar_type(), "fastattn._C: ", name, " must have the dtype of ",
           ref_name, " (", ref.scalar_type(), "), got ", dt);
  FA_CHECK(t.sizes() == ref.sizes(), "fastattn._C: ", name, " must have the shape of ",
           ref_name, " ", shape_str(ref), ", got ", shape_str(t));
  FA_CHECK(t.is_contiguous(), "fastattn._C: ", name, " must be contiguous, got strides ",
           t.strides());
}

void check_activation(const std::string& activation) {
  FA_CHECK(activation == "gelu" || activation == "gelu_tanh" || activation == "relu" ||
                  activation == "relu2" || activation == "silu",
           "fastattn._C: unknown activation '", activation,
           "'; valid: gelu, gelu_tanh, relu, relu2, silu");
}

at::Tensor act_fwd(const at::Tensor& h, const std::string& activation) {
  check_ffn_tensor(h, "h", h, "h");
  check_activation(activation);
  return fastattn::cpu::act_fwd(h, activation);
}

void check_overwritable(const at::Tensor& buf, const char* name,
                        std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs) {
    FA_CHECK(!buf.is_alias_of(*t), "fastattn._C: overwrite_", name, "=True needs ", name,
             " in memory of its own, not shared with the other inputs");
  }
}

std::tuple<at::Tensor, at::Tensor> act_bwd(const at::Tensor& da, const at::Tensor& h,
                                           const std::string& activation, bool overwrite_da) {
  check_ffn_tensor(h, "h", h, "h");
  check_ffn_tensor(da, "da", h, "h");
  check_activation(activation);
  if (overwrite_da) check_overwritable(da, "da", {&h});
  return fastattn::cpu::act_bwd(da, h, activation, overwrite_da);
}

at::Tensor glu_fwd(const at::Tensor& g, const at::Tensor& u, const std::string& activation) {
  check_ffn_tensor(g, "g", g, "g");
  check_ffn_tensor(u, "u", g, "g");
  check_activation(activation);
  return fastattn::cpu::glu_fwd(g, u, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dm, const at::Tensor& g,
                                                       const at::Tensor& u,
                                                       const std::string& activation,
                                                       bool overwrite_dm) {
  check_ffn_tensor(g, "g", g, "g");
  check_ffn_tensor(u, "u", g, "g");
  check_ffn_tensor(dm, "dm", g, "g");
  check_activation(activation);
  if (overwrite_dm) check_overwritable(dm, "dm", {&g, &u});
  return fastattn::cpu::glu_bwd(dm, g, u, activation, overwrite_dm);
}

// ---- adam_step -----------------------------------------------------------------------------

using TensorList = std::vector<at::Tensor>;

// list[i]: on the CPU, contiguous, `numel` elements, one of the allowed dtypes.
void check_adam_tensor(const at::Tensor& t, const char* list, size_t i, int64_t numel,
                       bool allow_half_bf16, const char* allowed) {
  FA_CHECK(t.defined(), "adam_step: ", list, "[", i, "] is an undefined tensor");
  FA_CHECK(t.device().is_cpu(), "adam_step: ", list, "[", i,
           "] must be a CPU tensor, got device ", t.device());
  const auto dt = t.scalar_type();
  FA_CHECK(dt == at::kFloat || (allow_half_bf16 && (dt == at::kHalf || dt == at::kBFloat16)),
           "adam_step: ", list, "[", i, "] must be ", allowed, ", got ", dt);
  FA_CHECK(t.is_contiguous(), "adam_step: ", list, "[", i,
           "] must be contiguous, got shape ", shape_str(t), " with strides ", t.strides());
  FA_CHECK(t.numel() == numel, "adam_step: ", list, "[", i, "] must have ", numel,
           " elements (as params[", i, "]), got shape ", shape_str(t));
}

// A float32 one-element CPU tensor.
void check_adam_scalar(const at::Tensor& t, const char* name) {
  FA_CHECK(t.defined(), "adam_step: ", name, " is an undefined tensor");
  FA_CHECK(t.device().is_cpu(), "adam_step: ", name, " must be a CPU tensor, got device ",
           t.device());
  FA_CHECK(t.scalar_type() == at::kFloat, "adam_step: ", name,
           " must have dtype float32, got ", t.scalar_type());
  FA_CHECK(t.numel() == 1, "adam_step: ", name,
           " must be a 0-dim (one-element) tensor, got shape ", shape_str(t));
}

void adam_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
               const TensorList& masters, const at::Tensor& step, const at::Tensor& lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               bool amsgrad, bool maximize, const std::optional<at::Tensor>& inv_scale,
               const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  const auto check_len = [n](const TensorList& list, const char* name) {
    FA_CHECK(list.size() == n, "adam_step: ", name, " must have as many tensors as params (",
             n, "), got ", list.size());
  };
  check_len(grads, "grads");
  check_len(exp_avgs, "exp_avgs");
  check_len(exp_avg_sqs, "exp_avg_sqs");
  if (amsgrad) {
    check_len(max_exp_avg_sqs, "max_exp_avg_sqs (amsgrad=True)");
  } else {
    FA_CHECK(max_exp_avg_sqs.empty(), "adam_step: max_exp_avg_sqs must be empty when "
             "amsgrad=False, got ", max_exp_avg_sqs.size(), " tensors");
  }
  FA_CHECK(masters.empty() || masters.size() == n, "adam_step: masters must be empty (no "
           "master weights) or have as many tensors as params (", n, "), got ",
           masters.size());
  check_adam_scalar(step, "step");
  check_adam_scalar(lr, "lr");
  if (inv_scale.has_value()) check_adam_scalar(*inv_scale, "inv_scale");
  if (found_inf.has_value()) check_adam_scalar(*found_inf, "found_inf");
  const float t = step.item<float>();
  FA_CHECK(t >= 1.0f, "adam_step: step must be >= 1 (the step count after this step's "
           "increment), got ", t);
  FA_CHECK(beta1 >= 0.0 && beta1 < 1.0, "adam_step: beta1 must be in [0, 1), got ", beta1);
  FA_CHECK(beta2 >= 0.0 && beta2 < 1.0, "adam_step: beta2 must be in [0, 1), got ", beta2);
  FA_CHECK(eps >= 0.0 && std::isfinite(eps), "adam_step: eps must be finite and >= 0, got ",
           eps);
  FA_CHECK(std::isfinite(weight_decay), "adam_step: weight_decay must be finite, got ",
           weight_decay);

  const auto mom_dtype = n > 0 ? exp_avgs[0].scalar_type() : at::kFloat;
  FA_CHECK(mom_dtype == at::kFloat || mom_dtype == at::kBFloat16,
           "adam_step: exp_avgs[0] must be float32 or bfloat16, got ", mom_dtype);
  const auto check_mom = [&](const TensorList& list, const char* name, size_t i, int64_t numel) {
    check_adam_tensor(list[i], name, i, numel, true, "float32 or bfloat16");
    FA_CHECK(list[i].scalar_type() == mom_dtype, "adam_step: ", name, "[", i,
             "] must have the dtype of exp_avgs[0] (", mom_dtype,
             "): all moments of one call share a dtype; got ", list[i].scalar_type());
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].defined() ? params[i].numel() : 0;
    check_adam_tensor(params[i], "params", i, numel, true, "float32, float16 or bfloat16");
    check_adam_tensor(grads[i], "grads", i, numel, true, "float32, float16 or bfloat16");
    FA_CHECK(grads[i].scalar_type() == params[i].scalar_type(), "adam_step: grads[", i,
             "] must have the dtype of params[", i, "] (", params[i].scalar_type(), "), got ",
             grads[i].scalar_type());
    check_mom(exp_avgs, "exp_avgs", i, numel);
    check_mom(exp_avg_sqs, "exp_avg_sqs", i, numel);
    if (amsgrad) check_mom(max_exp_avg_sqs, "max_exp_avg_sqs", i, numel);
    if (!masters.empty()) check_adam_tensor(masters[i], "masters", i, numel, false, "float32");
  }
  fastattn::cpu::adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, step,
                           lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                           inv_scale, found_inf);
}

// ---- layer norm / RMS norm ---------------------------------------------------------------------

// A 2-D (N, D), D >= 1, contiguous strided CPU tensor of a dtype the norm kernels handle.
void check_norm_input(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  FA_CHECK(t.layout() == at::kStrided, "fastattn._C: ", name, " must be a dense (strided) "
           "tensor, got layout ", t.layout());
  FA_CHECK(t.dim() == 2, "fastattn._C: ", name, " must be 2-D (rows, features), got shape ",
           shape_str(t));
  const auto dt = t.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
           "fastattn._C: ", name, " must be float32, float16, bfloat16 or float64, got ", dt);
  FA_CHECK(t.size(1) >= 1, "fastattn._C: ", name, " must have at least 1 feature (D >= 1), "
           "got shape ", shape_str(t));
  FA_CHECK(t.is_contiguous(), "fastattn._C: ", name, " must be contiguous, got shape ",
           shape_str(t), " with strides ", t.strides());
}

// t: the dtype and shape of ref, contiguous, on the CPU.
void check_norm_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                     const char* ref_name) {
  check_cpu(t, name);
  FA_CHECK(t.layout() == at::kStrided, "fastattn._C: ", name, " must be a dense (strided) "
           "tensor, got layout ", t.layout());
  FA_CHECK(t.scalar_type() == ref.scalar_type(), "fastattn._C: ", name,
           " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
           t.scalar_type());
  FA_CHECK(t.sizes() == ref.sizes(), "fastattn._C: ", name, " must have the shape of ",
           ref_name, " ", shape_str(ref), ", got ", shape_str(t));
  FA_CHECK(t.is_contiguous(), "fastattn._C: ", name, " must be contiguous, got strides ",
           t.strides());
}

// weight / bias: (D,) in the acc dtype (float64 for float64 inputs, float32 otherwise).
void check_norm_param(const std::optional<at::Tensor>& t, const char* name,
                      const at::Tensor& ref) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  FA_CHECK(t->layout() == at::kStrided, "fastattn._C: ", name, " must be a dense (strided) "
           "tensor, got layout ", t->layout());
  const auto acc = acc_dtype_of(ref);
  FA_CHECK(t->scalar_type() == acc, "fastattn._C: ", name, " must have dtype ", acc,
           " (the accumulation dtype of ", ref.scalar_type(), " inputs), got ",
           t->scalar_type());
  check_vector(*t, name, acc, ref.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  check_norm_input(x, "x");
  if (residual.has_value()) check_norm_like(*residual, "residual", x, "x");
  check_norm_param(weight, "weight", x);
  FA_CHECK(!(rms && bias.has_value()), "fastattn._C: bias must be None for RMS norm "
           "(rms=True), got a tensor of shape ", bias.has_value() ? shape_str(*bias) : "");
  check_norm_param(bias, "bias", x);
  FA_CHECK(std::isfinite(eps) && eps >= 0.0, "fastattn._C: eps must be finite and >= 0, got ",
           eps);
  return fastattn::cpu::norm_fwd(x, residual, weight, bias, eps, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& s,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms, bool want_dweight, bool want_dbias) {
  check_norm_input(s, "s");
  check_norm_like(dy, "dy", s, "s");
  if (dsum.has_value()) check_norm_like(*dsum, "dsum", s, "s");
  check_norm_param(weight, "weight", s);
  const int64_t N = s.size(0);
  const auto acc = acc_dtype_of(s);
  if (rms) {
    FA_CHECK(mean.dim() == 1 && mean.size(0) == 0, "fastattn._C: mean must be an empty (0,) "
             "tensor for RMS norm (rms=True), got shape ", shape_str(mean));
    check_vector(mean, "mean", acc, 0);
  } else {
    check_vector(mean, "mean", acc, N);
  }
  check_vector(rstd, "rstd", acc, N);
  return fastattn::cpu::norm_bwd(dy, dsum, s, weight, mean, rstd, rms, want_dweight, want_dbias);
}

// ---- attention -------------------------------------------------------------------------------

// q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with H % Hkv == 0; one dtype; last dim contiguous.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_cpu(t, name);
    FA_CHECK(t.dim() == 4, "fastattn._C: ", name, " must be 4-D (batch, heads, seq, head_dim), "
             "got shape ", shape_str(t));
    FA_CHECK(t.scalar_type() == q.scalar_type(), "fastattn._C: ", name,
             " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
    FA_CHECK(t.stride(3) == 1 || t.size(3) == 1, "fastattn._C: ", name,
             " must be contiguous along head_dim (stride(3) == 1), got strides ", t.strides());
  }
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
           "fastattn._C: attention takes float32, float16 or bfloat16, got ", dt);
  FA_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fastattn._C: q, k, v must "
           "have one batch size, got shapes ", shape_str(q), ", ", shape_str(k), ", ",
           shape_str(v));
  FA_CHECK(v.sizes() == k.sizes(), "fastattn._C: v must have the shape of k ", shape_str(k),
           ", got ", shape_str(v));
  FA_CHECK(k.size(3) == q.size(3) && q.size(3) >= 1, "fastattn._C: k must have q's head_dim ",
           q.size(3), ", got ", k.size(3));
  FA_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "fastattn._C: the heads of q (",
           q.size(1), ") must be a multiple of the heads of k and v (", k.size(1), ")");
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& q, const at::Tensor& k) {
  if (!bias.has_value()) return;
  check_cpu(*bias, "bias");
  FA_CHECK(bias->scalar_type() == at::kFloat, "fastattn._C: bias must be float32, got ",
           bias->scalar_type());
  const std::vector<int64_t> want{q.size(0), q.size(1), q.size(2), k.size(2)};
  FA_CHECK(bias->sizes() == at::IntArrayRef(want), "fastattn._C: bias must have shape (B, H, "
           "Sq, Sk) = ", at::IntArrayRef(want), " (expand a broadcast one), got ",
           shape_str(*bias));
}

void check_dropout(double dropout_p, int64_t seed) {
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn._C: dropout_p must be in [0, 1), "
              "got ", dropout_p);
  FA_CHECK(seed >= 0, "fastattn._C: seed must be >= 0, got ", seed);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale, int64_t diag, int64_t window_left,
                                                 int64_t window_right, double softcap,
                                                 double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  check_bias(bias, q, k);
  check_dropout(dropout_p, seed);
  return fastattn::cpu::attention_fwd(q, k, v, bias, scale, diag, window_left, window_right,
                                      softcap, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, int64_t diag, int64_t window_left, int64_t window_right, double softcap,
    double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  check_bias(bias, q, k);
  check_dropout(dropout_p, seed);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{dout, "dout"}, {out, "out"}}) {
    check_cpu(t, name);
    FA_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(), "fastattn._C: ",
             name, " must have q's shape ", shape_str(q), " and dtype ", q.scalar_type(),
             ", got ", shape_str(t), " ", t.scalar_type());
    FA_CHECK(t.stride(3) == 1 || t.size(3) == 1, "fastattn._C: ", name,
             " must be contiguous along head_dim, got strides ", t.strides());
  }
  check_cpu(lse, "lse");
  FA_CHECK(lse.scalar_type() == at::kFloat, "fastattn._C: lse must be float32, got ",
           lse.scalar_type());
  FA_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
           "fastattn._C: lse must have shape (B, H, Sq), got ", shape_str(lse));
  FA_CHECK(lse.is_contiguous(), "fastattn._C: lse must be contiguous, got strides ",
           lse.strides());
  return fastattn::cpu::attention_bwd(dout, q, k, v, out, lse, bias, scale, diag, window_left,
                                      window_right, softcap, dropout_p, seed);
}

// ---- packed sequences (varlen) -----------------------------------------------------------------

// q (total_q, H, D); k, v (total_k, Hkv, D) with H % Hkv == 0; one dtype; last dim contiguous.
void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_cpu(t, name);
    FA_CHECK(t.dim() == 3, "fastattn._C: ", name, " must be 3-D (total_tokens, heads, "
             "head_dim), got shape ", shape_str(t));
    FA_CHECK(t.scalar_type() == q.scalar_type(), "fastattn._C: ", name,
             " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
    FA_CHECK(t.stride(2) == 1 || t.size(2) == 1, "fastattn._C: ", name,
             " must be contiguous along head_dim (stride(2) == 1), got strides ", t.strides());
  }
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
           "fastattn._C: varlen attention takes float32, float16 or bfloat16, got ", dt);
  FA_CHECK(v.sizes() == k.sizes(), "fastattn._C: v must have the shape of k ", shape_str(k),
           ", got ", shape_str(v));
  FA_CHECK(k.size(2) == q.size(2) && q.size(2) >= 1, "fastattn._C: k must have q's head_dim ",
           q.size(2), ", got ", k.size(2));
  FA_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "fastattn._C: the heads of q (",
           q.size(1), ") must be a multiple of the heads of k and v (", k.size(1), ")");
}

// cu: int32 (N + 1,) contiguous prefix sums rising from 0 to total, no sequence longer than
// max_seqlen. The kernels index memory through these values, so they are checked here in full
// (O(N), nothing next to the attention itself).
void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen) {
  check_cpu(cu, name);
  FA_CHECK(cu.scalar_type() == at::kInt, "fastattn._C: ", name, " must be int32, got ",
           cu.scalar_type());
  FA_CHECK(cu.dim() == 1 && cu.size(0) >= 2, "fastattn._C: ", name,
           " must have shape (num_seqs + 1,), got ", shape_str(cu));
  FA_CHECK(cu.is_contiguous(), "fastattn._C: ", name, " must be contiguous, got strides ",
           cu.strides());
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0) - 1;
  FA_CHECK(c[0] == 0 && c[n] == total, "fastattn._C: ", name, " must rise from 0 to the token "
           "count ", total, ", got ", c[0], " ... ", c[n]);
  for (int64_t b = 0; b < n; ++b) {
    const int64_t len = static_cast<int64_t>(c[b + 1]) - c[b];
    FA_CHECK(len >= 0, "fastattn._C: ", name, " must be non-decreasing, got ", c[b], " then ",
             c[b + 1], " at index ", b);
    FA_CHECK(len <= max_seqlen, "fastattn._C: max_seqlen (", max_seqlen, ") is smaller than "
             "sequence ", b, " of ", name, " (length ", len, ")");
  }
}

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                  int64_t max_seqlen_q, int64_t max_seqlen_k) {
  check_varlen_qkv(q, k, v);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_seqlen_q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_seqlen_k);
  FA_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), "fastattn._C: cu_seqlens_q and "
           "cu_seqlens_k must describe the same number of sequences, got ",
           cu_seqlens_q.size(0) - 1, " and ", cu_seqlens_k.size(0) - 1);
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return fastattn::cpu::varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, scale, causal);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{dout, "dout"}, {out, "out"}}) {
    check_cpu(t, name);
    FA_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(), "fastattn._C: ",
             name, " must have q's shape ", shape_str(q), " and dtype ", q.scalar_type(),
             ", got ", shape_str(t), " ", t.scalar_type());
    FA_CHECK(t.stride(2) == 1 || t.size(2) == 1, "fastattn._C: ", name,
             " must be contiguous along head_dim, got strides ", t.strides());
  }
  check_cpu(lse, "lse");
  FA_CHECK(lse.scalar_type() == at::kFloat, "fastattn._C: lse must be float32, got ",
           lse.scalar_type());
  FA_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
           "fastattn._C: lse must have shape (H, total_q) = (", q.size(1), ", ", q.size(0),
           "), got ", shape_str(lse));
  FA_CHECK(lse.is_contiguous(), "fastattn._C: lse must be contiguous, got strides ",
           lse.strides());
  return fastattn::cpu::varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, scale, causal);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn C++ CPU kernels (see fastattn/ops/<op>/reference.py for the semantics)";
  // fastattn/_buildinfo.py API_VERSION["cpu"]: raise both when a binding below changes
  m.attr("API_VERSION") = 3;

  m.def("cross_entropy_fwd", &cross_entropy_fwd,
        "Per-row cross-entropy loss (R,); writes d loss / d logits * grad_scale into grad if "
        "given (grad may be logits itself)",
        py::arg("logits"), py::arg("target"), py::arg("weight"), py::arg("grad"),
        py::arg("grad_scale"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::call_guard<py::gil_scoped_release>());

  m.def("token_logprobs_fwd", &token_logprobs_fwd,
        "(logp, entropy, lse) per row for s = logits * inv_temperature; entropy is empty "
        "unless with_entropy",
        py::arg("logits"), py::arg("target"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::arg("with_entropy"),
        py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_slice_bwd", &cross_entropy_slice_bwd,
        "Writes the gradient of a softmax loss over a slice of the classes into grad (may be "
        "logits itself), from each row's whole lse and entropy (see reference.py)",
        py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("entropy"),
        py::arg("row_scale"), py::arg("grad_entropy"), py::arg("grad"),
        py::arg("inv_temperature"), py::arg("target_coef"), py::arg("smoothing"),
        py::call_guard<py::gil_scoped_release>());

  m.def("token_logprobs_bwd", &token_logprobs_bwd,
        "Writes the gradient of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. logits "
        "into grad (grad may be logits itself)",
        py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("grad"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::call_guard<py::gil_scoped_release>());

  m.def("act_fwd", &act_fwd, "a = act(h), (T, F) in h's dtype (FFN kernel spec)",
        py::arg("h"), py::arg("activation"), py::call_guard<py::gil_scoped_release>());
  m.def("act_bwd", &act_bwd,
        "(dh, a) = (da * act'(h), act(h)) in one pass; overwrite_da: dh written into da",
        py::arg("da"), py::arg("h"), py::arg("activation"), py::arg("overwrite_da") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("glu_fwd", &glu_fwd, "m = act(g) * u", py::arg("g"), py::arg("u"),
        py::arg("activation"), py::call_guard<py::gil_scoped_release>());
  m.def("glu_bwd", &glu_bwd,
        "(dg, du, m) = (dm * u * act'(g), dm * act(g), act(g) * u) in one pass; overwrite_dm: "
        "dg written into dm", py::arg("dm"), py::arg("g"), py::arg("u"), py::arg("activation"),
        py::arg("overwrite_dm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("adam_step", &adam_step,
        "One Adam/AdamW step in place over lists of tensors (fastattn/ops/adam/reference.py); "
        "writes nothing when found_inf is given and nonzero",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("masters"), py::arg("step"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"), py::arg("inv_scale"),
        py::arg("found_inf"), py::call_guard<py::gil_scoped_release>());

  m.def("norm_fwd", &norm_fwd,
        "Layer norm (rms=False) or RMS norm of s = x + residual (s = x without one): "
        "(y, s, mean, rstd); s is empty without a residual, mean empty for rms "
        "(fastattn/ops/norm/reference.py)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("rms"), py::call_guard<py::gil_scoped_release>());
  m.def("norm_bwd", &norm_bwd,
        "Norm backward: (ds, dweight, dbias) from the forward's s, mean and rstd; ds includes "
        "dsum (the gradient at s) when given; dweight / dbias are empty unless wanted",
        py::arg("dy"), py::arg("dsum"), py::arg("s"), py::arg("weight"), py::arg("mean"),
        py::arg("rstd"), py::arg("rms"), py::arg("want_dweight"), py::arg("want_dbias"),
        py::call_guard<py::gil_scoped_release>());

  m.def("attention_fwd", &attention_fwd,
        "Tiled flash-attention forward: (out, lse) (fastattn/ops/attention/reference.py)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("scale"),
        py::arg("diag"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("dropout_p"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
  m.def("attention_bwd", &attention_bwd,
        "Flash-attention backward: (dq, dk, dv) from the forward's out and lse",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("bias"), py::arg("scale"), py::arg("diag"),
        py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("dropout_p"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
  m.def("varlen_attention_fwd", &varlen_attention_fwd,
        "Flash-attention forward over packed sequences: (out (total_q, H, D), lse (H, total_q)) "
        "(reference.py varlen_fwd)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("scale"), py::arg("causal"), py::call_guard<py::gil_scoped_release>());
  m.def("varlen_attention_bwd", &varlen_attention_bwd,
        "Flash-attention backward over packed sequences: (dq, dk, dv) from the forward's out "
        "and lse",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("causal"),
        py::call_guard<py::gil_scoped_release>());

  // grad_norm / scale_grads_ validate their inputs themselves (csrc/cpu/grad_norm.cpp).
  m.def("grad_norm", &fastattn::cpu::grad_norm,
        "Norm (2 or inf) of all tensors as one vector, float32 0-dim "
        "(fastattn/ops/grad_norm/reference.py)",
        py::arg("tensors"), py::arg("norm_type"), py::call_guard<py::gil_scoped_release>());
  m.def("scale_grads_", &fastattn::cpu::scale_grads_,
        "tensors *= min(max_norm / (total_norm + 1e-6), 1), in place",
        py::arg("tensors"), py::arg("max_norm"), py::arg("total_norm"),
        py::call_guard<py::gil_scoped_release>());
}
