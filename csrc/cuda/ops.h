// Host launchers of the CUDA ops (implemented in the .cu files, one per op). They assume the
// arguments were validated by bindings.cpp (devices, dtypes, shapes, strides, no partial
// aliasing) and that a CUDAGuard for the inputs' device is in place; they launch on the current
// stream and allocate nothing: outputs are passed in.
//
// Build time: the kernel and binding files include ATen/core/Tensor.h and the ATen/ops/<op>.h of
// each at:: function they call (torch/csrc/utils/pybind.h for the bindings' tensor casters),
// never ATen/ATen.h or torch/extension.h, which cost 12 s and 30 s of parsing per file on a
// 2-core machine (with norm.cpp compiled first, the CPU extension's JIT build went from 168 s
// to 104 s there).
#pragma once

#include <ATen/core/Tensor.h>

#include "../check.h"

#include <cstdint>
#include <optional>
#include <string>
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
void cross_entropy_slice_bwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                                  const at::Tensor& row_scale,
                                  const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& grad, double inv_temperature,
                                  double target_coef, double smoothing);

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

// ---- total gradient norm and clipping (csrc/cuda/grad_norm.cu); math in
// fastattn/ops/grad_norm/reference.py. Validated in grad_norm.cu (FA_CHECK): tensors
// non-empty, contiguous, one device and one dtype (fp32/fp16/bf16). grad_norm_cuda: norm_type 2
// or inf, returns a float32 0-dim device tensor (bitwise reproducible). scale_grads_cuda:
// tensors *= min(max_norm / (total_norm + 1e-6), 1) in place, total_norm a float32
// one-element tensor on the same device, read by the kernel (no host sync).
at::Tensor grad_norm_cuda(const std::vector<at::Tensor>& tensors, double norm_type);
void scale_grads_cuda(const std::vector<at::Tensor>& tensors, double max_norm,
                      const at::Tensor& total_norm);

// ---- FFN elementwise kernels (csrc/cuda/ffn.cu); contract: the FFN kernel spec. Every tensor
// (T, F) contiguous, one dtype (fp32/fp16/bf16), one device; outputs are distinct fresh tensors
// shaped like the inputs. activation: gelu, gelu_tanh, relu, relu2 or silu (else FA_CHECK).
void act_fwd_cuda(const at::Tensor& h, const std::string& activation,
                  const at::Tensor& a);  // a = act(h)
// dh = da * act'(h), a = act(h)
void act_bwd_cuda(const at::Tensor& da, const at::Tensor& h, const std::string& activation,
                  const at::Tensor& dh, const at::Tensor& a);
void glu_fwd_cuda(const at::Tensor& g, const at::Tensor& u, const std::string& activation,
                  const at::Tensor& m);  // m = act(g) * u
// dg = dm * u * act'(g), du = dm * act(g), m = act(g) * u
void glu_bwd_cuda(const at::Tensor& dm, const at::Tensor& g, const at::Tensor& u,
                  const std::string& activation, const at::Tensor& dg, const at::Tensor& du,
                  const at::Tensor& m);

// ---- KV-cache decode attention (csrc/cuda/attention_decode.cu); contract: "Decode" in the
// attention spec. q (B, H, Sq, D), k_cache/v_cache (B, Hkv, S_max, D) fp32/fp16/bf16 with
// stride(-1) == 1 and 16-byte aligned rows, D % 8 == 0 in [16, 256]; cache_seqlens int32 (B,).
// Workspace o_part (B * Hkv, splits, M, D) and lse_part (B * Hkv, splits, M) fp32 contiguous,
// M = (H / Hkv) * Sq, 1 <= splits <= decode_attention_max_splits(); out (B, H, Sq, D) in q's
// dtype and lse (B, H, Sq) fp32, contiguous.
int64_t decode_attention_max_splits();
// Split count for the current device: ~4 blocks per SM, >= 256 cache positions per split.
int64_t decode_attention_num_splits(int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t S_max);
void decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                           double scale, const at::Tensor& o_part, const at::Tensor& lse_part,
                           const at::Tensor& out, const at::Tensor& lse);

}  // namespace fastattn
