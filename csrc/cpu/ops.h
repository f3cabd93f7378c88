// Declarations of the C++ CPU kernels of fastattn (extension fastattn._C).
//
// These functions assume validated inputs: bindings.cpp checks devices, dtypes, shapes and
// strides with TORCH_CHECK before calling them, and releases the GIL around the call.
// Signatures and semantics mirror fastattn/ops/<op>/reference.py one to one.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace fastattn {
namespace cpu {

// ---- cross entropy (fastattn/ops/cross_entropy/reference.py) ----------------------------
// logits (R, C) float32/float16/bfloat16/float64 with stride(1) == 1; target int64 (R,);
// weight float32 (C,) or none; grad (R, C) in the logits dtype or none (may be logits itself);
// grad_scale float32 one-element tensor or none. Returns the per-row loss (R,) in acc dtype
// (float64 for float64 logits, float32 otherwise).
at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                             double label_smoothing, double z_loss);

// Returns (logp, entropy, lse), each (R,) in acc dtype; entropy is an empty (0,) tensor when
// with_entropy is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& target,
                                                                  int64_t ignore_index,
                                                                  double inv_temperature,
                                                                  bool with_entropy);

// Writes d(sum_r grad_logp_r * logp_r + grad_entropy_r * entropy_r) / d logits into grad
// (which may be logits itself). entropy and grad_entropy are both given or both none.
void token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                        const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                        const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad,
                        int64_t ignore_index, double inv_temperature);

// ---- Adam / AdamW step (fastattn/ops/adam/reference.py) ---------------------------------
// One step, in place, over lists of equal length; per index all tensors have the same numel
// and are contiguous. params/grads float32, float16 or bfloat16 (a param and its grad share a
// dtype); exp_avgs/exp_avg_sqs/max_exp_avg_sqs float32 or bfloat16, one dtype per call;
// masters float32. max_exp_avg_sqs is empty unless amsgrad, masters empty unless master
// weights are kept. step (the count after this step's increment, >= 1), lr, inv_scale and
// found_inf are float32 one-element tensors; nothing is written when found_inf != 0.
void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<at::Tensor>& max_exp_avg_sqs,
               const std::vector<at::Tensor>& masters, const at::Tensor& step,
               const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, bool amsgrad, bool maximize,
               const std::optional<at::Tensor>& inv_scale,
               const std::optional<at::Tensor>& found_inf);

}  // namespace cpu
}  // namespace fastattn
