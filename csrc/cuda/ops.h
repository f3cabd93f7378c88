// Host launchers of the CUDA ops (implemented in the .cu files, one per op). They assume the
// arguments were validated by bindings.cpp (devices, dtypes, shapes, strides, no partial
// aliasing) and that a CUDAGuard for the inputs' device is in place; they launch on the current
// stream and allocate nothing: outputs are passed in.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastattn {

// ---- cross-entropy family (csrc/cuda/cross_entropy.cu); math in
// fastattn/ops/cross_entropy/reference.py. logits (R, C) fp32/fp16/bf16 with stride(1) == 1;
// per-row tensors fp32 contiguous (R,); R == 0 launches nothing.

// loss (R,) out; grad (R, C) out in the logits dtype, may be the logits tensor itself.
void cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& grad,
                            const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                            double label_smoothing, double z_loss, const at::Tensor& loss);

// logp, lse (R,) out; entropy (R,) out when with_entropy (otherwise not touched).
void token_logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                             int64_t ignore_index, double inv_temperature, bool with_entropy,
                             const at::Tensor& logp, const at::Tensor& entropy,
                             const at::Tensor& lse);

// grad (R, C) out in the logits dtype, may be the logits tensor itself. entropy and
// grad_entropy are both given or both absent.
void token_logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad, int64_t ignore_index,
                             double inv_temperature);

// ---- Adam/AdamW step (csrc/cuda/adam.cu); math in fastattn/ops/adam/reference.py. All tensors
// contiguous, on one device, element-aligned; params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
// (and max_exp_avg_sqs[i] / masters[i] when those lists are non-empty) have the same numel.
// params and grads share one dtype (fp32/fp16/bf16) across the call, the moment lists one dtype
// (fp32/bf16), masters are fp32. max_exp_avg_sqs is non-empty iff amsgrad. Updated in place.
struct AdamLists {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> exp_avgs;
  std::vector<at::Tensor> exp_avg_sqs;
  std::vector<at::Tensor> max_exp_avg_sqs;
  std::vector<at::Tensor> masters;
};

// step, lr, inv_scale, found_inf: fp32 one-element tensors on the device, read by the kernel.
void adam_step_cuda(const AdamLists& tensors, const at::Tensor& step, const at::Tensor& lr,
                    double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                    bool amsgrad, bool maximize, const std::optional<at::Tensor>& inv_scale,
                    const std::optional<at::Tensor>& found_inf);

}  // namespace fastattn
