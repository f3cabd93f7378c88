// CPU kernel of the fused Adam/AdamW step: adam_step.
//
// The math, dtype policy and argument conventions are those of fastattn/ops/adam/reference.py
// (the oracle); this file only says how it is computed fast.
//
// Memory traffic: one pass per tensor, each element read once and written once, nothing
// temporary. Per fp32 parameter: param, grad, m, v read (16 B) and param, m, v written (12 B),
// 28 B; + 8 B with amsgrad (vmax read and written); with fp32 master weights the master is read
// and written (8 B) and the low-precision param only written. Eager single-tensor PyTorch makes
// 7 passes over full tensors (lerp_, mul_, addcmul_, sqrt, div, add_, addcdiv_), ~72 B per
// parameter, ~2.5x as many; the step is memory bound, so bytes are time.
//
// Order of operations: that of torch.optim.Adam/AdamW's fused CPU step (fused=True), which
// is the single-tensor path's but for the sqrt (its unary sqrt kernel is not correctly
// rounded: ~0.5% of params differ by 1 ulp after one step). Measured with torch 2.14 on AVX2:
// bit-identical to fused=True after one step with and without weight decay, amsgrad, maximize;
// over many steps 1-ulp differences appear and grow as any
// reordering does, well inside the tests' 1e-6.
//   bc1 = 1 - beta1^t, bc2 = 1 - beta2^t            (double, as Python floats)
//   step_size = lr / bc1, bc2_sqrt = sqrt(bc2)       (double, then cast to float)
//   p *= float(1 - lr * wd)                          (decoupled weight decay)
//   g += wd * p                                      (L2 weight decay, one FMA)
//   m = lerp(m, g, 1 - beta1)                        (ATen's vectorised lerp: one FMA)
//   v = fma((1 - beta2) * g, g, v * beta2)           (mul_, then addcmul_: one FMA)
//   denom = sqrt(v) / bc2_sqrt + eps                 (the correctly rounded hardware sqrt:
//                                                     the build has -fno-math-errno, without
//                                                     which GCC keeps sqrtf scalar)
//   p = p + (-step_size * m) / denom                 (addcdiv_)
//
// Work split: every tensor is cut into chunks of kChunk elements, and the (tensor, chunk)
// list of the whole call is spread over the threads in one at::parallel_for, so that a model's
// hundreds of small tensors (biases, norms) share a single parallel region instead of paying
// one each. The element loop is templated on the storage types and on the optional features,
// has no branch on them, and is compiled three times (AVX-512, AVX2+FMA, baseline x86-64) with
// target_clones; the loader picks one at run time from the CPU's features. The baseline clone
// is correct but scalar (its FMAs are libm calls); every x86 CPU since 2013 takes v3 or v4.

#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// Elements per work item. 32768 fp32 elements move ~900 KB (28 B each): ~20-40 us of DRAM
// time on one core, far above the cost of handing out a task, and small enough that a 1M
// tensor gives 32 items to balance over the threads.
constexpr int64_t kChunk = 32768;

// Per-call constants, all float32 as the element math is.
struct Consts {
  float grad_scale;  // inv_scale (or 1), negated when maximizing: g * -s == -(g * s) exactly
  float decay;       // 1 - lr * wd for decoupled weight decay, else 1 (p * 1 is exact)
  float l2;          // wd for L2 (Adam) weight decay
  float w1;          // 1 - beta1, the lerp weight
  float beta2, c2;   // beta2 and 1 - beta2
  float bc2_sqrt, eps, neg_step_size;
};

// The raw pointers of one index of the lists; master / vmax are null when absent.
struct Ptrs {
  void* param;
  const void* grad;
  void* m;
  void* v;
  void* vmax;
  float* master;
};

// GCC contracts a * b + c into one FMA by default (-ffp-contract=fast) wherever the vectoriser
// sees the pair, e.g. p * decay + update, which torch rounds twice: contraction is switched
// off for the loop so that it rounds where torch does; the FMAs it wants are written out.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// The element loop over [begin, end) of one tensor. The pointers are restrict-qualified
// parameters (GCC ignores restrict on local pointer variables): without that, six streams need
// a runtime alias check per pair, more than GCC versions a loop for, and it stays scalar.
template <typename param_t, typename mom_t, bool kMaster, bool kAmsgrad, bool kL2>
FA_ROW_KERNEL void adam_range(typename Elem<param_t>::raw* FA_RESTRICT param,
                               const typename Elem<param_t>::raw* FA_RESTRICT grad,
                               typename Elem<mom_t>::raw* FA_RESTRICT m_,
                               typename Elem<mom_t>::raw* FA_RESTRICT v_,
                               typename Elem<mom_t>::raw* FA_RESTRICT vmax_,
                               float* FA_RESTRICT master, const Consts& k, int64_t begin,
                               int64_t end) {
  using P = Elem<param_t>;
  using M = Elem<mom_t>;
  const Consts c = k;  // a local copy: the stores below cannot alias it
  for (int64_t i = begin; i < end; ++i) {
    float g = P::load(grad[i]) * c.grad_scale;
    float p = kMaster ? master[i] : P::load(param[i]);
    p = p * c.decay;
    if (kL2) g = __builtin_fmaf(p, c.l2, g);
    // lerp(m, g, w) = w < 0.5 ? m + w (g - m) : g - (1 - w)(g - m), each side one FMA as in
    // ATen's vectorised lerp; w is fixed per call, so the select is uniform.
    const float m0 = M::load(m_[i]);
    const float diff = g - m0;
    const float m = c.w1 < 0.5f ? __builtin_fmaf(c.w1, diff, m0)
                                : __builtin_fmaf(c.w1 - 1.0f, diff, g);
    const float v = __builtin_fmaf(c.c2 * g, g, M::load(v_[i]) * c.beta2);
    float vhat = v;
    if (kAmsgrad) {
      // torch.maximum propagates a NaN from either side.
      const float old = M::load(vmax_[i]);
      vhat = ((old > v) | (old != old)) ? old : v;
      vmax_[i] = M::store(vhat);
    }
    const float denom = __builtin_sqrtf(vhat) / c.bc2_sqrt + c.eps;
    p = p + (c.neg_step_size * m) / denom;
    m_[i] = M::store(m);
    v_[i] = M::store(v);
    if (kMaster) master[i] = p;
    param[i] = P::store(p);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Casts one index's pointers to their storage types and runs the loop over [begin, end).
template <typename param_t, typename mom_t, bool kMaster, bool kAmsgrad, bool kL2>
void adam_chunk(const Ptrs& ptrs, const Consts& k, int64_t begin, int64_t end) {
  using praw = typename Elem<param_t>::raw;
  using mraw = typename Elem<mom_t>::raw;
  adam_range<param_t, mom_t, kMaster, kAmsgrad, kL2>(
      static_cast<praw*>(ptrs.param), static_cast<const praw*>(ptrs.grad),
      static_cast<mraw*>(ptrs.m), static_cast<mraw*>(ptrs.v), static_cast<mraw*>(ptrs.vmax),
      ptrs.master, k, begin, end);
}

using RangeFn = void (*)(const Ptrs&, const Consts&, int64_t, int64_t);

template <typename param_t, typename mom_t, bool kMaster, bool kAmsgrad>
RangeFn pick_l2(bool l2) {
  return l2 ? &adam_chunk<param_t, mom_t, kMaster, kAmsgrad, true>
            : &adam_chunk<param_t, mom_t, kMaster, kAmsgrad, false>;
}

template <typename param_t, typename mom_t>
RangeFn pick_flags(bool master, bool amsgrad, bool l2) {
  if (master) {
    return amsgrad ? pick_l2<param_t, mom_t, true, true>(l2) : pick_l2<param_t, mom_t, true, false>(l2);
  }
  return amsgrad ? pick_l2<param_t, mom_t, false, true>(l2) : pick_l2<param_t, mom_t, false, false>(l2);
}

template <typename param_t>
RangeFn pick_mom(at::ScalarType mom, bool master, bool amsgrad, bool l2) {
  return mom == at::kBFloat16 ? pick_flags<param_t, c10::BFloat16>(master, amsgrad, l2)
                              : pick_flags<param_t, float>(master, amsgrad, l2);
}

RangeFn pick(at::ScalarType param, at::ScalarType mom, bool master, bool amsgrad, bool l2) {
  switch (param) {
    case at::kHalf:
      return pick_mom<c10::Half>(mom, master, amsgrad, l2);
    case at::kBFloat16:
      return pick_mom<c10::BFloat16>(mom, master, amsgrad, l2);
    default:
      return pick_mom<float>(mom, master, amsgrad, l2);
  }
}

struct Item {
  int64_t tensor, begin, end;
};

}  // namespace

void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<at::Tensor>& max_exp_avg_sqs,
               const std::vector<at::Tensor>& masters, const at::Tensor& step,
               const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, bool amsgrad, bool maximize,
               const std::optional<at::Tensor>& inv_scale,
               const std::optional<at::Tensor>& found_inf) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  if (found_inf.has_value() && *found_inf->data_ptr<float>() != 0.0f) return;

  // Scalars in double as torch.optim computes them from Python floats, then cast to float as
  // ATen does when a Python scalar meets a float32 tensor.
  const double t = static_cast<double>(*step.data_ptr<float>());
  const double lr_d = static_cast<double>(*lr.data_ptr<float>());
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);
  const bool has_wd = weight_decay != 0.0;
  Consts k;
  const float s = inv_scale.has_value() ? *inv_scale->data_ptr<float>() : 1.0f;
  k.grad_scale = maximize ? -s : s;
  k.decay = (has_wd && decoupled) ? static_cast<float>(1.0 - lr_d * weight_decay) : 1.0f;
  k.l2 = static_cast<float>(weight_decay);
  k.w1 = static_cast<float>(1.0 - beta1);
  k.beta2 = static_cast<float>(beta2);
  k.c2 = static_cast<float>(1.0 - beta2);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  k.eps = static_cast<float>(eps);
  k.neg_step_size = static_cast<float>(-(lr_d / bc1));

  const bool l2 = has_wd && !decoupled;
  const bool master = !masters.empty();
  std::vector<Ptrs> ptrs(n);
  std::vector<RangeFn> fns(n);
  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    ptrs[i] = Ptrs{params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                   exp_avg_sqs[i].data_ptr(), amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                   master ? masters[i].data_ptr<float>() : nullptr};
    fns[i] = pick(params[i].scalar_type(), exp_avgs[i].scalar_type(), master, amsgrad, l2);
    const int64_t numel = params[i].numel();
    total += numel;
    for (int64_t b = 0; b < numel; b += kChunk) items.push_back({i, b, std::min(numel, b + kChunk)});
  }

  // Grain 1: each item already carries up to kChunk elements; parallel_for hands each thread
  // a contiguous run of items (neighbouring chunks, good for the hardware prefetcher). Below
  // one chunk of work in total, a parallel region costs more than it saves.
  const int64_t grain = total <= kChunk ? static_cast<int64_t>(items.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Item& it = items[j];
      fns[it.tensor](ptrs[it.tensor], k, it.begin, it.end);
    }
  });
}

}  // namespace cpu
}  // namespace fastattn
