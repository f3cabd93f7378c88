// Declarations of the C++ CPU kernels of fastattn (extension fastattn._C).
//
// These functions assume validated inputs: bindings.cpp checks devices, dtypes, shapes and
// strides with FA_CHECK before calling them, and releases the GIL around the call.
// Signatures and semantics mirror fastattn/ops/<op>/reference.py one to one.
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
#include <tuple>
#include <vector>

namespace fastattn {
namespace cpu {

// ---- cross entropy (fastattn/ops/cross_entropy/reference.py) ----------------------------
// logits (R, C) float32/float16/bfloat16/float64 with stride(1) == 1; target int64 (R,);
// weight (C,) in the accumulation dtype (float64 for float64 logits, else float32) or none;
// grad (R, C) in the logits dtype or none (may be logits itself);
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
// grad = inv_t * (row_scale * (p - smoothing - target_coef * onehot) - grad_entropy * p * (s - E[s]))
// for a slice of the classes, p and E[s] from the whole row's lse and entropy (target: the
// column within the slice; outside it: no one-hot term); see reference.py.
void cross_entropy_slice_bwd(const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& row_scale,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad, double inv_temperature, double target_coef,
                             double smoothing);

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

// ---- total gradient norm and clipping (fastattn/ops/grad_norm/reference.py) -------------
// These two validate their own inputs (FA_CHECK in grad_norm.cpp). tensors: contiguous
// CPU tensors of one dtype, float32, float16 or bfloat16. grad_norm: norm_type 2 or inf; returns
// the norm of all tensors as one vector, a float32 0-dim tensor (bitwise independent of the
// thread count). scale_grads_: tensors *= min(max_norm / (total_norm + 1e-6), 1) in place;
// total_norm a float32 one-element tensor.
at::Tensor grad_norm(const std::vector<at::Tensor>& tensors, double norm_type);
void scale_grads_(const std::vector<at::Tensor>& tensors, double max_norm,
                  const at::Tensor& total_norm);

// ---- FFN elementwise kernels (csrc/cpu/ffn.cpp; contract: the FFN kernel spec) ----------
// Every tensor 2-D (T, F), contiguous, one dtype (float32, float16 or bfloat16); results are
// fresh contiguous tensors in that dtype; math in float32. activation: "gelu", "gelu_tanh",
// "relu", "relu2" or "silu" (anything else: FA_CHECK error).
at::Tensor act_fwd(const at::Tensor& h, const std::string& activation);  // act(h)
// (dh, a) = (da * act'(h), act(h)) in one pass; overwrite_da: dh is written into da (a buffer
// of the caller's own, contiguous, of h's shape and dtype, that it no longer needs).
std::tuple<at::Tensor, at::Tensor> act_bwd(const at::Tensor& da, const at::Tensor& h,
                                           const std::string& activation, bool overwrite_da);
at::Tensor glu_fwd(const at::Tensor& g, const at::Tensor& u,
                   const std::string& activation);  // act(g) * u
// (dg, du, m) = (dm * u * act'(g), dm * act(g), act(g) * u) in one pass; overwrite_dm: dg is
// written into dm (as overwrite_da above).
std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dm, const at::Tensor& g,
                                                       const at::Tensor& u,
                                                       const std::string& activation,
                                                       bool overwrite_dm);

// ---- layer norm / RMS norm (fastattn/ops/norm/reference.py) -----------------------------
// All tensors contiguous. x (N, D), D >= 1, float32/float16/bfloat16/float64; acc dtype =
// float64 for float64 x, float32 otherwise (all math in acc). residual (N, D) in x's dtype or
// none; weight, bias (D,) in acc dtype or none (weight 1 / bias 0); rms: bias none.
// s = x + residual, rounded to x's dtype (s = x without a residual); statistics come from s:
// layer norm mean = mean_j s_j, var = mean_j (s_j - mean)^2 (biased), rstd = 1 / sqrt(var + eps),
// y = (s - mean) rstd w + b; RMS norm rstd = 1 / sqrt(mean_j s_j^2 + eps), y = s rstd w.
// Returns (y (N, D) in x's dtype, s (N, D) -- an empty (0,) tensor without a residual,
// mean (N,) acc -- empty (0,) for rms, rstd (N,) acc).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms);

// dy (N, D) and dsum (N, D) or none in s's dtype; s the forward's s (x itself without a
// residual); weight (D,) acc or none; mean (N,) acc (empty (0,) for rms), rstd (N,) acc.
// With xhat = (s - mean) rstd (rms: s rstd) and g = dy w:
//   ds = rstd (g - mean_j g_j - xhat mean_j(g_j xhat_j)) + dsum   (rms: without mean_j g_j).
// Returns (ds (N, D) in s's dtype, dweight = sum_rows dy xhat, dbias = sum_rows dy), the two
// (D,) in acc dtype (zeros for N == 0), each an empty (0,) tensor when not wanted; they are
// bitwise the same for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& s,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms, bool want_dweight, bool want_dbias);

// ---- attention (fastattn/ops/attention/reference.py) ------------------------------------
// q (B, H, Sq, D); k, v (B, Hkv, Sk, D), H % Hkv == 0, float32/float16/bfloat16, head_dim
// contiguous; bias float32 (B, H, Sq, Sk) with any strides (0 = broadcast) or none.
// Returns out (B, H, Sq, D) contiguous in q's dtype and lse (B, H, Sq) float32.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale, int64_t diag, int64_t window_left,
                                                 int64_t window_right, double softcap,
                                                 double dropout_p, int64_t seed);

// dout and out shaped like q, lse (B, H, Sq) float32 contiguous as returned by attention_fwd.
// Returns (dq, dk, dv), contiguous, in the input dtype. Deterministic for a given thread
// count; across thread counts dk and dv are bitwise equal, dq may differ in the last bits (the
// work is split per head or per query block depending on the threads, which orders its sums).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, int64_t diag, int64_t window_left, int64_t window_right, double softcap,
    double dropout_p, int64_t seed);

// Packed sequences (reference.py varlen_fwd / varlen_bwd): q (total_q, H, D), k, v
// (total_k, Hkv, D), head_dim contiguous; cu_seqlens_q/k int32 (N + 1,) contiguous, rising from
// 0 to total_q/k; max_seqlen_q/k at least the longest sequence (the grid is sized by the actual
// longest). causal is bottom-right per sequence; no bias, softcap, window or dropout.
// Returns out (total_q, H, D) contiguous in q's dtype and lse (H, total_q) float32.
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal);

// dout and out shaped like q, lse (H, total_q) float32 contiguous as returned by
// varlen_attention_fwd. Returns (dq, dk, dv), contiguous, in the input dtype; rows with no
// visible key (and keys no query sees) get zero gradients. Deterministic for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool causal);

}  // namespace cpu
}  // namespace fastattn
