// CPU kernels of the cross-entropy family: cross_entropy_fwd, token_logprobs_fwd/_bwd and
// cross_entropy_slice_bwd (the vocabulary-chunked linear cross-entropy's gradient).
//
// The math, gradients and conventions are those of fastattn/ops/cross_entropy/reference.py
// (the oracle); this file only says how it is computed fast.
//
// Work split: one row (C classes) is the unit; rows are spread over threads with
// at::parallel_for. Within a row everything is a streaming loop over C, so each row is read
// from DRAM once: the first pass pulls it into the private L2 (a 32768-class fp32 row is
// 128 KB, L2 is 1-2 MB per core) and later passes re-read it from there. DRAM traffic per call
// is one read of the logits plus, with a gradient, one write of the gradient (plus the
// write-allocate read of that line) -- versus ~5 full (R, C) passes for eager PyTorch
// (log_softmax, its output, the dense nll gradient, log_softmax_backward in and out).
//
// Speed without -march=native: the row loops are written so GCC auto-vectorises them
// (kLanes-wide independent accumulators instead of a serial reduction, an exp made of plain
// arithmetic and bit casts, branch-free half/bfloat16 conversions), and the row-range
// functions are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) with target_clones;
// the loader picks one at run time from the CPU's features. Math is in acc = float32 for
// float32/float16/bfloat16 (float64 for float64), as in the reference.

#include "ops.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// Sixteen independent accumulators: one AVX-512 register of floats, two AVX2 registers, or
// four SSE registers. Without them a max/sum is a serial dependency chain that GCC may not
// reorder (that would need -ffast-math, which also breaks inf/NaN handling).
constexpr int64_t kLanes = 16;

// A task should carry at least this many elements (~10 us of work) to be worth a thread; a
// single row of a large vocabulary is already one task, so small R still fills both cores.
constexpr int64_t kMinElementsPerTask = 32768;

template <typename scalar_t>
using acc_of = typename Elem<scalar_t>::acc;
template <typename scalar_t>
using raw_of = typename Elem<scalar_t>::raw;

// ---- row reductions ------------------------------------------------------------------------

// Sums run in two levels: kLanes accumulators over a block of kSumBlock elements (16 terms per
// lane), then the block total joins the row total in double. One flat lane sum over a
// 50257-class row adds ~3000 terms per lane and its rounding error grows with that count
// (measured ~10x the error of torch's cascade sum); blocked, it stays at a few ulp, for a
// lane reduction per 256 elements.
constexpr int64_t kSumBlock = 256;

template <typename T>
FA_INLINE T lanes_max(const T (&v)[kLanes]) {
  T m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// Pairwise (halving) sum: log2(kLanes) dependent vector adds instead of a kLanes-long
// serial chain of scalar adds, which would cost as much as the block's own loop.
template <typename T>
FA_INLINE T lanes_sum(const T (&v)[kLanes]) {
  T h[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) h[l] = v[l];
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) h[l] += h[l + width];
  return h[0];
}

// sum_{j < n} term(j); term is inlined (and vectorised) into the loop.
template <typename acc_t, typename Term>
FA_INLINE double row_sum(int64_t n, const Term& term) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    acc_t s[kLanes] = {};
    int64_t j = b;
    for (; j + kLanes <= end; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) s[l] += term(j + l);
    for (; j < end; ++j) s[0] += term(j);
    total += lanes_sum(s);
  }
  return total;
}

template <typename T>
struct Pair {
  T first, second;
};

// (sum_j term(j).first, sum_j term(j).second) in one pass.
template <typename acc_t, typename Term>
FA_INLINE Pair<double> row_sum2(int64_t n, const Term& term) {
  Pair<double> total{0, 0};
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    acc_t s[kLanes] = {}, d[kLanes] = {};
    int64_t j = b;
    for (; j + kLanes <= end; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const Pair<acc_t> v = term(j + l);
        s[l] += v.first;
        d[l] += v.second;
      }
    }
    for (; j < end; ++j) {
      const Pair<acc_t> v = term(j);
      s[0] += v.first;
      d[0] += v.second;
    }
    total.first += lanes_sum(s);
    total.second += lanes_sum(d);
  }
  return total;
}

// max_j x_j. A NaN element is skipped here but turns the exp sum (and so lse) NaN.
template <typename scalar_t>
FA_INLINE acc_of<scalar_t> row_max(const raw_of<scalar_t>* x, int64_t n) {
  using E = Elem<scalar_t>;
  using acc_t = acc_of<scalar_t>;
  acc_t mx[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) mx[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      // Both operands loaded unconditionally: a select GCC turns into vmaxps, where
      // "v > mx[l] ? v : mx[l]" would be a conditional load that blocks vectorisation.
      const acc_t v = E::load(x[j + l]);
      const acc_t cur = mx[l];
      mx[l] = v > cur ? v : cur;
    }
  }
  for (; j < n; ++j) {
    const acc_t v = E::load(x[j]);
    mx[0] = v > mx[0] ? v : mx[0];
  }
  return lanes_max(mx);
}

// Temperature-scaled logits s_j = z_j / T, relative to a pivot, are always formed here as
//   s_j - (m + c) = (z_j - p) * (1/T) - c,   p a raw logit (the row max), m = p * (1/T),
// never as z_j * (1/T) - (m + c), and m is materialised (one rounding wherever it is used).
// The compiler may fuse a product and a subtraction into one FMA (no rounding of the product);
// then the max element, whose m was rounded, would no longer land on an exact 0: at |s| ~ 1e9
// the exp argument errs by hundreds (inf and NaN results), at ordinary |s| log-probs come out
// positive by ~1e-8. In the difference form the max element gives exactly -c, whatever the
// compiler fuses, and every other element less. At T = 1 both forms are the same arithmetic.

// v as a stored value: the product that made it cannot be fused into a later addition (FMA),
// so every use sees the one rounding. For per-row scalars, outside the vectorised loops.
template <typename T>
FA_INLINE T materialised(T v) {
#if defined(__GNUC__)
  asm("" : "+m"(v));
#endif
  return v;
}

template <typename scalar_t>
FA_INLINE acc_of<scalar_t> pivot_of(const raw_of<scalar_t>* x, int64_t n) {
  const acc_of<scalar_t> mx = row_max<scalar_t>(x, n);
  // a row of -inf (a vocabulary chunk masked by a -inf bias): 0, so that its lse is -inf as
  // the reference's, not -inf - -inf = NaN
  return mx == -std::numeric_limits<acc_of<scalar_t>>::infinity() ? acc_of<scalar_t>(0) : mx;
}

template <typename scalar_t>
FA_INLINE void fill_row(raw_of<scalar_t>* g, int64_t n, acc_of<scalar_t> v) {
  const raw_of<scalar_t> r = Elem<scalar_t>::store(v);
  for (int64_t j = 0; j < n; ++j) g[j] = r;
}

template <typename acc_t>
constexpr acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// ---- cross_entropy_fwd ---------------------------------------------------------------------

template <typename scalar_t>
struct CeArgs {
  using raw = typename Elem<scalar_t>::raw;
  using acc = typename Elem<scalar_t>::acc;
  const raw* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  const acc* weight;    // nullptr: all ones
  raw* grad;            // nullptr: no gradient
  int64_t grad_row_stride;
  acc* loss;
  int64_t n_classes;
  int64_t ignore_index;
  acc eps;         // label smoothing
  acc z_loss;      // lam
  acc weight_sum;  // W = sum_j w_j (C without weights)
  acc grad_scale;  // 1 when none was given
};

// Rows [begin, end). Per row: pass 1 max (+ pass 1b sum_j w_j z_j when eps != 0), pass 2
// e_j = exp(z_j - max) and their sum (e_j kept in the scratch row when a gradient is wanted),
// pass 3 the gradient from e_j, then the target column rewritten. All passes after the first
// hit L2. With grad aliasing logits, z_t is read before pass 3 and pass 3 reads z only
// through the scratch copy, so every logit is read before its slot is overwritten.
template <typename scalar_t>
FA_ROW_KERNEL void cross_entropy_rows(const CeArgs<scalar_t>& a, int64_t begin, int64_t end,
                                      typename CeArgs<scalar_t>::acc* scratch) {
  using E = Elem<scalar_t>;
  using raw = typename E::raw;
  using acc = typename E::acc;
  const int64_t C = a.n_classes;
  const acc eps = a.eps;
  const acc inv_c = acc(1) / static_cast<acc>(C);
  const Exp<acc> exp_acc = Exp<acc>::make();

  for (int64_t r = begin; r < end; ++r) {
    const raw* x = a.logits + r * a.logits_row_stride;
    raw* g = a.grad != nullptr ? a.grad + r * a.grad_row_stride : nullptr;
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {
      a.loss[r] = 0;
      if (g != nullptr) fill_row<scalar_t>(g, C, acc(0));
      continue;
    }
    if (t < 0 || t >= C) {  // the front door rejects these; never index with them
      a.loss[r] = quiet_nan<acc>();
      if (g != nullptr) fill_row<scalar_t>(g, C, quiet_nan<acc>());
      continue;
    }

    const acc m = row_max<scalar_t>(x, C);
    acc wz = 0;  // sum_j w_j (z_j - m): relative to m, so no cancellation at a large offset
    if (eps != 0 && a.weight == nullptr) {
      wz = row_sum<acc>(C, [&](int64_t j) { return E::load(x[j]) - m; });
    } else if (eps != 0) {
      const acc* w = a.weight;
      wz = row_sum<acc>(C,
                        [&](int64_t j) { return static_cast<acc>(w[j]) * (E::load(x[j]) - m); });
    }
    const acc z_t = E::load(x[t]);
    double sum_e_wide;
    if (g != nullptr) {
      acc* e_out = scratch;
      sum_e_wide = row_sum<acc>(C, [&](int64_t j) {
        const acc e = exp_acc(E::load(x[j]) - m);
        e_out[j] = e;
        return e;
      });
    } else {
      sum_e_wide = row_sum<acc>(C, [&](int64_t j) { return exp_acc(E::load(x[j]) - m); });
    }
    const acc sum_e = static_cast<acc>(sum_e_wide);
    const acc log_sum = static_cast<acc>(std::log(sum_e_wide));
    const acc lse = m + log_sum;
    const acc w_t = a.weight != nullptr ? static_cast<acc>(a.weight[t]) : acc(1);

    // loss = (1 - eps) w_t (lse - z_t) + eps / C sum_j w_j (lse - z_j) + lam lse^2.
    // The eps and lam terms are skipped when their coefficient is 0, so that an inf in them
    // (a -inf logit makes sum_j w_j z_j = -inf) does not turn the loss into 0 * inf = NaN.
    // lse - z_t as (m - z_t) + log_sum: no rounding of lse at a large common offset
    acc loss = (1 - eps) * w_t * ((m - z_t) + log_sum);
    if (eps != 0) loss += eps * inv_c * (a.weight_sum * log_sum - wz);
    if (a.z_loss != 0) loss += a.z_loss * lse * lse;
    a.loss[r] = loss;
    if (g == nullptr) continue;

    // g_j = [p_j (( 1 - eps) w_t + eps W / C + 2 lam lse) - eps w_j / C] * scale, with
    // p_j = e_j / sum_e, folded into g_j = e_j * pcoef - shift_j; the target column's
    // -(1 - eps) w_t is applied afterwards.
    const acc coef = (1 - eps) * w_t + eps * a.weight_sum * inv_c + 2 * a.z_loss * lse;
    const acc pcoef = coef / sum_e * a.grad_scale;
    const acc* e = scratch;
    if (eps == 0) {
      for (int64_t j = 0; j < C; ++j) g[j] = E::store(e[j] * pcoef);
    } else if (a.weight == nullptr) {
      const acc shift = eps * inv_c * a.grad_scale;
      for (int64_t j = 0; j < C; ++j) g[j] = E::store(e[j] * pcoef - shift);
    } else {
      const acc wscale = eps * inv_c * a.grad_scale;
      for (int64_t j = 0; j < C; ++j)
        g[j] = E::store(e[j] * pcoef - wscale * static_cast<acc>(a.weight[j]));
    }
    const acc g_t = (e[t] / sum_e * coef - eps * w_t * inv_c - (1 - eps) * w_t) * a.grad_scale;
    g[t] = E::store(g_t);
  }
}

// ---- token_logprobs_fwd --------------------------------------------------------------------

template <typename scalar_t>
struct TokFwdArgs {
  using raw = typename Elem<scalar_t>::raw;
  using acc = typename Elem<scalar_t>::acc;
  const raw* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  acc* logp;
  acc* entropy;  // nullptr: not wanted
  acc* lse;
  int64_t n_classes;
  int64_t ignore_index;
  acc inv_temperature;
};

// Per row, s = z / T: pass 1 max_j s_j, pass 2 sum_j e_j and (entropy) sum_j e_j (s_j - m),
// e_j = exp(s_j - m). Then lse = m + log sum e and
//   entropy = lse - sum_j p_j s_j = log(sum e) - sum_j e_j (s_j - m) / sum e,
// the shifted form, which has no cancellation between lse and E[s] for large logits.
// s_j - m is recomputed in each pass rather than stored, as (z_j - p) / T (see pivot_of).
template <typename scalar_t>
FA_ROW_KERNEL void token_logprobs_fwd_rows(const TokFwdArgs<scalar_t>& a, int64_t begin,
                                           int64_t end) {
  using E = Elem<scalar_t>;
  using raw = typename E::raw;
  using acc = typename E::acc;
  const int64_t C = a.n_classes;
  const acc inv_t = a.inv_temperature;
  const Exp<acc> exp_acc = Exp<acc>::make();
  for (int64_t r = begin; r < end; ++r) {
    const raw* x = a.logits + r * a.logits_row_stride;
    const acc p = pivot_of<scalar_t>(x, C);
    const acc m = materialised(p * inv_t);
    // sum_j e_j and sum_j e_j (s_j - m)
    Pair<double> sums{0, 0};
    if (a.entropy != nullptr) {
      sums = row_sum2<acc>(C, [&](int64_t j) {
        // y = -inf (a masked class) is raised to exp's floor: e = 0 and e * y = 0, not NaN.
        const acc y = exp_acc.floor((E::load(x[j]) - p) * inv_t);
        const acc e = exp_acc(y);
        return Pair<acc>{e, e * y};
      });
    } else {
      sums.first = row_sum<acc>(C, [&](int64_t j) { return exp_acc((E::load(x[j]) - p) * inv_t); });
    }
    const acc log_sum = static_cast<acc>(std::log(sums.first));
    const acc lse = m + log_sum;
    a.lse[r] = lse;  // the true lse even for ignored rows (backward may use it)

    const int64_t t = a.target[r];
    acc logp = 0, ent = 0;
    if (t != a.ignore_index) {
      if (t < 0 || t >= C) {
        logp = ent = quiet_nan<acc>();
      } else {
        logp = (E::load(x[t]) - p) * inv_t - log_sum;
        ent = log_sum - static_cast<acc>(sums.second / sums.first);
      }
    }
    a.logp[r] = logp;
    if (a.entropy != nullptr) a.entropy[r] = ent;
  }
}

// ---- token_logprobs_bwd --------------------------------------------------------------------

template <typename scalar_t>
struct TokBwdArgs {
  using raw = typename Elem<scalar_t>::raw;
  using acc = typename Elem<scalar_t>::acc;
  const raw* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  const acc* lse;
  const acc* entropy;       // nullptr together with grad_entropy
  const acc* grad_logp;
  const acc* grad_entropy;  // nullptr: no entropy term
  raw* grad;
  int64_t grad_row_stride;
  int64_t n_classes;
  int64_t ignore_index;
  acc inv_temperature;
};

// One pass per row: p_j = exp(s_j - lse) from the saved lse (no max / sum passes), and
//   g_j = (1/T) p_j (-g_logp - g_ent (s_j - E[s])),   E[s] = lse - entropy,
// plus (1/T) g_logp at the target, written after the pass from the s_t read before it
// (grad may alias logits; the pass itself reads x_j just before writing g_j).
// s_j - E[s] is formed as (s_j - lse) + entropy: s_j - lse is exp's argument anyway, and
// raised to exp's floor it makes a masked (-inf) class give 0 instead of 0 * -inf = NaN.
// s_j - lse = (z_j - p) / T - (lse - p / T) (see pivot_of): at T != 1 a first pass finds the
// row max p (the row is then in cache for the second); at T = 1, p = 0.
// Traffic: one read of the logits and one write of the gradient per element.
template <typename scalar_t>
FA_ROW_KERNEL void token_logprobs_bwd_rows(const TokBwdArgs<scalar_t>& a, int64_t begin,
                                           int64_t end) {
  using E = Elem<scalar_t>;
  using raw = typename E::raw;
  using acc = typename E::acc;
  const int64_t C = a.n_classes;
  const acc inv_t = a.inv_temperature;
  const Exp<acc> exp_acc = Exp<acc>::make();
  for (int64_t r = begin; r < end; ++r) {
    const raw* x = a.logits + r * a.logits_row_stride;
    raw* g = a.grad + r * a.grad_row_stride;
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {
      fill_row<scalar_t>(g, C, acc(0));
      continue;
    }
    if (t < 0 || t >= C) {
      fill_row<scalar_t>(g, C, quiet_nan<acc>());
      continue;
    }
    const acc p = inv_t == acc(1) ? acc(0) : pivot_of<scalar_t>(x, C);
    // s_j - lse = (z_j - p) / T - lse_p; p / T rounded as the forward's m was, so that
    // lse_p >= 0 for the row max
    const acc lse_p = a.lse[r] - materialised(p * inv_t);
    const acc gl = a.grad_logp[r];
    const acc d_t = exp_acc.floor((E::load(x[t]) - p) * inv_t - lse_p);  // s_t - lse
    if (a.grad_entropy == nullptr) {
      const acc c = -gl * inv_t;
      for (int64_t j = 0; j < C; ++j)
        g[j] = E::store(exp_acc((E::load(x[j]) - p) * inv_t - lse_p) * c);
      g[t] = E::store(inv_t * gl * (1 - exp_acc(d_t)));
    } else {
      const acc ge = a.grad_entropy[r];
      const acc ent = a.entropy[r];
      const acc c = -inv_t;
      for (int64_t j = 0; j < C; ++j) {
        const acc d = exp_acc.floor((E::load(x[j]) - p) * inv_t - lse_p);  // s_j - lse
        g[j] = E::store(c * exp_acc(d) * (gl + ge * (d + ent)));
      }
      const acc g_t = gl - exp_acc(d_t) * (gl + ge * (d_t + ent));
      g[t] = E::store(inv_t * g_t);
    }
  }
}

// ---- cross_entropy_slice_bwd ---------------------------------------------------------------

template <typename scalar_t>
struct SliceBwdArgs {
  using raw = typename Elem<scalar_t>::raw;
  using acc = typename Elem<scalar_t>::acc;
  const raw* logits;
  int64_t logits_row_stride;
  const int64_t* target;     // column within the slice; outside [0, C): no one-hot term here
  const acc* lse;            // of the whole row (all slices)
  const acc* entropy;        // of the whole row; nullptr together with grad_entropy
  const acc* row_scale;
  const acc* grad_entropy;   // nullptr: no entropy term
  raw* grad;
  int64_t grad_row_stride;
  int64_t n_classes;
  acc inv_temperature;
  acc target_coef;
  acc smoothing;
};

// One pass per row, as token_logprobs_bwd, from the whole row's lse (and entropy):
//   g_j = (1/T) (a (p_j - smoothing) - h p_j (s_j - E[s])),  a = row_scale, h = grad_entropy,
// s_j - E[s] formed as (s_j - lse) + entropy (floored: a -inf logit gives 0, not 0 * -inf),
// s_j - lse as in token_logprobs_bwd (a pivot pass at T != 1), then the target column, if it
// lies in this slice, from the s_t read before the pass (grad may alias logits). A row with
// a = 0 (and h = 0) is written as zeros without being read.
template <typename scalar_t>
FA_ROW_KERNEL void slice_bwd_rows(const SliceBwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using E = Elem<scalar_t>;
  using raw = typename E::raw;
  using acc = typename E::acc;
  const int64_t C = a.n_classes;
  const acc inv_t = a.inv_temperature;
  const acc smooth = a.smoothing;
  const Exp<acc> exp_acc = Exp<acc>::make();
  for (int64_t r = begin; r < end; ++r) {
    const raw* x = a.logits + r * a.logits_row_stride;
    raw* g = a.grad + r * a.grad_row_stride;
    const acc scale = a.row_scale[r];
    const acc h = a.grad_entropy != nullptr ? a.grad_entropy[r] : acc(0);
    if (scale == acc(0) && h == acc(0)) {
      fill_row<scalar_t>(g, C, acc(0));
      continue;
    }
    const int64_t t = a.target[r];
    const bool hit = t >= 0 && t < C;
    const acc p = inv_t == acc(1) ? acc(0) : pivot_of<scalar_t>(x, C);
    // s_j - lse = (z_j - p) / T - lse_p; p / T rounded as the forward's m was, so that
    // lse_p >= 0 for the row max
    const acc lse_p = a.lse[r] - materialised(p * inv_t);
    const acc d_t = hit ? exp_acc.floor((E::load(x[t]) - p) * inv_t - lse_p) : acc(0);
    const acc c = scale * inv_t;
    if (a.grad_entropy == nullptr) {
      for (int64_t j = 0; j < C; ++j)
        g[j] = E::store(c * (exp_acc((E::load(x[j]) - p) * inv_t - lse_p) - smooth));
      if (hit) g[t] = E::store(c * (exp_acc(d_t) - smooth - a.target_coef));
    } else {
      const acc ent = a.entropy[r];
      const acc ch = h * inv_t;
      for (int64_t j = 0; j < C; ++j) {
        const acc d = exp_acc.floor((E::load(x[j]) - p) * inv_t - lse_p);  // s_j - lse
        const acc pj = exp_acc(d);
        g[j] = E::store(c * (pj - smooth) - ch * pj * (d + ent));
      }
      if (hit) {
        const acc p_t = exp_acc(d_t);
        g[t] = E::store(c * (p_t - smooth - a.target_coef) - ch * p_t * (d_t + ent));
      }
    }
  }
}

int64_t grain_for(int64_t n_classes) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, n_classes));
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
typename Elem<scalar_t>::raw* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Elem<scalar_t>::raw*>(t.data_ptr<scalar_t>());
}

}  // namespace

at::Tensor cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                             double label_smoothing, double z_loss) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  at::Tensor loss = at::empty({R}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (R == 0) return loss;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "fastattn::cross_entropy_fwd", [&] {
        using acc = typename Elem<scalar_t>::acc;
        CeArgs<scalar_t> a;
        a.logits = raw_ptr<scalar_t>(logits);
        a.logits_row_stride = logits.stride(0);
        a.target = target.data_ptr<int64_t>();
        a.weight = weight.has_value() ? weight->data_ptr<acc>() : nullptr;
        const bool with_grad = grad.has_value();
        a.grad = with_grad ? raw_ptr<scalar_t>(*grad) : nullptr;
        a.grad_row_stride = with_grad ? grad->stride(0) : 0;
        a.loss = loss.data_ptr<acc>();
        a.n_classes = C;
        a.ignore_index = ignore_index;
        a.eps = static_cast<acc>(label_smoothing);
        a.z_loss = static_cast<acc>(z_loss);
        double w_sum = static_cast<double>(C);
        if (a.weight != nullptr) {
          w_sum = 0;
          for (int64_t j = 0; j < C; ++j) w_sum += a.weight[j];
        }
        a.weight_sum = static_cast<acc>(w_sum);
        a.grad_scale = grad_scale.has_value() ? static_cast<acc>(*grad_scale->data_ptr<float>())
                                              : acc(1);
        at::parallel_for(0, R, grain_for(C), [&](int64_t begin, int64_t end) {
          // The e_j row of pass 2 (C * 4 bytes, L2-resident), one per task.
          std::vector<acc> scratch(with_grad ? C : 0);
          cross_entropy_rows<scalar_t>(a, begin, end, scratch.data());
        });
      });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& target,
                                                                  int64_t ignore_index,
                                                                  double inv_temperature,
                                                                  bool with_entropy) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor logp = at::empty({R}, opts);
  at::Tensor entropy = at::empty({with_entropy ? R : 0}, opts);
  at::Tensor lse = at::empty({R}, opts);
  if (R == 0) return {logp, entropy, lse};

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "fastattn::token_logprobs_fwd", [&] {
        using acc = typename Elem<scalar_t>::acc;
        TokFwdArgs<scalar_t> a;
        a.logits = raw_ptr<scalar_t>(logits);
        a.logits_row_stride = logits.stride(0);
        a.target = target.data_ptr<int64_t>();
        a.logp = logp.data_ptr<acc>();
        a.entropy = with_entropy ? entropy.data_ptr<acc>() : nullptr;
        a.lse = lse.data_ptr<acc>();
        a.n_classes = C;
        a.ignore_index = ignore_index;
        a.inv_temperature = static_cast<acc>(inv_temperature);
        at::parallel_for(0, R, grain_for(C), [&](int64_t begin, int64_t end) {
          token_logprobs_fwd_rows<scalar_t>(a, begin, end);
        });
      });
  return {logp, entropy, lse};
}

void token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                        const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                        const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad,
                        int64_t ignore_index, double inv_temperature) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  if (R == 0) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "fastattn::token_logprobs_bwd", [&] {
        using acc = typename Elem<scalar_t>::acc;
        TokBwdArgs<scalar_t> a;
        a.logits = raw_ptr<scalar_t>(logits);
        a.logits_row_stride = logits.stride(0);
        a.target = target.data_ptr<int64_t>();
        a.lse = lse.data_ptr<acc>();
        const bool with_entropy = grad_entropy.has_value();
        a.entropy = with_entropy ? entropy->data_ptr<acc>() : nullptr;
        a.grad_logp = grad_logp.data_ptr<acc>();
        a.grad_entropy = with_entropy ? grad_entropy->data_ptr<acc>() : nullptr;
        a.grad = raw_ptr<scalar_t>(grad);
        a.grad_row_stride = grad.stride(0);
        a.n_classes = C;
        a.ignore_index = ignore_index;
        a.inv_temperature = static_cast<acc>(inv_temperature);
        at::parallel_for(0, R, grain_for(C), [&](int64_t begin, int64_t end) {
          token_logprobs_bwd_rows<scalar_t>(a, begin, end);
        });
      });
}

void cross_entropy_slice_bwd(const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const at::Tensor& row_scale,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad, double inv_temperature, double target_coef,
                             double smoothing) {
  const int64_t R = logits.size(0);
  const int64_t C = logits.size(1);
  if (R == 0) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "fastattn::cross_entropy_slice_bwd", [&] {
        using acc = typename Elem<scalar_t>::acc;
        SliceBwdArgs<scalar_t> a;
        a.logits = raw_ptr<scalar_t>(logits);
        a.logits_row_stride = logits.stride(0);
        a.target = target.data_ptr<int64_t>();
        a.lse = lse.data_ptr<acc>();
        const bool with_entropy = grad_entropy.has_value();
        a.entropy = with_entropy ? entropy->data_ptr<acc>() : nullptr;
        a.row_scale = row_scale.data_ptr<acc>();
        a.grad_entropy = with_entropy ? grad_entropy->data_ptr<acc>() : nullptr;
        a.grad = raw_ptr<scalar_t>(grad);
        a.grad_row_stride = grad.stride(0);
        a.n_classes = C;
        a.inv_temperature = static_cast<acc>(inv_temperature);
        a.target_coef = static_cast<acc>(target_coef);
        a.smoothing = static_cast<acc>(smoothing);
        at::parallel_for(0, R, grain_for(C), [&](int64_t begin, int64_t end) {
          slice_bwd_rows<scalar_t>(a, begin, end);
        });
      });
}

}  // namespace cpu
}  // namespace fastattn
